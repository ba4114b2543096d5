"""Triton attention kernels against the float64 reference.

CPU (CI): Triton's interpreter, which must be switched on before triton is first imported; other test
modules of the same pytest process may import it earlier, so each group of cases runs in a child
process (this file run as a script) with TRITON_INTERPRET=1, and reports its failures as JSON.
GPU (``-m gpu``): bf16 at realistic sizes, judged against torch's own bf16 SDPA error vs float64.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)

# Tolerances, by input dtype, on O(1) random data (D <= 128, rows <= 100 keys):
# fp32: the kernels compute in fp32 (exact dots in the interpreter); measured errors ~1e-6, 5e-5 leaves room.
# fp16: p and dS are rounded to fp16 before their matmuls (as in FlashAttention): measured relative
#       norm errors ~2.5e-4; 2e-3 leaves room while a wrong mask or scale gives errors of order 1.
TOL = {torch.float32: dict(atol=5e-5, rtol=5e-5), torch.float16: dict(rel=2e-3)}

# name -> (B, Sq, Sk, H, Hkv, D, dtype, opts). Small: the interpreter runs every program in Python.
F32, F16 = torch.float32, torch.float16
DOCS_50 = [[0] * 20 + [1] * 30, [0] * 5 + [1] * 40 + [2] * 5]
GROUPS = {
    "ragged": {
        "len1": (2, 1, 1, 2, 2, 32, F32, {}),
        "len1_causal": (2, 1, 1, 2, 2, 32, F32, dict(causal=True)),
        "len17": (2, 17, 17, 2, 2, 32, F32, {}),
        "len17_causal": (2, 17, 17, 2, 2, 32, F32, dict(causal=True)),
        "len100": (1, 100, 100, 2, 2, 32, F32, {}),
        "len100_causal": (1, 100, 100, 2, 2, 32, F32, dict(causal=True)),
        "q17_k100": (1, 17, 100, 2, 1, 32, F32, {}),
        "q100_k17_causal": (1, 100, 17, 2, 1, 32, F32, dict(causal=True)),
        "d16_scale": (1, 33, 33, 2, 2, 16, F32, dict(causal=True, softmax_scale=0.3)),
        "d64": (1, 48, 40, 2, 1, 64, F32, dict(causal=True)),
        "d128": (1, 40, 48, 1, 1, 128, F32, {}),
    },
    "offsets": {
        "q_after_k": (1, 33, 40, 4, 2, 32, F32, dict(causal=True, q_offset=40)),
        "q_before_k_all_empty": (1, 20, 30, 4, 2, 32, F32, dict(causal=True, k_offset=50)),
        "overlap": (2, 37, 45, 4, 2, 32, F32, dict(causal=True, q_offset=10)),
        "same_start_unequal": (1, 17, 23, 4, 2, 32, F32, dict(causal=True, q_offset=5, k_offset=5)),
        "negative_k_offset": (1, 23, 31, 2, 2, 32, F32, dict(causal=True, k_offset=-8)),
        "partly_empty": (1, 40, 40, 2, 1, 32, F32, dict(causal=True, k_offset=20)),
    },
    "gqa": {
        "1to1": (2, 40, 40, 2, 2, 32, F32, dict(causal=True)),
        "4to1": (1, 40, 50, 4, 1, 32, F32, {}),
        "4to1_causal": (1, 50, 50, 8, 2, 32, F32, dict(causal=True)),
        "8to1_causal": (1, 45, 45, 8, 1, 32, F32, dict(causal=True, q_offset=3)),
    },
    "masks": {
        "window0": (1, 40, 40, 2, 1, 32, F32, dict(causal=True, window_left=0)),
        "window6_causal": (1, 70, 70, 2, 2, 32, F32, dict(causal=True, window_left=6)),
        "window13": (1, 100, 100, 2, 2, 32, F32, dict(window_left=13)),
        "window_offsets": (1, 50, 60, 2, 1, 32, F32, dict(causal=True, window_left=20, q_offset=30, k_offset=5)),
        "docs": (2, 50, 50, 2, 1, 32, F32, dict(docs=DOCS_50)),
        "docs_causal_window": (2, 50, 50, 4, 1, 32, F32, dict(causal=True, window_left=6, docs=DOCS_50)),
    },
    # Off-by-one errors in block bounds only show when a mask edge lands on a block edge: sweep the
    # edge through every residue of the interpreter's 16/32-wide blocks on a tiny problem.
    "edges": {
        **{f"window{w}": (1, 40, 47, 1, 1, 16, F32, dict(window_left=w)) for w in range(0, 33)},
        **{f"causal_q_offset{o}": (1, 40, 47, 1, 1, 16, F32, dict(causal=True, q_offset=o)) for o in range(-1, 32)},
        **{f"causal_window_k_offset{o}": (1, 41, 40, 1, 1, 16, F32, dict(causal=True, window_left=9, k_offset=o))
           for o in range(0, 16)},
    },
    "fp16": {
        "causal_gqa": (2, 64, 64, 4, 2, 64, F16, dict(causal=True)),
        "ragged_offsets": (1, 50, 70, 4, 1, 32, F16, dict(causal=True, q_offset=20)),
        "window_docs": (2, 50, 50, 2, 2, 32, F16, dict(causal=True, window_left=9, docs=DOCS_50)),
        "d128": (1, 40, 40, 2, 2, 128, F16, {}),
    },
    # The dK/dV kernel's TMA-descriptor loads of Q/dO (forced by SEQPAR_TRITON_TMA=1 in the child; the
    # interpreter emulates descriptors, zero fill of rows >= Sq included). Both dQ modes per case.
    "tma": {
        "ragged_gqa4_causal": (2, 37, 37, 8, 2, 32, F32, dict(causal=True)),
        "ragged_noncausal": (1, 45, 50, 2, 2, 32, F32, {}),
        "offsets_gqa4": (1, 33, 47, 4, 1, 16, F32, dict(causal=True, q_offset=20, k_offset=5)),
        "window_docs": (2, 50, 50, 4, 1, 32, F32, dict(causal=True, window_left=6, docs=DOCS_50)),
        "fp16_causal_gqa4": (1, 45, 45, 4, 1, 64, F16, dict(causal=True, q_offset=3)),
        "fp16_window_docs": (2, 50, 50, 2, 2, 32, F16, dict(window_left=9, docs=DOCS_50)),
    },
}
TMA_ENV = "SEQPAR_TRITON_TMA"


def _inputs(spec, seed):
    b, sq, sk, h, hkv, d, dtype, opts = spec
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    q, k, v, dout = mk(b, sq, h, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, h, d)
    opts = dict(opts)
    docs = opts.pop("docs", None)
    if docs is not None:
        opts["q_doc_ids"] = opts["k_doc_ids"] = torch.tensor(docs)
    return q, k, v, dout, opts


def _close(name, got, ref, tol):
    """Error message comparing ``got`` with float64 ``ref``, or None."""
    got = got.double()
    if torch.isnan(got).any():
        return f"{name}: NaN"
    if "rel" in tol:
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        return None if err <= tol["rel"] else f"{name}: relative norm error {err:.2e} > {tol['rel']}"
    try:
        torch.testing.assert_close(got, ref, **tol)
    except AssertionError as e:
        return f"{name}: {str(e).splitlines()[0]} {str(e).splitlines()[2] if len(str(e).splitlines()) > 2 else ''}"
    return None


def _check_case(spec, seed, dq_mode):
    """Forward (out, lse) and backward (dq, dk, dv) of the functional API vs the float64 reference."""
    from reference import naive_attention
    from seqpar.ops import attention_triton as at

    q, k, v, dout, opts = _inputs(spec, seed)
    tol = TOL[spec[6]]
    out, lse = at.forward(q, k, v, **opts)
    dq, dk, dv = at.backward(dout, q, k, v, out, lse, dq_mode=dq_mode, **opts)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, **opts)
    (ref_out * dout.double()).sum().backward()
    errs = [] if lse.dtype == torch.float32 and dq.dtype == torch.float32 else ["lse/grads must be float32"]
    finite = ref_lse > float("-inf")
    if not torch.equal(torch.isneginf(lse), ~finite) or torch.isnan(lse).any():
        errs.append("lse: -inf pattern differs from the reference (or NaN)")
    if finite.any():
        errs.append(_close("lse", lse[finite], ref_lse[finite], TOL[F32] if "rel" not in tol else dict(rel=1e-3)))
    for name, got, ref in (("out", out, ref_out), ("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        errs.append(_close(name, got, ref, tol))
    return [e for e in errs if e]


def _check_ring(seed):
    """Ring use: in-kernel merge of two key halves, accumulated grads, global delta, atomic dQ, autograd."""
    from reference import naive_attention
    from seqpar.ops import attention_triton as at
    from seqpar.ops import attention_with_lse
    from seqpar.ops.attention_triton_bwd import attention_bwd_launch

    errs = []
    spec = (2, 37, 52, 4, 2, 32, F32, dict(causal=True, q_offset=20))
    q, k, v, dout, opts = _inputs(spec, seed)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, **opts)
    (ref_out * dout.double()).sum().backward()
    # Forward in two ring steps: keys [0, 30) then [30, 52), merged in-kernel into a running fp32 pair.
    out_acc = torch.zeros(q.shape, dtype=torch.float32)
    lse_acc = torch.full((2, 4, 37), float("-inf"))
    for lo, hi in ((0, 30), (30, 52)):
        r = at.forward(q, k[:, lo:hi], v[:, lo:hi], causal=True, q_offset=20, k_offset=lo, out_acc=out_acc,
                       lse_acc=lse_acc)
        if r[0] is not out_acc or r[1] is not lse_acc:
            errs.append("merge mode must return the running buffers")
    errs += [_close("merged out", out_acc, ref_out, TOL[F32]), _close("merged lse", lse_acc, ref_lse, TOL[F32])]
    # Backward per ring step with the global (out, lse, delta), summed into fp32 buffers in-kernel.
    delta = (dout * out_acc).sum(-1).transpose(1, 2).contiguous()
    for mode in ("kernel", "atomic"):
        dq = torch.zeros(q.shape)
        dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
        for lo, hi in ((0, 30), (30, 52)):
            dk_s, dv_s = dk[:, lo:hi], dv[:, lo:hi]  # views: the kernel adds into the slices in place
            attention_bwd_launch(dout, q, k[:, lo:hi], v[:, lo:hi], out_acc, lse_acc, causal=True, softmax_scale=None,
                                 q_offset=20, k_offset=lo, window_left=None, delta=delta, dq_acc=dq, dk_acc=dk_s,
                                 dv_acc=dv_s, dq_mode=mode)
        errs += [_close(f"{mode} ring {n}", g, r, TOL[F32]) for n, g, r in
                 (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad))]
    # Autograd through the dispatcher, fp16, non-contiguous q (a transposed view with unit last stride).
    q16, k16, v16 = (t.to(F16) for t in (q, k, v))
    q16 = q16.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k16, v16 = k16.requires_grad_(), v16.requires_grad_()
    out, lse = attention_with_lse(q16, k16, v16, backend="triton", **opts)
    (out * dout.to(F16)).sum().backward()
    errs += [_close(f"autograd {n}", g, r, TOL[F16]) for n, g, r in
             (("out", out, ref_out), ("dq", q16.grad, qr.grad), ("dk", k16.grad, kr.grad), ("dv", v16.grad, vr.grad))]
    if q16.grad.dtype != F16:
        errs.append("autograd grads must come back in the input dtype")
    if not at.supports(q16, k16) or at.supports(q16.bfloat16(), k16.bfloat16()):
        errs.append("supports(): fp16 must be supported and bf16 refused under the interpreter")
    try:
        at.forward(torch.zeros(1, 4, 2, 24), torch.zeros(1, 4, 2, 24), torch.zeros(1, 4, 2, 24))
        errs.append("head_dim 24 must raise ValueError")
    except ValueError:
        pass
    return [e for e in errs if e]


def _count_descriptors():
    """Count the interpreter's tensor-descriptor creations (proof that the TMA path ran)."""
    from triton.runtime import interpreter
    made = []
    create = interpreter.InterpreterBuilder.create_make_tensor_descriptor

    def counting(self, *args, **kwargs):
        made.append(1)
        return create(self, *args, **kwargs)

    interpreter.InterpreterBuilder.create_make_tensor_descriptor = counting
    return made


