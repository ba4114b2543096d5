"""Tile sweep of seqpar's Triton attention kernels on one GPU, kernel by kernel, next to cuDNN in the same run.

The autotuner only chooses among the few tiles listed per head_dim (``FWD_CONFIGS``, ``DKDV_CONFIGS``,
``DQ_CONFIGS``). This times every tile of a wider grid (``GRID``: the listed tiles plus one-warpgroup tiles small
enough for two programs per SM) with the tile pinned, and reads each kernel's own device time from the CUDA
profiler, so the lists can be re-pruned from measurements. Causal, bf16, B*S = --tokens, [B, S, H, D].

    python benchmarks/bench_tiles.py --dims 128,64 --seq 16384 --precompile 12 --out benchmarks/results

TFLOP/s per kernel count that kernel's own matmuls (forward 2, dK/dV 4, dQ 3, each 2*Sq*Sk*D per head, halved
when causal); the fwd+bwd rows use FlashAttention's convention (3.5x the forward's FLOPs) for the composites
"listed" (the first listed tile of each kernel, what small problems run), "best" (the fastest tile of each
kernel) and for the end-to-end autotuned Triton call and cuDNN. The sweep runs dQ in its own kernel at every
head_dim (the end-to-end call keeps its default, atomics at head_dim <= 64). Writes ``tiles_<date>/tiles.{json,md}``
under --out (a fresh directory per run) and prints the table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

# benchmarks/ is this script's directory
from bench_attention import flops as attention_flops, inputs, step_fn, time_ms  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages). dK/dV programs own BLOCK_N keys; forward and dQ programs own BLOCK_M queries.
GRID = {
    "fwd": {128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2),
                  (128, 64, 8, 4)],
            64: [(128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)]},
    "dkdv": {128: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3),
                   (64, 64, 8, 2), (128, 64, 8, 2)],
             64: [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4),
                  (128, 64, 8, 3)]},
    "dq": {128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 4),
                 (128, 128, 8, 2)],
           64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3)]},
    # dK/dV with dQ added by the same kernel (dq_mode="atomic"; TMA reduce-add in the TMA variant)
    "dkdv_atomic": {128: [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3),
                          (32, 64, 4, 2)],
                    64: [(64, 128, 8, 3), (64, 64, 4, 4), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3)]},
}
MATMULS = {"fwd": 2, "dkdv": 4, "dq": 3, "dkdv_atomic": 5}
COMPOSITES = {"dQ kernel": ("fwd", "dkdv", "dq"), "atomic dQ": ("fwd", "dkdv_atomic")}
KERNEL_NAMES = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq", "pre": "_attn_bwd_preprocess"}


def tables():
    from seqpar.ops.attention.triton import bwd, bwd_dq, fwd
    return {"fwd": fwd.FWD_CONFIGS, "dkdv": bwd.DKDV_CONFIGS, "dq": bwd_dq.DQ_CONFIGS,
            "dkdv_atomic": bwd.DKDV_CONFIGS}


def tasks(dims):
    """(kernel, head_dim, tile, tma) for every tile of the grid; dK/dV in both load variants."""
    for d in dims:
        for kernel, grid in GRID.items():
            for tile in grid[d]:
                for tma in ((False, True) if kernel.startswith("dkdv") else (None,)):
                    yield kernel, d, tile, tma


@contextlib.contextmanager
def pinned(kernel: str, d: int, tile: tuple):
    """Make ``tile`` the only listed config of ``kernel`` at head_dim ``d`` (untuned launches run it)."""
    from seqpar.ops.attention.triton.common import _cfg
    table = tables()[kernel]
    saved = table[d]
    table[d] = [_cfg(*tile)]
    try:
        yield
    finally:
        table[d] = saved


def pass_fn(kernel, q, k, v, dout, tma):
    """The untuned call that runs ``kernel`` (forward, or forward once + the backward in a loop)."""
    from seqpar.ops.attention.mask import LocalMask
    from seqpar.ops.attention.triton import function as tri
    mask = LocalMask(causal=True)
    if kernel == "fwd":
        return lambda: tri.forward(q, k, v, mask, autotune=False)
    out, lse = tri.forward(q, k, v, mask, autotune=False)
    mode = "atomic" if kernel == "dkdv_atomic" else "kernel"
    return lambda: tri.backward(dout, q, k, v, out, lse, mask, dq_mode=mode, tma=tma, autotune=False)


def kernel_ms(fn, target_s: float = 1.0) -> dict:
    """Mean device milliseconds per call of each seqpar kernel that ``fn`` launches (CUDA profiler), over
    enough calls to fill ``target_s`` after a warm-up call (sustained clocks, not a burst)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    iters = max(5, min(50, int(target_s / max(time.perf_counter() - t0, 1e-4))))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        for short, name in KERNEL_NAMES.items():
            if evt.key.startswith(name) and (short != "fwd" or not evt.key.startswith("_attn_fwd_")):
                out[short] = out.get(short, 0.0) + getattr(evt, "device_time_total", 0.0) / 1e3 / iters
    return out


