"""Blockwise feed-forward (BPT, Liu & Abbeel 2023): the MLP over query chunks, under recompute.

A SwiGLU MLP keeps four ``[tokens, ffn_hidden]`` tensors for backward (``w1 x``, ``silu(w1 x)``,
``w3 x`` and their product): with ``ffn_hidden ~ 3.5 * dim`` that is ~14x the block's input, the
largest activation of a long-context layer. Tokens are independent in an MLP, so we run it on
chunks of ``chunk_size`` tokens, each under non-reentrant activation checkpointing: forward keeps
only the chunk's input slice (a view of the input, which the caller holds anyway), and backward
recomputes one chunk's hidden activations at a time. Extra saved memory is then O(chunk * hidden),
independent of the sequence length, for the price of one more MLP forward.

The chunked loss (:func:`seqpar.ops.loss.chunked_cross_entropy`) is the same idea for the LM head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seqpar.models.llama import FeedForward


class BlockwiseFeedForward(FeedForward):
    """A :class:`~seqpar.models.llama.FeedForward` that runs over token chunks under recompute.

    Same submodules (``w1``, ``w2``, ``w3``), so the same parameter names, state dict and FSDP units
    as the plain MLP; build it with :meth:`from_feed_forward` to share the plain module's weights.
    """

    def __init__(self, dim: int, hidden: int, chunk_size: int):
        super().__init__(dim, hidden)
        self.chunk_size = _check_chunk(chunk_size)

    @classmethod
    def from_feed_forward(cls, ffn: FeedForward, chunk_size: int) -> "BlockwiseFeedForward":
        """A blockwise MLP sharing ``ffn``'s Linear modules (no copy; the parameters stay the same objects)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.w1, new.w3, new.w2 = ffn.w1, ffn.w3, ffn.w2
        new.chunk_size = _check_chunk(chunk_size)
        return new

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, dim] -> [n, dim]``: ``w2(silu(w1 x) * w3 x)`` on one chunk of tokens."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, dim] -> [B, S, dim]``, equal to the plain MLP (chunks split the flattened ``B*S``)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B, S, dim] -> [N, dim]
        if flat.shape[0] <= self.chunk_size:
            chunks = (flat,)
        else:
            chunks = flat.split(self.chunk_size)
        # Through the modules (not their .weight): adapters wrapped around w1/w2/w3 (LoRA) still apply,
        # and under FSDP2 the recompute reads the block's all-gathered weights of that moment.
        if not torch.is_grad_enabled():
            outs = [self._mlp(c) for c in chunks]
        else:
            outs = [checkpoint(self._mlp, c, use_reentrant=False) for c in chunks]  # RNG kept: LoRA dropout
        # cat saves nothing for backward (its gradient is a split), so only the chunk inputs stay alive.
        return torch.cat(outs).view(shape)


def _check_chunk(chunk_size: int) -> int:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be > 0 (train.ffn_chunk; 0 means: do not use BPT).")
    return int(chunk_size)


def apply_blockwise_ffn(model: nn.Module, chunk_size: int) -> int:
    """Swap every ``FeedForward`` of ``model`` for a :class:`BlockwiseFeedForward` sharing its weights.

    Call before FSDP wrapping (the swap changes module objects, not parameters). ``chunk_size <= 0``
    leaves the model unchanged. Returns the number of MLPs swapped.
    """
    if chunk_size <= 0:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is FeedForward:
                setattr(parent, name, BlockwiseFeedForward.from_feed_forward(child, chunk_size))
                swapped += 1
    return swapped
