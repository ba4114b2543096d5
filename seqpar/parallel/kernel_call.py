"""One local kernel call as an autograd.Function differentiable in BOTH out and lse (the ring's contract),
for the context-parallel modes that run the kernel on gathered data (Ulysses, all-gather).

The backends' own ``attention`` is differentiable in out only; an lse gradient (``*_with_lse`` callers,
e.g. merging partial results) is folded into ``delta = rowsum(dout * out) - dlse`` of the record's backward,
as :class:`~seqpar.parallel.ring_attention.RingAttentionFn` does. No math here: the kernels are the
registry's.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import LocalMask, select
from seqpar.ops.attention.registry import backward_delta


class _KernelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lm, record, scale):
        out, lse = record.forward(q, k, v, lm, softmax_scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (lm, record, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        lm, record, scale = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = backward_delta([record], dout, out, dlse)
        extra = {} if delta is None else {"delta": delta}
        dq, dk, dv = record.backward(dout, q, k, v, out, lse, lm, softmax_scale=scale, **extra)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, lm: LocalMask, *, softmax_scale: Optional[float] = None,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``q [B, Sq, H, D]`` against ``k, v [B, Sk, Hkv, D]`` under ``lm`` on the backend the registry selects.
    Returns out ``[B, Sq, H, D]`` (q's dtype) and lse ``[B, H, Sq]`` (fp32), both differentiable. Raises the
    registry's ValueError when the backend cannot express the call."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    record = select(backend, q, k, lm)
    return _KernelFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), lm, record, scale)
