"""The training loop: one code path for 1 process and for a dp x cp mesh of many.

Reads top to bottom: build mesh -> data -> model (BPT MLP -> AC -> FSDP2) -> optimizer -> (resume) -> steps.
One step:

    fetch grad_accum micro-batches [B, S] for this dp rank
    count target tokens of the whole global batch (all-reduce over dp)
    per micro-batch: shard tokens/labels/positions along the sequence for this cp rank (layout),
        forward (ring attention when cp > 1), chunked loss SUM / global token count, backward
        (FSDP2 reduce-scatters the gradients, SUMMED over dp and cp)
    without FSDP (parallel.fsdp=none): all-reduce gradients (SUM over every rank)
    NaN guard: a non-finite loss or gradient norm (the same value on every rank) skips the update
    clip, AdamW step, schedule step; then agree across ranks whether to stop (signal, stop file, budget)

Dividing each rank's loss sum by the *global* token count makes the summed gradient exactly the
gradient of the global mean loss, whatever the mesh: cp=1 and cp=N give the same numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from seqpar.config import Config
from seqpar.data import build_data
from seqpar.data.pose import apply_pose
from seqpar.models.build import build_model
from seqpar.models.options import RANK_LOCAL_ATTENTION
from seqpar.models.parallelize import parallelize
from seqpar.ops import attention
from seqpar.parallel.mesh import Mesh
from seqpar.train.checkpoint import Checkpointer, load_init_state
from seqpar.train.exit_codes import TrainingDiverged
from seqpar.train.guard import NonFiniteGuard, weights_finite
from seqpar.train.metrics import FlopCounter, MetricsLogger, format_eta, peak_memory_gib, peak_tflops
from seqpar.train.preemption import StopRequest
from seqpar.train.preflight import preflight
from seqpar.train.profile import StepProfiler
from seqpar.train.resolve import load_tokenizer, resolve_config
from seqpar.train.run_dir import DATA_STREAM, claim_run, open_run, truncate_metrics
from seqpar.train.schedule import lr_multiplier


def _local(t):
    """A DTensor's full value (e.g. the gradient norm), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Trainer:
    def __init__(self, cfg: Config, mesh: Mesh, *, init_state: Optional[dict] = None):
        self.mesh = mesh
        self.device = mesh.device
        self.start_time = time.time()
        # train.py resolves the config before the mesh exists; one built in code is resolved here by the
        # same function (idempotent: a resolved config comes back as is). Used as given from here on.
        self.cfg = cfg = resolve_config(cfg)
        self.autocast = self._autocast_dtype()
        preflight(cfg, self.device, self.autocast or torch.float32)  # wandb, attention backend: before any build
        # The mesh's gloo group: checkpoint coordination (async saves run collectives from a thread) and
        # the per-step stop agreement (no CUDA sync). None for one process.
        self.cpu_group = mesh.cpu_group
        # One run per directory: lock, agree with the saved config.yaml, then (re)write it (run_dir.py).
        self._lock, self._changed = open_run(cfg, rank=mesh.rank, world_size=mesh.world_size, group=self.cpu_group)
        self.train_data, self.val_data, self.tokenizer = build_data(
            cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            dp_rank=mesh.dp_rank, dp_size=mesh.dp, tokenizer=load_tokenizer(cfg))  # BPE / tokenizer.json load from disk
        self.model, self.fsdp_mesh = self._build_model()
        if init_state is not None:  # start from given weights (seqpar.eval.demo fine-tunes a trained model)
            load_init_state(self.model, init_state, self.cfg.model.name)

        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # no decay on norms
        no_decay = [p for p in params if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_multiplier, warmup=o.warmup_steps, total=cfg.train.steps, min_ratio=o.min_lr_ratio))
        self.step = 0
        self.checkpointer = Checkpointer(
            os.path.join(cfg.logging.run_dir, "checkpoints"), rank=mesh.rank, world_size=mesh.world_size,
            keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save, process_group=self.cpu_group)
        self.checkpointer.clean_stale()  # rank 0, under the run lock: leftovers of killed saves
        self.peak = peak_tflops(self.device, cfg.logging.peak_tflops)
        self.flops = FlopCounter(self.model, cfg.model, cfg.data, cfg.train.seq_len)
        lg = cfg.logging
        self.profiler = StepProfiler(self.model, start=lg.profile_at, steps=lg.profile_steps, run_dir=lg.run_dir,
                                     rank=mesh.rank, device=self.device, trace=lg.profile_trace, last_step=cfg.train.steps)
        if cfg.checkpoint.resume:
            self._resume()
        if mesh.is_main:  # records after the resumed step were logged by the interrupted run: drop them
            claim_run(cfg)
            truncate_metrics(cfg.logging.run_dir, self.step)
        self.logger = MetricsLogger(
            cfg.logging.run_dir, enabled=mesh.is_main, use_wandb=cfg.logging.wandb, project=cfg.logging.wandb_project,
            config=dataclasses.asdict(cfg), progress=cfg.logging.progress, total_steps=cfg.train.steps)

    # ----------------------------------------------------------------------------------- setup
    def _attention_fn(self):
        p = self.cfg.parallel
        if self.cfg.lora.s2_attn:  # LongLoRA S2-Attn; Config guarantees cp == 1
            from seqpar.ops.s2attn import make_s2_attn_fn

            return make_s2_attn_fn(int(self.cfg.lora.s2_group_ratio * self.cfg.train.seq_len), backend=p.attention_backend)
        if self.mesh.cp == 1 or self.cfg.model.arch in RANK_LOCAL_ATTENTION:  # chunks never cross a rank
            return functools.partial(attention, backend=p.attention_backend)
        from seqpar.parallel.attention_fn import cp_attn_fn

        return cp_attn_fn(self.cfg, self.mesh)  # parallel.cp_comm: ring | allgather | ulysses | hybrid | auto

    def _autocast_dtype(self) -> Optional[torch.dtype]:
        dtype = self.cfg.train.dtype
        if dtype == "bf16" or (dtype == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _build_model(self):
        cfg, t = self.cfg, self.cfg.train
        # On GPU: build on the meta device, shard, then materialise only this rank's shards (an 8B
        # model never exists whole on one rank). On CPU: build whole with the seed, then shard, so the
        # weights equal a single process's exactly (what the equality tests compare).
        on_meta = self.device.type == "cuda"
        torch.manual_seed(t.seed)  # same initial weights on every rank
        if on_meta:
            with torch.device("meta"):
                model = build_model(cfg.model, attn_fn=self._attention_fn(), cp=self.mesh.cp)
        else:
            model = build_model(cfg.model, attn_fn=self._attention_fn(), cp=self.mesh.cp)
        if cfg.lora.rank > 0:  # adapters first, so FSDP shards them like every other parameter
            from seqpar.models.lora import apply_lora

            apply_lora(model, cfg.lora)
        dmesh = parallelize(model, self.mesh, fsdp=cfg.parallel.fsdp, ac=t.ac, ffn_chunk=t.ffn_chunk,
                            param_dtype=self.autocast, compile=t.compiled(self.device.type))
        if on_meta:
            model.to_empty(device=self.device)
            torch.manual_seed(t.seed)
            model.init_weights()
            if cfg.lora.rank > 0:
                from seqpar.models.lora import reset_lora

                reset_lora(model)  # init_weights knows nothing of adapters
        else:
            model.to(self.device)
        if cfg.model.init_from:
            from seqpar.models.hf import load_hf_weights

            load_hf_weights(model, cfg.model.init_from)  # every rank reads, keeps its own shard
        # Dynamic NTK depends on the (global) length; a no-op for the other scalings.
        model.set_rope_scaling(cfg.model.rope_scaling, seq_len=max(t.seq_len, cfg.data.pose_target_len))
        return model, dmesh

    # ------------------------------------------------------------------------------ checkpoint
    def _app_state(self) -> dict:
        """DCP application state: sharded model/optimizer, scheduler, and this rank's own state."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        mine = {"data": self.train_data.state_dict(), "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        # Rank-unique key: DCP keeps one copy of same-key entries across ranks.
        return {"step": self.step, "model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                f"rank{self.mesh.rank}": mine}

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._app_state()
        step = self.checkpointer.load_latest(state)
        if step is None:
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        mine = state[f"rank{self.mesh.rank}"]
        restart = [k for k in self._changed if k in DATA_STREAM]  # checkpoint.allow_changes: a new stream
        if restart and self.mesh.is_main:
            print(f"{', '.join(restart)} changed (checkpoint.allow_changes): the data stream restarts", flush=True)
        if not restart:
            self.train_data.load_state_dict(mine["data"])
        torch.set_rng_state(mine["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in mine:
            torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
        self.step = step
        if self.mesh.is_main:
            print(f"resumed from {self.checkpointer.ckpt_dir} at step {step}", flush=True)

    def save(self) -> None:
        """Checkpoint this step; never non-finite weights (raises TrainingDiverged instead; collective)."""
        if not weights_finite(self.model, world_size=self.mesh.world_size, group=self.cpu_group):
            raise TrainingDiverged(f"the weights are non-finite at step {self.step}: not saving them; the last "
                                   "checkpoint is kept. Lower optim.lr or set optim.grad_clip.")
        self.checkpointer.save(self.step, self._app_state())

    # ------------------------------------------------------------------------------------ step
    def _shard(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This cp rank's part of a ``[B, S]`` tensor (identity when cp == 1); doc_ids for layout=docs."""
        if self.mesh.cp == 1:
            return x
        from seqpar.parallel.layout import shard_sequence

        return shard_sequence(x, 1, layout=self.cfg.layout, rank=self.mesh.cp_rank,
                              world_size=self.mesh.cp, doc_ids=doc_ids)

    def _all_reduce(self, t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.mesh.world_size > 1:
            dist.all_reduce(t, op=op, group=group)
        return t

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        doc_ids = batch.get("doc_ids")  # [B, S] GLOBAL: every cp rank keeps all of it (the mask needs it)
        tokens, labels, positions = (self._shard(batch[k], doc_ids).to(self.device, non_blocking=True)
                                     for k in ("tokens", "labels", "positions"))
        masked = {"doc_ids": doc_ids.to(self.device)} if self.cfg.data.doc_mask and doc_ids is not None else {}
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            hidden = self.model(tokens, positions, **masked)  # [B, S/cp, dim]
            loss_sum, _ = self.model.loss(hidden, labels, chunk_size=self.cfg.train.loss_chunk)
        return loss_sum

    def train_step(self) -> dict:
        d = self.cfg.data
        micro = [apply_pose(next(self.train_data), target_len=d.pose_target_len, num_chunks=d.pose_chunks,
                            seed=self.cfg.train.seed, step=self.step, micro_step=i, dp_rank=self.mesh.dp_rank)
                 for i in range(self.cfg.train.grad_accum)]
        # Target tokens of the global batch: cp ranks of one dp rank hold the same rows, so reduce over dp.
        n_tokens = sum((b["labels"] != -100).sum() for b in micro).to(self.device, torch.float64)
        n_tokens = self._all_reduce(n_tokens, self.mesh.dp_group).clamp_min(1)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for batch in micro:
            self.flops.add_batch(batch)
            loss_sum = self._loss_sum(batch)
            (loss_sum / n_tokens.float()).backward()
            total += loss_sum.detach().double()
        if self.fsdp_mesh is None and self.mesh.world_size > 1:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)  # one all-reduce instead of one per tensor
            dist.all_reduce(flat)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        clip = self.cfg.optim.grad_clip
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None], clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        loss = self._all_reduce(total) / n_tokens
        gnorm = _local(gnorm)
        # Loss and norm are global values, equal on every rank, so every rank takes the same branch. One
        # scalar to the host per step: the price of not applying a NaN update.
        finite = bool(torch.isfinite(loss) & torch.isfinite(gnorm))
        if finite:  # a skipped step moves neither the weights, AdamW's moments nor the LR schedule
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": gnorm, "tokens": n_tokens, "lr": lr, "finite": finite}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.val_data is None:
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        # A val iterator restarts at its first batch on iter(), so every eval sees the same rows.
        for batch in itertools.islice(iter(self.val_data), self.cfg.train.eval_batches):
            total += self._loss_sum(batch).double()
            count += (batch["labels"] != -100).sum().to(self.device)
        self.model.train()
        total = self._all_reduce(total)
        count = self._all_reduce(count, self.mesh.dp_group)
        return (total / count.clamp_min(1)).item()

    # ------------------------------------------------------------------------------------ loop
    def fit(self, until: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (or stop early at step ``until``, checkpointing there if enabled).

        Stops early, after a checkpoint when ``checkpoint.every > 0``, on SIGTERM / SIGUSR2 / SIGINT, the
        stop file or the ``train.max_minutes`` budget; all ranks stop after the same step. Non-finite steps
        are skipped (:mod:`seqpar.train.guard`). Releases the run directory's lock when it returns.
        Returns ``{"history": [log records], "step": last step, "stopped": reason or None}``.

        Raises TrainingDiverged after more than ``train.max_bad_steps`` consecutive non-finite steps.
        """
        cfg, mesh = self.cfg, self.mesh
        until = cfg.train.steps if until is None else min(until, cfg.train.steps)
        if mesh.is_main:
            self._print_banner()
        stop = StopRequest(max_minutes=cfg.train.max_minutes, stop_file=cfg.train.stop_file,
                           start_time=self.start_time, rank=mesh.rank, group=self.cpu_group,
                           world_size=mesh.world_size).install()
        self.model.train()
        history, reason = [], None
        t_last, tokens_since = time.time(), 0.0
        first_step = self.step
        guard = NonFiniteGuard(cfg.train.max_bad_steps)
        try:
            while self.step < until:
                self.profiler.before(self.step + 1)
                out = self.train_step()
                self.step += 1
                self.profiler.after(self.step)
                tokens_since += cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum * mesh.dp
                if mesh.is_main and self.logger.progress:
                    self.logger.tick(self.step, out["loss"].item())
                is_last = self.step == cfg.train.steps
                # Diverged: an async save of a good step still commits (wait), then TrainingDiverged.
                warning = guard.update(self.step, out["finite"], out["loss"].item(), out["grad_norm"].item(),
                                       before_raise=self.checkpointer.wait)
                if warning is not None:  # logged every time, whatever logging.log_every says
                    vals = {k: out[k].item() for k in ("loss", "grad_norm")}  # None in JSON where not finite
                    history.append({"step": self.step, "skipped": True,
                                    **{k: v if math.isfinite(v) else None for k, v in vals.items()}})
                    self.logger.log(history[-1], warning)
                elif self.step % cfg.logging.log_every == 0 or is_last or self.step == first_step + 1:
                    history.append(self._log(out, time.time() - t_last, tokens_since, first_step))
                    t_last, tokens_since = time.time(), 0.0
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or is_last):
                    val = self.evaluate()
                    if val is not None:
                        self.logger.log({"step": self.step, "val_loss": val},
                                        f"step {self.step:>6} | val_loss {val:.4f} | val_ppl {math.exp(min(val, 50)):.2f}")
                        history[-1]["val_loss"] = val
                saved = bool(cfg.checkpoint.every) and (self.step % cfg.checkpoint.every == 0 or self.step == until) \
                    and not guard.bad  # never right after a skipped step: the last good checkpoint stays
                if saved:
                    self.save()
                reason = None if self.step >= until else stop.poll()
                if reason is not None:
                    if cfg.checkpoint.every and not saved and not guard.bad:
                        self.save()
                    if mesh.is_main:
                        what = "checkpointed" if cfg.checkpoint.every else "not checkpointed (checkpoint.every=0)"
                        print(f"{reason} at step {self.step}: {what}; stopping cleanly.", flush=True)
                    break
            self.profiler.after(self.step, stopping=True)  # stopped early while profiling: what was profiled
            self.checkpointer.wait()  # an async save still in flight is committed before we return
        finally:
            stop.restore()
            self.logger.close()
            if self._lock is not None:
                self._lock.release()
        return {"history": history, "step": self.step, "stopped": reason}

    def _print_banner(self) -> None:
        cfg = self.cfg
        n = self.model.num_params()
        fsdp = f"fsdp {cfg.parallel.fsdp}" if self.fsdp_mesh is not None else "fsdp off"
        print(f"seqpar | {self.mesh.describe()} | model {cfg.model.name}: {n / 1e6:.2f}M params | "
              f"seq_len {cfg.train.seq_len} | batch {cfg.train.batch_size}x{cfg.train.grad_accum}x{self.mesh.dp} | "
              f"attention {cfg.parallel.attention_backend} layout {cfg.layout} | {fsdp} | "
              f"ac {cfg.train.ac} ffn_chunk {cfg.train.ffn_chunk} compile {cfg.train.compiled(self.device.type)} | run_dir {cfg.logging.run_dir}", flush=True)
        if self.step >= cfg.train.steps:
            print(f"already trained to step {self.step} >= train.steps={cfg.train.steps}; nothing to do "
                  "(raise train.steps, or use another logging.run_dir).", flush=True)

    def _log(self, out: dict, dt: float, tokens: float, first_step: int) -> dict:
        loss = out["loss"].item()  # .item() synchronises, so dt covers the GPU work
        # Peak memory of the fullest rank: the one that decides whether a config fits.
        mem = self._all_reduce(torch.tensor([peak_memory_gib(self.device)], device=self.device),
                               op=dist.ReduceOp.MAX).item()
        tps = tokens / max(dt, 1e-9)
        tflops = self.flops.take() * tps / self.mesh.world_size / 1e12  # per device, the mask's real work
        steps_left = self.cfg.train.steps - self.step
        sec_per_step = (time.time() - self.start_time) / max(1, self.step - first_step)
        rec = {"step": self.step, "loss": loss, "grad_norm": out["grad_norm"].item(),
               "lr": out["lr"], "tokens_per_s": tps,
               "tokens_per_s_per_device": tps / self.mesh.world_size, "tflops_per_device": tflops,
               "mfu": tflops / self.peak if self.peak else None, "peak_mem_gib": mem,
               "elapsed_s": time.time() - self.start_time}
        mfu = f" | MFU {rec['mfu']:.1%}" if self.peak else ""
        line = (f"step {self.step:>6}/{self.cfg.train.steps} | loss {loss:.4f} | gnorm {rec['grad_norm']:.3f} | "
                f"lr {rec['lr']:.2e} | tok/s/dev {tps / self.mesh.world_size:,.0f} | TFLOP/s/dev {tflops:.2f}{mfu} | "
                f"mem {mem:.2f}GiB | eta {format_eta(steps_left * sec_per_step)}")
        self.logger.log(rec, line)
        return rec


def run(cfg: Config) -> dict:
    """Set up the mesh from the environment (torchrun, srun or one process), train, tear down.

    With ``train.dry_run`` nothing is allocated: see :func:`seqpar.train.dry_run.dry_run`.
    """
    if cfg.train.dry_run:
        from seqpar.train.dry_run import dry_run

        return dry_run(cfg)
    from seqpar.parallel.mesh import destroy_mesh, init_mesh

    mesh = init_mesh(cfg.parallel, cfg.train.device)
    try:
        return Trainer(cfg, mesh).fit()
    finally:
        destroy_mesh()
