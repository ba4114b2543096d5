"""Pure-PyTorch blockwise attention with log-sum-exp: the CPU path and the reference for every kernel.

Never materialises the ``S_q x S_k`` score matrix: queries and keys are walked in blocks with the
online softmax (running max ``m``, running sum ``l``), and the backward recomputes the probabilities
block by block from the saved log-sum-exp (FlashAttention's recipe), so memory is O(S * block).

Masks are defined on *global* token positions, so a ring step can ask for the right mask between
any two blocks: query ``i`` of this call sits at position ``q_offset + i`` and key ``j`` at
``k_offset + j``. A key is visible when all of these hold:

* ``causal``: ``q_pos >= k_pos``;
* ``window_left=W``: ``q_pos - k_pos <= W`` (a sliding window of W keys to the left, plus itself);
* document ids given: ``q_doc_ids[b, i] == k_doc_ids[b, j]`` (packed sequences).

GQA: ``k``/``v`` may have ``H_kv`` heads with ``H % H_kv == 0``; queries are viewed as
``[B, H_kv, G, S, D]`` so K/V broadcast over the group ``G`` without being copied.

A row that sees no key gets ``out = 0`` and ``lse = -inf`` (never NaN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for half types; float64 stays float64 so the reference can be exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _visible(
    q_pos: Tensor,  # [bq] global positions of this query block
    k_pos: Tensor,  # [bk]
    q_doc: Optional[Tensor],  # [B, bq] or None
    k_doc: Optional[Tensor],  # [B, bk] or None
    causal: bool,
    window_left: Optional[int],
) -> Optional[Tensor]:
    """Boolean visibility ``[B or 1, 1, 1, bq, bk]`` broadcastable to scores, or None if all visible."""
    mask = None
    diff = q_pos[:, None] - k_pos[None, :]  # [bq, bk]
    if causal:
        mask = diff >= 0
    if window_left is not None:
        w = diff <= window_left
        mask = w if mask is None else mask & w
    if mask is not None:
        mask = mask[None, None, None]  # [1, 1, 1, bq, bk]
    if q_doc is not None:
        d = (q_doc[:, :, None] == k_doc[:, None, :])[:, None, None]  # [B, 1, 1, bq, bk]
        mask = d if mask is None else mask & d
    return mask


def _block_skippable(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, window_left) -> bool:
    """True when no (query, key) pair of the two position ranges [lo, hi) can be visible."""
    if causal and q_hi - 1 < k_lo:  # last query is before the first key
        return True
    if window_left is not None and q_lo - (k_hi - 1) > window_left:  # first query too far right
        return True
    return False


def _split_heads(q: Tensor, n_kv: int) -> Tensor:
    # [B, S, H, D] -> [B, H_kv, G, S, D]; head h belongs to kv head h // G (the HF/Llama convention).
    b, s, h, d = q.shape
    return q.view(b, s, n_kv, h // n_kv, d).permute(0, 2, 3, 1, 4)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, q_doc_ids, k_doc_ids) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [batch, seq, heads, head_dim] tensors; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shapes disagree: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}; "
                         "k and v must match and share batch and head_dim with q.")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}; "
                         "n_heads must be a multiple of n_kv_heads.")
    if (q_doc_ids is None) != (k_doc_ids is None):
        raise ValueError("q_doc_ids and k_doc_ids must be given together (or neither).")


def attention_forward_torch(
    q: Tensor,  # [B, Sq, H, D]
    k: Tensor,  # [B, Sk, Hkv, D]
    v: Tensor,  # [B, Sk, Hkv, D]
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    k_offset: int = 0,
    window_left: Optional[int] = None,
    q_doc_ids: Optional[Tensor] = None,  # [B, Sq]
    k_doc_ids: Optional[Tensor] = None,  # [B, Sk]
    block_q: int = 512,
    block_k: int = 512,
) -> tuple[Tensor, Tensor]:
    """Blockwise attention forward. Returns ``out [B, Sq, H, D]`` (q's dtype) and ``lse [B, H, Sq]``.

    lse is natural-log, float32 (float64 for float64 inputs), ``-inf`` for rows that see no key.
    """
    _check_inputs(q, k, v, q_doc_ids, k_doc_ids)
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
    q_pos_all = torch.arange(sq, device=q.device) + q_offset
    k_pos_all = torch.arange(sk, device=q.device) + k_offset

    for qs in range(0, sq, block_q):
        qe = min(qs + block_q, sq)
        qb = qh[:, :, :, qs:qe].to(acc) * scale  # [B, Hkv, G, bq, D]
        m = torch.full((b, hkv, g, qe - qs), NEG_INF, dtype=acc, device=q.device)
        l = torch.zeros_like(m)
        o = torch.zeros(b, hkv, g, qe - qs, d, dtype=acc, device=q.device)
        for ks in range(0, sk, block_k):
            ke = min(ks + block_k, sk)
            if _block_skippable(q_offset + qs, q_offset + qe, k_offset + ks, k_offset + ke, causal, window_left):
                continue
            s = qb @ kh[:, :, :, ks:ke].to(acc).transpose(-1, -2)  # [B, Hkv, G, bq, bk]
            mask = _visible(q_pos_all[qs:qe], k_pos_all[ks:ke],
                            None if q_doc_ids is None else q_doc_ids[:, qs:qe],
                            None if k_doc_ids is None else k_doc_ids[:, ks:ke], causal, window_left)
            if mask is not None:
                s = s.masked_fill(~mask, NEG_INF)
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


def attention_backward_torch(
    dout: Tensor,  # [B, Sq, H, D]
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,  # [B, Sq, H, D], the FINAL output of the rows (global, after any ring merge)
    lse: Tensor,  # [B, H, Sq], the FINAL log-sum-exp of the rows
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    k_offset: int = 0,
    window_left: Optional[int] = None,
    q_doc_ids: Optional[Tensor] = None,
    k_doc_ids: Optional[Tensor] = None,
    delta: Optional[Tensor] = None,  # [B, H, Sq] = rowsum(dout * out), computed if None
    block_q: int = 512,
    block_k: int = 512,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact blockwise backward from the saved (global) lse. Returns ``dq, dk, dv`` in the accumulation
    dtype (float32, or float64 for float64 inputs) so ring steps can sum them without rounding.

    Because ``lse`` and ``delta`` are the final statistics of each query row, calling this once per
    key block of a ring and summing gives exactly the gradient of the merged attention.
    """
    _check_inputs(q, k, v, q_doc_ids, k_doc_ids)
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
    q_pos_all = torch.arange(sq, device=q.device) + q_offset
    k_pos_all = torch.arange(sk, device=q.device) + k_offset

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
            if _block_skippable(q_offset + qs, q_offset + qe, k_offset + ks, k_offset + ke, causal, window_left):
                continue
            kb = kh[:, :, :, ks:ke].to(acc)  # [B, Hkv, 1, bk, D]
            vb = vh[:, :, :, ks:ke].to(acc)
            s = (qb @ kb.transpose(-1, -2)) * scale  # [B, Hkv, G, bq, bk]
            p = torch.exp(s - lse_safe)
            mask = _visible(q_pos_all[qs:qe], k_pos_all[ks:ke],
                            None if q_doc_ids is None else q_doc_ids[:, qs:qe],
                            None if k_doc_ids is None else k_doc_ids[:, ks:ke], causal, window_left)
            if mask is not None:
                p = p.masked_fill(~mask, 0.0)
            dv[:, :, ks:ke] += (p.transpose(-1, -2) @ dob).sum(2)  # sum over the GQA group
            dp = dob @ vb.transpose(-1, -2)  # [B, Hkv, G, bq, bk]
            ds = p * (dp - dl_b) * scale
            dq[:, :, :, qs:qe] += ds @ kb
            dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ qb).sum(2)

    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d)  # [B, Sq, H, D]
    dk = dk.permute(0, 2, 1, 3)  # [B, Sk, Hkv, D]
    dv = dv.permute(0, 2, 1, 3)
    return dq, dk, dv


