"""Fused prefill: a policy's attention over a whole unpadded sequence as a few dense kernel calls.

The materialised path (:mod:`seqpar.inference.attend`) builds a score matrix per query chunk; for a long
prompt or a perplexity run that is quadratic memory traffic even where the policy sees a window. Here each
policy describes its branches as :class:`Part`s -- a query range and a key range, each rotated at the
positions the branch assigns, and a :class:`~seqpar.ops.Mask` the attention kernels express (causal, window,
documents) -- and :func:`fused_attend` runs them through :func:`seqpar.ops.attention_with_lse` (any backend,
masked tiles skipped) and merges the partials by lse. It needs every position ``0..S-1`` present and an empty
cache before the step (a prefill without left padding); otherwise the materialised path runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from seqpar.inference.attend import rotate
from seqpar.inference.cache import LayerCache
from seqpar.ops.attention.dispatch import attention_with_lse
from seqpar.ops.attention.mask import Mask
from seqpar.ops.merge import merge_attention


@dataclass(frozen=True)
class Part:
    """Queries ``[qa, qb)`` against keys ``[ka, kb)``; RoPE at ``q_pos [qb - qa]`` / ``k_pos [kb - ka]``;
    ``mask`` (None: every pair visible) sees the first query at index ``q_offset`` and the first key at
    ``k_offset`` (default ``qa``/``ka``, the true indices); parts of one policy are disjoint."""

    qa: int
    qb: int
    ka: int
    kb: int
    q_pos: Tensor
    k_pos: Tensor
    mask: Optional[Mask] = None
    q_offset: Optional[int] = None
    k_offset: Optional[int] = None


def _rotated(model, x: Tensor, pos: Tensor) -> Tensor:
    cos, sin = model.rope_tables(pos.to(x.device)[None].expand(x.shape[0], -1))  # [B, S, D/2]
    return rotate(x, cos[:, :, None], sin[:, :, None])


def fused_attend(parts: list, backend: str = "auto"):
    """A ``layer_attend_fn`` (see :func:`seqpar.inference.runner.policy_step`) computing ``parts`` with the
    attention kernels; call it with all queries in one chunk."""
    def fn(model, layer, q: Tensor, t: Tensor, q_valid: Tensor, lc: LayerCache, policy):
        B, S, H, D = q.shape
        if lc.length != S:
            raise ValueError("fused prefill needs an empty cache and the whole sequence in one query chunk.")
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(B, S, H, D, dtype=acc, device=q.device)
        lse = torch.full((B, H, S), float("-inf"), dtype=acc, device=q.device)
        k, v = lc.k, lc.v  # [B, S, Hkv, D]: this step's keys (the cache was empty)
        for p in parts:
            qp, kp = _rotated(model, q[:, p.qa:p.qb], p.q_pos), _rotated(model, k[:, p.ka:p.kb], p.k_pos)
            kw = {} if p.mask is None else dict(mask=p.mask, q_offset=p.qa if p.q_offset is None else p.q_offset,
                                                k_offset=p.ka if p.k_offset is None else p.k_offset)
            o, s = attention_with_lse(qp, kp, v[:, p.ka:p.kb], softmax_scale=layer.attention.softmax_scale,
                                      backend=backend, **kw)
            out[:, p.qa:p.qb], lse[:, :, p.qa:p.qb] = merge_attention(out[:, p.qa:p.qb], lse[:, :, p.qa:p.qb], o, s)
        return out.to(q.dtype), None
    return fn
