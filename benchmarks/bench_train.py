"""Training throughput on this machine's GPUs: tokens/s per GPU, MFU and peak memory, weak and strong scaling.

    # scaling (default): llama3-1b and llama3-8b shapes over world sizes 1, 2, 4, ... up to every GPU
    python benchmarks/bench_train.py --out benchmarks/results --models llama3-1b,llama3-8b \\
        --scaling weak,strong --tokens-per-gpu 32768 --seq-len 131072
    # named runs (the earlier behaviour): experiment presets in conf/experiment/
    python benchmarks/bench_train.py --runs cp2_64k,cp1_32k --steps 6 --tag h200x2
    # with the same-run peer: torchtitan's context parallel on the same mesh, sequence and steps
    python benchmarks/bench_train.py --models llama3-1b --scaling strong --world-sizes 2 --seq-len 65536 --peer torchtitan

Each run is ``torchrun --standalone --nproc_per_node=<w> train.py <overrides>`` (the real entry point,
FSDP2 over all ranks + ring attention over ``cp = w`` ranks, batch 1); rank 0's ``metrics.jsonl``
gives per-step throughput, averaged over the steps after ``--warmup``. Every run trains in a fresh
directory under ``--workdir`` and reads only the records it logged (:func:`fresh_run_dir`, :func:`own_records`).

- weak scaling: fixed tokens per GPU (``--tokens-per-gpu``); one sequence of ``w * tokens_per_gpu``
  tokens sharded over the ring of ``w`` GPUs. Attention FLOPs per token grow with the sequence, so
  compare MFU (tokens/s/GPU falls by design).
- strong scaling: fixed total sequence (``--seq-len``) over ``w`` GPUs.

MFU (seqpar.train.metrics): per-token FLOPs = 6 * N_matmul + 6 * n_layers * dim * seq_len (causal
attention, fwd+bwd; recompute not counted), x tokens/s / GPUs / the datasheet dense bf16 peak (989
TFLOP/s for H100/H200). ``--ac auto`` picks per run the least recompute (no checkpointing with a plain,
then a blockwise MLP; selective; full) whose dry-run estimate fits in 90% of the GPU, and the table says
which. ``--compile`` sets ``train.compile`` per run (fused norms, RoPE and MLP; seqpar.models.compile): ``on``
(the default, what ``train.compile=auto`` gives a CUDA run), ``off``, or ``off,on`` for both.
Next to the measured peak memory stands the dry-run estimate (:func:`seqpar.train.dry_run.estimate_memory`).
Writes JSON, markdown and a PNG (MFU vs GPUs) into ``--out`` and prints the table last.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_torchtitan  # noqa: E402
import report  # noqa: E402

RUNS = {
    # name: overrides (experiment presets in conf/experiment/)
    "cp2_64k": ["experiment=llama3-1b_cp2_64k"],
    "cp1_32k": ["experiment=llama3-1b_dp2_32k"],
    "cp2_64k_selective": ["experiment=llama3-1b_cp2_64k", "train.ac=selective"],
}
COMMON = ["checkpoint.every=0", "checkpoint.resume=false", "train.eval_every=0", "logging.log_every=1",
          "logging.progress=false"]
# Memory features per model shape for the scaling runs (ac is chosen per run with --ac auto).
FEATURES = {"llama3-1b": ["train.ffn_chunk=8192", "train.loss_chunk=4096"],
            "llama3-8b": ["train.ffn_chunk=4096", "train.loss_chunk=4096"]}


def scaling_runs(models: list, modes: list, world_sizes: list, tokens_per_gpu: int, seq_len: int,
                 compile_modes: tuple = (False,), doc_mask: bool = False) -> dict:
    """``{name: (nproc, overrides)}`` for weak (fixed tokens per GPU) and strong (fixed total) scaling,
    once per ``compile_modes`` entry (``train.compile``; compiled runs are named ``..._compile_x<w>``).
    A strong run that repeats a weak run's exact configuration is not run twice. ``doc_mask`` off (the
    default) trains every sequence as one causal document: the long-context attention cost being measured."""
    runs, seen = {}, set()
    for model in models:
        for comp in compile_modes:
            for mode in modes:
                for w in world_sizes:
                    s = tokens_per_gpu * w if mode == "weak" else seq_len
                    ov = [f"model={model}", *FEATURES.get(model, []), f"parallel.cp={w}", "parallel.dp=1",
                          "parallel.fsdp=dp_cp", "train.batch_size=1", f"train.seq_len={s}",
                          f"data.max_bytes={max(8_000_000, 6 * s)}", f"train.compile={str(comp).lower()}",
                          f"data.doc_mask={str(doc_mask).lower()}"]
                    if (w, tuple(ov)) in seen:
                        continue
                    seen.add((w, tuple(ov)))
                    runs[f"{model}_{mode}{'_compile' if comp else ''}_x{w}"] = (w, ov)
    return runs


def choose_memory(cfg, dp: int, cp: int, gpu_gib: float):
    """Least recompute whose dry-run estimate fits in 90% of the GPU: ``(ac, ffn_chunk, estimate)``.

    Tried in order: no checkpointing and a plain MLP; no checkpointing and the blockwise MLP (recomputes
    one MLP forward); selective; full (the fallback when nothing fits). The blockwise chunk is the
    config's ``train.ffn_chunk`` (8192 when it is 0)."""
    import dataclasses

    from seqpar.train.dry_run import estimate_memory

    chunk = cfg.train.ffn_chunk or 8192
    for ac, ffn in (("none", 0), ("none", chunk), ("selective", chunk), ("full", chunk)):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ac=ac, ffn_chunk=ffn))
        est = estimate_memory(c, dp, cp, bf16=True)
        if est["total"] <= 0.9 * gpu_gib * 2**30:
            return ac, ffn, est
    return "full", chunk, est


