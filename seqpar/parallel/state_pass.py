"""Carried state across the cp ranks of a ``contiguous`` layout: the data movement of a sequence-parallel recurrence
(MEGALODON's CEMA and timestep norm, ``model.arch=megalodon`` with ``parallel.cp > 1``). No math here: the model
composes the gathered states (``seqpar.ops.cema.cema_prefix``, ``seqpar.ops.timestep_norm.norm_prefix``).

Each rank runs its shard from an empty state, all-gathers the small per-shard summaries (a final state, a
shard's statistics), and composes the state before its own shard from those of the ranks before it: a parallel
prefix over ranks, one all-gather per recurrence and layer instead of a rank-to-rank pipeline (which would
serialise the ranks). The gather is differentiable: its backward reduce-scatters (SUM) the gradient, so every
earlier rank's summary receives what the later ranks' outputs owe it.

The model receives a :class:`StateComm` by injection (``model.set_state_comm``, :func:`seqpar.models.parallelize`);
``parallel/`` never imports a model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.parallel.collectives import gather_seq, group_rank, group_size


class StateComm:
    """The cp group a sequence-parallel recurrence passes its state over (``group=None``: the default group, or
    a group of one when torch.distributed is not initialised)."""

    def __init__(self, group: Optional[object] = None):
        self.group = group

    @property
    def rank(self) -> int:
        """This rank's place in the sequence (contiguous layout: it holds tokens ``[rank L, (rank + 1) L)``)."""
        return group_rank(self.group)

    @property
    def size(self) -> int:
        return group_size(self.group)

    def all_gather(self, x: Tensor) -> Tensor:
        """``x [B, ...]`` (real or complex, the same shape on every rank) -> ``[N, B, ...]`` in rank order.

        Differentiable: the backward sums every rank's gradient for shard ``j``'s entry back onto rank ``j``.
        Complex tensors travel as their real view (``[..., 2]``). Every rank must call it, in the same order,
        and must use the result in its loss (its backward is a collective too).
        """
        cplx = x.is_complex()
        t = torch.view_as_real(x) if cplx else x
        out = gather_seq(t.unsqueeze(1), self.group).movedim(1, 0)  # [B, 1, ...] -> [B, N, ...] -> [N, B, ...]
        return torch.view_as_complex(out.contiguous()) if cplx else out
