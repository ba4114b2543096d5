"""Triton forward kernel of blockwise attention with log-sum-exp (the FlashAttention-2 recipe).

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the key blocks that can be
visible to them with the online softmax, in base 2 (``exp2`` of scores pre-multiplied by
``softmax_scale * log2(e)``); the returned lse is converted back to natural log.

Masks use global positions (``q_offset + i``, ``k_offset + j``), like :mod:`seqpar.ops.attention.reference`.
The key loop is split into three stages so that only blocks that straddle a mask edge pay for it:

    [lo, full_lo)        masked   (left window edge)
    [full_lo, full_hi)   unmasked (every row sees every key: no compares, no selects)
    [full_hi, hi)        masked   (causal diagonal, and the ragged key tail)

and key blocks outside ``[lo, hi)`` are never loaded. Document ids are a data-dependent mask, so when
given they are applied in every stage.

Ring-ready: with ``MERGE`` the kernel reads a running ``(out fp32, lse)`` pair for its rows and writes
the merged pair back in place, so a ring step costs no extra elementwise pass.

Shared helpers (configs, pruning, mask helpers, environment) live in :mod:`.common`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from seqpar.ops.attention.mask import LocalMask
from seqpar.ops.attention.triton.common import (_all, _cfg, candidates, check_triton_inputs, doc_ids_arg,
                                                dot_precision, interpreter_compat, interpreting, key_block_ranges,
                                                last_dim_contiguous, prune_by, run_kernel, tune_size, visible_mask)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Finite start for the running max: a row whose first blocks are fully masked then gets
# exp2(-inf - m) = 0 and alpha = exp2(0) = 1 instead of exp2(-inf + inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)

# (BLOCK_M, BLOCK_N, warps, stages) per head_dim, best measured first (the untuned default for small
# problems): seeds from FlashAttention/Flex sm90 defaults, kept if spill-free under ptxas and pruned
# by H200 autotune timings (NOTES-attention.md). 256 is unmeasured. The interpreter gets one config.
FWD_CONFIGS = {
    16: [_cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)],
    32: [_cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)],
    64: [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 4)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)],
    256: [_cfg(64, 32, 4, 3), _cfg(128, 64, 8, 2)],
}
INTERPRET_FWD_CONFIG = _cfg(32, 16, 4, 1)
fwd_candidates = candidates(FWD_CONFIGS, INTERPRET_FWD_CONFIG)


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
               lo, hi, Sk, k_offset, window_left, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # int64 block base: start_n * stride can pass 2^31 at long context; in-block offsets stay int32.
        kT_ptrs = K_head + start_n.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = V_head + start_n.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASK_POS:
            kT = tl.load(kT_ptrs, mask=cols[None, :] < Sk, other=0.0)  # [D, BLOCK_N]
        else:
            kT = tl.load(kT_ptrs)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
        if MASK_POS or HAS_DOCS:
            k_doc = 0
            if HAS_DOCS:
                k_doc = tl.load(KDoc_b + cols, mask=cols < Sk, other=-1)[None, :]
            visible = visible_mask(q_pos[:, None], (k_offset + cols)[None, :], cols[None, :] < Sk, q_doc, k_doc,
                                   window_left, MASK_POS, CAUSAL, HAS_WINDOW, HAS_DOCS)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:  # fold the scale into one FMA per score
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK_POS:
            v = tl.load(v_ptrs, mask=cols[:, None] < Sk, other=0.0)  # [BLOCK_N, D]
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_all(FWD_CONFIGS, INTERPRET_FWD_CONFIG),
                 key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS", "MERGE", "tune_size"],
                 prune_configs_by={"early_config_prune": prune_by(fwd_candidates)},
                 restore_value=["OutAcc", "LseAcc"], cache_results=True)
@triton.jit(do_not_specialize=["q_offset", "k_offset", "window_left", "tune_size"])
def _attn_fwd(Q, K, V, Out, Lse, OutAcc, LseAcc, QDoc, KDoc,
              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
              stride_ab, stride_as, stride_ah, stride_qdb, stride_kdb,
              H, G, Sq, Sk, q_offset, k_offset, window_left, qk_scale, tune_size,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              MERGE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), B * H)``. Q/Out ``[B, Sq, H, D]``, K/V ``[B, Sk, H // G, D]``, Lse ``[B, H, Sq]``."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first so the tail wave is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G  # GQA: query heads [kvh * G, (kvh + 1) * G) share one K/V head, never copied
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    row_ok = rows < Sq

    q_ptrs = Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qs \
        + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D], stays in registers
    q_pos = q_offset + rows
    q_doc = 0
    if HAS_DOCS:
        q_doc = tl.load(QDoc + b * stride_qdb + rows, mask=row_ok, other=-2)[:, None]
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    KDoc_b = KDoc + b * stride_kdb

    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_block_ranges(start_m, Sq, Sk, q_offset, k_offset, window_left,
                                                BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
                                   lo, full_lo, Sk, k_offset, window_left, qk_scale,
                                   BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, DOT_PREC)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
                               full_lo, full_hi, Sk, k_offset, window_left, qk_scale,
                               BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_DOCS, DOT_PREC)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
                               full_hi, hi, Sk, k_offset, window_left, qk_scale,
                               BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, DOT_PREC)

    # Rows that saw no key have l = 0: out 0 and lse -inf (never 0/0).
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    lse2 = tl.where(l_ok, m_i + tl.math.log2(l_safe), float("-inf"))  # base-2 lse of this block
    lse_ptrs = Lse + pid_bh.to(tl.int64) * Sq + rows
    if MERGE:
        a_ptrs = OutAcc + b * stride_ab + h * stride_ah + start_m.to(tl.int64) * stride_as \
            + offs_m[:, None] * stride_as + offs_d[None, :]
        o_old = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        lse2_old = tl.load(LseAcc + pid_bh.to(tl.int64) * Sq + rows, mask=row_ok, other=float("-inf")) * _LOG2E
        mx = tl.maximum(lse2_old, lse2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w_old = tl.math.exp2(lse2_old - mx)
        w_new = tl.math.exp2(lse2 - mx)
        s = w_old + w_new
        s_ok = s > 0.0
        s_safe = tl.where(s_ok, s, 1.0)
        out = (w_old[:, None] * o_old + (w_new / l_safe)[:, None] * acc) / s_safe[:, None]
        tl.store(a_ptrs, out, mask=row_ok[:, None])
        tl.store(LseAcc + pid_bh.to(tl.int64) * Sq + rows,
                 tl.where(s_ok, (mx + tl.math.log2(s_safe)) * _LN2, float("-inf")), mask=row_ok)
    else:
        o_ptrs = Out + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os \
            + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, lse2 * _LN2, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Launcher: owns every shape/stride/dtype check so the kernel can assume them.
# ----------------------------------------------------------------------------------------------------

def attention_fwd_launch(q, k, v, mask: LocalMask, *, softmax_scale: Optional[float], out_acc=None, lse_acc=None,
                         autotune: bool = True):
    """Run the forward kernel. Shapes as in :func:`seqpar.ops.attention.triton.function.forward`.

    Without ``out_acc``: returns fresh ``(out [B, Sq, H, D] in q.dtype, lse [B, H, Sq] fp32)``.
    With ``out_acc`` (fp32 ``[B, Sq, H, D]``) and ``lse_acc`` (fp32 contiguous ``[B, H, Sq]``): merges this
    call's result into them in place and returns them. ``autotune=False`` runs the first listed tile.
    """
    check_triton_inputs(q, k, v, mask)
    if interpreting():
        interpreter_compat()
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    merge = out_acc is not None
    if merge != (lse_acc is not None):
        raise ValueError("out_acc and lse_acc must be given together (the running pair of a ring).")
    if merge:
        if out_acc.shape != q.shape or out_acc.dtype != torch.float32 or out_acc.stride(-1) != 1:
            raise ValueError(f"out_acc must be float32 {list(q.shape)} with unit last stride; got "
                             f"{out_acc.dtype} {list(out_acc.shape)}.")
        if tuple(lse_acc.shape) != (b, h, sq) or lse_acc.dtype != torch.float32 or not lse_acc.is_contiguous():
            raise ValueError(f"lse_acc must be contiguous float32 [{b}, {h}, {sq}]; got {lse_acc.dtype} "
                             f"{list(lse_acc.shape)}.")
        out, lse = out_acc, lse_acc
    else:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if sq == 0 or b * h == 0:
        return out, lse
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    # Without a running pair the kernel never touches OutAcc/LseAcc: 1-element dummies keep the
    # autotuner's restore_value copies free.
    dummy = torch.zeros(1, dtype=torch.float32, device=q.device)
    acc_o, acc_l = (out, lse) if merge else (dummy, dummy)
    q_doc_ids, k_doc_ids, window_left = mask.q_doc_ids, mask.k_doc_ids, mask.window_left
    qd, kd = doc_ids_arg(q_doc_ids, q), doc_ids_arg(k_doc_ids, q)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    args = (q, k, v, out, lse, acc_o, acc_l, qd, kd,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            acc_o.stride(0) if merge else 0, acc_o.stride(1) if merge else 0, acc_o.stride(2) if merge else 0,
            qd.stride(0) if q_doc_ids is not None else 0, kd.stride(0) if k_doc_ids is not None else 0,
            h, h // hkv, sq, sk, int(mask.q_offset), int(mask.k_offset), int(window_left or 0),
            scale * 1.4426950408889634, tune_size(b, h, sq, sk, d))
    flags = dict(HEAD_DIM=d, CAUSAL=bool(mask.causal), HAS_WINDOW=window_left is not None,
                 HAS_DOCS=q_doc_ids is not None, MERGE=merge, DOT_PREC=dot_precision(q.dtype))
    run_kernel(_attn_fwd, grid, fwd_candidates, autotune, args, flags)
    return out, lse
