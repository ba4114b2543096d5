"""Timestep normalization: MEGALODON (Ma et al. 2024, arXiv:2404.08801, Sec. 3.2).

Group normalization (Wu and He 2018) along the sequence, made causal: the ``d`` features are split into ``G`` groups
of ``d / G``, and token ``t`` of group ``g`` is normalised by the mean and variance of that group's features over
tokens ``1..t`` only (cumulative statistics), so no token sees a later one:

    mu_t    = mean { x_i,f : i <= t, f in g }
    var_t   = mean { (x_i,f - mu_t)^2 : i <= t, f in g }          (population variance)
    y_t,f   = (x_t,f - mu_t) / sqrt(var_t + eps) * weight_f + bias_f

A segment can continue an earlier one: :class:`NormState` ``(count, mean, var)`` holds the statistics of every token
before it (``count`` tokens) and merges exactly with the new ones (Chan et al.'s pairwise update), so two halves
normalised in turn equal the whole.

* :func:`timestep_norm_reference`: the definition, one prefix at a time (the float64 reference).
* :func:`timestep_norm`: cumulative sums, computed in fp32 at least and shifted by a per-row, per-group centre (the
  prior mean, or the first token's) so the sum of squares does not cancel catastrophically.
* Sequence-parallel pieces (``parallel.cp > 1``): :func:`norm_stats` (a shard's own statistics, no outputs) and
  :func:`norm_prefix` (Chan et al.'s merge of the shards before this rank's): the state to start its shard from.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class NormState(NamedTuple):
    """The statistics of every token before a segment, per row and group: ``count [B]`` tokens (float),
    ``mean [B, G]`` and population ``var [B, G]`` over those tokens' group features."""

    count: Tensor
    mean: Tensor
    var: Tensor


def _check(x: Tensor, groups: int, weight: Tensor, bias: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"timestep_norm expects x [batch, seq, d]; got {tuple(x.shape)}.")
    d = x.shape[-1]
    if not isinstance(groups, int) or groups < 1 or d % groups:
        raise ValueError(f"timestep_norm groups={groups!r} must be an int >= 1 dividing d={d} "
                         "(model.megalodon_norm_groups).")
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"timestep_norm weight and bias must be [d={d}]; got {tuple(weight.shape)} and {tuple(bias.shape)}.")


