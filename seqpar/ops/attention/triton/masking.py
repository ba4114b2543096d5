"""Mask helpers of the Triton kernels (``@triton.jit``): which tiles a program visits, and which pairs of a
visited tile are visible. The host side (per-row / per-key intervals) is :mod:`.bounds`.

Every mask feature is a ``tl.constexpr`` flag, so the dense kernels (no flag set) compile to the code
they had before masks existed:

* ``CAUSAL``, ``HAS_WINDOW`` (left window), ``HAS_WINDOW_R`` (right window of a non-causal Mask) and
  ``STRIDED`` (row ``i`` at ``q_offset + q_stride * i``) bound the visited tiles arithmetically;
* ``ROW_BOUNDS`` (documents and/or block-sparse): each query row sees keys only inside a host-computed
  interval ``[lo_i, hi_i)`` (for the dK/dV kernel: each key is seen only by rows ``[lo_j, hi_j)``).
  Document ids are non-decreasing, so "same document" IS such an interval: the kernels never load ids,
  and tiles outside the union of a tile's intervals are never loaded;
* ``HAS_SINKS``: the sink keys of a row's document are an interval too (a prefix of its document's
  keys); the forward/dQ kernels visit it as an extra key range next to the window range;
* ``BLOCK_SPARSE``: a ``(q tile, k tile)`` pair whose gathered layout entries are all False is skipped
  before K/V are loaded; partly visible tiles get the element-wise mask (block sizes need not be
  multiples of the tile sizes).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The mask constexprs (part of every kernel's autotune key) and the run-time mask scalars (never
# specialized: offsets change every ring step). All False: the dense kernels.
MASK_KEYS = ["CAUSAL", "HAS_WINDOW", "HAS_WINDOW_R", "ROW_BOUNDS", "HAS_SINKS", "BLOCK_SPARSE", "STRIDED"]
MASK_SCALARS = ["q_offset", "k_offset", "q_stride", "k_stride", "window_left", "window_right", "bs_size", "bs_n"]


@triton.jit
def n_at_most(x, stride, STRIDED: tl.constexpr):
    """Number of indices ``j >= 0`` with ``stride * j <= x`` (before the callers' clamp to >= 0)."""
    if STRIDED:
        return (tl.maximum(x, -1) + stride) // stride  # numerator >= stride - 1 >= 0: no rounding sign issue
    else:
        return x + 1


@triton.jit
def first_at_least(x, stride, STRIDED: tl.constexpr):
    """Smallest index ``j`` (>= 0 after the callers' clamp) with ``stride * j >= x``."""
    if STRIDED:
        return tl.cdiv(tl.maximum(x, 0), stride)
    else:
        return x


@triton.jit
def round_ranges(lo, full_lo, full_hi, hi, n_total, BLOCK: tl.constexpr, ALIGN_EMPTY_RAGGED: tl.constexpr,
                 start, OTHER_BLOCK: tl.constexpr, n_other):
    """Round index bounds to tiles: ``lo``/``full_lo``/``full_hi`` to multiples of BLOCK, ``full`` inside
    ``[lo, hi]`` and empty (at ``lo``) when nothing is fully visible (or the owning tile is ragged)."""
    hi = tl.maximum(hi, 0)
    lo = (tl.minimum(tl.maximum(lo, 0), hi) // BLOCK) * BLOCK  # non-negative before dividing
    full_lo = tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK) * BLOCK, lo)
    full_hi = tl.minimum((tl.maximum(tl.minimum(full_hi, (n_total // BLOCK) * BLOCK), 0) // BLOCK) * BLOCK, hi)
    empty = full_hi <= full_lo
    if ALIGN_EMPTY_RAGGED:  # a ragged owning tile has out-of-bounds members: it needs the mask everywhere
        empty = empty | (start + OTHER_BLOCK > n_other)
    full_lo = tl.where(empty, lo, full_lo)
    full_hi = tl.where(empty, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_block_ranges(start_m, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right,
                     row_ok, r_lo, r_hi, s_lo, s_hi,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_WINDOW_R: tl.constexpr, STRIDED: tl.constexpr, ROW_BOUNDS: tl.constexpr,
                     HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr):
    """Key bounds for query rows ``[start_m, start_m + BLOCK_M)`` (forward and dQ kernels).

    Returns ``lo <= full_lo <= full_hi <= hi`` (``[full_lo, full_hi)``: whole in-bounds tiles every row
    sees entirely, visited without a mask) and a separate sink range ``[sink_lo, sink_hi)`` (empty
    unless the sink keys are apart from ``[lo, hi)``; touching ones widen it). ``r_lo/r_hi`` and
    ``s_lo/s_hi`` ``[BLOCK_M]``: the rows' key and sink intervals (used only under their flags).
    """
    end_m = tl.minimum(start_m + BLOCK_M, Sq)
    if STRIDED:
        qp_first = q_offset + start_m * q_stride
        qp_last = q_offset + (end_m - 1) * q_stride
    else:
        qp_first = q_offset + start_m
        qp_last = q_offset + end_m - 1
    hi = Sk
    full_hi = Sk
    lo = 0
    full_lo = 0
    if CAUSAL:  # key j visible to row i iff k_pos(j) <= q_pos(i)
        hi = tl.minimum(hi, n_at_most(qp_last - k_offset, k_stride, STRIDED))
        full_hi = tl.minimum(full_hi, n_at_most(qp_first - k_offset, k_stride, STRIDED))
    causal_hi = hi  # sinks see past the window, never past causality
    if HAS_WINDOW:  # and q_pos - k_pos <= window_left
        lo = tl.maximum(lo, first_at_least(qp_first - window_left - k_offset, k_stride, STRIDED))
        full_lo = tl.maximum(full_lo, first_at_least(qp_last - window_left - k_offset, k_stride, STRIDED))
    if HAS_WINDOW_R:  # and k_pos - q_pos <= window_right
        hi = tl.minimum(hi, n_at_most(qp_last + window_right - k_offset, k_stride, STRIDED))
        full_hi = tl.minimum(full_hi, n_at_most(qp_first + window_right - k_offset, k_stride, STRIDED))
    if ROW_BOUNDS:  # union of the rows' intervals bounds the range; their intersection is the full part
        lo = tl.maximum(lo, tl.min(r_lo, 0))
        hi = tl.minimum(hi, tl.max(r_hi, 0))
        full_lo = tl.maximum(full_lo, tl.max(tl.where(row_ok, r_lo, 0), 0))
        full_hi = tl.minimum(full_hi, tl.min(tl.where(row_ok, r_hi, Sk), 0))
    if BLOCK_SPARSE:  # every tile is checked and masked
        full_hi = 0
    lo, full_lo, full_hi, hi = round_ranges(lo, full_lo, full_hi, hi, Sk, BLOCK_N, False, 0, 1, 1)
    sink_lo = lo
    sink_hi = lo
    if HAS_SINKS:
        t_lo = (tl.minimum(tl.min(s_lo, 0), Sk) // BLOCK_N) * BLOCK_N
        t_hi = tl.minimum(tl.max(s_hi, 0), causal_hi)
        t_hi_tile = tl.cdiv(t_hi, BLOCK_N) * BLOCK_N
        some = t_hi > t_lo
        touch = some & (t_hi_tile >= lo) & (t_lo <= tl.cdiv(hi, BLOCK_N) * BLOCK_N)
        lo = tl.where(touch, tl.minimum(lo, t_lo), lo)
        hi = tl.where(touch, tl.maximum(hi, t_hi), hi)
        apart = some & ~touch
        sink_lo = tl.where(apart, t_lo, 0)
        sink_hi = tl.where(apart, t_hi, 0)
    return lo, full_lo, full_hi, hi, sink_lo, sink_hi


@triton.jit
def query_block_ranges(start_n, Sq, Sk, q_offset, k_offset, q_stride, k_stride, window_left, window_right,
                       col_ok, c_lo, c_hi, has_sink,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_WINDOW_R: tl.constexpr, STRIDED: tl.constexpr, ROW_BOUNDS: tl.constexpr,
                       HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr):
    """Query bounds ``lo <= full_lo <= full_hi <= hi`` for keys ``[start_n, start_n + BLOCK_N)`` (dK/dV kernel).

    ``[full_lo, full_hi)`` holds in-bounds rows that see every key of the block; it is empty when the key
    block itself is ragged. ``c_lo/c_hi [BLOCK_N]``: the keys' row intervals; ``has_sink``: the tile holds a
    sink key (then the window does not bound the range: a sink is seen by its whole document).
    """
    end_n = tl.minimum(start_n + BLOCK_N, Sk)
    if STRIDED:
        kp_first = k_offset + start_n * k_stride
        kp_last = k_offset + (end_n - 1) * k_stride
    else:
        kp_first = k_offset + start_n
        kp_last = k_offset + end_n - 1
    lo = 0
    full_lo = 0
    hi = Sq
    full_hi = Sq
    if CAUSAL:  # row i sees key j iff q_pos(i) >= k_pos(j)
        lo = tl.maximum(lo, first_at_least(kp_first - q_offset, q_stride, STRIDED))
        full_lo = tl.maximum(full_lo, first_at_least(kp_last - q_offset, q_stride, STRIDED))
    w_lo = lo
    w_hi = hi
    if HAS_WINDOW:  # and q_pos - k_pos <= window_left
        w_hi = tl.minimum(w_hi, n_at_most(kp_last + window_left - q_offset, q_stride, STRIDED))
        full_hi = tl.minimum(full_hi, n_at_most(kp_first + window_left - q_offset, q_stride, STRIDED))
    if HAS_WINDOW_R:  # and k_pos - q_pos <= window_right
        w_lo = tl.maximum(w_lo, first_at_least(kp_first - window_right - q_offset, q_stride, STRIDED))
        full_lo = tl.maximum(full_lo, first_at_least(kp_last - window_right - q_offset, q_stride, STRIDED))
    if HAS_SINKS:
        w_lo = tl.where(has_sink, lo, w_lo)
        w_hi = tl.where(has_sink, hi, w_hi)
    lo = w_lo
    hi = w_hi
    if ROW_BOUNDS:
        lo = tl.maximum(lo, tl.min(c_lo, 0))
        hi = tl.minimum(hi, tl.max(c_hi, 0))
        full_lo = tl.maximum(full_lo, tl.max(tl.where(col_ok, c_lo, 0), 0))
        full_hi = tl.minimum(full_hi, tl.min(tl.where(col_ok, c_hi, Sq), 0))
    if BLOCK_SPARSE:
        full_hi = 0
    return round_ranges(lo, full_lo, full_hi, hi, Sq, BLOCK_M, True, start_n, BLOCK_N, Sk)


@triton.jit
def block_layout(Layout, q_pos, k_pos, ok, bs_size, bs_n):
    """Gathered block-sparse layout entries (bool) of broadcastable positions; False where not ``ok``."""
    return tl.load(Layout + (q_pos // bs_size) * bs_n + k_pos // bs_size, mask=ok, other=0) != 0


@triton.jit
def any_true(x):
    """Whether any element of a 2-D bool tile is True (a scalar)."""
    return tl.max(tl.max(x.to(tl.int32), 1), 0) > 0


@triton.jit
def visible_mask(q_pos, k_pos, in_bounds, in_interval, is_sink, layout, window_left, window_right,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_WINDOW_R: tl.constexpr,
                 ROW_BOUNDS: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_SPARSE: tl.constexpr):
    """Boolean visibility of broadcastable query/key positions (the rules of the reference): in bounds,
    causal, (window OR sink), inside the row's key interval (documents, block-sparse extent), layout."""
    visible = in_bounds
    if CAUSAL:
        visible = visible & (q_pos >= k_pos)
    if HAS_WINDOW or HAS_WINDOW_R:
        win = in_bounds
        if HAS_WINDOW:
            win = win & (q_pos - k_pos <= window_left)
        if HAS_WINDOW_R:
            win = win & (k_pos - q_pos <= window_right)
        if HAS_SINKS:
            win = win | is_sink
        visible = visible & win
    if ROW_BOUNDS:
        visible = visible & in_interval
    if BLOCK_SPARSE:
        visible = visible & layout
    return visible
