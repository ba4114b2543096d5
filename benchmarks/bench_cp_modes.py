"""Context-parallel modes side by side on GPUs: ring, Ulysses, all-gather, hybrid (Ulysses x ring) and torch's
``context_parallel``, with the cost model's prediction next to every measurement.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node=4 benchmarks/bench_cp_modes.py --out benchmarks/results \\
        [--seqs 32768,131072] [--world-sizes 2,4] [--kv-heads 32,8] [--kernels sdpa_cudnn,triton]
        [--ulysses-chunks 1,4] [--allgather-slices 1,4]   # same-run A/B of each mode's overlap setting

Causal fwd+bwd, bf16, B=1, H=32, D=128, zigzag shards, K/V heads ``--kv-heads`` (GQA un-expanded). Every rank
times ``iters`` steps with CUDA events (bench_ring's ``time_fwd_bwd``); the slowest rank's median counts.
Per-GPU TFLOP/s = 4*S^2*H*D * 0.5 * 3.5 / GPUs / time. Efficiency: per-GPU TFLOP/s / the same kernel on one
GPU over the whole sequence (``single`` rows, same run, same K/V heads). ``predicted``: the efficiency
``seqpar.parallel.cost`` predicts for the mode (a PREDICTION from the calibrated model; the hybrid's Ulysses
degree is the one measured). A world size w < N uses ranks 0..w-1; the hybrid splits w into U=2 (Ulysses
over consecutive ranks) x w/2 (ring). The all-gather mode cuts each causal run of queries into a fully visible
block and an aligned diagonal, so cuDNN and flash run it too (merged by lse). ``overlap``: the Ulysses rows'
head chunks and the all-gather rows' K/V slices (one row per value listed; the prediction uses the same). torch CP: its head-tail balancer with the
all-gather rotation, cuDNN, K/V heads = heads only. Writes ``cp_modes_<device>_x<N>_<date>.json/.md/.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from bench_ring import _status, bench_one, time_fwd_bwd  # noqa: E402
from seqpar.parallel import allgather_attention, hybrid_attention, ring_attention, ulysses_attention  # noqa: E402
import seqpar.parallel.cost as cost  # noqa: E402

HEADS, DIM = 32, 128
MODES = ("single", "ring", "ulysses", "allgather", "hybrid", "torch_cp")


def flops(seq: int) -> float:
    return 4.0 * seq * seq * HEADS * DIM * 0.5 * 3.5


def iters_for(seq: int) -> tuple:
    return (3, 10) if seq <= 32768 else (2, 5) if seq <= 131072 else (1, 2)


def single_gpu(kernel: str, seq: int, kv: int, device) -> float:
    """Milliseconds of the kernel alone on the whole sequence (the efficiency baseline)."""
    from seqpar.ops import attention

    gen = torch.Generator(device=device).manual_seed(seq + kv)
    mk = lambda h: torch.randn(1, seq, h, DIM, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(HEADS), mk(kv), mk(kv)
    dout = torch.randn_like(q)
    if kernel.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[kernel]
        t = lambda x: x.transpose(1, 2)
        with sdpa_kernel(be):
            fn = lambda: t(F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=kv != HEADS))
            return time_fwd_bwd(fn, (q, k, v), dout, *iters_for(seq))
    return time_fwd_bwd(lambda: attention(q, k, v, causal=True, backend=kernel), (q, k, v), dout, *iters_for(seq))


def run_mode(mode: str, kernel: str, w: int, seq: int, kv: int, device, groups: dict, overlap=None) -> float:
    local = seq // w
    gen = torch.Generator(device=device).manual_seed(seq + kv + w)
    mk = lambda h: torch.randn(1, local, h, DIM, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(HEADS), mk(kv), mk(kv)
    dout = torch.randn_like(q)
    common = dict(causal=True, layout="zigzag", backend=kernel)
    if mode == "ring":
        fn = lambda validate: ring_attention(q, k, v, group=groups["cp", w], validate=validate, **common)
    elif mode == "ulysses":
        fn = lambda validate: ulysses_attention(q, k, v, group=groups["cp", w], validate=validate, slices=overlap,
                                                **common)
    elif mode == "allgather":
        fn = lambda validate: allgather_attention(q, k, v, group=groups["cp", w], validate=validate, slices=overlap,
                                                  **common)
    else:  # hybrid: U=2 consecutive ranks (Ulysses) x w/2 (ring)
        ug, rg = groups["ulysses", w], groups["ring", w]
        fn = lambda validate: hybrid_attention(q, k, v, ulysses_group=ug, ring_group=rg, validate=validate, **common)
    fn(True)  # validate once (shapes, heads, mask), then time without the shape exchange
    return time_fwd_bwd(lambda: fn(False), (q, k, v), dout, *iters_for(seq))


def predicted(mode: str, kernel: str, w: int, seq: int, kv: int, overlap=None) -> float | None:
    """The cost model's efficiency for this row (None where it has no kernel rate or mode); ``overlap``: the
    Ulysses head chunks or all-gather slices the row ran with (None: the code's defaults)."""
    if mode in ("single", "torch_cp") or kernel not in cost.KERNEL_TFLOPS:
        return None
    s = cost.AttnShape(seq_len=seq, heads=HEADS, kv_heads=kv, head_dim=DIM)
    c = cost.Cluster(gpus=w, gpus_per_node=8, kernel=kernel)
    cal = cost.DEFAULT
    if overlap is not None and mode in ("ulysses", "allgather"):
        cal = dataclasses.replace(cal, **{"ulysses_chunks" if mode == "ulysses" else "slices": overlap})
    t = cost.mode_time(mode, s, c, cal, ulysses=2 if mode == "hybrid" else None)["time"]
    return cost.ideal_time(s, c) / t if math.isfinite(t) else 0.0


def make_groups(ws: int, sizes: list) -> dict:
    """Every group every rank must create (new_group is collective), keyed by (kind, w) -> this rank's group."""
    rank, out = dist.get_rank(), {}
    for w in sizes:
        cp = dist.new_group(list(range(w))) if w > 1 else None
        out["cp", w] = cp if rank < w else None
        if w >= 4 and w % 2 == 0:
            for u in range(w // 2):  # Ulysses over consecutive pairs
                g = dist.new_group([2 * u, 2 * u + 1])
                if rank in (2 * u, 2 * u + 1):
                    out["ulysses", w] = g
            for r in range(2):  # the ring over one rank per pair
                g = dist.new_group(list(range(r, w, 2)))
                if rank < w and rank % 2 == r:
                    out["ring", w] = g
    return out


def write(out_dir: str, meta: dict, rows: list) -> str:
    base = {(r["kernel"], r["seq"], r["kv_heads"]): r["tflops_per_gpu"] for r in rows
            if r["mode"] == "single" and r["error"] is None}
    for r in rows:
        kern = "sdpa_cudnn" if r["mode"] == "torch_cp" else r["kernel"]
        b = base.get((kern, r["seq"], r["kv_heads"]))
        r["efficiency"] = r["tflops_per_gpu"] / b if b and r["error"] is None else None
    name = report.stem("cp_modes", meta)
    pct = lambda key: (lambda r: None if r.get(key) is None else f"{100 * r[key]:.0f}%")
    cols = [("mode", "mode", ""), ("kernel", "kernel", ""), ("GPUs", "world_size", "d"),
            ("total tokens", lambda r: f"{r['seq'] // 1024}k", ""), ("KV heads", "kv_heads", "d"),
            ("overlap", lambda r: "-" if r.get("overlap") is None else str(r["overlap"]), ""),
            ("ms", "ms", ".1f"), ("TFLOP/s per GPU", "tflops_per_gpu", ".0f"), ("efficiency", pct("efficiency"), ""),
            ("predicted", pct("predicted"), ""), ("peak GiB", "peak_gib", ".1f"), ("error", "error", "")]
    png = report.line_plot(os.path.join(out_dir, name + ".png"),
                           report.group_series([r for r in rows if r["mode"] != "single"],
                                               lambda r: f"{r['mode']} {r['kernel']} ws={r['world_size']} "
                                                         f"kv={r['kv_heads']}" + ("" if r.get("overlap") is None
                                                                                  else f" x{r['overlap']}"),
                                               "seq", "efficiency"),
                           xlabel="total tokens", ylabel="per-GPU TFLOP/s / one GPU", title="context-parallel modes",
                           logx=True, hline=0.95)
    md = "\n".join(["# Context-parallel modes, causal fwd+bwd, bf16, B=1 H=32 D=128, zigzag", "",
                    report.meta_line(meta), "",
                    "efficiency: per-GPU TFLOP/s / the same kernel on one GPU (whole sequence, same KV heads, same "
                    "run). predicted: seqpar.parallel.cost's efficiency for the mode (a prediction). hybrid: "
                    "Ulysses over 2 consecutive ranks x ring over the rest.", "", report.markdown_table(rows, cols)])
    md += f"\n\n![{os.path.basename(png)}]({os.path.basename(png)})\n" if png else "\n"
    report.write_outputs(out_dir, name, meta, {"rows": rows}, md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--world-sizes", default="", help="default: 2, 4, ... up to every launched rank")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--kernels", default="sdpa_cudnn,triton")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--ulysses-chunks", default="1", help="Ulysses head chunks per rank, one row each (e.g. 1,4)")
    ap.add_argument("--allgather-slices", default="4", help="all-gather K/V head slices, one row each (e.g. 1,4)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    rank, ws = dist.get_rank(), dist.get_world_size()
    sizes = sorted({int(w) for w in args.world_sizes.split(",")} if args.world_sizes
                   else {min(2 ** i, ws) for i in range(1, ws.bit_length())} | {ws})
    groups = make_groups(ws, sizes)
    from torch.distributed.device_mesh import DeviceMesh

    meshes = {w: DeviceMesh("cuda", list(range(w))) for w in sizes if w > 1}
    meta = report.environment(local_rank)
    meta["gpus"] = ws
    modes, kernels = args.modes.split(","), args.kernels.split(",")
    overlaps = {"ulysses": [int(x) for x in args.ulysses_chunks.split(",")],
                "allgather": [int(x) for x in args.allgather_slices.split(",")]}
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        for kv in (int(x) for x in args.kv_heads.split(",")):
            todo = [("single", k, 1, None) for k in kernels if "single" in modes]
            todo += [(m, k, w, o) for w in sizes for m in ("ring", "ulysses", "allgather", "hybrid") if m in modes
                     for k in kernels if m != "hybrid" or (w >= 4 and w % 2 == 0) for o in overlaps.get(m, [None])]
            todo += [("torch_cp", "cudnn+allgather", w, None) for w in sizes if "torch_cp" in modes and kv == HEADS]
            for mode, kernel, w, overlap in todo:
                dist.barrier()
                torch.cuda.reset_peak_memory_stats()
                ms, err, peak = 0.0, None, 0.0
                if rank < w:
                    try:
                        if mode == "single":
                            ms = single_gpu(kernel, seq, kv, device) if rank == 0 else 0.0
                        elif mode == "torch_cp":
                            ms = bench_one("torch_cp", kernel, w, seq, device, groups["cp", w], *iters_for(seq),
                                           "head-tail", meshes[w])[0]
                        else:
                            ms = run_mode(mode, kernel, w, seq, kv, device, groups, overlap)
                        peak = torch.cuda.max_memory_allocated() / 2**30
                    except Exception as e:  # noqa: BLE001 -- one failing row (or an OOM) must not hide the others
                        ms, err = math.inf, _status(e)
                t = torch.tensor([ms, peak], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                ms, peak = t.tolist()
                if not math.isfinite(ms):
                    err = err or "failed on another rank"
                row = dict(mode=mode, kernel=kernel, world_size=w, seq=seq, kv_heads=kv, overlap=overlap,
                           ms=ms if math.isfinite(ms) else None, error=err, peak_gib=peak,
                           tflops_per_gpu=flops(seq) / w / (ms * 1e-3) / 1e12 if math.isfinite(ms) and ms > 0 else None,
                           predicted=predicted(mode, kernel, w, seq, kv, overlap))
                rows.append(row)
                if rank == 0:
                    print(row, flush=True)
                torch.cuda.empty_cache()
            if rank == 0:
                md = write(args.out, meta, rows)  # after every shape: a cut-short run keeps what it measured
    if rank == 0:
        print(md, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
