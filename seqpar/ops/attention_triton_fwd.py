"""Triton forward kernel of blockwise attention with log-sum-exp (the FlashAttention-2 recipe).

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the key blocks that can be
visible to them with the online softmax, in base 2 (``exp2`` of scores pre-multiplied by
``softmax_scale * log2(e)``); the returned lse is converted back to natural log.

Masks use global positions (``q_offset + i``, ``k_offset + j``), like :mod:`seqpar.ops.attention_torch`.
The key loop is split into three stages so that only blocks that straddle a mask edge pay for it:

    [lo, full_lo)        masked   (left window edge)
    [full_lo, full_hi)   unmasked (every row sees every key: no compares, no selects)
    [full_hi, hi)        masked   (causal diagonal, and the ragged key tail)

and key blocks outside ``[lo, hi)`` are never loaded. Document ids are a data-dependent mask, so when
given they are applied in every stage.

Ring-ready: with ``MERGE`` the kernel reads a running ``(out fp32, lse)`` pair for its rows and writes
the merged pair back in place, so a ring step costs no extra elementwise pass.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from seqpar.ops.attention_torch import _check_inputs

# Read once; deciding the config list needs no device (and the interpreter needs one small config).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HEAD_DIMS = (16, 32, 64, 128, 256)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Finite start for the running max: a row whose first blocks are fully masked then gets
# exp2(-inf - m) = 0 and alpha = exp2(0) = 1 instead of exp2(-inf + inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


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
FP32_CONFIG = _cfg(32, 32, 4, 2)  # fp32 tiles are twice the bytes: keep them small
INTERPRET_FWD_CONFIG = _cfg(32, 16, 4, 1)


def _all(table):
    seen = []
    for cfgs in table.values():
        seen += [c for c in cfgs if all(str(c) != str(s) for s in seen)]
    return seen + [FP32_CONFIG]


# Problems under this many FLOPs (4 B H Sq Sk D) run the first listed config untuned: timing them says
# little, and tests would otherwise compile every candidate of every mask variant. The size class is
# part of the autotune key, so a small call never pins the config of a large one.
TUNE_MIN_FLOPS = 1e11


def tune_size(b, h, sq, sk, d) -> int:
    return int(4.0 * b * h * sq * sk * d >= TUNE_MIN_FLOPS)


def prune_by_head_dim(table):
    """early_config_prune hook: the configs listed for this head_dim (only the first for small problems)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if args["Q"].dtype == torch.float32:
            return [FP32_CONFIG]
        listed = table[args["HEAD_DIM"]] if args["tune_size"] else table[args["HEAD_DIM"]][:1]
        wanted = {str(c) for c in listed}
        return [c for c in configs if str(c) in wanted]

    return prune


