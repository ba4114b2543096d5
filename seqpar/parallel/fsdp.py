"""FSDP2 wrapping and activation-checkpointing policies for the Llama decoder.

Order (as in torchtitan): model surgery (BPT blockwise MLP) -> torch.compile (``train.compile``) ->
activation checkpointing -> FSDP.
AC wraps each block's *forward*; FSDP2's hooks run around it, so a recompute in backward runs while
FSDP holds the block's all-gathered weights.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and optimizer state
(ZeRO-3) per Transformer block plus a root unit (embedding, final norm, head). Its mesh
(:func:`fsdp_mesh`) is one of

* ``dp_cp``: a 1-D mesh over all ``dp * cp`` ranks: everything sharded ``world``-ways; the
  reduce-scatter sums gradients over dp (different rows) and cp (different tokens) at once;
* ``dp``: HSDP on a 2-D ``(cp, dp)`` mesh: sharded over dp, replicated over cp; FSDP2 reduce-scatters
  over dp, then all-reduces over cp;
* ``none``: no FSDP; the trainer all-reduces gradients itself (DDP-like).

Gradients are SUMMED, not averaged: the trainer divides each rank's loss sum by the global token
count, so the sum over ranks is exactly the gradient of the global mean loss for any mesh.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from seqpar.models.blockwise import apply_blockwise_ffn
from seqpar.models.compile import compile_model
from seqpar.models.llama import Attention, TransformerBlock
from seqpar.parallel.mesh import Mesh

AC_POLICIES = ("none", "full", "selective")
FSDP_MODES = ("dp_cp", "dp", "none")


# ------------------------------------------------------------------------------ activation checkpointing
def _full_forward(block_forward, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Keeps only the block input h [B, S, dim] (cos/sin are shared by all blocks); backward reruns
    # the whole block, ring attention included, in the same order on every rank.
    return checkpoint(block_forward, h, cos, sin, use_reentrant=False)


def _qkv(block: TransformerBlock, h, cos, sin):
    """Mirror of ``Attention.forward`` up to the attention call: ``h [B,S,dim] -> q [B,S,H,D], k, v [B,S,Hkv,D]``."""
    attn = block.attention
    B, S, _ = h.shape
    x = block.attention_norm(h)
    q = attn.wq(x).view(B, S, attn.n_heads, attn.head_dim)
    k = attn.wk(x).view(B, S, attn.n_kv_heads, attn.head_dim)
    v = attn.wv(x).view(B, S, attn.n_kv_heads, attn.head_dim)
    return attn.rope_fn(q, cos, sin), attn.rope_fn(k, cos, sin), v


def _out_and_mlp(block: TransformerBlock, h, out):
    """Mirror of the rest of ``TransformerBlock.forward``: ``h [B,S,dim], out [B,S,H,D] -> [B,S,dim]``."""
    B, S, _ = h.shape
    h = h + block.attention.wo(out.reshape(B, S, -1))  # [B, S, H, D] -> [B, S, H*D]
    return h + block.feed_forward(block.ffn_norm(h))


def _selective_forward(block: TransformerBlock, h, cos, sin):
    # Save what is expensive to recompute and cheap to keep under context parallelism: the attention
    # inputs q/k/v and its out/lse (recomputing them would rerun the ring, comms included). Norms,
    # projections, RoPE and the MLP (the bulk of a layer's activations) are recomputed.
    attn = block.attention
    q, k, v = checkpoint(_qkv, block, h, cos, sin, use_reentrant=False)
    out = attn.attn_fn(q, k, v, causal=True, softmax_scale=attn.softmax_scale)  # [B, S, H, D]
    return checkpoint(_out_and_mlp, block, h, out, use_reentrant=False)


def apply_ac(model: nn.Module, policy: str) -> None:
    """Activation checkpointing per Transformer block of ``model.layers``.

    ``none``: keep everything; ``full``: keep only each block's input; ``selective``: keep the
    attention inputs/outputs, recompute the rest. Parameter names are unchanged (the block's
    ``forward`` is wrapped in place, no wrapper module).

    Raises:
        ValueError: unknown policy, or ``selective`` on a block that is not the stock Llama block
            (its forward is mirrored here, so a changed block must use ``full``).
    """
    if policy not in AC_POLICIES:
        raise ValueError(f"train.ac={policy!r} is not one of {list(AC_POLICIES)}.")
    if policy == "none":
        return
    for block in model.layers:
        if policy == "full":
            block.forward = functools.partial(_full_forward, block.forward)
            continue
        if type(block).forward is not TransformerBlock.forward or type(block.attention).forward is not Attention.forward:
            raise ValueError(f"train.ac=selective mirrors the stock Llama block but got {type(block).__name__} / "
                             f"{type(block.attention).__name__}; use train.ac=full.")
        block.forward = functools.partial(_selective_forward, block)


# -------------------------------------------------------------------------------------------------- FSDP
def fsdp_mesh(mesh: Mesh, mode: str):
    """The DeviceMesh FSDP2 shards over for ``mode`` (see the module docstring); None: no FSDP.

    Collective when it returns a mesh: every rank must call it, in the same order.
    """
    if mode not in FSDP_MODES:
        raise ValueError(f"parallel.fsdp={mode!r} is not one of {list(FSDP_MODES)}.")
    if mode == "none" or mesh.world_size == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.arange(mesh.world_size)
    if mode == "dp_cp" or mesh.cp == 1:
        return DeviceMesh(mesh.device.type, ranks, mesh_dim_names=("dp_cp",))
    # FSDP2 reads a 2-D mesh as (replicate, shard): transpose [dp, cp] so cp is the replicate dim.
    return DeviceMesh(mesh.device.type, ranks.view(mesh.dp, mesh.cp).t(), mesh_dim_names=("cp", "dp"))


def _sum_gradients(model: nn.Module) -> None:
    # The default divides by the mesh size (a mean over ranks). Set on every FSDP unit: the setting
    # is per parameter group. Force plain SUM collectives where torch has the switch: otherwise a
    # divide factor of 1 becomes NCCL's PREMUL_SUM, which gloo lacks.
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)


def apply_fsdp(model: nn.Module, dmesh, *, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = None) -> None:
    """``fully_shard`` each block of ``model.layers``, then the root; gradients summed over ``dmesh``.

    Args:
        dmesh: from :func:`fsdp_mesh`. param_dtype: compute dtype of the all-gathered weights (bf16 on
            GPU; None keeps fp32 on CPU). reduce_dtype: dtype of the gradient reduce-scatter (fp32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's weights are all-gathered again at once by backward: keep them (torchtitan).
        fully_shard(block, mesh=dmesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    # Root unit: embedding, final norm, head. FSDP2 keeps the root's weights gathered after forward,
    # which the chunked loss (called after forward, reading the head weight) relies on.
    fully_shard(model, mesh=dmesh, mp_policy=mp)
    _sum_gradients(model)


def parallelize(model: nn.Module, mesh: Mesh, *, fsdp: str = "dp_cp", ac: str = "none", ffn_chunk: int = 0,
                param_dtype: Optional[torch.dtype] = None, compile: bool = False,
                compile_backend: str = "inductor") -> Optional[object]:
    """BPT MLP -> torch.compile of the element-wise parts -> activation checkpointing -> FSDP2, in place.

    Args:
        model: a :class:`~seqpar.models.llama.Llama` (real or meta weights).
        mesh: the run's mesh. fsdp / ac / ffn_chunk / compile: ``parallel.fsdp``, ``train.ac``,
            ``train.ffn_chunk``, ``train.compile`` (:func:`seqpar.models.compile.compile_model` with
            ``compile_backend``).
        param_dtype: FSDP compute dtype (bf16 on GPU); gradients are reduced in fp32 either way.
    Returns:
        The FSDP DeviceMesh, or None when the model is not sharded (1 process, or ``fsdp=none``).
    """
    apply_blockwise_ffn(model, ffn_chunk)
    if compile:
        compile_model(model, backend=compile_backend)
    apply_ac(model, ac)
    dmesh = fsdp_mesh(mesh, fsdp)
    if dmesh is not None:
        apply_fsdp(model, dmesh, param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    return dmesh
