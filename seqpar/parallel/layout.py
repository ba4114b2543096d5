"""How a global sequence is split across the ranks of a context-parallel ring.

Four layouts, for a global length ``S`` over ``N`` ranks (``L = S / N`` tokens each):

* ``contiguous``: rank ``r`` holds tokens ``[r*L, (r+1)*L)``. Simple, but with a causal mask the last
  rank does ``2N - 1`` times the work of the first.
* ``zigzag``: the sequence is cut into ``2N`` chunks of ``C = S / 2N``; rank ``r`` holds chunks ``r``
  and ``2N-1-r`` (an early chunk and its mirror), so causal work is the same on every rank.
* ``striped``: token ``i`` lives on rank ``i mod N``; causal work is equal up to one diagonal.
* ``docs``: for packed documents under a document mask. The sequence is cut into ``G = 4N`` chunks;
  each chunk costs the visible (query, key) pairs of its queries under the causal document mask
  (``sum`` over its tokens of the position inside the token's document, plus one, over the batch
  rows), and the chunks go to ranks by longest-processing-time first (largest cost to the least
  loaded rank that still has room; ties to the lower index), ``G / N`` chunks each. It depends only
  on the GLOBAL ``doc_ids [B, S]`` that every rank holds, so every rank computes the same assignment
  with no communication; one document filling the row gives zigzag's pairing (largest + smallest).
  Every function below takes ``doc_ids=`` for it.

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
LAYOUTS = ("zigzag", "striped", "contiguous", "docs")
DOCS_CHUNKS_PER_RANK = 4  # docs layout: G = 4N chunks (finer balances better, costs more kernel calls)


def required_multiple(world_size: int, layout: str) -> int:
    """The global sequence length must be a multiple of this (``2N`` for zigzag, ``N`` otherwise;
    1 for a ring of one, where every layout is the identity)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")
    if world_size == 1:
        return 1
    return {"zigzag": 2, "docs": DOCS_CHUNKS_PER_RANK}.get(layout, 1) * world_size


def check_divisible(seq_len: int, world_size: int, layout: str) -> None:
    """Raise ValueError naming the length, the layout and the needed multiple if ``seq_len`` cannot be split."""
    need = required_multiple(world_size, layout)
    if seq_len % need != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {need}: layout={layout} over {world_size} ranks "
            f"needs a multiple of {need}; pad or crop to {need * max(1, seq_len // need)}.")


def chunk_costs(doc_ids: Tensor, num_chunks: int) -> Tensor:
    """``[num_chunks]`` int64: visible (query, key) pairs of each equal chunk's queries under the causal
    document mask, summed over the rows of ``doc_ids [B, S]`` (query ``i`` sees ``i - start(doc(i)) + 1``)."""
    ids = doc_ids.detach().to("cpu", torch.int64).contiguous()  # [B, S]
    start = torch.searchsorted(ids, ids, side="left")  # [B, S] first index of each token's document
    per_token = torch.arange(ids.shape[1])[None] - start + 1  # [B, S]
    return rearrange(per_token, "b (g c) -> g (b c)", g=num_chunks).sum(1)


def docs_assignment(doc_ids: Tensor, world_size: int) -> list[list[int]]:
    """The ``docs`` layout: ``[rank][k]`` chunk indices (ascending) of ``G = DOCS_CHUNKS_PER_RANK * N``
    equal chunks, assigned longest-processing-time first by :func:`chunk_costs` (deterministic, so
    identical on every rank that holds the same ``doc_ids``). Raises ValueError without 2-D ids."""
    if not isinstance(doc_ids, Tensor) or doc_ids.dim() != 2:
        raise ValueError("layout='docs' needs doc_ids: the GLOBAL [batch, seq] document ids (every rank holds "
                         f"all of them); got {type(doc_ids).__name__} {list(getattr(doc_ids, 'shape', []))}.")
    g, per = DOCS_CHUNKS_PER_RANK * world_size, DOCS_CHUNKS_PER_RANK
    check_divisible(doc_ids.shape[1], world_size, "docs")
    costs = chunk_costs(doc_ids, g).tolist()
    load, owned = [0] * world_size, [[] for _ in range(world_size)]
    for c in sorted(range(g), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world_size) if len(owned[r]) < per), key=lambda r: (load[r], r))
        load[r] += costs[c]
        owned[r].append(c)
    return [sorted(o) for o in owned]


def rank_pieces(seq_len: int, rank: int, world_size: int, layout: str,
                doc_ids: Optional[Tensor] = None) -> list[tuple[int, int, int]]:
    """The tokens ``rank`` holds as pieces ``(global_start, length, stride)`` in local order: local
    index ``l0 + a`` of a piece (``l0`` = lengths of the pieces before it) is global position
    ``global_start + stride * a``. What the ring plans kernel calls with (one call per piece pair)."""
    check_divisible(seq_len, world_size, layout)
    n, L = world_size, seq_len // world_size
    if n == 1:
        return [(0, seq_len, 1)]
    if layout == "contiguous":
        return [(rank * L, L, 1)]
    if layout == "striped":
        return [(rank, L, n)]
    if layout == "zigzag":
        c = L // 2
        return [(rank * c, c, 1), ((2 * n - 1 - rank) * c, c, 1)]
    if layout == "docs":
        c = L // DOCS_CHUNKS_PER_RANK
        return [(i * c, c, 1) for i in docs_assignment(doc_ids, n)[rank]]
    raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")


