"""Longest trainable context: the longest ``train.seq_len`` a preset trains (forward + backward +
optimizer step, no OOM) on the GPUs given, with seqpar's memory features and without them.

    # real probes: every probe is a fresh `torchrun --nproc_per_node=N train.py ...` (an OOM cannot
    # poison the next probe), each with a timeout
    python benchmarks/max_context.py --model llama3-1b --nproc 2 --out benchmarks/results
    # estimates only (seqpar.train.dry_run on the meta device; CPU, seconds)
    python benchmarks/max_context.py --model llama3-1b --nproc 2 --dry-run-only --gpu-gib 140

Configurations (``--configs``), all with batch 1 sequence per data-parallel rank and FSDP over all ranks:

- ``seqpar``: ring attention over every GPU (``parallel.cp=N``, zigzag), BPT blockwise FFN
  (``train.ffn_chunk``), chunked loss (``train.loss_chunk``), full activation checkpointing;
- ``seqpar-selective``: the same with ``train.ac=selective`` (keeps attention outputs, recomputes less);
- ``plain``: ``parallel.cp=1`` (each GPU holds a whole sequence; ``dp=N``), no FFN chunking, no
  checkpointing and full logits: ``train.loss_chunk = seq_len``, so the loss materialises the whole
  ``[S, vocab]`` logits (bf16 + fp32 + fp32 grad) at once. No trainer switch is needed: the single
  chunk is recomputed under checkpoint in backward, which moves the logits' lifetime but not the
  peak (logits and their gradient coexist either way).

Search (:func:`search_max`): start at ``--start`` and double while the probe passes; then bisect
between the last pass and the first failure at multiples of what the layout needs
(``lcm(2*cp, --multiple)``) until the gap is below ``--tol`` of the passing length. A probe passes
when train.py exits 0 after ``--steps`` steps (2 by default: the second step runs with AdamW's moments
allocated, the steady-state peak). A timeout or a non-OOM error counts as a failure and is
reported as such. The BPT multiplier is max(seqpar) / max(plain).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from bench_train import fresh_run_dir, own_records  # noqa: E402  (one run dir per probe, its own records)

GIB = 2**30
COMMON = ["checkpoint.every=0", "checkpoint.resume=false", "train.eval_every=0", "logging.log_every=1",
          "logging.progress=false", "train.batch_size=1", "parallel.fsdp=dp_cp", "optim.warmup_steps=1"]
OOM_PATTERNS = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)


def config_overrides(name: str, nproc: int, seq_len: int, *, ffn_chunk: int = 8192, loss_chunk: int = 4096) -> list:
    """train.py overrides of configuration ``name`` at ``seq_len`` on ``nproc`` GPUs."""
    if name in ("seqpar", "seqpar-selective"):
        ac = "full" if name == "seqpar" else "selective"
        return [f"parallel.cp={nproc}", "parallel.dp=1", "parallel.layout=zigzag", f"train.ffn_chunk={ffn_chunk}",
                f"train.loss_chunk={loss_chunk}", f"train.ac={ac}", f"train.seq_len={seq_len}"]
    if name == "plain":
        return ["parallel.cp=1", f"parallel.dp={nproc}", "train.ffn_chunk=0", f"train.loss_chunk={seq_len}",
                "train.ac=none", f"train.seq_len={seq_len}"]
    raise ValueError(f"unknown configuration '{name}'; choose seqpar, seqpar-selective or plain.")


def layout_multiple(name: str, nproc: int, multiple: int) -> int:
    """Granularity of the search: zigzag over cp ranks needs seq_len % (2*cp) == 0."""
    cp = 1 if name == "plain" else nproc
    return math.lcm(2 * cp, multiple)


def search_max(probe: Callable[[int], dict], *, start: int, multiple: int, max_len: int,
               tol: float = 0.05) -> tuple[int, list]:
    """Longest length ``n`` (a multiple of ``multiple``, <= ``max_len``) with ``probe(n)["ok"]``.

    Assumes monotonicity (if n fits, every shorter length fits). Doubles from ``start`` while probes
    pass, then bisects between the last pass and the first failure until the gap is at most
    ``max(multiple, tol * pass)``. Returns ``(best, history)``: ``best`` 0 when nothing fits;
    ``history`` the probe results in order (each a dict with at least ``seq_len`` and ``ok``).
    """
    if multiple <= 0 or start <= 0 or max_len < multiple:
        raise ValueError(f"need start > 0, multiple > 0 and max_len >= multiple (got {start}, {multiple}, {max_len}).")
    history = []

    def run(n: int) -> bool:
        r = dict(probe(n))
        r["seq_len"] = n
        history.append(r)
        return bool(r["ok"])

    lo, hi = 0, None
    n = max(multiple, (start // multiple) * multiple)
    while n <= max_len:
        if run(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if hi is None:  # every doubling passed up to max_len: try max_len itself (rounded) once
        top = (max_len // multiple) * multiple
        if top > lo and run(top):
            return top, history
        hi = top if top > lo else None
        if hi is None:
            return lo, history
    while hi - lo > max(multiple, tol * lo):
        mid = ((lo + hi) // 2 // multiple) * multiple
        if mid <= lo or mid >= hi:
            break
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, history


# ---- probes ------------------------------------------------------------------------------------
def dry_run_probe(name: str, model: str, nproc: int, gpu_gib: float, headroom: float, extra: list,
                  chunks: dict) -> Callable[[int], dict]:
    """Probe from :func:`seqpar.train.dry_run.estimate_memory`: passes when the estimate fits in
    ``headroom`` of the GPU (no allocation; Hydra composes the config once, lengths are replaced)."""
    from seqpar.cli import load_config
    from seqpar.train.dry_run import estimate_memory

    base = load_config([f"model={model}", *COMMON, *config_overrides(name, nproc, 4096, **chunks), *extra])
    dp, cp = base.parallel.resolve(nproc)

    def probe(n: int) -> dict:
        t = dataclasses.replace(base.train, seq_len=n, loss_chunk=n if name == "plain" else base.train.loss_chunk)
        est = estimate_memory(dataclasses.replace(base, train=t), dp, cp, bf16=True)
        gib = est["total"] / GIB
        return {"ok": gib <= headroom * gpu_gib, "status": "fits" if gib <= headroom * gpu_gib else "over",
                "est_gib": round(gib, 2), "peak_gib": None}

    return probe


def torchrun_probe(name: str, model: str, nproc: int, timeout_s: float, steps: int, workdir: str, log_dir: str,
                   extra: list, chunks: dict) -> Callable[[int], dict]:
    """Probe by training: ``torchrun --standalone`` of train.py for ``steps`` steps in a fresh process
    group, killed as a group on timeout so no rank lingers holding GPU memory."""

    estimate = dry_run_probe(name, model, nproc, 1.0, 1.0, extra, chunks)  # only its est_gib is used

    def probe(n: int) -> dict:
        tag = f"{name}_{n}"
        run_dir = fresh_run_dir(workdir, tag)  # never a previous probe's directory (its metrics would count)
        # Enough corpus for a few rows per data-parallel rank at this length (the byte tokenizer: 1 token per byte).
        max_bytes = max(8_000_000, 6 * n * nproc)
        args = [f"model={model}", *COMMON, *config_overrides(name, nproc, n, **chunks), *extra,
                f"train.steps={steps}", f"logging.run_dir={run_dir}", f"data.max_bytes={max_bytes}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *args]
        log_path = os.path.join(log_dir, f"max_context_{tag}.log")
        t0 = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own torchrun and its ranks, by process group id
                proc.wait()
                rc = None
        text = open(log_path, errors="replace").read()
        recs = own_records(os.path.join(run_dir, "metrics.jsonl"), t0, steps)  # this probe's steps only
        status = ("ok" if rc == 0 and recs else "timeout" if rc is None
                  else "oom" if OOM_PATTERNS.search(text) else "error")
        out = {"ok": status == "ok", "status": status, "wall_s": round(time.time() - t0, 1),
               "peak_gib": round(max(r["peak_mem_gib"] for r in recs), 2) if recs else None,
               "step_s": round(recs[-1]["elapsed_s"] / max(1, len(recs)), 2) if recs else None, "log": log_path,
               "est_gib": estimate(n)["est_gib"]}
        if status == "error":
            out["detail"] = text.strip().splitlines()[-1][:300] if text.strip() else f"rc {rc}"
        print(f"  probe {name} seq_len={n:,}: {status} ({out['wall_s']} s, peak {out['peak_gib']} GiB)", flush=True)
        return out

    return probe


# ---- output ------------------------------------------------------------------------------------
def summarize(results: dict) -> dict:
    """BPT multiplier(s): max length of each seqpar configuration / max length of ``plain``."""
    if "plain" not in results:
        return {}
    plain = results["plain"]["max_seq_len"]
    return {name: (r["max_seq_len"] / plain if plain else None) for name, r in results.items() if name != "plain"}


def markdown(meta: dict, args: dict, results: dict, ratios: dict) -> str:
    rows = [dict(config=k, **v) for k, v in results.items()]
    cols = [("configuration", "config", ""), ("mesh", "mesh", ""), ("overrides", lambda r: " ".join(
        o for o in r["overrides"] if not o.startswith("train.seq_len")), ""),
            ("max seq_len", "max_seq_len", ",d"), ("first failure", "first_fail", ""), ("probes", "probes", "d"),
            ("peak GiB at max", "peak_at_max", ".1f"), ("estimate GiB at max", "est_at_max", ".1f")]
    mode = "dry-run estimates" if args["dry_run_only"] else f"torchrun probes ({args['steps']} steps each)"
    lines = [f"# Longest trainable context: {args['model']} on {args['nproc']} x {meta['device']} ({mode})", "",
             report.meta_line(meta), "", report.markdown_table(rows, cols), ""]
    for name, x in ratios.items():
        lines.append(f"BPT multiplier {name} / plain: " + (f"{x:.1f}x" if x else "- (plain fits nothing)"))
    return "\n".join(lines) + "\n"


def plot(path: str, results: dict) -> Optional[str]:
    """Memory (measured peak, else the estimate) against sequence length for every probe."""
    series = {}
    for name, r in results.items():
        pts = [(h["seq_len"], h.get("peak_gib") if h.get("peak_gib") is not None else h.get("est_gib"))
               for h in r["history"]]
        series[f"{name} (max {r['max_seq_len']:,})"] = pts
    return report.line_plot(path, series, xlabel="sequence length (tokens)", ylabel="GiB per GPU",
                            title="memory per probe (passing and failing)", logx=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-1b", help="conf/model preset")
    ap.add_argument("--nproc", type=int, default=0, help="GPUs (0: every visible GPU; 1 without CUDA)")
    ap.add_argument("--configs", default="seqpar,plain")
    ap.add_argument("--start", type=int, default=16384)
    ap.add_argument("--max-len", type=int, default=1 << 24)
    ap.add_argument("--multiple", type=int, default=1024, help="search granularity (lcm with what the layout needs)")
    ap.add_argument("--tol", type=float, default=0.05, help="stop bisecting when the gap is below this share")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--probe-timeout", type=float, default=300.0, help="seconds per torchrun probe")
    ap.add_argument("--ffn-chunk", type=int, default=8192)
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--dry-run-only", action="store_true", help="search on seqpar.train.dry_run estimates")
    ap.add_argument("--gpu-gib", type=float, default=0.0, help="GPU memory for --dry-run-only (0: detect, else 140)")
    ap.add_argument("--headroom", type=float, default=0.9, help="share of --gpu-gib an estimate may use")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results")))
    ap.add_argument("--workdir", default="/tmp/seqpar_max_context")
    ap.add_argument("--log-dir", default="", help="where each probe's log goes (default: --out)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for every probe")
    args = ap.parse_args(argv)
    meta = report.environment()
    nproc = args.nproc or max(1, meta["gpus"])
    gpu_gib = args.gpu_gib
    if args.dry_run_only and gpu_gib <= 0:
        import torch

        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if meta["gpus"] else 140.0
    chunks = {"ffn_chunk": args.ffn_chunk, "loss_chunk": args.loss_chunk}
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.log_dir or args.out, exist_ok=True)
    results = {}
    for name in args.configs.split(","):
        if args.dry_run_only:
            probe = dry_run_probe(name, args.model, nproc, gpu_gib, args.headroom, args.overrides, chunks)
        else:
            probe = torchrun_probe(name, args.model, nproc, args.probe_timeout, args.steps, args.workdir,
                                   args.log_dir or args.out,
                                   args.overrides, chunks)
        best, history = search_max(probe, start=args.start, multiple=layout_multiple(name, nproc, args.multiple),
                                   max_len=args.max_len, tol=args.tol)
        at_max = next((h for h in history if h["seq_len"] == best), {})
        fails = [h for h in history if not h["ok"]]
        cp = 1 if name == "plain" else nproc
        results[name] = {"mesh": f"dp={nproc // cp} cp={cp}", "max_seq_len": best, "probes": len(history),
                         "first_fail": (f"{min(fails, key=lambda h: h['seq_len'])['seq_len']:,} "
                                        f"({min(fails, key=lambda h: h['seq_len'])['status']})") if fails else "-",
                         "peak_at_max": at_max.get("peak_gib"), "est_at_max": at_max.get("est_gib"),
                         "overrides": config_overrides(name, nproc, best, **chunks) + list(args.overrides),
                         "history": history}
    ratios = summarize(results)
    stem = report.stem(f"max_context_{args.model}" + ("_dryrun" if args.dry_run_only else ""), meta, nproc)
    stem += f"_{args.tag}" if args.tag else ""
    md = markdown(meta, {**vars(args), "nproc": nproc}, results, ratios)
    png = plot(os.path.join(args.out, stem + ".png"), results)
    if png:
        md += f"\n![memory per probe]({os.path.basename(png)})\n"
    report.write_outputs(args.out, stem, meta, {"args": {**vars(args), "nproc": nproc, "gpu_gib": gpu_gib},
                                                "results": results, "bpt_multiplier": ratios}, md)
    print(md, end="")
    return 0 if all(r["max_seq_len"] > 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
