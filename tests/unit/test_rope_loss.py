"""RoPE (tables, rotation, scalings) and the chunked cross-entropy against explicit references."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqpar.ops.loss import chunked_cross_entropy
from seqpar.ops.rope import apply_rope, compute_inv_freq, rope_cos_sin

# ---------------------------------------------------------------- RoPE


def complex_rope_reference(x, positions, inv_freq):
    """Rotation as complex multiplication: pair (x[i], x[i + D/2]) is the complex number x[i] + j x[i+D/2]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # [B, S, H, D/2]
    angles = positions.double()[..., None] * inv_freq.double()  # [B, S, D/2]
    z = z * torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # broadcast over heads
    return torch.cat((z.real, z.imag), dim=-1)


def test_default_inv_freq_is_theta_power():
    inv_freq, scale = compute_inv_freq(16, 10000.0)
    expected = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)], dtype=torch.float64)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (8,)
    assert scale == 1.0
    # float32 storage: relative 2^-24 ~ 6e-8 rounding, 1e-6 leaves margin for pow rounding.
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_apply_rope_matches_complex_rotation():
    torch.manual_seed(0)
    B, S, H, D = 2, 7, 3, 16
    x = torch.randn(B, S, H, D, dtype=torch.float64)
    # Non-contiguous, per-row different global positions, as a zigzag rank would hold.
    positions = torch.tensor([[0, 1, 2, 13, 14, 15, 900], [5, 3, 8, 1000, 2, 7, 4]])
    inv_freq, _ = compute_inv_freq(D, 10000.0)
    cos, sin = rope_cos_sin(positions, inv_freq)
    assert cos.shape == (B, S, D // 2) and cos.dtype == torch.float32
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == torch.float64
    # cos/sin are float32 by contract: angles up to 1000 rad round to ~6e-5 rad in fp32, so entries of
    # size ~3 can move by ~2e-4; the reference computes angles in float64.
    torch.testing.assert_close(out, complex_rope_reference(x, positions, inv_freq), rtol=0, atol=5e-4)
    # With small positions the only difference is fp32 cos/sin rounding (~1e-7).
    small = positions % 8
    cos, sin = rope_cos_sin(small, inv_freq)
    torch.testing.assert_close(apply_rope(x, cos, sin), complex_rope_reference(x, small, inv_freq), rtol=0, atol=1e-6)


def test_apply_rope_keeps_low_precision_dtype():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 2, 8)
    cos, sin = rope_cos_sin(torch.arange(5)[None], compute_inv_freq(8, 10000.0)[0])
    out_bf16 = apply_rope(x.bfloat16(), cos, sin)
    assert out_bf16.dtype == torch.bfloat16
    # Computed in fp32 and rounded once: within bf16's half-ulp (2^-8 relative) of the fp32 result
    # of the same (already bf16-rounded) input.
    ref = apply_rope(x.bfloat16().float(), cos, sin)
    torch.testing.assert_close(out_bf16.float(), ref, rtol=2**-8, atol=1e-6)


def test_rope_dot_product_depends_only_on_position_difference():
    torch.manual_seed(0)
    D = 32
    inv_freq, _ = compute_inv_freq(D, 10000.0)
    q = torch.randn(1, 1, 1, D, dtype=torch.float64)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64)

    def dot(m, n):
        cq, sq = rope_cos_sin(torch.tensor([[m]]), inv_freq)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), inv_freq)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    for m, n in [(3, 1), (10, 10), (0, 7), (50, 20)]:
        for shift in (1, 17, 1000):
            # fp32 angles near 1050 rad carry ~6e-5 rad rounding; |q||k| ~ 32 -> ~2e-3 worst case.
            assert dot(m + shift, n + shift) == pytest.approx(dot(m, n), abs=5e-3)
    # ... and it does depend on the difference (otherwise the test above would be vacuous).
    assert abs(dot(3, 1) - dot(3, 2)) > 1e-2


def test_linear_scaling_divides_frequencies():
    base, _ = compute_inv_freq(16, 10000.0)
    scaled, scale = compute_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0})
    assert scale == 1.0
    torch.testing.assert_close(scaled, base / 4.0, rtol=0, atol=0)  # same fp32 ops: bitwise
    # Legacy HF key "type" is accepted too.
    legacy, _ = compute_inv_freq(16, 10000.0, {"type": "linear", "factor": 4.0})
    torch.testing.assert_close(legacy, scaled, rtol=0, atol=0)


