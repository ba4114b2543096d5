"""Perplexity vs context length with a sliding window, on held-out text.

For each context length ``C`` the text is read in windows of ``C`` tokens that advance by ``stride``;
each window scores only its last ``stride`` targets, so every scored token had between
``C - stride + 1`` and ``C`` tokens of context. The scored targets are the SAME for every length
(they start after the longest context), so the curve compares contexts, not text: a model that uses
long context gets lower perplexity as ``C`` grows, and one whose positions break past its training
length gets higher.

    python -m seqpar.eval.perplexity --checkpoint RUN_OR_HF_DIR --out results/ppl \\
        --lengths 256,512,1024 --scaling none --scaling yarn:4 [--text FILE] [overrides ...]
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from seqpar.data.packing import IGNORE_INDEX
from seqpar.eval.common import (add_common_args, eval_text_stream, length_axis, load_from_args, pyplot, run_cli,
                                write_results)

COLUMNS = ["scaling", "length", "ppl", "nll", "tokens"]


def _windows(ids: np.ndarray, context: int, stride: int, first_target: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[W, C]`` and labels ``[W, C]`` (-100 except each window's last ``stride`` targets)."""
    starts = []
    a = first_target  # first target index scored by the next window
    while a + stride <= len(ids):
        starts.append(a - 1 - (context - stride))  # window ids[s : s + C + 1] has its last targets at [a, a+stride)
        a += stride
    if not starts:
        raise ValueError(f"text of {len(ids)} tokens is too short for context {context} with the first scored target at "
                         f"{first_target}; give more text (--max-tokens, --text) or shorter --lengths.")
    idx = np.asarray(starts)[:, None] + np.arange(context + 1)  # [W, C+1]
    window = ids[idx]
    labels = window[:, 1:].copy()
    labels[:, : context - stride] = IGNORE_INDEX
    return window[:, :-1], labels


@torch.no_grad()
def sliding_window_nll(model, ids: np.ndarray, context: int, stride: int, first_target: int,
                       batch_size: int = 8, device="cpu", ignore_id: Optional[int] = None) -> tuple[float, int]:
    """``(sum of target NLL in nats, number of targets)`` over the text ``ids [N]`` at ``context``.

    ``ignore_id``: a token never scored as a target (the BOS that opens a packed document: nothing
    predicts which document comes next, as in training).
    """
    inputs, labels = _windows(ids, context, stride, first_target)
    if ignore_id is not None:
        labels[labels == ignore_id] = IGNORE_INDEX
    total, count = 0.0, 0
    for b in range(0, len(inputs), batch_size):
        tokens = torch.as_tensor(inputs[b:b + batch_size], device=device)  # [b, C]
        target = torch.as_tensor(labels[b:b + batch_size], device=device)
        positions = torch.arange(context, device=device).expand_as(tokens)
        loss_sum, n = model.loss(model(tokens, positions), target)
        total += float(loss_sum)
        count += int(n)
    return total, count


def evaluate_perplexity(model, ids: np.ndarray, scalings: dict, lengths: Sequence[int], stride: int,
                        batch_size: int = 8, device="cpu", ignore_id: Optional[int] = None) -> list[dict]:
    """Rows ``{scaling, length, ppl, nll, tokens}`` for every variant x length, same targets throughout."""
    if stride > min(lengths):
        raise ValueError(f"stride={stride} must be <= the shortest length {min(lengths)}.")
    first_target = max(lengths) - stride + 1  # the longest context needs this much text before its targets
    rows = []
    for name, scaling in scalings.items():
        for length in lengths:
            model.set_rope_scaling(scaling, seq_len=length)
            total, count = sliding_window_nll(model, ids, length, stride, first_target, batch_size, device, ignore_id)
            nll = total / max(count, 1)
            rows.append({"scaling": name, "length": length, "ppl": math.exp(min(nll, 50.0)), "nll": nll,
                         "tokens": count})
    return rows


def plot_perplexity(rows: list[dict], path: str, train_len: Optional[int] = None) -> None:
    """Perplexity vs context length, one line per RoPE variant."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lengths = sorted({r["length"] for r in rows})
    for name in dict.fromkeys(r["scaling"] for r in rows):
        ax.plot(lengths, [next(r["ppl"] for r in rows if r["scaling"] == name and r["length"] == n) for n in lengths],
                marker="o", label=name)
    length_axis(ax, lengths, train_len)
    ax.set(yscale="log", ylabel="perplexity", title="perplexity vs context length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar.eval.perplexity", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--stride", type=int, default=None, help="window step and scored targets per window "
                                                                 "(default: half the shortest length)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens to read")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the run's val split)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    loaded, train_len, lengths, scalings = load_from_args(args)
    stride = args.stride or max(1, min(lengths) // 2)
    ids = eval_text_stream(loaded, args.text, args.max_tokens)
    rows = evaluate_perplexity(loaded.model, ids, scalings, lengths, stride, args.batch_size, args.device,
                               loaded.tokenizer.bos_id)
    meta = {"checkpoint": loaded.source, "train_len": train_len, "scalings": scalings, "stride": stride,
            "text": args.text or "val split", "text_tokens": int(len(ids))}
    table = write_results(args.out, "perplexity", rows, COLUMNS, meta)
    plot_perplexity(rows, f"{args.out}/perplexity.png", train_len)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
