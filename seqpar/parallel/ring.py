"""Ring communication: pass tensors to the next rank, receive from the previous one. No math here.

One :class:`RingComm` per stream of blocks (K/V in the forward; K/V and their dK/dV accumulators in
the backward). ``send_recv`` posts the sends and receives at once with ``dist.batch_isend_irecv``
and returns immediately, so the caller computes on the block it holds while the next one is in
flight; ``wait`` hands back the received tensors.

Receive buffers are double-buffered: transfer ``i`` receives into set ``i % 2``. A received set is
what the caller computes on during transfer ``i + 1`` (which receives into the other set), and is
only overwritten by transfer ``i + 2``, after ``wait`` on transfer ``i + 1`` has also completed
the send of it. So no buffer is written while it is read, without copies, and without any
``torch.cuda.synchronize()``: on NCCL, ``Work.wait()`` makes the current stream wait on the
communication stream, it does not block the host.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor

# NCCL groups that have run a collective in this process. torch documents ``batch_isend_irecv`` as undefined
# when it is a group's FIRST collective and some rank posts no op, which trimmed ring hops can do (a rank
# whose neighbour needs none of its rows): the first ring transfer on an NCCL group is preceded by one barrier.
_WARM: "weakref.WeakSet" = weakref.WeakSet()


class RingHandle:
    """An in-flight ring transfer; :meth:`wait` returns the received tensors (same shapes as sent)."""

    def __init__(self, comm: "RingComm", works: list, received: list[Tensor]):
        self._comm, self._works, self._received = comm, works, received

    def wait(self) -> list[Tensor]:
        for w in self._works:
            w.wait()
        self._works = []
        self._comm._pending = None
        return self._received


class RingComm:
    """Double-buffered send to rank+1 / receive from rank-1 within ``group`` (ranks are group ranks).

    Args: ``group``: the process group of the ring (``None``: the default group). Peers are mapped to
    global ranks with ``dist.get_global_rank`` because P2P ops address global ranks.
    A ring of one (or torch.distributed not initialised) short-circuits: ``send_recv`` returns the
    tensors themselves (gloo cannot send to itself, and there is nothing to exchange).
    """

    def __init__(self, group=None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        else:
            self.world_size, self.rank = 1, 0
        if self.world_size > 1:
            self._g = group if group is not None else dist.group.WORLD
            self.next_peer, self.prev_peer = self._peers(1)
        self._buffers: list[Optional[list[Tensor]]] = [None, None]
        self._count = 0
        self._pending: Optional[RingHandle] = None

    def _recv_buffers(self, tensors: Sequence[Tensor], rows: Optional[int]) -> list[Tensor]:
        slot = self._count % 2
        bufs = self._buffers[slot]
        shapes = [t.shape if rows is None else (t.shape[0], rows, *t.shape[2:]) for t in tensors]
        fits = bufs is not None and len(bufs) == len(tensors) and all(
            b.shape == s and b.dtype == t.dtype and b.device == t.device for b, t, s in zip(bufs, tensors, shapes))
        if not fits:
            bufs = [t.new_empty(s) for t, s in zip(tensors, shapes)]
            self._buffers[slot] = bufs
        return bufs

    def _peers(self, shift: int) -> tuple[int, int]:
        """Global ranks of group rank ``rank + shift`` (send to) and ``rank - shift`` (receive from)."""
        n = self.world_size
        return (dist.get_global_rank(self._g, (self.rank + shift) % n),
                dist.get_global_rank(self._g, (self.rank - shift) % n))

    def send_recv(self, tensors: Sequence[Tensor], shift: int = 1, recv_rows: Optional[int] = None) -> RingHandle:
        """Send ``tensors`` (contiguous) to the next rank and receive the previous rank's into buffers.

        ``shift``: send to rank ``+shift`` and receive from rank ``-shift`` instead (every rank the same
        shift, so it stays a permutation; a ring truncated after ``s`` steps sends its dK/dV home with
        ``shift=-s`` in one hop). A shift of 0 (mod N) exchanges nothing and returns ``tensors``.
        Every rank of the ring must call this with the same shapes and dtypes, except ``recv_rows``: the
        received tensors have that size in dim 1 (what the sender sends; None: the sent shapes). A tensor
        of zero elements is not sent, nor received (both sides know the sizes). The previous handle
        must have been waited on first (its buffers are about to be reused).
        """
        if self._pending is not None:
            raise RuntimeError("RingComm.send_recv called before wait() on the previous transfer.")
        if self.world_size == 1 or shift % self.world_size == 0:
            handle = RingHandle(self, [], list(tensors))
        else:
            recv = self._recv_buffers(tensors, recv_rows)
            send_to, recv_from = (self.next_peer, self.prev_peer) if shift == 1 else self._peers(shift)
            self._warm_up()
            ops = []
            for i, (t, r) in enumerate(zip(tensors, recv)):
                if not t.is_contiguous():
                    raise ValueError(f"RingComm sends contiguous tensors only; tensor {i} of shape "
                                     f"{tuple(t.shape)} has strides {t.stride()}.")
                # Tags keep gloo's per-peer matching unambiguous; NCCL ignores them and keeps order.
                if t.numel():
                    ops.append(dist.P2POp(dist.isend, t, send_to, self.group, tag=i))
                if r.numel():
                    ops.append(dist.P2POp(dist.irecv, r, recv_from, self.group, tag=i))
            handle = RingHandle(self, dist.batch_isend_irecv(ops) if ops else [], recv)
        self._count += 1
        self._pending = handle
        return handle

    def _warm_up(self) -> None:
        """One barrier before the first transfer on an NCCL group (see ``_WARM``); every rank calls send_recv
        at the same points, so the barrier matches."""
        if self._g in _WARM or "nccl" not in str(dist.get_backend(self._g)):
            return
        dist.barrier(group=self._g)
        _WARM.add(self._g)

    def wait(self) -> list[Tensor]:
        """Wait for the transfer in flight and return the received tensors."""
        if self._pending is None:
            raise RuntimeError("RingComm.wait called with no transfer in flight.")
        return self._pending.wait()
