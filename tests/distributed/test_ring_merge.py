"""The ring's per-step merge/accumulation passes on 2 and 3 gloo processes: ``merge="triton"`` (the fused
kernels, in Triton's CPU interpreter) against ``merge="torch"`` (the reference), and both against the
float64 naive attention, in half precision where the kept-as-given first partials, the fp32 hops, the
narrow first dK/dV hop of a classic plan and the final-dtype last merge all matter.
"""
import zlib

import pytest
import torch

from dist_utils import run_distributed
from reference import naive_attention

WORLD_SIZES = (2, 3)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Fused vs reference merge: the same fp32 arithmetic up to exp/log ulps, then one store: fp32 ~1e-7;
# fp16 and bf16 may round a value the other way (one ulp of the stored dtype on O(1) values).
SAME = {F32: dict(atol=1e-6, rtol=1e-6), F16: dict(atol=2e-3, rtol=2e-3), BF16: dict(atol=1.6e-2, rtol=1.6e-2)}
# vs float64 naive attention on the same (rounded) inputs, rows of <= 18 keys: the torch backend rounds
# p and the gradients to the input dtype: fp32 ~1e-6; fp16 ~1e-3 (ulp 2^-11 on O(1) values, a few
# roundings); bf16 8x that.
REF = {F32: dict(atol=2e-5, rtol=2e-5), F16: dict(atol=1e-2, rtol=1e-2), BF16: dict(atol=6e-2, rtol=6e-2)}


def _cases():
    cases = []
    for layout in ("zigzag", "striped", "contiguous"):
        for dtype in (F32, F16):
            cases.append(dict(name=f"{layout}-{str(dtype)[6:]}", layout=layout, dtype=dtype, merges=("torch", "triton")))
        cases.append(dict(name=f"{layout}-bfloat16", layout=layout, dtype=BF16, merges=("torch",)))
    # A windowed Mask: the generic plan (several calls a step, fp32 hops from step 0) on contiguous shards.
    cases.append(dict(name="window-contiguous-float16", layout="contiguous", dtype=F16, merges=("torch", "triton"),
                      window=4))
    return cases


CASES = _cases()


def _inputs(case, n):
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    s, b, h, hkv, d = 6 * n, 2, 4, 2, 16
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(case["dtype"])
    return mk(b, s, h, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, s, h, d)


def _run(case, n, merge):
    from seqpar.ops import Mask
    from seqpar.parallel import ring_attention_with_lse, shard_sequence, unshard_sequence

    layout = case["layout"]
    q, k, v, dout = _inputs(case, n)
    shard = lambda x: shard_sequence(x, 1, layout=layout)
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    masking = dict(mask=Mask(causal=True, window=case["window"])) if "window" in case else dict(causal=True)
    out, lse = ring_attention_with_lse(ql, kl, vl, layout=layout, backend="torch", merge=merge, **masking)
    (out.float() * shard(dout).float()).sum().backward()
    un = lambda x, dim=1: unshard_sequence(x.detach(), dim, layout=layout)
    return dict(out=un(out), lse=un(lse, 2), dq=un(ql.grad), dk=un(kl.grad), dv=un(vl.grad))


def _worker(rank, n, cases):
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton kernels in this child
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:
        have_triton = False
    return {(c["name"], m): _run(c, n, m) if (m == "torch" or have_triton) else None
            for c in cases for m in c["merges"]}


_RESULTS = {}


def _results(n):
    if n not in _RESULTS:
        _RESULTS[n] = run_distributed(_worker, n, CASES, timeout_s=280)[0]
    return _RESULTS[n]


def _reference(case, n):
    q, k, v, dout = (t.double().requires_grad_() for t in _inputs(case, n))
    out, lse = naive_attention(q, k, v, causal=True)
    (out * dout).sum().backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fused_merge_matches_reference_merge_and_float64(n, case):
    got = _results(n)
    ref = got[(case["name"], "torch")]
    for key, t in ref.items():
        assert not torch.isnan(t).any(), f"{case['name']} {key}: NaN"
        want = case["dtype"] if key != "lse" else F32
        assert t.dtype == want, f"{case['name']} {key}: {t.dtype}, expected {want}"
    if "window" not in case:  # the windowed mask against float64 is test_ring_masks.py's job
        exact = _reference(case, n)
        for key in exact:
            tol = REF[F32] if key == "lse" else REF[case["dtype"]]
            torch.testing.assert_close(ref[key].double(), exact[key], **tol, msg=lambda m: f"{case['name']} {key}: {m}")
    if "triton" in case["merges"]:
        fused = got[(case["name"], "triton")]
        if fused is None:
            pytest.skip("triton is not installed")
        for key in ref:
            tol = SAME[F32] if key == "lse" else SAME[case["dtype"]]
            assert fused[key].dtype == ref[key].dtype
            torch.testing.assert_close(fused[key].double(), ref[key].double(), **tol,
                                       msg=lambda m: f"{case['name']} {key} fused vs torch: {m}")


def test_unknown_merge_raises():
    from seqpar.parallel import ring_attention, make_ring_attn_fn

    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="merge='fast' is not one of"):
        ring_attention(q, q, q, causal=True, merge="fast")
    with pytest.raises(ValueError, match="merge='fast' is not one of"):
        make_ring_attn_fn(merge="fast")
