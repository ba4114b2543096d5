"""Which key ROWS each ring step moves: pure host-side math on the plan of every rank; no comms, no tensors.

A K/V block travels one hop per ring step, but the calls of the ranks it visits may use only part of it:
a causal window ``W`` on contiguous shards of ``M > W`` tokens needs only the last ``W`` keys of the
neighbour's shard. The plan is known on every rank (it reads only the global mask), so the sender and the
receiver of a hop compute the same row range: the block of owner ``o`` travels from step ``t`` on as
rows ``[lo, hi)`` of ``o``'s shard, the hull of the key rows that the calls of steps ``>= t`` use
(:func:`row_ranges`; these hulls only shrink along the ring, so each hop slices the block it holds).
A step is trimmed only when EVERY hop of it shrinks (the slowest hop sets the step's time, so trimming
some hops only would add copies and save no time); masks that use every row (causal on zigzag) keep the
whole blocks and the plain ring.

Backward: the dK/dV rows the calls of steps ``>= 1`` touch (``home[o]``) travel alone; the owner keeps
its own (step 0) gradient and adds the rows that come home at their offset.
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


def _hull(x: Optional[Span], y: Optional[Span]) -> Optional[Span]:
    if x is None or y is None:
        return x if y is None else y
    return min(x[0], y[0]), max(x[1], y[1])


def row_ranges(spans: list, steps: int, length: int) -> tuple[Optional[list], Optional[list]]:
    """``spans[r][s]``: the owner-local key rows ``[start, end)`` of each call of rank ``r`` at step ``s``
    (on the block of rank ``r - s``). Returns ``(held, home)``:

    * ``held[s][r]``: the rows ``[lo, hi)`` of block ``r - s`` that rank ``r`` holds at step ``s`` (step 0:
      its whole shard); ``None`` when no step is trimmed (every hop sends whole blocks);
    * ``home[o]``: the rows of block ``o`` that calls of steps ``>= 1`` touch, i.e. the dK/dV rows that
      travel; ``None`` when step 1 is not trimmed. An unused block is ``(0, 0)``.
    """
    n = len(spans)
    full = (0, length)
    held = [[full] * n]
    need: list = [None] * n  # per owner: hull of the rows used at steps >= t, built from the last step down
    per_step = [None] * steps
    for t in range(steps - 1, 0, -1):
        for o in range(n):
            for lo, hi in spans[(o + t) % n][t]:
                need[o] = _hull(need[o], (lo, hi))
        per_step[t] = [x if x is not None else (0, 0) for x in need]
    for t in range(1, steps):
        trimmed = max(hi - lo for lo, hi in per_step[t]) < length
        held.append([per_step[t][(r - t) % n] if trimmed else full for r in range(n)])
    if steps < 2 or all(h == full for step in held for h in step):
        return None, None
    home = per_step[1] if max(hi - lo for lo, hi in per_step[1]) < length else None
    return held, home
