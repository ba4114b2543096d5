"""All-gather-KV context parallelism (Llama 3's scheme): every rank gathers the whole sequence's K/V and
attends its own queries to the visible part of it.

K/V travel un-expanded (``[B, L, Hkv, D]`` per rank, one all-gather each; the backward reduce-scatters
dK/dV, :func:`seqpar.parallel.collectives.gather_seq`). The gathered keys are put in global order; each run
of this rank's queries (``layout.rank_pieces``: global positions ``start + stride * a``) is one kernel call
against the key range it can see (causality, the window and the documents of its first and last query
bound it; sinks or block-sparse only narrow it further inside the kernel), with the global
:class:`~seqpar.ops.Mask` restricted by :meth:`Mask.local` to those positions. Every mask kind and every
layout therefore run; no ring plan, no step skipping needed.

Not done: overlapping the gather of the next head slice with the compute of the current one (the gather
runs first, then the kernels); the benchmark of issue 14 will tell whether it is worth it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import Mask
from seqpar.parallel.collectives import gather_seq, group_rank, group_size
from seqpar.parallel.kernel_call import kernel_attention
from seqpar.parallel.layout import rank_pieces
from seqpar.parallel.ulysses import check_shapes, concat_positions
from seqpar.parallel.ring_attention import ring_mask


def key_range(mask: Mask, first: int, last: int, seq_len: int, ids: Optional[Tensor] = None) -> tuple[int, int]:
    """``[lo, hi)``: the keys queries at global positions ``first .. last`` can see at most (host-side;
    ``ids``: a CPU int64 copy of ``mask.doc_ids``, to read a GPU mask once per call)."""
    lo, hi = 0, seq_len
    if mask.causal:
        hi = last + 1
    if mask.window is not None:
        if not mask.causal:
            hi = min(hi, last + mask.window + 1)
        if mask.sinks == 0:  # sinks sit at document (sequence) starts, left of any window
            lo = max(lo, first - mask.window)
    if mask.doc_ids is not None:
        ids = mask.doc_ids.detach().to("cpu", torch.int64).contiguous() if ids is None else ids  # [B, S]
        lo = max(lo, int(torch.searchsorted(ids, ids[:, first:first + 1].contiguous(), side="left").min()))
        hi = min(hi, int(torch.searchsorted(ids, ids[:, last:last + 1].contiguous(), side="right").max()))
    return lo, hi


def _allgather(q, k, v, group, causal, mask, scale, layout, backend):
    n, rank = group_size(group), group_rank(group)
    b, L, h, d = q.shape
    s = n * L
    mask = mask if mask is not None else Mask(causal=causal)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    order = concat_positions(s, range(n), n, layout, mask.doc_ids, q.device)
    to_global = torch.argsort(order)
    k_all, v_all = (gather_seq(t, group)[:, to_global] for t in (k, v))  # [B, S, Hkv, D] global order
    ids = None if mask.doc_ids is None else mask.doc_ids.detach().to("cpu", torch.int64).contiguous()
    outs, lses, l0 = [], [], 0
    for start, length, stride in rank_pieces(s, rank, n, layout, mask.doc_ids):
        lo, hi = key_range(mask, start, start + stride * (length - 1), s, ids)
        qp, kp, vp = q[:, l0:l0 + length], k_all[:, lo:hi], v_all[:, lo:hi]
        lm = mask.local(start, length, lo, hi - lo, q_stride=stride, device=q.device)
        o, lse = kernel_attention(qp, kp, vp, lm, softmax_scale=scale, backend=backend)
        outs.append(o)
        lses.append(lse)
        l0 += length
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def allgather_attention_with_lse(
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
    """Exact attention over the sequence sharded across ``group`` by ``layout``, by all-gathering K/V.

    Args as :func:`seqpar.parallel.ulysses_attention_with_lse` (any ``H % Hkv == 0``; no head constraint).
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32, natural log). Differentiable in
    q, k, v (dK/dV reduce-scattered to their owners).
    Raises ValueError for shapes that differ across ranks, a length the layout cannot split, a mask that
    does not fit the global sequence or that the backend cannot express.
    """
    mask = check_shapes(q, k, v, group, layout, causal, mask) if validate else ring_mask(causal, mask)
    return _allgather(q, k, v, group, causal, mask, softmax_scale, layout, backend)


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`allgather_attention_with_lse` but returns only out ``[B, L, H, D]``."""
    return allgather_attention_with_lse(q, k, v, **kwargs)[0]