def fresh_run_dir(workdir: str, name: str) -> str:
    """A new, empty ``<workdir>/<name>-<UTC time>-<pid>[-k]`` for one benchmark run: never an old run's
    directory, whose ``metrics.jsonl`` (appended to, or resumed from, by the trainer) would mix its steps
    into this run's averages (issue 17: a 128k run after a 64k one reported the pair's mean)."""
    base = os.path.join(workdir, f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
    for k in range(1000):
        path = base if k == 0 else f"{base}-{k}"
        try:
            os.makedirs(path)  # exist_ok=False: an existing directory is skipped, never reused
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no fresh run directory under {workdir} for {name}")


def own_records(path: str, since: float, steps: int) -> list:
    """The step records of ``metrics.jsonl`` written by THIS run: logged at or after ``since`` (the time the
    run was started; the logger stamps every record) with a step in 1..``steps``, each step once. Records
    of another run in the same file are left out; a step logged twice after ``since`` (two runs writing
    at once) raises ValueError instead of being averaged in silently."""
    from seqpar.train.metrics import read_records

    recs = [r for _, r in read_records(path)
            if "tokens_per_s" in r and r.get("time", 0) >= since and 1 <= r.get("step", 0) <= steps]
    seen = [r["step"] for r in recs]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{path}: steps logged more than once since this run started ({sorted(seen)}); "
                         "another run writes to the same directory")
    return recs


def summarize(steps_log: list, warmup: int, tokens_per_step: int) -> dict:
    """Averages over the steps after ``warmup`` (throughput, TFLOP/s, MFU, step time) and the peak memory."""
    timed = [s for s in steps_log if s["step"] > warmup]
    rec = {"losses": [round(s["loss"], 4) for s in steps_log], "steps": [s["step"] for s in steps_log]}
    if timed:
        rec.update(
            steps_timed=len(timed),
            tokens_per_s_per_gpu=round(statistics.mean(s["tokens_per_s_per_device"] for s in timed), 1),
            tflops_per_gpu=round(statistics.mean(s["tflops_per_device"] for s in timed), 1),
            mfu=round(statistics.mean(s["mfu"] for s in timed), 4) if timed[0]["mfu"] is not None else None,
            step_time_s=round(statistics.mean(tokens_per_step / s["tokens_per_s"] for s in timed), 3),
            peak_mem_gib=round(max(s["peak_mem_gib"] for s in steps_log), 2))
    return rec


