"""RULER-style synthetic evaluation with cached generation under a cache policy: score per task and length,
and the effective length (tasks and metric in :mod:`seqpar.eval.ruler_tasks`).

    python -m seqpar.eval.ruler --checkpoint RUN_OR_HF_DIR --out results/ruler --lengths 1024,2048,4096 \\
        --tasks all --samples 20 --policy full --policy streaming:sinks=4,window=1020 [overrides ...]

Each (policy, task, length) cell generates ``--samples`` prompts (seeded, identical for every policy),
decodes greedily with :func:`seqpar.inference.generate` (prompts left-padded to one batch) and scores
RULER's ``string_match_all``. The summary rows (``task="mean"``) average the tasks; a policy's effective
length is the longest length whose mean, and every shorter one's, reaches ``--threshold``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from seqpar.config import ConfigError
from seqpar.eval.common import add_common_args, length_axis, load_from_args, pyplot, run_cli, write_results
from seqpar.eval.ruler_tasks import TASKS, effective_length, make_item, string_match_all
from seqpar.inference import generate

COLUMNS = ["policy", "task", "length", "score", "n"]


def parse_policy(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (ints, else floats) -> ``(name, options)``; ConfigError if malformed."""
    name, _, rest = spec.partition(":")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"--policy {spec!r}: options are key=value pairs, e.g. streaming:sinks=4,window=1020.")
        try:
            options[key] = int(value)
        except ValueError:
            try:
                options[key] = float(value)
            except ValueError as e:
                raise ConfigError(f"--policy {spec!r}: {key}={value!r} is not a number.") from e
    return name, options


@torch.no_grad()
def run_cell(model, tokenizer, task: str, length: int, samples: int, policy: str, options: dict, seed: int = 0,
             device="cpu", haystack: Optional[Sequence[str]] = None) -> tuple[float, list]:
    """Mean ``string_match_all`` of ``samples`` prompts of one task and length, and the predictions."""
    rng = np.random.default_rng((seed, TASKS.index(task), length))
    items = [make_item(task, tokenizer, length, rng, haystack) for _ in range(samples)]
    S = max(len(it.ids) for it in items)
    pad = getattr(tokenizer, "pad_id", None) or 0
    ids = torch.full((samples, S), pad, dtype=torch.long)
    mask = torch.zeros(samples, S, dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, S - len(it.ids):], mask[b, S - len(it.ids):] = torch.as_tensor(it.ids), 1
    new = max(it.max_new for it in items)
    out = generate(model, ids.to(device), new, policy=policy, attention_mask=mask.to(device), **options)[:, S:].cpu()
    eos = getattr(tokenizer, "eos_id", None)
    preds = []
    for row in out.tolist():
        preds.append(tokenizer.decode(row[:row.index(eos)] if eos in row else row))
    return float(np.mean([string_match_all(p, it.answers) for p, it in zip(preds, items)])), preds


def evaluate_ruler(model, tokenizer, policies: dict, tasks: Sequence[str], lengths: Sequence[int], samples: int,
                   seed: int = 0, device="cpu", haystack: Optional[Sequence[str]] = None) -> list[dict]:
    """Rows ``{policy, task, length, score, n}`` for every policy x task x length, then one ``task="mean"``
    row per (policy, length). ``policies``: label -> (name, options)."""
    rows = []
    for label, (name, options) in policies.items():
        for length in lengths:
            cell = []
            for task in tasks:
                score, _ = run_cell(model, tokenizer, task, length, samples, name, options, seed, device, haystack)
                cell.append({"policy": label, "task": task, "length": length, "score": score, "n": samples})
            rows += cell
            rows.append({"policy": label, "task": "mean", "length": length,
                         "score": float(np.mean([r["score"] for r in cell])), "n": samples * len(cell)})
    return rows


def effective_lengths(rows: list[dict], threshold: float) -> dict:
    """``{policy: effective length or None}`` from the ``task="mean"`` rows."""
    out = {}
    for label in dict.fromkeys(r["policy"] for r in rows):
        means = {r["length"]: r["score"] for r in rows if r["policy"] == label and r["task"] == "mean"}
        out[label] = effective_length(means, threshold)
    return out


def plot_ruler(rows: list[dict], path: str, threshold: float, train_len: Optional[int] = None) -> None:
    """One panel per task and one for the mean: score vs length, a line per policy."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(r["policy"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    ncols = 4
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for label in labels:
            ax.plot(lengths, [next(r["score"] for r in rows if r["policy"] == label and r["task"] == task
                                   and r["length"] == n) for n in lengths], marker="o", label=label)
        if task == "mean":
            ax.axhline(threshold, color="red", ls=":", lw=1, label="threshold")
        length_axis(ax, lengths, train_len)
        ax.set(ylim=(-0.05, 1.05), ylabel="score", title=task)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar.eval.ruler", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--tasks", default="all", help=f"comma-separated subset of {','.join(TASKS)} (or all)")
    parser.add_argument("--samples", type=int, default=10, help="prompts per (policy, task, length) cell")
    parser.add_argument("--policy", action="append", default=None,
                        help="cache policy, repeatable: name[:key=value,...] (default: full)")
    parser.add_argument("--threshold", type=float, default=0.856,
                        help="effective-length threshold (RULER: Llama-2-7B's 4k mean, 85.6%%)")
    parser.add_argument("--haystack", choices=("noise", "corpus"), default="noise",
                        help="filler: RULER's noise sentence, or lines of the held-out corpus")
    args = parser.parse_args(argv)
    tasks = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown {unknown}; choose from {list(TASKS)}.")
    loaded, train_len, lengths, scalings = load_from_args(args)
    if len(scalings) > 1:
        raise ConfigError("--scaling: ruler takes one RoPE variant per run; compare variants with one run each.")
    loaded.model.set_rope_scaling(next(iter(scalings.values())))
    policies = {spec: parse_policy(spec) for spec in args.policy or ["full"]}
    haystack = None
    if args.haystack == "corpus":
        from seqpar.eval.common import eval_text_stream

        text = loaded.tokenizer.decode(eval_text_stream(loaded, None, 200_000).tolist())
        haystack = [line + "\n" for line in text.splitlines() if line.strip()][:5000]
    try:
        rows = evaluate_ruler(loaded.model, loaded.tokenizer, policies, tasks, lengths, args.samples, args.seed,
                              args.device, haystack)
    except ValueError as e:  # a policy option or a length too short for a task: the user's to fix
        raise ConfigError(str(e)) from e
    eff = effective_lengths(rows, args.threshold)
    meta = {"checkpoint": loaded.source, "train_len": train_len, "scalings": scalings, "samples": args.samples,
            "seed": args.seed, "threshold": args.threshold, "haystack": args.haystack, "effective_length": eff}
    means = [r for r in rows if r["task"] == "mean"]
    table = write_results(args.out, "ruler", means + [r for r in rows if r["task"] != "mean"], COLUMNS, meta)
    plot_ruler(rows, f"{args.out}/ruler.png", args.threshold, train_len)
    print(table)
    print("effective length: " + ", ".join(f"{k}: {v}" for k, v in eff.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
