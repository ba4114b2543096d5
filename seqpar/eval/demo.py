"""End-to-end context-extension demo on a tiny model: train at length L, then extend to 4L.

1. ``base``: the tiny Llama trained at L by ``seqpar.train.run`` (byte tokenizer, embedded corpus).
2. zero-shot scalings of ``base`` at evaluation time: linear, ntk, dynamic, yarn (factor 4).
3. short fine-tunes of ``base`` at length L with YaRN x4: without PoSE, with PoSE (positions up to 4L),
   and LongLoRA (LoRA r8 on q/k/v/o + trainable embeddings/norms + S2-Attn) with PoSE.
4. perplexity vs context (L, 2L, 4L) and passkey retrieval for every variant: tables + PNGs in ``--out``.

    python -m seqpar.eval.demo --out results/ctx_demo --device cuda --train-len 256

Every fine-tune is a real :class:`seqpar.train.Trainer` run (``<out>/ft/<name>``: config.yaml, metrics)
started from the base weights, so the demo measures what ``train.py`` with the same recipe trains.
Numbers from one seed on a sub-million-parameter model: read trends, not decimals.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import torch

from seqpar.config import (CheckpointConfig, Config, DataConfig, LoggingConfig, LoRAConfig, ModelConfig,
                           OptimConfig, TrainConfig)
from seqpar.models.llama import Llama


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


def finetune_config(base: Config, model: ModelConfig, run_dir: str, *, scaling: dict, steps: int, lr: float,
                    pose_target: int = 0, lora: Optional[LoRAConfig] = None) -> Config:
    """The run that fine-tunes the ``base`` run's model (``model``: its resolved shape) at
    ``base.train.seq_len`` with RoPE ``scaling``, PoSE positions up to ``pose_target`` (0: off) and LoRA.

    AdamW without weight decay, 20 warmup steps then a constant rate: a short fine-tune, not a schedule.
    Data in another order than the base run saw (seed + 1); no checkpoints (the model is returned).
    """
    return dataclasses.replace(
        base,
        model=dataclasses.replace(model, rope_scaling=scaling),
        data=dataclasses.replace(base.data, pose_target_len=pose_target, pose_chunks=2),
        optim=OptimConfig(lr=lr, weight_decay=0.0, beta2=0.999, warmup_steps=20, min_lr_ratio=1.0),
        train=dataclasses.replace(base.train, steps=steps, seed=base.train.seed + 1, eval_every=0),
        lora=lora if lora is not None else LoRAConfig(),
        logging=dataclasses.replace(base.logging, run_dir=run_dir, log_every=max(1, steps // 10)),
        checkpoint=CheckpointConfig(every=0, resume=False),
    )


def finetune(model: Llama, cfg: Config) -> dict:
    """Train ``cfg`` (one process) starting from ``model``'s weights, which stay untouched.

    Returns ``{"model": the fine-tuned model, LoRA merged, full attention, eval mode; "loss": final train
    loss; "seconds": wall time}``. Evaluation runs full attention, as LongLoRA does at inference.
    """
    from seqpar.models.lora import merge_lora
    from seqpar.parallel.mesh import destroy_mesh, init_mesh
    from seqpar.train import Trainer

    start = time.time()
    mesh = init_mesh(cfg.parallel, cfg.train.device)
    try:
        trainer = Trainer(cfg, mesh, init_state=model.state_dict())
        history = trainer.fit()["history"]
    finally:
        destroy_mesh()
    tuned = trainer.model
    merge_lora(tuned)
    tuned.set_attn_fn(None)
    return {"model": tuned.eval(), "loss": history[-1]["loss"], "seconds": time.time() - start}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from seqpar.eval import passkey, perplexity
    from seqpar.eval.common import eval_text_stream, load_model, write_results
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
    cfg = _base_config(args, data)  # the trainer writes <run_dir>/config.yaml, which load_model reads back
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
    runs = {"ft/yarn": dict(), "ft/yarn+pose": dict(pose_target=factor * L),
            "ft/longlora+yarn+pose": dict(pose_target=factor * L, lora=LoRAConfig(rank=8, alpha=16, s2_attn=True))}
    ft_info = {}
    for name, kw in runs.items():
        ft_cfg = finetune_config(cfg, base.cfg, os.path.join(args.out, name), scaling=yarn, steps=args.ft_steps,
                                 lr=args.ft_lr, **kw)
        res = finetune(base, ft_cfg)
        variants[name] = (res["model"], yarn)
        ft_info[name] = {"final_train_loss": res["loss"], "seconds": res["seconds"]}
        print(f"{name}: {args.ft_steps} steps, final train loss {res['loss']:.3f}, {res['seconds']:.0f}s", flush=True)

    lengths = [L, 2 * L, factor * L]
    ids = eval_text_stream(loaded, None, args.ppl_tokens)
    ppl_rows, pk_rows = [], []
    for name, (model, scaling) in variants.items():
        model.to(args.device)
        ppl_rows += perplexity.evaluate_perplexity(model, ids, {name: scaling}, lengths, stride=L // 2,
                                                   device=args.device, ignore_id=loaded.tokenizer.bos_id)
        pk_rows += passkey.evaluate_passkey(model, loaded.tokenizer, {name: scaling}, lengths,
                                            [0.0, 0.25, 0.5, 0.75, 1.0], args.passkey_samples, seed=args.seed,
                                            device=args.device)
    meta = {"train_len": L, "factor": factor, "base_steps": args.base_steps, "ft_steps": args.ft_steps,
            "base_final_loss": history[-1]["loss"] if history else None, "base_seconds": base_seconds,
            "finetunes": ft_info, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    print(write_results(args.out, "perplexity", ppl_rows, perplexity.COLUMNS, meta))
    perplexity.plot_perplexity(ppl_rows, os.path.join(args.out, "perplexity.png"), L)
    print(write_results(args.out, "passkey", passkey.passkey_summary(pk_rows) + pk_rows, passkey.COLUMNS, meta))
    passkey.plot_passkey(pk_rows, os.path.join(args.out, "passkey.png"), L)
    return 0


if __name__ == "__main__":
    sys.exit(main())
