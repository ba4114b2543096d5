"""torchtitan as the same-run peer of ``bench_train.py`` (``--peer torchtitan``).

The peer is the offline torchtitan 0.3.0 bundle (``../shared/peers/torchtitan``, or a copy under ``.peers/``
that travels to the GPU machine): Llama-3.2-1B shape, its own context parallelism (FlexAttention, all-gathered
K/V, head-tail load balance), FSDP bf16 mixed precision, full activation checkpointing, synthetic tokens.
:func:`run` trains it on the same mesh (dp x cp), sequence length and number of steps as the seqpar run next
to it, in a fresh log folder, and reads torchtitan's own step lines back (:func:`parse_steps`).

Only what both sides measure the same way is compared: tokens/s per GPU (torchtitan divides the global
batch's tokens by step time and GPUs, as seqpar does). TFLOP/s and MFU in the row are recomputed with
seqpar's formula (:meth:`seqpar.models.llama.Llama.flops_per_token`, causal half) from torchtitan's
tokens/s, because torchtitan counts full (not causal-halved) attention; its own figures stay in the row
as ``tt_tflops`` / ``tt_mfu``. Its memory is the peak *reserved* (ours: peak allocated).
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_CANDIDATES = (os.path.join(ROOT, ".peers", "torchtitan"), os.path.join(ROOT, "..", "shared", "peers", "torchtitan"))
# torchtitan's "1B" llama3 flavor (the only model its bundle config trains)
SHAPE = {"vocab_size": 128256, "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 8192}
STEP_RE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+(?:grad_norm:\s*(?P<grad_norm>\S+)\s+)?"
    r"memory:\s*(?P<mem>[\d.]+)GiB\((?P<mem_pct>[\d.]+)%\)\s+tps:\s*(?P<tps>[\d,]+)\s+"
    r"tflops:\s*(?P<tflops>[\d,.]+)\s+mfu:\s*(?P<mfu>[\d.]+%|N/A)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def find_bundle(path: str = "") -> str:
    """The bundle folder: ``path`` if given, else the first of ``.peers/torchtitan`` and
    ``../shared/peers/torchtitan`` that holds ``run.sh``. Raises FileNotFoundError naming ``--peer-bundle``."""
    for cand in ([path] if path else BUNDLE_CANDIDATES):
        if os.path.isfile(os.path.join(cand, "run.sh")):
            return os.path.abspath(cand)
    where = path or " or ".join(BUNDLE_CANDIDATES)
    raise FileNotFoundError(f"no torchtitan bundle (run.sh) at {where}; pass --peer-bundle=<folder of the bundle> "
                            "or copy ../shared/peers/torchtitan to .peers/torchtitan")


def unsupported(cfg, nproc: int) -> Optional[str]:
    """Why the bundle cannot train the same thing as this seqpar config, or None when it can."""
    m = cfg.model
    diff = [k for k, v in SHAPE.items() if getattr(m, k, None) != v]
    if diff or m.arch != "llama" or m.attention != "dense":
        return f"model {m.name} is not torchtitan's llama3 1B shape (differs: {', '.join(diff) or 'architecture'})"
    if m.window or m.sinks or not m.causal:
        return "the mask is not plain causal (model.window / model.sinks / model.causal)"
    if cfg.data.doc_mask:
        return "packed documents (data.doc_mask=true): torchtitan trains each sequence as one causal document"
    if cfg.train.batch_size != 1 or cfg.train.grad_accum != 1:
        return "batch_size and grad_accum must be 1 (the bundle trains local batch 1)"
    dp, cp = cfg.parallel.resolve(nproc)
    if dp * cp != nproc or cfg.train.seq_len % (2 * cp):
        return f"mesh dp={dp} x cp={cp} on {nproc} GPUs with seq_len {cfg.train.seq_len} (needs 2*cp | seq_len)"
    return None


def parse_steps(text: str) -> list:
    """torchtitan's per-step log lines -> ``[{step, loss, grad_norm, mem_gib, tps, tflops, mfu}]`` (a step
    logged twice keeps its last line; colours and rank prefixes are ignored)."""
    steps = {}
    for line in text.splitlines():
        m = STEP_RE.search(ANSI.sub("", line))
        if not m:
            continue
        g = m.groupdict()
        steps[int(g["step"])] = {
            "step": int(g["step"]), "loss": float(g["loss"]),
            "grad_norm": float(g["grad_norm"]) if g["grad_norm"] else None,
            "mem_gib": float(g["mem"]), "tps": float(g["tps"].replace(",", "")),
            "tflops": float(g["tflops"].replace(",", "")),
            "mfu": None if g["mfu"] == "N/A" else float(g["mfu"].rstrip("%")) / 100}
    return [steps[k] for k in sorted(steps)]


def flops_per_token(model_cfg, seq_len: int) -> float:
    """seqpar's training FLOPs per token for this shape (causal half of attention), built on the meta device."""
    import torch

    from seqpar.models.llama import Llama

    with torch.device("meta"):
        return Llama(model_cfg).flops_per_token(seq_len)