@triton.jit
def key_block_ranges(start_m, Sq, Sk, q_offset, k_offset, window_left,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key-block bounds ``lo <= full_lo <= full_hi <= hi`` for query rows ``[start_m, start_m + BLOCK_M)``.

    ``lo``, ``full_lo``, ``full_hi`` are multiples of BLOCK_N; ``[full_lo, full_hi)`` holds only
    in-bounds keys that every (in-bounds) row of the block sees.
    """
    end_m = tl.minimum(start_m + BLOCK_M, Sq)
    qp_first = q_offset + start_m
    qp_last = q_offset + end_m - 1
    hi = Sk
    full_hi = (Sk // BLOCK_N) * BLOCK_N  # the ragged tail stays masked
    lo = 0
    full_lo = 0
    if CAUSAL:  # key j visible to row i iff k_offset + j <= q_offset + i
        hi = tl.minimum(hi, qp_last - k_offset + 1)
        full_hi = tl.minimum(full_hi, qp_first - k_offset + 1)
    if HAS_WINDOW:  # and q_pos - k_pos <= window_left
        lo = tl.maximum(lo, qp_first - window_left - k_offset)
        full_lo = tl.maximum(full_lo, qp_last - window_left - k_offset)
    hi = tl.maximum(hi, 0)
    lo = (tl.minimum(lo, hi) // BLOCK_N) * BLOCK_N  # non-negative before dividing: no rounding sign issues
    full_lo = tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo)
    full_hi = tl.minimum((tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N, hi)
    empty = full_hi <= full_lo
    full_lo = tl.where(empty, lo, full_lo)
    full_hi = tl.where(empty, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def visible_mask(q_pos, k_pos, in_bounds, q_doc, k_doc, window_left, MASK_POS: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Boolean visibility of broadcastable query/key positions (same rules as attention_torch)."""
    if MASK_POS:
        visible = in_bounds
        if CAUSAL:
            visible = visible & (q_pos >= k_pos)
        if HAS_WINDOW:
            visible = visible & (q_pos - k_pos <= window_left)
        if HAS_DOCS:
            visible = visible & (q_doc == k_doc)
    else:
        visible = q_doc == k_doc
    return visible


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


@triton.autotune(configs=INTERPRET and [INTERPRET_FWD_CONFIG] or _all(FWD_CONFIGS),
                 key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS", "MERGE", "tune_size"],
                 prune_configs_by={"early_config_prune": prune_by_head_dim(FWD_CONFIGS)},
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

def interpreter_compat() -> None:
    """Make triton 3.6's CPU interpreter run loops with run-time bounds under NumPy >= 2.4.

    The interpreter holds every scalar as a 1-element array and turns it into a loop bound with
    ``int(array)``, which NumPy 2.4 refuses (an expired deprecation), so any ``tl.range(lo, hi)`` with
    computed bounds raises. Re-point that conversion at the element. Called by the launchers under
    TRITON_INTERPRET=1 only (never at import); idempotent; a no-op where the interpreter is absent.
    """
    from triton.runtime import interpreter
    if getattr(interpreter, "_seqpar_index_compat", False) or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._seqpar_index_compat = True


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels index the head dim with unit stride (wide loads); other strides are passed through.
    return t if t.stride(-1) == 1 else t.contiguous()


def check_triton_inputs(q, k, v, q_doc_ids, k_doc_ids, window_left) -> None:
    """Raise a one-sentence ValueError for anything the kernels cannot take."""
    _check_inputs(q, k, v, q_doc_ids, k_doc_ids)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton attention needs q, k, v of one dtype among float16/bfloat16/float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"triton attention supports head_dim in {HEAD_DIMS}; got {q.shape[-1]} "
                         "(use backend='torch' for others).")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")
    if window_left is not None and window_left < 0:
        raise ValueError(f"window_left must be >= 0 (or None); got {window_left}.")
    if q_doc_ids is not None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        if tuple(q_doc_ids.shape) != (b, sq) or tuple(k_doc_ids.shape) != (b, sk):
            raise ValueError(f"q_doc_ids must be [batch, seq_q]={[b, sq]} and k_doc_ids [batch, seq_k]={[b, sk]}; "
                             f"got {list(q_doc_ids.shape)} and {list(k_doc_ids.shape)}.")


def doc_ids_arg(ids: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # int32 with unit seq stride; a 1-element dummy keeps the kernel signature fixed when absent.
    if ids is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    return ids.to(device=like.device, dtype=torch.int32).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for tests: exact fp32 dots, not TF32. Ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd_launch(q, k, v, *, causal: bool, softmax_scale: Optional[float], q_offset: int, k_offset: int,
                         window_left: Optional[int], q_doc_ids=None, k_doc_ids=None, out_acc=None, lse_acc=None):
    """Run the forward kernel. Shapes as in :func:`seqpar.ops.attention_triton.forward`.

    Without ``out_acc``: returns fresh ``(out [B, Sq, H, D] in q.dtype, lse [B, H, Sq] fp32)``.
    With ``out_acc`` (fp32 ``[B, Sq, H, D]``) and ``lse_acc`` (fp32 contiguous ``[B, H, Sq]``): merges this
    call's result into them in place and returns them.
    """
    check_triton_inputs(q, k, v, q_doc_ids, k_doc_ids, window_left)
    if INTERPRET:
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
    qd, kd = doc_ids_arg(q_doc_ids, q), doc_ids_arg(k_doc_ids, q)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    _attn_fwd[grid](
        q, k, v, out, lse, acc_o, acc_l, qd, kd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        acc_o.stride(0) if merge else 0, acc_o.stride(1) if merge else 0, acc_o.stride(2) if merge else 0,
        qd.stride(0) if q_doc_ids is not None else 0, kd.stride(0) if k_doc_ids is not None else 0,
        h, h // hkv, sq, sk, int(q_offset), int(k_offset), int(window_left or 0), scale * 1.4426950408889634,
        tune_size(b, h, sq, sk, d),
        HEAD_DIM=d, CAUSAL=bool(causal), HAS_WINDOW=window_left is not None, HAS_DOCS=q_doc_ids is not None,
        MERGE=merge, DOT_PREC=dot_precision(q.dtype))
    return out, lse
