"""Pure-PyTorch blockwise attention with log-sum-exp: the CPU path and the reference for every kernel.

Never materialises the ``S_q x S_k`` score matrix: queries and keys are walked in blocks with the
online softmax (running max ``m``, running sum ``l``), and the backward recomputes the probabilities
block by block from the saved log-sum-exp (FlashAttention's recipe), so memory is O(S * block).

It implements every mask kind of :class:`seqpar.ops.attention.mask.LocalMask` (causal, left and
two-sided windows, attention sinks, documents, block-sparse), on *global* positions so a ring step
can ask for the right mask between any two blocks: query ``i`` of this call sits at
``q_offset + q_stride * i`` and key ``j`` at ``k_offset + k_stride * j`` (strides: striped shards). It is the executable spec of the mask semantics.

GQA: ``k``/``v`` may have ``H_kv`` heads with ``H % H_kv == 0``; queries are viewed as
``[B, H_kv, G, S, D]`` so K/V broadcast over the group ``G`` without being copied.

A row that sees no key gets ``out = 0`` and ``lse = -inf`` (never NaN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention.mask import LocalMask

NEG_INF = float("-inf")
_FULL = LocalMask()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for half types; float64 stays float64 so the reference can be exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _visible(m: LocalMask, qs: int, qe: int, ks: int, ke: int, device) -> Optional[Tensor]:
    """Boolean visibility ``[B or 1, 1, 1, bq, bk]`` of queries ``[qs, qe)`` and keys ``[ks, ke)`` of
    this call, broadcastable to scores, or None if all visible."""
    q_pos = torch.arange(qs, qe, device=device) * m.q_stride + m.q_offset  # [bq] global positions
    k_pos = torch.arange(ks, ke, device=device) * m.k_stride + m.k_offset  # [bk]
    diff = q_pos[:, None] - k_pos[None, :]  # [bq, bk]
    mask = None  # [B or 1, bq, bk]
    if m.causal:
        mask = (diff >= 0)[None]
    win = None
    if m.window_left is not None:
        win = diff <= m.window_left
    if m.window_right is not None:
        right = -diff <= m.window_right
        win = right if win is None else win & right
    if win is not None:
        win = win[None]
        if m.k_sink is not None:  # sinks are visible through the window (not past causality)
            win = win | m.k_sink[:, None, ks:ke].to(device)
        mask = win if mask is None else mask & win
    if m.block_sparse is not None:
        size, vis = m.block_sparse
        vis = vis.to(device)
        blk = vis[(q_pos // size)[:, None], (k_pos // size)[None, :]][None]  # [1, bq, bk]
        mask = blk if mask is None else mask & blk
    if m.q_doc_ids is not None:
        d = m.q_doc_ids[:, qs:qe, None] == m.k_doc_ids[:, None, ks:ke]  # [B, bq, bk]
        mask = d if mask is None else mask & d
    return None if mask is None else mask[:, None, None]


def _block_skippable(m: LocalMask, qs: int, qe: int, ks: int, ke: int) -> bool:
    """True when no (query, key) pair of local rows [qs, qe) and keys [ks, ke) can be visible."""
    q_lo, q_hi = m.q_offset + m.q_stride * qs, m.q_offset + m.q_stride * (qe - 1) + 1  # global [lo, hi)
    k_lo, k_hi = m.k_offset + m.k_stride * ks, m.k_offset + m.k_stride * (ke - 1) + 1
    if m.causal and q_hi - 1 < k_lo:  # last query is before the first key
        return True
    if m.k_sink is None:  # sinks can be visible from anywhere: no window skipping then
        if m.window_left is not None and q_lo - (k_hi - 1) > m.window_left:  # first query too far right
            return True
        if m.window_right is not None and k_lo - (q_hi - 1) > m.window_right:  # last query too far left
            return True
    return False


def _split_heads(q: Tensor, n_kv: int) -> Tensor:
    # [B, S, H, D] -> [B, H_kv, G, S, D]; head h belongs to kv head h // G (the HF/Llama convention).
    b, s, h, d = q.shape
    return q.view(b, s, n_kv, h // n_kv, d).permute(0, 2, 3, 1, 4)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Optional[LocalMask] = None) -> None:
    """Raise a one-sentence ValueError for shapes no backend can take (and doc ids of the wrong size)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [batch, seq, heads, head_dim] tensors; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shapes disagree: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}; "
                         "k and v must match and share batch and head_dim with q.")
    bad = [f"{n}={t.dtype}" for n, t in (("q", q), ("k", k), ("v", v)) if not t.dtype.is_floating_point]
    if bad:
        raise ValueError(f"attention needs floating-point q, k, v (float16/bfloat16/float32/float64); got "
                         f"{', '.join(bad)}: convert with .float() (integer tensors have no softmax).")
    if q.shape[3] == 0:
        raise ValueError(f"attention needs head_dim >= 1; got q{tuple(q.shape)} with head_dim 0 "
                         "(the softmax scale is 1/sqrt(head_dim)).")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}; "
                         "n_heads must be a multiple of n_kv_heads.")
    if mask is not None and mask.k_sink is not None and (mask.k_sink.dim() != 2 or mask.k_sink.shape[1] != k.shape[1]
                                                         or mask.k_sink.shape[0] not in (1, k.shape[0])):
        raise ValueError(f"k_sink must be [batch or 1, seq_k]={[k.shape[0], k.shape[1]]}; got "
                         f"{list(mask.k_sink.shape)} (build it with Mask.local).")
    if mask is not None and mask.q_doc_ids is not None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        if tuple(mask.q_doc_ids.shape) != (b, sq) or tuple(mask.k_doc_ids.shape) != (b, sk):
            raise ValueError(f"q_doc_ids must be [batch, seq_q]={[b, sq]} and k_doc_ids [batch, seq_k]={[b, sk]}; "
                             f"got {list(mask.q_doc_ids.shape)} and {list(mask.k_doc_ids.shape)}.")