def _rank_pieces(x3: Tensor, rank: int, world_size: int, layout: str, doc_ids: Optional[Tensor] = None) -> list[Tensor]:
    """Views into ``x3 [P, S, Q]`` (sequence in the middle) of the tokens ``rank`` holds, in local order.

    The one definition of every layout: :func:`shard_sequence` reads these views, :func:`gather_shards`
    writes into them and :func:`local_positions` applies them to ``arange(S)``, so the three agree by
    construction. Views only (no copy): a writer's ``copy_`` lands in ``x3``.
    """
    if layout == "contiguous":  # token l + r*L on rank r
        return [rearrange(x3, "p (n l) q -> n p l q", n=world_size)[rank]]
    if layout == "striped":  # token l*N + r on rank r
        return [rearrange(x3, "p (l n) q -> n p l q", n=world_size)[rank]]
    if layout == "docs":  # G equal chunks, this rank's in ascending order
        chunks = rearrange(x3, "p (g c) q -> g p c q", g=DOCS_CHUNKS_PER_RANK * world_size)  # [G, P, C, Q]
        return [chunks[i] for i in docs_assignment(doc_ids, world_size)[rank]]
    if layout != "zigzag":
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")
    # 2N chunks of C: chunk h*N + i sits at [h, i]; rank r keeps chunk r and its mirror 2N-1-r.
    chunks = rearrange(x3, "p (h n c) q -> h n p c q", h=2, n=world_size)  # [2, N, P, C, Q]
    return [chunks[0, rank], chunks[1, world_size - 1 - rank]]


def _seq_middle(x: Tensor, dim: int) -> Tensor:
    """``x [*pre, S, *post]`` as ``[prod(pre), S, prod(post)]`` (a view when ``x`` is contiguous), so the
    layout patterns name only the sequence axis whatever ``dim`` is."""
    return x.reshape(math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:]))


def _check_docs(layout: str, doc_ids: Optional[Tensor], seq_len: int) -> None:
    if layout == "docs" and (not isinstance(doc_ids, Tensor) or doc_ids.dim() != 2 or doc_ids.shape[1] != seq_len):
        raise ValueError(f"layout='docs' needs doc_ids=[batch, {seq_len}] (the GLOBAL document ids of the rows being "
                         f"sharded); got {list(getattr(doc_ids, 'shape', [])) if doc_ids is not None else None}.")


def local_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag",
                    device: Optional[torch.device] = None, doc_ids: Optional[Tensor] = None) -> Tensor:
    """Global positions of the tokens that ``rank`` holds, in local order.

    Returns a LongTensor ``[seq_len // world_size]``, strictly increasing. Raises ValueError when
    ``seq_len`` is not a multiple of :func:`required_multiple`, the rank is outside the group, or
    ``layout="docs"`` comes without ``doc_ids [B, seq_len]``.
    """
    check_divisible(seq_len, world_size, layout)
    _check_rank(rank, world_size)
    _check_docs(layout, doc_ids, seq_len)
    positions = torch.arange(seq_len, device=device)
    if world_size == 1:
        return positions
    pieces = _rank_pieces(positions.view(1, seq_len, 1), rank, world_size, layout, doc_ids)
    return torch.cat(pieces, dim=1).flatten()


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size}): pass a rank of the cp group "
                         "(0 .. world_size - 1).")


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
                   world_size: Optional[int] = None, doc_ids: Optional[Tensor] = None) -> Tensor:
    """This rank's shard of a full-sequence tensor (tokens, labels, positions, q/k/v alike).

    Args: ``x`` with the global sequence along ``dim`` (e.g. tokens ``[B, S]`` with ``dim=1``);
    ``group`` the cp process group (``None``: the default group, or a ring of one if
    torch.distributed is not initialised); ``rank``/``world_size`` to shard without any group.
    ``doc_ids [B, S]``: the global document ids, needed by ``layout="docs"`` (ignored otherwise).
    Returns ``x`` restricted to :func:`local_positions` along ``dim`` (``S / N`` entries), contiguous.
    Raises ValueError if the length is not a multiple of what the layout needs, ``rank`` is not in
    ``[0, world_size)``, or ``layout="docs"`` comes without matching ``doc_ids``.
    """
    rank, world_size = _group_coords(group, rank, world_size)
    _check_rank(rank, world_size)
    dim = dim % x.dim()
    s = x.shape[dim]
    check_divisible(s, world_size, layout)
    _check_docs(layout, doc_ids, s)
    if world_size == 1:
        return x
    pieces = _rank_pieces(_seq_middle(x, dim), rank, world_size, layout, doc_ids)  # views [P, L / pieces, Q]
    local = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # [P, L, Q]
    # One copy at most (none for a contiguous block that already is contiguous), as narrow/cat did.
    return local.contiguous().view(*x.shape[:dim], s // world_size, *x.shape[dim + 1:])


def gather_shards(shards: Sequence[Tensor], dim: int, layout: str = "zigzag", doc_ids: Optional[Tensor] = None) -> Tensor:
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
    _check_docs(layout, doc_ids, shape[dim])
    full = shards[0].new_empty(shape)
    n_pieces = {"zigzag": 2, "docs": DOCS_CHUNKS_PER_RANK}.get(layout, 1)
    # Each rank's tokens go back through the same views shard_sequence reads them from: one copy.
    for rank, shard in enumerate(shards):
        parts = _seq_middle(shard, dim).chunk(n_pieces, dim=1)  # equal pieces in local order
        for i, part in enumerate(parts):
            # A fresh view per copy: one taken before `full` joined the autograd graph (the first copy_
            # of a shard that requires grad) would count as a leaf and refuse the in-place write.
            _rank_pieces(_seq_middle(full, dim), rank, n, layout, doc_ids)[i].copy_(part)
    return full


def unshard_sequence(x_local: Tensor, dim: int, group=None, layout: str = "zigzag",
                     doc_ids: Optional[Tensor] = None) -> Tensor:
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
    return gather_shards(parts, dim, layout, doc_ids)
