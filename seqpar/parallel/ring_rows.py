"""Which key ROWS each ring step moves: pure host-side math on the plan of every rank; no comms, no tensors.

A K/V block travels one hop per ring step, but the calls of the ranks it visits may use only part of it:
a causal window ``W`` on contiguous shards of ``M > W`` tokens needs only the last ``W`` keys of the
neighbour's shard. The plan is known on every rank (it reads only the global mask), so the sender and the
receiver of a hop compute the same rows: the block of owner ``o`` travels from step ``t`` on as the rows
of ``o``'s shard that the calls of steps ``>= t`` use, a few disjoint spans sent back to back
(:func:`row_ranges`; e.g. a window's last ``W`` rows plus the attention sinks' first rows of the sequence,
or a two-sided window's first and last ``W``). These rows only shrink along the ring, so each hop sends
pieces of what it holds.
A step is trimmed only when EVERY hop of it shrinks (the slowest hop sets the step's time, so trimming
some hops only would add copies and save no time); masks that use every row (causal on zigzag) keep the
whole blocks and the plain ring.

Backward: the dK/dV rows the calls of steps ``>= 1`` touch (``home[o]``) travel alone; the owner keeps
its own (step 0) gradient and adds the rows that come home at their offsets.
"""
from __future__ import annotations

from typing import Callable, Optional

Span = tuple[int, int]  # rows [lo, hi) of an owner's local shard


def key_span(visible: Callable[[tuple, tuple], bool], q: tuple, k: tuple, length: int) -> tuple[int, int]:
    """First and last index ``(a, b)`` of the keys of progression ``k = (first, last, stride)`` (``length``
    elements) that some query of ``q`` sees: keys outside ``[a, b]`` are invisible to every query.
    ``visible(q, k)`` is the exact any-visible test (monotone in the key set); the pair must be visible.
    O(log length) tests, two when both end keys are visible."""
    f, st = k[0], k[2]
    sub = lambda a, b: (f + a * st, f + b * st, st)
    a, b = 0, length - 1
    if not visible(q, sub(0, 0)):  # smallest a whose prefix [0, a] holds a visible key
        lo, hi = 1, length - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if visible(q, sub(0, mid)) else (mid + 1, hi)
        a = lo
    if not visible(q, sub(b, b)):  # largest b whose suffix [b, end] holds a visible key
        lo, hi = a, length - 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if visible(q, sub(mid, length - 1)) else (lo, mid - 1)
        b = lo
    return a, b


def _union(spans) -> tuple:
    """The disjoint, sorted row spans covering ``spans`` (overlapping or touching spans merge; empty ones go)."""
    out: list = []
    for lo, hi in sorted(sp for sp in spans if sp[1] > sp[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def num_rows(spans) -> int:
    """Rows held in ``spans`` (the length of their compact buffer)."""
    return sum(hi - lo for lo, hi in spans)


def compact_row(spans, row: int) -> int:
    """Index in the compact buffer of ``spans`` (their rows back to back, in order) of owner-local ``row``."""
    off = 0
    for lo, hi in spans:
        if lo <= row < hi:
            return off + row - lo
        off += hi - lo
    raise ValueError(f"row {row} is not held in {spans}")


def row_ranges(spans: list, steps: int, length: int) -> tuple[Optional[list], Optional[list]]:
    """``spans[r][s]``: the owner-local key rows ``[start, end)`` of each call of rank ``r`` at step ``s``
    (on the block of rank ``r - s``). Returns ``(held, home)``, each entry a tuple of disjoint sorted spans
    ``((lo, hi), ...)`` whose rows travel back to back (a compact buffer; :func:`compact_row`):

    * ``held[s][r]``: the rows of block ``r - s`` that rank ``r`` holds at step ``s`` (step 0: its whole
      shard); ``None`` when no step is trimmed (every hop sends whole blocks);
    * ``home[o]``: the rows of block ``o`` that calls of steps ``>= 1`` touch, i.e. the dK/dV rows that
      travel; ``None`` when step 1 is not trimmed. An unused block is ``()``.

    The spans of a later step lie inside those of an earlier one (each is the union of the rows the calls
    of all later steps use), so every span a hop sends is one piece of a span it holds.
    """
    n = len(spans)
    full = ((0, length),)
    held = [[full] * n]
    need: list = [()] * n  # per owner: the rows used at steps >= t, built from the last step down
    per_step = [None] * steps
    for t in range(steps - 1, 0, -1):
        for o in range(n):
            need[o] = _union(list(need[o]) + list(spans[(o + t) % n][t]))
        per_step[t] = list(need)
    for t in range(1, steps):
        trimmed = max(num_rows(x) for x in per_step[t]) < length
        held.append([per_step[t][(r - t) % n] if trimmed else full for r in range(n)])
    if steps < 2 or all(h == full for step in held for h in step):
        return None, None
    home = per_step[1] if max(num_rows(x) for x in per_step[1]) < length else None
    return held, home
