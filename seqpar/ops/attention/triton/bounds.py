"""Host side of the Triton kernels' masks: per-row and per-key index intervals, computed once per call.

Because document ids are non-decreasing, the keys a query row can see form ONE interval of local key
indices: ``[searchsorted(k_ids, id_i, left), searchsorted(k_ids, id_i, right))``. The same holds for the
sinks of its document (a prefix of that interval) and, conservatively, for a block-sparse layout (from
the row's first to its last visible key block). The kernels take these intervals instead of ids: the
element mask is two compares, and a tile outside the union of its rows' intervals is never loaded
(:mod:`.masking`). For the dK/dV kernel the transposed intervals: the query rows that see each key.

Tile-size independent (the autotuner picks tiles after this runs); O(B * (Sq + Sk)) torch ops on the
inputs' device, no host sync. Cached on the LocalMask (:func:`~seqpar.ops.attention.mask.memoized`):
:meth:`Mask.local` hands every layer the same LocalMask and autograd keeps it for the backward, so a
training step computes each interval tensor once per mask, not once per layer and pass; an in-place
write to the ids, sinks or layout invalidates the cached copy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention.mask import LocalMask, memoized, tensor_versions


def _positions(offset: int, n: int, stride: int, device) -> Tensor:
    return offset + stride * torch.arange(n, device=device, dtype=torch.int64)


def _empty_as(lo: Tensor, hi: Tensor, n: int) -> tuple[Tensor, Tensor]:
    # An empty interval becomes [n, 0): neutral for the kernels' min(lo) / max(hi) over a tile.
    empty = hi <= lo
    return torch.where(empty, n, lo), torch.where(empty, 0, hi)


def _doc_intervals(own: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, n]`` intervals of ``other``'s indices holding the same id as each of ``own``'s (both sorted)."""
    own, other = own.to(torch.int64).contiguous(), other.to(torch.int64).contiguous()
    b = max(own.shape[0], other.shape[0])
    own, other = own.expand(b, -1).contiguous(), other.expand(b, -1).contiguous()
    return torch.searchsorted(other, own, side="left"), torch.searchsorted(other, own, side="right")


