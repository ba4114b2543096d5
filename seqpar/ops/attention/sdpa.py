"""PyTorch's fused CUDA attention kernels (FlashAttention-2 and cuDNN) as ``(out, lse)`` backends.

``torch.nn.functional.scaled_dot_product_attention`` hides the softmax statistics, so this module
calls the ATen ops underneath, which return them, and their backward ops, which accept a given lse:

* ``sdpa_flash``: ``aten._scaled_dot_product_flash_attention`` -> logsumexp ``[B, H, Sq]`` fp32,
  natural log (FA2 keeps the row max in the log2 domain internally but stores ``m + log(l)`` in
  nats). Some older builds padded the last dim to a multiple of 128, so it is sliced to ``Sq``.
* ``sdpa_cudnn``: ``aten._scaled_dot_product_cudnn_attention`` -> logsumexp ``[B, H, Sq, 1]``
  fp32, natural log; its backward wants the same ``[B, H, Sq, 1]`` shape, contiguous.

Both lse conventions were checked on H200 with torch 2.11 (benchmarks/bench_ring.py: ring lse within
~1e-6 of a float64 reference for both kernels).

Both backward ops recompute ``delta = rowsum(dout * out)`` themselves from the ``out`` they are
given, so passing the ring's FINAL out and lse yields exact per-block gradients; they take no
``delta``, so a gradient flowing into lse cannot be folded in (their registry records declare
``lse_grad=False`` and the ring refuses that case for them).

Masks: only what the kernels express natively. ``is_causal`` in these ops is top-left aligned, which
for ``Sq == Sk`` and ``q_offset == k_offset`` is exactly the global causal mask ("aligned diagonal");
a causal block that is entirely visible runs non-causal. Anything else (other offsets, sliding
windows, document ids) is not declared in their registry records (``aligned_causal_only``,
``mask_kinds={"causal"}``), so :func:`seqpar.ops.attention.registry.select` refuses it before a call.

Each kernel has its own functions (``flash_*``, ``cudnn_*``) for its own registry record.

GQA: K/V are expanded to ``H`` heads here, locally, right before the kernel (and dK/dV summed back),
so the ring never sends expanded heads. Dropout is never used (philox state is a dummy).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention.mask import LocalMask

aten = torch.ops.aten
_FLASH, _CUDNN = "sdpa_flash", "sdpa_cudnn"


def mask_kind(sq: int, sk: int, causal: bool, q_offset: int, k_offset: int) -> Optional[str]:
    """'full', 'diagonal' (aligned causal), or None when the kernels cannot express the mask."""
    if not causal or q_offset >= k_offset + sk - 1:  # last key is at or before the first query
        return "full"
    if sq == sk and q_offset == k_offset:
        return "diagonal"
    return None


def _heads_first(x: Tensor, groups: int) -> Tensor:
    # [B, S, Hx, D] -> [B, H, S, D] view over a [B, S, H, D]-contiguous buffer (the layout both
    # kernels prefer; slices along S of a batch > 1 are copied once here).
    if groups > 1:
        x = x.repeat_interleave(groups, dim=2)
    return x.contiguous().transpose(1, 2)


def _is_causal(kernel: str, q: Tensor, k: Tensor, mask: LocalMask) -> bool:
    """Whether the kernel runs with is_causal; raises ValueError for a mask it cannot express."""
    extra = mask.kinds - {"causal"}
    if extra:
        raise ValueError(f"{kernel} supports no {sorted(extra)} masks; use backend='torch' or 'triton'.")
    kind = mask_kind(q.shape[1], k.shape[1], mask.causal, mask.q_offset, mask.k_offset)
    if kind is None:
        raise ValueError(f"{kernel} cannot express causal offsets q_offset={mask.q_offset}, k_offset={mask.k_offset} "
                         f"for Sq={q.shape[1]}, Sk={k.shape[1]}; only fully visible or aligned diagonal blocks.")
    return kind == "diagonal"


def _forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, mask: LocalMask,
             softmax_scale: Optional[float]) -> tuple[Tensor, Tensor]:
    is_causal = _is_causal(kernel, q, k, mask)
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qt, kt, vt = _heads_first(q, 1), _heads_first(k, g), _heads_first(v, g)  # [B, H, S, D]
    if kernel == _FLASH:
        out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, is_causal, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, is_causal, False,
                                                            scale=scale)[:2]
        lse = lse.squeeze(-1)
    return out.transpose(1, 2), lse[..., :sq].float()


def _backward(kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              mask: LocalMask, softmax_scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    is_causal = _is_causal(kernel, q, k, mask)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qt, kt, vt = _heads_first(q, 1), _heads_first(k, g), _heads_first(v, g)
    ot, dot = _heads_first(out.to(q.dtype), 1), _heads_first(dout.to(q.dtype), 1)
    lse = lse.float().contiguous()
    if kernel == _FLASH:
        # Dropout is 0, so the philox seed/offset are never read; shapes match what the forward returns.
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse, None, None, sq, sk, 0.0, is_causal, seed, offset, scale=scale)
    else:
        seed = torch.zeros((), dtype=torch.long, device=q.device)
        offset = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dot, qt, kt, vt, ot, lse.unsqueeze(-1), seed, offset, None, None, None, sq, sk, 0.0, is_causal,
            scale=scale)
    dq = dq.transpose(1, 2)  # [B, Sq, H, D]
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)  # [B, Sk, H, D]
    if g > 1:  # head h used kv head h // g: sum each group back onto its kv head
        dk = dk.unflatten(2, (hkv, g)).sum(3)
        dv = dv.unflatten(2, (hkv, g)).sum(3)
    return dq, dk, dv


class SdpaAttentionFn(torch.autograd.Function):
    """Differentiable ``(out, lse)`` through one fused kernel; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, kernel, mask, softmax_scale):
        out, lse = _forward(kernel, q, k, v, mask, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (kernel, mask, softmax_scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        kernel, mask, scale = ctx.args
        dq, dk, dv = _backward(kernel, dout, q, k, v, out, lse, mask, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# One set of functions per kernel (one registry record each). Forward: q ``[B, Sq, H, D]``, k/v
# ``[B, Sk, Hkv, D]`` -> out ``[B, Sq, H, D]`` (q's dtype), lse ``[B, H, Sq]`` (fp32, natural log).
# Backward from a given (final) out/lse -> dq ``[B, Sq, H, D]``, dk/dv ``[B, Sk, Hkv, D]`` in q's dtype
# (the kernels' output dtype; the ring accumulates them in fp32). All raise ValueError for a mask
# the kernel cannot express.

def flash_forward(q: Tensor, k: Tensor, v: Tensor, mask: LocalMask, *,
                  softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 forward through ``aten._scaled_dot_product_flash_attention``."""
    return _forward(_FLASH, q, k, v, mask, softmax_scale)


def flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: LocalMask, *,
                   softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward from the final out/lse (delta recomputed inside the kernel)."""
    return _backward(_FLASH, dout, q, k, v, out, lse, mask, softmax_scale)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: LocalMask, *,
                    softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)`` through FlashAttention-2."""
    _is_causal(_FLASH, q, k, mask)
    return SdpaAttentionFn.apply(q, k, v, _FLASH, mask, softmax_scale)


def cudnn_forward(q: Tensor, k: Tensor, v: Tensor, mask: LocalMask, *,
                  softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """cuDNN forward through ``aten._scaled_dot_product_cudnn_attention``."""
    return _forward(_CUDNN, q, k, v, mask, softmax_scale)


def cudnn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: LocalMask, *,
                   softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """cuDNN backward from the final out/lse (delta recomputed inside the kernel)."""
    return _backward(_CUDNN, dout, q, k, v, out, lse, mask, softmax_scale)


def cudnn_attention(q: Tensor, k: Tensor, v: Tensor, mask: LocalMask, *,
                    softmax_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)`` through cuDNN."""
    _is_causal(_CUDNN, q, k, mask)
    return SdpaAttentionFn.apply(q, k, v, _CUDNN, mask, softmax_scale)
