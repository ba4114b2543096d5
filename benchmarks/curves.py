"""Loss curves side by side: a run stopped by SIGTERM and resumed against the same run uninterrupted, or the
same model under two meshes (cp=1 vs cp=2).

    # SIGTERM after --stop-at steps, resume, compare with an uninterrupted run (4 GPUs, dp=2 x cp=2):
    python benchmarks/curves.py resume --nproc 4 --stop-at 100 --out benchmarks/results/resume \\
        --set model=tiny parallel.cp=2 train.steps=200 train.deterministic=true parallel.attention_backend=triton
    # curves of finished runs (metrics.jsonl of each run directory):
    python benchmarks/curves.py compare --runs cp1=/tmp/a cp2=/tmp/b --out benchmarks/results/cp1_vs_cp2

``resume`` launches ``python -m seqpar.launch --standalone --nproc_per_node=N train.py`` (the user's launcher) in
fresh run directories under ``--workdir``: the straight run, then the interrupted one (SIGTERM to the launcher
once its metrics reach ``--stop-at``; it must exit 3 = stopped and saved), then the same command again (it
resumes from the checkpoint and finishes). The summary counts the steps whose losses are bitwise equal to the
first run's and the largest difference before and after the interruption; a second straight run
(``--repeat``) gives the run-to-run noise floor when the GPU run is not deterministic. Writes
``curves_<tag>.json``, ``.md`` and ``.png`` into ``--out`` and prints the table last.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

COMMON = ["checkpoint.resume=true", "train.eval_every=0", "logging.log_every=1", "logging.progress=false"]


def losses(run_dir: str) -> dict:
    """``{step: loss}`` from a run's metrics.jsonl (the last record of a step wins; skipped steps dropped)."""
    from seqpar.train.metrics import read_records

    return {rec["step"]: rec["loss"] for _, rec in read_records(os.path.join(run_dir, "metrics.jsonl"))
            if rec.get("loss") is not None and not rec.get("skipped")}


def summarize(base: dict, other: dict, split: int | None = None) -> dict:
    """Bitwise-equal steps and the largest |difference| of ``other`` against ``base`` on their common steps,
    overall and before / after ``split`` (the interrupted step)."""
    steps = sorted(set(base) & set(other))
    diff = {s: abs(other[s] - base[s]) for s in steps}
    part = lambda cond: [diff[s] for s in steps if cond(s)]
    out = {"steps": len(steps), "equal": sum(d == 0.0 for d in diff.values()),
           "max_abs_diff": max(diff.values(), default=None),
           "mean_abs_diff": sum(diff.values()) / len(diff) if diff else None,
           "final": (base[steps[-1]], other[steps[-1]]) if steps else None}
    if split is not None:
        before, after = part(lambda s: s <= split), part(lambda s: s > split)
        out["max_before"], out["max_after"] = max(before, default=None), max(after, default=None)
    return out


def launch(nproc: int, run_dir: str, overrides: list, stop_at: int | None = None, timeout: float = 600.0) -> int:
    """One launcher run; with ``stop_at``, SIGTERM once rank 0 logged that step. Returns the exit code."""
    cmd = [sys.executable, "-m", "seqpar.launch", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           f"logging.run_dir={run_dir}", *COMMON, *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(run_dir + ".log", "a"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if stop_at is not None and max(losses(run_dir), default=0) >= stop_at:
            proc.send_signal(signal.SIGTERM)
            stop_at = None
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    # progress as it happens, so a run cut short by an outer time limit still says how far each launch got
    print(f"{os.path.basename(run_dir)}: exit {code} after {time.time() - t0:.0f} s, last logged step "
          f"{max(losses(run_dir), default=0)} (log {run_dir}.log)", flush=True)
    return code


def plot_and_write(out: str, tag: str, curves: dict, summary: dict, meta: dict, note: str) -> str:
    base = next(iter(curves))
    png = report.line_plot(os.path.join(out, f"curves_{tag}.png"),
                           {name: sorted(c.items()) for name, c in curves.items()},
                           xlabel="step", ylabel="training loss", title=f"{tag}: {note}")
    rows = [{"run": name, **summary.get(name, {}), "final": c[max(c)] if c else None} for name, c in curves.items()]
    cols = [("run", "run", ""), ("steps compared", "steps", ""), ("bitwise equal", "equal", ""),
            ("max |diff|", "max_abs_diff", ".2e"), ("mean |diff|", "mean_abs_diff", ".2e"),
            ("max before stop", "max_before", ".2e"), ("max after stop", "max_after", ".2e"),
            ("final loss", "final", ".4f")]
    md = "\n".join([f"# Loss curves: {tag}", "", report.meta_line(meta), "", note, "",
                    f"Differences against `{base}`.", "", report.markdown_table(rows, cols)])
    md += f"\n\n![curves]({os.path.basename(png)})\n" if png else "\n"
    report.write_outputs(out, f"curves_{tag}", meta, {"curves": {k: sorted(v.items()) for k, v in curves.items()},
                                                     "summary": summary, "note": note}, md)
    return md


def cmd_resume(args) -> int:
    os.makedirs(args.workdir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = lambda name: os.path.join(args.workdir, f"{stamp}_{name}")
    curves, summary, codes = {}, {}, {}
    codes["straight"] = launch(args.nproc, d("straight"), args.set)
    curves["straight"] = losses(d("straight"))
    if args.repeat:
        codes["repeat"] = launch(args.nproc, d("repeat"), args.set)
        curves["repeat"] = losses(d("repeat"))
    codes["stopped"] = launch(args.nproc, d("resumed"), args.set, stop_at=args.stop_at)
    stopped_at = max(losses(d("resumed")), default=0)
    codes["resumed"] = launch(args.nproc, d("resumed"), args.set)
    curves["resumed"] = losses(d("resumed"))
    for name in curves:
        if name != "straight":
            summary[name] = summarize(curves["straight"], curves[name], stopped_at if name == "resumed" else None)
    meta = report.environment()
    meta.update(nproc=args.nproc, overrides=args.set, exit_codes=codes, stopped_at=stopped_at)
    note = (f"{args.nproc} processes, SIGTERM once step {args.stop_at} was logged: exit {codes['stopped']} "
            f"(3 = stopped and saved) at step {stopped_at}; the same command again: exit {codes['resumed']}. "
            f"Overrides: {' '.join(args.set)}.")
    md = plot_and_write(args.out, args.tag or f"resume_x{args.nproc}", curves, summary, meta, note)
    print(md, end="")
    return 0 if codes["stopped"] == 3 and codes["resumed"] == 0 and codes["straight"] == 0 else 1


def cmd_compare(args) -> int:
    curves = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        curves[name] = losses(path)
    base = next(iter(curves))
    summary = {n: summarize(curves[base], c) for n, c in curves.items() if n != base}
    md = plot_and_write(args.out, args.tag or "compare", curves, summary, report.environment(), args.note)
    print(md, end="")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--nproc", type=int, default=2)
    r.add_argument("--stop-at", type=int, default=100)
    r.add_argument("--repeat", action="store_true", help="a second straight run: the run-to-run noise floor")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    r.add_argument("--workdir", default="/tmp/seqpar_curves")
    c = sub.add_parser("compare")
    c.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR")
    c.add_argument("--note", default="")
    for p in (r, c):
        p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
        p.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return cmd_resume(args) if args.cmd == "resume" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
