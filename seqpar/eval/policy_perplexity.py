"""Perplexity of a long held-out stream under cache policies, overall and by position (StreamingLLM's comparison:
a window without sinks vs with sinks vs the full cache; H2O vs a recent-only cache; LM-Infinite / DCA past the
training length).

    python -m seqpar.eval.policy_perplexity --checkpoint RUN_OR_HF_DIR --out results/stream --lengths 16384 \\
        --policy full --policy streaming:sinks=0,window=1024 --policy streaming:sinks=4,window=1020 [overrides ...]

Without ``--prefill`` each policy scores the stream in one forward under its rule (fused kernels where the
policy has a dense form); with ``--prefill P`` the first P tokens are prefilled and the rest decoded one at a
time through the evicting cache (required for ``h2o``, whose budgets are fractions of P).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from seqpar.config import ConfigError
from seqpar.eval.common import add_common_args, eval_text_stream, length_axis, load_from_args, pyplot, run_cli, \
    write_results
from seqpar.eval.ruler import parse_policy
from seqpar.inference import token_nll

COLUMNS = ["policy", "length", "ppl", "tokens"]


def policy_perplexity(model, ids: torch.Tensor, policies: dict, prefill: Optional[int] = None,
                      buckets: int = 16) -> tuple[list[dict], dict]:
    """Rows ``{policy, length, ppl, tokens}`` for the stream ``ids [S]`` and ``{policy: [(start, end, ppl)]}``:
    perplexity over ``buckets`` equal position ranges of the predicted tokens ``1..S-1``."""
    rows, curves = [], {}
    S = ids.shape[0]
    edges = np.linspace(1, S, buckets + 1).astype(int)
    for label, (name, options) in policies.items():
        nll = token_nll(model, ids[None], policy=name, prefill=prefill, **options)[0].cpu().numpy()  # [S-1]
        rows.append({"policy": label, "length": S, "ppl": float(math.exp(nll.mean())), "tokens": S - 1})
        curves[label] = [(int(a), int(b), float(math.exp(nll[a - 1:b - 1].mean())))
                         for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return rows, curves


def plot_policy_perplexity(rows: list[dict], curves: dict, path: str, train_len: Optional[int] = None) -> None:
    """Left: perplexity vs stream length per policy; right: perplexity by position on the longest stream."""
    plt = pyplot()
    fig, (ax_len, ax_pos) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(dict.fromkeys(r["policy"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    for label in labels:
        ax_len.plot(lengths, [next(r["ppl"] for r in rows if r["policy"] == label and r["length"] == n)
                              for n in lengths], marker="o", label=label)
        pts = curves[max(lengths)][label]
        ax_pos.plot([(a + b) / 2 for a, b, _ in pts], [p for _, _, p in pts], marker=".", label=label)
    length_axis(ax_len, lengths, train_len)
    ax_len.set(yscale="log", ylabel="perplexity", title="perplexity vs stream length")
    if train_len:
        ax_pos.axvline(train_len, color="gray", ls="--", lw=1, label="train length")
    ax_pos.set(yscale="log", xlabel="token position", ylabel="perplexity", title=f"by position ({max(lengths)} tokens)")
    ax_len.legend(fontsize=7)
    ax_pos.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar.eval.policy_perplexity", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--policy", action="append", default=None,
                        help="cache policy, repeatable: name[:key=value,...] (default: full)")
    parser.add_argument("--prefill", type=int, default=None, help="prefill P tokens, then decode (needed for h2o)")
    parser.add_argument("--text", default=None, help="a text file to score (default: the held-out corpus split)")
    parser.add_argument("--buckets", type=int, default=16, help="position ranges of the by-position curve")
    args = parser.parse_args(argv)
    loaded, train_len, lengths, scalings = load_from_args(args)
    if len(scalings) > 1:
        raise ConfigError("--scaling: one RoPE variant per run; compare variants with one run each.")
    loaded.model.set_rope_scaling(next(iter(scalings.values())))
    policies = {spec: parse_policy(spec) for spec in args.policy or ["full"]}
    rows, curves = [], {}
    for length in lengths:
        ids = torch.as_tensor(eval_text_stream(loaded, args.text, length), device=args.device)
        if ids.shape[0] < length:
            raise ConfigError(f"--lengths {length}: the text holds only {ids.shape[0]} tokens; pass a longer --text.")
        try:
            r, c = policy_perplexity(loaded.model, ids, policies, args.prefill, args.buckets)
        except ValueError as e:  # a policy option or prefill the user has to fix
            raise ConfigError(str(e)) from e
        rows += r
        curves[length] = c
    meta = {"checkpoint": loaded.source, "train_len": train_len, "scalings": scalings, "prefill": args.prefill,
            "text": args.text, "by_position": {str(k): v for k, v in curves.items()}}
    table = write_results(args.out, "policy_perplexity", rows, COLUMNS, meta)
    plot_policy_perplexity(rows, curves, f"{args.out}/policy_perplexity.png", train_len)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