def meta_llama31_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Independent transcription: the per-frequency loop of Meta's llama3.1 reference (float64)."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim,theta,params", [
    (128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (64, 10000.0, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=512)),
])
def test_llama3_scaling_matches_reference(head_dim, theta, params):
    inv_freq, scale = compute_inv_freq(head_dim, theta, {"rope_type": "llama3", **params})
    base, _ = compute_inv_freq(head_dim, theta)
    expected = meta_llama31_apply_scaling(
        base.double(), params["factor"], params["low_freq_factor"], params["high_freq_factor"],
        params["original_max_position_embeddings"],
    )
    assert scale == 1.0 and inv_freq.dtype == torch.float32
    # Same formula, ours in float32 vs the reference in float64 from the same fp32 base: a few fp32 ulps.
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    # All three regimes occur, so the test exercises each branch.
    wavelen = 2 * math.pi / base.double()
    lo = params["original_max_position_embeddings"] / params["low_freq_factor"]
    hi = params["original_max_position_embeddings"] / params["high_freq_factor"]
    assert (wavelen < hi).any() and (wavelen > lo).any() and ((wavelen >= hi) & (wavelen <= lo)).any()


def test_rope_scaling_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.rope_scaling\.rope_type.*llama3"):
        compute_inv_freq(16, 10000.0, {"rope_type": "nonsense", "factor": 2.0})
    with pytest.raises(ValueError, match=r"model\.rope_scaling\.low_freq_factor"):
        compute_inv_freq(16, 10000.0, {"rope_type": "llama3", "factor": 8.0})


# ---------------------------------------------------------------- chunked cross-entropy


def _loss_case(B=2, S=13, dim=8, V=11, ignore_index=-100, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, dim, generator=g, dtype=dtype)
    weight = torch.randn(V, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = ignore_index  # a run of ignored labels crossing chunk boundaries
    labels[1, 5] = ignore_index
    labels[1, -1] = ignore_index
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 26, 1000])  # B*S = 26: non-dividing, exact, larger
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_chunked_ce_matches_full_cross_entropy(chunk_size, ignore_index):
    hidden, weight, labels = _loss_case(ignore_index=ignore_index)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n = chunked_cross_entropy(h1, w1, labels, chunk_size=chunk_size, ignore_index=ignore_index)
    loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (h2 @ w2.t()).reshape(-1, weight.shape[0])  # [B*S, V]
    ref = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    ref.backward()

    assert loss.dtype == torch.float64 and loss.shape == ()
    assert n.dtype == torch.int64 and n.item() == int((labels != ignore_index).sum())
    # float64 throughout; only the summation order differs across chunks.
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_chunked_ce_all_ignored_is_zero():
    hidden, weight, labels = _loss_case()
    labels.fill_(-100)
    h = hidden.clone().requires_grad_()
    loss, n = chunked_cross_entropy(h, weight, labels, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert torch.count_nonzero(h.grad) == 0


def test_chunked_ce_low_precision_returns_fp32_sum():
    hidden, weight, labels = _loss_case(dtype=torch.float32, S=40, V=50)
    loss, _ = chunked_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=16)
    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, 50), labels.reshape(-1), reduction="sum")
    assert loss.dtype == torch.float32
    # bf16 inputs and logits (8-bit mantissa, |logits| ~ 3) move each token loss by ~1e-2; 3% of the sum.
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=0)


def test_chunked_ce_keeps_no_logits_for_backward():
    """Nothing of size [chunk, V] may be saved for backward: the logits are recomputed per chunk."""
    B, S, dim, V, chunk = 2, 32, 8, 1000, 16
    hidden, weight, labels = _loss_case(B=B, S=S, dim=dim, V=V, dtype=torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    # The largest legitimate saved tensor is the weight itself (V*dim = 8000 < chunk*V = 16000).
    assert max(saved, default=0) <= V * dim
    loss.backward()  # and backward still works through the recomputation
    assert weight.grad is not None and hidden.grad is not None
