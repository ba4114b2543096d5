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
given, so passing the ring's FINAL out and lse yields exact per-block gradients; the ``delta``
argument of :func:`backward` is accepted for signature compatibility and ignored (so a gradient
flowing into lse cannot be folded in here: the ring refuses that case for these backends).

Masks: only what the kernels express natively. ``is_causal`` in these ops is top-left aligned, which
for ``Sq == Sk`` and ``q_offset == k_offset`` is exactly the global causal mask ("aligned diagonal");
a causal block that is entirely visible runs non-causal. Anything else (other offsets, sliding
windows, document ids) makes :func:`supports` say False.

GQA: K/V are expanded to ``H`` heads here, locally, right before the kernel (and dK/dV summed back),
so the ring never sends expanded heads. Dropout is never used (philox state is a dummy).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

aten = torch.ops.aten
_NAMES = ("sdpa_flash", "sdpa_cudnn")


def _mask_kind(sq: int, sk: int, causal: bool, q_offset: int, k_offset: int) -> Optional[str]:
    """'full', 'diagonal' (aligned causal), or None when the kernel cannot express the mask."""
    if not causal or q_offset >= k_offset + sk - 1:  # last key is at or before the first query
        return "full"
    if sq == sk and q_offset == k_offset:
        return "diagonal"
    return None


def supports(q: Tensor, k: Tensor, *, backend: str = "sdpa_flash", causal: bool = False, q_offset: int = 0,
             k_offset: int = 0, window_left=None, q_doc_ids=None, k_doc_ids=None, **_) -> bool:
    """True when ``backend`` can compute this call exactly (CUDA, fp16/bf16, a mask it can express)."""
    if backend not in _NAMES or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if window_left is not None or q_doc_ids is not None or k_doc_ids is not None:
        return False
    d = q.shape[-1]
    if d % 8 != 0 or d > (256 if backend == "sdpa_flash" else 128):
        return False
    return _mask_kind(q.shape[1], k.shape[1], causal, q_offset, k_offset) is not None


def _heads_first(x: Tensor, groups: int) -> Tensor:
    # [B, S, Hx, D] -> [B, H, S, D] view over a [B, S, H, D]-contiguous buffer (the layout both
    # kernels prefer; slices along S of a batch > 1 are copied once here).
    if groups > 1:
        x = x.repeat_interleave(groups, dim=2)
    return x.contiguous().transpose(1, 2)


def _check(backend: str, q: Tensor, k: Tensor, causal, q_offset, k_offset, window_left, q_doc_ids) -> bool:
    if backend not in _NAMES:
        raise ValueError(f"backend={backend!r} is not one of {list(_NAMES)}.")
    if window_left is not None or q_doc_ids is not None:
        raise ValueError(f"{backend} supports no sliding window or document ids; use backend='torch' or 'triton'.")
    kind = _mask_kind(q.shape[1], k.shape[1], causal, q_offset, k_offset)
    if kind is None:
        raise ValueError(f"{backend} cannot express causal offsets q_offset={q_offset}, k_offset={k_offset} "
                         f"for Sq={q.shape[1]}, Sk={k.shape[1]}; only fully visible or aligned diagonal blocks.")
    return kind == "diagonal"


def forward(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa_flash", causal: bool = False,
            softmax_scale: Optional[float] = None, q_offset: int = 0, k_offset: int = 0, window_left=None,
            q_doc_ids=None, k_doc_ids=None, **_) -> tuple[Tensor, Tensor]:
    """Fused forward. q ``[B, Sq, H, D]``, k/v ``[B, Sk, Hkv, D]`` -> out ``[B, Sq, H, D]`` (q's dtype),
    lse ``[B, H, Sq]`` (fp32, natural log). Same keyword arguments as ``attention_forward_torch``."""
    is_causal = _check(backend, q, k, causal, q_offset, k_offset, window_left, q_doc_ids)
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qt, kt, vt = _heads_first(q, 1), _heads_first(k, g), _heads_first(v, g)  # [B, H, S, D]
    if backend == "sdpa_flash":
        out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, is_causal, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, is_causal, False,
                                                            scale=scale)[:2]
        lse = lse.squeeze(-1)
    return out.transpose(1, 2), lse[..., :sq].float()


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
             backend: str = "sdpa_flash", causal: bool = False, softmax_scale: Optional[float] = None,
             q_offset: int = 0, k_offset: int = 0, window_left=None, q_doc_ids=None, k_doc_ids=None,
             delta=None, **_) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward from a given (final) ``out [B, Sq, H, D]`` and ``lse [B, H, Sq]``.

    Returns ``dq [B, Sq, H, D]``, ``dk, dv [B, Sk, Hkv, D]`` in q's dtype (the kernels' output dtype;
    the ring accumulates them in fp32). ``delta`` is ignored (recomputed from ``out`` and ``dout``).
    """
    is_causal = _check(backend, q, k, causal, q_offset, k_offset, window_left, q_doc_ids)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qt, kt, vt = _heads_first(q, 1), _heads_first(k, g), _heads_first(v, g)
    ot, dot = _heads_first(out.to(q.dtype), 1), _heads_first(dout.to(q.dtype), 1)
    lse = lse.float().contiguous()
    if backend == "sdpa_flash":
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
    """Differentiable ``(out, lse)`` through the fused kernels; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, backend, causal, softmax_scale, q_offset, k_offset):
        out, lse = forward(q, k, v, backend=backend, causal=causal, softmax_scale=softmax_scale,
                           q_offset=q_offset, k_offset=k_offset)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = dict(backend=backend, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                        k_offset=k_offset)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout, q, k, v, out, lse, **ctx.opts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa_flash", causal: bool = False,
              softmax_scale: Optional[float] = None, q_offset: int = 0, k_offset: int = 0, window_left=None,
              q_doc_ids=None, k_doc_ids=None) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out [B, Sq, H, D], lse [B, H, Sq])``; raises ValueError for unsupported masks."""
    _check(backend, q, k, causal, q_offset, k_offset, window_left, q_doc_ids)
    return SdpaAttentionFn.apply(q, k, v, backend, causal, softmax_scale, q_offset, k_offset)
