"""Training throughput on this machine's GPUs: tokens/s per GPU, MFU and peak memory per configuration.

    python benchmarks/bench_train.py --out benchmarks/results [--steps 8] [--runs cp2_64k,cp1_32k]

Each run is ``torchrun --standalone --nproc_per_node=<GPUs> train.py <overrides>`` (the real entry
point, FSDP2 + ring attention as configured); rank 0's ``metrics.jsonl`` gives per-step throughput,
averaged over the steps after ``--warmup``. Next to the measured peak memory stands the dry-run
estimate (:func:`seqpar.train.dry_run.estimate_memory`) of the same config. Writes
``train_<model>_<device>.json`` and ``.md`` into ``--out`` and prints the table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUNS = {
    # name: overrides (experiment presets in conf/experiment/)
    "cp2_64k": ["experiment=llama3-1b_cp2_64k"],
    "cp1_32k": ["experiment=llama3-1b_dp2_32k"],
    "cp2_64k_selective": ["experiment=llama3-1b_cp2_64k", "train.ac=selective"],
}
COMMON = ["checkpoint.every=0", "checkpoint.resume=false", "train.eval_every=0", "logging.log_every=1",
          "logging.progress=false", "data.max_bytes=8000000"]


def _device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device"] = torch.cuda.get_device_name(0) if info["gpus"] else "cpu"
    return info


def _run(name: str, overrides: list, steps: int, warmup: int, nproc: int, workdir: str, out_dir: str,
         timeout_s: float) -> dict:
    from seqpar.cli import load_config
    from seqpar.train.dry_run import estimate_memory

    run_dir = os.path.join(workdir, name)
    args = [*overrides, *COMMON, f"train.steps={steps}", f"logging.run_dir={run_dir}"]
    cfg = load_config(args)
    dp, cp = cfg.parallel.resolve(nproc)
    est = estimate_memory(cfg, dp, cp, bf16=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    t0 = time.time()
    with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    rec = {"name": name, "overrides": overrides, "dp": dp, "cp": cp, "seq_len": cfg.train.seq_len,
           "tokens_per_step": cfg.train.seq_len * cfg.train.batch_size * dp, "ac": cfg.train.ac,
           "ffn_chunk": cfg.train.ffn_chunk, "fsdp": cfg.parallel.fsdp, "returncode": rc,
           "wall_s": round(time.time() - t0, 1), "est_mem_gib": round(est["total"] / 2**30, 2)}
    path = os.path.join(run_dir, "metrics.jsonl")
    steps_log = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    steps_log = [s for s in steps_log if "tokens_per_s" in s]
    timed = [s for s in steps_log if s["step"] > warmup]
    rec["losses"] = [round(s["loss"], 4) for s in steps_log]
    if timed:
        rec.update(
            steps_timed=len(timed),
            tokens_per_s_per_gpu=round(statistics.mean(s["tokens_per_s_per_device"] for s in timed), 1),
            tflops_per_gpu=round(statistics.mean(s["tflops_per_device"] for s in timed), 1),
            mfu=round(statistics.mean(s["mfu"] for s in timed), 4) if timed[0]["mfu"] is not None else None,
            step_time_s=round(statistics.mean(rec["tokens_per_step"] / s["tokens_per_s"] for s in timed), 3),
            peak_mem_gib=round(max(s["peak_mem_gib"] for s in steps_log), 2))
    return rec


def _markdown(info: dict, runs: list) -> str:
    lines = [f"# Training throughput: llama3-1b shape on {info['gpus']} x {info['device']}", "",
             f"torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, {info['date']}. bf16 compute, "
             "fp32 master weights/grad reduce (FSDP2), AdamW, stdlib corpus (byte tokenizer), batch 1 sequence per "
             "dp rank, attention_backend=auto. MFU counts 6N + causal attention (6 L d S) FLOPs per token against "
             "989 TFLOP/s dense bf16; recompute is not counted. Peak memory: max over ranks of "
             "torch.cuda.max_memory_allocated; estimate: `train.py --dry-run` of the same config.", "",
             "| run | mesh | seq_len | ac | ffn_chunk | tokens/s/GPU | TFLOP/s/GPU | MFU | step (s) | peak mem (GiB) | estimate (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "tokens_per_s_per_gpu" not in r:
            lines.append(f"| {r['name']} | dp={r['dp']} cp={r['cp']} | {r['seq_len']} | {r['ac']} | {r['ffn_chunk']} | "
                         f"failed (rc {r['returncode']}) | | | | | {r['est_mem_gib']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['name']} | dp={r['dp']} cp={r['cp']} | {r['seq_len']:,} | {r['ac']} | {r['ffn_chunk']} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']} | {mfu} | {r['step_time_s']} | "
                     f"{r['peak_mem_gib']} | {r['est_mem_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    ap.add_argument("--nproc", type=int, default=0, help="processes per run (0: every visible GPU)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    ap.add_argument("--workdir", default="/tmp/seqpar_bench")
    ap.add_argument("--tag", default="", help="file tag, e.g. h200x2 (default: from the GPU name and count)")
    args = ap.parse_args()
    info = _device_info()
    nproc = args.nproc or max(1, info["gpus"])
    tag = args.tag or (info["device"].split()[-1].lower() + f"x{nproc}" if info["gpus"] else "cpu")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for name in args.runs.split(","):
        runs.append(_run(name, RUNS[name], args.steps, args.warmup, nproc, args.workdir, args.out, args.timeout))
        result = {**info, "nproc": nproc, "steps": args.steps, "warmup": args.warmup, "runs": runs}
        stem = os.path.join(args.out, f"train_llama3-1b_{tag}")
        with open(stem + ".json", "w") as f:  # rewritten after every run: partial results survive a timeout
            json.dump(result, f, indent=2)
        md = _markdown(info, runs)
        with open(stem + ".md", "w") as f:
            f.write(md)
    print(md, end="")
    return 0 if all("tokens_per_s_per_gpu" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