def flops(b, h, s, d, matmuls: float) -> float:
    """Causal FLOPs of ``matmuls`` S x S x D matmuls per head (the forward has 2)."""
    return attention_flops(b, h, s, d, True, "fwd") * matmuls / 2


def _warm(job):
    """Compile one task's binaries at the timed shape's specialization (B = 1), filling the on-disk cache."""
    (kernel, d, tile, tma), s, h = job
    try:
        q, k, v, dout = inputs(1, s, h, d, "fwdbwd")
        with pinned(kernel, d, tile):
            pass_fn(kernel, q, k, v, dout, tma)()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported, the sweep records the failure again
        return f"{kernel} {d} {tile} tma={tma}: {type(e).__name__}: {str(e)[:160]}"


def _listed(kernel, d, tile) -> bool:
    return any((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == tuple(tile)
               for c in tables()[kernel][d])


def sweep(args, rep: int) -> list:
    """One pass over the grid: each tile pinned, each kernel's device ms from the profiler."""
    records = []
    b = max(1, args.tokens // args.seq)
    for kernel, d, tile, tma in tasks(args.dims):
        rec = dict(kernel=kernel, head_dim=d, tile="x".join(map(str, tile)), tma=tma, rep=rep, seq=args.seq,
                   batch=b, heads=args.heads, listed=_listed(kernel, d, tile))
        try:
            q, k, v, dout = inputs(b, args.seq, args.heads, d, "fwdbwd")
            with pinned(kernel, d, tile):
                ms = kernel_ms(pass_fn(kernel, q, k, v, dout, tma))
            name = kernel.replace("_atomic", "")  # the profiler's name: the atomic variant is the dK/dV kernel
            rec.update(ms=round(ms[name], 4), others={n: round(t, 4) for n, t in ms.items() if n != name},
                       tflops=round(flops(b, args.heads, args.seq, d, MATMULS[kernel]) / ms[name] / 1e9, 1))
        except Exception as e:  # noqa: BLE001 - one tile failing (shared memory, compile) keeps the rest
            rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            q = k = v = dout = None
            torch.cuda.empty_cache()
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def tile_means(records, d) -> dict:
    """{(kernel, tile, tma): (mean ms over repeats, listed)} of the tiles that ran at head_dim ``d``."""
    groups = {}
    for r in records:
        if r.get("head_dim") == d and r["kernel"] in MATMULS and "ms" in r:
            groups.setdefault((r["kernel"], r["tile"], r["tma"]), []).append(r)
    return {key: (sum(r["ms"] for r in rs) / len(rs), rs[0]["listed"]) for key, rs in groups.items()}


def picks(records, d, which: str) -> dict:
    """kernel -> (tile, tma, ms): the fastest tile of each kernel, among all (``best``) or the listed ones."""
    out = {}
    for (kernel, tile, tma), (ms, listed) in tile_means(records, d).items():
        if (which == "best" or listed) and (kernel not in out or ms < out[kernel][2]):
            out[kernel] = (tile, tma, ms)
    return out


def pinned_step(q, k, v, dout, d, tiles: dict):
    """Autograd fwd+bwd with every kernel pinned to ``tiles`` (a composite's kernels: dQ by its own kernel, or
    by the dK/dV kernel's atomics when ``tiles`` holds ``dkdv_atomic``)."""
    from seqpar.ops.attention.mask import LocalMask
    from seqpar.ops.attention.triton import function as tri
    atomic = "dkdv_atomic" in tiles
    mask, tma = LocalMask(causal=True), bool(tiles["dkdv_atomic" if atomic else "dkdv"][1])

    def step():
        for t in (q, k, v):
            t.grad = None
        with contextlib.ExitStack() as stack:
            for kernel, (tile, _, _) in tiles.items():
                stack.enter_context(pinned(kernel, d, tuple(int(x) for x in tile.split("x"))))
            tri.attention(q, k, v, mask, dq_mode="atomic" if atomic else "kernel", tma=tma,
                          autotune=False)[0].backward(dout)
    return step


def composite(records, d, which: str, kernels: tuple):
    """(ms, {kernel: (tile, tma, ms)}) of a composite's kernels at their fastest tiles (plus the delta pass), or
    None when one of them has no timing."""
    parts = {k: p for k, p in picks(records, d, which).items() if k in kernels}
    if len(parts) != len(kernels):
        return None
    pre = [r["others"]["pre"] for r in records
           if r.get("head_dim") == d and r["kernel"] in kernels[1:] and "pre" in r.get("others", {})]
    return sum(p[2] for p in parts.values()) + (sum(pre) / len(pre) if pre else 0.0), parts


def end_to_end(args, records) -> list:
    """fwd+bwd through autograd, CUDA events: Triton autotuned over its listed tiles (both dQ modes), Triton with
    each composite's best tiles pinned, cuDNN; the Triton rows also get their kernels' profiled ms."""
    out = []
    b = max(1, args.tokens // args.seq)
    for d in args.dims:
        runs = [("triton autotuned", None), ("triton_atomic autotuned", None), ("sdpa_cudnn", None)]
        for label, kernels in COMPOSITES.items():
            best = composite(records, d, "best", kernels)
            runs += [(f"triton best tiles, {label}", best[1])] if best else []
        for name, tiles in runs:
            q, k, v, dout = inputs(b, args.seq, args.heads, d, "fwdbwd")
            fn = pinned_step(q, k, v, dout, d, tiles) if tiles else step_fn(name.split()[0], q, k, v, dout, True,
                                                                               "fwdbwd")
            ms, _ = time_ms(fn)
            rec = dict(kernel="fwdbwd", impl=name, head_dim=d, seq=args.seq, batch=b, heads=args.heads,
                       ms=round(ms, 4), tflops=round(3.5 * flops(b, args.heads, args.seq, d, 2) / ms / 1e9, 1))
            if name.startswith("triton"):
                rec["kernels_ms"] = {n: round(t, 3) for n, t in kernel_ms(fn).items()}
            out.append(rec)
            print(json.dumps(rec), flush=True)
            q = k = v = dout = None
            torch.cuda.empty_cache()
    return out


def summary(records, dims) -> list:
    """Per head_dim: each composite (listed / best tile per kernel, mean over repeats) next to the end-to-end
    rows (Triton autotuned, Triton with the best tiles pinned, cuDNN)."""
    rows = []
    for d in dims:
        ref = next((r for r in records if r.get("head_dim") == d and "batch" in r), None)
        if ref is None:
            continue
        fl = 3.5 * flops(ref["batch"], ref["heads"], ref["seq"], d, 2)
        for label, kernels in COMPOSITES.items():
            for which in ("listed", "best"):
                got = composite(records, d, which, kernels)
                if got:
                    tiles = ", ".join(f"{k} {t}{' tma' if tma else ''}" for k, (t, tma, _) in got[1].items())
                    rows.append(dict(head_dim=d, what=f"kernels, {label}, {which} tiles ({tiles})",
                                     ms=round(got[0], 3), tflops=round(fl / got[0] / 1e9, 1)))
        ends = [r for r in records if r.get("kernel") == "fwdbwd" and r["head_dim"] == d]
        rows += [dict(head_dim=d, what=f"end to end, {r['impl']}", ms=r["ms"], tflops=r["tflops"]) for r in ends]
        cudnn = next((r["ms"] for r in ends if r["impl"] == "sdpa_cudnn"), None)
        for r in rows:
            if r["head_dim"] == d and cudnn:
                r["vs_cudnn"] = round(cudnn / r["ms"], 3)
    return rows


def markdown(records, rows, env) -> str:
    from report import markdown_table
    tiles = [r for r in records if r["kernel"] in MATMULS]
    head = (f"# Triton attention tiles ({env['device']}, torch {env['torch']}, triton {env['triton']}, "
            f"{env['date']})\n\n"
            "Causal, bf16; kernel TFLOP/s count that kernel's matmuls; `listed` = in the autotuner's list "
            "today.\n\n")
    cols = [("kernel", "kernel", ""), ("D", "head_dim", ""), ("BMxBNxWxS", "tile", ""), ("tma", "tma", ""),
            ("listed", "listed", ""), ("pass", "rep", ""), ("ms", "ms", ".3f"), ("TFLOP/s", "tflops", ".1f"),
            ("error", "error", "")]
    return (head + markdown_table(tiles, cols) + "\n\n## fwd+bwd\n\n" +
            markdown_table(rows, [("D", "head_dim", ""), ("what", "what", ""), ("ms", "ms", ".3f"),
                                  ("TFLOP/s", "tflops", ".1f"), ("x cuDNN", "vs_cudnn", ".3f")]) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=[128, 64])
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=65536, help="batch = tokens // seq")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="passes over the grid (their spread is the noise)")
    p.add_argument("--precompile", type=int, default=0, help="worker processes that compile every tile first")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    bad = [d for d in args.dims if d not in GRID["fwd"]]
    if bad:
        p.error(f"--dims {bad}: the grid has head dims {sorted(GRID['fwd'])}")
    if not torch.cuda.is_available():
        sys.exit("bench_tiles.py times CUDA kernels; no GPU is visible.")
    from report import environment
    env = environment()
    out = os.path.join(args.out, f"tiles_{env['date'][:16].replace(':', '').replace(' ', 'T')}")
    os.makedirs(out, exist_ok=False)  # a fresh directory per run: never mixes with an earlier one
    if args.precompile:
        t0 = time.perf_counter()
        jobs = [(t, args.seq, args.heads) for t in tasks(args.dims)]
        with mp.get_context("spawn").Pool(args.precompile) as pool:
            errors = [e for e in pool.imap_unordered(_warm, jobs) if e]
        print(f"precompiled {len(jobs)} tiles in {time.perf_counter() - t0:.0f}s; errors: {errors}", flush=True)
    records = [r for rep in range(args.repeat) for r in sweep(args, rep)]
    records += end_to_end(args, records)
    rows = summary(records, args.dims)
    md = markdown(records, rows, env)
    with open(os.path.join(out, "tiles.json"), "w") as f:
        json.dump(dict(env=env, args=vars(args), records=records, summary=rows), f, indent=1)
    with open(os.path.join(out, "tiles.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
