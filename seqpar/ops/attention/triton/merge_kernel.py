"""The ring's per-step elementwise passes as one Triton kernel each: the (out, lse) merge of a partial
attention result and the row-window add of a partial gradient, each reading every input once and writing
once, in fp32 arithmetic whatever the storage dtypes (bf16 partials into fp32 accumulators, or straight into
the final dtype on a row's last merge).

The torch reference of both is :mod:`seqpar.ops.merge` (``merge_rows`` / ``add_rows`` with ``impl="torch"``),
which also chooses between them; these launchers own the shape/stride checks. Rows are ``(b, s, h)``
triples of ``[B, S, H, D]`` tensors with any strides; lse is ``[B, H, S]`` (any strides). A program takes
``BLOCK_S`` consecutive sequence rows of one (batch, head) and the whole head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqpar.ops.attention.triton.common import interpreter_compat, interpreting


@triton.jit
def _merge_rows_kernel(A, LA, Bp, LB, O, LO, ROW0, ROW_END, SB, START, BH, H, D,
                       sa_b, sa_s, sa_h, sa_d, sla_b, sla_h, sla_s,
                       sb_b, sb_s, sb_h, sb_d, slb_b, slb_h, slb_s,
                       so_b, so_s, so_h, so_d, slo_b, slo_h, slo_s,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # out = exp(la - lse) * a + exp(lb - lse) * b with lse = logaddexp(la, lb), -inf safe (see merge.py);
    # rows outside b's window [START, START + SB) see lb = -inf, so they copy a exactly (weight 1).
    pid = tl.program_id(0)
    bh = pid % BH  # consecutive programs: the heads of one row block (adjacent in memory)
    blk = pid // BH
    bi = (bh // H).to(tl.int64)
    hi = (bh % H).to(tl.int64)
    s = ROW0 + blk * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row_ok = s < ROW_END
    in_b = row_ok & (s >= START) & (s < START + SB)
    s64 = s.to(tl.int64)
    sb64 = (s - START).to(tl.int64)
    la = tl.load(LA + bi * sla_b + hi * sla_h + s64 * sla_s, mask=row_ok, other=float("-inf"))
    lb = tl.load(LB + bi * slb_b + hi * slb_h + sb64 * slb_s, mask=in_b, other=float("-inf"))
    mx = tl.maximum(la, lb)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    lse = mx + tl.log(tl.exp(la - mx) + tl.exp(lb - mx))
    safe = tl.where(lse == float("-inf"), 0.0, lse)
    wa = tl.exp(la - safe)
    wb = tl.exp(lb - safe)
    ok = row_ok[:, None] & (d < D)[None, :]
    ok_b = in_b[:, None] & (d < D)[None, :]
    d64 = d.to(tl.int64)
    a = tl.load(A + bi * sa_b + hi * sa_h + s64[:, None] * sa_s + d64[None, :] * sa_d, mask=ok, other=0.0)
    b = tl.load(Bp + bi * sb_b + hi * sb_h + sb64[:, None] * sb_s + d64[None, :] * sb_d, mask=ok_b, other=0.0)
    out = wa[:, None] * a.to(tl.float32) + wb[:, None] * b.to(tl.float32)
    tl.store(O + bi * so_b + hi * so_h + s64[:, None] * so_s + d64[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=ok)
    tl.store(LO + bi * slo_b + hi * slo_h + s64 * slo_s, lse, mask=row_ok)


@triton.jit
def _add_rows_kernel(A, Bp, O, ROW0, ROW_END, SB, START, BH, H, D,
                     sa_b, sa_s, sa_h, sa_d, sb_b, sb_s, sb_h, sb_d, so_b, so_s, so_h, so_d,
                     HAS_A: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # out = a + b on b's row window, a elsewhere (0 for a missing a), added in fp32.
    pid = tl.program_id(0)
    bh = pid % BH  # consecutive programs: the heads of one row block (adjacent in memory)
    blk = pid // BH
    bi = (bh // H).to(tl.int64)
    hi = (bh % H).to(tl.int64)
    s = ROW0 + blk * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row_ok = s < ROW_END
    in_b = row_ok & (s >= START) & (s < START + SB)
    s64 = s.to(tl.int64)
    sb64 = (s - START).to(tl.int64)
    d64 = d.to(tl.int64)
    ok = row_ok[:, None] & (d < D)[None, :]
    ok_b = in_b[:, None] & (d < D)[None, :]
    x = tl.load(Bp + bi * sb_b + hi * sb_h + sb64[:, None] * sb_s + d64[None, :] * sb_d, mask=ok_b, other=0.0)
    x = x.to(tl.float32)
    if HAS_A:
        x += tl.load(A + bi * sa_b + hi * sa_h + s64[:, None] * sa_s + d64[None, :] * sa_d, mask=ok,
                     other=0.0).to(tl.float32)
    tl.store(O + bi * so_b + hi * so_h + s64[:, None] * so_s + d64[None, :] * so_d, x.to(O.dtype.element_ty),
             mask=ok)


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_D, num_warps): ~4k elements a program (32 rows of D=128), 16 rows in the interpreter."""
    block_d = triton.next_power_of_2(d)
    if interpreting():
        return max(1, min(16, 1024 // block_d)), block_d, 1
    return max(1, min(64, 4096 // block_d)), block_d, 4


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(name: str, t: torch.Tensor, shape: tuple, device) -> None:
    if tuple(t.shape) != shape or t.device != device or t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a {list(shape)} fp16/bf16/fp32 tensor on {device}; got "
                         f"{list(t.shape)} {t.dtype} on {t.device}.")


def _prepare(a: Optional[torch.Tensor], b: torch.Tensor, start: int, out: torch.Tensor):
    bsz, s, h, d = out.shape
    if a is not None:
        _check("a", a, tuple(out.shape), out.device)
    _check("out", out, tuple(out.shape), out.device)
    _check("b", b, (bsz, b.shape[1], h, d), out.device)
    if not 0 <= start <= start + b.shape[1] <= s:
        raise ValueError(f"rows [{start}, {start + b.shape[1]}) of b do not fit the {s} rows of out.")
    if interpreting():
        interpreter_compat()
    # In place (out is a): only b's window changes; otherwise every row of out is written.
    lo, hi = (start, start + b.shape[1]) if out is a else (0, s)
    return bsz, s, h, d, lo, hi


def merge_rows_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                      start: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`seqpar.ops.merge.merge_rows`: ``out`` ``[B, S, H, D]`` (any float dtype, may be
    ``out_a``) gets the merge of ``(out_a, lse_a)`` with ``(out_b [B, Sb, H, D], lse_b [B, H, Sb])`` on
    rows ``[start, start + Sb)`` and ``out_a`` elsewhere; ``lse_a`` ``[B, H, S]`` fp32 is updated in place.
    Returns ``(out, lse_a)``."""
    bsz, s, h, d, lo, hi = _prepare(out_a, out_b, start, out)
    for name, t, n in (("lse_a", lse_a, s), ("lse_b", lse_b, out_b.shape[1])):
        if tuple(t.shape) != (bsz, h, n) or t.dtype != torch.float32 or t.device != out.device:
            raise ValueError(f"{name} must be a [{bsz}, {h}, {n}] float32 tensor on {out.device}; got "
                             f"{list(t.shape)} {t.dtype} on {t.device}.")
    if hi > lo and bsz * h:
        block_s, block_d, warps = _blocks(d)
        grid = (triton.cdiv(hi - lo, block_s) * bsz * h,)
        _merge_rows_kernel[grid](out_a, lse_a, out_b, lse_b, out, lse_a, lo, hi, out_b.shape[1], start, bsz * h, h, d,
                                 *_bshd(out_a), *_bhs(lse_a), *_bshd(out_b), *_bhs(lse_b), *_bshd(out), *_bhs(lse_a),
                                 BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps)
    return out, lse_a


def add_rows_triton(a: Optional[torch.Tensor], b: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
    """Fused :func:`seqpar.ops.merge.add_rows`: ``out = a + b`` on rows ``[start, start + Sb)``, ``a``
    elsewhere (zeros for ``a=None``), in fp32 arithmetic; ``out`` may be ``a``. Returns ``out``."""
    bsz, s, h, d, lo, hi = _prepare(a, b, start, out)
    if hi > lo and bsz * h:
        block_s, block_d, warps = _blocks(d)
        grid = (triton.cdiv(hi - lo, block_s) * bsz * h,)
        _add_rows_kernel[grid](b if a is None else a, b, out, lo, hi, b.shape[1], start, bsz * h, h, d,
                               *_bshd(b if a is None else a), *_bshd(b), *_bshd(out), HAS_A=a is not None,
                               BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps)
    return out


def _bshd(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)  # [B, S, H, D] -> (b, s, h, d) order


def _bhs(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)  # [B, H, S]
