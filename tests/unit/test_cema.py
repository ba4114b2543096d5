"""MEGALODON's two sequence ops against their definitions in float64: the complex EMA (seqpar.ops.cema: chunk-parallel
vs the step-by-step recurrence, state carried across segments, gradcheck) and timestep normalization
(seqpar.ops.timestep_norm: cumulative statistics vs the per-prefix definition, state carry, causality, gradcheck)."""
from __future__ import annotations

import pytest
import torch

from seqpar.ops.cema import cema, cema_coefficients, cema_reference
from seqpar.ops.timestep_norm import timestep_norm, timestep_norm_reference


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _crand(*shape, seed=0):
    return torch.complex(_rand(*shape, seed=seed), _rand(*shape, seed=seed + 100))


def _coeffs(d, h, seed=0):
    p, q = cema_coefficients(_rand(d, h, seed=seed), _rand(d, h, seed=seed + 1), _rand(d, seed=seed + 2),
                             _rand(d, h, seed=seed + 3))
    return p, q, _crand(d, h, seed=seed + 4)


# ---------------------------------------------------------------------------------------------- CEMA
def test_coefficients_follow_the_paper():
    """MEGALODON eq. 9: p = beta alpha e^{i theta}, q = (1 - alpha delta) e^{i theta}, theta_k = 2 pi k / h omega."""
    d, h = 3, 4
    a, dl, w, beta = _rand(d, h, seed=1), _rand(d, h, seed=2), _rand(d, seed=3), _rand(d, h, seed=4)
    p, q = cema_coefficients(a, dl, w, beta)
    alpha, delta, omega = torch.sigmoid(a), torch.sigmoid(dl), torch.sigmoid(w)
    theta = 2 * torch.pi / h * torch.arange(1, h + 1, dtype=torch.float64) * omega[:, None]
    torch.testing.assert_close(p, beta * alpha * torch.exp(1j * theta), atol=1e-14, rtol=0)
    torch.testing.assert_close(q, (1 - alpha * delta) * torch.exp(1j * theta), atol=1e-14, rtol=0)
    assert (q.abs() < 1).all()  # damped: the recurrence is stable


