"""Activation checkpointing (``train.ac``): what each Transformer block keeps for backward.

* ``none``: keep every activation autograd saves.
* ``full``: keep only each block's input ``h [B, S, dim]``; backward reruns the whole block, ring
  attention included (every rank reruns it in the same order, so the ring's send/recv still pair up).
* ``selective``: keep the attention's inputs and outputs, recompute the rest. The block's forward
  (:class:`seqpar.models.llama.TransformerBlock`) is three sub-steps: pre-attention (norm, q/k/v
  projections, RoPE), the attention call, post-attention (output projection, residual, norm, MLP).
  The two non-attention sub-steps run under ``torch.utils.checkpoint`` with an op-level policy
  (:func:`~torch.utils.checkpoint.create_selective_checkpoint_contexts`, as torchtitan's ``apply_ac``);
  the attention call runs outside any recompute region, once forward and once backward.

Why the attention is left out of the recompute regions rather than marked ``MUST_SAVE`` inside one
region per block: selective checkpointing caches the outputs of *dispatcher ops*, and neither ring
attention (a Python loop of send/recv and kernel calls inside an ``autograd.Function``) nor the
Triton kernels are one dispatcher op, so a recompute would rerun the whole ring, communication
included. Wrapping the attention as a ``torch.library.custom_op`` would make it one op, but the
injected attention function (its process group, layout, backend) and its backward would then have
to travel through the op's schema or a global registry; the sub-step structure needs neither.

What ``selective`` keeps per layer, with ``T`` local tokens (what :func:`seqpar.train.dry_run.estimate_memory`
counts; ``tests/unit/test_blockwise.py`` measures it with saved-tensor hooks):
the block input ``h [T, dim]`` (held by both recompute regions), and what the attention's autograd
function saves: ``q [T, H*D]`` and ``k [T, Hkv*D]`` after RoPE, ``v [T, Hkv*D]``, ``out [T, H*D]`` and
the fp32 ``lse [H, T]``. The policy recomputes every computation of the two regions (norms,
projections, RoPE, MLP: the bulk of a layer's activations, ~14x the block input for the SwiGLU
hidden alone) and saves only collective outputs, so a region that ever holds one (e.g. a future
tensor-parallel reduce) never communicates again in backward.

No module wrappers: parameter names, the state dict and FSDP units are unchanged. This file imports
no model and no config (``seqpar.config`` imports :data:`AC_MODES` from here).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

# Outputs kept by the selective policy: collectives, which a recompute must not issue again.
_SAVE_OPS = frozenset({
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
})


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Op-level policy of ``train.ac=selective`` inside the non-attention sub-steps: save collective
    outputs, recompute everything else (see the module docstring for why)."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_recompute(step, *args):
    """``step(*args)`` under non-reentrant checkpointing with :func:`selective_policy`.

    Installed as ``block.recompute``; outside autograd (evaluation) there is nothing to keep.
    """
    if not torch.is_grad_enabled():
        return step(*args)
    context_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    return checkpoint(step, *args, use_reentrant=False, context_fn=context_fn)


def _full_forward(block_forward, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *mask) -> torch.Tensor:
    # Keeps only the block input h [B, S, dim] (cos/sin and the attention Mask are shared by all blocks).
    return checkpoint(block_forward, h, cos, sin, *mask, use_reentrant=False)


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation checkpointing per Transformer block of ``model.layers``, in place.

    Call before FSDP wrapping (FSDP2's hooks then run around the checkpointed forward, so a recompute
    reads the block's all-gathered weights of that moment).

    Args:
        model: a :class:`~seqpar.models.llama.Llama` (any module whose ``layers`` are its blocks).
        mode: one of :data:`AC_MODES` (``train.ac``).
    Raises:
        ValueError: unknown mode, or ``selective`` on a block without the sub-step ``recompute`` hook
            of :class:`~seqpar.models.llama.TransformerBlock`.
    """
    if mode not in AC_MODES:
        raise ValueError(f"train.ac={mode!r} is not one of {list(AC_MODES)}.")
    if mode == "none":
        return
    for block in model.layers:
        if mode == "full":
            block.forward = functools.partial(_full_forward, block.forward)
        elif not hasattr(type(block), "recompute"):
            raise ValueError(f"train.ac=selective needs a block with the TransformerBlock sub-steps (a "
                             f"`recompute` hook) but got {type(block).__name__}; use train.ac=full.")
        else:
            block.recompute = _selective_recompute
