"""Attention over a policy's cache: queries and cached keys rotated at the positions each *branch* assigns.

A cache policy describes attention as a few disjoint branches (:class:`Branch`): a set of visible
(query, key) pairs, the RoPE position of each query and of each key for those pairs. Full attention is
one branch at the original positions; StreamingLLM, LM-Infinite and Dual Chunk Attention give the same
key a different distance depending on which branch it falls in. Because the branches are disjoint and
share one softmax, their scores are written into one score matrix and normalised once.

This is a materialised kernel (scores ``[B, Hkv, G, Sq_chunk, Sk]`` in at least float32, queries in
chunks of ``q_chunk``): the reference semantics, exact on CPU in float64, used for prefill and decoding.
A fused path (per-branch ``attention_with_lse`` merged by lse) is the speed-up left for later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Branch:
    """``visible [B, 1 or Hkv, Sq, Sk]`` bool; ``q_pos [B, Sq]`` and ``k_pos [B, Sk, Hkv]`` int64 RoPE
    positions used for the visible pairs of this branch (branches of one call are disjoint)."""

    visible: Tensor
    q_pos: Tensor
    k_pos: Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (rotate_half convention, as :func:`seqpar.ops.rope.apply_rope`) with tables already broadcastable
    to ``x [B, S, H, D]``: ``cos/sin [B, S, H or 1, D/2]``. Computed in at least float32, returned in x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dt).chunk(2, dim=-1)  # [B, S, H, D/2] each
    c, s = cos.to(dt), sin.to(dt)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def branch_scores(model, q: Tensor, k: Tensor, br: Branch, softmax_scale: float) -> Tensor:
    """``q [B, Sq, H, D]`` and ``k [B, Sk, Hkv, D]`` (both without RoPE) -> scores ``[B, Hkv, G, Sq, Sk]``
    (G = H / Hkv) at this branch's positions, in at least float32, not masked."""
    B, Sq, H, D = q.shape
    hkv = k.shape[2]
    qc, qs = model.rope_tables(br.q_pos)  # [B, Sq, D/2]
    kc, ks = model.rope_tables(br.k_pos)  # [B, Sk, Hkv, D/2]
    qr = rotate(q, qc[:, :, None], qs[:, :, None])
    kr = rotate(k, kc, ks)
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = qr.to(dt).view(B, Sq, hkv, H // hkv, D)  # [B, Sq, H, D] -> [B, Sq, Hkv, G, D]
    return torch.einsum("bqhgd,bkhd->bhgqk", qg, kr.to(dt)) * softmax_scale


def attend(model, q: Tensor, k: Tensor, v: Tensor, branches: list, softmax_scale: float,
           need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
    """Attention of ``q [B, Sq, H, D]`` over ``k, v [B, Sk, Hkv, D]`` through disjoint ``branches``.

    Returns ``out [B, Sq, H, D]`` in q's dtype (0 for a query that sees no key) and, with ``need_probs``,
    the attention probabilities summed over queries and the heads of each kv group, ``[B, Sk, Hkv]``
    float64 (H2O's accumulated score), else None.
    """
    out, _, acc = attend_with_lse(model, q, k, v, branches, softmax_scale, need_probs)
    return out, acc


def attend_with_lse(model, q: Tensor, k: Tensor, v: Tensor, branches: list, softmax_scale: float,
                    need_probs: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`attend` that also returns ``lse [B, H, Sq]`` (natural log, at least float32; -inf for a query
    that sees no key), so partial results over disjoint key sets merge exactly (:mod:`seqpar.ops.merge`)."""
    B, Sq, H, D = q.shape
    hkv = k.shape[2]
    scores = None
    seen = None
    for br in branches:
        s = branch_scores(model, q, k, br, softmax_scale)
        vis = br.visible[:, :, None]  # [B, 1|Hkv, 1, Sq, Sk]
        scores = torch.where(vis, s, float("-inf") if scores is None else scores)
        seen = vis if seen is None else (seen | vis)
    any_key = seen.any(-1, keepdim=True)  # [B, 1|Hkv, 1, Sq, 1]
    probs = torch.softmax(torch.where(any_key, scores, 0.0), dim=-1)
    probs = torch.where(seen, probs, 0.0)  # rows without a key: all 0 (out 0), never NaN
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(probs.dtype)).reshape(B, Sq, H, D)
    acc = probs.sum(dim=(2, 3)).transpose(1, 2).to(torch.float64) if need_probs else None  # [B, Sk, Hkv]
    lse = torch.where(any_key[..., 0], torch.logsumexp(torch.where(seen, scores, float("-inf")), -1), float("-inf"))
    return out.to(q.dtype), lse.expand(B, hkv, H // hkv, Sq).reshape(B, H, Sq), acc