def _check_tma_mode():
    """tma_mode(): forced TMA only where legal; the env var read per call."""
    from seqpar.ops.attention_triton_bwd import tma_mode
    errs = []
    x = torch.zeros(2, 8, 2, 16)
    odd = torch.zeros(2 * 8 * 2 * 16 + 1)[1:].view(2, 8, 2, 16)  # base 4 bytes past alignment
    narrow = torch.zeros(2, 8, 2, 18)[..., :16]  # row stride 72 bytes
    if tma_mode(x, x) != 2:
        errs.append("SEQPAR_TRITON_TMA=1 must force TMA for aligned inputs")
    if tma_mode(x, odd) != 0 or tma_mode(narrow, x) != 0:
        errs.append("unaligned base or stride must fall back to pointers")
    for env, want in (("0", 0), ("", 0)):  # pointers, and the interpreter's default
        os.environ[TMA_ENV] = env
        if tma_mode(x, x) != want:
            errs.append(f"{TMA_ENV}={env!r}: tma_mode must be {want}")
    os.environ[TMA_ENV] = "1"
    return errs


def _child_main(group: str) -> None:
    """Entry in the interpreter subprocess: run one group, print {case: [errors]} as the last line."""
    sys.path[:0] = [ROOT, TESTS]
    results = {}
    made = _count_descriptors() if group == "tma" else None
    if group == "tma":
        results["tma_mode"] = _check_tma_mode()
    if group == "ring":
        results["ring"] = _check_ring(seed=7)
    else:
        for i, (name, spec) in enumerate(GROUPS[group].items()):
            # dQ both ways: the separate kernel and atomics from the dK/dV kernel (alternating; both
            # on the edge sweeps and the TMA cases, where an off-by-one in either kernel would show).
            modes = ("kernel", "atomic") if group in ("edges", "tma") else (("kernel", "atomic")[i % 2],)
            for mode in modes:
                try:
                    errs = _check_case(spec, 1000 + i, mode)
                except Exception as e:  # report, don't hide, the rest of the group
                    errs = [f"raised {type(e).__name__}: {e}"]
                results[f"{name}[{mode}]"] = errs
    if made is not None and not made:
        results["tma_used"] = ["no tensor descriptor was created: the TMA path did not run"]
    print(json.dumps(results))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("group", [*GROUPS, "ring"])
