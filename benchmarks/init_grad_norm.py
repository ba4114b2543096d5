"""Why the llama presets start training with a grad norm in the hundreds: the gradient norm of one forward + backward
at initialisation, for seqpar's init and torchtitan's (tied and untied), on byte-tokenizer text and on tokens drawn
uniformly over the vocabulary. CPU is enough (one step, no optimizer):

    .venv/bin/python benchmarks/init_grad_norm.py [--model llama3-1b] [--seq-len 512] [--out benchmarks/results/...]

Inits compared (everything else the preset's):
* ``seqpar``: ``Llama.init_weights``: normal(0, 0.02) for the embedding (tied: also the LM head) and every linear,
  the residual-branch outputs ``wo``, ``w2`` at ``0.02 / sqrt(2 * n_layers)``;
* ``torchtitan-tied``: torchtitan 0.3.0's llama3 init (``torchtitan/models/llama3/__init__.py`` in the offline
  bundle): truncated normal 0.02 for ``wq, wk, wv, w1``, ``0.02 / sqrt(2 * (layer + 1))`` for ``wo, w2, w3``, the
  tied head/embedding at ``dim ** -0.5``;
* ``torchtitan-untied``: the same with its untied embedding, normal(0, 1), and the head at ``dim ** -0.5``.
Prints a table last (total norm, the largest parameter groups); writes ``init_grad_norm_<model>.json/.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402


def _titan(model, dim: int, untied: bool) -> None:
    trunc = lambda w, s: nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)
    for i, layer in enumerate(model.layers):
        a, f = layer.attention, layer.feed_forward
        for lin in (a.wq, a.wk, a.wv, f.w1):
            nn.init.trunc_normal_(lin.weight, std=0.02)
        for lin in (a.wo, f.w2, f.w3):
            nn.init.trunc_normal_(lin.weight, std=0.02 / math.sqrt(2 * (i + 1)))
    if untied:
        nn.init.normal_(model.tok_embeddings.weight, std=1.0)
        trunc(model.output.weight, dim ** -0.5)
    else:
        trunc(model.tok_embeddings.weight, dim ** -0.5)


INITS = {"seqpar": (True, lambda m, dim: m.init_weights()),
         "torchtitan-tied": (True, lambda m, dim: _titan(m, dim, False)),
         "torchtitan-untied": (False, lambda m, dim: _titan(m, dim, True))}


def grad_norms(model_name: str, init: str, tokens: torch.Tensor, overrides=()) -> dict:
    """One forward + backward at init: total grad norm, per parameter kind (``wo``, ``w2``, ...), and the loss;
    ``overrides``: extra ``model.*`` settings."""
    from seqpar.cli import load_config
    from seqpar.models.llama import Llama

    tied, fn = INITS[init]
    cfg = load_config([f"model={model_name}", f"model.tie_embeddings={str(tied).lower()}", *overrides]).model
    torch.manual_seed(0)
    model = Llama(cfg)
    fn(model, cfg.dim)
    s = tokens.shape[1] - 1
    loss_sum, n = model.loss(model(tokens[:, :-1], torch.arange(s)[None]), tokens[:, 1:])
    (loss_sum / n).backward()
    kinds = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            kind = name.split(".")[-2] if name.startswith("layers.") else name.rsplit(".", 1)[0]
            kinds[kind] = kinds.get(kind, 0.0) + float(p.grad.float().norm()) ** 2
    kinds = {k: math.sqrt(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    return {"loss": float(loss_sum.detach() / n), "total": math.sqrt(sum(v * v for v in kinds.values())), "kinds": kinds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-1b")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  time.strftime("init_grad_norm_%Y-%m-%dT%H%M")))
    args = ap.parse_args(argv)
    from seqpar.cli import load_config

    vocab = load_config([f"model={args.model}"]).model.vocab_size
    text = open(os.path.join(os.path.dirname(os.__file__), "argparse.py"), "rb").read()[:args.seq_len + 1]
    data = {"byte text (256 ids used)": torch.tensor(list(text), dtype=torch.long)[None],
            "uniform over the vocabulary": torch.randint(0, vocab, (1, args.seq_len + 1),
                                                         generator=torch.Generator().manual_seed(0))}
    rows = []
    for init in INITS:
        for data_name, tokens in data.items():
            r = grad_norms(args.model, init, tokens)
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["kinds"].items())[:3])
            rows.append({"init": init, "data": data_name, "loss": r["loss"], "grad_norm": r["total"], "largest": top,
                         "kinds": r["kinds"]})
            print(f"{init} | {data_name}: grad norm {r['total']:.1f} ({top})", flush=True)
    meta = report.environment()
    meta.update(model=args.model, seq_len=args.seq_len)
    cols = [("init", "init", ""), ("data", "data", ""), ("loss at init", "loss", ".2f"),
            ("grad norm", "grad_norm", ".1f"), ("largest parameter kinds (norm)", "largest", "")]
    md = "\n".join([f"# Gradient norm at initialisation: {args.model}, {args.seq_len} tokens, one forward + backward",
                    "", report.meta_line(meta), "", report.markdown_table(rows, cols), ""])
    report.write_outputs(args.out, f"init_grad_norm_{args.model}", meta, {"rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
