"""bench_arch.py's tables, plots and verdicts, computed from its records only (no torch, no CUDA).

A training run's record keeps the trainer's own step records (``metrics.jsonl`` lines logged by that run) and
the evaluation of its final checkpoint; every number of the table is derived here from those, so the table can
be recomputed from the JSON (tests/e2e/test_bench_arch.py does, from the run directories).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import report


def throughput(steps: list, tokens_per_step: int, warmup: int) -> Optional[float]:
    """Tokens/s over the steps after ``warmup``: their tokens / their time. A record covers the steps since the
    previous one (``tokens_per_s`` is over that span); spans that start inside the warm-up are left out."""
    tokens = seconds = 0.0
    prev = 0
    for r in sorted(steps, key=lambda r: r["step"]):
        if prev >= warmup and r.get("tokens_per_s"):
            n = (r["step"] - prev) * tokens_per_step
            tokens, seconds = tokens + n, seconds + n / r["tokens_per_s"]
        prev = r["step"]
    return tokens / seconds if seconds > 0 else None


def train_row(run: dict, warmup: int) -> dict:
    """The table row of one option from its record (see the module docstring)."""
    row = {"option": run["option"], "status": run["status"], "params": run.get("params_trained"),
           "ffn_hidden": run.get("ffn_hidden")}
    steps = run.get("records") or []
    if steps:
        last = run.get("steps_done") or max(r["step"] for r in steps)
        row.update(tokens=last * run["tokens_per_step"],
                   tokens_per_s=throughput(steps, run["tokens_per_step"], warmup),
                   peak_mem_gib=max(r["peak_mem_gib"] for r in steps),
                   train_loss=sorted(steps, key=lambda r: r["step"])[-1]["loss"])
    if run.get("error") or run.get("eval_error"):
        row["error"] = "; ".join(x for x in (run.get("error"), run.get("eval_error") and
                                             f"evaluation failed: {run['eval_error']}") if x)
    ev = run.get("eval") or {}
    if ev.get("val_loss") is not None:
        row.update(val_loss=ev["val_loss"], val_ppl=math.exp(min(ev["val_loss"], 50.0)))
    for i, p in enumerate(ev.get("ppl", [])):
        row[f"ppl_{i}"] = p["ppl"]
    return row


def _pct(a: float, b: float) -> float:
    return 100.0 * (a / b - 1.0)


def _longest(points: list, option: str) -> Optional[dict]:
    ok = [p for p in points if p["option"] == option and p.get("kind") == "layer" and "time_ms" in p]
    return max(ok, key=lambda p: p["seq_len"]) if ok else None


def verdicts(rows: list, points: list, lengths: list) -> list:
    """One sentence per option saying, with the numbers, where it underperforms dense attention (loss, speed,
    memory, perplexity at the longest evaluation length, one layer's time and reach), or that it does not."""
    by = {r["option"]: r for r in rows}
    d = by.get("dense")
    out = []
    for r in rows:
        o = r["option"]
        if o == "dense":
            continue
        if r["status"] != "ok" and "val_loss" not in r:
            out.append(f"{o}: not compared ({r['status']}).")
            continue
        if d is None or "val_loss" not in d:
            out.append(f"{o}: not compared (dense has no result).")
            continue
        bad = []
        if r.get("tokens", 0) < d.get("tokens", 0):
            bad.append(f"trained on {r['tokens']:,} tokens, fewer than dense's {d['tokens']:,} (time cap)")
        if r["val_loss"] > d["val_loss"] * 1.005:
            bad.append(f"validation loss {r['val_loss']:.4f} vs dense {d['val_loss']:.4f} "
                       f"({_pct(r['val_loss'], d['val_loss']):+.1f}%)")
        if r.get("tokens_per_s") and d.get("tokens_per_s") and r["tokens_per_s"] < 0.95 * d["tokens_per_s"]:
            bad.append(f"{r['tokens_per_s']:,.0f} tokens/s, {100 * r['tokens_per_s'] / d['tokens_per_s']:.0f}% of "
                       f"dense's {d['tokens_per_s']:,.0f}")
        if r.get("peak_mem_gib") and d.get("peak_mem_gib") and r["peak_mem_gib"] > 1.05 * d["peak_mem_gib"]:
            bad.append(f"peak memory {r['peak_mem_gib']:.2f} GiB vs {d['peak_mem_gib']:.2f}")
        k = f"ppl_{len(lengths) - 1}"
        if lengths and r.get(k) and d.get(k) and r[k] > d[k] * 1.01:
            bad.append(f"perplexity {r[k]:.3g} vs {d[k]:.3g} at {lengths[-1]:,} tokens of context")
        mine, theirs = _longest(points, o), _longest(points, "dense")
        if mine and theirs:
            at = min(mine["seq_len"], theirs["seq_len"])
            t = {p["option"]: p["time_ms"] for p in points
                 if p.get("kind") == "layer" and p["seq_len"] == at and "time_ms" in p}
            if t.get(o) and t.get("dense") and t[o] > 1.05 * t["dense"]:
                bad.append(f"one layer at {at:,} tokens takes {t[o]:.1f} ms vs dense {t['dense']:.1f} ms")
            if mine["seq_len"] < theirs["seq_len"]:
                bad.append(f"one layer reaches {mine['seq_len']:,} tokens, dense {theirs['seq_len']:,}")
        wins = crossover(points, o)
        wins = f" One layer is faster than dense from {wins:,} tokens on." if wins else ""
        out.append((f"{o} underperforms dense: " + "; ".join(bad) + "." if bad else
                    f"{o}: no measured number is worse than dense's.") + wins)
    return out


def crossover(points: list, option: str) -> Optional[int]:
    """The shortest length from which one layer of ``option`` is faster than dense at every longer length both
    measured, or where dense stopped (OOM, time limit) and ``option`` still ran; None if there is none."""
    t = {(p["option"], p["seq_len"]): p["time_ms"] for p in points if p.get("kind") == "layer" and "time_ms" in p}
    lengths = sorted({n for o, n in t if o == option})
    faster = [(option, n) in t and ((("dense", n) not in t) or t[(option, n)] < t[("dense", n)]) for n in lengths]
    if not any(("dense", n) in t for n in lengths) or not faster or not faster[-1]:
        return None
    i = len(faster)
    while i > 0 and faster[i - 1]:
        i -= 1
    return lengths[i]


def train_columns(lengths: list) -> list:
    cols = [("option", "option", ""), ("status", "status", ""), ("params", "params", ",d"), ("MLP", "ffn_hidden", ""),
            ("tokens", "tokens", ",d"), ("val loss", "val_loss", ".4f"), ("val ppl", "val_ppl", ".3f"),
            ("tokens/s", "tokens_per_s", ",.0f"), ("peak mem (GiB)", "peak_mem_gib", ".2f")]
    return cols + [(f"ppl @{n:,}", f"ppl_{i}", ".3f") for i, n in enumerate(lengths)]


def layer_table(points: list, lengths: list) -> str:
    """Options x lengths: ``time ms / peak GiB`` of one layer, or the reason a point is missing."""
    opts = list(dict.fromkeys(p["option"] for p in points))
    cells = {(p["option"], p["seq_len"]): p for p in points if p.get("kind", "layer") == "layer"}

    def cell(o, n):
        p = cells.get((o, n))
        if p is None:
            return "-"
        if "time_ms" not in p:
            return p["status"]
        mem = f" / {p['peak_gib']:.2f}" if p.get("peak_gib") is not None else ""
        return f"{p['time_ms']:.2f}{mem}" + (" (over limit)" if p["status"] == "over limit" else "")

    cols = [("option", "option", "")] + [(f"{n:,}", str(n), "") for n in lengths]
    rows = [{"option": o, **{str(n): cell(o, n) for n in lengths}} for o in opts]
    return report.markdown_table(rows, cols)


def markdown(info: dict, settings: dict, rows: list, points: list, sentences: list) -> str:
    lengths, sweep = settings["eval_lengths"], settings["layer_lengths"]
    s = settings
    lines = [f"# Architecture options side by side on {info['device']}", "", report.meta_line(info), "",
             f"Training: {s['params_target']:,} parameters ({s['dim']} wide, {s['n_layers']} layers, {s['n_heads']} "
             f"heads), context {s['seq_len']:,}, batch {s['batch_size']}, {s['tokens']:,} tokens per option "
             f"({s['steps']} steps), the embedded stdlib corpus (bytes), AdamW lr {s['lr']}, "
             f"data.doc_mask=false for every option (the non-mask options have none), attention backend "
             f"{s['backend']} (auto on CUDA: cuDNN for the plain causal mask, Triton for the sparse patterns). "
             "The MLP is widened or narrowed (column MLP) where an option's TRAINED parameters (those that get a "
             "gradient: Reformer's shared-QK leaves wk unused) are more than 1% off dense's (column params). "
             f"Tokens/s: the steps after the first {s['warmup']}; peak memory: the trainer's (CUDA max allocated; "
             f"on the CPU the process's peak RSS). Validation loss: the final checkpoint on the val split in "
             f"windows of {s['seq_len']:,}; perplexity at other contexts: sliding windows, the same "
             f"{s['eval_targets']:,} targets at every length (stride "
             f"{s['stride']:,}; seqpar.eval.perplexity).", "", "## Training", "",
             report.markdown_table(rows, train_columns(lengths)), "",
             f"## One layer, forward + backward (ms / peak GiB), batch 1, bf16 autocast on CUDA; stop at OOM or "
             f"> {s['point_limit_s']} s per point", "", layer_table(points, sweep), "",
             "## Where an option underperforms dense", "", *[f"- {v}" for v in sentences]]
    notes = [f"- {o}: not trained: {why}" for o, why in s.get("not_trained", {}).items()]
    notes += [f"- {r['option']}: {r['error']}" for r in rows if r.get("error")]
    notes += [f"- {p['option']} one layer at [{p['batch']}, {p['seq_len']:,}]: {p['error']}" for p in points
              if p.get("status") == "error"]
    if notes:
        lines += ["", "## Not trained, failed", "", *notes]
    if s.get("wall_s") is not None:
        lines += ["", f"Wall time {s['wall_s']:.0f} s (budget {s['budget_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def _plot(path: str, series: dict, xlabel: str, ylabel: str, title: str, logy: bool = True, ax=None,
          logx: bool = True):
    plt = _pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    drew = False
    for label, pts in series.items():
        pts = sorted((x, y) for x, y in pts if y is not None and math.isfinite(y))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            drew = True
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    if drew:
        ax.legend(fontsize=7)
    if own:
        if drew:
            fig.tight_layout()
            fig.savefig(path)
        plt.close(fig)
    return drew


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(out_dir: str, runs: list, rows: list, points: list, lengths: list) -> list:
    """``loss_ppl.png`` (training loss vs tokens | perplexity vs evaluation length), ``layer_time.png``,
    ``layer_memory.png`` (the latter on CUDA only); returns the file names written."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    _plot("", {r["option"]: [(s["step"] * r["tokens_per_step"], s["loss"]) for s in r.get("records") or []]
               for r in runs}, "training tokens", "training loss", "training loss", logy=False, ax=a, logx=False)
    _plot("", {r["option"]: [(n, r.get(f"ppl_{i}")) for i, n in enumerate(lengths)] for r in rows},
          "evaluation context (tokens)", "perplexity", "perplexity vs evaluation length (dashed: training length)",
          logy=False, ax=b)
    if lengths:
        b.axvline(lengths[0], color="gray", ls="--", lw=1)
        b.minorticks_off()
        b.set_xticks(lengths, [f"{n:,}" for n in lengths])
    fig.tight_layout()
    written = ["loss_ppl.png"]
    fig.savefig(os.path.join(out_dir, written[0]))
    plt.close(fig)
    layer = [p for p in points if p.get("kind") == "layer" and "time_ms" in p]
    for name, key, ylabel in (("layer_time.png", "time_ms", "fwd+bwd time (ms)"),
                              ("layer_memory.png", "peak_gib", "peak memory (GiB)")):
        series = report.group_series(layer, lambda p: p["option"], "seq_len", key)
        if _plot(os.path.join(out_dir, name), series, "sequence length (tokens)", ylabel, f"one layer: {ylabel}"):
            written.append(name)
    return written
