"""How a global sequence is split across the ranks of a context-parallel ring.

Three layouts, for a global length ``S`` over ``N`` ranks (``L = S / N`` tokens each):

* ``contiguous``: rank ``r`` holds tokens ``[r*L, (r+1)*L)``. Simple, but with a causal mask the last
  rank does ``2N - 1`` times the work of the first.
* ``zigzag``: the sequence is cut into ``2N`` chunks of ``C = S / 2N``; rank ``r`` holds chunks ``r``
  and ``2N-1-r`` (an early chunk and its mirror), so causal work is the same on every rank.
* ``striped``: token ``i`` lives on rank ``i mod N``; causal work is equal up to one diagonal.

Every layout keeps the local tokens in increasing global order, which lets the ring express the
causal mask between two ranks' blocks with local indices (see ``ring_attention.plan_step``).

The pure helpers (:func:`local_positions`, :func:`gather_shards`, and :func:`shard_sequence` with
explicit ``rank``/``world_size``) need no process group, so tests and a single-process trainer can
shard a whole batch; :func:`unshard_sequence` all-gathers over the group.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.config import LAYOUTS  # one list of layout names for config and library


def required_multiple(world_size: int, layout: str) -> int:
    """The global sequence length must be a multiple of this (``2N`` for zigzag, ``N`` otherwise;
    1 for a ring of one, where every layout is the identity)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")
    if world_size == 1:
        return 1
    return 2 * world_size if layout == "zigzag" else world_size


def check_divisible(seq_len: int, world_size: int, layout: str) -> None:
    """Raise ValueError naming the length, the layout and the needed multiple if ``seq_len`` cannot be split."""
    need = required_multiple(world_size, layout)
    if seq_len % need != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {need}: layout={layout} over {world_size} ranks "
            f"needs a multiple of {need}; pad or crop to {need * max(1, seq_len // need)}.")


def local_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag",
                    device: Optional[torch.device] = None) -> Tensor:
    """Global positions of the tokens that ``rank`` holds, in local order.

    Returns a LongTensor ``[seq_len // world_size]``, strictly increasing. Raises ValueError when
    ``seq_len`` is not a multiple of :func:`required_multiple`.
    """
    check_divisible(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, {world_size}).")
    local = seq_len // world_size
    if layout == "contiguous" or world_size == 1:
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    if layout == "striped":
        return torch.arange(rank, seq_len, world_size, device=device)
    chunk = seq_len // (2 * world_size)  # zigzag
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    mirror = 2 * world_size - 1 - rank
    return torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)])


def _group_coords(group, rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError("pass both rank and world_size (pure sharding) or neither (use the process group).")
    if not dist.is_available() or not dist.is_initialized():
        if group is None:
            return 0, 1  # a single process is a ring of one
        raise ValueError("a process group was given but torch.distributed is not initialised.")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: Tensor, dim: int, group=None, layout: str = "zigzag", rank: Optional[int] = None,
                   world_size: Optional[int] = None) -> Tensor:
    """This rank's shard of a full-sequence tensor (tokens, labels, positions, q/k/v alike).

    Args: ``x`` with the global sequence along ``dim`` (e.g. tokens ``[B, S]`` with ``dim=1``);
    ``group`` the cp process group (``None``: the default group, or a ring of one if
    torch.distributed is not initialised); ``rank``/``world_size`` to shard without any group.
    Returns ``x`` restricted to :func:`local_positions` along ``dim`` (``S / N`` entries), contiguous.
    Raises ValueError if the length is not a multiple of what the layout needs.
    """
    rank, world_size = _group_coords(group, rank, world_size)
    dim = dim % x.dim()
    s = x.shape[dim]
    check_divisible(s, world_size, layout)
    if world_size == 1:
        return x
    local = s // world_size
    if layout == "contiguous":
        return x.narrow(dim, rank * local, local).contiguous()
    if layout == "striped":
        # [.., S, ..] -> [.., S/N, N, ..]: token i = a*N + r sits at (a, r).
        return x.unflatten(dim, (local, world_size)).select(dim + 1, rank).contiguous()
    chunk = local // 2
    mirror = 2 * world_size - 1 - rank
    return torch.cat([x.narrow(dim, rank * chunk, chunk), x.narrow(dim, mirror * chunk, chunk)], dim=dim)


def gather_shards(shards: Sequence[Tensor], dim: int, layout: str = "zigzag") -> Tensor:
    """Inverse of :func:`shard_sequence` given every rank's shard, in rank order (no process group).

    Args: ``shards[r]`` is rank ``r``'s shard, ``L`` entries along ``dim``. Returns the full tensor
    with ``N * L`` entries along ``dim``.
    """
    n = len(shards)
    dim = dim % shards[0].dim()
    if n == 1:
        return shards[0]
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    if layout == "striped":
        return torch.stack(list(shards), dim=dim + 1).flatten(dim, dim + 1)  # (a, r) -> a*N + r
    if layout != "zigzag":
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")
    chunk = shards[0].shape[dim] // 2
    firsts = [s.narrow(dim, 0, chunk) for s in shards]  # chunks 0 .. N-1
    mirrors = [s.narrow(dim, chunk, chunk) for s in reversed(shards)]  # chunks N .. 2N-1
    return torch.cat(firsts + mirrors, dim=dim)


def unshard_sequence(x_local: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """Full-sequence tensor from every rank's shard: all-gathers over ``group`` then reorders.

    Args: ``x_local`` this rank's shard (same shape on every rank), sequence along ``dim``.
    Returns the global tensor (``N * L`` along ``dim``) on every rank. Not differentiable
    (for logging, evaluation and tests).
    """
    _, world_size = _group_coords(group, None, None)
    if world_size == 1:
        return x_local
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(parts, x_local, group=group)
    return gather_shards(parts, dim, layout)
