"""The ring's per-step plan: which (query piece, key piece) pairs each rank computes, with which mask,
on which backend, and how many ring steps run at all. Pure host-side math on the GLOBAL mask; no comms.

Every layout gives each rank a few *pieces*, runs of tokens at global positions ``start + stride * a``
(:func:`seqpar.parallel.layout.rank_pieces`). At ring step ``s`` rank ``r`` holds the K/V of rank
``r - s``; for each pair of pieces the plan decides exactly, from the :class:`~seqpar.ops.Mask`, whether
ANY (query, key) pair is visible (:func:`_pair_kinds`). A visible pair is one kernel call whose
:class:`~seqpar.ops.attention.LocalMask` carries the pieces' global offsets and strides; the mask kinds
that hold for every pair of the call are dropped from it (a block wholly inside one document needs no
doc ids, a block wholly before the queries no causal mask), so cheaper kernels may take it.

Skipping ring steps: the plan is a function of the arguments only (``doc_ids`` are global), so every
rank computes every rank's calls and the same ``steps``: one more than the LAST step at which any rank
has a call. The K/V blocks travel one hop per step, so a block needed ``k`` steps away needs every hop
before it: the ring stops after the last needed step instead of skipping middle steps (whose kernel
calls are skipped). A window ``W`` on contiguous shards of ``M`` tokens needs ``ceil(W / M)`` steps
past the local one. The backward's dK/dV, accumulated along the same truncated ring, go home in one
direct hop (``shift = -(steps - 1)``).

Masks of causal/full kind on the three classic layouts keep :func:`plan_step`'s calls (aligned causal
diagonals or full blocks), which the fused SDPA kernels can run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import LocalMask, Mask, select
from seqpar.parallel.layout import LAYOUTS, local_positions, rank_pieces
from seqpar.parallel.ring_rows import key_span, row_ranges

_LOCAL = {False: LocalMask(causal=False), True: LocalMask(causal=True)}  # aligned diagonal or full


@dataclass(frozen=True)
class BlockCall:
    """One kernel call of a ring step: ``q[:, q_start:q_end]`` against ``k/v[:, k_start:k_end]``;
    ``causal`` means the aligned diagonal (local row ``i`` of the slice sees slice keys ``<= i``)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool


def plan_step(layout: str, causal: bool, q_rank: int, k_rank: int, world_size: int,
              local_len: int) -> tuple[BlockCall, ...]:
    """The kernel calls of a causal/full mask for rank ``q_rank``'s queries against ``k_rank``'s keys
    (classic layouts). Exactly the visible pairs are covered, each once; fully masked pairs are skipped."""
    n = local_len
    full = (BlockCall(0, n, 0, n, False),)
    if not causal:
        return full
    if q_rank == k_rank:
        return (BlockCall(0, n, 0, n, True),)  # same tokens in increasing global order
    if layout == "contiguous":
        return full if k_rank < q_rank else ()
    if layout == "zigzag":
        c = n // 2  # rank r holds chunk r (local [0, c)) and chunk 2N-1-r (local [c, n))
        if k_rank < q_rank:
            return (BlockCall(0, n, 0, c, False),)  # k's early chunk precedes both q chunks
        return (BlockCall(c, n, 0, n, False),)  # q's late chunk follows both k chunks
    if layout == "striped":
        if k_rank < q_rank:  # q local a at a*N + q_rank, k local b at b*N + k_rank: visible iff a >= b
            return (BlockCall(0, n, 0, n, True),)
        return (BlockCall(1, n, 0, n - 1, True),) if n > 1 else ()  # visible iff a > b
    raise ValueError(f"layout={layout!r} has no causal block plan; one of {list(LAYOUTS[:3])}.")


