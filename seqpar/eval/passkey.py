"""Synthetic passkey retrieval (Mohtashami & Jaggi 2023): accuracy by context length and needle depth.

A prompt of exactly ``length`` tokens hides ``The pass key is 71432. Remember it. ...`` at relative
depth ``d`` (0: right after the instructions, 1: just before the question) inside repeated filler
and ends with ``What is the pass key? The pass key is 71432``. A sample counts as retrieved when
the model's argmax predicts every token of the key under teacher forcing, which is exactly when
greedy decoding would produce the key, at the cost of one forward pass. ``digit_accuracy`` is
the softer per-token rate. Everything is generated locally (offline) and seeded.

    python -m seqpar.eval.passkey --checkpoint RUN_OR_HF_DIR --out results/passkey \\
        --lengths 256,512,1024 --scaling none --scaling yarn:4 [overrides ...]
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from seqpar.eval.common import add_common_args, length_axis, load_from_args, pyplot, run_cli, write_results

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is "


def passkey_min_length(tokenizer, digits: int = 5) -> int:
    """Tokens of a prompt with no filler at all: the shortest ``length`` :func:`passkey_prompt` takes."""
    key = "7" * digits
    return sum(len(tokenizer.encode(s)) for s in (PREFIX, NEEDLE.format(key=key), QUESTION, key))


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[np.ndarray, int]:
    """Token ids ``[length]`` of one prompt with its answer, and the index where the answer starts.

    The needle goes at the filler line boundary nearest to ``depth * filler_length`` so no sentence
    is cut. Raises ValueError when ``length`` cannot hold instructions, needle, question and answer.
    """
    enc = lambda s: np.asarray(tokenizer.encode(s), dtype=np.int64)
    prefix, needle, question, answer, line = (enc(PREFIX), enc(NEEDLE.format(key=key)), enc(QUESTION),
                                              enc(key), enc(FILLER))
    n_fill = length - len(prefix) - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"passkey length {length} is too short: the prompt needs {length - n_fill} tokens.")
    fill = np.tile(line, n_fill // len(line) + 1)[:n_fill]
    cut = min(round(depth * n_fill / len(line)) * len(line), n_fill)
    ids = np.concatenate([prefix, fill[:cut], needle, fill[cut:], question, answer])
    return ids, length - len(answer)


@torch.no_grad()
def _score(model, prompts: list[np.ndarray], answer_start: int, device) -> tuple[float, float]:
    """``(exact-match rate, per-token accuracy)`` of a batch of equal-length prompts."""
    tokens = torch.as_tensor(np.stack(prompts), device=device)  # [B, L]
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    hidden = model(tokens, positions)  # [B, L, dim]
    # Position i predicts token i+1: the answer tokens [a, L) are predicted from [a-1, L-1).
    pred = model.logits(hidden[:, answer_start - 1:-1]).argmax(-1)  # [B, n_answer]
    hit = pred == tokens[:, answer_start:]
    return hit.all(-1).float().mean().item(), hit.float().mean().item()


def evaluate_passkey(model, tokenizer, scalings: dict, lengths: Sequence[int], depths: Sequence[float],
                     samples: int, digits: int = 5, seed: int = 0, device="cpu") -> list[dict]:
    """Rows ``{scaling, length, depth, accuracy, digit_accuracy, n}`` for every variant x length x depth.

    ``scalings``: name -> rope_scaling dict (or None). The keys drawn depend only on ``seed``, length
    and depth, so every variant answers the same questions.
    """
    rows = []
    for name, scaling in scalings.items():
        for length in lengths:
            model.set_rope_scaling(scaling, seq_len=length)  # dynamic NTK depends on the length
            for depth in depths:
                rng = np.random.default_rng((seed, length, int(round(depth * 1000))))
                keys = [str(k) for k in rng.integers(10 ** (digits - 1), 10 ** digits, size=samples)]
                built = [passkey_prompt(tokenizer, length, depth, k) for k in keys]
                acc, digit_acc = _score(model, [p for p, _ in built], built[0][1], device)
                rows.append({"scaling": name, "length": length, "depth": depth, "accuracy": acc,
                             "digit_accuracy": digit_acc, "n": samples})
    return rows


COLUMNS = ["scaling", "length", "depth", "accuracy", "digit_accuracy", "n"]


def passkey_summary(rows: list[dict]) -> list[dict]:
    """One row per (variant, length) with ``depth="mean"``: accuracies averaged over the depths and
    ``n`` summed; a table puts these first, they are the numbers a reader wants."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["scaling"], r["length"]), []).append(r)
    return [{"scaling": name, "length": length, "depth": "mean",
             "accuracy": float(np.mean([r["accuracy"] for r in cell])),
             "digit_accuracy": float(np.mean([r["digit_accuracy"] for r in cell])),
             "n": sum(r["n"] for r in cell)} for (name, length), cell in cells.items()]


def plot_passkey(rows: list[dict], path: str, train_len: Optional[int] = None) -> None:
    """Top row: exact-match and per-digit accuracy vs length (mean over depths), one line per variant;
    below: a length x depth heatmap of exact-match accuracy per variant, four to a row."""
    plt = pyplot()
    names = list(dict.fromkeys(r["scaling"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    ncols = 4
    nrows = 1 + math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, metric in zip(axes[0, :2], ("accuracy", "digit_accuracy")):
        for name in names:
            ax.plot(lengths, [np.mean([r[metric] for r in rows if r["scaling"] == name and r["length"] == n])
                              for n in lengths], marker="o", label=name)
        length_axis(ax, lengths, train_len)
        ax.set(ylabel=metric.replace("_", " "), ylim=(-0.05, 1.05), title=f"passkey {metric.replace('_', ' ')}")
    axes[0, 0].legend(fontsize=7)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for i, ax in enumerate(axes[1:].flat):
        if i >= len(names):
            ax.axis("off")
            continue
        grid = np.array([[next(r["accuracy"] for r in rows if r["scaling"] == names[i] and r["length"] == n
                               and r["depth"] == d) for n in lengths] for d in depths])  # [depth, length]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(xlabel="length", ylabel="needle depth", title=f"{names[i]}: exact match")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar.eval.passkey", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=10, help="prompts per (length, depth) cell")
    parser.add_argument("--digits", type=int, default=5)
    args = parser.parse_args(argv)
    loaded, train_len, lengths, scalings = load_from_args(args)
    depths = [float(d) for d in args.depths.split(",")]
    rows = evaluate_passkey(loaded.model, loaded.tokenizer, scalings, lengths, depths, args.samples,
                            args.digits, args.seed, args.device)
    meta = {"checkpoint": loaded.source, "train_len": train_len, "scalings": scalings, "samples": args.samples,
            "digits": args.digits, "seed": args.seed}
    table = write_results(args.out, "passkey", passkey_summary(rows) + rows, COLUMNS, meta)
    plot_passkey(rows, f"{args.out}/passkey.png", train_len)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
