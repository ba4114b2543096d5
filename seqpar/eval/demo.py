"""End-to-end context-extension demo on a tiny model: train at length L, then extend to 4L.

1. ``base``: the tiny Llama trained at L by ``seqpar.train.run`` (byte tokenizer, embedded corpus).
2. zero-shot scalings of ``base`` at evaluation time: linear, ntk, dynamic, yarn (factor 4).
3. short fine-tunes of ``base`` at length L with YaRN x4: without PoSE, with PoSE (positions up to 4L),
   and LongLoRA (LoRA r8 on q/k/v/o + trainable embeddings/norms + S2-Attn) with PoSE.
4. perplexity vs context (L, 2L, 4L) and passkey retrieval for every variant: tables + PNGs in ``--out``.

    python -m seqpar.eval.demo --out results/ctx_demo --device cuda --train-len 256

The fine-tunes use the library pieces the trainer will call (``apply_lora``, ``apply_pose``,
``make_s2_attn_fn``, ``Llama.set_rope_scaling``) in a minimal loop, so the demo does not depend on
trainer wiring. Numbers from one seed on a sub-million-parameter model: read trends, not decimals.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Optional, Sequence

import torch

from seqpar.config import (CheckpointConfig, Config, DataConfig, LoggingConfig, LoRAConfig, ModelConfig,
                           OptimConfig, TrainConfig)


def write_passkey_corpus(path: str, train_len: int, n_docs: int, code_bytes: int, seed: int) -> None:
    """A JSON-lines corpus: ``n_docs`` passkey prompts with their answers (lengths in [shortest, train_len],
    random depths and keys) interleaved with ``code_bytes`` of the embedded stdlib corpus, so the model
    learns retrieval inside its training length and stays a language model."""
    import json

    import numpy as np

    from seqpar.data.corpus import iter_documents
    from seqpar.data.tokenizer import ByteTokenizer
    from seqpar.eval.passkey import passkey_min_length, passkey_prompt

    rng, tok = np.random.default_rng(seed), ByteTokenizer()
    shortest = passkey_min_length(tok)
    if shortest > train_len:
        raise ValueError(f"--train-len {train_len} cannot hold a passkey prompt ({shortest} tokens); use 512.")
    docs = []
    for _ in range(n_docs):
        length = int(rng.integers(shortest, train_len + 1))
        ids, _ = passkey_prompt(tok, length, float(rng.random()), str(int(rng.integers(10000, 100000))))
        docs.append(tok.decode(ids))
    code = list(iter_documents(DataConfig(max_bytes=code_bytes)))
    order = rng.permutation(len(docs) + len(code))
    everything = docs + code
    with open(path, "w") as f:
        for i in order:
            f.write(json.dumps({"text": everything[i]}) + "\n")


def _base_config(args, data: DataConfig) -> Config:
    return Config(
        model=ModelConfig(name="tiny", dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                          n_kv_heads=args.n_heads // 2),
        data=data,
        optim=OptimConfig(lr=args.lr, warmup_steps=50),
        train=TrainConfig(seq_len=args.train_len, batch_size=args.batch_size, steps=args.base_steps,
                          device=args.device, eval_every=0, seed=args.seed),
        logging=LoggingConfig(run_dir=os.path.join(args.out, "base"), log_every=max(1, args.base_steps // 10),
                              progress=False),
        checkpoint=CheckpointConfig(every=args.base_steps, resume=True),
    )


def finetune(model, cfg: Config, *, scaling: dict, steps: int, lr: float, pose_target: int = 0,
             lora: Optional[LoRAConfig] = None, device: str = "cpu") -> dict:
    """Fine-tune a copy of ``model`` at ``cfg.train.seq_len`` with ``scaling`` (+ PoSE, + LongLoRA);
    returns ``{"model": merged model, "loss": last loss, "seconds": wall time}``."""
    from seqpar.data import build_data
    from seqpar.data.pose import apply_pose
    from seqpar.models.lora import apply_lora, merge_lora
    from seqpar.ops.s2attn import make_s2_attn_fn

    model = copy.deepcopy(model).to(device).train()
    model.set_rope_scaling(scaling, seq_len=pose_target or cfg.train.seq_len)
    params = apply_lora(model, lora) if lora is not None else list(model.parameters())
    if lora is not None and lora.s2_attn:
        model.set_attn_fn(make_s2_attn_fn(int(lora.s2_group_ratio * cfg.train.seq_len)))
    train, _, _ = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.train.seed + 1)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    start, loss = time.time(), float("nan")
    for step in range(steps):
        batch = apply_pose(next(train), target_len=pose_target, num_chunks=2, seed=cfg.train.seed, step=step)
        tokens, labels, positions = (batch[k].to(device) for k in ("tokens", "labels", "positions"))
        with autocast:
            loss_sum, n = model.loss(model(tokens, positions), labels)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = (loss_sum / n).item()
    merge_lora(model)
    model.set_attn_fn(None)  # evaluation runs full attention, as LongLoRA does at inference
    return {"model": model.eval(), "loss": loss, "seconds": time.time() - start}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from seqpar.cli import config_yaml
    from seqpar.eval.common import eval_text_stream, load_model, write_results
    from seqpar.eval.passkey import evaluate_passkey, plot_passkey
    from seqpar.eval.perplexity import evaluate_perplexity, plot_perplexity
    from seqpar.train import run

    p = argparse.ArgumentParser(prog="python -m seqpar.eval.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--ppl-tokens", type=int, default=65536)
    p.add_argument("--passkey-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--task", choices=["lm", "passkey"], default="lm",
                   help="lm: embedded corpus only; passkey: also synthetic passkey documents within L")
    args = p.parse_args(argv)
    L, factor = args.train_len, 4
    data = DataConfig(max_bytes=args.max_bytes)
    if args.task == "passkey":
        os.makedirs(args.out, exist_ok=True)
        corpus = os.path.join(args.out, "passkey_corpus.jsonl")
        write_passkey_corpus(corpus, L, n_docs=20000, code_bytes=args.max_bytes or 4_000_000, seed=args.seed)
        data = DataConfig(source="jsonl", paths=[corpus])
    cfg = _base_config(args, data)
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
        f.write(config_yaml(cfg))  # what load_model reads back
    t0 = time.time()
    history = run(cfg)["history"]
    base_seconds = time.time() - t0
    loaded = load_model(cfg.logging.run_dir, device=args.device)
    base = loaded.model

    yarn = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": L}
    zero_shot = {f"base/{t}": (None if t == "none" else {"rope_type": t, "factor": float(factor),
                                                         "original_max_position_embeddings": L})
                 for t in ("none", "linear", "ntk", "dynamic", "yarn")}
    variants = {name: (base, s) for name, s in zero_shot.items()}
    ft_cfg = copy.deepcopy(cfg)
    runs = {"ft/yarn": dict(), "ft/yarn+pose": dict(pose_target=factor * L),
            "ft/longlora+yarn+pose": dict(pose_target=factor * L, lora=LoRAConfig(rank=8, alpha=16, s2_attn=True))}
    ft_info = {}
    for name, kw in runs.items():
        res = finetune(base, ft_cfg, scaling=yarn, steps=args.ft_steps, lr=args.ft_lr, device=args.device, **kw)
        variants[name] = (res["model"], yarn)
        ft_info[name] = {"final_train_loss": res["loss"], "seconds": res["seconds"]}
        print(f"{name}: {args.ft_steps} steps, final train loss {res['loss']:.3f}, {res['seconds']:.0f}s", flush=True)

    lengths = [L, 2 * L, factor * L]
    ids = eval_text_stream(loaded, None, args.ppl_tokens)
    ppl_rows, pk_rows = [], []
    for name, (model, scaling) in variants.items():
        model.to(args.device)
        ppl_rows += evaluate_perplexity(model, ids, {name: scaling}, lengths, stride=L // 2, device=args.device,
                                        ignore_id=loaded.tokenizer.bos_id)
        pk_rows += evaluate_passkey(model, loaded.tokenizer, {name: scaling}, lengths, [0.0, 0.25, 0.5, 0.75, 1.0],
                                    args.passkey_samples, seed=args.seed, device=args.device)
    meta = {"train_len": L, "factor": factor, "base_steps": args.base_steps, "ft_steps": args.ft_steps,
            "base_final_loss": history[-1]["loss"] if history else None, "base_seconds": base_seconds,
            "finetunes": ft_info, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    print(write_results(args.out, "perplexity", ppl_rows, ["scaling", "length", "ppl", "nll", "tokens"], meta))
    plot_perplexity(ppl_rows, os.path.join(args.out, "perplexity.png"), L)
    summary = [{"scaling": n, "length": length, "depth": "mean",
                "accuracy": sum(r["accuracy"] for r in pk_rows if r["scaling"] == n and r["length"] == length) / 5,
                "digit_accuracy": sum(r["digit_accuracy"] for r in pk_rows
                                      if r["scaling"] == n and r["length"] == length) / 5,
                "n": 5 * args.passkey_samples} for n in variants for length in lengths]
    print(write_results(args.out, "passkey", summary + pk_rows,
                        ["scaling", "length", "depth", "accuracy", "digit_accuracy", "n"], meta))
    plot_passkey(pk_rows, os.path.join(args.out, "passkey.png"), L)
    return 0


if __name__ == "__main__":
    sys.exit(main())
