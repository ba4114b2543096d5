"""The pure-PyTorch blockwise kernel (the reference for every fast path) against naive float64 attention."""
import pytest
import torch

from reference import naive_attention
from seqpar.ops import attention, attention_with_lse, merge_attention
from seqpar.ops.attention.mask import LocalMask
from seqpar.ops.attention.reference import backward as reference_backward, forward as reference_forward

# fp32 blockwise vs float64 naive on O(1) random data: errors are ~1e-6; 2e-5 leaves room for long rows.
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
FP64_TOL = dict(atol=1e-10, rtol=1e-10)


def _inputs(b, sq, sk, h, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(b, sq, h, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)


def _check_against_naive(q, k, v, dout, tol, **opts):
    out, lse = attention_with_lse(q, k, v, backend="torch", **opts)
    (out * dout.to(out.dtype)).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, **opts)
    (ref_out * dout).sum().backward()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    finite = ref_lse > float("-inf")
    assert torch.equal(lse.isinf(), ~finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], **tol)
    for got, ref in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got.double(), ref, **tol)


@pytest.mark.parametrize("seq", [1, 7, 129])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (8, 2)])
def test_forward_backward_matches_naive(seq, causal, h, hkv):
    q, k, v, dout = _inputs(2, seq, seq, h, hkv, 16, torch.float32, seed=seq * 31 + h + hkv + causal)
    _check_against_naive(q, k, v, dout, FP32_TOL, causal=causal)


@pytest.mark.parametrize("q_offset,k_offset,sq,sk", [
    (40, 0, 33, 40),   # query block entirely after the key block
    (0, 50, 20, 30),   # query block entirely before: every row sees nothing
    (10, 0, 37, 45),   # overlapping
    (5, 5, 17, 23),    # unequal lengths, same start
])
def test_causal_offsets(q_offset, k_offset, sq, sk):
    q, k, v, dout = _inputs(1, sq, sk, 4, 2, 8, torch.float64, seed=q_offset + 7 * k_offset)
    _check_against_naive(q, k, v, dout, FP64_TOL, causal=True, q_offset=q_offset, k_offset=k_offset)


def test_window_and_documents():
    q, k, v, dout = _inputs(2, 50, 50, 4, 1, 8, torch.float64, seed=3)
    docs = torch.tensor([[0] * 20 + [1] * 30, [0] * 5 + [1] * 40 + [2] * 5])
    _check_against_naive(q, k, v, dout, FP64_TOL, causal=True, window_left=6, q_doc_ids=docs, k_doc_ids=docs)
    for t in (q, k, v):
        t.grad = None
    _check_against_naive(q, k, v, dout, FP64_TOL, causal=False, window_left=3)


def test_small_blocks_equal_large_blocks():
    # Block boundaries must not change the result: 5x3 blocks vs one block, float64.
    q, k, v, dout = _inputs(1, 23, 31, 2, 2, 8, torch.float64, seed=11)
    m = LocalMask(causal=True, k_offset=-8)
    a = reference_forward(q, k, v, m, block_q=5, block_k=3)
    b_ = reference_forward(q, k, v, m, block_q=1024, block_k=1024)
    torch.testing.assert_close(a, b_, **FP64_TOL)
    ga = reference_backward(dout, q, k, v, a[0], a[1], m, block_q=5, block_k=3)
    gb = reference_backward(dout, q, k, v, b_[0], b_[1], m)
    torch.testing.assert_close(ga, gb, **FP64_TOL)


def test_merge_of_two_key_halves_equals_whole():
    q, k, v, _ = _inputs(2, 19, 26, 4, 2, 8, torch.float64, seed=5)
    whole = naive_attention(q, k, v, causal=True, q_offset=10)
    a = reference_forward(q, k[:, :13], v[:, :13], LocalMask(causal=True, q_offset=10))
    b_ = reference_forward(q, k[:, 13:], v[:, 13:], LocalMask(causal=True, q_offset=10, k_offset=13))
    out, lse = merge_attention(*a, *b_)
    torch.testing.assert_close(out, whole[0], **FP64_TOL)
    torch.testing.assert_close(lse, whole[1], **FP64_TOL)


def test_no_key_rows_are_zero_not_nan():
    q, k, v, dout = _inputs(1, 4, 4, 2, 2, 8, torch.float32, seed=1)
    out, lse = attention_with_lse(q, k, v, causal=True, k_offset=100, backend="torch")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    (out * dout).sum().backward()
    assert all(torch.all(t.grad == 0) for t in (q, k, v))


def test_attention_returns_out_only_and_auto_is_torch_on_cpu():
    q, k, v, _ = _inputs(1, 9, 9, 2, 1, 8, torch.float32, seed=2)
    torch.testing.assert_close(attention(q, k, v, causal=True), attention_with_lse(q, k, v, causal=True, backend="torch")[0])


def test_bad_inputs_are_named():
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="not divisible"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="nope")
