"""Kernel v3 A/B in ONE GPU call: warp-specialized (WS) Triton kernels vs plain vs cuDNN, with a bf16 check.

    python benchmarks/bench_ws.py --out $OUT          # one H200, < 3 minutes; prints a table last

1. Precompile, in parallel worker processes (shared on-disk Triton cache): every autotune candidate of
   the timed calls, plain (SEQPAR_TRITON_WS=0) and WS (=1), each pinned in its own process.
2. Check, in parallel processes, with SEQPAR_TRITON_WS=1 and each WS tile pinned in turn: out, dq, dk, dv
   against an fp32 reference, next to SDPA's own bf16 error (causal / full, head_dim 64 / 128, GQA 32:8,
   one document mask). Pass: finite and rel. error <= 2 x SDPA's + 1e-3.
3. Time, one process per variant (ws0, cuDNN, ws1, ws1 with the dQ kernel at D = 64): fwd and fwd+bwd,
   causal, D = 128 and 64, --tokens x --heads (B = 1); ws0 again last (run-to-run spread), if time is left.

Every task runs in a child process, so a WS compile that fails (a Python error or an abort inside the
MLIR pass) is reported with the tail of its compiler output and the rest carries on. TFLOP/s as in
bench_attention.py (4 B H S^2 D, x0.5 causal, x3.5 fwd+bwd).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MARK = "@@"
DOCS = [1000, 1500, 1596]  # document lengths of the doc-mask check (S = 4096; not tile multiples)
CHECKS = [  # (name, D, causal, Hkv, docs)
    ("d128_causal", 128, True, 32, False), ("d128_full", 128, False, 32, False),
    ("d64_causal", 64, True, 32, False), ("d64_full", 64, False, 32, False),
    ("d128_gqa32:8", 128, True, 8, False), ("d64_docs", 64, True, 32, True),
]


def emit(**rec):
    print(MARK + json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------------
# Child side (imports torch / triton / seqpar only here)
# ------------------------------------------------------------------------------------------------

def _lists(d, ws):
    """The candidate lists the timed calls autotune over (fwd, dkdv, dq), in this mode."""
    import torch
    from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
    q = torch.empty(1, dtype=torch.bfloat16)
    a = dict(Q=q, HEAD_DIM=d, tune_size=1, ws_mode=2 if ws else 0, tma_mode=1)
    return F.fwd_candidates(a), B.dkdv_candidates(a), BQ.dq_candidates(a)


def _pin(d, ws, idx):
    from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
    lists = _lists(d, ws)
    for kern, cands in zip((F._attn_fwd, B._attn_bwd_dkdv, BQ._attn_bwd_dq), lists):
        kern.configs = [cands[min(idx, len(cands) - 1)]]
    return [str(c[min(idx, len(c) - 1)]) for c in lists]


def _mask(causal, docs, b, s, device):
    import torch
    from seqpar.ops.attention.mask import LocalMask
    if not docs:
        return LocalMask(causal=causal)
    ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(DOCS)]).to(device)
    ids = ids[None].expand(b, s).contiguous()
    return LocalMask(causal=causal, q_doc_ids=ids, k_doc_ids=ids)


def _inputs(b, s, h, hkv, d, seed):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda heads: torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, dout = mk(h), mk(hkv), mk(hkv), mk(h)
    return [t.requires_grad_() for t in (q, k, v)] + [dout]


def _triton_step(q, k, v, dout, mask, dq_mode=None):
    from seqpar.ops.attention.triton import function as T
    out = T.attention(q, k, v, mask, dq_mode=dq_mode)[0]
    if dout is not None:
        out.backward(dout)
    return out


def task_compile(spec):
    """Pinned fwd+bwd runs at S = 4096 (autotuned size class: same binaries as the timed calls)."""
    d, ws, idx = spec["d"], spec["ws"], spec["idx"]
    os.environ["SEQPAR_TRITON_WS"] = "1" if ws else "0"
    pinned = _pin(d, ws, idx)
    q, k, v, dout = _inputs(1, 4096, 32, 32, d, seed=idx)
    from seqpar.ops.attention.mask import LocalMask
    for dq_mode in (("kernel", "atomic") if d <= 64 else (None,)):  # D = 64: default is atomic dQ
        _triton_step(q, k, v, dout, LocalMask(causal=True), dq_mode)
    import torch
    torch.cuda.synchronize()
    emit(kind="compile", d=d, ws=ws, idx=idx, pinned=pinned, ok=True)


def task_check(spec):
    import torch
    import torch.nn.functional as Fn
    name, d, causal, hkv, docs = spec["case"]
    os.environ["SEQPAR_TRITON_WS"] = "1"
    pinned = _pin(d, True, spec["idx"])[::2]  # fwd, dq (dK/dV: its plain default)
    from seqpar.ops.attention.triton import bwd as B
    B._attn_bwd_dkdv.configs = [_lists(d, False)[1][0]]
    b, s, h = 1, 4096, 32
    q, k, v, dout = _inputs(b, s, h, hkv, d, seed=100 + spec["idx"])
    mask = _mask(causal, docs, b, s, q.device)
    from seqpar.ops.attention.triton.ws import ws_mode
    used = ws_mode(q, k, v, ws=True)
    tri = _triton_step(q, k, v, dout, mask, dq_mode="kernel")
    res = {"out": tri.detach().float()}
    res.update(dq=q.grad.float(), dk=k.grad.float(), dv=v.grad.float())
    # fp32 reference and SDPA bf16, [B, H, S, D]; GQA expanded for the reference
    amask = None
    pos = torch.arange(s, device=q.device)
    if causal:
        amask = pos[:, None] >= pos[None, :]
    if docs:
        ids = mask.q_doc_ids[0]
        same = ids[:, None] == ids[None, :]
        amask = same if amask is None else amask & same
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))
    rep = h // hkv

    def run(qq, kk, vv, fp32):
        """out, dq, dk, dv [B, H, S, D]; the fp32 reference in chunks of 8 query heads (bounded memory)."""
        if not fp32:
            qq, kk, vv = (t.clone().requires_grad_() for t in (qq, kk, vv))
            o = Fn.scaled_dot_product_attention(qq, kk, vv, attn_mask=amask, enable_gqa=rep > 1)
            o.backward(dout.transpose(1, 2))
            return dict(out=o.detach().float(), dq=qq.grad.float(), dk=kk.grad.float(), dv=vv.grad.float())
        res = dict(out=torch.zeros(qq.shape, device=qq.device), dq=torch.zeros(qq.shape, device=qq.device),
                   dk=torch.zeros(kk.shape, device=qq.device), dv=torch.zeros(vv.shape, device=qq.device))
        step = max(8, rep)
        for h0 in range(0, h, step):
            kv = slice(h0 // rep, (h0 + step) // rep)
            qc = qq[:, h0:h0 + step].float().requires_grad_()
            kc, vc = kk[:, kv].float().requires_grad_(), vv[:, kv].float().requires_grad_()
            sc = (qc @ kc.repeat_interleave(rep, 1).transpose(-1, -2)) / d ** 0.5
            if amask is not None:
                sc = sc.masked_fill(~amask, float("-inf"))
            o = torch.softmax(sc, -1) @ vc.repeat_interleave(rep, 1)
            o.backward(dout.transpose(1, 2)[:, h0:h0 + step].float())
            res["out"][:, h0:h0 + step] = o.detach()
            res["dq"][:, h0:h0 + step] = qc.grad
            res["dk"][:, kv] += kc.grad
            res["dv"][:, kv] += vc.grad
        return res

    ref, sdpa = run(qt, kt, vt, True), run(qt, kt, vt, False)
    errs = {}
    ok = True
    for key, val in res.items():
        r = ref[key].transpose(1, 2)
        e = ((val - r).norm() / r.norm()).item()
        es = ((sdpa[key].transpose(1, 2) - r).norm() / r.norm()).item()
        good = bool(torch.isfinite(val).all()) and e <= 2 * es + 1e-3
        ok &= good
        errs[key] = [round(e, 6), round(es, 6), good]
    emit(kind="check", case=name, idx=spec["idx"], pinned=pinned, ws_mode=used, ok=ok, errs=errs)


def task_time(spec):
    import statistics
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    variant = spec["variant"]
    os.environ["SEQPAR_TRITON_WS"] = "1" if variant.startswith("ws1") else "0"
    from seqpar.ops.attention.mask import LocalMask
    s, h = spec["tokens"], spec["heads"]
    emit(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__,
         triton=__import__("triton").__version__)
    for d in spec["dims"]:
        if variant == "ws1_dqkernel" and d > 64:
            continue  # D = 128 already uses the dQ kernel
        for mode in ("fwd", "fwdbwd"):
            if variant == "ws1_dqkernel" and mode == "fwd":
                continue
            rec = dict(kind="time", variant=variant, d=d, mode=mode)
            try:
                q, k, v, dout = _inputs(1, s, h, h, d, seed=7)
                if variant == "cudnn":
                    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

                    def call():
                        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                    do_t = dout.transpose(1, 2)
                else:
                    dq_mode = "kernel" if variant == "ws1_dqkernel" else None
                    call = lambda: _triton_step(q, k, v, None, LocalMask(causal=True), dq_mode)
                    do_t = dout

                def fn():
                    for t in (q, k, v):
                        t.grad = None
                    if mode == "fwd":
                        with torch.no_grad():
                            call()
                    else:
                        call().backward(do_t)
                for _ in range(3):  # compile / autotune / warm-up
                    fn()
                torch.cuda.synchronize()
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(spec["iters"])]
                for a, b_ in events:
                    a.record()
                    fn()
                    b_.record()
                torch.cuda.synchronize()
                ms = statistics.median(a.elapsed_time(b_) for a, b_ in events)
                fl = 4.0 * h * s * s * d * 0.5 * (3.5 if mode == "fwdbwd" else 1.0)
                rec.update(ms=ms, tflops=fl / ms / 1e9, configs=_chosen())
            except Exception as e:  # noqa: BLE001 - a failing variant must not lose the others
                rec.update(error=f"{type(e).__name__}: {str(e)[-1500:]}")
            emit(**rec)
            q = k = v = dout = None
            torch.cuda.empty_cache()


def _chosen():
    from seqpar.ops.attention.triton import bwd as B, bwd_dq as BQ, fwd as F
    return {n: [str(c) for c in kern.cache.values()][-1:] for n, kern in
            (("fwd", F._attn_fwd), ("dkdv", B._attn_bwd_dkdv), ("dq", BQ._attn_bwd_dq)) if kern.cache}


TASKS = {"compile": task_compile, "check": task_check, "time": task_time}


# ------------------------------------------------------------------------------------------------
# Parent side: child processes, deadline, report
# ------------------------------------------------------------------------------------------------

def run_tasks(specs, workers, deadline, log):
    """Run each spec in its own child (at most ``workers`` at once); returns (records, failures)."""
    pending, running, records, failures = list(specs), [], [], []
    while pending or running:
        while pending and len(running) < workers:
            spec = pending.pop(0)
            if time.time() > deadline:
                failures.append(dict(spec=spec, error="skipped: time budget spent"))
                continue
            path = os.path.join(log, f"task{len(records) + len(failures) + len(running)}_{os.getpid()}_{time.time_ns()}")
            out, err = open(path + ".out", "w+"), open(path + ".err", "w+")
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--task", json.dumps(spec)],
                                    stdout=out, stderr=err, cwd=ROOT)
            running.append((spec, proc, out, err, time.time()))
        time.sleep(0.2)
        for item in list(running):
            spec, proc, out, err, t0 = item
            timeout = spec.get("timeout", 120)
            if proc.poll() is None and time.time() - t0 < timeout and time.time() < deadline + 5:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(item)
            out.seek(0), err.seek(0)
            text, etext = out.read(), err.read()
            out.close(), err.close()
            got = [json.loads(line[len(MARK):]) for line in text.splitlines() if line.startswith(MARK)]
            records += got
            if proc.returncode != 0:
                tail = _error_lines(etext)
                failures.append(dict(spec=spec, error=f"exit {proc.returncode}:\n{tail}"))
    return records, failures


def _error_lines(text, keep=("rror", "ssert", "ailed", "UNREACHABLE", "Traceback", "  File", "xception")):
    """The lines of a child's stderr worth printing: errors and assertions, not the MLIR module dump."""
    lines = text.splitlines()
    picked = [l for l in lines if any(k in l for k in keep) and len(l) < 600]
    return "\n".join(picked[-25:] + ["  ..."] + [l[:300] for l in lines[-6:]])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help=argparse.SUPPRESS)  # internal: one child task (JSON spec)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dims", default="128,64")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 4))
    p.add_argument("--budget", type=float, default=165.0, help="seconds; later tasks are skipped, not run")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    if args.task:
        spec = json.loads(args.task)
        try:
            TASKS[spec["kind"]](spec)
        except Exception as e:  # noqa: BLE001 - the parent prints it as this task's failure
            import traceback
            traceback.print_exc()
            emit(kind=spec["kind"] + "_error", spec=spec, error=f"{type(e).__name__}: {str(e)[-2000:]}")
            sys.exit(3)
        return
    t_start = time.time()
    deadline = t_start + args.budget
    dims = [int(x) for x in args.dims.split(",")]
    log = os.path.join(args.out, "bench_ws_logs")
    os.makedirs(log, exist_ok=True)
    # 1 + 2: precompile (timed candidates) and checks, all in parallel
    specs = []
    for d in dims:
        specs += [dict(kind="compile", d=d, ws=False, idx=i, timeout=150) for i in range(5)]
        specs += [dict(kind="compile", d=d, ws=True, idx=i, timeout=150) for i in range(2)]
    if not args.no_check:
        specs += [dict(kind="check", case=c, idx=i, timeout=150) for i in range(2) for c in CHECKS if c[1] in dims]
    specs.sort(key=lambda sp: (sp["kind"] != "compile" or not sp["ws"], sp["kind"]))  # WS compiles first
    recs, fails = run_tasks(specs, args.workers, deadline - 75, log)
    t_pre = time.time() - t_start
    # 3: timing, one variant per process, sequential (the GPU to itself)
    variants = ("ws0", "cudnn", "ws1", "ws1_dqkernel", "ws0_repeat")  # baseline pair first; repeat = spread
    tspecs = [dict(kind="time", variant=v, dims=dims, tokens=args.tokens, heads=args.heads, iters=args.iters,
                   timeout=120) for v in variants]
    trecs, tfails = run_tasks(tspecs, 1, deadline, log)
    recs, fails = recs + trecs, fails + tfails
    with open(os.path.join(args.out, f"bench_ws_{time.strftime('%Y%m%d-%H%M%S')}.json"), "w") as f:
        json.dump(dict(args=vars(args), records=recs, failures=fails), f, indent=1)
    report(recs, fails, dims, t_pre, time.time() - t_start)