def summarize(steps: list, warmup: int, *, seq_len: int, cp: int, flops: float, peak_tflops: float) -> dict:
    """Averages over the steps after ``warmup``: tokens/s/GPU, seqpar-formula TFLOP/s and MFU, torchtitan's
    own TFLOP/s and MFU, step time (``seq_len / (tps * cp)``: one sequence per dp rank) and peak memory."""
    timed = [s for s in steps if s["step"] > warmup]
    rec = {"losses": [round(s["loss"], 4) for s in steps], "steps": [s["step"] for s in steps]}
    if not timed:
        return rec
    tps = statistics.mean(s["tps"] for s in timed)
    rec.update(steps_timed=len(timed), tokens_per_s_per_gpu=round(tps, 1), tflops_per_gpu=round(flops * tps / 1e12, 1),
               mfu=round(flops * tps / (peak_tflops * 1e12), 4) if peak_tflops else None,
               step_time_s=round(statistics.mean(seq_len / (s["tps"] * cp) for s in timed), 3),
               peak_mem_gib=round(max(s["mem_gib"] for s in steps), 2),
               tt_tflops=round(statistics.mean(s["tflops"] for s in timed), 1),
               tt_mfu=(round(statistics.mean(s["mfu"] for s in timed), 4) if timed[0]["mfu"] is not None else None))
    return rec


def run(bundle: str, name: str, cfg, *, nproc: int, steps: int, warmup: int, out_dir: str, timeout_s: float,
        peak_tflops: float, python: str, dry_run: bool = False) -> dict:
    """Train the bundle on ``cfg``'s mesh and sequence; the row for ``bench_train``'s table (status ``ok``,
    ``timeout``, ``OOM``, the exit code, or ``dry run`` after the bundle's pre-flight only)."""
    dp, cp = cfg.parallel.resolve(nproc)
    seq = cfg.train.seq_len
    log_dir = os.path.join(out_dir, f"{name}_logs")
    os.makedirs(log_dir, exist_ok=False)  # fresh: never reads another run's lines
    env = {**os.environ, "NGPU": str(nproc), "CP": str(cp), "DP": str(dp), "SEQ": str(seq), "STEPS": str(steps),
           "OUT": log_dir, "PYTHON": python, "DRY_RUN": "1" if dry_run else "0"}
    t0 = time.time()
    driver = os.path.join(log_dir, "run.log")
    with open(driver, "w") as log:
        try:
            rc = subprocess.run(["bash", os.path.join(bundle, "run.sh")], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = "".join(open(os.path.join(log_dir, f), errors="replace").read()
                   for f in sorted(os.listdir(log_dir)) if f.startswith("tt_") and f.endswith(".log"))
    all_text = text + open(driver, errors="replace").read()
    oom = bool(re.search(r"out of memory|OutOfMemoryError", all_text, re.I))
    if rc != 0:
        status = "OOM" if oom else str(rc)
    elif not dry_run:
        status = "ok"
    else:
        status = "dry run" if "CONFIG_OK" in text else "no pre-flight"
    rec = {"name": name, "model": "llama3-1b (torchtitan 0.3.0)", "peer": "torchtitan", "nproc": nproc, "dp": dp,
           "cp": cp, "seq_len": seq, "tokens_per_step": seq * dp, "ac": "full", "ffn_chunk": None, "compile": False,
           "fsdp": "dp_cp", "returncode": rc, "status": status, "wall_s": round(time.time() - t0, 1),
           "est_mem_gib": None, "log_dir": log_dir}
    if not dry_run:
        rec.update(summarize(parse_steps(text), warmup, seq_len=seq, cp=cp, flops=flops_per_token(cfg.model, seq),
                             peak_tflops=peak_tflops))
    return rec
