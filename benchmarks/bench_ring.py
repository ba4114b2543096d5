"""Ring attention on GPUs: bf16 correctness over NCCL, then fwd+bwd causal throughput.

Run (any number of GPUs; world sizes 1, 2, 4, ... up to all launched ranks, or ``--world-sizes``):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node=2 benchmarks/bench_ring.py --out benchmarks/results \\
        [--seqs 32768,65536,131072,262144,524288] [--world-sizes 1,2] [--methods ring,ring-nocomm,torch_cp]

1. Checks: every layout x backend, causal or not, MHA and GQA, ``[B=2, S=2048, H=8, D=128]`` bf16,
   sharded over all ranks. out, dq, dk, dv are compared with a float64 reference by relative
   Frobenius error and must be within 2x of torch's own bf16 SDPA error on the same inputs (floor
   1e-3); lse (fp32 in both) within 2e-2 absolute. A failed check exits non-zero after the table.
2. Timing: batch 1, 32 heads, head_dim 128, bf16, causal, fwd+bwd at each total length. Each rank
   times ``iters`` fwd+bwd steps with CUDA events (after ``warmup`` untimed steps; grads reset
   outside the events), takes the median, and the slowest rank's median is reported. Per-GPU
   TFLOP/s = 4*B*H*S^2*D * 0.5 (causal) * 3.5 (fwd+bwd) / world_size / time. Methods:
   ``sdpa``: F.scaled_dot_product_attention on the whole sequence on one GPU (the kernel alone);
   ``ring``: seqpar ring attention (zigzag or striped), ws=1 on a ring of one (wrapper overhead only);
   ``ring-nocomm``: the same ring with the communication replaced by a stub (same kernels and merges);
   ``kernels-only``: only the local kernel calls of the ring's plan (no merge, no accumulation);
   ``torch_cp``: torch.distributed.tensor.experimental.context_parallel (its head-tail load
   balancer, rotate method all-gather (torch's default) or all-to-all).
   A world size w < N runs on the ring of ranks 0..w-1 (the others wait). A row that runs out of
   memory is recorded as ``OOM`` and the run goes on. Warm-up/iterations: 3/10 up to 32k tokens,
   2/5 up to 128k, 1/2 up to 512k, 1/1 beyond (a 512k step takes seconds, 1M one GPU a minute; run-to-run
   spread there is < 1%).
   ``--full-upto N --long-kernels cudnn`` times only that kernel family beyond N tokens (device time).
3. Derived columns (``ring_report.derive``): scaling efficiency = per-GPU TFLOP/s / the single-GPU TFLOP/s of
   the same local kernel at the same total tokens in the same run (ring -> ring ws=1, torch_cp -> sdpa);
   exposed-communication share = (t_ring - t_ring-nocomm) / t_ring.
Writes ``ring_<device>_x<N>_<date>.json``, ``.md``, ``_tflops.png`` (TFLOP/s per GPU vs total tokens)
and ``_efficiency.png`` (efficiency vs world size) under ``--out``, stamped with versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/report.py
from seqpar.ops.attention import LocalMask, resolve_backend, select  # noqa: E402
from seqpar.parallel import (plan_step, ring_attention, ring_attention_with_lse, shard_sequence,  # noqa: E402
                             unshard_sequence)
from seqpar.parallel.layout import LAYOUTS  # noqa: E402
from ring_report import derive, merge, write_results  # noqa: E402,F401  (derive: re-exported for tests)


def available_backends(device) -> list[str]:
    names = []
    probe = torch.empty(1, 64, 4, 128, device=device, dtype=torch.bfloat16)
    for name in ("sdpa_flash", "sdpa_cudnn", "triton"):
        try:
            resolve_backend(name, probe, probe, causal=True)
            names.append(name)
        except (ValueError, ImportError) as e:
            if dist.get_rank() == 0:
                print(f"backend {name} skipped: {e}")
    return names


# ---- correctness -------------------------------------------------------------------------------
def reference(q, k, v, causal):
    """float64 attention with lse on [B, S, H, D] (GQA by repeat_interleave), differentiable."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v), lse


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def run_checks(device, backends, group) -> list[dict]:
    rows, (b, s, h, d) = [], (2, 2048, 8, 128)
    for hkv in (8, 2):
        for causal in (True, False):
            gen = torch.Generator(device=device).manual_seed(1000 + hkv + causal)
            mk = lambda *shape: torch.randn(*shape, device=device, generator=gen).to(torch.bfloat16)
            q, k, v, dout = mk(b, s, h, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, s, h, d)
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            ref_out, ref_lse = reference(q64, k64, v64, causal)
            ref_out.backward(dout.double())
            ref = dict(out=ref_out.detach(), dq=q64.grad, dk=k64.grad, dv=v64.grad)
            # torch's own bf16 error on the same inputs: the yardstick for the ring's error.
            qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
                                               is_causal=causal, enable_gqa=True).transpose(1, 2)
            o.backward(dout)
            base = dict(out=rel(o, ref["out"]), dq=rel(qb.grad, ref["dq"]), dk=rel(kb.grad, ref["dk"]),
                        dv=rel(vb.grad, ref["dv"]))
            for backend in backends:
                for layout in (lay for lay in LAYOUTS if lay != "docs"):  # docs needs doc ids: bench_masks
                    row = dict(backend=backend, layout=layout, causal=causal, heads=h, kv_heads=hkv, sdpa_err=base)
                    try:  # the same code runs on every rank, so an exception is raised on all of them
                        sh = lambda t: shard_sequence(t, 1, group=group, layout=layout).requires_grad_()
                        ql, kl, vl = sh(q), sh(k), sh(v)
                        out, lse = ring_attention_with_lse(ql, kl, vl, group=group, causal=causal, layout=layout,
                                                           backend=backend)
                        out.backward(shard_sequence(dout, 1, group=group, layout=layout))
                        un = lambda t, dim=1: unshard_sequence(t.detach(), dim, group=group, layout=layout)
                        err = dict(out=rel(un(out), ref["out"]), dq=rel(un(ql.grad), ref["dq"]),
                                   dk=rel(un(kl.grad), ref["dk"]), dv=rel(un(vl.grad), ref["dv"]))
                        lse_err = (un(lse, 2).double() - ref_lse.detach()).abs().max().item()
                        ok = all(err[key] <= max(2 * base[key], 1e-3) for key in err) and lse_err <= 2e-2
                        row.update(err=err, lse_abs_err=lse_err, ok=ok, error=None)
                    except Exception as e:  # noqa: BLE001
                        nan = float("nan")
                        row.update(err=dict(out=nan, dq=nan, dk=nan, dv=nan), lse_abs_err=nan, ok=False,
                                   error=f"{type(e).__name__}: {e}"[:300])
                    rows.append(row)
    return rows


