"""Hybrid context parallelism (USP / LoongTrain's 2-D scheme): Ulysses inside a group of ``U`` consecutive
cp ranks (one node: the all-to-all runs over NVLink), ring attention across the ``R = N / U`` groups.

The ``N`` cp ranks hold ``layout`` shards over ``N`` (exactly what ``shard_sequence`` over the cp group
gives, so data sharding does not change). cp rank ``c = i * U + j`` is member ``j`` of Ulysses group ``i``
and member ``i`` of ring ``j`` (:func:`seqpar.parallel.mesh.cp_subgroups`). After the all-to-all inside
Ulysses group ``i`` a rank holds ``H / U`` heads of the union of the group's shards; for ``zigzag`` and
``contiguous`` that union is exactly ring rank ``i``'s shard of the same layout over ``R`` ranks (zigzag:
chunks ``iU .. iU+U-1`` and their mirrors are chunk ``i`` and its mirror of ``2R`` chunks), so after a local
reordering the existing :func:`~seqpar.parallel.ring_attention.ring_attention_with_lse` runs unchanged on
the ring group with every mask kind and its step skipping. ``striped`` and ``docs`` have no such
property (their unions are not a layout over ``R``) and are refused with one clear error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import Mask
from seqpar.parallel.collectives import group_rank, group_size, head_to_seq, seq_to_head
from seqpar.parallel.layout import check_divisible
from seqpar.parallel.ring_attention import ring_attention_with_lse, ring_mask, validate_inputs
from seqpar.parallel.ulysses import concat_positions, kv_replication, replicate_kv

HYBRID_LAYOUTS = ("zigzag", "contiguous")


def check_hybrid_layout(layout: str) -> None:
    if layout not in HYBRID_LAYOUTS:
        raise ValueError(f"parallel.cp_comm=hybrid runs the ring on the union of each Ulysses group's shards, which "
                         f"is a ring shard only for parallel.layout in {list(HYBRID_LAYOUTS)}; got layout={layout}: "
                         "use parallel.layout=zigzag, or parallel.cp_comm=ulysses / allgather (every layout).")


def hybrid_attention_with_lse(
    q: Tensor,  # [B, L, H, D] local shard over N = U * R cp ranks
    k: Tensor,  # [B, L, Hkv, D]
    v: Tensor,  # [B, L, Hkv, D]
    *,
    ulysses_group,
    ring_group,
    causal: bool = False,
    mask: Optional[Mask] = None,
    softmax_scale: Optional[float] = None,
    layout: str = "zigzag",
    backend: str = "auto",
    validate: bool = True,
    need_lse: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across ``N = U * R`` cp ranks: Ulysses over ``ulysses_group``
    (``U`` consecutive cp ranks), ring over ``ring_group`` (``R`` ranks, one per Ulysses group, in order).

    Args: shards from ``shard_sequence(x, 1, cp_group, layout)`` with ``layout`` zigzag or contiguous;
    q ``[B, L, H, D]`` with ``H % U == 0``; k/v ``[B, L, Hkv, D]`` (KV heads replicated when ``U`` does not
    divide ``Hkv``); ``causal`` or ``mask=Mask(...)`` (GLOBAL doc ids, any kind); the rest as
    :func:`~seqpar.parallel.ring_attention.ring_attention_with_lse`.
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32; None with ``need_lse=False``, which
    saves its all-to-all). Differentiable.
    Raises ValueError (on every rank) for another layout, heads not divisible by ``U``, shapes that differ
    across ranks, a length the layout cannot split over ``N``, a mask that does not fit.
    """
    mask = ring_mask(causal, mask)
    u, r = group_size(ulysses_group), group_size(ring_group)
    n, i = u * r, group_rank(ring_group)
    b, L, h, _ = q.shape
    if validate:
        check_hybrid_layout(layout)
        validate_inputs(q, k, v, ulysses_group, layout)  # same shapes inside the group (the ring checks across)
        check_divisible(n * L, n, layout)
    reps = kv_replication(h, k.shape[2], u)
    s = n * L
    order = concat_positions(s, range(i * u, (i + 1) * u), n, layout, device=q.device)  # [U*L] after the all-to-all
    to_ring = torch.argsort(order)  # ring rank i's shard over R ranks is the sorted union
    back = torch.argsort(to_ring)
    qh, kh, vh = (seq_to_head(t, ulysses_group)[:, to_ring] for t in (q, replicate_kv(k, reps), replicate_kv(v, reps)))
    out, lse = ring_attention_with_lse(qh, kh, vh, group=ring_group, causal=causal, mask=mask,
                                       softmax_scale=softmax_scale, layout=layout, backend=backend, validate=validate)
    out = head_to_seq(out[:, back], ulysses_group)  # [B, L, H, D]
    if not need_lse:
        return out, None
    lse = head_to_seq(lse.transpose(1, 2)[:, back, :, None], ulysses_group)[..., 0].transpose(1, 2)  # [B, H, L]
    return out, lse


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`hybrid_attention_with_lse` but returns only out ``[B, L, H, D]``."""
    return hybrid_attention_with_lse(q, k, v, need_lse=False, **kwargs)[0]