class TorchAttentionFn(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out, lse; backward recomputes blockwise (O(S) memory)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, q_offset, k_offset, window_left, q_doc_ids, k_doc_ids):
        out, lse = attention_forward_torch(
            q, k, v, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset, k_offset=k_offset,
            window_left=window_left, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)
        ctx.save_for_backward(q, k, v, out, lse, q_doc_ids, k_doc_ids)
        ctx.opts = dict(causal=causal, softmax_scale=softmax_scale, q_offset=q_offset, k_offset=k_offset,
                        window_left=window_left)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # lse is an output for the ring merge; gradients flowing into it are not supported here
        # (the ring path differentiates through its own merge), so _dlse is ignored.
        q, k, v, out, lse, q_doc_ids, k_doc_ids = ctx.saved_tensors
        dq, dk, dv = attention_backward_torch(dout, q, k, v, out, lse, q_doc_ids=q_doc_ids,
                                              k_doc_ids=k_doc_ids, **ctx.opts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def attention_torch(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, window_left=None,
                    q_doc_ids=None, k_doc_ids=None) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)``; see :func:`attention_forward_torch` for arguments and shapes."""
    return TorchAttentionFn.apply(q, k, v, causal, softmax_scale, q_offset, k_offset, window_left,
                                  q_doc_ids, k_doc_ids)
