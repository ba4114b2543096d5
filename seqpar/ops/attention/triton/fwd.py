"""Triton forward kernel of blockwise attention with log-sum-exp (the FlashAttention-2 recipe).

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the key blocks that can be
visible to them with the online softmax, in base 2 (``exp2`` of scores pre-multiplied by
``softmax_scale * log2(e)``); the returned lse is converted back to natural log.

Masks use global positions (``q_offset + i``, ``k_offset + j``), like :mod:`seqpar.ops.attention.reference`.
The key loop is split into three stages so that only blocks that straddle a mask edge pay for it:

    [lo, full_lo)        masked   (left window edge)
    [full_lo, full_hi)   unmasked (every row sees every key: no compares, no selects)
    [full_hi, hi)        masked   (causal diagonal, and the ragged key tail)

and key blocks outside ``[lo, hi)`` are never loaded. Documents and block-sparse layouts narrow
``[lo, hi)`` through per-row key intervals computed on the host (:mod:`.bounds`; a tile inside one
document runs unmasked), the sinks of the rows' documents are an extra masked range, block-sparse tiles
with no visible pair are skipped before their K/V loads, and strided positions (striped shards) are
supported everywhere (:mod:`.masking`). Every mask feature is a constexpr: the dense kernels keep
their code.

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
from seqpar.ops.attention.triton.bounds import check_positions, layout_arg, mask_flags, mask_scalars, row_bounds
from seqpar.ops.attention.triton.common import (_all, _cfg, candidates, check_triton_inputs, dot_precision,
                                                interpreter_compat, interpreting, last_dim_contiguous, prune_by,
                                                run_kernel, tune_size)
from seqpar.ops.attention.triton.masking import (MASK_KEYS, MASK_SCALARS, any_true, block_layout, key_block_ranges,
                                                 visible_mask)

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
def _fwd_stage(acc, l_i, m_i, n_tiles, q, q_pos, row_ok, r_lo, r_hi, s_lo, s_hi, K_head, V_head, Layout,
               stride_ks, stride_vs, lo, hi, Sk, k_offset, k_stride, window_left, window_right, bs_size, bs_n, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr, ROW_BOUNDS: tl.constexpr,
               HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr, STRIDED: tl.constexpr, COUNT: tl.constexpr,
               DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if STRIDED:
            k_pos = (k_offset + cols * k_stride)[None, :]
        else:
            k_pos = (k_offset + cols)[None, :]
        c = cols[None, :]
        go = True
        if BLOCK_SPARSE:  # a tile with no visible pair is skipped before K/V are loaded (positions only)
            layout = block_layout(Layout, q_pos[:, None], k_pos, row_ok[:, None] & (c < Sk), bs_size, bs_n)
            if MASK_POS:
                visible = visible_mask(q_pos[:, None], k_pos, c < Sk, (c >= r_lo[:, None]) & (c < r_hi[:, None]),
                                       (c >= s_lo[:, None]) & (c < s_hi[:, None]), layout, window_left, window_right,
                                       CAUSAL, HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE)
                go = any_true(visible)
            else:
                go = any_true(layout)
        if go:
            if COUNT:
                n_tiles += 1
            # int64 block base: start_n * stride can pass 2^31 at long context; in-block offsets stay int32.
            kT_ptrs = K_head + start_n.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
            v_ptrs = V_head + start_n.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
            if MASK_POS:
                kT = tl.load(kT_ptrs, mask=cols[None, :] < Sk, other=0.0)  # [D, BLOCK_N]
            else:
                kT = tl.load(kT_ptrs)
            qk = tl.dot(q, kT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
            if MASK_POS:
                if not BLOCK_SPARSE:
                    visible = visible_mask(q_pos[:, None], k_pos, c < Sk, (c >= r_lo[:, None]) & (c < r_hi[:, None]),
                                           (c >= s_lo[:, None]) & (c < s_hi[:, None]), 0, window_left, window_right,
                                           CAUSAL, HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE)
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
    return acc, l_i, m_i, n_tiles


@triton.autotune(configs=_all(FWD_CONFIGS, INTERPRET_FWD_CONFIG),
                 key=["HEAD_DIM", *MASK_KEYS, "MERGE", "tune_size"],
                 prune_configs_by={"early_config_prune": prune_by(fwd_candidates)},
                 restore_value=["OutAcc", "LseAcc"], cache_results=True)
@triton.jit(do_not_specialize=[*MASK_SCALARS, "tune_size"])
def _attn_fwd(Q, K, V, Out, Lse, OutAcc, LseAcc, Rows, Layout, Count,
              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
              stride_ab, stride_as, stride_ah,
              H, G, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right, bs_size, bs_n,
              qk_scale, tune_size,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr,
              ROW_BOUNDS: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr, STRIDED: tl.constexpr,
              MERGE: tl.constexpr, COUNT: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), B * H)``. Q/Out ``[B, Sq, H, D]``, K/V ``[B, Sk, H // G, D]``, Lse ``[B, H, Sq]``;
    Rows int32 ``[B, 4, Sq]`` (:func:`.bounds.row_bounds`), Layout int8 ``[nb, nb]``, Count int32 ``[B * H, grid_m]``
    (``COUNT``: key tiles loaded per program, a test hook)."""
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
    if STRIDED:
        q_pos = q_offset + rows * q_stride
    else:
        q_pos = q_offset + rows
    r_lo = 0
    r_hi = 0
    s_lo = 0
    s_hi = 0
    if ROW_BOUNDS or HAS_SINKS:  # [B, 4, Sq]: key interval, sink interval of each row
        R_b = Rows + b * 4 * Sq + rows
        r_lo = tl.load(R_b, mask=row_ok, other=Sk)
        r_hi = tl.load(R_b + Sq, mask=row_ok, other=0)
        s_lo = tl.load(R_b + 2 * Sq, mask=row_ok, other=Sk)
        s_hi = tl.load(R_b + 3 * Sq, mask=row_ok, other=0)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_tiles = pid_m * 0  # COUNT: a scalar counter (folded away otherwise)
    lo, full_lo, full_hi, hi, sink_lo, sink_hi = key_block_ranges(
        start_m, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right, row_ok, r_lo, r_hi,
        s_lo, s_hi, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_WINDOW_R, STRIDED, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE)
    scal = (Sk, k_offset, k_stride, window_left, window_right, bs_size, bs_n, qk_scale)
    common = (q, q_pos, row_ok, r_lo, r_hi, s_lo, s_hi, K_head, V_head, Layout, stride_ks, stride_vs)
    if HAS_SINKS:  # the sink keys of the rows' documents, when apart from the window range
        acc, l_i, m_i, n_tiles = _fwd_stage(acc, l_i, m_i, n_tiles, *common, sink_lo, sink_hi, *scal,
                                            BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_WINDOW_R,
                                            ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT, DOT_PREC)
    if HAS_WINDOW or HAS_WINDOW_R or ROW_BOUNDS or HAS_SINKS or BLOCK_SPARSE or STRIDED:  # left masked edge
        acc, l_i, m_i, n_tiles = _fwd_stage(acc, l_i, m_i, n_tiles, *common, lo, full_lo, *scal,
                                            BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_WINDOW_R,
                                            ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT, DOT_PREC)
    acc, l_i, m_i, n_tiles = _fwd_stage(acc, l_i, m_i, n_tiles, *common, full_lo, full_hi, *scal,
                                        BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_WINDOW_R,
                                        ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT, DOT_PREC)
    acc, l_i, m_i, n_tiles = _fwd_stage(acc, l_i, m_i, n_tiles, *common, full_hi, hi, *scal,
                                        BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_WINDOW_R,
                                            ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT, DOT_PREC)
    if COUNT:
        tl.store(Count + pid_bh * tl.num_programs(0) + pid_m, n_tiles)

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
                         autotune: bool = True, tile_counts: Optional[torch.Tensor] = None):
    """Run the forward kernel. Shapes as in :func:`seqpar.ops.attention.triton.function.forward`.

    Without ``out_acc``: returns fresh ``(out [B, Sq, H, D] in q.dtype, lse [B, H, Sq] fp32)``.
    With ``out_acc`` (fp32 ``[B, Sq, H, D]``) and ``lse_acc`` (fp32 contiguous ``[B, H, Sq]``): merges this
    call's result into them in place and returns them. ``autotune=False`` runs the first listed tile.
    ``tile_counts`` (a test hook: int32 ``[B * H, cdiv(Sq, BLOCK_M)]``): filled with the number of key
    tiles each program loaded (the proof that masked tiles are skipped).
    """
    check_triton_inputs(q, k, v, mask)
    check_positions(mask, q.shape[1], k.shape[1])
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
    flags = mask_flags(mask)
    rows = row_bounds(mask, b, sq, sk, q.device)
    rows = rows if rows is not None else torch.zeros(1, dtype=torch.int32, device=q.device)
    layout, bs_size, bs_n = layout_arg(mask, q.device)
    count = tile_counts is not None
    if count and (tile_counts.dtype != torch.int32 or not tile_counts.is_contiguous()):
        raise ValueError("tile_counts must be a contiguous int32 tensor [B * H, number of query tiles].")
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    args = (q, k, v, out, lse, acc_o, acc_l, rows, layout, tile_counts if count else rows,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            acc_o.stride(0) if merge else 0, acc_o.stride(1) if merge else 0, acc_o.stride(2) if merge else 0,
            h, h // hkv, sq, sk, *mask_scalars(mask), bs_size, bs_n,
            scale * 1.4426950408889634, tune_size(b, h, sq, sk, d))
    flags = dict(HEAD_DIM=d, **flags, MERGE=merge, COUNT=count, DOT_PREC=dot_precision(q.dtype))
    run_kernel(_attn_fwd, grid, fwd_candidates, autotune, args, flags)
    return out, lse
