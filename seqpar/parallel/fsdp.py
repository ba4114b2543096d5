"""FSDP2 wrapping: parameter/gradient/optimizer sharding over the run's mesh, gradients summed.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and optimizer state
(ZeRO-3) per Transformer block plus a root unit (embedding, final norm, head). Its DeviceMesh comes
from the run's :class:`~seqpar.parallel.mesh.Mesh` (which owns every process group), per mode:

* ``dp_cp``: a 1-D mesh over all ``dp * cp`` ranks: everything sharded ``world``-ways; the
  reduce-scatter sums gradients over dp (different rows) and cp (different tokens) at once;
* ``dp``: HSDP on a 2-D ``(cp, dp)`` mesh: sharded over dp, replicated over cp; FSDP2 reduce-scatters
  over dp, then all-reduces over cp;
* ``none``: no FSDP; the trainer all-reduces gradients itself (DDP-like).

Gradients are SUMMED, not averaged: the trainer divides each rank's loss sum by the global token
count, so the sum over ranks is exactly the gradient of the global mean loss for any mesh.

This module knows no model: it wraps ``model.layers`` and the root. The model-specific order (BPT
MLP -> compile -> activation checkpointing -> FSDP) is :func:`seqpar.models.parallelize.parallelize`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from seqpar.parallel.mesh import Mesh

FSDP_MODES = ("dp_cp", "dp", "none")


# -------------------------------------------------------------------------------------------------- FSDP
def fsdp_mesh(mesh: Mesh, mode: str):
    """The DeviceMesh FSDP2 shards over for ``mode`` (see the module docstring); None: no FSDP.

    The mesh owns it: created on first use (collective: every rank calls, in the same order), then
    shared by every model sharded on this mesh.
    """
    if mode not in FSDP_MODES:
        raise ValueError(f"parallel.fsdp={mode!r} is not one of {list(FSDP_MODES)}.")
    if mode == "none" or mesh.world_size == 1:
        return None
    if mode == "dp_cp" or mesh.cp == 1:
        return mesh.flat_device_mesh()
    return mesh.hsdp_device_mesh()


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
