"""Parallelise the Llama decoder for training: the model-specific half of the parallel setup.

Order, as torchtitan's ``parallelize_llama`` documents its own (TP -> AC -> compile -> FSDP):

1. model surgery: the BPT blockwise MLP (``train.ffn_chunk``, :mod:`seqpar.models.blockwise`) swaps
   module objects, so it comes before anything that holds on to modules;
2. ``train.compile`` (:mod:`seqpar.models.compile`): compiles the norms, RoPE and MLPs *inside* each
   block. torchtitan compiles after AC because it compiles the whole block, checkpoint included;
   here the checkpoint stays eager around compiled regions (attention is never compiled), so compile
   comes first and AC wraps whatever the block runs;
3. activation checkpointing (``train.ac``, :mod:`seqpar.models.checkpointing`): wraps each block's
   forward or its sub-steps, before FSDP so that FSDP2's hooks run *around* it and a recompute in
   backward reads the block's all-gathered weights;
4. FSDP2 (``parallel.fsdp``, :mod:`seqpar.parallel.fsdp`): shards each block, then the root.

Context parallelism needs no surgery: the trainer injects ring attention as the model's ``attn_fn``; a model
with sequential state (MEGALODON's ``set_state_comm``) is handed the cp group's
:class:`~seqpar.parallel.state_pass.StateComm` first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from seqpar.models.blockwise import apply_blockwise_ffn
from seqpar.models.checkpointing import apply_ac
from seqpar.models.compile import compile_model
from seqpar.parallel.fsdp import apply_fsdp, fsdp_mesh

if TYPE_CHECKING:
    from seqpar.parallel.mesh import Mesh


def parallelize(model: nn.Module, mesh: "Mesh", *, fsdp: str = "dp_cp", ac: str = "none", ffn_chunk: int = 0,
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
    Raises:
        ValueError: unknown ``ac`` or ``fsdp`` mode.
    """
    if mesh.cp > 1 and hasattr(model, "set_state_comm"):
        from seqpar.parallel.state_pass import StateComm

        model.set_state_comm(StateComm(mesh.cp_group))
    apply_blockwise_ffn(model, ffn_chunk)
    if compile:
        compile_model(model, backend=compile_backend)
    apply_ac(model, ac)
    dmesh = fsdp_mesh(mesh, fsdp)
    if dmesh is not None:
        apply_fsdp(model, dmesh, param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    return dmesh
