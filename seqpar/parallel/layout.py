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

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor

# The one list of layout names: seqpar.config imports it to validate parallel.layout.
LAYOUTS = ("zigzag", "striped", "contiguous")


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


def _rank_pieces(x3: Tensor, rank: int, world_size: int, layout: str) -> list[Tensor]:
    """Views into ``x3 [P, S, Q]`` (sequence in the middle) of the tokens ``rank`` holds, in local order.

    The one definition of every layout: :func:`shard_sequence` reads these views, :func:`gather_shards`
    writes into them and :func:`local_positions` applies them to ``arange(S)``, so the three agree by
    construction. Views only (no copy): a writer's ``copy_`` lands in ``x3``.
    """
    if layout == "contiguous":  # token l + r*L on rank r
        return [rearrange(x3, "p (n l) q -> n p l q", n=world_size)[rank]]
    if layout == "striped":  # token l*N + r on rank r
        return [rearrange(x3, "p (l n) q -> n p l q", n=world_size)[rank]]
    if layout != "zigzag":
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")
    # 2N chunks of C: chunk h*N + i sits at [h, i]; rank r keeps chunk r and its mirror 2N-1-r.
    chunks = rearrange(x3, "p (h n c) q -> h n p c q", h=2, n=world_size)  # [2, N, P, C, Q]
    return [chunks[0, rank], chunks[1, world_size - 1 - rank]]


def _seq_middle(x: Tensor, dim: int) -> Tensor:
    """``x [*pre, S, *post]`` as ``[prod(pre), S, prod(post)]`` (a view when ``x`` is contiguous), so the
    layout patterns name only the sequence axis whatever ``dim`` is."""
    return x.reshape(math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:]))


def local_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag",
                    device: Optional[torch.device] = None) -> Tensor:
    """Global positions of the tokens that ``rank`` holds, in local order.

    Returns a LongTensor ``[seq_len // world_size]``, strictly increasing. Raises ValueError when
    ``seq_len`` is not a multiple of :func:`required_multiple`.
    """
    check_divisible(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, {world_size}).")
    positions = torch.arange(seq_len, device=device)
    if world_size == 1:
        return positions
    return torch.cat(_rank_pieces(positions.view(1, seq_len, 1), rank, world_size, layout), dim=1).flatten()


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
    pieces = _rank_pieces(_seq_middle(x, dim), rank, world_size, layout)  # views [P, L or L/2, Q]
    local = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # [P, L, Q]
    # One copy at most (none for a contiguous block that already is contiguous), as narrow/cat did.
    return local.contiguous().view(*x.shape[:dim], s // world_size, *x.shape[dim + 1:])


def gather_shards(shards: Sequence[Tensor], dim: int, layout: str = "zigzag") -> Tensor:
    """Inverse of :func:`shard_sequence` given every rank's shard, in rank order (no process group).

    Args: ``shards[r]`` is rank ``r``'s shard, ``L`` entries along ``dim``. Returns the full tensor
    with ``N * L`` entries along ``dim``.
    """
    n = len(shards)
    dim = dim % shards[0].dim()
    if n == 1:
        return shards[0]
    shape = list(shards[0].shape)
    shape[dim] *= n
    full = shards[0].new_empty(shape)
    # Each rank's tokens go back through the same views shard_sequence reads them from: one copy.
    for rank, shard in enumerate(shards):
        parts = _seq_middle(shard, dim).chunk(2 if layout == "zigzag" else 1, dim=1)  # zigzag: 2 chunks
        for i, part in enumerate(parts):
            # A fresh view per copy: one taken before `full` joined the autograd graph (the first copy_
            # of a shard that requires grad) would count as a leaf and refuse the in-place write.
            _rank_pieces(_seq_middle(full, dim), rank, n, layout)[i].copy_(part)
    return full


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
