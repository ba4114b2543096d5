"""DeepSpeed-Ulysses attention: trade the sequence split for a head split with two all-to-alls.

Each rank enters with its sequence shard ``q [B, L, H, D]`` (any layout of :mod:`seqpar.parallel.layout`).
One all-to-all (:func:`seqpar.parallel.collectives.seq_to_head`) gives every rank the WHOLE sequence for
``H / N`` heads, in rank order; one index permutation puts the tokens in global order, where the local
kernel runs once with the user's global :class:`~seqpar.ops.Mask` (documents, windows, sinks, block-sparse
need nothing special: the kernel sees the sequence as a single device would). The result is permuted back
and returned to the sequence split by the inverse all-to-all. Differentiable end to end: the all-to-alls
are each other's adjoints and the rest is autograd.

GQA: K/V heads split over the group too. When ``N`` does not divide ``Hkv`` (e.g. 2 KV heads on 4 ranks),
each KV head is replicated ``R = N / gcd(Hkv, N)`` times (LoongTrain / Transformer Engine), just enough for
an even split; ``repeat_interleave``'s backward sums the replicas' gradients into the original head.
Query heads must be divisible by ``N`` (checked, one clear error).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import LocalMask, Mask
from seqpar.parallel.collectives import group_size, head_to_seq, seq_to_head
from seqpar.parallel.kernel_call import kernel_attention
from seqpar.parallel.layout import local_positions
from seqpar.parallel.ring_attention import ring_mask, validate_inputs
from seqpar.parallel.ring_plan import check_mask


def kv_replication(n_heads: int, n_kv_heads: int, group: int) -> int:
    """How many times each KV head is replicated so ``group`` ranks get whole KV heads (1: none).

    Raises ValueError naming ``model.n_heads`` / ``parallel.ulysses`` and the modes that would work when
    the query heads do not split over the group."""
    if n_heads % group != 0:
        fits = [u for u in range(2, group + 1) if n_heads % u == 0 and group % u == 0]
        raise ValueError(
            f"Ulysses splits attention heads over its group: model.n_heads={n_heads} query heads are not divisible "
            f"by the Ulysses group of {group} ranks (parallel.ulysses={group} with cp_comm=hybrid, parallel.cp={group} "
            "with cp_comm=ulysses); use "
            "parallel.cp_comm=ring or parallel.cp_comm=allgather (any head count)"
            + (f", or parallel.cp_comm=hybrid with parallel.ulysses={fits[-1]}." if fits else "."))
    return group // math.gcd(n_kv_heads, group)


def replicate_kv(k: Tensor, reps: int) -> Tensor:
    """``k [B, S, Hkv, D]`` -> ``[B, S, Hkv * reps, D]``: KV head ``m`` becomes heads ``m*reps .. m*reps+reps-1``,
    so query head ``h`` still reads (a copy of) KV head ``h // (H / Hkv)``."""
    return k if reps == 1 else k.repeat_interleave(reps, dim=2)


@functools.lru_cache(maxsize=64)
def _order_cached(seq_len: int, ranks: tuple, n: int, layout: str, device: Optional[torch.device]) -> Tensor:
    # Positions depend only on the arguments (no doc ids): one host-to-device copy per shape, not per layer.
    return torch.cat([local_positions(seq_len, r, n, layout) for r in ranks]).to(device)


def concat_positions(seq_len: int, ranks, n: int, layout: str, doc_ids: Optional[Tensor] = None,
                     device: Optional[torch.device] = None) -> Tensor:
    """Global positions ``[len(ranks) * L]`` (int64, on ``device``, default CPU) of the shards of ``ranks`` (of
    ``n``) concatenated in that order: what a rank holds after :func:`seq_to_head` over those ranks."""
    if layout == "docs":
        return torch.cat([local_positions(seq_len, r, n, layout, doc_ids=doc_ids.cpu()) for r in ranks]).to(device)
    return _order_cached(seq_len, tuple(ranks), n, layout, None if device is None else torch.device(device))