def _layout_intervals(vis: Tensor, size: int, own_pos: Tensor, other_offset: int, other_stride: int,
                      n_other: int) -> tuple[Tensor, Tensor]:
    """``[n]`` index intervals of the other side between the first and last visible block of each own block."""
    rows = vis[own_pos // size]  # [n, nb] bool
    nb = vis.shape[1]
    idx = torch.arange(nb, device=vis.device)
    first = torch.where(rows, idx, nb).amin(-1)  # nb when the row has no visible block
    last = torch.where(rows, idx, -1).amax(-1)
    p_lo, p_hi = first * size, (last + 1) * size  # global positions [p_lo, p_hi)
    lo = torch.div(p_lo - other_offset + other_stride - 1, other_stride, rounding_mode="floor").clamp(0, n_other)
    hi = (torch.div(p_hi - 1 - other_offset, other_stride, rounding_mode="floor") + 1).clamp(0, n_other)
    return lo, torch.where(last >= 0, hi, 0)


def _cached(kind: str, fn, mask: LocalMask, b: int, sq: int, sk: int, device) -> Optional[Tensor]:
    if mask.q_doc_ids is None and mask.block_sparse is None and mask.k_sink is None:
        return None
    vis = None if mask.block_sparse is None else mask.block_sparse[1]
    return memoized(mask, (kind, b, sq, sk, str(torch.device(device))),
                    tensor_versions(mask.q_doc_ids, mask.k_doc_ids, mask.k_sink, vis),
                    lambda: fn(mask, b, sq, sk, device))


def row_bounds(mask: LocalMask, b: int, sq: int, sk: int, device) -> Optional[Tensor]:
    """int32 ``[B, 4, Sq]``: per query row, its key interval ``[lo, hi)`` (documents and block-sparse
    extent) and its sink interval ``[lo, hi)``; empty intervals are ``[Sk, 0)``. None when the mask
    has neither documents, block-sparse nor sinks (the kernels then take a dummy). Cached on ``mask``:
    read-only for the kernels."""
    return _cached("rows", _row_bounds, mask, b, sq, sk, device)


def col_bounds(mask: LocalMask, b: int, sq: int, sk: int, device) -> Optional[Tensor]:
    """int32 ``[B, 3, Sk]``: per key, the interval ``[lo, hi)`` of query rows that may see it (documents,
    block-sparse extent; empty ``[Sq, 0)``) and whether it is a sink (0/1). None as in :func:`row_bounds`;
    cached likewise."""
    return _cached("cols", _col_bounds, mask, b, sq, sk, device)


def _row_bounds(mask: LocalMask, b: int, sq: int, sk: int, device) -> Tensor:
    if mask.q_doc_ids is not None:
        lo, hi = _doc_intervals(mask.q_doc_ids.to(device), mask.k_doc_ids.to(device))
    else:
        lo = torch.zeros(b, sq, dtype=torch.int64, device=device)
        hi = torch.full((b, sq), sk, dtype=torch.int64, device=device)
    s_lo, s_hi = lo, lo
    if mask.k_sink is not None:  # sinks: a prefix of the document's keys, as long as its sink count
        flags = mask.k_sink.to(device=device, dtype=torch.int64).expand(b, sk)
        csum = torch.nn.functional.pad(flags.cumsum(-1), (1, 0))  # [B, Sk + 1]
        s_hi = lo + (csum.gather(1, hi) - csum.gather(1, lo))
    if mask.block_sparse is not None:
        size, vis = mask.block_sparse
        q_pos = _positions(mask.q_offset, sq, mask.q_stride, device)
        b_lo, b_hi = _layout_intervals(vis.to(device), size, q_pos, mask.k_offset, mask.k_stride, sk)
        lo, hi = torch.maximum(lo, b_lo), torch.minimum(hi, b_hi)
    s_lo, s_hi = torch.maximum(s_lo, lo), torch.minimum(s_hi, hi)
    lo, hi = _empty_as(lo, hi, sk)
    s_lo, s_hi = _empty_as(s_lo, s_hi, sk)
    return torch.stack([lo, hi, s_lo, s_hi], 1).to(torch.int32).contiguous()


def _col_bounds(mask: LocalMask, b: int, sq: int, sk: int, device) -> Tensor:
    if mask.q_doc_ids is not None:
        lo, hi = _doc_intervals(mask.k_doc_ids.to(device), mask.q_doc_ids.to(device))
    else:
        lo = torch.zeros(b, sk, dtype=torch.int64, device=device)
        hi = torch.full((b, sk), sq, dtype=torch.int64, device=device)
    if mask.block_sparse is not None:
        size, vis = mask.block_sparse
        k_pos = _positions(mask.k_offset, sk, mask.k_stride, device)
        b_lo, b_hi = _layout_intervals(vis.to(device).t(), size, k_pos, mask.q_offset, mask.q_stride, sq)
        lo, hi = torch.maximum(lo, b_lo), torch.minimum(hi, b_hi)
    lo, hi = _empty_as(lo, hi, sq)
    sink = torch.zeros_like(lo) if mask.k_sink is None else mask.k_sink.to(device=device, dtype=torch.int64).expand(b, sk)
    return torch.stack([lo, hi, sink], 1).to(torch.int32).contiguous()


def layout_arg(mask: LocalMask, device) -> tuple[Tensor, int, int]:
    """(int8 contiguous layout ``[nb, nb]``, block size, nb), or a 1-element dummy without block-sparse."""
    if mask.block_sparse is None:
        return torch.zeros(1, dtype=torch.int8, device=device), 1, 1
    size, vis = mask.block_sparse
    return vis.to(device=device, dtype=torch.int8).contiguous(), int(size), int(vis.shape[0])


def check_positions(mask: LocalMask, sq: int, sk: int) -> None:
    """Block-sparse positions must lie inside the layout (Mask.local checks this; a hand-built LocalMask may not)."""
    if mask.block_sparse is None:
        return
    size, vis = mask.block_sparse
    n = size * vis.shape[0]
    for name, off, cnt, st in (("q", mask.q_offset, sq, mask.q_stride), ("k", mask.k_offset, sk, mask.k_stride)):
        if cnt and (off < 0 or off + st * (cnt - 1) >= n):
            raise ValueError(f"block_sparse covers positions [0, {n}) but the {name} positions of this call run "
                             f"from {off} to {off + st * (cnt - 1)}; build the LocalMask with Mask.local.")


def mask_flags(mask: LocalMask) -> dict:
    """The kernels' mask constexprs for this call (all False: the dense kernels)."""
    return dict(CAUSAL=bool(mask.causal), HAS_WINDOW=mask.window_left is not None,
                HAS_WINDOW_R=mask.window_right is not None,
                ROW_BOUNDS=mask.q_doc_ids is not None or mask.block_sparse is not None,
                HAS_SINKS=mask.k_sink is not None and (mask.window_left is not None or mask.window_right is not None),
                BLOCK_SPARSE=mask.block_sparse is not None, STRIDED=mask.q_stride != 1 or mask.k_stride != 1)


def mask_scalars(mask: LocalMask) -> tuple:
    """(q_offset, k_offset, q_stride, k_stride, window_left, window_right) as ints for the kernels."""
    return (int(mask.q_offset), int(mask.k_offset), int(mask.q_stride), int(mask.k_stride),
            int(mask.window_left or 0), int(mask.window_right or 0))
