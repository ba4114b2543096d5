"""Triton backward kernels of blockwise attention, from the saved (global) log-sum-exp.

Three launches, FlashAttention-2's split:

1. ``_attn_bwd_preprocess``: ``delta = rowsum(dout * out)`` ``[B, H, Sq]`` (skipped when the caller,
   e.g. a ring, passes the global delta).
2. ``_attn_bwd_dkdv``: one program per (key block, batch, kv head); it keeps K, V and fp32 dK, dV in
   registers and walks the query blocks that can see its keys, for each of the G query heads of its
   GQA group (so dK/dV of a shared head are summed without atomics). Optionally (``DQ_ATOMIC``) it also
   adds dQ with fp32 atomics, which saves the recomputation of the separate dQ kernel.
3. ``_attn_bwd_dq``: one program per (query block, batch, head) walking key blocks, like the forward.

Q/dO tile loads of the dK/dV kernel come in two compile-time variants (``USE_TMA``): per-thread
pointers (masked on ragged rows), or TMA through device-side tensor descriptors over ``[B, H, Sq, D]``
(block ``[1, 1, BLOCK_M, D]``; rows >= Sq are zero-filled by the hardware). Selection, per launch:

* ``SEQPAR_TRITON_TMA`` unset: on sm90+ GPUs both variants are autotune candidates (pointers for every
  listed tile, TMA for the tiles in ``DKDV_TMA_CONFIGS``) and the faster is kept; problems below the
  tuning size take the pointer default. Pointers only elsewhere (pre-Hopper, the CPU interpreter).
* ``SEQPAR_TRITON_TMA=0``: pointers only. ``SEQPAR_TRITON_TMA=1``: TMA only, where legal (sm90+ or the
  interpreter; q and dout with 16-byte aligned base and strides and a unit last stride), else pointers.

The variable is read at every launch (the mode is part of the autotune key), so one process can time
both. TMA descriptors need triton's global-scratch allocator; the launcher installs a torch-backed one
in the launching thread if none is set (``ensure_allocator``). Nothing touches a device at import.

Probabilities are recomputed as ``exp2(s * scale * log2e - lse * log2e)``: with the final lse of each
row they are exact, so per-ring-step gradients sum to the gradient of the merged attention. Gradients
can be added in-kernel into fp32 buffers (``ACCUMULATE``) so a ring needs no extra passes.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from seqpar.ops.attention_triton_fwd import (FP32_CONFIG, INTERPRET, _cfg, _all, check_triton_inputs, doc_ids_arg,
                                             dot_precision, interpreter_compat, key_block_ranges, last_dim_contiguous,
                                             prune_by_head_dim, tune_size, visible_mask)

_LOG2E = tl.constexpr(1.4426950408889634)

# (BLOCK_M, BLOCK_N, warps, stages): dK/dV programs own BLOCK_N keys and step BLOCK_M queries; dQ
# programs own BLOCK_M queries and step BLOCK_N keys. Seeds: Flex/FA2 sm90 defaults; pruned by H200
# autotune timings; the first is the GPU-tested default for small problems (NOTES-attention.md).
# 16/32/256 are unmeasured.
DKDV_CONFIGS = {
    16: [_cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3)],
    32: [_cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3)],
    64: [_cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2)],
    128: [_cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(64, 128, 8, 2)],
    256: [_cfg(64, 64, 8, 2), _cfg(32, 64, 4, 2)],
}
DQ_CONFIGS = {
    16: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    32: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    64: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2)],
    256: [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)],
}
INTERPRET_DKDV_CONFIG = _cfg(16, 32, 4, 1)  # BLOCK_M != BLOCK_N on purpose: exercises unaligned diagonals
INTERPRET_DQ_CONFIG = _cfg(32, 16, 4, 1)

# dK/dV configs that also get a TMA-load candidate (USE_TMA=True) when both are autotuned (sm90+): the
# ones ptxas shows gaining registers (NOTES-attention.md, v2); the list stays short for compile time.
DKDV_TMA_CONFIGS = {
    64: [_cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2)],
    128: [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 3)],
}
TMA_ENV = "SEQPAR_TRITON_TMA"  # "0": pointer loads only; "1": TMA loads wherever legal; unset: autotune both on sm90+


def _with_tma(cfg, on: bool):
    return triton.Config({**cfg.kwargs, "USE_TMA": on}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _both(configs):
    return [_with_tma(c, on) for c in configs for on in (False, True)]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def tma_mode(*tensors: torch.Tensor) -> int:
    """How the dK/dV kernel loads its Q/dO tiles: 0 pointers, 1 autotune pointers and TMA, 2 TMA only.

    TMA needs 16-byte aligned bases and strides, a unit last stride and sm90+ (or the interpreter,
    which emulates descriptors). Auto (``SEQPAR_TRITON_TMA`` unset) tunes both on sm90+ GPUs and uses
    pointers elsewhere, the interpreter included; "1" forces TMA where legal, "0" forces pointers.
    Read at every launch (cheap), so one process can compare both; never probes a device at import.
    """
    env = os.environ.get(TMA_ENV, "").strip()
    if env == "0":
        return 0
    t0 = tensors[0]
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]) \
                or max(t.shape) >= 2 ** 31:
            return 0
    if INTERPRET and t0.device.type == "cpu":
        return 2 if env == "1" else 0
    if not t0.is_cuda or _capability(t0.device.index if t0.device.index is not None else torch.cuda.current_device())[0] < 9:
        return 0
    return 2 if env == "1" else 1


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-side tensor descriptors need global scratch from triton's allocator (a per-thread context
    variable: autograd's backward thread has its own). Install a torch one unless one is set."""
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # private API moved: set ours (harmless, torch-backed)
        pass
    triton.set_allocator(_torch_scratch)


