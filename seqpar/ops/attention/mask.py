"""Attention masks as values: the global ``Mask`` a user states, and the ``LocalMask`` one kernel call sees.

``Mask`` is defined on GLOBAL token indices (the contract later work builds on). For query ``i`` and
key ``j`` of the same batch row, ``j`` is visible iff all of these hold:

* documents (``doc_ids`` given): ``doc_ids[b, i] == doc_ids[b, j]``;
* ``causal``: ``j <= i``;
* ``window`` set: ``i - j <= window`` (and ``j - i <= window`` when not causal), OR ``j`` is among the
  first ``sinks`` tokens of its document (of the sequence without ``doc_ids``);
* ``block_sparse=(b, visible)``: ``visible[i // b, j // b]``.

A row that sees no key gets out 0 and lse -inf. Sinks only widen a window, so without a window they
change nothing and ``kinds`` leaves them out.

A kernel call covers queries ``[q_offset, q_offset + Sq)`` and keys ``[k_offset, k_offset + Sk)``:
:meth:`Mask.local` restricts the mask to them as a :class:`LocalMask`, the one value every backend's
forward/backward takes (doc ids sliced, sink flags per key; positions stay global through the offsets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Every mask kind a backend may declare. "window" is a left window (keys at most W to the left; with
# causal that is the whole window); "two_sided_window" also limits keys to the right (non-causal Mask).
MASK_KINDS = frozenset({"causal", "window", "two_sided_window", "documents", "sinks", "block_sparse"})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, eq=False)
class LocalMask:
    """The mask of one kernel call, on global positions ``q_offset + i`` / ``k_offset + j``.

    ``window_left``/``window_right``: keys at most that far left/right of the query (None: unlimited);
    ``q_doc_ids [B, Sq]`` / ``k_doc_ids [B, Sk]``: the GLOBAL document ids of these rows/keys;
    ``k_sink [B or 1, Sk]`` bool: key is a sink (visible through any window); ``block_sparse``:
    ``(block_size, visible [S/b, S/b])`` indexed by global positions.
    """

    causal: bool = False
    q_offset: int = 0
    k_offset: int = 0
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    q_doc_ids: Optional[Tensor] = None  # [B, Sq]
    k_doc_ids: Optional[Tensor] = None  # [B, Sk]
    k_sink: Optional[Tensor] = None  # [B or 1, Sk] bool
    block_sparse: Optional[tuple] = None  # (block_size, visible [S/b, S/b] bool)

    def __post_init__(self):
        if self.window_left is not None and (not _is_int(self.window_left) or self.window_left < 0):
            raise ValueError(f"window_left must be an int >= 0 (or None); got {self.window_left!r}.")
        if (self.q_doc_ids is None) != (self.k_doc_ids is None):
            raise ValueError("q_doc_ids and k_doc_ids must be given together (or neither).")

    @property
    def kinds(self) -> frozenset:
        """The mask kinds this call needs (empty: full attention); backends declare what they support."""
        kinds = set()
        if self.causal:
            kinds.add("causal")
        if self.window_left is not None:
            kinds.add("window")
        if self.window_right is not None:
            kinds.add("two_sided_window")
        if self.q_doc_ids is not None:
            kinds.add("documents")
        if self.k_sink is not None:
            kinds.add("sinks")
        if self.block_sparse is not None:
            kinds.add("block_sparse")
        return frozenset(kinds)


@dataclass(frozen=True, eq=False)
class Mask:
    """Which keys each query sees, on global indices (see the module docstring for the exact rule).

    Args: ``causal``; ``window`` int >= 0 or None; ``sinks`` int >= 0 (tokens at the start of each
    document visible through the window); ``doc_ids`` 2-D integer tensor ``[B, S]`` of GLOBAL
    document ids, non-decreasing along the sequence; ``block_sparse`` ``(block_size, visible)`` with
    ``visible`` a 2-D bool tensor ``[S/b, S/b]``.
    Raises ValueError naming the field and the fix.
    """

    causal: bool = True
    window: Optional[int] = None
    sinks: int = 0
    doc_ids: Optional[Tensor] = None  # [B, S] global
    block_sparse: Optional[tuple] = None  # (block_size, visible [S/b, S/b] bool)

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise ValueError(f"Mask.causal must be True or False; got {self.causal!r}.")
        if self.window is not None and (not _is_int(self.window) or self.window < 0):
            raise ValueError(f"Mask.window must be an int >= 0 or None; got {self.window!r} "
                             "(window=W lets a query see keys at most W positions away).")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise ValueError(f"Mask.sinks must be an int >= 0; got {self.sinks!r} (0 for no sink tokens).")
        d = self.doc_ids
        if d is not None:
            if not isinstance(d, Tensor) or d.dim() != 2 or d.dtype.is_floating_point or d.dtype == torch.bool \
                    or d.dtype.is_complex:
                raise ValueError(f"Mask.doc_ids must be a 2-D integer tensor [batch, seq] of global document ids; "
                                 f"got {type(d).__name__} {getattr(d, 'dtype', '')} {list(getattr(d, 'shape', []))}.")
            if d.shape[1] > 1 and bool((d[:, 1:] < d[:, :-1]).any()):
                raise ValueError("Mask.doc_ids must be non-decreasing along the sequence (packed documents in "
                                 "order); renumber the documents of each row in order of appearance.")
        bs = self.block_sparse
        if bs is not None:
            ok = isinstance(bs, tuple) and len(bs) == 2 and _is_int(bs[0]) and bs[0] > 0 \
                and isinstance(bs[1], Tensor) and bs[1].dim() == 2 and bs[1].dtype == torch.bool \
                and bs[1].shape[0] == bs[1].shape[1]
            if not ok:
                raise ValueError("Mask.block_sparse must be (block_size: int > 0, visible: square 2-D bool tensor "
                                 f"[S/block_size, S/block_size]); got {bs!r:.200}.")

    @property
    def kinds(self) -> frozenset:
        """Mask kinds this mask needs: subset of ``{"causal", "window", "two_sided_window", "documents",
        "sinks", "block_sparse"}`` (sinks only with a window: alone they change nothing)."""
        kinds = set()
        if self.causal:
            kinds.add("causal")
        if self.window is not None:
            kinds.add("window")
            if not self.causal:
                kinds.add("two_sided_window")
            if self.sinks > 0:
                kinds.add("sinks")
        if self.doc_ids is not None:
            kinds.add("documents")
        if self.block_sparse is not None:
            kinds.add("block_sparse")
        return frozenset(kinds)

    def _sink_flags(self, k_offset: int, sk: int, device) -> Tensor:
        """``[B or 1, Sk]`` bool: key ``k_offset + j`` is among the first ``sinks`` of its document."""
        pos = torch.arange(k_offset, k_offset + sk, device=device)
        if self.doc_ids is None:
            return (pos < self.sinks)[None]
        ids = self.doc_ids.to(device).contiguous()  # [B, S]
        start = torch.searchsorted(ids, ids, side="left")  # first index of each token's document
        in_doc = torch.arange(ids.shape[1], device=device)[None] - start
        return (in_doc < self.sinks)[:, k_offset:k_offset + sk]

    def local(self, q_offset: int, sq: int, k_offset: int, sk: int, device=None) -> LocalMask:
        """The mask of queries ``[q_offset, q_offset + sq)`` against keys ``[k_offset, k_offset + sk)``.

        Raises ValueError when the ranges run past ``doc_ids`` or ``block_sparse``'s sequence length.
        """
        for name, s in (("doc_ids", None if self.doc_ids is None else self.doc_ids.shape[1]),
                        ("block_sparse", None if self.block_sparse is None
                         else self.block_sparse[0] * self.block_sparse[1].shape[0])):
            if s is not None and (min(q_offset, k_offset) < 0 or max(q_offset + sq, k_offset + sk) > s):
                raise ValueError(f"Mask.{name} covers {s} tokens but this call needs queries [{q_offset}, "
                                 f"{q_offset + sq}) and keys [{k_offset}, {k_offset + sk}); give ids for the "
                                 "whole global sequence.")
        q_doc = k_doc = k_sink = None
        if self.doc_ids is not None:
            q_doc = self.doc_ids[:, q_offset:q_offset + sq]
            k_doc = self.doc_ids[:, k_offset:k_offset + sk]
        if "sinks" in self.kinds:
            dev = device if device is not None else (self.doc_ids.device if self.doc_ids is not None else None)
            k_sink = self._sink_flags(k_offset, sk, dev)
        return LocalMask(causal=self.causal, q_offset=q_offset, k_offset=k_offset, window_left=self.window,
                         window_right=None if self.causal else self.window, q_doc_ids=q_doc, k_doc_ids=k_doc,
                         k_sink=k_sink, block_sparse=self.block_sparse)