def check_shapes(q: Tensor, k: Tensor, v: Tensor, group, layout: str, causal: bool,
                 mask: Optional[Mask]) -> Optional[Mask]:
    """Same-on-every-rank checks (shapes across ranks, mask vs global length); returns the mask or None."""
    mask = ring_mask(causal, mask)
    validate_inputs(q, k, v, group, layout)
    if mask is not None or layout == "docs":
        check_mask(mask if mask is not None else Mask(causal=causal), q.shape[0], q.shape[1] * group_size(group),
                   layout)
    return mask


def _ulysses(q, k, v, group, causal, mask, scale, layout, backend, need_lse):
    n = group_size(group)
    b, L, h, _ = q.shape
    s = n * L
    reps = kv_replication(h, k.shape[2], n)
    order = concat_positions(s, range(n), n, layout, None if mask is None else mask.doc_ids, q.device)
    to_global = torch.argsort(order)  # x_global = x_cat[:, to_global]; x_cat = x_global[:, order]
    qh, kh, vh = (seq_to_head(t, group)[:, to_global] for t in (q, replicate_kv(k, reps), replicate_kv(v, reps)))
    lm = LocalMask(causal=causal) if mask is None else mask.local(0, s, 0, s, device=q.device)
    out, lse = kernel_attention(qh, kh, vh, lm, softmax_scale=scale, backend=backend)  # whole sequence
    out = head_to_seq(out[:, order], group)  # [B, L, H, D]
    if not need_lse:
        return out, None
    lse = head_to_seq(lse.transpose(1, 2)[:, order, :, None], group)  # [B, L, H, 1]
    return out, lse[..., 0].transpose(1, 2)


def ulysses_attention_with_lse(
    q: Tensor,  # [B, L, H, D] local shard
    k: Tensor,  # [B, L, Hkv, D]
    v: Tensor,  # [B, L, Hkv, D]
    *,
    group=None,
    causal: bool = False,
    mask: Optional[Mask] = None,
    softmax_scale: Optional[float] = None,
    layout: str = "zigzag",
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact attention over the sequence sharded across ``group`` by ``layout``, by head-parallel all-to-all.

    Args: local shards from ``shard_sequence(x, 1, group, layout)`` (``doc_ids=`` for ``layout="docs"``):
    q ``[B, L, H, D]``, k/v ``[B, L, Hkv, D]`` (``H % N == 0``; KV heads replicated when ``N`` does not
    divide ``Hkv``); ``causal`` on global positions or ``mask=Mask(...)`` with GLOBAL ``doc_ids``;
    ``softmax_scale`` default ``1/sqrt(D)``; ``backend`` the local kernel (whole sequence, ``H/N`` heads);
    ``validate`` gathers every rank's shapes first so bad input raises everywhere instead of hanging.
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32; natural log). Differentiable.
    Raises ValueError for heads not divisible by the group, shapes that differ across ranks, a length
    the layout cannot split, a mask that does not fit the global sequence.
    """
    mask = check_shapes(q, k, v, group, layout, causal, mask) if validate else ring_mask(causal, mask)
    return _ulysses(q, k, v, group, causal, mask, softmax_scale, layout, backend, need_lse=True)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False,
                      mask: Optional[Mask] = None, softmax_scale: Optional[float] = None, layout: str = "zigzag",
                      backend: str = "auto", validate: bool = True) -> Tensor:
    """Like :func:`ulysses_attention_with_lse` but returns only out ``[B, L, H, D]`` (no lse all-to-all)."""
    mask = check_shapes(q, k, v, group, layout, causal, mask) if validate else ring_mask(causal, mask)
    return _ulysses(q, k, v, group, causal, mask, softmax_scale, layout, backend, need_lse=False)[0]


__all__ = ["concat_positions", "kv_replication", "replicate_kv", "ulysses_attention",
           "ulysses_attention_with_lse"]