@pytest.mark.parametrize("S", [1, 7, 23, 64])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_parallel_cema_matches_the_recurrence(S, chunk, with_state):
    B, d, h = 2, 5, 3
    p, q, eta = _coeffs(d, h)
    x = _rand(B, S, d, seed=7)
    h0 = _crand(B, d, h, seed=8) if with_state else None
    y, last = cema(x, p, q, eta, h0, chunk=chunk)
    y_ref, last_ref = cema_reference(x, p, q, eta, h0)
    # float64 all through; the chunk form sums the same products in another order.
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(last, last_ref, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("cut", [1, 10, 16, 30])
def test_cema_state_carries_across_segments(cut):
    """Two halves, the second started from the first's final state, equal the whole (the cp-pipeline contract)."""
    B, S, d, h = 2, 31, 4, 2
    p, q, eta = _coeffs(d, h, seed=3)
    x = _rand(B, S, d, seed=9)
    y, last = cema(x, p, q, eta, chunk=8)
    y1, h1 = cema(x[:, :cut], p, q, eta, chunk=8)
    y2, h2 = cema(x[:, cut:], p, q, eta, h1, chunk=5)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(h2, last, atol=1e-11, rtol=1e-11)


def test_cema_is_causal_and_long_sequences_stay_finite():
    B, S, d, h = 1, 300, 3, 4
    p, q, eta = _coeffs(d, h, seed=5)
    x = _rand(B, S, d, seed=1)
    x2 = x.clone()
    x2[:, 120] += 5.0
    y, _ = cema(x.float(), p.to(torch.complex64), q.to(torch.complex64), eta.to(torch.complex64), chunk=16)
    y2, _ = cema(x2.float(), p.to(torch.complex64), q.to(torch.complex64), eta.to(torch.complex64), chunk=16)
    assert torch.isfinite(y).all()
    assert (y[:, :120] == y2[:, :120]).all() and (y[:, 120] - y2[:, 120]).abs().max() > 1e-3
    # float32 against the float64 recurrence: rounding of a sum of <= 300 decaying terms.
    torch.testing.assert_close(y.double(), cema_reference(x, p, q, eta)[0], atol=1e-4, rtol=1e-4)


def test_cema_gradcheck_through_parameters_and_state():
    B, S, d, h = 1, 7, 2, 2
    x = _rand(B, S, d, seed=1).requires_grad_()
    a, dl, w, beta = (_rand(*s, seed=i).requires_grad_() for i, s in enumerate([(d, h), (d, h), (d,), (d, h)]))
    eta = _rand(d, h, 2, seed=5).requires_grad_()
    h0 = _rand(B, d, h, 2, seed=6).requires_grad_()

    def f(x, a, dl, w, beta, eta, h0):
        p, q = cema_coefficients(a, dl, w, beta)
        y, last = cema(x, p, q, torch.view_as_complex(eta), torch.view_as_complex(h0), chunk=3)
        return y, torch.view_as_real(last)

    assert torch.autograd.gradcheck(f, (x, a, dl, w, beta, eta, h0))


def test_cema_bad_inputs():
    p, q, eta = _coeffs(3, 2)
    x = _rand(1, 4, 3)
    with pytest.raises(ValueError, match="chunk"):
        cema(x, p, q, eta, chunk=0)
    with pytest.raises(ValueError, match="real x"):
        cema(x[0], p, q, eta)
    with pytest.raises(ValueError, match=r"eta \[d=3, h\]"):
        cema(x, p, q, eta[:2])
    with pytest.raises(ValueError, match="initial state"):
        cema(x, p, q, eta, _crand(1, 3, 3))


# ---------------------------------------------------------------------------------------------- timestep norm
@pytest.mark.parametrize("groups", [1, 3, 12])
def test_timestep_norm_matches_its_definition(groups):
    B, S, d = 2, 13, 12
    x = _rand(B, S, d, seed=1, scale=3.0) + 50.0  # a large offset: the shifted sums must not cancel
    w, b = _rand(d, seed=2), _rand(d, seed=3)
    y, state = timestep_norm(x, groups, w, b)
    torch.testing.assert_close(y, timestep_norm_reference(x, groups, w, b), atol=1e-10, rtol=1e-10)
    xg = x.reshape(B, S, groups, d // groups).transpose(1, 2).reshape(B, groups, -1)
    torch.testing.assert_close(state.mean, xg.mean(-1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state.var, xg.var(-1, unbiased=False), atol=1e-10, rtol=1e-10)
    assert (state.count == S).all()


@pytest.mark.parametrize("cut", [1, 6, 12])
def test_timestep_norm_state_carries_across_segments(cut):
    B, S, d, G = 2, 13, 8, 2
    x, w, b = _rand(B, S, d, seed=4) * 2 - 1, _rand(d, seed=5), _rand(d, seed=6)
    y, last = timestep_norm(x, G, w, b)
    y1, s1 = timestep_norm(x[:, :cut], G, w, b)
    y2, s2 = timestep_norm(x[:, cut:], G, w, b, state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-12, rtol=1e-12)
    for a, c in zip(s2, last):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)


def test_timestep_norm_is_causal_and_differentiable():
    B, S, d, G = 1, 6, 4, 2
    x, w, b = _rand(B, S, d, seed=7), _rand(d, seed=8), _rand(d, seed=9)
    x2 = x.clone()
    x2[:, 3] += 4.0
    y, y2 = timestep_norm(x, G, w, b)[0], timestep_norm(x2, G, w, b)[0]
    assert (y[:, :3] == y2[:, :3]).all() and (y[:, 3:] - y2[:, 3:]).abs().max() > 1e-3
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: timestep_norm(x, G, w, b)[0], args)
    # ... and through a carried state (the gradient reaches the previous segment)
    x1 = _rand(B, 3, d, seed=10).requires_grad_()

    def two(x1, x):
        _, s = timestep_norm(x1, G, w, b)
        return timestep_norm(x, G, w, b, state=s)[0]

    assert torch.autograd.gradcheck(two, (x1, args[0]))


def test_timestep_norm_bad_inputs():
    x, w, b = _rand(1, 3, 6), _rand(6), _rand(6)
    with pytest.raises(ValueError, match="megalodon_norm_groups"):
        timestep_norm(x, 4, w, b)
    with pytest.raises(ValueError, match=r"\[batch, seq, d\]"):
        timestep_norm(x[0], 2, w, b)
    with pytest.raises(ValueError, match="weight and bias"):
        timestep_norm(x, 2, w[:3], b)