def report(recs, fails, dims, t_pre, t_all):
    print("\n==== failures (compiler / runtime errors, tails) ====")
    for f in fails:
        print(f"-- {json.dumps(f['spec'])}\n{f['error']}\n")
    comp = [r for r in recs if r.get("kind") == "compile"]
    print(f"precompile + check phase {t_pre:.0f}s, total {t_all:.0f}s; compile tasks ok: "
          f"plain {sum(1 for r in comp if not r['ws'])}, ws {sum(1 for r in comp if r['ws'])}")
    env = next((r for r in recs if r.get("kind") == "env"), {})
    print(f"env: {env}")
    print("\n==== check: rel. error vs fp32 reference (WS bf16 | SDPA bf16 | pass) ====")
    for r in sorted((r for r in recs if r.get("kind") == "check"), key=lambda r: (r["case"], r["idx"])):
        cells = "  ".join(f"{k} {e:.2e}|{s:.2e}|{'ok' if g else 'FAIL'}" for k, (e, s, g) in r["errs"].items())
        print(f"{r['case']:>13} ws-tile {r['idx']} ws_mode={r['ws_mode']} {'PASS' if r['ok'] else 'FAIL'}  {cells}")
    times = {(r["variant"], r["d"], r["mode"]): r for r in recs if r.get("kind") == "time"}
    print("\n==== causal, B=1, TFLOP/s (same run) ====")
    cols = ("ws0", "ws1", "ws1_dqkernel", "cudnn", "ws0_repeat")
    print("| D | mode | " + " | ".join(cols) + " | ws0/cudnn | best ws1/cudnn | ws1/ws0 |")
    print("|---|---|" + "---|" * (len(cols) + 3))
    for d in dims:
        for mode in ("fwd", "fwdbwd"):
            v = {c: times.get((c, d, mode), {}).get("tflops") for c in cols}
            best_ws = max([x for x in (v["ws1"], v["ws1_dqkernel"]) if x] or [0]) or None
            ratio = lambda a, b: f"{a / b:.3f}" if a and b else "-"
            err = lambda c: "err" if (c, d, mode) in times and "error" in times[(c, d, mode)] else "-"
            cells = [f"{v[c]:.0f}" if v[c] else err(c) for c in cols]
            print(f"| {d} | {mode} | " + " | ".join(cells) +
                  f" | {ratio(v['ws0'], v['cudnn'])} | {ratio(best_ws, v['cudnn'])} | {ratio(best_ws, v['ws0'])} |")
    for r in times.values():
        if "error" in r:
            print(f"time error {r['variant']} D={r['d']} {r['mode']}: {r['error'][-600:]}")
        else:
            print(f"{r['variant']} D={r['d']} {r['mode']}: {r['ms']:.3f} ms, configs {r.get('configs')}")


if __name__ == "__main__":
    main()
