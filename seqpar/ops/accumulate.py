"""Running accumulators of a blockwise attention over key blocks (the ring's per-step math, no comms).

A query shard ``[B, L, H, D]`` receives partial results on row windows ``[start, start + Sb)``: partial
``(out, lse)`` pairs in the forward (:class:`RunningAttention`, merged by log-sum-exp), partial gradients in
the backward (:class:`RunningSum`). Each update is ONE elementwise pass (:func:`~seqpar.ops.merge.merge_rows`
/ :func:`~seqpar.ops.merge.add_rows`: the fused Triton kernel on CUDA, the torch reference elsewhere) that
reads the running value and the partial once, in their own dtypes, and writes once:

* the first partial over all rows is kept as the kernel returned it (a bf16 value is exact in fp32, so
  casting it first would only cost a pass);
* later updates accumulate in fp32 (fp64 for fp64);
* an accumulator owns the partials it is given (it may keep one and update it in place): pass a kernel's
  fresh output, never a tensor used elsewhere;
* the caller marks the last update (``final=True``): it writes the final dtype directly, so no separate
  cast pass follows. Rounding is the same as accumulating in fp32 and casting at the end.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.merge import add_rows, merge_rows


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class RunningAttention:
    """The running ``(out [B, L, H, D], lse [B, H, L])`` of one query shard over blocks of keys.

    Args: ``shape`` ``[B, L, H, D]``; ``dtype`` of the final out (lse stays fp32, fp64 for fp64);
    ``device``; ``impl`` ``"torch"`` or ``"triton"`` (see :func:`~seqpar.ops.merge.merge_impl`).
    """

    def __init__(self, shape: tuple, dtype: torch.dtype, device, impl: str = "torch"):
        self.shape, self.dtype, self.acc, self.device, self.impl = tuple(shape), dtype, _acc(dtype), device, impl
        self.out: Optional[Tensor] = None
        self.lse: Optional[Tensor] = None

    @property
    def started(self) -> bool:
        return self.out is not None

    def _empty(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        b, L, h, _ = self.shape
        return (torch.zeros(self.shape, dtype=dtype, device=self.device),
                torch.full((b, h, L), float("-inf"), dtype=self.acc, device=self.device))

    def add(self, out_b: Tensor, lse_b: Tensor, start: int, final: bool = False) -> None:
        """Merge a partial ``(out_b [B, Sb, H, D], lse_b [B, H, Sb])`` of rows ``[start, start + Sb)``;
        ``final``: no update follows (the merge writes the final dtype where it can)."""
        all_rows = start == 0 and out_b.shape[1] == self.shape[1]
        if self.out is None and all_rows:
            self.out, self.lse = out_b, lse_b.to(self.acc).contiguous()  # owned: updated in place later
            return
        # The final dtype only where every row ends final: the merge covers them all, or the rows it does
        # not cover hold one partial as the kernel returned it (the running out is still in that dtype).
        narrow = final and (all_rows or self.out is None or self.out.dtype == self.dtype)
        dtype = self.dtype if narrow else self.acc
        if self.out is None:
            self.out, self.lse = self._empty(dtype)
        dst = self.out if self.out.dtype == dtype else torch.empty(self.shape, dtype=dtype, device=self.device)
        self.out, self.lse = merge_rows(self.out, self.lse, out_b, lse_b.to(self.acc), start, dst, self.impl)

    def buffers(self) -> tuple[Tensor, Tensor]:
        """The running pair as fp32 buffers a kernel can merge into in place (``out_acc``/``lse_acc``)."""
        if self.out is None:
            self.out, self.lse = self._empty(self.acc)
        elif self.out.dtype != self.acc:
            self.out = self.out.to(self.acc)
        return self.out, self.lse

    def result(self) -> tuple[Tensor, Tensor]:
        """``(out [B, L, H, D]`` in the final dtype, ``lse [B, H, L])``; rows no key reached: (0, -inf)."""
        if self.out is None:
            self.out, self.lse = self._empty(self.dtype)
        return self.out.to(self.dtype), self.lse


class RunningSum:
    """A sum over row windows of a ``[B, L, H, D]`` tensor (gradients of a shard), zeros where nothing
    was added. Args as :class:`RunningAttention`; ``dtype`` is the final dtype."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device, impl: str = "torch"):
        self.shape, self.dtype, self.acc, self.device, self.impl = tuple(shape), dtype, _acc(dtype), device, impl
        self.t: Optional[Tensor] = None  # rows [start, start + t.shape[1]) of the sum; zeros elsewhere
        self.start = 0

    def _full(self) -> bool:
        return self.t is not None and self.start == 0 and self.t.shape[1] == self.shape[1]

    def _new(self, dtype: torch.dtype) -> Tensor:
        return torch.empty(self.shape, dtype=dtype, device=self.device)

    def add(self, b: Tensor, start: int, final: bool = False) -> None:
        """Add ``b [B, Sb, H, D]`` to rows ``[start, start + Sb)``; ``final`` as in :meth:`RunningAttention.add`."""
        if self.t is None:
            self.t, self.start = b, start  # kept as given until a second partial comes
            return
        if not self._full():
            self.t, self.start = add_rows(None, self.t, self.start, self._new(self.acc), self.impl), 0
        all_rows = start == 0 and b.shape[1] == self.shape[1]
        dtype = self.dtype if final and (all_rows or self.t.dtype == self.dtype) else self.acc
        dst = self.t if self.t.dtype == dtype else self._new(dtype)
        self.t = add_rows(self.t, b, start, dst, self.impl)

    def buffer(self) -> Tensor:
        """The sum as a full fp32 buffer a kernel can add into in place (``dq_acc``/``dk_acc``/``dv_acc``)."""
        if self.t is None:
            self.t = torch.zeros(self.shape, dtype=self.acc, device=self.device)
        elif not self._full() or self.t.dtype != self.acc:
            self.t = add_rows(None, self.t, self.start, self._new(self.acc), self.impl) if not self._full() \
                else self.t.to(self.acc)
        self.start = 0
        return self.t

    def added_to(self, a: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
        """``a + sum`` over all rows (``a`` ``[B, L, H, D]`` or None) in ``dtype``; ``None``: the sum's own
        dtype when one partial covers every row and ``a`` is None (no pass at all), else fp32. One pass;
        ``a`` is overwritten when it already has that dtype."""
        if dtype is None:
            dtype = self.t.dtype if (a is None and self._full()) else self.acc
        if self.t is None:
            return torch.zeros(self.shape, dtype=dtype, device=self.device) if a is None else a.to(dtype)
        if a is None:
            if self._full():
                return self.t.to(dtype)
            return add_rows(None, self.t, self.start, self._new(dtype), self.impl)
        dst = a if a.dtype == dtype else self._new(dtype)
        return add_rows(a, self.t, self.start, dst, self.impl)

    def result(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The sum over all rows in ``dtype`` (default: the final dtype)."""
        return self.added_to(None, dtype or self.dtype)