def test_interpreter(group):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    env.pop(TMA_ENV, None)  # the interpreter's default (pointer loads) unless the group forces TMA
    if group == "tma":
        env[TMA_ENV] = "1"
    r = subprocess.run([sys.executable, os.path.abspath(__file__), group], env=env, capture_output=True, text=True,
                       timeout=230)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    failed = {name: errs for name, errs in results.items() if errs}
    assert not failed, json.dumps(failed, indent=1)


def test_dkdv_tma_candidates():
    """Which dK/dV configs the autotuner times per tma_mode (0 pointers, 1 both on sm90+, 2 TMA only)."""
    from seqpar.ops import attention_triton_bwd as bw
    configs = bw._both(bw._all(bw.DKDV_CONFIGS))
    q16 = torch.zeros(1, dtype=torch.float16)

    def picked(mode, d=128, tuned=1, q=q16):
        cfgs = bw.prune_dkdv(configs, dict(Q=q, HEAD_DIM=d), tma_mode=mode, tune_size=tuned)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.kwargs["USE_TMA"]) for c in cfgs]

    n128, t128 = len(bw.DKDV_CONFIGS[128]), len(bw.DKDV_TMA_CONFIGS[128])
    assert not any(t for *_, t in picked(0)) and len(picked(0)) == n128
    both = picked(1)
    assert sum(t for *_, t in both) == t128 and len(both) == n128 + t128
    assert all(t for *_, t in picked(2)) and len(picked(2)) == n128
    assert picked(1, tuned=0) == [picked(0)[0]]  # small problems: the GPU-tested pointer default only
    assert picked(1, d=256) == picked(0, d=256)  # no TMA candidate where none was measured
    assert picked(2, q=torch.zeros(1)) == [(32, 32, 2, True)]  # fp32 keeps its one small tile
    assert picked(1, q=torch.zeros(1)) == [(32, 32, 2, False)]


