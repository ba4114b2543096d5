"""seqpar's Triton attention: functional forward/backward with lse, and the autograd wrapper.

The kernels live in :mod:`.fwd` and :mod:`.bwd`; this module gives them the contract of the reference
(:func:`seqpar.ops.attention.reference.forward` / ``backward``: a :class:`LocalMask`, natural-log fp32
lse) plus the ring-ready extras its registry record declares (``ring_accumulators``):

* ``forward(..., out_acc=, lse_acc=)`` merges this block into a running fp32 ``(out, lse)`` pair in-kernel;
* ``backward(..., delta=, dq_acc=, dk_acc=, dv_acc=)`` takes the global delta and adds gradients into
  fp32 running buffers in-kernel.

Tuning choices are arguments, never global state: ``autotune`` (default on: GPU autotuning of the
listed tiles; off: the first tile), ``tma`` (None auto, see :func:`.bwd_launch.tma_mode`),
``deterministic`` (True refuses ``dq_mode="atomic"``; the default dQ mode is deterministic anyway) and
``dq_mode`` (explicit override of :func:`default_dq_mode`).

Layouts: q/out ``[B, Sq, H, D]``, k/v ``[B, Sk, Hkv, D]`` (GQA: ``H % Hkv == 0``, never expanded), lse
``[B, H, Sq]`` fp32 natural log (-inf and out 0 for rows that see no key). dtypes: bf16/fp16 (fp32 for
tests); head_dim 16, 32, 64, 128, 256. Nothing here touches a device at import.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention.mask import LocalMask
from seqpar.ops.attention.triton.bwd_launch import attention_bwd_launch
from seqpar.ops.attention.triton.fwd import attention_fwd_launch

_FULL = LocalMask()


def default_dq_mode(head_dim: int, deterministic: Optional[bool] = None) -> str:
    """How dQ is computed when the caller does not say: ``"kernel"`` (a separate dQ kernel, 7 matmuls,
    deterministic) at every head_dim and determinism setting.

    Measured on H200 (benchmarks/NOTES-attention.md, v4): with the one-warpgroup 64-key dK/dV tiles the
    separate kernel is faster than ``"atomic"`` (dQ added by the dK/dV kernel, 5 matmuls, by TMA bulk reduce
    where tuned) by 3% at head_dim 64 and 14-16% at 128, causal fwd+bwd 16k-64k. ``"atomic"`` stays an
    explicit option; it sums in a run-dependent order, so ``deterministic`` refuses it (:func:`_dq_mode`).
    The arguments are kept so a future measurement can make the choice depend on them again.
    """
    del head_dim, deterministic
    return "kernel"


def _dq_mode(head_dim: int, dq_mode: Optional[str], deterministic: Optional[bool]) -> str:
    if dq_mode is None:
        return default_dq_mode(head_dim, deterministic)
    if dq_mode == "atomic" and deterministic:
        raise ValueError("dq_mode='atomic' sums dQ with atomics in a run-dependent order; use dq_mode='kernel' "
                         "(or None) with deterministic=True.")
    return dq_mode


def forward(
    q: Tensor,  # [B, Sq, H, D]
    k: Tensor,  # [B, Sk, Hkv, D]
    v: Tensor,  # [B, Sk, Hkv, D]
    mask: LocalMask = _FULL,
    *,
    softmax_scale: Optional[float] = None,
    out_acc: Optional[Tensor] = None,  # [B, Sq, H, D] fp32, running output of a ring
    lse_acc: Optional[Tensor] = None,  # [B, H, Sq] fp32 contiguous, running lse of a ring
    autotune: bool = True,
) -> tuple[Tensor, Tensor]:
    """Attention forward; same contract as :func:`seqpar.ops.attention.reference.forward`.

    Returns ``out [B, Sq, H, D]`` in q's dtype and ``lse [B, H, Sq]`` fp32. With ``out_acc``/``lse_acc``
    the result is merged into them in place (``lse = logaddexp``) and they are returned instead.
    Raises ValueError for shapes, dtypes, head dims or mask kinds the kernels cannot take.
    """
    return attention_fwd_launch(q, k, v, mask, softmax_scale=softmax_scale, out_acc=out_acc, lse_acc=lse_acc,
                                autotune=autotune)


def backward(
    dout: Tensor,  # [B, Sq, H, D]
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,  # [B, Sq, H, D], the FINAL output of the rows (after any ring merge)
    lse: Tensor,  # [B, H, Sq], the FINAL log-sum-exp of the rows
    mask: LocalMask = _FULL,
    *,
    softmax_scale: Optional[float] = None,
    delta: Optional[Tensor] = None,  # [B, H, Sq] = rowsum(dout * out), computed if None
    dq_acc: Optional[Tensor] = None,  # [B, Sq, H, D] fp32: dq is added into it
    dk_acc: Optional[Tensor] = None,  # [B, Sk, Hkv, D] fp32 (with dv_acc)
    dv_acc: Optional[Tensor] = None,
    dq_mode: Optional[str] = None,  # "kernel" | "atomic"; None: default_dq_mode(head_dim, deterministic)
    deterministic: Optional[bool] = None,
    tma: Optional[bool] = None,
    autotune: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact backward from the global lse; same contract as :func:`seqpar.ops.attention.reference.backward`.

    Returns fp32 ``dq [B, Sq, H, D]``, ``dk, dv [B, Sk, Hkv, D]``; an ``*_acc`` buffer that is given is
    added into in-kernel and returned in place of a fresh tensor.
    """
    return attention_bwd_launch(dout, q, k, v, out, lse, mask, softmax_scale=softmax_scale, delta=delta,
                                dq_acc=dq_acc, dk_acc=dk_acc, dv_acc=dv_acc, grad_dtype=torch.float32,
                                dq_mode=_dq_mode(q.shape[-1], dq_mode, deterministic), tma=tma, autotune=autotune)


class TritonAttentionFn(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out, lse (O(S) memory); backward runs the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale, dq_mode, tma, autotune):
        out, lse = attention_fwd_launch(q, k, v, mask, softmax_scale=softmax_scale, autotune=autotune)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = mask
        ctx.opts = dict(softmax_scale=softmax_scale, dq_mode=dq_mode, tma=tma, autotune=autotune)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # As in the reference: lse is returned for merging, gradients into it are not propagated.
        q, k, v, out, lse = ctx.saved_tensors
        # Gradients come out in the input dtype straight from the kernels (no fp32 round trip).
        dq, dk, dv = attention_bwd_launch(dout, q, k, v, out, lse, ctx.mask, grad_dtype=q.dtype, **ctx.opts)
        return dq, dk, dv, None, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: LocalMask = _FULL, *, softmax_scale: Optional[float] = None,
              dq_mode: Optional[str] = None, deterministic: Optional[bool] = None, tma: Optional[bool] = None,
              autotune: bool = True) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)``; arguments as in :func:`forward` / :func:`backward`. The dQ mode
    (and with it determinism) is fixed here, at forward time, for the backward of this call."""
    return TritonAttentionFn.apply(q, k, v, mask, softmax_scale, _dq_mode(q.shape[-1], dq_mode, deterministic),
                                   tma, autotune)
