"""Where a training step's time goes, side by side for a few configurations (issue 17).

    # default: llama3-1b on every visible GPU (cp = GPUs), one causal sequence vs packed documents (on the default
    # layout, and on zigzag when cp > 1)
    python benchmarks/profile_step.py --seq-len 131072
    # any cases: NAME="overrides ..." (train.py overrides; the common ones below are added)
    python benchmarks/profile_step.py --nproc 2 --case dense="model=llama3-1b train.seq_len=65536 parallel.cp=2" \\
        --case ulysses="model=llama3-1b train.seq_len=65536 parallel.cp=2 parallel.cp_comm=ulysses"

Each case is ``torchrun --standalone --nproc_per_node=<n> train.py <overrides> logging.profile_at=<warmup + 1>``
in a fresh run directory: the trainer profiles ``--steps`` steps after ``--warmup`` unprofiled ones
(:mod:`seqpar.train.profile`: attention, GEMMs, communication, norms, RoPE, MLP element-wise, loss, optimizer, FSDP
copies, memory copies, other; kernel time on CUDA, op time on CPU) and every rank writes its breakdown. The
table shows rank 0 (``--rank``) and the slowest rank's step time; JSON (every rank) and markdown go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from bench_train import fresh_run_dir  # noqa: E402

COMMON = ["checkpoint.every=0", "checkpoint.resume=false", "train.eval_every=0", "logging.log_every=1",
          "logging.progress=false", "train.batch_size=1"]


def default_cases(nproc: int, seq_len: int) -> dict:
    base = ["model=llama3-1b", f"train.seq_len={seq_len}", f"parallel.cp={nproc}", "parallel.dp=1",
            "train.ffn_chunk=8192", "train.loss_chunk=4096", "train.ac=selective", f"data.max_bytes={max(8_000_000, 6 * seq_len)}"]
    cases = {"dense causal": base + ["data.doc_mask=false"], "packed documents": base + ["data.doc_mask=true"]}
    if nproc > 1:  # the default layout (auto = docs for packed documents) against zigzag, which balances only causal
        cases["packed documents, zigzag"] = base + ["data.doc_mask=true", "parallel.layout=zigzag"]
    return cases


def profile_case(name: str, overrides: list, *, nproc: int, warmup: int, steps: int, workdir: str, out: str,
                 timeout_s: float, trace: bool) -> dict:
    run_dir = fresh_run_dir(workdir, name.replace(" ", "_"))
    args = [*overrides, *COMMON, f"train.steps={warmup + steps}", f"logging.profile_at={warmup + 1}",
            f"logging.profile_steps={steps}", f"logging.profile_trace={str(trace).lower()}", f"logging.run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    log_path = os.path.join(out, f"profile_{name.replace(' ', '_')}.log")
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    ranks = []
    for r in range(nproc):
        path = os.path.join(run_dir, "profile", f"rank{r}.json")
        if os.path.exists(path):
            ranks.append(json.load(open(path)))
    return {"name": name, "overrides": overrides, "returncode": rc, "run_dir": run_dir, "log": log_path,
            "status": "ok" if rc == 0 and len(ranks) == nproc else f"failed ({rc})", "ranks": ranks}


def markdown(info: dict, cases: list, rank: int) -> str:
    from seqpar.train.profile import markdown as table

    ok = [c for c in cases if c["status"] == "ok"]
    lines = [f"# Training step profile on {info['gpus']} x {info['device']}", "", report.meta_line(info), "",
             f"Rank {rank}'s breakdown per case (ms per step and % of the device's busy time; communication overlaps "
             "compute, so the parts can sum to more than the step).", ""]
    if ok:
        lines.append(table({c["name"]: c["ranks"][rank] for c in ok}))
        lines += ["", "Slowest rank's step: " + ", ".join(
            f"{c['name']} {max(r['step_ms'] for r in c['ranks']):.1f} ms" for c in ok)]
        # ranks waiting on each other show as communication; unequal attention says why (load balance)
        lines += ["", "Attention ms per step, rank by rank: " + "; ".join(
            f"{c['name']} " + " / ".join(f"{r['ms_per_step'].get('attention', 0.0):.0f}" for r in c["ranks"])
            for c in ok)]
    for c in cases:
        lines.append(f"- {c['name']}: `{' '.join(c['overrides'])}` ({c['status']}; log {os.path.basename(c['log'])})")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--nproc", type=int, default=0, help="processes (0: every visible GPU, at least 1)")
    ap.add_argument("--seq-len", type=int, default=131072, help="the default cases' sequence")
    ap.add_argument("--case", action="append", default=[], metavar='NAME="OVERRIDES"',
                    help="a named case (repeatable); default: llama3-1b dense causal vs packed documents")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--rank", type=int, default=0, help="the rank whose breakdown the table shows")
    ap.add_argument("--trace", action="store_true", help="also keep each rank's Chrome trace (in its run dir)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--workdir", default="/tmp/seqpar_profile")
    args = ap.parse_args()
    info = report.environment()
    nproc = args.nproc or max(1, info["gpus"])
    if args.case:
        cases = {}
        for spec in args.case:
            name, sep, ov = spec.partition("=")
            if not sep or not name:
                ap.error(f"--case {spec!r}: write NAME=\"overrides\", e.g. dense=\"model=llama3-1b train.seq_len=65536\"")
            cases[name] = shlex.split(ov)
    else:
        cases = default_cases(nproc, args.seq_len)
    if not 0 <= args.rank < nproc:
        ap.error(f"--rank {args.rank} is not a rank of {nproc} processes")
    os.makedirs(args.out, exist_ok=True)
    stem = f"profile_step_{report.stem('', info, nproc)[1:]}_{time.strftime('%H%M%S')}"
    results = []
    for name, ov in cases.items():
        results.append(profile_case(name, ov, nproc=nproc, warmup=args.warmup, steps=args.steps, workdir=args.workdir,
                                    out=args.out, timeout_s=args.timeout, trace=args.trace))
        md = markdown(info, results, args.rank)
        report.write_outputs(args.out, stem, info, {"nproc": nproc, "cases": results}, md)
    print(md, end="")
    return 0 if all(c["status"] == "ok" for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
