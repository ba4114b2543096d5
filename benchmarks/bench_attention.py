"""Attention kernels on one GPU: seqpar's Triton kernel vs torch SDPA (flash, cuDNN) and FlexAttention.

TFLOP/s with FLOPs = 4 * B * H * S^2 * D, x0.5 causal, x3.5 for forward+backward (the convention of
FlashAttention's papers), bf16, [B, S, H, D] tensors (the project's layout; SDPA and Flex get
transposed views of the same memory). Batch is chosen so that B * S = --tokens. Timing: CUDA events
around each call after warm-up, median of several calls.

    python benchmarks/bench_attention.py --out benchmarks/results            # everything
    python benchmarks/bench_attention.py --gpus 0,1 --precompile 16 --out $OUT  # shard head dims over 2 GPUs

Compilation dominates a cold run (Triton autotune candidates, Flex's inductor kernels), so
``--precompile N`` first compiles every candidate in N worker processes (shared on-disk caches), and the
timing process then only loads them. Writes ``attention_<date>.json`` and ``.md`` and prints the table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

IMPLS = ("triton", "triton_atomic", "sdpa_flash", "sdpa_cudnn", "flex")
MODES = ("fwd", "fwdbwd")


def flops(b, h, s, d, causal, mode):
    f = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


_FLEX = {}


def _flex_fn(s, causal):
    """Compiled flex_attention and its causal block mask for sequence length s (built once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        import torch._dynamo
        # One compile per (shape, mask): more than dynamo's default recompile limit of 8.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    mask = None
    if causal:
        key = ("mask", s)
        if key not in _FLEX:
            _FLEX[key] = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, s, s, device="cuda")
        mask = _FLEX[key]
    return _FLEX["fn"], mask


def make_call(impl, q, k, v, causal):
    """A no-argument function running one attention forward on [B, S, H, D] inputs; returns out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if impl in ("triton", "triton_atomic"):
        from seqpar.ops.attention.mask import LocalMask
        from seqpar.ops.attention.triton import function as attention_triton
        mode = "atomic" if impl == "triton_atomic" else "kernel"
        mask = LocalMask(causal=causal)
        return lambda: attention_triton.attention(q, k, v, mask, dq_mode=mode)[0]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views, same memory
    if impl in ("sdpa_flash", "sdpa_cudnn"):
        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def call():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        return call
    if impl == "flex":
        fn, mask = _flex_fn(q.shape[1], causal)
        return lambda: fn(qt, kt, vt, block_mask=mask).transpose(1, 2)
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def inputs(b, s, h, d, mode, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda: torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)  # never zeros
    q, k, v, dout = mk(), mk(), mk(), mk()
    if mode == "fwdbwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, dout


def step_fn(impl, q, k, v, dout, causal, mode):
    call = make_call(impl, q, k, v, causal)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                call()
        return fwd

    def fwdbwd():
        for t in (q, k, v):
            t.grad = None  # no gradient-accumulation kernel in the timed region
        call().backward(dout)
    return fwdbwd


def time_ms(fn, target_s=1.5, min_iters=3, max_iters=30):
    """Median milliseconds of fn over CUDA events, after two warm-up calls (compile/autotune happen there)."""
    fn()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    iters = max(min_iters, min(max_iters, int(target_s / max(est, 1e-4))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), iters


def check_against_flash(b, s, h, d, causal):
    """Max |triton - sdpa_flash| and relative norm difference of the forward outputs (bf16 both)."""
    q, k, v, _ = inputs(b, s, h, d, "fwd", seed=1)
    with torch.no_grad():
        a = make_call("triton", q, k, v, causal)().float()
        ref = make_call("sdpa_flash", q, k, v, causal)().float()
    return dict(max_abs=(a - ref).abs().max().item(), rel=((a - ref).norm() / ref.norm()).item(),
                nan=bool(torch.isnan(a).any()))


def cases(args):
    for d in args.dims:
        for causal in args.causal:
            for s in args.seqs:
                for mode in args.modes:
                    yield d, causal, s, max(1, args.tokens // s), mode


def run_cases(args):
    """Time every (case, impl) on this process's GPU; returns result records."""
    records = []
    for d, causal, s, b, mode in cases(args):
        for impl in args.impls:
            if impl == "triton_atomic" and mode == "fwd":
                continue  # same forward as "triton"
            rec = dict(impl=impl, head_dim=d, causal=causal, seq=s, batch=b, heads=args.heads, mode=mode)
            try:
                q, k, v, dout = inputs(b, s, args.heads, d, mode)
                ms, iters = time_ms(step_fn(impl, q, k, v, dout, causal, mode))
                rec.update(ms=ms, iters=iters, tflops=flops(b, args.heads, s, d, causal, mode) / ms / 1e9)
            except Exception as e:  # one failing backend must not lose the others' numbers
                rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                q = k = v = dout = None
                torch.cuda.empty_cache()
            if impl.startswith("triton"):
                rec["tuning"] = tuning_timings()
            records.append(rec)
            print(json.dumps(rec), flush=True)
        if mode == "fwd" and "triton" in args.impls:
            rec = dict(impl="check", head_dim=d, causal=causal, seq=s, batch=b)
            try:
                rec.update(check_against_flash(b, s, args.heads, d, causal))
            except Exception as e:
                rec.update(max_abs=float("nan"), rel=float("nan"), nan=None, error=f"{type(e).__name__}: {e}"[:300])
            records.append(rec)
    return records


