"""Triton backward kernels of blockwise attention, from the saved (global) log-sum-exp.

Three launches, FlashAttention-2's split:

1. ``_attn_bwd_preprocess``: ``delta = rowsum(dout * out)`` ``[B, H, Sq]`` (skipped when the caller,
   e.g. a ring, passes the global delta).
2. ``_attn_bwd_dkdv``: one program per (key block, batch, kv head); it keeps K, V and fp32 dK, dV in
   registers and walks the query blocks that can see its keys, for each of the G query heads of its
   GQA group (so dK/dV of a shared head are summed without atomics). Optionally (``DQ_ATOMIC``) it also
   adds dQ with fp32 atomics, which saves the recomputation of the separate dQ kernel.
3. ``_attn_bwd_dq`` (:mod:`.bwd_dq`): one program per (query block, batch, head) walking key blocks,
   like the forward.

Masks as in the forward (:mod:`.masking`): each key tile visits only the query tiles its keys' row
intervals (documents, block-sparse extent) and the causal/window bounds allow; a tile holding a sink
key visits its whole document's rows; block-sparse pairs with no visible entry are never loaded.

Q/dO tile loads of the dK/dV kernel come in two compile-time variants (``USE_TMA``): per-thread
pointers (masked on ragged rows), or TMA through device-side tensor descriptors over ``[B, H, Sq, D]``
(block ``[1, 1, BLOCK_M, D]``; rows >= Sq are zero-filled by the hardware); with ``DQ_ATOMIC`` the TMA variant
also adds each dQ tile by one TMA bulk reduce (rows >= Sq clipped) instead of per-element atomics. The launcher
(:mod:`.bwd_launch`) chooses the mode per call from its ``tma`` argument (:func:`.bwd_launch.tma_mode`):
auto tunes both on sm90+ (TMA for the tiles in ``DKDV_TMA_CONFIGS``), ``True`` forces TMA where legal,
``False`` forces pointers; the mode is part of the autotune key. Nothing touches a device at import.

Probabilities are recomputed as ``exp2(s * scale * log2e - lse * log2e)``: with the final lse of each
row they are exact, so per-ring-step gradients sum to the gradient of the merged attention. Gradients
can be added in-kernel into fp32 buffers (``ACCUMULATE``) so a ring needs no extra passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqpar.ops.attention.triton.common import FP32_CONFIG, _all, _cfg, interpreting, prune_by
from seqpar.ops.attention.triton.masking import (MASK_KEYS, MASK_SCALARS, any_true, block_layout, query_block_ranges,
                                                 visible_mask)

_LOG2E = tl.constexpr(1.4426950408889634)

# (BLOCK_M, BLOCK_N, warps, stages): dK/dV programs own BLOCK_N keys and step BLOCK_M queries; dQ
# programs own BLOCK_M queries and step BLOCK_N keys. Seeds: Flex/FA2 sm90 defaults, then the H200 tile
# sweep (benchmarks/bench_tiles.py, NOTES-attention.md "v4"): one-warpgroup 64-key tiles (two programs per
# SM) win at D = 64 and 128 with TMA loads. The first is the GPU-tested default for small (untuned)
# problems, which take pointer loads. 16/32/256 are unmeasured.
DKDV_CONFIGS = {
    16: [_cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3)],
    32: [_cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3)],
    64: [_cfg(64, 128, 8, 3), _cfg(64, 64, 4, 4)],
    128: [_cfg(64, 128, 8, 3), _cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2)],
    256: [_cfg(64, 64, 8, 2), _cfg(32, 64, 4, 2)],
}
INTERPRET_DKDV_CONFIG = _cfg(16, 32, 4, 1)  # BLOCK_M != BLOCK_N on purpose: exercises unaligned diagonals

# dK/dV configs that also get a TMA-load candidate (USE_TMA=True) when both are autotuned (sm90+): the
# sweep's fastest TMA tiles (the 64-key tiles are 7-17% faster with TMA than with pointers); the list
# stays short for compile time.
DKDV_TMA_CONFIGS = {
    64: [_cfg(64, 64, 4, 4), _cfg(64, 128, 8, 3)],
    128: [_cfg(64, 64, 4, 2), _cfg(64, 128, 8, 3)],
}


def _with_tma(cfg, on: bool):
    return triton.Config({**cfg.kwargs, "USE_TMA": on}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _both(configs):
    return [_with_tma(c, on) for c in configs for on in (False, True)]


def dkdv_candidates(args) -> list:
    """Configs the dK/dV kernel may use for this call, best first: the tiles listed for this head_dim in the
    load variants of ``args["tma_mode"]`` (0 pointers, 1 both, 2 TMA only; see ``bwd_launch.tma_mode``)."""
    mode, d, tuned = args["tma_mode"], args["HEAD_DIM"], args["tune_size"]
    if interpreting():  # one tile, in the load variant the launcher chose
        return [_with_tma(INTERPRET_DKDV_CONFIG, mode == 2)]
    if args["Q"].dtype == torch.float32:
        listed = [FP32_CONFIG]  # fp32 is for tests: one tile, TMA only when forced
        tma_listed = listed if mode == 2 else []
    else:
        listed = DKDV_CONFIGS[d] if tuned else DKDV_CONFIGS[d][:1]
        tma_listed = listed if mode == 2 else [c for c in DKDV_TMA_CONFIGS.get(d, []) if tuned]
    wanted = [] if mode == 2 else [_with_tma(c, False) for c in listed]
    return wanted + ([_with_tma(c, True) for c in tma_listed] if mode else [])


prune_dkdv = prune_by(dkdv_candidates)


@triton.jit
def _attn_bwd_preprocess(Out, DO, Delta, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                         H, Sq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), B * H)``: ``Delta[b, h, i] = sum_d Out[b, i, h, d] * DO[b, i, h, d]`` in fp32."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < Sq
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_os + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows.to(tl.int64)[:, None] * stride_dos + offs_d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + rows, tl.sum(o * do, axis=1), mask=ok)


@triton.jit
def _dkdv_stage(dk, dv, n_tiles, k, v, k_pos, k_ok, c_lo, c_hi, k_sink, Q_b, DO_b, DQ_b, Lse_b, Delta_b, Layout,
                h0, G, b32, stride_qs, stride_qh, stride_dos, stride_doh, stride_dqs, stride_dqh,
                lo, hi, Sq, q_offset, q_stride, window_left, window_right, bs_size, bs_n, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr, ROW_BOUNDS: tl.constexpr,
                HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr, STRIDED: tl.constexpr, COUNT: tl.constexpr,
                DQ_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
    # USE_TMA: Q_b / DO_b are tensor descriptors over [B, H, Sq, D] (block [1, 1, BLOCK_M, D]); TMA
    # zero-fills rows >= Sq, so the loads need neither per-thread addresses nor masks.
    offs_m = tl.arange(0, BLOCK_M)
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    # One flat loop over (GQA head g, query block): a nested `for g` loop around the block loop made
    # ptxas spill the dK/dV accumulators (NOTES-attention.md); the index split is two scalar ops.
    for it in tl.range(0, G * n_blocks):
        g = it // n_blocks
        start_m = tl.multiple_of(lo + (it - g * n_blocks) * BLOCK_M, BLOCK_M)
        rows = start_m + offs_m
        row_ok = rows < Sq
        if STRIDED:
            q_pos = (q_offset + rows * q_stride)[None, :]
        else:
            q_pos = (q_offset + rows)[None, :]
        visible = 0
        go = True
        if BLOCK_SPARSE:  # a (key tile, query tile) pair with no visible pair is never loaded (positions only)
            layout = block_layout(Layout, q_pos, k_pos, k_ok & row_ok[None, :], bs_size, bs_n)
            if MASK_POS:
                r = rows[None, :]
                visible = visible_mask(q_pos, k_pos, k_ok & row_ok[None, :], (r >= c_lo) & (r < c_hi), k_sink, layout,
                                       window_left, window_right, CAUSAL, HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS,
                                       HAS_SINKS, BLOCK_SPARSE)
                go = any_true(visible)
            else:
                go = any_true(layout)
        if go:
            if COUNT:
                n_tiles += 1
            dk, dv = _dkdv_tile(dk, dv, k, v, k_pos, k_ok, c_lo, c_hi, k_sink, Q_b, DO_b, DQ_b, Lse_b, Delta_b,
                                h0 + g, b32, start_m, rows, row_ok, q_pos, visible, stride_qs, stride_qh, stride_dos,
                                stride_doh, stride_dqs, stride_dqh, Sq, window_left, window_right, qk_scale, sm_scale,
                                BLOCK_M, HEAD_DIM, MASK_POS, CAUSAL, HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS,
                                BLOCK_SPARSE, DQ_ATOMIC, DOT_PREC, USE_TMA)
    return dk, dv, n_tiles


@triton.jit
def _dkdv_tile(dk, dv, k, v, k_pos, k_ok, c_lo, c_hi, k_sink, Q_b, DO_b, DQ_b, Lse_b, Delta_b, h, b32, start_m,
               rows, row_ok, q_pos, visible, stride_qs, stride_qh, stride_dos, stride_doh, stride_dqs, stride_dqh,
               Sq, window_left, window_right, qk_scale, sm_scale,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr, ROW_BOUNDS: tl.constexpr,
               HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr, DQ_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
               USE_TMA: tl.constexpr):
    """One (query tile, GQA head) step of the dK/dV program: dV += P^T dO, dK += dS^T Q (dQ by atomics)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    stat = h * Sq + rows  # Lse/Delta are [B, H, Sq] contiguous
    if USE_TMA:
        qT = tl.trans(Q_b.load([b32, h.to(tl.int32), start_m, 0]).reshape(BLOCK_M, HEAD_DIM))  # [D, BLOCK_M]
    else:
        qT_ptrs = Q_b + h * stride_qh + start_m.to(tl.int64) * stride_qs + offs_m[None, :] * stride_qs \
            + offs_d[:, None]
        if MASK_POS:
            qT = tl.load(qT_ptrs, mask=row_ok[None, :], other=0.0)  # [D, BLOCK_M]
        else:
            qT = tl.load(qT_ptrs)
    if MASK_POS:
        lse = tl.load(Lse_b + stat, mask=row_ok, other=float("inf"))  # p = 0 for padding rows
    else:
        lse = tl.load(Lse_b + stat)
    # A row that saw no key (lse = -inf) has p = 0 everywhere: exp2(s - inf), not exp2(s + inf).
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    qkT = tl.dot(k, qT, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M] = (Q K^T)^T
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    if MASK_POS:
        if not BLOCK_SPARSE:  # (block-sparse: computed by the caller, before the loads)
            r = rows[None, :]
            visible = visible_mask(q_pos, k_pos, k_ok & row_ok[None, :], (r >= c_lo) & (r < c_hi), k_sink, 0,
                                   window_left, window_right, CAUSAL, HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS,
                                   HAS_SINKS, BLOCK_SPARSE)
        pT = tl.where(visible, pT, 0.0)
    if USE_TMA:
        do = DO_b.load([b32, h.to(tl.int32), start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        do_ptrs = DO_b + h * stride_doh + start_m.to(tl.int64) * stride_dos + offs_m[:, None] * stride_dos \
            + offs_d[None, :]
        if MASK_POS:
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        else:
            do = tl.load(do_ptrs)
    if MASK_POS:
        delta = tl.load(Delta_b + stat, mask=row_ok, other=0.0)
    else:
        delta = tl.load(Delta_b + stat)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
    dk += tl.dot(dsT, tl.trans(qT), input_precision=DOT_PREC)
    if DQ_ATOMIC:
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC) * sm_scale  # [BLOCK_M, D]
        if USE_TMA:  # one bulk reduce-add of the tile by the TMA unit (FA3's dQ path); rows >= Sq are clipped
            DQ_b.atomic_add([b32, h.to(tl.int32), start_m, 0], dq.reshape(1, 1, BLOCK_M, HEAD_DIM))
        else:
            dq_ptrs = DQ_b + h * stride_dqh + start_m.to(tl.int64) * stride_dqs + offs_m[:, None] * stride_dqs \
                + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.autotune(configs=_both(_all(DKDV_CONFIGS, INTERPRET_DKDV_CONFIG)),
                 key=["HEAD_DIM", *MASK_KEYS, "ACCUMULATE", "DQ_ATOMIC", "tune_size", "tma_mode"],
                 prune_configs_by={"early_config_prune": prune_by(dkdv_candidates)},
                 restore_value=["DK", "DV", "DQ"], cache_results=True)
@triton.jit(do_not_specialize=[*MASK_SCALARS, "tune_size", "tma_mode"])
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, DQ, Cols, Layout, Count,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                   stride_dqb, stride_dqs, stride_dqh,
                   H, G, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right, bs_size, bs_n,
                   qk_scale, sm_scale, tune_size, tma_mode,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr,
                   ROW_BOUNDS: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
                   STRIDED: tl.constexpr, ACCUMULATE: tl.constexpr, DQ_ATOMIC: tl.constexpr, COUNT: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Grid ``(cdiv(Sk, BLOCK_N), B * H // G)``. dK/dV ``[B, Sk, H // G, D]``; dQ (atomic mode) fp32 ``[B, Sq, H, D]``;
    Cols int32 ``[B, 3, Sk]`` (:func:`.bounds.col_bounds`), Layout int8 ``[nb, nb]``, Count int32
    ``[B * H // G, grid_n]`` (``COUNT``: (query tile, head) steps per program, a test hook).

    ``tma_mode`` only selects autotune candidates (see :func:`.bwd_launch.tma_mode`); USE_TMA defaults to pointer
    loads so a config pinned without it (e.g. a benchmark's precompile) still compiles.
    """
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    hkv = H // G
    b = (pid_bkv // hkv).to(tl.int64)
    kvh = (pid_bkv % hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + offs_n
    col_ok = cols < Sk
    k_rows = start_n.to(tl.int64) * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_rows = start_n.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    k = tl.load(K + b * stride_kb + kvh * stride_kh + k_rows, mask=col_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + b * stride_vb + kvh * stride_vh + v_rows, mask=col_ok[:, None], other=0.0)
    if STRIDED:
        k_pos = (k_offset + cols * k_stride)[:, None]
    else:
        k_pos = (k_offset + cols)[:, None]
    k_ok = col_ok[:, None]
    c_lo = 0
    c_hi = 0
    k_sink = 0
    has_sink = False
    if ROW_BOUNDS or HAS_SINKS:  # [B, 3, Sk]: row interval of each key, sink flag
        C_b = Cols + b * 3 * Sk + cols
        c_lo = tl.load(C_b, mask=col_ok, other=Sq)
        c_hi = tl.load(C_b + Sk, mask=col_ok, other=0)
        sink = tl.load(C_b + 2 * Sk, mask=col_ok, other=0)
        has_sink = tl.max(sink, 0) > 0
        k_sink = sink[:, None] != 0
    lo, full_lo, full_hi, hi = query_block_ranges(
        start_n, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right, col_ok, c_lo, c_hi,
        has_sink, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_WINDOW_R, STRIDED, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE)
    c_lo = c_lo[:, None]
    c_hi = c_hi[:, None]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if USE_TMA:  # device-side descriptors (global scratch from triton's allocator); b, h index them
        n_batch = tl.num_programs(1) // hkv
        Q_b = tl.make_tensor_descriptor(Q, shape=[n_batch, H, Sq, HEAD_DIM], strides=[stride_qb, stride_qh, stride_qs, 1],
                                        block_shape=[1, 1, BLOCK_M, HEAD_DIM])
        DO_b = tl.make_tensor_descriptor(DO, shape=[n_batch, H, Sq, HEAD_DIM],
                                         strides=[stride_dob, stride_doh, stride_dos, 1],
                                         block_shape=[1, 1, BLOCK_M, HEAD_DIM])
    else:
        Q_b = Q + b * stride_qb
        DO_b = DO + b * stride_dob
    DQ_b = DQ + b * stride_dqb
    if USE_TMA and DQ_ATOMIC:  # fp32 dQ [B, Sq, H, D] as [B, H, Sq, D] tiles, added by TMA reduce
        DQ_b = tl.make_tensor_descriptor(DQ, shape=[n_batch, H, Sq, HEAD_DIM],
                                         strides=[stride_dqb, stride_dqh, stride_dqs, 1],
                                         block_shape=[1, 1, BLOCK_M, HEAD_DIM])
    Lse_b = Lse + b * H * Sq
    Delta_b = Delta + b * H * Sq
    b32 = (pid_bkv // hkv).to(tl.int32)
    h0 = kvh * G  # this kv head serves query heads [h0, h0 + G): their dK/dV sum in registers
    n_tiles = pid_n * 0  # COUNT: a scalar counter (folded away otherwise)
    args = (k, v, k_pos, k_ok, c_lo, c_hi, k_sink, Q_b, DO_b, DQ_b, Lse_b, Delta_b, Layout, h0, G, b32,
            stride_qs, stride_qh, stride_dos, stride_doh, stride_dqs, stride_dqh)
    scal = (Sq, q_offset, q_stride, window_left, window_right, bs_size, bs_n, qk_scale, sm_scale)
    if CAUSAL or HAS_WINDOW_R or ROW_BOUNDS or BLOCK_SPARSE or STRIDED:  # rows before the full part
        dk, dv, n_tiles = _dkdv_stage(dk, dv, n_tiles, *args, lo, full_lo, *scal, BLOCK_M, HEAD_DIM, True, CAUSAL,
                                      HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT,
                                      DQ_ATOMIC, DOT_PREC, USE_TMA)
    dk, dv, n_tiles = _dkdv_stage(dk, dv, n_tiles, *args, full_lo, full_hi, *scal, BLOCK_M, HEAD_DIM, False, CAUSAL,
                                  HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT,
                                  DQ_ATOMIC, DOT_PREC, USE_TMA)
    dk, dv, n_tiles = _dkdv_stage(dk, dv, n_tiles, *args, full_hi, hi, *scal, BLOCK_M, HEAD_DIM, True, CAUSAL,
                                  HAS_WINDOW, HAS_WINDOW_R, ROW_BOUNDS, HAS_SINKS, BLOCK_SPARSE, STRIDED, COUNT,
                                  DQ_ATOMIC, DOT_PREC, USE_TMA)
    if COUNT:
        tl.store(Count + pid_bkv * tl.num_programs(0) + pid_n, n_tiles)
    dk = dk * sm_scale
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + start_n.to(tl.int64) * stride_dks \
        + offs_n[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + start_n.to(tl.int64) * stride_dvs \
        + offs_n[:, None] * stride_dvs + offs_d[None, :]
    if ACCUMULATE:  # a ring step adds into its running fp32 dK/dV; this program owns these rows
        dk += tl.load(dk_ptrs, mask=col_ok[:, None], other=0.0)
        dv += tl.load(dv_ptrs, mask=col_ok[:, None], other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
