"""seqpar's Triton attention: functional forward/backward with lse, autograd wrapper, dispatcher hooks.

The kernels live in :mod:`seqpar.ops.attention_triton_fwd` and :mod:`seqpar.ops.attention_triton_bwd`;
this module gives them the exact signatures of the reference (:func:`attention_forward_torch`,
:func:`attention_backward_torch`) plus the ring-ready extras:

* ``forward(..., out_acc=, lse_acc=)`` merges this block into a running fp32 ``(out, lse)`` pair in-kernel;
* ``backward(..., delta=, dq_acc=, dk_acc=, dv_acc=)`` takes the global delta and adds gradients into
  fp32 running buffers in-kernel.

Layouts: q/out ``[B, Sq, H, D]``, k/v ``[B, Sk, Hkv, D]`` (GQA: ``H % Hkv == 0``, never expanded), lse
``[B, H, Sq]`` fp32 natural log (-inf and out 0 for rows that see no key). dtypes: bf16/fp16 (fp32 for
tests); head_dim 16, 32, 64, 128, 256. Nothing here touches a device at import.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention_triton_bwd import attention_bwd_launch
from seqpar.ops.attention_triton_fwd import HEAD_DIMS, INTERPRET, attention_fwd_launch

def default_dq_mode(head_dim: int) -> str:
    """How dQ is computed when the caller does not say: measured on H200 (benchmarks/NOTES-attention.md).

    ``"atomic"`` (fp32 atomics from the dK/dV kernel, 5 matmuls) is 4-8% faster at head_dim <= 64;
    ``"kernel"`` (a separate dQ kernel, 7 matmuls, deterministic) is 5-10% faster at 128. Atomics sum
    in a run-dependent order, so ``torch.use_deterministic_algorithms(True)`` selects ``"kernel"``.
    """
    if head_dim <= 64 and not torch.are_deterministic_algorithms_enabled():
        return "atomic"
    return "kernel"


def forward(
    q: Tensor,  # [B, Sq, H, D]
    k: Tensor,  # [B, Sk, Hkv, D]
    v: Tensor,  # [B, Sk, Hkv, D]
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    k_offset: int = 0,
    window_left: Optional[int] = None,
    q_doc_ids: Optional[Tensor] = None,  # [B, Sq]
    k_doc_ids: Optional[Tensor] = None,  # [B, Sk]
    block_q: int = 512,
    block_k: int = 512,
    out_acc: Optional[Tensor] = None,  # [B, Sq, H, D] fp32, running output of a ring
    lse_acc: Optional[Tensor] = None,  # [B, H, Sq] fp32 contiguous, running lse of a ring
) -> tuple[Tensor, Tensor]:
    """Attention forward; same contract as :func:`attention_forward_torch`.

    ``block_q``/``block_k`` are accepted for signature compatibility and ignored (tiles are autotuned).
    Returns ``out [B, Sq, H, D]`` in q's dtype and ``lse [B, H, Sq]`` fp32. With ``out_acc``/``lse_acc``
    the result is merged into them in place (``lse = logaddexp``) and they are returned instead.
    Raises ValueError for shapes, dtypes or head dims the kernels cannot take.
    """
    del block_q, block_k
    return attention_fwd_launch(q, k, v, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                                k_offset=k_offset, window_left=window_left, q_doc_ids=q_doc_ids,
                                k_doc_ids=k_doc_ids, out_acc=out_acc, lse_acc=lse_acc)


def backward(
    dout: Tensor,  # [B, Sq, H, D]
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,  # [B, Sq, H, D], the FINAL output of the rows (after any ring merge)
    lse: Tensor,  # [B, H, Sq], the FINAL log-sum-exp of the rows
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    k_offset: int = 0,
    window_left: Optional[int] = None,
    q_doc_ids: Optional[Tensor] = None,
    k_doc_ids: Optional[Tensor] = None,
    delta: Optional[Tensor] = None,  # [B, H, Sq] = rowsum(dout * out), computed if None
    block_q: int = 512,
    block_k: int = 512,
    dq_acc: Optional[Tensor] = None,  # [B, Sq, H, D] fp32: dq is added into it
    dk_acc: Optional[Tensor] = None,  # [B, Sk, Hkv, D] fp32 (with dv_acc)
    dv_acc: Optional[Tensor] = None,
    dq_mode: Optional[str] = None,  # "kernel" | "atomic"; None: default_dq_mode(head_dim)
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact backward from the global lse; same contract as :func:`attention_backward_torch`.

    Returns fp32 ``dq [B, Sq, H, D]``, ``dk, dv [B, Sk, Hkv, D]``; an ``*_acc`` buffer that is given is
    added into in-kernel and returned in place of a fresh tensor. ``block_q``/``block_k`` are ignored.
    """
    del block_q, block_k
    return attention_bwd_launch(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                                q_offset=q_offset, k_offset=k_offset, window_left=window_left,
                                q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids, delta=delta, dq_acc=dq_acc,
                                dk_acc=dk_acc, dv_acc=dv_acc, grad_dtype=torch.float32,
                                dq_mode=dq_mode or default_dq_mode(q.shape[-1]))


class TritonAttentionFn(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out, lse (O(S) memory); backward runs the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, q_offset, k_offset, window_left, q_doc_ids, k_doc_ids,
                dq_mode):
        out, lse = attention_fwd_launch(q, k, v, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                                        k_offset=k_offset, window_left=window_left, q_doc_ids=q_doc_ids,
                                        k_doc_ids=k_doc_ids)
        ctx.save_for_backward(q, k, v, out, lse, q_doc_ids, k_doc_ids)
        ctx.opts = dict(causal=causal, softmax_scale=softmax_scale, q_offset=q_offset, k_offset=k_offset,
                        window_left=window_left, dq_mode=dq_mode)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # As in attention_torch: lse is returned for merging, gradients into it are not propagated.
        q, k, v, out, lse, q_doc_ids, k_doc_ids = ctx.saved_tensors
        # Gradients come out in the input dtype straight from the kernels (no fp32 round trip).
        dq, dk, dv = attention_bwd_launch(dout, q, k, v, out, lse, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids,
                                          grad_dtype=q.dtype, **ctx.opts)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def supports(q: Tensor, k: Tensor, backend: str = "triton", **opts) -> bool:
    """True when the Triton kernels can take these inputs (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    if q.dim() != 4 or k.dim() != 4 or q.dtype != k.dtype or q.shape[-1] not in HEAD_DIMS:
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    # triton 3.6's interpreter computes bf16 dots wrongly: fp16/fp32 only there.
    return INTERPRET and q.device.type == "cpu" and q.dtype in (torch.float16, torch.float32)


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "triton", causal: bool = False,
              softmax_scale: Optional[float] = None, q_offset: int = 0, k_offset: int = 0,
              window_left: Optional[int] = None, q_doc_ids: Optional[Tensor] = None,
              k_doc_ids: Optional[Tensor] = None, dq_mode: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)`` for the dispatcher; arguments as in :func:`forward`."""
    del backend
    return TritonAttentionFn.apply(q, k, v, causal, softmax_scale, q_offset, k_offset, window_left, q_doc_ids,
                                   k_doc_ids, dq_mode or default_dq_mode(q.shape[-1]))
