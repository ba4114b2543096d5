"""Chunked cross-entropy: the LM head and the loss without materialising ``[B*S, V]`` logits.

At long context the logits dominate activation memory (S=128k tokens x V=128k vocab x 4 bytes is
64 GiB per sequence). We split the tokens into chunks and run head + CE per chunk under non-reentrant
activation checkpointing: forward keeps only the chunk's (already live) hidden slice, and backward
recomputes that chunk's logits, so at most one chunk of logits (plus its gradient) exists at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = hidden @ weight.t()  # [n, dim] @ [dim, V] -> [n, V], in the hidden dtype (bf16 matmul on GPU)
    # CE in fp32: log-softmax over a 100k+ vocabulary in bf16 loses the small probabilities.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``, chunk by chunk.

    Args:
        hidden: ``[B, S, dim]`` final-normed hidden states.
        weight: ``[V, dim]`` output projection (the embedding table when tied).
        labels: ``[B, S]`` target ids; ``ignore_index`` entries contribute nothing.
        chunk_size: tokens (over the flattened ``B*S``) per chunk; it need not divide ``B*S``.
        ignore_index: label value to skip.

    Returns:
        ``(loss_sum, n_tokens)``: the SUM of per-token losses (0-d, float32, or float64 for float64
        inputs) and the number of non-ignored labels (0-d, int64). The caller divides by the token
        count summed over ranks, so every token weighs the same however the sequence is sharded.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be > 0 (train.loss_chunk).")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, S].")
    h = hidden.reshape(-1, hidden.shape[-1])  # [B, S, dim] -> [N, dim]
    y = labels.reshape(-1)  # [B, S] -> [N]
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=loss_dtype, device=hidden.device)
    # split (not slicing in a loop): one SplitBackward concatenates the chunk gradients once instead of
    # each slice scattering into its own full-size zero tensor.
    for h_chunk, y_chunk in zip(h.split(chunk_size), y.split(chunk_size)):
        loss_sum = loss_sum + checkpoint(
            _chunk_ce_sum, h_chunk, weight, y_chunk, ignore_index, use_reentrant=False, preserve_rng_state=False
        )
    n_tokens = (labels != ignore_index).sum()
    return loss_sum, n_tokens