# ------------------------------------------------------------------------------------------------
# GPU: bf16 at realistic sizes. Errors are relative norms vs float64; the bar is torch's own bf16.
# ------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _ref64(q, k, v, dout, *, causal=False, q_offset=0, k_offset=0, window_left=None, q_doc_ids=None,
           k_doc_ids=None):
    """Float64 attention on the GPU (reference.py builds its masks on the CPU), with gradients."""
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = _mask(q.shape[1], k.shape[1], q.device, causal, q_offset, k_offset, window_left, q_doc_ids, k_doc_ids)
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr.repeat_interleave(g, 2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr.repeat_interleave(g, 2))
    (out * dout.double()).sum().backward()
    return out, torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1), qr.grad, kr.grad, vr.grad


def _mask(sq, sk, device, causal, q_offset, k_offset, window_left, q_doc_ids, k_doc_ids):
    """Visibility ``[B or 1, 1, Sq, Sk]`` (True = attend), the rules of attention_torch."""
    diff = (torch.arange(sq, device=device) + q_offset)[:, None] - (torch.arange(sk, device=device) + k_offset)[None]
    m = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        m &= diff >= 0
    if window_left is not None:
        m &= diff <= window_left
    m = m[None, None]
    if q_doc_ids is not None:
        m = m & (q_doc_ids[:, :, None] == k_doc_ids[:, None, :])[:, None]
    return m