def timestep_norm_reference(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """The definition: token t of group g normalised by ``mean`` / ``var(unbiased=False)`` of ``x[:, :t+1, g]``.
    ``x [B, S, d] -> [B, S, d]``. Slow: tests only."""
    _check(x, groups, weight, bias)
    B, S, d = x.shape
    xg = x.reshape(B, S, groups, d // groups)  # [B, S, G, d/G]
    out = torch.empty_like(xg)
    for t in range(S):
        seen = xg[:, :t + 1].transpose(1, 2).reshape(B, groups, -1)  # [B, G, (t+1) * d/G]
        mu, var = seen.mean(-1), seen.var(-1, unbiased=False)
        out[:, t] = (xg[:, t] - mu[..., None]) / torch.sqrt(var[..., None] + eps)
    return out.reshape(B, S, d) * weight + bias


def timestep_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5,
                  state: Optional[NormState] = None) -> Tuple[Tensor, NormState]:
    """Causal group normalization along the sequence.

    Args:
        x: ``[B, S, d]``. groups: ``G`` dividing d. weight, bias: ``[d]`` (the affine map after normalising).
        state: the statistics of the tokens before ``x`` (the previous segment's returned state), or None.
    Returns:
        ``(y [B, S, d] in x.dtype, state after the last token)``; the state is in fp32 at least.
    Raises:
        ValueError: shapes, or groups not dividing d.
    """
    _check(x, groups, weight, bias)
    B, S, d = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)
    xg = x.to(dt).reshape(B, S, groups, d // groups)  # [B, S, G, d/G]
    m = d // groups
    first = xg[:, :1].mean(-1).detach() if S else x.new_zeros(B, 1, groups, dtype=dt)  # [B, 1, G]
    if state is None:
        prior_n = torch.zeros(B, 1, 1, dtype=dt, device=x.device)
        centre = first
        prior_sq = torch.zeros(B, 1, groups, dtype=dt, device=x.device)
        prior_sum = prior_sq
    else:
        prior_n = state.count.to(dt).view(B, 1, 1) * m  # elements seen before
        # An empty state (count 0: the first shard under cp) centres on the first token, as state=None does.
        centre = torch.where(prior_n > 0, state.mean.to(dt).detach()[:, None], first)  # [B, 1, G]
        # Around the centre: the prior contributes n (mean - centre) (= 0 up to the detach) and n (var + (mean - centre)^2).
        shift = state.mean.to(dt)[:, None] - centre
        prior_sum = prior_n * shift
        prior_sq = prior_n * (state.var.to(dt)[:, None] + shift * shift)
    y = xg - centre[..., None]
    n = prior_n + m * torch.arange(1, S + 1, dtype=dt, device=x.device).view(1, S, 1)  # elements up to t
    s1 = prior_sum + torch.cumsum(y.sum(-1), 1)  # [B, S, G]
    s2 = prior_sq + torch.cumsum((y * y).sum(-1), 1)
    mean_c = s1 / n  # mean - centre
    var = (s2 / n - mean_c * mean_c).clamp_min(0.0)
    out = (y - mean_c[..., None]) * torch.rsqrt(var[..., None] + eps)
    out = out.reshape(B, S, d) * weight.to(dt) + bias.to(dt)
    if S == 0:
        last = state if state is not None else NormState(x.new_zeros(B, dtype=dt), x.new_zeros(B, groups, dtype=dt),
                                                         x.new_zeros(B, groups, dtype=dt))
        return out.to(x.dtype), last
    count = (n[:, -1, 0] / m)  # tokens seen so far
    return out.to(x.dtype), NormState(count, centre[:, 0] + mean_c[:, -1], var[:, -1])


def norm_stats(x: Tensor, groups: int) -> NormState:
    """The state :func:`timestep_norm` returns after ``x [B, S, d]`` alone, without computing its outputs:
    ``count`` S tokens, the group ``mean`` and population ``var`` (two passes, fp32 at least)."""
    B, S, d = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)
    if S == 0:
        zeros = x.new_zeros(B, groups, dtype=dt)
        return NormState(x.new_zeros(B, dtype=dt), zeros, zeros)
    xg = x.to(dt).reshape(B, S, groups, d // groups).transpose(1, 2).reshape(B, groups, -1)  # [B, G, S * d/G]
    mean = xg.mean(-1)
    var = (xg - mean[..., None]).square().mean(-1)
    return NormState(x.new_full((B,), S, dtype=dt), mean, var)


def norm_prefix(shards: NormState, rank: int) -> NormState:
    """The statistics of shards ``0 .. rank-1`` together, from each shard's own (``count [N, B]``, ``mean`` and
    ``var [N, B, G]``), by Chan et al.'s parallel merge: ``n = sum n_j``, ``mean = sum n_j mean_j / n``,
    ``var = sum n_j (var_j + (mean_j - mean)^2) / n``. Rank 0 gets count 0 (mean and var 0), which
    :func:`timestep_norm` treats as no state. Every shard enters the sums (weight 0 from ``rank`` on), so the
    gradient reaches every shard's statistics on every rank."""
    before = (torch.arange(shards.count.shape[0], device=shards.count.device) < rank).to(shards.count.dtype)
    w = (before[:, None] * shards.count)[..., None]  # [N, B, 1]
    n = w.sum(0)  # [B, 1]
    div = torch.where(n > 0, n, torch.ones_like(n))
    mean = (w * shards.mean).sum(0) / div
    var = (w * (shards.var + (shards.mean - mean).square())).sum(0) / div
    return NormState(n[:, 0], mean, var)
