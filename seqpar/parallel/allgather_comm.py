"""The all-gather mode's communication: asynchronous all-gather of one K/V head slice and reduce-scatter of its
dK/dV, so the next slice's transfer runs while the current slice computes. No math, only data movement.

K and V of a slice travel together (one collective each way, ``[2, B, L, h, D]`` per rank), as
:class:`~seqpar.parallel.ring.RingComm` sends them. Each call returns a :class:`Pending` at once; its
``wait()`` blocks (gloo) or orders the current CUDA stream after the transfer (NCCL) and returns the result.
Every rank must issue the same calls in the same order (they are collectives of ``group``).
``group=None`` with torch.distributed uninitialised is a group of one: nothing moves.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from einops import rearrange
from torch import Tensor

from seqpar.parallel.collectives import all_gather_single, group_size, reduce_scatter_single


class Pending:
    """A collective in flight: ``wait()`` (once) returns its result when the transfer is complete. Holds the
    send buffer until then so it outlives the transfer, and lets go of both buffers after, so a gathered
    slice lives only as long as its caller keeps the result."""

    def __init__(self, work, send: Tensor, recv: Tensor, finish: Callable[[Tensor], Tensor]):
        self._work: Optional[object] = work
        self._send: Optional[Tensor] = send
        self._recv: Optional[Tensor] = recv
        self._finish = finish

    def wait(self) -> Tensor:
        if self._recv is None:
            raise RuntimeError("Pending.wait() called twice: the result was already handed out.")
        if self._work is not None:
            self._work.wait()
        recv, self._work, self._send, self._recv = self._recv, None, None, None
        return self._finish(recv)


class KVSliceComm:
    """Asynchronous K/V slice collectives over ``group`` (the cp group)."""

    def __init__(self, group):
        self.group, self.n = group, group_size(group)

    def all_gather(self, k: Tensor, v: Tensor) -> Pending:
        """``k, v [B, L, h, D]`` (this rank's tokens, one head slice) -> Pending of ``[2, B, N*L, h, D]``: K then
        V of every rank's tokens in rank order (rank ``r``'s local tokens at ``r*L ..``)."""
        send = torch.stack([k, v])  # [2, B, L, h, D] contiguous (a head slice is strided)
        if self.n == 1:
            return Pending(None, send, send, lambda t: t)
        recv = send.new_empty((self.n * 2, *send.shape[1:]))  # rank r's [2, B, L, h, D] at rows 2r, 2r+1
        work = all_gather_single()(recv, send, group=self.group, async_op=True)
        return Pending(work, send, recv, lambda t: rearrange(t, "(n t) b l h d -> t b (n l) h d", n=self.n))

    def reduce_scatter(self, dkv: Tensor) -> Pending:
        """``dkv [2, B, N*L, h, D]`` (this rank's dK, dV for every rank's tokens, rank order) -> Pending of
        ``[2, B, L, h, D]``: every rank's contribution to THIS rank's tokens, summed (in ``dkv``'s dtype)."""
        if self.n == 1:
            return Pending(None, dkv, dkv, lambda t: t)
        send = rearrange(dkv, "t b (n l) h d -> (n t) b l h d", n=self.n).contiguous()  # rank j's tokens -> j
        recv = send.new_empty((2, *send.shape[1:]))
        work = reduce_scatter_single()(recv, send, group=self.group, async_op=True)
        return Pending(work, send, recv, lambda t: t)