def _sdpa_bf16(q, k, v, dout, mask):
    qs, ks, vs = (t.detach().clone().transpose(1, 2).requires_grad_() for t in (q, k, v))  # [B, H, S, D]
    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
    out.backward(dout.transpose(1, 2))
    return [t.transpose(1, 2) for t in (out, qs.grad, ks.grad, vs.grad)]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


GPU_CASES = {
    "causal_gqa_d128": (2, 2048, 2048, 16, 4, 128, dict(causal=True)),
    "noncausal_d64_ragged": (2, 1999, 1999, 8, 8, 64, {}),
    "q_after_k_d128": (1, 1024, 1536, 8, 2, 128, dict(causal=True, q_offset=1536)),
    "overlap_window_d64": (1, 1500, 1700, 8, 1, 64, dict(causal=True, q_offset=300, window_left=257)),
    "docs_causal_d128": (2, 1024, 1024, 8, 2, 128, dict(causal=True, docs=True)),
}


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bf16_vs_sdpa_error(case):
    from seqpar.ops import attention_with_lse
    b, sq, sk, h, hkv, d, opts = GPU_CASES[case]
    torch.manual_seed(0)
    dev = "cuda"
    q, dout = (torch.randn(b, sq, h, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    opts = dict(opts)
    if opts.pop("docs", False):  # random document boundaries, the same for queries and keys
        bounds = torch.sort(torch.randint(0, sq, (b, 6), device=dev), -1).values
        opts["q_doc_ids"] = opts["k_doc_ids"] = (torch.arange(sq, device=dev)[None, :, None] >= bounds[:, None]).sum(-1)
    # Poison the allocator's free blocks so an element the kernels never write shows up as NaN.
    torch.empty(8 << 30, dtype=torch.uint8, device=dev).fill_(0xFF)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_with_lse(qt, kt, vt, backend="triton", **opts)
    out.backward(dout)
    ref = _ref64(q, k, v, dout, **opts)
    mask = _mask(sq, sk, dev, opts.get("causal", False), opts.get("q_offset", 0), opts.get("k_offset", 0),
                 opts.get("window_left"), opts.get("q_doc_ids"), opts.get("k_doc_ids"))
    sdpa = _sdpa_bf16(q, k, v, dout, mask.expand(b, 1, sq, sk))
    ours = (out, qt.grad, kt.grad, vt.grad)
    for name, got, bar, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, (ref[0], *ref[2:])):
        assert not torch.isnan(got).any(), f"{name}: NaN"
        err, err_sdpa = _rel(got, r), _rel(bar, r)
        print(f"{case} {name}: triton {err:.2e} sdpa {err_sdpa:.2e}")
        # bf16 rounding of p and dS dominates both: within 2x of torch's own bf16 error (+ slack for tiny errors).
        assert err <= 2 * err_sdpa + 1e-3, f"{name}: triton {err:.2e} vs sdpa-bf16 {err_sdpa:.2e}"
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isneginf(lse), ~finite)
    assert (lse[finite] - ref[1][finite]).abs().max().item() < 2e-2  # lse from bf16 q, k: ~1e-3 typical


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ring_merge_and_atomic_dq():
    from seqpar.ops import attention_triton as at
    from seqpar.ops.attention_triton_bwd import attention_bwd_launch
    torch.manual_seed(1)
    b, s, h, hkv, d = 1, 4096, 8, 2, 128
    q, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = at.forward(q, k, v, causal=True)
    out_acc = torch.zeros(q.shape, device="cuda")
    lse_acc = torch.full((b, h, s), float("-inf"), device="cuda")
    for lo in range(0, s, 1024):
        at.forward(q, k[:, lo:lo + 1024], v[:, lo:lo + 1024], causal=True, k_offset=lo, out_acc=out_acc, lse_acc=lse_acc)
    assert _rel(out_acc, out.double()) < 1e-2 and (lse_acc - lse).abs().max().item() < 1e-3
    grads = [attention_bwd_launch(dout, q, k, v, out, lse, causal=True, softmax_scale=None, q_offset=0, k_offset=0,
                                  window_left=None, dq_mode=mode) for mode in ("kernel", "atomic")]
    for a, c in zip(*grads):
        assert _rel(c, a.double()) < 1e-3  # same math, fp32 sums in another order


if __name__ == "__main__":
    _child_main(sys.argv[1])