def prune_dkdv(configs, named_args, **kwargs):
    """early_config_prune of the dK/dV kernel: prune_by_head_dim's tiles, in the load variants of tma_mode."""
    args = {**named_args, **kwargs}
    mode, d, tuned = args["tma_mode"], args["HEAD_DIM"], args["tune_size"]
    if args["Q"].dtype == torch.float32:
        listed = [FP32_CONFIG]  # fp32 is for tests: one tile, TMA only when forced
        tma_listed = listed if mode == 2 else []
    else:
        listed = DKDV_CONFIGS[d] if tuned else DKDV_CONFIGS[d][:1]
        tma_listed = listed if mode == 2 else [c for c in DKDV_TMA_CONFIGS.get(d, []) if tuned]
    wanted = [] if mode == 2 else [str(_with_tma(c, False)) for c in listed]
    wanted += [str(_with_tma(c, True)) for c in tma_listed] if mode else []
    return [c for c in configs if str(c) in wanted]


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
def query_block_ranges(start_n, Sq, Sk, q_offset, k_offset, window_left,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query-block bounds ``lo <= full_lo <= full_hi <= hi`` for keys ``[start_n, start_n + BLOCK_N)``.

    ``[full_lo, full_hi)`` holds in-bounds rows that see every key of the block; it is empty when the
    key block itself is ragged (its out-of-bounds keys need the mask).
    """
    end_n = tl.minimum(start_n + BLOCK_N, Sk)
    kp_first = k_offset + start_n
    kp_last = k_offset + end_n - 1
    lo = 0
    full_lo = 0
    hi = Sq
    full_hi = (Sq // BLOCK_M) * BLOCK_M
    if CAUSAL:  # row i sees key j iff q_offset + i >= k_offset + j
        lo = tl.maximum(lo, kp_first - q_offset)
        full_lo = tl.maximum(full_lo, kp_last - q_offset)
    if HAS_WINDOW:  # and q_offset + i - (k_offset + j) <= window_left
        hi = tl.minimum(hi, kp_last + window_left - q_offset + 1)
        full_hi = tl.minimum(full_hi, kp_first + window_left - q_offset + 1)
    hi = tl.maximum(hi, 0)
    lo = (tl.minimum(lo, hi) // BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo)
    full_hi = tl.minimum((tl.maximum(full_hi, 0) // BLOCK_M) * BLOCK_M, hi)
    empty = (full_hi <= full_lo) | (start_n + BLOCK_N > Sk)
    full_lo = tl.where(empty, lo, full_lo)
    full_hi = tl.where(empty, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _dkdv_stage(dk, dv, k, v, k_pos, k_doc, k_ok, Q_b, DO_b, DQ_b, Lse_b, Delta_b, QDoc_b, h0, G, b32,
                stride_qs, stride_qh, stride_dos, stride_doh, stride_dqs, stride_dqh,
                lo, hi, Sq, q_offset, window_left, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, DQ_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
                USE_TMA: tl.constexpr):
    # USE_TMA: Q_b / DO_b are tensor descriptors over [B, H, Sq, D] (block [1, 1, BLOCK_M, D]); TMA
    # zero-fills rows >= Sq, so the loads need neither per-thread addresses nor masks.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    # One flat loop over (GQA head g, query block): a nested `for g` loop around the block loop made
    # ptxas spill the dK/dV accumulators (NOTES-attention.md); the index split is two scalar ops.
    for it in tl.range(0, G * n_blocks):
        g = it // n_blocks
        start_m = tl.multiple_of(lo + (it - g * n_blocks) * BLOCK_M, BLOCK_M)
        h = h0 + g
        rows = start_m + offs_m
        row_ok = rows < Sq
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
        if MASK_POS or HAS_DOCS:
            q_doc = 0
            if HAS_DOCS:
                q_doc = tl.load(QDoc_b + rows, mask=row_ok, other=-2)[None, :]
            visible = visible_mask((q_offset + rows)[None, :], k_pos, k_ok & row_ok[None, :], q_doc, k_doc,
                                   window_left, MASK_POS, CAUSAL, HAS_WINDOW, HAS_DOCS)
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
            dq_ptrs = DQ_b + h * stride_dqh + start_m.to(tl.int64) * stride_dqs + offs_m[:, None] * stride_dqs \
                + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


# The interpreter has one config (the autotuner would time two), so there the launcher passes USE_TMA.
@triton.autotune(configs=INTERPRET and [INTERPRET_DKDV_CONFIG] or _both(_all(DKDV_CONFIGS)),
                 key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS", "ACCUMULATE", "DQ_ATOMIC", "tune_size",
                      "tma_mode"],
                 prune_configs_by={"early_config_prune": prune_dkdv},
                 restore_value=["DK", "DV", "DQ"], cache_results=True)
@triton.jit(do_not_specialize=["q_offset", "k_offset", "window_left", "tune_size", "tma_mode"])
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, DQ, QDoc, KDoc,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                   stride_dqb, stride_dqs, stride_dqh, stride_qdb, stride_kdb,
                   H, G, Sq, Sk, q_offset, k_offset, window_left, qk_scale, sm_scale, tune_size, tma_mode,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                   ACCUMULATE: tl.constexpr, DQ_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Grid ``(cdiv(Sk, BLOCK_N), B * H // G)``. dK/dV ``[B, Sk, H // G, D]``; dQ (atomic mode) fp32 ``[B, Sq, H, D]``.

    ``tma_mode`` only selects autotune candidates (see :func:`tma_mode`); USE_TMA defaults to pointer
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
    k_pos = (k_offset + cols)[:, None]
    k_ok = col_ok[:, None]
    k_doc = 0
    if HAS_DOCS:
        k_doc = tl.load(KDoc + b * stride_kdb + cols, mask=col_ok, other=-1)[:, None]
    QDoc_b = QDoc + b * stride_qdb
    lo, full_lo, full_hi, hi = query_block_ranges(start_n, Sq, Sk, q_offset, k_offset, window_left,
                                                  BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
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
    Lse_b = Lse + b * H * Sq
    Delta_b = Delta + b * H * Sq
    b32 = (pid_bkv // hkv).to(tl.int32)
    h0 = kvh * G  # this kv head serves query heads [h0, h0 + G): their dK/dV sum in registers
    strides = (stride_qs, stride_qh, stride_dos, stride_doh, stride_dqs, stride_dqh)
    if CAUSAL:  # the diagonal rows
        dk, dv = _dkdv_stage(dk, dv, k, v, k_pos, k_doc, k_ok, Q_b, DO_b, DQ_b, Lse_b, Delta_b, QDoc_b, h0, G, b32,
                             *strides, lo, full_lo, Sq, q_offset, window_left, qk_scale, sm_scale,
                             BLOCK_M, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, DQ_ATOMIC, DOT_PREC, USE_TMA)
    dk, dv = _dkdv_stage(dk, dv, k, v, k_pos, k_doc, k_ok, Q_b, DO_b, DQ_b, Lse_b, Delta_b, QDoc_b, h0, G, b32,
                         *strides, full_lo, full_hi, Sq, q_offset, window_left, qk_scale, sm_scale,
                         BLOCK_M, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_DOCS, DQ_ATOMIC, DOT_PREC, USE_TMA)
    dk, dv = _dkdv_stage(dk, dv, k, v, k_pos, k_doc, k_ok, Q_b, DO_b, DQ_b, Lse_b, Delta_b, QDoc_b, h0, G, b32,
                         *strides, full_hi, hi, Sq, q_offset, window_left, qk_scale, sm_scale,
                         BLOCK_M, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, DQ_ATOMIC, DOT_PREC, USE_TMA)
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


@triton.jit
def _dq_stage(dq, q, do, lse2, delta, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
              lo, hi, Sk, k_offset, window_left, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_POS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
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
        if MASK_POS or HAS_DOCS:
            k_doc = 0
            if HAS_DOCS:
                k_doc = tl.load(KDoc_b + cols, mask=cols < Sk, other=-1)[None, :]
            visible = visible_mask(q_pos[:, None], (k_offset + cols)[None, :], cols[None, :] < Sk, q_doc, k_doc,
                                   window_left, MASK_POS, CAUSAL, HAS_WINDOW, HAS_DOCS)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq = tl.dot(ds, tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=INTERPRET and [INTERPRET_DQ_CONFIG] or _all(DQ_CONFIGS),
                 key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS", "ACCUMULATE", "tune_size"],
                 prune_configs_by={"early_config_prune": prune_by_head_dim(DQ_CONFIGS)},
                 restore_value=["DQ"], cache_results=True)
@triton.jit(do_not_specialize=["q_offset", "k_offset", "window_left", "tune_size"])
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, QDoc, KDoc,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                 stride_dqb, stride_dqs, stride_dqh, stride_qdb, stride_kdb,
                 H, G, Sq, Sk, q_offset, k_offset, window_left, qk_scale, sm_scale, tune_size,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                 ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), B * H)``. dQ ``[B, Sq, H, D]``."""
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
    q_pos = q_offset + rows
    q_doc = 0
    if HAS_DOCS:
        q_doc = tl.load(QDoc + b * stride_qdb + rows, mask=row_ok, other=-2)[:, None]
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    KDoc_b = KDoc + b * stride_kdb
    lo, full_lo, full_hi, hi = key_block_ranges(start_m, Sq, Sk, q_offset, k_offset, window_left,
                                                BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_WINDOW:
        dq = _dq_stage(dq, q, do, lse2, delta, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
                       lo, full_lo, Sk, k_offset, window_left, qk_scale,
                       BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, DOT_PREC)
    dq = _dq_stage(dq, q, do, lse2, delta, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
                   full_lo, full_hi, Sk, k_offset, window_left, qk_scale,
                   BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_DOCS, DOT_PREC)
    dq = _dq_stage(dq, q, do, lse2, delta, q_pos, q_doc, K_head, V_head, KDoc_b, stride_ks, stride_vs,
                   full_hi, hi, Sk, k_offset, window_left, qk_scale,
                   BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_DOCS, DOT_PREC)
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + row_base * stride_dqs + offs_m[:, None] * stride_dqs \
        + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _grad_buffer(acc: Optional[torch.Tensor], like: torch.Tensor, dtype: torch.dtype, name: str):
    """(buffer, accumulate?) for one gradient: the caller's fp32 running sum, or a fresh tensor."""
    if acc is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device), False
    if acc.shape != like.shape or acc.dtype != torch.float32 or acc.stride(-1) != 1:
        raise ValueError(f"{name} must be float32 {list(like.shape)} with unit last stride; got {acc.dtype} "
                         f"{list(acc.shape)}.")
    return acc, True


def attention_bwd_launch(dout, q, k, v, out, lse, *, causal: bool, softmax_scale: Optional[float], q_offset: int,
                         k_offset: int, window_left: Optional[int], q_doc_ids=None, k_doc_ids=None, delta=None,
                         dq_acc=None, dk_acc=None, dv_acc=None, grad_dtype: torch.dtype = torch.float32,
                         dq_mode: str = "kernel"):
    """Run the backward kernels. Shapes as in :func:`seqpar.ops.attention_triton.backward`.

    ``grad_dtype`` is the dtype of freshly allocated gradients (fp32 for the public API; the autograd
    path asks for the input dtype to skip a cast pass). ``dq_mode``: ``"kernel"`` (separate dQ kernel)
    or ``"atomic"`` (dQ added by the dK/dV kernel with fp32 atomics).
    """
    check_triton_inputs(q, k, v, q_doc_ids, k_doc_ids, window_left)
    if INTERPRET:
        interpreter_compat()
    if dq_mode not in ("kernel", "atomic"):
        raise ValueError(f"dq_mode must be 'kernel' or 'atomic'; got {dq_mode!r}.")
    if (dk_acc is None) != (dv_acc is None):
        raise ValueError("dk_acc and dv_acc must be given together.")
    q, k, v, dout, out = (last_dim_contiguous(t) for t in (q, k, v, dout, out))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have q's shape {list(q.shape)}; got {list(dout.shape)}, {list(out.shape)}.")
    if tuple(lse.shape) != (b, h, sq):
        raise ValueError(f"lse must be [batch, heads, seq_q]={[b, h, sq]}; got {list(lse.shape)}.")
    lse = lse.to(torch.float32).contiguous()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dot_prec = dot_precision(q.dtype)
    heads = dict(H=h, G=h // hkv, Sq=sq, Sk=sk, q_offset=int(q_offset), k_offset=int(k_offset),
                 window_left=int(window_left or 0), qk_scale=scale * 1.4426950408889634, sm_scale=scale,
                 tune_size=tune_size(b, h, sq, sk, d))
    flags = dict(HEAD_DIM=d, CAUSAL=bool(causal), HAS_WINDOW=window_left is not None,
                 HAS_DOCS=q_doc_ids is not None, DOT_PREC=dot_prec)
    if delta is None:
        delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        if sq > 0 and b * h > 0:
            _attn_bwd_preprocess[(triton.cdiv(sq, 64), b * h)](
                out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2), h, sq, HEAD_DIM=d, BLOCK_M=64)
    else:
        delta = delta.to(torch.float32).contiguous()
    dk, acc_kv = _grad_buffer(dk_acc, k, grad_dtype, "dk_acc")
    dv, _ = _grad_buffer(dv_acc, v, grad_dtype, "dv_acc")
    if dq_mode == "atomic":  # atomics need an fp32 buffer that starts at zero (or the caller's sum)
        dq = dq_acc if dq_acc is not None else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _grad_buffer(dq, q, torch.float32, "dq_acc")
        acc_q = True
    else:
        dq, acc_q = _grad_buffer(dq_acc, q, grad_dtype, "dq_acc")
    if sq == 0 or sk == 0 or b * h == 0:  # nothing visible: zero gradients (accumulators untouched)
        for t, acc in ((dq, acc_q), (dk, acc_kv), (dv, acc_kv)):
            if not acc:
                t.zero_()
        return dq, dk, dv
    qd, kd = doc_ids_arg(q_doc_ids, q), doc_ids_arg(k_doc_ids, q)
    doc_strides = (qd.stride(0) if q_doc_ids is not None else 0, kd.stride(0) if k_doc_ids is not None else 0)
    mode = tma_mode(q, dout)
    if mode and not INTERPRET:
        ensure_allocator()
    tma_flag = dict(USE_TMA=mode == 2) if INTERPRET else {}
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, dq, qd, kd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), *doc_strides,
        **heads, **flags, **tma_flag, tma_mode=mode, ACCUMULATE=acc_kv, DQ_ATOMIC=dq_mode == "atomic")
    if dq_mode == "kernel":
        _attn_bwd_dq[lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)](
            q, k, v, dout, lse, delta, dq, qd, kd,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), *doc_strides,
            **heads, **flags, ACCUMULATE=acc_q)
    elif dq_acc is None and grad_dtype != torch.float32:
        dq = dq.to(grad_dtype)
    return dq, dk, dv
