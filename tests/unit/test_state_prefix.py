"""The sequence-parallel pieces of MEGALODON's two recurrences (seqpar.ops.cema: cema_carry, cema_prefix;
seqpar.ops.timestep_norm: norm_stats, norm_prefix), on one process: a sequence cut into N equal shards, each run
from an empty state and corrected by the prefix of the shards before it, equals the whole run (float64), values and
gradients; an empty state (count 0, rank 0) is exactly no state."""
import pytest
import torch

from seqpar.ops.cema import cema, cema_carry, cema_coefficients, cema_prefix
from seqpar.ops.timestep_norm import NormState, norm_prefix, norm_stats, timestep_norm

B, d, h, G = 2, 8, 3, 2


def _cema_inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    params = [r(d, h), r(d, h), r(d), r(d, h), r(d, h, 2)]
    return [t.requires_grad_() for t in params]


def _cema_sharded(x, params, n, chunk):
    a, dl, th, be, eta = params
    p, q = cema_coefficients(a, dl, th, be)
    eta = torch.view_as_complex(eta)
    L = x.shape[1] // n
    runs = [cema(x[:, r * L:(r + 1) * L], p, q, eta, chunk=chunk) for r in range(n)]
    finals = torch.stack([f for _, f in runs])
    return torch.cat([y + cema_carry(cema_prefix(finals, q, L, r), q, eta, L, chunk=chunk)
                      for r, (y, _) in enumerate(runs)], 1)


@pytest.mark.parametrize("n,S,chunk", [(1, 12, 4), (2, 24, 5), (3, 24, 64), (4, 8, 1)])
def test_cema_shards_with_prefix_equal_the_whole(n, S, chunk):
    x = torch.randn(B, S, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    params = _cema_inputs()
    a, dl, th, be, eta = params
    p, q = cema_coefficients(a, dl, th, be)
    whole = cema(x, p, q, torch.view_as_complex(eta), chunk=chunk)[0]
    gw = torch.autograd.grad(whole.square().sum(), [x, *params])
    parts = _cema_sharded(x, params, n, chunk)
    torch.testing.assert_close(parts, whole, atol=1e-12, rtol=1e-12)
    for a_, b_ in zip(torch.autograd.grad(parts.square().sum(), [x, *params]), gw):
        torch.testing.assert_close(a_, b_, atol=1e-11, rtol=1e-11)


def test_cema_carry_is_the_initial_states_share():
    a, dl, th, be, eta = _cema_inputs()
    p, q = cema_coefficients(a, dl, th, be)
    eta = torch.view_as_complex(eta)
    x = torch.randn(B, 11, d, dtype=torch.float64)
    h0 = torch.randn(B, d, h, dtype=torch.complex128)
    torch.testing.assert_close(cema(x, p, q, eta, h0, chunk=4)[0],
                               cema(x, p, q, eta, chunk=4)[0] + cema_carry(h0, q, eta, 11, chunk=4))
    assert cema_carry(h0, q, eta, 0).shape == (B, 0, d)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_timestep_norm_shards_with_prefix_equal_the_whole(n):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(B, 24, d, generator=g, dtype=torch.float64) * 3 + 5).requires_grad_()
    w, b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    whole = timestep_norm(x, G, w, b)[0]
    (gw,) = torch.autograd.grad((whole * torch.arange(24.0, dtype=torch.float64)[:, None]).sum(), x)
    L = 24 // n
    own = [norm_stats(x[:, r * L:(r + 1) * L], G) for r in range(n)]
    every = NormState(*(torch.stack(t) for t in zip(*own)))
    parts = torch.cat([timestep_norm(x[:, r * L:(r + 1) * L], G, w, b, state=norm_prefix(every, r))[0]
                       for r in range(n)], 1)
    torch.testing.assert_close(parts, whole, atol=1e-12, rtol=1e-12)
    (gp,) = torch.autograd.grad((parts * torch.arange(24.0, dtype=torch.float64)[:, None]).sum(), x)
    torch.testing.assert_close(gp, gw, atol=1e-11, rtol=1e-11)
    # The stats equal the state timestep_norm itself returns after the shard.
    last = timestep_norm(x[:, :L], G, w, b)[1]
    for a_, b_ in zip(own[0], last):
        torch.testing.assert_close(a_, b_, atol=1e-12, rtol=1e-12)


def test_an_empty_state_is_no_state():
    x = torch.randn(B, 7, d, dtype=torch.float64) + 100.0
    w, b = torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    empty = norm_prefix(NormState(*(torch.stack([t]) for t in norm_stats(x, G))), 0)
    assert torch.equal(empty.count, torch.zeros(B, dtype=torch.float64))
    assert torch.equal(timestep_norm(x, G, w, b, state=empty)[0], timestep_norm(x, G, w, b)[0])
