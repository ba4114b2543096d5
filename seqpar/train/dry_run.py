"""Dry run: validate a config, print the mesh and a per-GPU memory estimate, allocate nothing.

    python train.py --dry-run model=llama3-8b parallel.dp=1 parallel.cp=8 train.seq_len=1048576

The model is built on the meta device (shapes only), so a config far larger than this machine is
checked in a second. The world size is the launcher's (``WORLD_SIZE``) when there is one, else
``parallel.dp * parallel.cp`` (give ``parallel.dp`` explicitly to size a cluster run).

The memory model counts, per GPU: fp32 parameters, fp32 gradients and AdamW's two fp32 moments,
each divided by the FSDP shard degree; FSDP's transient all-gathered weights (root unit + two blocks)
and gradient reduce buffers; activations kept for backward at ``B * seq_len / cp`` tokens, per layer
according to ``train.ac``, ``train.ffn_chunk`` and ``train.compile`` (what each autograd node saves
in ``seqpar.models.llama``, or the compiled graphs of ``seqpar.models.compile``, or the recompute
regions of ``seqpar.models.checkpointing``); the chunked loss;
and the transients of backward (one layer recomputed, one loss chunk of logits, ring-attention K/V
buffers). It ignores allocator fragmentation and kernel workspaces, so leave ~10% headroom; ``benchmarks/bench_train.py`` compares it with measured peaks.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from seqpar.config import Config
from seqpar.models.options import RANK_LOCAL_ATTENTION
from seqpar.parallel import cost
from seqpar.parallel.mesh import dist_env, mesh_groups

GIB = 2**30


def _vocab(cfg: Config) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    # Without reading the corpus: the byte tokenizer's size is fixed, BPE's is what it is trained to.
    n = 259 if cfg.data.tokenizer == "byte" else cfg.data.bpe_vocab_size
    return 64 * math.ceil(n / 64)


def param_counts(cfg: Config) -> dict:
    """Parameter counts from a meta-device model: ``{"total", "per_block", "root"}`` (nothing allocated)."""
    from seqpar.models.build import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    return {"total": total, "per_block": per_block, "root": total - per_block * len(model.layers)}


def target_device(t) -> str:
    """The device type an estimate plans for: ``train.device``, with ``auto`` meaning a GPU (the dry run sizes GPU
    runs; the same rule picks bf16 and ``train.compile=auto``)."""
    return "cpu" if t.device == "cpu" else "cuda"


def estimate_memory(cfg: Config, dp: int, cp: int, *, bf16: bool = True) -> dict:
    """Per-GPU memory estimate in bytes for ``cfg`` on a ``[dp, cp]`` mesh (no allocation; meta device).

    Returns a dict of components (``params``, ``grads``, ``optimizer``, ``fsdp_buffers``,
    ``activations``, ``transient``) and their ``total``, plus ``shard_degree`` and ``tokens_per_gpu``.
    """
    if cfg.model.vocab_size is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=_vocab(cfg)))
    m, t, p = cfg.model, cfg.train, cfg.parallel
    n = param_counts(cfg)
    a = 2 if bf16 else 4  # bytes per activation / compute-dtype weight
    world = dp * cp
    shard = {"dp_cp": world, "dp": dp, "none": 1}[p.fsdp] if world > 1 else 1
    d, h, heads, L = m.dim, m.ffn_dim, m.n_heads, m.n_layers
    kv = m.kv_heads * m.head_dim
    tokens = t.batch_size * t.seq_len // cp  # tokens of one micro-batch on one GPU
    vocab = m.vocab_size

    out = {"params": 4 * n["total"] / shard, "grads": 4 * n["total"] / shard, "optimizer": 8 * n["total"] / shard}
    if shard > 1:
        # Root unit stays gathered through the step; two blocks gathered (current + prefetch); one
        # block's unsharded gradients plus its fp32 reduce-scatter input.
        out["fsdp_buffers"] = a * n["root"] * 2 + 2 * a * n["per_block"] + (a + 4) * n["per_block"]
    else:
        out["fsdp_buffers"] = a * n["total"] if bf16 else 0  # autocast's cached bf16 copies of the weights

    # Saved activations per token per layer (bytes), following what each op keeps for backward.
    if t.compiled(target_device(t)):  # seqpar.models.compile: the partitioner keeps inputs, recomputes the middle
        norm = 2 * a * d + 4  # input + output (the projections' input) + fp32 rstd
        rope = 0  # linear in q/k: backward needs only the shared cos/sin
        mlp = 0 if t.ffn_chunk else 3 * a * h  # w1 x, w3 x and the product (measured: tests/test_compile.py)
    else:
        norm = (4 + a) * d  # fp32 upcast + normed output
        rope = 4 * (d + kv) if bf16 else 0  # fp32 copies of q and k inside apply_rope
        mlp = 0 if t.ffn_chunk else 4 * a * h  # w1 x, silu(w1 x), w3 x, product
    if bf16 and shard == 1:
        # One GPU (no FSDP mixed precision): bf16 comes from autocast over fp32 weights, so the residual stream
        # stays fp32 and each RMSNorm also keeps its fp32 normed tensor for the weight's gradient (saved-tensor
        # census on the CPU; on one H200, llama3-1b shape at 64k, 2/6/16 layers measured 21.5/39.8/85.7 GiB
        # against 18.6/33.7/71.5 without this term: benchmarks/results/session10_2026-11-29/NOTES.md).
        norm += 4 * d
    attn = a * (d + kv) + a * kv + a * d + 4 * heads  # q, k (roped), v, out; fp32 lse
    layer_none = 2 * norm + rope + attn + mlp
    saved = {"none": layer_none,
             "full": a * d,  # the block input
             # block input h (the inputs of its two recompute regions) + what the attention saves: q, k
             # after RoPE, v, out, fp32 lse. Measured: tests/unit/test_blockwise.py (saved-tensor hooks).
             "selective": a * d + a * (d + 2 * kv) + a * d + 4 * heads}[t.ac]
    head = norm + a * d  # final norm and its output (the chunked loss keeps only that)
    rope_tables = 2 * 4 * m.head_dim // 2  # cos, sin fp32, shared by all layers
    out["activations"] = tokens * (L * saved + head + rope_tables)

    # Transients in backward: the largest of one recomputed layer and one chunk of logits, plus the
    # ring's in-flight K/V (forward) and K/V + fp32 dK/dV (backward), plus gradient buffers of one layer.
    chunk = min(t.ffn_chunk, tokens) if t.ffn_chunk else tokens
    recompute = tokens * (layer_none - mlp) + chunk * 4 * a * h if t.ac != "none" or t.ffn_chunk else 0
    logits = min(t.loss_chunk, tokens) * vocab * (a + 4 + 4)  # bf16 logits, fp32 logits, fp32 grad
    ring = tokens * kv * (2 * 2 * a + 2 * 4) if cp > 1 else 0
    grads_act = 3 * a * d * tokens
    out["transient"] = max(recompute, logits) + ring + grads_act
    out["total"] = sum(out.values())
    out.update(shard_degree=shard, tokens_per_gpu=tokens, params_total=n["total"])
    return out


def _resolve_world(cfg: Config) -> int:
    env = dist_env()
    if env.world_size > 1:
        return env.world_size
    return cfg.parallel.cp * (cfg.parallel.dp if cfg.parallel.dp > 0 else 1)


def dry_run(cfg: Config, world_size: Optional[int] = None, gpu_gib: Optional[float] = None) -> dict:
    """Validate ``cfg`` for ``world_size`` ranks, print the mesh and the memory estimate, return them.

    Raises ConfigError (mesh, divisibility) like a real run would, before anything is allocated.
    """
    world = _resolve_world(cfg) if world_size is None else world_size
    dp, cp = cfg.parallel.resolve(world)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=_vocab(cfg)))
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and target_device(cfg.train) == "cuda")
    est = estimate_memory(cfg, dp, cp, bf16=bf16)
    if gpu_gib is None:
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    fits = est["total"] <= 0.9 * gpu_gib * GIB
    attn = attention_cost(cfg, cp)
    if dist_env().rank == 0:
        _print(cfg, dp, cp, est, gpu_gib, fits)
        if cp > 1 and cfg.model.arch in RANK_LOCAL_ATTENTION:  # its chunks stay on their rank: no cp mode applies
            print(f"  attention: model.arch={cfg.model.arch} attends within chunks on each rank (no cp communication;"
                  f" parallel.cp_comm does not apply); its recurrent state passes between ranks", flush=True)
        else:
            _print_attention(cfg, attn)
    return {"world_size": world, "dp": dp, "cp": cp, "memory": est, "gpu_gib": gpu_gib, "fits": fits,
            "attention": attn}


def attention_cost(cfg: Config, cp: int, gpus_per_node: Optional[int] = None) -> dict:
    """PREDICTED attention time per step (fwd+bwd, all layers) of each ``parallel.cp_comm`` mode on ``cp`` GPUs
    (:mod:`seqpar.parallel.cost`): ``{"modes": {mode: prediction}, "best", "kernel", "gpus_per_node"}``.
    The kernel's rates are ``parallel.attention_backend``'s when measured, else cuDNN's (auto's first choice)."""
    if gpus_per_node is None:
        gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 8))
    shape, cluster = cost.run_shape(cfg, cp, gpus_per_node)
    cal = cost.calib_for(cfg.parallel, shape, cluster)
    modes = cost.predict(shape, cluster, cal)
    best = min(cost.MODES, key=lambda md: (modes[md]["time"], cost.MODES.index(md)))
    return {"modes": modes, "best": best, "kernel": cluster.kernel, "gpus_per_node": cluster.gpus_per_node,
            "allgather_slices": min(cal.slices, shape.hk)}


def _print_attention(cfg: Config, attn: dict) -> None:
    def one(md: str, r: dict) -> str:
        if not math.isfinite(r["time"]):
            return f"{md} n/a"
        u = f" U={r['ulysses']}" if "ulysses" in r else ""
        if md == "allgather" and "allgather_slices" in attn:
            n = attn["allgather_slices"]
            u = f" ({n} slice{'s' if n > 1 else ''})"
        when = f"{r['time'] * 1e3:,.1f} ms" if r["time"] < 10 else f"{r['time']:,.1f} s"
        return f"{md}{u} {when} ({r['efficiency']:.0%})"

    modes, best = attn["modes"], attn["best"]
    print(f"  attention per step, PREDICTED by the cost model (fwd+bwd, all layers; kernel {attn['kernel']}, "
          f"{attn['gpus_per_node']} GPUs/node, efficiency vs one GPU):")
    print("    " + " | ".join(one(md, modes[md]) for md in cost.MODES))
    print(f"    best predicted: {one(best, modes[best])} | configured parallel.cp_comm="
          f"{getattr(cfg.parallel, 'cp_comm', 'ring')}", flush=True)


def _print(cfg: Config, dp: int, cp: int, est: dict, gpu_gib: float, fits: bool) -> None:
    m, t = cfg.model, cfg.train
    groups = mesh_groups(dp, cp)
    show = lambda lists: "; ".join(str(g) for g in lists[:4]) + (f"; ... ({len(lists)} groups)" if len(lists) > 4 else "")
    print(f"dry run | world {dp * cp} = dp {dp} x cp {cp} | fsdp {cfg.parallel.fsdp} (shard degree "
          f"{est['shard_degree']}) | layout {cfg.layout} | attention {cfg.parallel.attention_backend}")
    print(f"  cp rings (ring attention): {show(groups['cp'])}")
    print(f"  dp groups (different rows): {show(groups['dp'])}")
    print(f"  model {m.name}: {est['params_total'] / 1e9:.3f}B params | dim {m.dim} layers {m.n_layers} heads "
          f"{m.n_heads}/{m.kv_heads} ffn {m.ffn_dim} vocab {m.vocab_size}")
    print(f"  seq_len {t.seq_len:,} x batch {t.batch_size} per dp rank -> {est['tokens_per_gpu']:,} tokens per GPU | "
          f"ac {t.ac} | ffn_chunk {t.ffn_chunk} | loss_chunk {t.loss_chunk} | "
          f"compile {t.compiled(target_device(t))}")
    dense = m.attention == "dense" and m.arch == "llama"
    print("  per-GPU memory estimate (GiB)" + ("" if dense else f", activations and attention cost estimated for DENSE "
          f"attention (the model has attention={m.attention} arch={m.arch}; parameters are counted exactly)") + ":")
    for key in ("params", "grads", "optimizer", "fsdp_buffers", "activations", "transient", "total"):
        print(f"    {key:<13} {est[key] / GIB:10.2f}")
    verdict = "fits" if fits else "does NOT fit"
    print(f"  {verdict} in 90% of a {gpu_gib:.0f} GiB GPU", flush=True)
    if not fits:
        hints = []
        if t.ac != "full":
            hints.append("train.ac=full")
        if not t.ffn_chunk:
            hints.append("train.ffn_chunk=4096")
        hints.append(f"parallel.cp={2 * cp} (more GPUs)")
        print(f"  try: {', '.join(hints)}", flush=True)