# ---- timing ------------------------------------------------------------------------------------
class _NoComm:
    """RingComm stand-in that exchanges nothing (each rank computes on its own K/V every step), to
    separate the cost of communication from the ring's compute in ``ring-nocomm`` timings."""

    def __init__(self, group=None):
        self._sent = None

    def send_recv(self, tensors, recv_rows=None, **kwargs):  # shift=..., as RingComm
        # what a real exchange would hand back: the sent blocks, or buffers of the rows a trimmed plan receives
        self._sent = [t if recv_rows is None else t.new_zeros(t.shape[0], recv_rows, *t.shape[2:]) for t in tensors]
        return self

    def wait(self):
        return self._sent

def time_fwd_bwd(fn, leaves, dout, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn().backward(dout)`` (or of ``fn()`` when ``dout`` is None) by CUDA
    events (no host sync inside the loop)."""
    events = []
    for i in range(warmup + iters):
        for t in leaves:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if dout is None:
            fn()
        else:
            fn().backward(dout)
        end.record()
        if i >= warmup:
            events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def bench_one(method, kernel, ws, seq, device, group, warmup, iters, layout="zigzag", mesh=None):
    b, h, d = 1, 32, 128
    gen = torch.Generator(device=device).manual_seed(seq)
    mk = lambda *shape: torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    if method == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, dout = (mk(b, h, seq, d) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kernel]
        with sdpa_kernel(be):
            ms = time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout,
                              warmup, iters)
    elif method == "ring":
        local = seq // ws
        q, k, v, dout = mk(b, local, h, d), mk(b, local, h, d), mk(b, local, h, d), mk(b, local, h, d)
        for t in (q, k, v):
            t.requires_grad_()
        ring_attention(q, k, v, group=group, causal=True, layout=layout, backend=kernel)  # validate once
        fn = lambda: ring_attention(q, k, v, group=group, causal=True, layout=layout, backend=kernel,
                                    validate=False)
        ms = time_fwd_bwd(fn, (q, k, v), dout, warmup, iters)
    elif method == "ring-nocomm":  # the same ring with a RingComm that exchanges nothing
        import importlib

        # (the package attribute `ring_attention` is the function; the module lives in sys.modules)
        ra = importlib.import_module("seqpar.parallel.ring_attention")

        local = seq // ws
        q, k, v, dout = mk(b, local, h, d), mk(b, local, h, d), mk(b, local, h, d), mk(b, local, h, d)
        for t in (q, k, v):
            t.requires_grad_()
        real, ra.RingComm = ra.RingComm, _NoComm
        try:
            fn = lambda: ring_attention(q, k, v, group=group, causal=True, layout=layout, backend=kernel,
                                        validate=False)
            ms = time_fwd_bwd(fn, (q, k, v), dout, warmup, iters)
        finally:
            ra.RingComm = real
    elif method == "kernels-only":  # just the kernel calls of the ring's plan, no merge/accumulation
        local = seq // ws
        q, k, v, dout = mk(b, local, h, d), mk(b, local, h, d), mk(b, local, h, d), mk(b, local, h, d)
        record = select(kernel, q, k, LocalMask(causal=True))
        fwd, bwd, masks = record.forward, record.backward, {c: LocalMask(causal=c) for c in (False, True)}
        out, lse = fwd(q, k, v, masks[True])
        rank = dist.get_rank(group) if ws > 1 else 0

        def run():
            for step in range(ws):
                for c in plan_step(layout, True, rank, (rank - step) % ws, ws, local):
                    fwd(q[:, c.q_start:c.q_end], k[:, c.k_start:c.k_end], v[:, c.k_start:c.k_end], masks[c.causal])
            for step in range(ws):
                for c in plan_step(layout, True, rank, (rank - step) % ws, ws, local):
                    qs, ks = slice(c.q_start, c.q_end), slice(c.k_start, c.k_end)
                    bwd(dout[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs], masks[c.causal])
        ms = time_fwd_bwd(run, (), None, warmup, iters)
    else:  # torch_cp
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind, rotate = kernel.split("+")
        set_rotate_method(rotate)
        q, k, v, dout = (mk(b, h, seq, d) for _ in range(4))
        be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]
        with sdpa_kernel(be), context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]):
            for t in (q, k, v):
                t.requires_grad_()
            ms = time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout,
                              warmup, iters)
            for t in (q, k, v):
                t.requires_grad_(False)
                t.grad = None
    peak = torch.cuda.max_memory_allocated() / 2**30
    flops = 4 * b * h * seq * seq * d * 0.5 * 3.5 / ws
    return ms, flops / (ms * 1e-3) / 1e12, peak


def _status(exc) -> str:
    """Short label of a failed row: 'OOM' for an out-of-memory error, else the exception's text."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    return f"{type(exc).__name__}: {exc}"[:300]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="32768,65536,131072,262144,524288", help="total tokens, comma-separated")
    ap.add_argument("--world-sizes", default="", help="e.g. 1,2,4,8 (default: 1, 2, 4, ... up to every GPU)")
    ap.add_argument("--methods", default="sdpa,ring,ring-nocomm,kernels-only,torch_cp")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--full-upto", type=int, default=1 << 62,
                    help="total tokens up to which every method x kernel x layout runs; longer: --long-kernels only")
    ap.add_argument("--long-kernels", default="cudnn", help="kernel families timed beyond --full-upto")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no GPU: rebuild one report from earlier runs' JSON files (rows concatenated)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--cp-rotate", default="allgather,alltoall", help="torch CP rotate methods to time")
    ap.add_argument("--skip-ring-ws1", action="store_true",
                    help="no ring of one (efficiency vs bare SDPA instead): saves a minute per 1M-token kernel")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out, args.tag)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=240))
    rank, ws = dist.get_rank(), dist.get_world_size()
    sizes = sorted({int(w) for w in args.world_sizes.split(",")} if args.world_sizes else
                   {min(2 ** i, ws) for i in range(ws.bit_length())} | {ws})
    if any(w < 1 or w > ws for w in sizes):
        raise SystemExit(f"--world-sizes {sizes}: each must be between 1 and the {ws} launched ranks.")
    singletons = [dist.new_group([r]) for r in range(ws)]  # every rank creates every group
    # Rings of the first w ranks; ranks outside a ring sit out its rows (new_group is collective).
    rings = {w: (None if w == ws else dist.new_group(list(range(w)))) for w in sizes if w > 1}
    backends = available_backends(device)
    meta = dict(device=torch.cuda.get_device_name(device), gpus=ws, torch=torch.__version__,
                cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    checks = [] if args.no_check or ws < 2 else run_checks(device, backends, None)
    if rank == 0 and checks:
        print(f"{'backend':11s} {'layout':10s} {'causal':6s} {'kv':>3s} | ring rel err out/dq/dk/dv"
              " | sdpa bf16 rel err out/dq/dk/dv | lse abs | ok")
        for c in checks:
            e, s = c["err"], c["sdpa_err"]
            print(f"{c['backend']:11s} {c['layout']:10s} {str(c['causal']):6s} {c['kv_heads']:3d} | "
                  + "/".join(f"{e[x]:.1e}" for x in e) + " | " + "/".join(f"{s[x]:.1e}" for x in s)
                  + f" | {c['lse_abs_err']:.1e} | {'ok' if c['ok'] else 'FAIL'} {c['error'] or ''}", flush=True)

    configs = [("sdpa", kind, 1, "-") for kind in ("flash", "cudnn")]
    configs += [] if args.skip_ring_ws1 else [("ring", be, 1, "zigzag") for be in backends]
    for w in (w for w in sizes if w > 1):
        configs += [("ring", be, w, lay) for lay in ("zigzag", "striped") for be in backends]
        configs += [(m, be, w, "zigzag") for m in ("ring-nocomm", "kernels-only")
                    for be in ("sdpa_flash", "sdpa_cudnn") if be in backends]
        configs += [("torch_cp", f"{kind}+{rot}", w, "head-tail") for kind in ("flash", "cudnn")
                    for rot in args.cp_rotate.split(",")]
    configs = [c for c in configs if c[0] in args.methods.split(",")]
    long_kernels = [k for k in args.long_kernels.split(",") if k]

    def configs_at(seq: int) -> list:
        """Every config up to --full-upto tokens; beyond, only the --long-kernels family, zigzag (device
        time: one fwd+bwd of 512k tokens on one GPU takes 14 s with cuDNN, 25 s with FlashAttention-2)."""
        if seq <= args.full_upto:
            return configs
        return [c for c in configs if any(k in c[1] for k in long_kernels) and c[0] != "kernels-only"
                and c[3] in ("zigzag", "-", "head-tail")]
    from torch.distributed.device_mesh import DeviceMesh

    meshes = {w: DeviceMesh("cuda", list(range(w))) for w in sizes if w > 1}  # collective: every rank
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        warmup, iters = ((3, 10) if seq <= 32768 else (2, 5) if seq <= 131072 else (1, 2) if seq <= 524288
                         else (1, 1))
        for method, kernel, w, layout in configs_at(seq):
            group = singletons[rank] if w == 1 else rings[w]
            dist.barrier()
            ms, peak, err = 0.0, float("nan"), None  # ranks outside the ring report 0 ms (MAX ignores them)
            if w == 1 or rank < w:
                try:
                    ms, _, peak = bench_one(method, kernel, w, seq, device, group, warmup, iters, layout,
                                            meshes.get(w))
                except Exception as e:  # noqa: BLE001 -- one failing method (or an OOM) must not hide the others
                    ms, err = math.inf, _status(e)
            # The slowest rank sets the pace; a failure anywhere (inf) fails the row; OOM is flagged.
            t = torch.tensor([ms, 1.0 if err == "OOM" else 0.0, peak if peak == peak else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms, oom, peak = t.tolist()
            if oom:
                err = "OOM"
            elif not math.isfinite(ms):
                err = err or "failed on another rank"
            ms = ms if math.isfinite(ms) else float("nan")
            tflops = 4 * seq * seq * 32 * 128 * 0.5 * 3.5 / w / (ms * 1e-3) / 1e12
            row = dict(method=method, kernel=kernel, layout=layout, world_size=w, seq=seq, ms=ms, tflops_per_gpu=tflops,
                       peak_gib=peak if peak > 0 else float("nan"), error=err)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        if rank == 0:  # rewritten after every length: a run cut short by a time limit keeps what it measured
            write_results(args.out, meta, checks, rows, args.tag)

    if rank == 0:
        print(write_results(args.out, meta, checks, rows, args.tag), flush=True)
    failed = any(not c["ok"] for c in checks)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
