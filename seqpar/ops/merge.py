"""Numerically stable merge of partial attention results through their log-sum-exp.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine into
the attention over the union of keys:

    lse = log(exp(lse_a) + exp(lse_b)) = max + log(exp(lse_a - max) + exp(lse_b - max))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A side that saw no key has ``lse = -inf`` and weight 0; if both did, the row stays (0, -inf).
"""
from __future__ import annotations

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
