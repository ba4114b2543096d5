"""Reports of ``bench_ring.py``: derived columns (scaling efficiency, exposed communication), the merge of
several runs into one report, and the JSON / markdown / PNG writers. No GPU needed (``--merge`` runs here)."""
from __future__ import annotations

import json
import os


def _baseline_key(r: dict):
    """The single-GPU row a row's scaling efficiency divides by: the same local kernel, ws=1, same total
    tokens (ring variants -> ring on a ring of one; torch_cp -> SDPA of the same kind)."""
    if r["method"] == "torch_cp":
        return ("sdpa", r["kernel"].split("+")[0], 1, r["seq"])
    if r["method"] == "sdpa":
        return ("sdpa", r["kernel"], 1, r["seq"])
    return ("ring", r["kernel"], 1, r["seq"])


def derive(rows: list) -> list:
    """Add ``efficiency`` (per-GPU TFLOP/s / the single-GPU TFLOP/s of the same local kernel, same
    total tokens, same run) and, on ring rows with ws > 1, ``comm_share`` (exposed communication:
    (t_ring - t_ring-nocomm) / t_ring, same kernel, layout, ws and tokens). Missing or failed
    partners give None; a ring row without its ring of one (``--skip-ring-ws1``) divides by the bare
    SDPA kernel of the same family instead. Returns the rows (changed in place)."""
    ok = lambda r: r is not None and r.get("error") is None and r["tflops_per_gpu"] == r["tflops_per_gpu"]
    single = {(r["method"], r["kernel"], r["world_size"], r["seq"]): r for r in rows
              if r["world_size"] == 1 and r["method"] in ("sdpa", "ring") and r["layout"] in ("zigzag", "-")}
    nocomm = {(r["kernel"], r["layout"], r["world_size"], r["seq"]): r for r in rows if r["method"] == "ring-nocomm"}
    for r in rows:
        base = single.get(_baseline_key(r))
        if base is None and r["method"] != "torch_cp" and r["kernel"].startswith("sdpa_"):
            # No ring of one at this length (--skip-ring-ws1): the bare SDPA kernel of the same family.
            base = single.get(("sdpa", r["kernel"][len("sdpa_"):], 1, r["seq"]))
        r["efficiency"] = r["tflops_per_gpu"] / base["tflops_per_gpu"] if ok(r) and ok(base) else None
        nc = nocomm.get((r["kernel"], r["layout"], r["world_size"], r["seq"])) if r["method"] == "ring" else None
        r["comm_share"] = max(0.0, (r["ms"] - nc["ms"]) / r["ms"]) if r["world_size"] > 1 and ok(r) and ok(nc) else None
    return rows


def merge(paths: list, out: str, tag: str = "") -> None:
    """Rebuild one report (JSON, markdown, plots) from several runs' JSON files: rows concatenated in
    order (a later file's row replaces an earlier one of the same method/kernel/layout/GPUs/tokens),
    metadata and checks from the first file that has them."""
    rows, meta, checks = {}, None, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = meta or data["meta"]
        checks = checks or data.get("checks", [])
        for r in data["timings"]:
            rows[(r["method"], r["kernel"], r["layout"], r["world_size"], r["seq"])] = r
    print(write_results(out, meta, checks, list(rows.values()), tag), flush=True)


def write_results(out: str, meta: dict, checks: list, rows: list, tag: str = "") -> str:
    """JSON + markdown + two PNG plots (TFLOP/s per GPU vs total tokens; efficiency vs world size)
    under ``out``; returns the markdown (its table is what main prints last)."""
    import report

    derive(rows)
    name = f"ring_{meta['device'].replace(' ', '-')}_x{meta['gpus']}_{meta['date'][:10]}" + (f"_{tag}" if tag else "")
    label = lambda r: f"{r['method']} {r['kernel']} {r['layout']} ws={r['world_size']}"
    p1 = report.line_plot(os.path.join(out, name + "_tflops.png"),
                          report.group_series(rows, label, "seq", "tflops_per_gpu"), xlabel="total tokens",
                          ylabel="TFLOP/s per GPU", title=f"causal fwd+bwd, {meta['device']}", logx=True)
    scaled = [r for r in rows if r["method"] in ("ring", "torch_cp") and r["layout"] in ("zigzag", "head-tail")]
    p2 = report.line_plot(os.path.join(out, name + "_efficiency.png"),
                          report.group_series(scaled, lambda r: f"{r['method']} {r['kernel']} {r['seq'] // 1024}k",
                                              "world_size", "efficiency"),
                          xlabel="GPUs", ylabel="per-GPU TFLOP/s / single-GPU", title="scaling efficiency",
                          hline=0.95)
    pct = lambda key: (lambda r: None if r.get(key) is None else f"{100 * r[key]:.0f}%")
    cols = [("method", "method", ""), ("kernel", "kernel", ""), ("layout", "layout", ""), ("GPUs", "world_size", "d"),
            ("total tokens", lambda r: f"{r['seq'] // 1024}k", ""),
            ("ms", lambda r: r["error"] if r["error"] == "OOM" else r["ms"], ".1f"),
            ("TFLOP/s per GPU", "tflops_per_gpu", ".0f"), ("efficiency", pct("efficiency"), ""),
            ("exposed comm", pct("comm_share"), ""), ("peak GiB", "peak_gib", ".1f"),
            ("error", lambda r: r["error"] if r["error"] not in (None, "OOM") else "", "")]
    lines = ["# Ring attention fwd+bwd causal, bf16, B=1 H=32 D=128", "", report.meta_line(meta), "",
             "efficiency: per-GPU TFLOP/s / single-GPU TFLOP/s of the same local kernel at the same total tokens "
             "(ring -> ring ws=1, torch_cp -> sdpa). exposed comm: (t_ring - t_ring-nocomm) / t_ring.", "",
             report.markdown_table(rows, cols)]
    if checks:
        lines += ["", f"bf16 checks over {meta['gpus']} ranks: {sum(c['ok'] for c in checks)}/{len(checks)} ok "
                  f"(ring rel err <= 2x torch SDPA bf16 rel err, floor 1e-3; lse abs err <= 2e-2)"]
    lines += [f"\n![{os.path.basename(p)}]({os.path.basename(p)})" for p in (p1, p2) if p]
    md = "\n".join(lines) + "\n"
    report.write_outputs(out, name, meta, {"checks": checks, "timings": rows}, md)
    return md
