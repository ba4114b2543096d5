"""Reversible residual layers (Gomez et al. 2017, "The Reversible Residual Network"; Reformer, Kitaev et al. 2020,
Sec. 3 "Reversible Transformer").

Two streams ``(x1, x2)``, both the embedding at the start; each block maps

    y1 = x1 + F(x2),   F = attention(norm(.)) projected      (the block's pre_attention / attend / project)
    y2 = x2 + G(y1),   G = feed_forward(ffn_norm(.))

and is inverted in the backward, ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``, so only the LAST block's outputs
are kept for backward: activation memory does not grow with depth. The stack's output is ``(y1 + y2) / 2``
(trax concatenates the streams into a 2*dim vector; the average keeps the Llama head's ``dim``).

Parameter gradients are accumulated into ``.grad`` inside the backward (as RevNet implementations do), which
FSDP2's hooks do not see: ``parallel.fsdp=none`` is required (``seqpar.config.model.check_architecture``). The
feed-forward in chunks (Reformer Sec. 3, "Chunking") is ``train.ffn_chunk`` (:mod:`seqpar.models.blockwise`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from seqpar.ops.attention.mask import Mask


def _f(block, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Mask]) -> Tensor:
    q, k, v = block.pre_attention(x, cos, sin)
    return block.attention.project(block.attention.attend(q, k, v, mask))


def _g(block, x: Tensor) -> Tensor:
    return block.feed_forward(block.ffn_norm(x))


def reversible_reference(blocks: Sequence, h: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Mask] = None) -> Tensor:
    """The same equations under plain autograd (keeps every activation): the reference for tests."""
    x1 = x2 = h
    for blk in blocks:
        x1 = x1 + _f(blk, x2, cos, sin, mask)
        x2 = x2 + _g(blk, x1)
    return (x1 + x2) / 2


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, blocks, cos, sin, mask, *params):
        with torch.no_grad():
            for blk in blocks:
                x1 = x1 + _f(blk, x2, cos, sin, mask)
                x2 = x2 + _g(blk, x1)
        ctx.blocks, ctx.mask = blocks, mask
        # The backward recomputes F and G: under the forward's autocast, or the inversion would not match.
        dev = x1.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.save_for_backward(x1, x2, cos, sin)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2, cos, sin = ctx.saved_tensors
        dev, dtype, enabled = ctx.autocast
        for blk in reversed(ctx.blocks):
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                y1 = y1.detach().requires_grad_()
                g = _g(blk, y1)
            torch.autograd.backward(g, dy2)  # params of G and y1.grad
            with torch.no_grad():
                x2 = y2 - g
                dy1 = dy1 + y1.grad
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                x2 = x2.detach().requires_grad_()
                f = _f(blk, x2, cos, sin, ctx.mask)
            torch.autograd.backward(f, dy1)
            with torch.no_grad():
                y1, y2 = y1.detach() - f, x2.detach()
                dy2 = dy2 + x2.grad
        # Parameter gradients are already in .grad; the params were inputs only to order the graph.
        return (dy1, dy2, None, None, None, None) + (None,) * len(_params(ctx.blocks))


def _params(blocks) -> list:
    return [p for blk in blocks for p in blk.parameters() if p.requires_grad]


def reversible_stack(blocks: Sequence, h: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Mask] = None) -> Tensor:
    """``h [B, S, dim] -> [B, S, dim]`` through the reversible blocks, activations recomputed in the backward."""
    y1, y2 = _Reversible.apply(h, h, list(blocks), cos, sin, mask, *_params(blocks))
    return (y1 + y2) / 2
