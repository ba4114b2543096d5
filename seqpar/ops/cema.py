"""Multi-dimensional damped complex EMA (CEMA): MEGALODON (Ma et al. 2024, arXiv:2404.08801, Sec. 3.1), extending
MEGA's damped EMA (Ma et al. 2022, arXiv:2209.10655, Sec. 3.1, eq. 2-3) to the complex domain.

Every channel ``j`` of ``x [B, S, d]`` is expanded into ``h`` complex EMA dimensions ``k``:

    u_t        = beta_j,k x_t,j                                        (MEGA eq. 2: expansion)
    h_t        = p_j,k u_t + q_j,k h_{t-1}                             (MEGALODON eq. 9)
    y_t,j      = Re( sum_k eta_j,k h_t,k )                             (projection, eta complex)
    p = alpha e^{i theta},  q = (1 - alpha delta) e^{i theta},  theta_j,k = 2 pi k / h * omega_j

with ``alpha, delta`` in (0, 1) (sigmoids) and ``omega_j`` in (0, 1) the channel's base angle (a sigmoid), so the
``h`` angles of one channel are evenly spaced multiples of it. Since ``|q| < 1`` the recurrence is stable.

Here ``beta`` is folded into ``p`` (:func:`cema_coefficients`), so the ops below see ``h_t = p x_t + q h_{t-1}``.

* :func:`cema_reference`: the recurrence as written, one step at a time (the float64 reference).
* :func:`cema`: the same linear recurrence chunk-parallel. Inside a chunk of ``c`` tokens the output is a causal
  convolution with the real kernel ``K[n] = Re(sum_k eta p q^n)`` (a ``[c, c]`` Toeplitz matmul); the complex state
  at chunk ends is a prefix scan ``H_n = q^c H_{n-1} + b_n`` done in ``log2(#chunks)`` doubling steps; each chunk
  then adds the decayed incoming state, ``Re(sum_k eta q^{t+1} H_{n-1})``. Both take an initial state ``h0`` and
  return the final one, so a sequence can be continued segment by segment (or rank by rank).
* Sequence-parallel pieces (``parallel.cp > 1``): the outputs are linear in ``h0``, ``cema(x, h0) = cema(x)[0] +
  cema_carry(h0)``, so each rank runs its shard from zero, and :func:`cema_prefix` folds the shards' final states
  into the state before this rank's shard (a parallel prefix over ranks: ``sum_{j<r} q^{L (r-1-j)} h_j``).

Powers ``q^n`` are built as ``|q|^n e^{i n theta}`` from ``exp(n log|q|)``: no repeated products, no overflow.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def cema_coefficients(alpha_logit: Tensor, delta_logit: Tensor, omega_logit: Tensor, beta: Tensor) -> Tuple[Tensor, Tensor]:
    """``(p, q)`` complex ``[d, h]`` of MEGALODON eq. 9 from real parameters.

    Args:
        alpha_logit, delta_logit, beta: ``[d, h]``; ``alpha = sigmoid(alpha_logit)``, ``delta = sigmoid(delta_logit)``.
        omega_logit: ``[d]``; the base angle ``omega = sigmoid(omega_logit)`` in (0, 1), ``theta_k = 2 pi k / h * omega``.
    Returns:
        ``p = beta * alpha e^{i theta}`` (the expansion folded in), ``q = (1 - alpha delta) e^{i theta}``.
    """
    h = alpha_logit.shape[-1]
    alpha, delta = torch.sigmoid(alpha_logit), torch.sigmoid(delta_logit)
    k = torch.arange(1, h + 1, dtype=alpha.dtype, device=alpha.device)
    theta = (2 * math.pi / h) * k * torch.sigmoid(omega_logit)[:, None]  # [d, h]
    rot = torch.complex(torch.cos(theta), torch.sin(theta))
    return (beta * alpha) * rot, (1 - alpha * delta) * rot


def _check(x: Tensor, p: Tensor, q: Tensor, eta: Tensor, h0: Optional[Tensor]) -> None:
    if x.dim() != 3 or x.is_complex():
        raise ValueError(f"cema expects a real x [batch, seq, d]; got {tuple(x.shape)} {x.dtype}.")
    d = x.shape[-1]
    for name, t in (("p", p), ("q", q), ("eta", eta)):
        if t.dim() != 2 or t.shape[0] != d or t.shape != p.shape or not t.is_complex():
            raise ValueError(f"cema expects complex {name} [d={d}, h] like p {tuple(p.shape)}; got {tuple(t.shape)} {t.dtype}.")
    if h0 is not None and (tuple(h0.shape) != (x.shape[0], *p.shape) or not h0.is_complex()):
        raise ValueError(f"cema's initial state must be complex [batch, d, h]={[x.shape[0], *p.shape]}; got "
                         f"{tuple(h0.shape)} {h0.dtype}.")


def cema_reference(x: Tensor, p: Tensor, q: Tensor, eta: Tensor, h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The recurrence one step at a time. ``x [B, S, d]`` real, ``p, q, eta [d, h]`` complex, ``h0 [B, d, h]``
    complex or None (zeros) -> ``(y [B, S, d] real, h_S [B, d, h] complex)``. Slow: tests only."""
    _check(x, p, q, eta, h0)
    state = h0 if h0 is not None else x.new_zeros(x.shape[0], *p.shape, dtype=p.dtype)
    ys = []
    for t in range(x.shape[1]):
        state = p * x[:, t, :, None] + q * state  # [B, d, h]
        ys.append((eta * state).sum(-1).real)
    y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)
    return y, state