@dataclass(frozen=True)
class Call:
    """One kernel call: local ``q[:, q_start:q_start+q_len]`` (global ``q_offset + q_stride * i``) against
    local ``k[:, k_start:k_start+k_len]`` (global ``k_offset + k_stride * j``) with the mask ``kinds`` kept."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    q_offset: int = 0
    q_stride: int = 1
    k_offset: int = 0
    k_stride: int = 1
    kinds: frozenset = frozenset()
    classic: Optional[bool] = None  # a plan_step call: the aligned LocalMask with this causal flag


@dataclass
class RingPlan:
    """The plan of one ring call on this rank. ``steps``: ring steps run (1 = local only, no comms);
    ``calls[s]``/``masks[s]``/``records[s]``: this rank's kernel calls at step ``s`` with their
    LocalMask and backend; ``work[r]``: (query, key) pairs the calls of rank ``r`` cover; ``held``/``home``:
    the key rows each hop moves (:func:`~seqpar.parallel.ring_rows.row_ranges`; None: whole blocks)."""

    steps: int
    calls: list
    masks: list
    records: list
    work: list = field(default_factory=list)
    held: Optional[list] = None
    home: Optional[list] = None
    rank: int = 0

    @property
    def num_calls(self) -> int:
        return sum(len(c) for c in self.calls)


# ------------------------------------------------------------------ exact any-visible test on pieces
def _clip(p: tuple, lo: int, hi: int) -> Optional[tuple]:
    """First and last element of progression ``p = (first, last, stride)`` inside ``[lo, hi]``, or None."""
    f, l, st = p
    if lo > f:
        f += -(-(lo - f) // st) * st
    if hi < l:
        l -= -(-(l - hi) // st) * st
    return (f, l, st) if f <= l else None


def _diff_in(qd: tuple, kd: tuple, lo: float, hi: float) -> bool:
    """Some ``i - j`` (i in qd, j in kd, same stride) lies in ``[lo, hi]``: the differences are every
    ``st``-th value from ``qf - kl`` to ``ql - kf``."""
    dmin, dmax, st = qd[0] - kd[1], qd[1] - kd[0], qd[2]
    v = dmin if lo <= dmin else dmin + -(-(lo - dmin) // st) * st
    return v <= min(hi, dmax)


class _MaskInfo:
    """Host copies of the global mask (doc ids, document spans, block layout) for the plan."""

    def __init__(self, mask: Mask, seq_len: int):
        self.m, self.s = mask, seq_len
        self.ids = None if mask.doc_ids is None else mask.doc_ids.detach().to("cpu", torch.int64).contiguous()
        self.rows = []  # per row: (starts [D], ends [D] inclusive) of its documents
        if self.ids is not None:
            for row in self.ids:
                change = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
                starts = torch.cat([torch.zeros(1, dtype=torch.int64), change])
                ends = torch.cat([change - 1, torch.tensor([seq_len - 1])])
                self.rows.append((starts.tolist(), ends.tolist()))
            start = torch.searchsorted(self.ids, self.ids, side="left")
            self.in_doc = torch.arange(seq_len)[None] - start  # [B, S] position inside the document
        else:
            self.rows = [([0], [seq_len - 1])]
            self.in_doc = torch.arange(seq_len)[None]
        self.vis = None if mask.block_sparse is None else mask.block_sparse[1].detach().cpu()

    def _sub_visible(self, qd: tuple, kd: tuple, doc_start: int) -> bool:
        m = self.m
        if m.causal and not _diff_in(qd, kd, 0, float("inf")):
            return False
        if m.window is None:
            return True
        if _diff_in(qd, kd, 0 if m.causal else -m.window, m.window):
            return True
        # A sink key (first `sinks` of the document) is visible through any window (not past causality).
        return m.sinks > 0 and kd[0] < doc_start + m.sinks and (not m.causal or kd[0] <= qd[1])

    def _doc_visible(self, qd: tuple, kd: tuple, doc_start: int) -> bool:
        if self.vis is None:
            return self._sub_visible(qd, kd, doc_start)
        bs = self.m.block_sparse[0]
        sub = self.vis[qd[0] // bs: qd[1] // bs + 1, kd[0] // bs: kd[1] // bs + 1]
        for bi, bj in torch.nonzero(sub).tolist():
            qb = _clip(qd, (qd[0] // bs + bi) * bs, (qd[0] // bs + bi + 1) * bs - 1)
            kb = _clip(kd, (kd[0] // bs + bj) * bs, (kd[0] // bs + bj + 1) * bs - 1)
            if qb is not None and kb is not None and self._sub_visible(qb, kb, doc_start):
                return True
        return False

    def any_visible(self, q: tuple, k: tuple) -> bool:
        """Some key of progression ``k`` is visible to some query of ``q`` in some row (exact)."""
        for starts, ends in self.rows:
            # Documents are runs: one holding a query and a key ends at or after both first elements
            # and starts at or before both last ones.
            for d in range(_bisect(ends, max(q[0], k[0])), len(starts)):
                ds, de = starts[d], ends[d]
                if ds > min(q[1], k[1]):
                    break
                qd, kd = _clip(q, ds, de), _clip(k, ds, de)
                if qd is not None and kd is not None and self._doc_visible(qd, kd, ds):
                    return True
        return False

    def kinds(self, q: tuple, k: tuple) -> frozenset:
        """The mask kinds a call on progressions ``q``, ``k`` must keep (the others hold for every pair)."""
        m, keep = self.m, set()
        if m.window is not None:
            if q[1] - k[0] > m.window or (not m.causal and k[1] - q[0] > m.window):
                keep.add("window")
                if m.sinks > 0 and bool((self.in_doc[:, k[0]: k[1] + 1: k[2]] < m.sinks).any()):
                    keep.add("sinks")
        if m.causal and (k[1] > q[0] or "window" in keep):  # a window without causal would be two-sided
            keep.add("causal")
        if self.ids is not None:
            lo, hi = min(q[0], k[0]), max(q[1], k[1])
            if "sinks" in keep or bool((self.ids[:, lo] != self.ids[:, hi]).any()):
                keep.add("documents")  # sink flags are per document
        if self.vis is not None:
            bs = self.m.block_sparse[0]
            if not bool(self.vis[q[0] // bs: q[1] // bs + 1, k[0] // bs: k[1] // bs + 1].all()):
                keep.add("block_sparse")
        return frozenset(keep)


def _bisect(ends: list, pos: int) -> int:
    """Index of the first document whose last token is at or after ``pos``."""
    lo, hi = 0, len(ends)
    while lo < hi:
        mid = (lo + hi) // 2
        if ends[mid] < pos:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------ the plan of a ring call
def check_mask(mask: Mask, batch: int, seq_len: int, layout: str) -> None:
    """Raise ValueError (the same on every rank: it reads only the arguments) for a mask that does not
    fit the global ``[batch, seq_len]`` sequence or the layout."""
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a seqpar.ops.Mask; got {type(mask).__name__}.")
    d = mask.doc_ids
    if d is not None and tuple(d.shape) != (batch, seq_len):
        raise ValueError(f"Mask.doc_ids has shape {list(d.shape)} but the ring's global sequence is [batch, seq] = "
                         f"[{batch}, {seq_len}] (local length x ranks); pass the GLOBAL ids of the whole row on every "
                         "rank, not the shard.")
    if mask.block_sparse is not None:
        size, vis = mask.block_sparse
        if size * vis.shape[0] != seq_len:
            raise ValueError(f"Mask.block_sparse covers {size} x {vis.shape[0]} = {size * vis.shape[0]} tokens but the "
                             f"global sequence has {seq_len}; give a [{seq_len} // block_size]^2 layout.")
    if layout == "docs" and d is None:
        raise ValueError("layout='docs' balances packed documents and needs Mask(doc_ids=...) (the global ids the "
                         "shards were made with); use another layout for a mask without documents.")


def _reduced(mask: Mask, kinds: frozenset, doc_ids: Optional[Tensor]) -> Mask:
    return Mask(causal="causal" in kinds, window=mask.window if "window" in kinds else None,
                sinks=mask.sinks if "sinks" in kinds else 0, doc_ids=doc_ids if "documents" in kinds else None,
                block_sparse=mask.block_sparse if "block_sparse" in kinds else None)


def _local_mask(mask: Mask, c: Call, device) -> LocalMask:
    return mask.local(c.q_offset, c.q_len, c.k_offset, c.k_len, q_stride=c.q_stride, k_stride=c.k_stride,
                      device=device)


def _cut_piece(piece: tuple, cut: int) -> list:
    """``(local_start, (first, last, stride), length)`` split into its positions below ``cut`` and the rest."""
    l0, (f, last, st), length = piece
    if not f < cut <= last:
        return [piece]
    m = -(-(cut - f) // st)  # elements below cut
    return [(l0, (f, f + (m - 1) * st, st), m), (l0 + m, (f + m * st, last, st), length - m)]


def _generic_calls(mask: Mask, layout: str, n: int, seq_len: int) -> list:
    """``[rank][step]`` -> tuple of :class:`Call` for every rank (every rank computes all of them)."""
    info = _MaskInfo(mask, seq_len)
    pieces = []  # [rank] -> [(local_start, (first, last, stride), length)]
    for r in range(n):
        local, out = 0, []
        for g0, length, st in rank_pieces(seq_len, r, n, layout, mask.doc_ids):
            out.append((local, (g0, g0 + st * (length - 1), st), length))
            local += length
        pieces.append(out)
    # Without documents the sinks are the sequence's first keys: a key piece holding them is cut there,
    # so the sink keys get calls of their own and a hop can carry them apart from the window's rows.
    cut = mask.sinks if mask.sinks and mask.window is not None and mask.doc_ids is None else 0
    plan = []
    for r in range(n):
        steps = []
        for s in range(n):
            calls = []
            keys = [kp for piece in pieces[(r - s) % n] for kp in (_cut_piece(piece, cut) if s else [piece])]
            for ql0, qp, qn in pieces[r]:
                for kl0, kp, kn in keys:
                    if info.any_visible(qp, kp):  # only the keys some query sees, the queries some key reaches
                        a, b = key_span(info.any_visible, qp, kp, kn)
                        ks = (kp[0] + a * kp[2], kp[0] + b * kp[2], kp[2])
                        c, d = key_span(lambda x, y: info.any_visible(y, x), ks, qp, qn)
                        qs = (qp[0] + c * qp[2], qp[0] + d * qp[2], qp[2])
                        calls.append(Call(ql0 + c, d - c + 1, kl0 + a, b - a + 1, qs[0], qs[2], ks[0], ks[2],
                                          info.kinds(qs, ks)))
            steps.append(tuple(calls))
        plan.append(steps)
    return plan


def build_plan(q: Tensor, k: Tensor, *, mask: Optional[Mask], causal: bool, layout: str, rank: int,
               world_size: int, backend: str) -> RingPlan:
    """The plan of rank ``rank`` for local shards ``q [B, L, H, D]``, ``k [B, L, Hkv, D]``.

    ``mask`` None (or causal/full only, on a classic layout) plans with :func:`plan_step`; otherwise the
    pieces of every rank are tested pair by pair. Backends: one :func:`select` per distinct call kind
    (the same calls on every rank), so a mask the backend cannot express raises the same ValueError
    everywhere, before any ring communication.
    """
    b, L = q.shape[0], q.shape[1]
    n, s_glob = world_size, q.shape[1] * world_size
    if mask is not None:
        check_mask(mask, b, s_glob, layout)
    if mask is None or (mask.kinds <= {"causal"} and layout != "docs"):
        c = bool(causal if mask is None else mask.causal)
        record = select(backend, q, k, _LOCAL[c])
        every_c = [[plan_step(layout, c, r, (r - s) % n, n, L) for s in range(n)] for r in range(n)]
        calls = [tuple(Call(x.q_start, x.q_end - x.q_start, x.k_start, x.k_end - x.k_start, classic=x.causal)
                       for x in every_c[rank][s]) for s in range(n)]
        work = [sum((x.q_end - x.q_start) * (x.k_end - x.k_start) for cs in row for x in cs) for row in every_c]
        held, home = row_ranges([[[(x.k_start, x.k_end) for x in cs] for cs in row] for row in every_c], n, L)
        return RingPlan(n, calls, [[_LOCAL[x.classic] for x in cs] for cs in calls],
                        [[record] * len(cs) for cs in calls], work, held, home, rank)
    every = _generic_calls(mask, layout, n, s_glob)
    steps = 1 + max((s for r in range(n) for s in range(1, n) if every[r][s]), default=0)
    ids = None if mask.doc_ids is None else mask.doc_ids.to(q.device)
    reduced: dict = {}
    records: dict = {}
    for r in range(n):  # one select per (kinds, aligned) signature, in a fixed order: the same on all ranks
        for s in range(steps):
            for c in every[r][s]:
                sig = (c.kinds, c.q_offset == c.k_offset and c.q_len == c.k_len and c.q_stride == c.k_stride)
                if sig not in records:
                    m = reduced.setdefault(c.kinds, _reduced(mask, c.kinds, ids))
                    records[sig] = select(backend, q[:, :c.q_len], k[:, :c.k_len], _local_mask(m, c, q.device))
    mine = every[rank][:steps]
    masks = [[_local_mask(reduced[c.kinds], c, q.device) for c in cs] for cs in mine]
    recs = [[records[(c.kinds, c.q_offset == c.k_offset and c.q_len == c.k_len and c.q_stride == c.k_stride)]
             for c in cs] for cs in mine]
    work = [sum(c.q_len * c.k_len for s in range(steps) for c in every[r][s]) for r in range(n)]
    held, home = row_ranges([[[(c.k_start, c.k_start + c.k_len) for c in cs] for cs in row[:steps]] for row in every],
                            steps, L)
    return RingPlan(steps, mine, masks, recs, work, held, home, rank)


# ------------------------------------------------------------------------------ masked work per rank
def visible_keys_per_query(mask: Mask, batch: int, seq_len: int) -> Tensor:
    """``[B, S]`` int64: how many keys each query sees under ``mask`` (exact; documents, causal, window
    and sinks in O(S); a block-sparse layout through a dense check, for small S)."""
    pos = torch.arange(seq_len)[None].expand(batch, seq_len)
    if mask.doc_ids is not None:
        ids = mask.doc_ids.detach().to("cpu", torch.int64).contiguous()
        ds = torch.searchsorted(ids, ids, side="left")
        de = torch.searchsorted(ids, ids, side="right") - 1
    else:
        ds, de = torch.zeros_like(pos), torch.full_like(pos, seq_len - 1)
    hi = pos if mask.causal else de
    if mask.block_sparse is not None:
        size, vis = mask.block_sparse
        j = torch.arange(seq_len)
        out = torch.empty(batch, seq_len, dtype=torch.int64)
        for i0 in range(0, seq_len, 256):  # dense [B, 256, S] per chunk of queries
            i = pos[:, i0:i0 + 256, None]
            ok = (j >= ds[:, i0:i0 + 256, None]) & (j <= hi[:, i0:i0 + 256, None])
            if mask.window is not None:
                win = i - j <= mask.window  # j <= i already holds when causal (hi)
                if not mask.causal:
                    win &= j - i <= mask.window
                sink = (j - ds[:, i0:i0 + 256, None]) < mask.sinks
                ok &= win | sink
            ok &= vis.cpu()[(i // size), (j // size)[None, None]]
            out[:, i0:i0 + 256] = ok.sum(-1)
        return out
    if mask.window is None:
        return hi - ds + 1
    w = mask.window
    lo_w, hi_w = torch.maximum(ds, pos - w), torch.minimum(hi, pos + w)
    cnt = (hi_w - lo_w + 1).clamp_min(0)
    if mask.sinks > 0:
        sink_hi = torch.minimum(ds + mask.sinks - 1, hi)
        cnt += (torch.minimum(sink_hi, lo_w - 1) - ds + 1).clamp_min(0)  # sinks left of the window
        cnt += (sink_hi - torch.maximum(ds, hi_w + 1) + 1).clamp_min(0)  # right of it (two-sided)
    return cnt


def visible_pairs_per_rank(mask: Mask, layout: str, world_size: int, seq_len: int,
                           batch: Optional[int] = None) -> list[int]:
    """Visible (query, key) pairs of each rank's queries: the masked work of each rank, so a benchmark
    can show the (im)balance of a layout. ``batch`` defaults to ``doc_ids``' rows (else 1)."""
    b = batch if batch is not None else (mask.doc_ids.shape[0] if mask.doc_ids is not None else 1)
    per_query = visible_keys_per_query(mask, b, seq_len)
    return [int(per_query[:, local_positions(seq_len, r, world_size, layout, doc_ids=mask.doc_ids)].sum())
            for r in range(world_size)]


def ring_work(mask: Mask, layout: str, world_size: int, local_len: int, batch: int = 1) -> dict:
    """What the plan runs: ring ``steps``, kernel ``calls`` per rank and the (query, key) pairs the
    calls cover per rank (``pairs``; >= the visible pairs, which :func:`visible_pairs_per_rank` gives)."""
    q = torch.empty(batch, local_len, 1, 8)
    calls, work, steps = [], [], 0
    for r in range(world_size):
        p = build_plan(q, q, mask=mask, causal=False, layout=layout, rank=r, world_size=world_size, backend="torch")
        calls.append(p.num_calls)
        steps, work = p.steps, p.work
    return {"steps": steps, "calls": calls, "pairs": work}
