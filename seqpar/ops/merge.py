"""Numerically stable merge of partial attention results through their log-sum-exp.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine into
the attention over the union of keys:

    lse = log(exp(lse_a) + exp(lse_b)) = max + log(exp(lse_a - max) + exp(lse_b - max))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A side that saw no key has ``lse = -inf`` and weight 0; if both did, the row stays (0, -inf).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def merge_lse(lse_a: Tensor, lse_b: Tensor) -> Tensor:
    """``log(exp(a) + exp(b))`` elementwise, -inf only where both are -inf, never NaN."""
    mx = torch.maximum(lse_a, lse_b)
    mx_safe = torch.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + torch.log(torch.exp(lse_a - mx_safe) + torch.exp(lse_b - mx_safe))


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial results. ``out_*``: ``[B, S, H, D]``; ``lse_*``: ``[B, H, S]`` (fp32).

    Returns ``(out, lse)`` with ``out`` in ``out_a``'s dtype promoted to at least float32 (so a ring
    can keep its running output in fp32) and lse in the promoted lse dtype.
    """
    lse = merge_lse(lse_a, lse_b)
    lse_safe = torch.where(lse == float("-inf"), 0.0, lse)  # both sides empty: weights exp(-inf)=0
    w_a = torch.exp(lse_a - lse_safe).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    w_b = torch.exp(lse_b - lse_safe).transpose(1, 2).unsqueeze(-1)
    acc = torch.promote_types(torch.promote_types(out_a.dtype, out_b.dtype), torch.float32)
    out = w_a.to(acc) * out_a.to(acc) + w_b.to(acc) * out_b.to(acc)
    return out, lse


# ------------------------------------------------------------------ the ring's row-window passes
# A ring step's partial result covers a window of the query rows ([start, start + Sb)); the running
# accumulator covers all of them. These are the reference (impl="torch", any dtype incl. float64) of the
# fused one-pass kernels in seqpar.ops.attention.triton.merge_kernel (impl="triton").
MERGE_IMPLS = ("auto", "torch", "triton")


def merge_impl(impl: str, t: Tensor) -> str:
    """The implementation the passes over accumulator ``t`` use: ``"auto"`` is the fused Triton kernel for
    CUDA fp32/fp16/bf16 tensors when triton is installed, else the torch reference; ``"triton"`` also runs on
    CPU under ``TRITON_INTERPRET=1`` (read now, at call time). Raises ValueError for an unknown name or a
    ``"triton"`` request that cannot run."""
    if impl not in MERGE_IMPLS:
        raise ValueError(f"merge={impl!r} is not one of {list(MERGE_IMPLS)}.")
    if impl == "torch" or t.dtype == torch.float64 or (impl == "auto" and not t.is_cuda):
        return "torch"
    try:
        from seqpar.ops.attention.triton.common import interpreting
    except ImportError:
        if impl == "auto":
            return "torch"
        raise ValueError("merge='triton' needs triton installed; use merge='torch' or 'auto'.") from None
    if not t.is_cuda and not interpreting():
        raise ValueError("merge='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); use "
                         "merge='torch' or 'auto'.")
    return "triton"


def merge_rows(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, start: int, out: Tensor,
               impl: str = "torch") -> tuple[Tensor, Tensor]:
    """Merge ``(out_b [B, Sb, H, D], lse_b [B, H, Sb])`` into rows ``[start, start + Sb)`` of the running
    ``(out_a [B, S, H, D], lse_a [B, H, S])``, writing ``out`` (``[B, S, H, D]``, any float dtype; may be
    ``out_a``: then only the window is touched) and ``lse_a`` in place. Rows outside the window copy
    ``out_a``. Arithmetic in fp32 (fp64 for fp64), so writing a bf16 ``out`` rounds once, like a merge into
    fp32 followed by a cast. Returns ``(out, lse_a)``."""
    if impl == "triton":
        from seqpar.ops.attention.triton.merge_kernel import merge_rows_triton
        return merge_rows_triton(out_a, lse_a, out_b, lse_b, start, out)
    rows = slice(start, start + out_b.shape[1])
    o, lse = merge_attention(out_a[:, rows], lse_a[:, :, rows], out_b, lse_b)  # before out is written
    if out is not out_a:
        out.copy_(out_a)
    out[:, rows] = o
    lse_a[:, :, rows] = lse
    return out, lse_a


def add_rows(a: Optional[Tensor], b: Tensor, start: int, out: Tensor, impl: str = "torch") -> Tensor:
    """``out = a + b`` on rows ``[start, start + Sb)`` of ``[B, S, H, D]`` (``b``: ``[B, Sb, H, D]``), ``a``
    elsewhere (zeros where ``a`` is None), added in fp32 (fp64 for fp64) and written in ``out``'s dtype;
    ``out`` may be ``a``. Returns ``out``."""
    if impl == "triton":
        from seqpar.ops.attention.triton.merge_kernel import add_rows_triton
        return add_rows_triton(a, b, start, out)
    rows = slice(start, start + b.shape[1])
    acc = torch.promote_types(torch.promote_types(out.dtype, b.dtype), torch.float32)
    if a is None:
        out.zero_()
        out[:, rows] = b
        return out
    window = a[:, rows].to(acc) + b.to(acc)  # before out (maybe narrower than a) is written
    if out is not a:
        out.copy_(a)
    out[:, rows] = window
    return out