def _powers(q: Tensor, n: Tensor) -> Tensor:
    """``q^n`` for complex ``q [d, h]`` and integer exponents ``n [m]`` (>= 0) -> ``[d, h, m]``."""
    n = n.to(q.real.dtype)
    mag = torch.exp(torch.log(q.abs())[..., None] * n)  # |q| in (0, 1): log is finite
    ang = torch.angle(q)[..., None] * n
    return torch.complex(mag * torch.cos(ang), mag * torch.sin(ang))


def cema(x: Tensor, p: Tensor, q: Tensor, eta: Tensor, h0: Optional[Tensor] = None, *,
         chunk: int = 64) -> Tuple[Tensor, Tensor]:
    """CEMA chunk-parallel: equal to :func:`cema_reference` up to rounding, differentiable in every input.

    Args:
        x: ``[B, S, d]`` real (any S >= 0; the last chunk may be partial).
        p, q, eta: ``[d, h]`` complex (:func:`cema_coefficients`; ``|q| < 1``).
        h0: ``[B, d, h]`` complex state before ``x`` (the previous segment's final state), or None for zeros.
        chunk: tokens per chunk of the Toeplitz matmul (a speed knob: memory ``d * chunk^2``; any value >= 1).
    Returns:
        ``(y [B, S, d] in x.dtype, h_S [B, d, h] complex)``: outputs and the state after the last token.
    Raises:
        ValueError: shapes, dtypes or chunk out of range.
    """
    _check(x, p, q, eta, h0)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"cema chunk must be an int >= 1; got {chunk!r}.")
    B, S, d = x.shape
    if S == 0:
        return x.clone(), (h0 if h0 is not None else x.new_zeros(B, *p.shape, dtype=p.dtype))
    c = min(chunk, S)
    n = -(-S // c)  # chunks
    r = S - (n - 1) * c  # tokens in the last chunk (1..c)
    xc = torch.nn.functional.pad(x, (0, 0, 0, n * c - S)).view(B, n, c, d)  # [B, n, c, d], zero tail
    xz = xc.to(p.dtype)
    steps = torch.arange(c + 1, device=x.device)
    qp = _powers(q, steps)  # [d, h, c+1]: q^0 .. q^c

    # Inside each chunk: y_t = sum_{s<=t} K[t-s] x_s, K[m] = Re(sum_k eta p q^m)  (Toeplitz [d, c, c]).
    kern = (eta[..., None] * p[..., None] * qp[..., :c]).sum(1).real  # [d, c]
    lag = steps[:c, None] - steps[None, :c]  # t - s
    toeplitz = kern[:, lag.clamp_min(0)] * (lag >= 0)  # [d, c(t), c(s)]
    y = torch.einsum("dts,bnsd->bntd", toeplitz, xc.to(kern.dtype))

    # Chunk ends: b_n = sum_s p q^{c-1-s} x_s, then the scan H_n = q^c H_{n-1} + b_n (h0 enters b_0).
    end_w = p[..., None] * qp[..., :c].flip(-1)  # [d, h, c(s)]: p q^{c-1-s}
    b = torch.einsum("dhs,bnsd->bndh", end_w, xz)  # [B, n, d, h]
    if h0 is not None:
        b = torch.cat([b[:, :1] + qp[..., c] * h0[:, None], b[:, 1:]], 1)
    hop = qp[..., c]  # q^c: the decay across one chunk
    span = 1
    while span < n:  # Hillis-Steele doubling: after it, b_n = H_n (every chunk end up to n folded in)
        b = torch.cat([b[:, :span], b[:, span:] + hop * b[:, :-span]], 1)
        hop, span = hop * hop, 2 * span
    h_in = torch.cat([(h0 if h0 is not None else torch.zeros_like(b[:, 0]))[:, None], b[:, :-1]], 1)  # H_{n-1}

    # The incoming state's share: Re(sum_k eta q^{t+1} H_{n-1}).
    carry_w = eta[..., None] * qp[..., 1:]  # [d, h, c(t)]
    y = y + torch.einsum("dht,bndh->bntd", carry_w, h_in).real
    y = y.reshape(B, n * c, d)[:, :S].to(x.dtype)

    # The final state after token S-1 (the last chunk may be partial: its zero tail must not decay it).
    last_w = p[..., None] * qp[..., :r].flip(-1)  # p q^{r-1-s}, s < r
    h_last = qp[..., r] * h_in[:, -1] + torch.einsum("dhs,bsd->bdh", last_w, xz[:, -1, :r])
    return y, h_last


def cema_carry(h0: Tensor, q: Tensor, eta: Tensor, length: int, *, chunk: int = 64) -> Tensor:
    """The share of an initial state in :func:`cema`'s outputs: ``Re(sum_k eta q^{t+1} h0)`` for ``t < length``, so
    ``cema(x, p, q, eta, h0)[0] == cema(x, p, q, eta)[0] + cema_carry(h0, q, eta, S)`` up to rounding.

    ``h0 [B, d, h]`` complex, ``q, eta [d, h]`` complex -> ``[B, length, d]`` real (q's real dtype); chunked as
    :func:`cema` (``q^{t+1}`` for one chunk, ``q^{n c}`` per chunk start): memory ``B n d h``, not ``d h length``.
    """
    B, d = h0.shape[0], q.shape[0]
    if length == 0:
        return h0.real.new_zeros(B, 0, d)
    c = min(chunk, length)
    n = -(-length // c)
    steps = torch.arange(c + 1, device=q.device)
    carry_w = eta[..., None] * _powers(q, steps[1:])  # [d, h, c]: eta q^{t+1}
    h_in = torch.einsum("dhn,bdh->bndh", _powers(q, torch.arange(n, device=q.device) * c), h0)  # q^{n c} h0
    y = torch.einsum("dht,bndh->bntd", carry_w, h_in).real
    return y.reshape(B, n * c, d)[:, :length]


def cema_prefix(finals: Tensor, q: Tensor, length: int, rank: int) -> Tensor:
    """The state before shard ``rank`` of a sequence cut into equal shards of ``length`` tokens, from every shard's
    final state when run from zero: ``sum_{j < rank} q^{length (rank-1-j)} finals_j`` (zeros for rank 0).

    ``finals [N, B, d, h]`` complex, ``q [d, h]`` -> ``[B, d, h]``. Every shard enters the sum (weight 0 from
    ``rank`` on), so the gradient reaches every shard's state on every rank: the collective that gathered
    ``finals`` runs its backward on all ranks alike.
    """
    j = torch.arange(finals.shape[0], device=q.device)
    w = _powers(q, (rank - 1 - j).clamp_min(0) * length) * (j < rank).to(q.real.dtype)  # [d, h, N]
    return torch.einsum("dhj,jbdh->bdh", w, finals)
