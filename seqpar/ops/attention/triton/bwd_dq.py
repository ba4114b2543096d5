"""Triton dQ kernel of the backward (:mod:`.bwd` has the dK/dV kernel): one program per (query block,
batch, head) walking the key tiles the forward walks (same :func:`.masking.key_block_ranges`, sink
range, block-sparse skipping), recomputing ``P`` from the saved global lse.
"""
from __future__ import annotations

import triton
import triton.language as tl

from seqpar.ops.attention.triton.common import _all, _cfg, candidates, prune_by
from seqpar.ops.attention.triton.masking import (MASK_KEYS, MASK_SCALARS, any_true, block_layout, key_block_ranges,
                                                 visible_mask)

_LOG2E = tl.constexpr(1.4426950408889634)

# (BLOCK_M, BLOCK_N, warps, stages): dQ programs own BLOCK_M queries and step BLOCK_N keys. Seeds:
# Flex/FA2 sm90 defaults; pruned by H200 autotune timings (NOTES-attention.md); 16/32/256 unmeasured.
DQ_CONFIGS = {
    16: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    32: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    64: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2)],
    256: [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)],
}
INTERPRET_DQ_CONFIG = _cfg(32, 16, 4, 1)
dq_candidates = candidates(DQ_CONFIGS, INTERPRET_DQ_CONFIG)


@triton.jit
def _dq_stage(dq, q, do, lse2, delta, q_pos, row_ok, r_lo, r_hi, s_lo, s_hi, K_head, V_head, Layout,
              stride_ks, stride_vs, lo, hi, Sk, k_offset, k_stride, window_left, window_right, bs_size, bs_n, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr, ROW_BOUNDS: tl.constexpr,
              HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr, STRIDED: tl.constexpr, DOT_PREC: tl.constexpr):
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
            kT_ptrs = K_head + start_n.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
            vT_ptrs = V_head + start_n.to(tl.int64) * stride_vs + offs_n[None, :] * stride_vs + offs_d[:, None]
            if MASK_POS:
                kT = tl.load(kT_ptrs, mask=cols[None, :] < Sk, other=0.0)  # [D, BLOCK_N]
                vT = tl.load(vT_ptrs, mask=cols[None, :] < Sk, other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                vT = tl.load(vT_ptrs)
            qk = tl.dot(q, kT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if MASK_POS:
                if not BLOCK_SPARSE:
                    visible = visible_mask(q_pos[:, None], k_pos, c < Sk, (c >= r_lo[:, None]) & (c < r_hi[:, None]),
                                           (c >= s_lo[:, None]) & (c < s_hi[:, None]), 0, window_left, window_right,
                                           CAUSAL, HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE)
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, vT, input_precision=DOT_PREC)
            ds = (p * (dp - delta[:, None])).to(kT.dtype)
            dq = tl.dot(ds, tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_all(DQ_CONFIGS, INTERPRET_DQ_CONFIG),
                 key=["HEAD_DIM", *MASK_KEYS, "ACCUMULATE", "tune_size"],
                 prune_configs_by={"early_config_prune": prune_by(dq_candidates)},
                 restore_value=["DQ"], cache_results=True)
@triton.jit(do_not_specialize=[*MASK_SCALARS, "tune_size"])
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, Rows, Layout,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                 stride_dqb, stride_dqs, stride_dqh,
                 H, G, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right, bs_size, bs_n,
                 qk_scale, sm_scale, tune_size,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr,
                 ROW_BOUNDS: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
                 STRIDED: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), B * H)``. dQ ``[B, Sq, H, D]``; Rows/Layout as in the forward kernel."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest (last) query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    row_ok = rows < Sq
    row_base = start_m.to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row_base * stride_qs + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + row_base * stride_dos + offs_m[:, None] * stride_dos
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * Sq + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + rows, mask=row_ok, other=0.0)
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
    lo, full_lo, full_hi, hi, sink_lo, sink_hi = key_block_ranges(
        start_m, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right, row_ok, r_lo, r_hi,
        s_lo, s_hi, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_WINDOW_R, STRIDED, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    common = (q, do, lse2, delta, q_pos, row_ok, r_lo, r_hi, s_lo, s_hi, K_head, V_head, Layout, stride_ks, stride_vs)
    scal = (Sk, k_offset, k_stride, window_left, window_right, bs_size, bs_n, qk_scale)
    if HAS_SINKS:  # the sink keys of the rows' documents, when apart from the window range
        dq = _dq_stage(dq, *common, sink_lo, sink_hi, *scal, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW,
                       HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, DOT_PREC)
    if HAS_WINDOW or HAS_WINDOW_R or ROW_BOUNDS or HAS_SINKS or BLOCK_SPARSE or STRIDED:  # left masked edge
        dq = _dq_stage(dq, *common, lo, full_lo, *scal, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW,
                       HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, DOT_PREC)
    dq = _dq_stage(dq, *common, full_lo, full_hi, *scal, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW,
                   HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, DOT_PREC)
    dq = _dq_stage(dq, *common, full_hi, hi, *scal, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW,
                   HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, DOT_PREC)
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + row_base * stride_dqs + offs_m[:, None] * stride_dqs \
        + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
