"""Triton attention kernels against the float64 reference.

CPU (CI): Triton's interpreter, which must be switched on before triton is first imported; other test
modules of the same pytest process may import it earlier, so each group of cases runs in a child
process (this file run as a script) with TRITON_INTERPRET=1, and reports its failures as JSON.
GPU cases (bf16 at realistic sizes) live in tests/gpu/test_attention_triton_gpu.py.
"""
from __future__ import annotations

import json
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


def _split(opts):
    """Per-call keywords -> (LocalMask, softmax_scale) of the functional triton API."""
    from seqpar.ops.attention.mask import LocalMask
    opts = dict(opts)
    scale = opts.pop("softmax_scale", None)
    return LocalMask(**opts), scale


def _inputs(spec, seed):
    b, sq, sk, h, hkv, d, dtype, opts = spec
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    q, k, v, dout = mk(b, sq, h, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, h, d)
    if "mask" in opts:
        return q, k, v, dout, opts
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
    from reference import global_mask_case, naive_attention
    from seqpar.ops.attention.triton import function as at

    q, k, v, dout, opts = _inputs(spec, seed)
    tol = TOL[spec[6]]
    if "mask" in opts:  # a Mask(...) case (test_attention_triton_masks.py)
        (mask, opts), scale = global_mask_case(spec), None
    else:
        mask, scale = _split(opts)
    out, lse = at.forward(q, k, v, mask, softmax_scale=scale)
    dq, dk, dv = at.backward(dout, q, k, v, out, lse, mask, softmax_scale=scale, dq_mode=dq_mode)
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
    from seqpar.ops import Mask, attention_with_lse
    from seqpar.ops.attention.mask import LocalMask
    from seqpar.ops.attention.registry import RECORDS
    from seqpar.ops.attention.triton import function as at
    from seqpar.ops.attention.triton.bwd_launch import attention_bwd_launch

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
        r = at.forward(q, k[:, lo:hi], v[:, lo:hi], LocalMask(causal=True, q_offset=20, k_offset=lo), out_acc=out_acc,
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
            attention_bwd_launch(dout, q, k[:, lo:hi], v[:, lo:hi], out_acc, lse_acc,
                                 LocalMask(causal=True, q_offset=20, k_offset=lo), softmax_scale=None, delta=delta,
                                 dq_acc=dq, dk_acc=dk_s, dv_acc=dv_s, dq_mode=mode)
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
    rec, full = RECORDS["triton"], LocalMask()
    if rec.missing(q16, k16, full) is not None or rec.missing(q16.bfloat16(), k16.bfloat16(), full) is None:
        errs.append("registry: fp16 must be supported and bf16 refused under the interpreter")
    try:
        at.forward(torch.zeros(1, 4, 2, 24), torch.zeros(1, 4, 2, 24), torch.zeros(1, 4, 2, 24))
        errs.append("head_dim 24 must raise ValueError")
    except ValueError:
        pass
    # mask=Mask(...) equals the per-call keywords (global doc ids sliced by the offsets), and the
    # reference; a kind the kernel does not declare (sinks) is refused by the registry.
    docs = torch.tensor(DOCS_50)  # [2, 50] global ids
    qm, km, vm, _, _ = _inputs((2, 20, 30, 4, 2, 32, F32, {}), seed + 1)
    for m, kw in ((Mask(causal=True, window=6, doc_ids=docs), dict(causal=True, window_left=6)),
                  (Mask(causal=False, doc_ids=docs), {})):
        got = attention_with_lse(qm, km, vm, mask=m, q_offset=25, k_offset=10, backend="triton")
        old = attention_with_lse(qm, km, vm, q_offset=25, k_offset=10, q_doc_ids=docs[:, 25:45],
                                 k_doc_ids=docs[:, 10:40], backend="triton", **kw)
        ref = naive_attention(qm, km, vm, q_offset=25, k_offset=10, q_doc_ids=docs[:, 25:45],
                              k_doc_ids=docs[:, 10:40], **kw)
        if not (torch.equal(got[0], old[0]) and torch.equal(got[1], old[1])):
            errs.append(f"mask={m.kinds}: Mask and keywords must give identical results")
        errs += [_close(f"mask {sorted(m.kinds)} out", got[0], ref[0], TOL[F32])]
    # Every kind is declared now: a Mask with sinks runs on triton and equals the reference.
    m = Mask(causal=True, window=3, sinks=2, doc_ids=docs)
    got = attention_with_lse(qm, km, vm, mask=m, q_offset=25, k_offset=10, backend="triton")
    ref = attention_with_lse(qm, km, vm, mask=m, q_offset=25, k_offset=10, backend="torch")
    errs += [_close("mask sinks out", got[0], ref[0].double(), TOL[F32])]
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
    from seqpar.ops.attention.triton.bwd_launch import tma_mode
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
        if tma_mode(x, x, tma=True) != 2:  # an explicit argument beats the environment
            errs.append(f"{TMA_ENV}={env!r}: tma=True must force TMA")
    os.environ[TMA_ENV] = "1"
    if tma_mode(x, x, tma=False) != 0:
        errs.append("tma=False must force pointers over the environment")
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
    from seqpar.ops.attention.triton import bwd as bw
    from seqpar.ops.attention.triton.common import _all
    configs = bw._both(_all(bw.DKDV_CONFIGS, bw.INTERPRET_DKDV_CONFIG))
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


if __name__ == "__main__":
    _child_main(sys.argv[1])