def _run(name: str, overrides: list, steps: int, warmup: int, nproc: int, workdir: str, out_dir: str,
         timeout_s: float, ac: str = "", gpu_gib: float = 0.0) -> dict:
    from seqpar.cli import load_config
    from seqpar.train.dry_run import estimate_memory

    run_dir = fresh_run_dir(workdir, name)
    args = [*overrides, *COMMON, f"train.steps={steps}", f"logging.run_dir={run_dir}"]
    cfg = load_config(args)
    dp, cp = cfg.parallel.resolve(nproc)
    if ac == "auto":
        chosen, ffn, est = choose_memory(cfg, dp, cp, gpu_gib)
        args += [f"train.ac={chosen}", f"train.ffn_chunk={ffn}"]
        cfg = load_config(args)
    elif ac:
        args.append(f"train.ac={ac}")
        cfg = load_config(args)
    est = estimate_memory(cfg, dp, cp, bf16=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    t0 = time.time()  # own_records keeps only what is logged from now on
    log_path = os.path.join(out_dir, f"{name}.log")
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    oom = bool(re.search(r"out of memory|OutOfMemoryError", open(log_path, errors="replace").read(), re.I))
    rec = {"name": name, "model": cfg.model.name, "overrides": overrides, "nproc": nproc, "dp": dp, "cp": cp,
           "seq_len": cfg.train.seq_len, "tokens_per_step": cfg.train.seq_len * cfg.train.batch_size * dp,
           "ac": cfg.train.ac, "ffn_chunk": cfg.train.ffn_chunk, "compile": cfg.train.compile,
           "fsdp": cfg.parallel.fsdp, "returncode": rc,
           "status": "ok" if rc == 0 else "OOM" if oom else str(rc), "wall_s": round(time.time() - t0, 1),
           "est_mem_gib": round(est["total"] / 2**30, 2)}
    rec["run_dir"], rec["args"] = run_dir, args
    try:
        rec.update(summarize(own_records(os.path.join(run_dir, "metrics.jsonl"), t0, steps), warmup,
                             rec["tokens_per_step"]))
    except ValueError as e:  # records of two runs: the row fails loudly, the benchmark goes on
        rec.update(status="mixed records", error=str(e))
    return rec


PEER_SKIPPED = ("not comparable", "dry run")


def _peer_run(bundle: str, ours: dict, nproc: int, args) -> dict:
    """The peer's row on the mesh, sequence and steps of ``ours`` (or why it cannot train the same thing)."""
    from seqpar.cli import load_config
    from seqpar.train.metrics import peak_tflops

    import torch

    name = f"{ours['name']}_torchtitan"
    cfg = load_config(ours["args"])
    why = peer_torchtitan.unsupported(cfg, nproc)
    if why:
        return {"name": name, "peer": "torchtitan", "nproc": nproc, "dp": ours["dp"], "cp": ours["cp"],
                "seq_len": ours["seq_len"], "status": "not comparable", "why": why}
    peak = peak_tflops(torch.device("cuda")) if torch.cuda.is_available() else 0.0
    return peer_torchtitan.run(bundle, name, cfg, nproc=nproc, steps=args.steps, warmup=args.warmup, out_dir=args.out,
                               timeout_s=args.peer_timeout, peak_tflops=peak, python=sys.executable,
                               dry_run=args.peer_dry_run)


def markdown(info: dict, runs: list) -> str:
    """The results table with the measurement conditions above it."""
    cols = [("run", "name", ""), ("mesh", lambda r: f"dp={r['dp']} cp={r['cp']}", ""), ("seq_len", "seq_len", ",d"),
            ("ac", "ac", ""), ("ffn_chunk", "ffn_chunk", ""),
            ("compile", lambda r: "yes" if r.get("compile") else "no", ""),
            ("tokens/s/GPU", lambda r: r.get("tokens_per_s_per_gpu", r["status"] if r["status"] in PEER_SKIPPED
                                             else f"failed ({r['status']})"), ",.0f"),
            ("TFLOP/s/GPU", "tflops_per_gpu", ".1f"),
            ("MFU", lambda r: None if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", ""),
            ("step (s)", "step_time_s", ".3f"), ("peak mem (GiB)", "peak_mem_gib", ".2f"),
            ("estimate (GiB)", "est_mem_gib", ".2f")]
    lines = [f"# Training throughput on {info['gpus']} x {info['device']}", "", report.meta_line(info), "",
             "bf16 compute, fp32 master weights/grad reduce (FSDP2 over all ranks), AdamW, stdlib corpus (byte "
             "tokenizer), batch 1 sequence per dp rank, attention_backend=auto. MFU = (6 N_matmul + 6 L d S) FLOPs "
             "per token x tokens/s / GPUs / datasheet dense bf16 peak (989 TFLOP/s on H100/H200); recompute is not "
             "counted. Peak memory: max over ranks of torch.cuda.max_memory_allocated; estimate: `train.py "
             "--dry-run` of the same config.", "", report.markdown_table(runs, cols)]
    peers = [r for r in runs if r.get("peer")]
    if peers:
        lines += ["", "`*_torchtitan` rows: torchtitan 0.3.0 (offline bundle) on the same mesh, sequence and steps: its "
                  "context parallel (FlexAttention, all-gathered K/V, head-tail balance), full AC, synthetic tokens. "
                  "Its TFLOP/s and MFU here use seqpar's formula on its tokens/s (its own, counting full attention, "
                  "are in the JSON as tt_tflops / tt_mfu); its memory is peak reserved, not allocated.", ""]
        ours = {r["name"]: r for r in runs if not r.get("peer")}
        for p in peers:
            base = ours.get(p["name"][: -len("_torchtitan")], {})
            if "tokens_per_s_per_gpu" in p and "tokens_per_s_per_gpu" in base:
                lines.append(f"- {base['name']}: seqpar / torchtitan tokens/s = "
                             f"{base['tokens_per_s_per_gpu'] / p['tokens_per_s_per_gpu']:.2f}x")
            elif p.get("why"):
                lines.append(f"- {base.get('name', p['name'])}: no peer row: {p['why']}")
    return "\n".join(lines) + "\n"


def plot(path: str, runs: list):
    """MFU (%) against GPUs, one line per model and scaling mode (runs named <model>_<mode>_x<w>)."""
    pts = [r for r in runs if re.search(r"_(weak|strong)(_compile)?_x\d+$", r["name"])]
    series = report.group_series(
        [{**r, "mfu_pct": 100 * r["mfu"] if r.get("mfu") is not None else None} for r in pts],
        lambda r: r["name"].rsplit("_x", 1)[0], "nproc", "mfu_pct")
    return report.line_plot(path, series, xlabel="GPUs", ylabel="MFU (%)", title="training MFU, weak and strong scaling",
                            hline=45.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--runs", default="", help=f"named runs ({','.join(RUNS)}); when given, no scaling runs")
    ap.add_argument("--models", default="llama3-1b,llama3-8b")
    ap.add_argument("--scaling", default="weak,strong")
    ap.add_argument("--world-sizes", default="", help="e.g. 1,2,4,8 (default: 1, 2, 4, ... up to every GPU)")
    ap.add_argument("--tokens-per-gpu", type=int, default=32768, help="weak scaling")
    ap.add_argument("--seq-len", type=int, default=131072, help="strong scaling: total sequence")
    ap.add_argument("--ac", default="auto", help="none | selective | full | auto (scaling runs; auto also picks "
                    "train.ffn_chunk: the least recompute that fits)")
    ap.add_argument("--compile", default="on", help="train.compile for the scaling runs: on (default, as train.compile="
                    "auto on CUDA) | off | off,on (both)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    ap.add_argument("--nproc", type=int, default=0, help="processes per named run (0: every visible GPU)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    ap.add_argument("--workdir", default="/tmp/seqpar_bench", help="run directories, one new per run")
    ap.add_argument("--tag", default="", help="file tag, e.g. h200x2 (default: device and GPU count)")
    ap.add_argument("--doc-mask", action="store_true",
                    help="scaling runs with data.doc_mask=true (packed documents; default: one causal sequence)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra train.py overrides for every run (e.g. parallel.cp_comm=ulysses)")
    ap.add_argument("--peer", default="", choices=["", "torchtitan"],
                    help="also train the peer on each run's mesh, sequence and steps (llama3-1b, one causal "
                         "sequence); its row follows seqpar's (peer_torchtitan.py)")
    ap.add_argument("--peer-bundle", default="", help="the torchtitan bundle folder (default: .peers/torchtitan, "
                    "then ../shared/peers/torchtitan)")
    ap.add_argument("--peer-timeout", type=float, default=540.0, help="seconds per peer run (first compile and "
                    "autotune of its FlexAttention take 2-4 minutes)")
    ap.add_argument("--peer-dry-run", action="store_true", help="peer: install and pre-flight only (no GPU needed)")
    args = ap.parse_args()
    bundle = peer_torchtitan.find_bundle(args.peer_bundle) if args.peer else ""
    info = report.environment()
    gpus = max(1, info["gpus"])
    gpu_gib = 140.0
    if info["gpus"]:
        import torch

        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if args.runs:
        nproc = args.nproc or gpus
        todo = {n: (nproc, RUNS[n]) for n in args.runs.split(",")}
        ac, prefix = "", "train_llama3-1b"
    else:
        sizes = ([int(w) for w in args.world_sizes.split(",")] if args.world_sizes
                 else sorted({min(2 ** i, gpus) for i in range(gpus.bit_length())} | {gpus}))
        modes = tuple({"off": False, "on": True}[c] for c in args.compile.split(","))
        todo = scaling_runs(args.models.split(","), args.scaling.split(","), sizes, args.tokens_per_gpu, args.seq_len,
                            modes, args.doc_mask)
        ac, prefix = args.ac, "train_scaling"
    tag = args.tag or report.stem("", info, max(n for n, _ in todo.values()))[1:]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{prefix}_{tag}")
    runs = []
    for name, (nproc, overrides) in todo.items():
        runs.append(_run(name, [*overrides, *args.set], args.steps, args.warmup, nproc, args.workdir, args.out, args.timeout,
                         ac, gpu_gib))
        if bundle:
            runs.append(_peer_run(bundle, runs[-1], nproc, args))
        md = markdown(info, runs)
        # Rewritten after every run: partial results survive a timeout of the whole benchmark.
        report.write_outputs(args.out, os.path.basename(stem), info,
                             {"steps": args.steps, "warmup": args.warmup, "runs": runs}, md)
    png = plot(stem + ".png", runs)
    if png:
        md += f"\n![MFU vs GPUs]({os.path.basename(png)})\n"
        with open(stem + ".md", "w") as f:
            f.write(md)
    print(md, end="")
    return 0 if all("tokens_per_s_per_gpu" in r or r["status"] in PEER_SKIPPED for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