_LAST_TUNING = {}


def tuning_timings():
    """Per-candidate median ms of autotune runs that finished since the last call (for the notes)."""
    from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
    out = {}
    for name, kern in (("fwd", F._attn_fwd), ("dkdv", B._attn_bwd_dkdv), ("dq", BQ._attn_bwd_dq)):
        timings = getattr(kern, "configs_timings", None)
        if timings and timings is not _LAST_TUNING.get(name):
            _LAST_TUNING[name] = timings
            out[name] = {str(c): round(t[0] if isinstance(t, (list, tuple)) else t, 3) for c, t in timings.items()}
    return out


def autotuned_configs():
    """The configs each autotuned kernel picked, per key (they go into the JSON)."""
    from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
    out = {}
    for name, kern in (("fwd", F._attn_fwd), ("dkdv", B._attn_bwd_dkdv), ("dq", BQ._attn_bwd_dq)):
        out[name] = {str(k): str(c) for k, c in kern.cache.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Precompile: every Triton autotune candidate and every Flex graph, in parallel worker processes.
# ---------------------------------------------------------------------------------------------

def _warm(task):
    impl, d, causal, s, b, mode, idx, gpu = task
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    try:
        if impl.startswith("triton"):
            from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
            # Pin each autotuner to its idx-th candidate: compiling it fills the shared on-disk cache.
            # Block sizes, not shapes, select the binary, so a small problem compiles the same kernels.
            for kern, table in ((F._attn_fwd, F.FWD_CONFIGS), (B._attn_bwd_dkdv, B.DKDV_CONFIGS),
                                (BQ._attn_bwd_dq, BQ.DQ_CONFIGS)):
                kern.configs = [table[d][min(idx, len(table[d]) - 1)]]
            s, b = 1024, 1
        q, k, v, dout = inputs(b, s, 32, d, mode)
        step_fn(impl, q, k, v, dout, causal, mode)()
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{task}: {type(e).__name__}: {str(e)[:200]}"


def precompile(args, workers):
    from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
    tasks = []
    for d, causal, s, b, mode in cases(args):
        for impl in args.impls:
            if impl.startswith("triton") and (s != args.seqs[0] or mode != "fwdbwd"):
                continue  # one fwd+bwd run per (head_dim, causal) compiles all three kernels
            if impl == "flex":
                tasks.append(("flex", d, causal, s, b, mode, 0, 0))
            elif impl.startswith("triton"):
                n = max(len(t[d]) for t in (F.FWD_CONFIGS, B.DKDV_CONFIGS, BQ.DQ_CONFIGS))
                tasks += [(impl, d, causal, s, b, mode, i, 0) for i in range(n)]
    tasks.sort(key=lambda t: -t[3])  # big Flex shapes first: they take longest
    tasks = [t[:-1] + (i % len(args.gpus),) for i, t in enumerate(tasks)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for e in pool.imap_unordered(_warm, tasks) if e]
    print(f"precompiled {len(tasks)} tasks in {time.perf_counter() - t0:.0f}s; errors: {errors}", flush=True)
    return errors


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def table(records, impls):
    """Markdown table: one row per (head_dim, causal, mode, seq), TFLOP/s per impl and triton's ratios."""
    rows = {}
    for r in records:
        if r["impl"] in impls:
            key = (r["head_dim"], r["causal"], r["mode"], r["seq"], r["batch"])
            rows.setdefault(key, {})[r["impl"]] = r.get("tflops")
    head = ["D", "causal", "mode", "S", "B"] + list(impls) + ["tri/flash", "tri/flex", "tri/cudnn"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x: "err" if x is None else f"{x:.0f}"
    for (d, causal, mode, s, b), vals in sorted(rows.items()):
        best = max(v for k, v in vals.items() if k.startswith("triton") and v is not None) \
            if any(k.startswith("triton") and v for k, v in vals.items()) else None
        ratio = lambda other: "-" if best is None or not vals.get(other) else f"{best / vals[other]:.2f}"
        cells = [str(d), "yes" if causal else "no", mode, f"{s // 1024}k", str(b)]
        cells += [fmt(vals.get(i)) if i in vals else "-" for i in impls]
        cells += [ratio("sdpa_flash"), ratio("flex"), ratio("sdpa_cudnn")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment():
    import triton
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]
    p.add_argument("--seqs", type=ints, default=[4096, 16384, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="batch = tokens // seq")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dims", type=ints, default=[64, 128])
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--causal", type=lambda s: [x == "1" for x in s.split(",")], default=[True, False],
                   help="comma list of 1/0")
    p.add_argument("--gpus", type=ints, default=[0], help="shard head dims over these GPUs (one process each)")
    p.add_argument("--precompile", type=int, default=0, help="worker processes that compile everything first")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: a shard's JSON path
    args = p.parse_args()

    if args.part:  # a shard: time its cases on its GPU, write records
        records = run_cases(args)
        with open(args.part, "w") as f:
            json.dump(dict(records=records, configs=autotuned_configs()), f)
        return
    if args.precompile:
        precompile(args, args.precompile)
    shards = [args.dims[i::len(args.gpus)] for i in range(len(args.gpus))]
    procs = []
    os.makedirs(args.out, exist_ok=True)
    for gpu, dims in zip(args.gpus, shards):
        if not dims:
            continue
        part = os.path.join(args.out, f".part{gpu}-{os.getpid()}.json")  # this run's shard only
        if os.path.exists(part):
            os.remove(part)  # never read a stale shard of an earlier run that died before cleaning up
        argv = [sys.executable, os.path.abspath(__file__), "--part", part, "--dims", ",".join(map(str, dims)),
                "--seqs", ",".join(map(str, args.seqs)), "--tokens", str(args.tokens), "--heads", str(args.heads),
                "--impls", ",".join(args.impls), "--modes", ",".join(args.modes),
                "--causal", ",".join("1" if c else "0" for c in args.causal)]
        procs.append((part, subprocess.Popen(argv, env=dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu)))))
    records, configs = [], {}
    for part, proc in procs:
        if proc.wait() != 0:
            print(f"shard {part} failed (exit {proc.returncode}); its records are missing", file=sys.stderr)
        if os.path.exists(part):
            with open(part) as f:
                data = json.load(f)
            records += data["records"]
            configs[part] = data["configs"]
            os.remove(part)
    env = environment()
    stamp = env["date"][:16].replace(":", "")
    md = table(records, [i for i in IMPLS if i in args.impls])
    checks = [r for r in records if r["impl"] == "check"]
    with open(os.path.join(args.out, f"attention_{stamp}.json"), "w") as f:
        json.dump(dict(env=env, args=vars(args), records=records, autotuned=configs), f, indent=1)
    with open(os.path.join(args.out, f"attention_{stamp}.md"), "w") as f:
        f.write(f"# Attention TFLOP/s ({env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']})\n\n")
        f.write(f"{args.heads} heads, bf16, B*S = {args.tokens}; FLOPs 4BHS^2D, x0.5 causal, x3.5 fwd+bwd. ")
        f.write("tri/* use the faster of triton and triton_atomic.\n\n" + md + "\n")
    print("\n".join(f"check D={r['head_dim']} causal={r['causal']} S={r['seq']}: max|tri-flash|={r['max_abs']:.3g} "
                    f"rel={r['rel']:.2e} nan={r['nan']}" for r in checks))
    print(f"\n{env}\n{md}")


if __name__ == "__main__":
    main()
