"""The Ulysses mode's communication by head chunks: asynchronous all-to-alls of one chunk of every rank's heads,
so one chunk's transfer runs while another chunk computes. No math, only data movement.

Heads of a sequence shard ``x [B, L, H, D]`` are numbered ``r * (H/N) + c * h + j``: rank ``r`` of ``N`` owns
the ``H/N`` heads ``r * (H/N) ..`` after the all-to-all (as :func:`seqpar.parallel.collectives.seq_to_head`),
cut into ``C`` chunks of ``h = H / (N C)`` heads. :meth:`HeadChunkComm.to_head` moves chunk ``c`` of several
tensors in ONE collective (each tensor's blocks packed side by side) and returns, per tensor, ``[B, N*L, h, D]``
(every rank's tokens in rank order); :meth:`HeadChunkComm.to_seq` is its inverse. Each call returns a
:class:`~seqpar.parallel.allgather_comm.Pending` at once; ``wait()`` blocks (gloo) or orders the current CUDA
stream after the transfer (NCCL). Every rank must issue the same calls in the same order.
``group=None`` with torch.distributed uninitialised is a group of one: nothing moves.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.parallel.allgather_comm import Pending
from seqpar.parallel.collectives import group_size


def _pack(blocks: Sequence[Tensor]) -> Tensor:
    """``[N, ...]`` tensors -> one contiguous ``[N, total]`` (block ``j`` of each, side by side)."""
    n = blocks[0].shape[0]
    return torch.cat([b.reshape(n, -1) for b in blocks], dim=1)


def _unpack(flat: Tensor, shapes: Sequence[torch.Size]) -> list:
    """Inverse of :func:`_pack` for blocks of ``shapes`` (each ``[N, ...]``)."""
    out, at = [], 0
    for s in shapes:
        size = s[1:].numel()
        out.append(flat[:, at:at + size].reshape(s))
        at += size
    return out


class HeadChunkComm:
    """Asynchronous head-chunk all-to-alls over ``group`` (the Ulysses group), ``chunks`` chunks per rank."""

    def __init__(self, group, chunks: int):
        self.group, self.n, self.chunks = group, group_size(group), chunks

    def _start(self, send: Tensor, finish) -> Pending:
        if self.n == 1:
            return Pending(None, send, send, finish)
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        return Pending(work, send, recv, finish)

    def to_head(self, xs: Sequence[Tensor], c: int) -> Pending:
        """Chunk ``c`` of each ``x [B, L, H_x, D_x]`` (this rank's tokens) -> Pending of a list of
        ``[B, N*L, H_x / (N C), D_x]``: every rank's tokens (rank order) for this rank's heads of chunk ``c``."""
        n, chunks = self.n, self.chunks
        # [B, L, N, C, h, D] -> chunk c -> [N, B, L, h, D]: block j (heads of rank j) goes to rank j
        blocks = [x.unflatten(2, (n, chunks, -1))[:, :, :, c].permute(2, 0, 1, 3, 4) for x in xs]
        shapes = [b.shape for b in blocks]

        def finish(flat: Tensor) -> list:  # block i: rank i's tokens -> [B, N*L, h, D]
            return [b.permute(1, 0, 2, 3, 4).flatten(1, 2) for b in _unpack(flat, shapes)]

        return self._start(_pack(blocks), finish)

    def to_seq(self, xs: Sequence[Tensor]) -> Pending:
        """Inverse of :meth:`to_head` for one chunk: each ``[B, N*L, h, D]`` (rank order) -> Pending of a list of
        ``[B, L, N, h, D]``: this rank's tokens, the chunk's heads of every rank (rank ``j``'s at index ``j``);
        the caller writes them into ``[B, L, N, C, h, D]`` at chunk ``c``."""
        n = self.n
        blocks = [x.unflatten(1, (n, -1)).permute(1, 0, 2, 3, 4) for x in xs]  # [N, B, L, h, D]: rank j's tokens
        shapes = [b.shape for b in blocks]

        def finish(flat: Tensor) -> list:  # block i: heads of rank i for my tokens -> [B, L, N, h, D]
            return [b.permute(1, 2, 0, 3, 4) for b in _unpack(flat, shapes)]

        return self._start(_pack(blocks), finish)
