"""The ring's fused merge/accumulate kernels (seqpar.ops.attention.triton.merge_kernel) and the running
accumulators (seqpar.ops.accumulate) against the float64 torch reference (seqpar.ops.merge).

The Triton cases run in Triton's CPU interpreter, which must be switched on before triton is first imported,
so they run in a child process (this file as a script) with TRITON_INTERPRET=1 and report failures as JSON
(as tests/unit/test_attention_triton.py does). The torch-path cases run in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NEG = float("-inf")

# Tolerances vs float64, on O(1) data and lse up to ~|10|: fp32 arithmetic (exp/log ulps, one fp32
# rounding of the store) gives ~4e-7; 2e-6 leaves room. A fp16/bf16 store rounds once more: half an ulp
# (2^-11 relative for fp16, 2^-8 for bf16), so the error bound is one ulp of the stored value.
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=1e-3, rtol=1e-3),
       torch.bfloat16: dict(atol=8e-3, rtol=8e-3)}
# (B, S, H, D, start, Sb): odd sizes, a head dim that is not a power of two, a window at either end.
SHAPES = [(2, 37, 3, 24, 4, 13), (1, 17, 2, 16, 0, 17), (1, 40, 1, 128, 27, 13), (3, 5, 2, 33, 0, 1)]


def _inputs(shape, dtype, seed):
    b, s, h, d, start, sb = shape
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype)
    o = torch.randn(b, sb, h, d, generator=g, dtype=torch.float64).to(dtype)
    la = (3 * torch.randn(b, h, s, generator=g)).float()
    lb = (3 * torch.randn(b, h, sb, generator=g)).float()
    # Fully masked rows: -inf on either side, on both (then out 0, lse -inf, never NaN), and an a-row
    # that is -inf with out 0 as the kernels give it.
    la[0, 0, : s // 2] = NEG
    a[0, : s // 2, 0] = 0
    lb[0, 0, ::2] = NEG
    o[0, ::2, 0] = 0
    lb[-1, -1, -1] = NEG
    o[-1, -1, -1] = 0
    return a, la, o, lb, start


def _ref_merge(a, la, o, lb, start):
    from seqpar.ops.merge import merge_rows
    out, lse = a.double().clone(), la.double().clone()
    return merge_rows(out, lse, o.double(), lb.double(), start, out, "torch")


def _errors(name, got, ref, tol):
    if torch.isnan(got).any():
        return [f"{name}: NaN"]
    try:
        torch.testing.assert_close(got.double(), ref, **tol, equal_nan=False)
    except AssertionError as e:
        return [f"{name}: {str(e).splitlines()[0]}"]
    return []


def _check_merge(impl, dtype, out_dtype, in_place, seed):
    from seqpar.ops.merge import merge_rows
    errs = []
    for shape in SHAPES:
        a, la, o, lb, start = _inputs(shape, dtype, seed)
        ref_out, ref_lse = _ref_merge(a, la, o, lb, start)
        lse = la.clone()
        if in_place:
            out = a.clone().to(out_dtype)
            a_in = out
        else:
            a_in, out = a, torch.full(a.shape, float("nan"), dtype=out_dtype)  # every row must be written
        got, got_lse = merge_rows(a_in, lse, o, lb, start, out, impl)
        tag = f"{impl} merge {shape} {dtype}->{out_dtype} in_place={in_place}"
        if got is not out or got_lse is not lse:
            errs.append(f"{tag}: must return the given buffers")
        if not torch.equal(torch.isneginf(got_lse), torch.isneginf(ref_lse)):
            errs.append(f"{tag}: lse -inf pattern differs")
        finite = ref_lse > NEG
        errs += _errors(f"{tag} lse", got_lse[finite], ref_lse[finite], TOL[torch.float32])
        errs += _errors(f"{tag} out", got, ref_out, TOL[out_dtype])
    return errs


def _check_add(impl, dtype, out_dtype, has_a, in_place, seed):
    from seqpar.ops.merge import add_rows
    errs = []
    for shape in SHAPES:
        a, _, b, _, start = _inputs(shape, dtype, seed)
        a = a.float() if out_dtype == torch.float32 else a
        ref = torch.zeros(a.shape, dtype=torch.float64) if not has_a else a.double().clone()
        ref[:, start:start + b.shape[1]] += b.double()
        a_in = a.clone().to(out_dtype) if in_place else a
        out = a_in if in_place else torch.full(a.shape, float("nan"), dtype=out_dtype)
        got = add_rows(a_in if has_a else None, b[:, :], start, out, impl)
        tag = f"{impl} add {shape} {dtype}->{out_dtype} has_a={has_a} in_place={in_place}"
        if got is not out:
            errs.append(f"{tag}: must return out")
        errs += _errors(tag, got, ref, TOL[out_dtype])
    return errs


def _check_strided(impl):
    """Views with non-unit strides (a kernel's [B, H, S, D] output seen as [B, S, H, D], a row slice)."""
    from seqpar.ops.merge import add_rows, merge_rows
    a, la, o, lb, start = _inputs((2, 37, 3, 24, 4, 13), torch.float32, 3)
    o_t = o.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Sb, H, D] with H-major strides
    lb_t = lb.transpose(1, 2).contiguous().transpose(1, 2)
    ref_out, ref_lse = _ref_merge(a, la, o, lb, start)
    lse = la.clone()
    got, got_lse = merge_rows(a, lse, o_t, lb_t, start, torch.empty_like(a), impl)
    errs = _errors("strided merge out", got, ref_out, TOL[torch.float32])
    full = torch.zeros(2, 50, 3, 24)
    view = full[:, 5:42]  # a row window of a bigger buffer, added into in place
    add_rows(view, o_t, start, view, impl)
    ref = torch.zeros(2, 50, 3, 24, dtype=torch.float64)
    ref[:, 5 + start:5 + start + 13] = o.double()
    return errs + _errors("strided add", full, ref, TOL[torch.float32])


