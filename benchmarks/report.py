"""Shared output of the benchmarks: environment stamp, markdown tables, JSON/markdown files, PNG plots.

Kept apart from the benchmarks themselves so that it imports without CUDA, NCCL or Hydra and the
writers can be tested on CPU with fake rows (tests/test_benchmarks.py).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Callable, Iterable, Optional, Sequence


def environment(device_index: int = 0) -> dict:
    """Device name and count, torch/CUDA/triton versions and the UTC date: the stamp on every result."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    meta = {"device": torch.cuda.get_device_name(device_index) if gpus else "cpu", "gpus": gpus,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def stem(prefix: str, meta: dict, nproc: Optional[int] = None) -> str:
    """File stem ``<prefix>_<device>_x<N>_<YYYY-MM-DD>`` (spaces in the device name become dashes)."""
    n = meta.get("gpus", 0) if nproc is None else nproc
    return f"{prefix}_{meta['device'].replace(' ', '-')}_x{n}_{meta['date'][:10]}"


def fmt(value, spec: str = "") -> str:
    """One table cell: '-' for None, 'nan' passes through, numbers by ``spec``."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """A markdown table; ``columns`` is ``(header, key_or_function, format_spec)`` per column."""
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, spec in columns:
            cells.append(fmt(key(r) if callable(key) else r.get(key), spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: str, name: str, meta: dict, payload: dict, markdown: str) -> dict:
    """Write ``<name>.json`` (meta + payload) and ``<name>.md``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, name + ".json"), "md": os.path.join(out_dir, name + ".md")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    return paths


def meta_line(meta: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in meta.items())


def line_plot(path: str, series: dict, *, xlabel: str, ylabel: str, title: str, logx: bool = False,
              hline: Optional[float] = None) -> Optional[str]:
    """PNG line plot of ``{label: [(x, y), ...]}`` (NaN/None points dropped); returns the path, or
    None when there is nothing finite to draw. matplotlib's Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = {k: sorted((x, y) for x, y in pts if y is not None and not math.isnan(y)) for k, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label, pts in clean.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def group_series(rows: Iterable[dict], label: Callable[[dict], str], x: str, y: str) -> dict:
    """``{label(row): [(row[x], row[y]), ...]}`` for :func:`line_plot`."""
    out: dict = {}
    for r in rows:
        out.setdefault(label(r), []).append((r[x], r.get(y)))
    return out
