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

Contract for the ring (issue 13; every name here is stable):

* ``Mask.local(q_offset, Sq, k_offset, Sk, *, q_stride=1, k_stride=1, device=None) -> LocalMask``: the
  mask of one kernel call whose local query row ``i`` sits at global position ``q_offset + q_stride * i``
  and local key ``j`` at ``k_offset + k_stride * j`` (the striped layout's shards are progressions of
  stride N; zigzag/contiguous chunks have stride 1). Doc ids are sliced as
  ``doc_ids[:, q_offset::q_stride][:, :Sq]`` (keys likewise), sink flags are computed for exactly those
  keys, windows/causality/block-sparse use the global positions. Raises ValueError when a position
  falls outside ``doc_ids`` / ``block_sparse``'s sequence.
* ``LocalMask.q_stride`` / ``k_stride`` (default 1). ``LocalMask.kinds`` reports ``"strided"`` when a
  stride != 1 matters (with causal, a window or block-sparse; documents and sinks are sliced, so
  position-free): a backend that does not declare ``"strided"`` is refused by the registry. The
  reference (``torch``) and ``triton`` backends declare it; the SDPA records do not.
* ``Mask.any_visible(q_offset, Sq, k_offset, Sk, *, q_stride=1, k_stride=1) -> bool``: a cheap host-side
  test for "can any (query, key) pair of these two position sets be visible". ``False`` is a proof
  that none is (skip the kernel call / the ring step); ``True`` means "maybe" (exact for unit strides
  with causal/window, conservative with documents, sinks and block-sparse combined). It reads
  ``doc_ids`` / ``block_sparse`` (a device sync when they live on the GPU: keep a CPU copy of the Mask
  for planning, e.g. ``Mask(..., doc_ids=doc_ids.cpu())``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Every mask kind a backend may declare. "window" is a left window (keys at most W to the left; with
# causal that is the whole window); "two_sided_window" also limits keys to the right (non-causal Mask);
# "strided": positions advance by q_stride/k_stride != 1 per local row/key (striped ring shards).
MASK_KINDS = frozenset({"causal", "window", "two_sided_window", "documents", "sinks", "block_sparse", "strided"})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tensor_versions(*tensors) -> Optional[tuple]:
    """The in-place version counters of ``tensors`` (None entries allowed; views share their base's
    counter), or None when one has none (an inference tensor): then nothing derived may be cached."""
    try:
        return tuple(None if t is None else t._version for t in tensors)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def memoized(owner, key: tuple, versions: Optional[tuple], compute):
    """``compute()``, cached on the frozen ``owner`` (a :class:`Mask` or :class:`LocalMask`) under ``key``
    while the ``versions`` of the tensors it reads are unchanged (an in-place write invalidates the entry).

    Masks are values built once per forward and shared by every layer and by the backward, so what is
    derived from them (per-call local masks, the Triton kernels' row/column intervals) is computed once
    per mask instead of once per layer and pass. ``versions`` None: no caching."""
    if versions is None:
        return compute()
    cache = owner.__dict__.setdefault("_derived", {})  # not a dataclass field: eq/repr/replace ignore it
    hit = cache.get(key)
    if hit is not None and hit[0] == versions:
        return hit[1]
    value = compute()
    cache[key] = (versions, value)
    return value


@dataclass(frozen=True, eq=False)
class LocalMask:
    """The mask of one kernel call, on global positions ``q_offset + q_stride * i`` / ``k_offset + k_stride * j``.

    ``window_left``/``window_right``: keys at most that far left/right of the query (None: unlimited);
    ``q_doc_ids [B, Sq]`` / ``k_doc_ids [B, Sk]``: the GLOBAL document ids of these rows/keys
    (non-decreasing); ``k_sink [B or 1, Sk]`` bool: key is a sink (visible through any window; the
    first keys of each document, as :meth:`Mask.local` computes them); ``block_sparse``:
    ``(block_size, visible [S/b, S/b])`` indexed by global positions; ``q_stride``/``k_stride`` >= 1.
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
    q_stride: int = 1
    k_stride: int = 1

    def __post_init__(self):
        for name in ("window_left", "window_right"):
            w = getattr(self, name)
            if w is not None and (not _is_int(w) or w < 0):
                raise ValueError(f"{name} must be an int >= 0 (or None); got {w!r}.")
        for name in ("q_stride", "k_stride"):
            st = getattr(self, name)
            if not _is_int(st) or st < 1:
                raise ValueError(f"LocalMask.{name} must be an int >= 1 (1 for contiguous rows); got {st!r}.")
        if (self.q_doc_ids is None) != (self.k_doc_ids is None):
            raise ValueError("q_doc_ids and k_doc_ids must be given together (or neither).")

    @property
    def strided(self) -> bool:
        """A stride != 1 changes the mask (positions matter: causal, a window or block-sparse)."""
        positional = self.causal or self.window_left is not None or self.window_right is not None \
            or self.block_sparse is not None
        return (self.q_stride != 1 or self.k_stride != 1) and positional

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
        if self.strided:
            kinds.add("strided")
        return frozenset(kinds)


def _progression(offset: int, n: int, stride: int, device=None) -> Tensor:
    return offset + stride * torch.arange(n, device=device)


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
        "sinks", "block_sparse"}`` (sinks only with a window: alone they change nothing). ``"strided"``
        is a property of a call, reported by :attr:`LocalMask.kinds`."""
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

    def _sink_flags(self, pos: Tensor) -> Tensor:
        """``[B or 1, n]`` bool: the key at global position ``pos[j]`` is among the first ``sinks`` of its document."""
        if self.doc_ids is None:
            return (pos < self.sinks)[None]
        ids = self.doc_ids.to(pos.device).contiguous()  # [B, S]
        start = torch.searchsorted(ids, ids, side="left")  # first index of each token's document
        in_doc = torch.arange(ids.shape[1], device=pos.device)[None] - start
        return (in_doc < self.sinks)[:, pos]

    def _check_range(self, q_offset: int, sq: int, k_offset: int, sk: int, q_stride: int, k_stride: int) -> None:
        for name, st in (("q_stride", q_stride), ("k_stride", k_stride)):
            if not _is_int(st) or st < 1:
                raise ValueError(f"Mask.local {name} must be an int >= 1 (1 for contiguous rows); got {st!r}.")
        q_last, k_last = q_offset + q_stride * max(sq - 1, 0), k_offset + k_stride * max(sk - 1, 0)
        for name, s in (("doc_ids", None if self.doc_ids is None else self.doc_ids.shape[1]),
                        ("block_sparse", None if self.block_sparse is None
                         else self.block_sparse[0] * self.block_sparse[1].shape[0])):
            if s is not None and (min(q_offset, k_offset) < 0 or max(q_last if sq else -1, k_last if sk else -1) >= s):
                raise ValueError(f"Mask.{name} covers {s} tokens but this call needs query positions {q_offset}.."
                                 f"{q_last} (stride {q_stride}) and key positions {k_offset}..{k_last} (stride "
                                 f"{k_stride}); give {name} for the whole global sequence (block_size * blocks "
                                 "== sequence length).")

    def local(self, q_offset: int, sq: int, k_offset: int, sk: int, *, q_stride: int = 1, k_stride: int = 1,
              device=None) -> LocalMask:
        """The mask of local queries ``i < sq`` at global positions ``q_offset + q_stride * i`` against local
        keys ``j < sk`` at ``k_offset + k_stride * j``.

        Raises ValueError when a position falls outside ``doc_ids`` or ``block_sparse``'s sequence, or
        a stride is not an int >= 1.
        """
        self._check_range(q_offset, sq, k_offset, sk, q_stride, k_stride)
        # One LocalMask per distinct call shape: every layer (and an activation-checkpoint recompute)
        # gets the same object, so the kernels' intervals derived from it are computed once (bounds.py).
        key = ("local", q_offset, sq, k_offset, sk, q_stride, k_stride, None if device is None else str(device))
        return memoized(self, key, tensor_versions(self.doc_ids),
                        lambda: self._local(q_offset, sq, k_offset, sk, q_stride, k_stride, device))

    def _local(self, q_offset: int, sq: int, k_offset: int, sk: int, q_stride: int, k_stride: int,
               device) -> LocalMask:
        q_doc = k_doc = k_sink = None
        if self.doc_ids is not None:
            q_doc = self.doc_ids[:, q_offset::q_stride][:, :sq]
            k_doc = self.doc_ids[:, k_offset::k_stride][:, :sk]
        if "sinks" in self.kinds:
            dev = device if device is not None else (self.doc_ids.device if self.doc_ids is not None else None)
            k_sink = self._sink_flags(_progression(k_offset, sk, k_stride, dev))
        return LocalMask(causal=self.causal, q_offset=q_offset, k_offset=k_offset, window_left=self.window,
                         window_right=None if self.causal else self.window, q_doc_ids=q_doc, k_doc_ids=k_doc,
                         k_sink=k_sink, block_sparse=self.block_sparse, q_stride=q_stride, k_stride=k_stride)

    def any_visible(self, q_offset: int, sq: int, k_offset: int, sk: int, *, q_stride: int = 1,
                    k_stride: int = 1) -> bool:
        """Whether any query of ``q_offset + q_stride * [0, sq)`` may see any key of ``k_offset + k_stride * [0, sk)``.

        ``False`` proves no pair is visible; ``True`` means "maybe" (exact for unit strides with causal and
        windows; documents, sinks and block-sparse are checked as necessary conditions each). Host-side,
        O(B + Sq + Sk) (block-sparse: O(blocks touched)); reads ``doc_ids``/``block_sparse`` where they live.
        Raises ValueError as :meth:`local` does.
        """
        self._check_range(q_offset, sq, k_offset, sk, q_stride, k_stride)
        if sq <= 0 or sk <= 0:
            return False
        q_lo, q_hi = q_offset, q_offset + q_stride * (sq - 1)  # inclusive position spans
        k_lo, k_hi = k_offset, k_offset + k_stride * (sk - 1)
        if self.doc_ids is not None:
            # Per batch row, clip both spans to the documents they share (ids are non-decreasing, so the
            # shared ids form an interval); no row with a shared document: nothing is visible.
            ids = self.doc_ids
            d_lo = torch.maximum(ids[:, q_lo], ids[:, k_lo])  # [B]
            d_hi = torch.minimum(ids[:, q_hi], ids[:, k_hi])
            start = torch.searchsorted(ids.contiguous(), d_lo[:, None].contiguous(), side="left")[:, 0]
            end = torch.searchsorted(ids.contiguous(), d_hi[:, None].contiguous(), side="right")[:, 0] - 1
            spans = [(max(q_lo, a), min(q_hi, c), max(k_lo, a), min(k_hi, c))
                     for a, c, ok in zip(start.tolist(), end.tolist(), (d_lo <= d_hi).tolist()) if ok]
        else:
            spans = [(q_lo, q_hi, k_lo, k_hi)]
        if not any(self._spans_visible(*sp) for sp in spans):
            return False
        if self.block_sparse is not None:
            size, vis = self.block_sparse
            qb = torch.unique(_progression(q_offset, sq, q_stride) // size)
            kb = torch.unique(_progression(k_offset, sk, k_stride) // size)
            return bool(vis.to("cpu")[qb][:, kb].any())
        return True

    def _spans_visible(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> bool:
        """Causal/window test on inclusive position spans (differences q - k fill [q_lo - k_hi, q_hi - k_lo])."""
        if q_lo > q_hi or k_lo > k_hi:
            return False
        d_min, d_max = q_lo - k_hi, q_hi - k_lo
        lo = 0 if self.causal else (None if self.window is None else -self.window)
        hi = self.window
        if self.window is not None and self.sinks > 0:
            hi = None  # a sink key may be visible from anywhere right of it (and left, without causal)
            if not self.causal:
                lo = None
        return (lo is None or d_max >= lo) and (hi is None or d_min <= hi)