def _check_accumulators(impl, dtype):
    """RunningAttention/RunningSum over row windows (first partial kept, fp32 after, final dtype on the
    last update) vs float64 merges and sums of the same partials."""
    from seqpar.ops.accumulate import RunningAttention, RunningSum
    from seqpar.ops.merge import merge_attention
    g = torch.Generator().manual_seed(11)
    b, s, h, d = 2, 19, 3, 24
    # Windows as a ring's calls give them: all rows first, then a tail, all rows, the head (last).
    windows = [(0, s), (9, s), (0, s), (0, 9)]
    errs = []
    for first_partial in (False, True):
        wins = windows[1:] if first_partial else windows
        parts = [(torch.randn(b, hi - lo, h, d, generator=g, dtype=torch.float64).to(dtype),
                  (2 * torch.randn(b, h, hi - lo, generator=g)).float(), lo) for lo, hi in wins]
        ref_o, ref_l = torch.zeros(b, s, h, d, dtype=torch.float64), torch.full((b, h, s), NEG, dtype=torch.float64)
        ref_sum = torch.zeros(b, s, h, d, dtype=torch.float64)
        run, acc = RunningAttention((b, s, h, d), dtype, "cpu", impl), RunningSum((b, s, h, d), dtype, "cpu", impl)
        for i, (o, lse, lo) in enumerate(parts):
            rows = slice(lo, lo + o.shape[1])
            ref_o[:, rows], ref_l[:, :, rows] = merge_attention(ref_o[:, rows], ref_l[:, :, rows], o.double(),
                                                                lse.double())
            ref_sum[:, rows] += o.double()
            run.add(o, lse, lo, final=i == len(parts) - 1)
            acc.add(o.clone(), lo, final=i == len(parts) - 1)  # each accumulator owns what it is given
        out, lse = run.result()
        total = acc.result()
        tag = f"{impl} accumulators {dtype} first_partial={first_partial}"
        if out.dtype != dtype or total.dtype != dtype or lse.dtype != torch.float32:
            errs.append(f"{tag}: dtypes {out.dtype}, {total.dtype}, {lse.dtype}")
        errs += _errors(f"{tag} out", out, ref_o, TOL[dtype]) + _errors(f"{tag} lse", lse, ref_l, TOL[torch.float32])
        errs += _errors(f"{tag} sum", total, ref_sum, TOL[dtype])
        incoming = torch.randn(b, s, h, d, generator=g)
        errs += _errors(f"{tag} added_to", acc.added_to(incoming.clone(), torch.float32), ref_sum + incoming.double(),
                        TOL[torch.float32] if dtype == torch.float32 else TOL[dtype])
    return errs


def _all_checks(impl, dtypes):
    results = {}
    for dt in dtypes:
        for out_dt in sorted({torch.float32, dt}, key=str):
            for in_place in (False, True):
                results[f"merge {dt}->{out_dt} in_place={in_place}"] = _check_merge(impl, dt, out_dt, in_place, 1)
                for has_a in (False, True):
                    if in_place and not has_a:
                        continue
                    results[f"add {dt}->{out_dt} a={has_a} in_place={in_place}"] = _check_add(
                        impl, dt, out_dt, has_a, in_place, 2)
        results[f"accumulators {dt}"] = _check_accumulators(impl, dt)
    results["strided"] = _check_strided(impl)
    return results


def _child_main() -> None:
    sys.path[:0] = [ROOT]
    print(json.dumps(_all_checks("triton", (torch.float32, torch.float16))))


@pytest.mark.timeout(300)
def test_triton_merge_kernels_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=290)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    failed = {name: errs for name, errs in results.items() if errs}
    assert not failed, json.dumps(failed, indent=1)


def test_torch_reference_paths():
    # The reference in this process, bf16 included (fp32 arithmetic, one rounding at the store).
    failed = {n: e for n, e in _all_checks("torch", (torch.float32, torch.float16, torch.bfloat16)).items() if e}
    assert not failed, json.dumps(failed, indent=1)


def test_merge_impl_choice():
    from seqpar.ops.merge import merge_impl
    x = torch.zeros(1, 2, 1, 8)
    assert merge_impl("auto", x) == "torch"  # CPU: the reference
    assert merge_impl("torch", x) == "torch"
    assert merge_impl("triton", x.double()) == "torch"  # fp64 accumulates on the reference only
    with pytest.raises(ValueError, match="merge='fast' is not one of"):
        merge_impl("fast", x)


def test_first_partial_is_kept_and_final_update_writes_the_final_dtype():
    # No cast passes: a lone partial over all rows is the result itself; the last merge writes bf16.
    from seqpar.ops.accumulate import RunningAttention, RunningSum
    o, lse = torch.randn(1, 6, 2, 8).bfloat16(), torch.randn(1, 2, 6)
    run = RunningAttention((1, 6, 2, 8), torch.bfloat16, "cpu")
    run.add(o, lse, 0, final=False)
    assert run.result()[0] is o
    run.add(torch.randn(1, 4, 2, 8).bfloat16(), torch.randn(1, 2, 4), 2, final=True)
    assert run.out is o and run.out.dtype == torch.bfloat16  # merged in place: rows 0, 1 hold one partial
    acc = RunningSum((1, 6, 2, 8), torch.bfloat16, "cpu")
    acc.add(o, 0)
    assert acc.added_to(None) is o  # step 0 of a classic ring sends the kernel's own gradient


if __name__ == "__main__":
    _child_main()