def forward(
    q: Tensor,  # [B, Sq, H, D]
    k: Tensor,  # [B, Sk, Hkv, D]
    v: Tensor,  # [B, Sk, Hkv, D]
    mask: LocalMask = _FULL,
    *,
    softmax_scale: Optional[float] = None,
    block_q: int = 512,
    block_k: int = 512,
) -> tuple[Tensor, Tensor]:
    """Blockwise attention forward. Returns ``out [B, Sq, H, D]`` (q's dtype) and ``lse [B, H, Sq]``.

    lse is natural-log, float32 (float64 for float64 inputs), ``-inf`` for rows that see no key.
    """
    check_inputs(q, k, v, mask)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = _acc_dtype(q.dtype)
    qh = _split_heads(q, hkv)  # [B, Hkv, G, Sq, D]
    kh = k.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, Sk, D]
    vh = v.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, Sk, D]
    out = torch.zeros(b, hkv, g, sq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hkv, g, sq), NEG_INF, dtype=acc, device=q.device)

    for qs in range(0, sq, block_q):
        qe = min(qs + block_q, sq)
        qb = qh[:, :, :, qs:qe].to(acc) * scale  # [B, Hkv, G, bq, D]
        m = torch.full((b, hkv, g, qe - qs), NEG_INF, dtype=acc, device=q.device)
        l = torch.zeros_like(m)
        o = torch.zeros(b, hkv, g, qe - qs, d, dtype=acc, device=q.device)
        for ks in range(0, sk, block_k):
            ke = min(ks + block_k, sk)
            if _block_skippable(mask, qs, qe, ks, ke):
                continue
            s = qb @ kh[:, :, :, ks:ke].to(acc).transpose(-1, -2)  # [B, Hkv, G, bq, bk]
            vis = _visible(mask, qs, qe, ks, ke, q.device)
            if vis is not None:
                s = s.masked_fill(~vis, NEG_INF)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            o = o * alpha[..., None] + p @ vh[:, :, :, ks:ke].to(acc)
            m = m_new
        seen = l > 0
        out[:, :, :, qs:qe] = torch.where(seen[..., None], o / torch.where(seen, l, 1.0)[..., None], 0.0)
        lse[:, :, :, qs:qe] = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), NEG_INF)

    out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype)  # [B, Sq, H, D]
    lse = lse.reshape(b, h, sq)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def backward(
    dout: Tensor,  # [B, Sq, H, D]
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,  # [B, Sq, H, D], the FINAL output of the rows (global, after any ring merge)
    lse: Tensor,  # [B, H, Sq], the FINAL log-sum-exp of the rows
    mask: LocalMask = _FULL,
    *,
    softmax_scale: Optional[float] = None,
    delta: Optional[Tensor] = None,  # [B, H, Sq] = rowsum(dout * out), computed if None
    block_q: int = 512,
    block_k: int = 512,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact blockwise backward from the saved (global) lse. Returns ``dq, dk, dv`` in the accumulation
    dtype (float32, or float64 for float64 inputs) so ring steps can sum them without rounding.

    Because ``lse`` and ``delta`` are the final statistics of each query row, calling this once per
    key block of a ring and summing gives exactly the gradient of the merged attention. A gradient
    through lse is folded in by the caller as ``delta - dlse``.
    """
    check_inputs(q, k, v, mask)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = _acc_dtype(q.dtype)
    if delta is None:
        delta = (dout.to(acc) * out.to(acc)).sum(-1).permute(0, 2, 1)  # [B, H, Sq]
    qh = _split_heads(q, hkv)  # [B, Hkv, G, Sq, D]
    doh = _split_heads(dout, hkv)
    kh = k.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, Sk, D]
    vh = v.permute(0, 2, 1, 3).unsqueeze(2)
    lse_h = lse.to(acc).view(b, hkv, g, sq)
    delta_h = delta.to(acc).view(b, hkv, g, sq)
    dq = torch.zeros(b, hkv, g, sq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hkv, sk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, hkv, sk, d, dtype=acc, device=q.device)

    for qs in range(0, sq, block_q):
        qe = min(qs + block_q, sq)
        qb = qh[:, :, :, qs:qe].to(acc)  # [B, Hkv, G, bq, D]
        dob = doh[:, :, :, qs:qe].to(acc)
        lse_b = lse_h[:, :, :, qs:qe]
        # Rows with lse=-inf saw no key: their probabilities are 0 (exp(-inf - -inf) would be NaN).
        lse_safe = torch.where(lse_b == NEG_INF, torch.inf, lse_b)[..., None]
        dl_b = delta_h[:, :, :, qs:qe][..., None]
        for ks in range(0, sk, block_k):
            ke = min(ks + block_k, sk)
            if _block_skippable(mask, qs, qe, ks, ke):
                continue
            kb = kh[:, :, :, ks:ke].to(acc)  # [B, Hkv, 1, bk, D]
            vb = vh[:, :, :, ks:ke].to(acc)
            s = (qb @ kb.transpose(-1, -2)) * scale  # [B, Hkv, G, bq, bk]
            p = torch.exp(s - lse_safe)
            vis = _visible(mask, qs, qe, ks, ke, q.device)
            if vis is not None:
                p = p.masked_fill(~vis, 0.0)
            dv[:, :, ks:ke] += (p.transpose(-1, -2) @ dob).sum(2)  # sum over the GQA group
            dp = dob @ vb.transpose(-1, -2)  # [B, Hkv, G, bq, bk]
            ds = p * (dp - dl_b) * scale
            dq[:, :, :, qs:qe] += ds @ kb
            dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ qb).sum(2)

    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d)  # [B, Sq, H, D]
    dk = dk.permute(0, 2, 1, 3)  # [B, Sk, Hkv, D]
    dv = dv.permute(0, 2, 1, 3)
    return dq, dk, dv


class ReferenceAttentionFn(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out, lse; backward recomputes blockwise (O(S) memory)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale):
        out, lse = forward(q, k, v, mask, softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, softmax_scale  # holds its doc-id tensors (never differentiated)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # lse is an output for the ring merge; gradients flowing into it are not supported here
        # (the ring path differentiates through its own merge), so _dlse is ignored.
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout, q, k, v, out, lse, ctx.mask, softmax_scale=ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: LocalMask = _FULL, *,
              softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)``; see :func:`forward` for arguments and shapes."""
    return ReferenceAttentionFn.apply(q, k, v, mask, softmax_scale)
