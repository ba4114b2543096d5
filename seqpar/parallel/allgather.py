"""All-gather-KV context parallelism (Llama 3's scheme): every rank gathers the whole sequence's K/V and
attends its own queries to the visible part of it, one head slice at a time so the transfers hide behind
the kernels.

Heads are cut into ``slices`` groups of consecutive KV heads, each with its query heads (GQA groups stay
whole, so every slice is an independent attention problem and the result is that of ``slices=1``). K/V of
a slice travel un-expanded (``[B, L, h, D]`` per rank, K and V in one collective,
:class:`~seqpar.parallel.allgather_comm.KVSliceComm`):

* forward: the gather of slice ``i+1`` is launched before slice ``i`` computes; only slice 0's is exposed.
* backward: K/V are gathered AGAIN per slice (pipelined the same way) rather than saved: saving them would
  keep ``2 S Hkv D`` elements per layer (the whole sequence's K/V, ``N`` times the local shard) alive until
  the backward; re-gathering costs one more hidden transfer. Slice ``i``'s dK/dV (fp32, global order)
  are reduce-scattered asynchronously while slice ``i+1`` computes; only the last one is exposed. The
  sum over ranks runs in fp32, one rounding to k's dtype at the owner.

Within a slice, the gathered keys are put in global order; each run of this rank's queries
(``layout.rank_pieces``: global positions ``start + stride * a``) is one kernel call against the key range it
can see (causality, the window and the documents of its first and last query bound it; sinks or
block-sparse only narrow it further inside the kernel), with the global :class:`~seqpar.ops.Mask`
restricted by :meth:`Mask.local` to those positions. Every mask kind and every layout therefore run.

Kernels that take a causal mask only on the aligned diagonal (cuDNN, flash): a run of consecutive queries
``[a, a + n)`` under a plain causal mask sees keys ``[0, a)`` entirely and ``[a, a + n)`` as a diagonal, so it
is cut into those two calls (a fully visible block and an aligned diagonal) whose (out, lse) merge exactly, as
the ring merges its blocks; their backward takes the merged out and lse. ``backend="auto"`` cuts a run when
the parts get a backend ranked before the whole run's (:data:`~seqpar.ops.attention.registry.AUTO_ORDER`:
cuDNN rather than Triton on a GPU); a named backend is cut only when it cannot express the whole run.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import LocalMask, Mask, select
from seqpar.ops.attention.registry import AUTO_ORDER, backward_delta
from seqpar.ops.merge import merge_attention
from seqpar.parallel.allgather_comm import KVSliceComm
from seqpar.parallel.collectives import group_rank, group_size
from seqpar.parallel.layout import rank_pieces
from seqpar.parallel.ring_attention import ring_mask
from seqpar.parallel.ulysses import check_shapes, concat_positions

DEFAULT_SLICES = 4  # enough to hide all but a quarter of the gather; more only adds launches and latency


def key_range(mask: Mask, first: int, last: int, seq_len: int, ids: Optional[Tensor] = None) -> tuple[int, int]:
    """``[lo, hi)``: the keys queries at global positions ``first .. last`` can see at most (host-side;
    ``ids``: a CPU int64 copy of ``mask.doc_ids``, to read a GPU mask once per call)."""
    lo, hi = 0, seq_len
    if mask.causal:
        hi = last + 1
    if mask.window is not None:
        if not mask.causal:
            hi = min(hi, last + mask.window + 1)
        if mask.sinks == 0:  # sinks sit at document (sequence) starts, left of any window
            lo = max(lo, first - mask.window)
    if mask.doc_ids is not None:
        ids = mask.doc_ids.detach().to("cpu", torch.int64).contiguous() if ids is None else ids  # [B, S]
        lo = max(lo, int(torch.searchsorted(ids, ids[:, first:first + 1].contiguous(), side="left").min()))
        hi = min(hi, int(torch.searchsorted(ids, ids[:, last:last + 1].contiguous(), side="right").max()))
    return lo, hi


def head_slices(n_heads: int, n_kv_heads: int, slices: Optional[int] = None) -> list[tuple[slice, slice]]:
    """``(kv_heads, q_heads)`` index slices of each head slice: ``min(slices, n_kv_heads)`` groups of consecutive
    KV heads (sizes differ by at most one), each with the query heads that read them (query head ``h`` reads
    KV head ``h // (n_heads / n_kv_heads)``). ``slices=None``: ``min(4, n_kv_heads)``; 1: no overlap.
    Raises ValueError for ``slices < 1``."""
    if slices is None:
        slices = DEFAULT_SLICES
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"slices={slices!r} must be a positive integer (1: gather all heads at once, no overlap).")
    count, g = min(slices, n_kv_heads), n_heads // n_kv_heads
    bounds = [n_kv_heads * i // count for i in range(count + 1)]
    return [(slice(a, b), slice(a * g, b * g)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class _Part:
    """One kernel call: the run's queries against global keys ``[lo, hi)`` under ``lm`` on ``record``."""
    lo: int
    hi: int
    lm: LocalMask
    record: object


@dataclass
class _Run:
    """Local queries ``[l0, l0 + length)``: one kernel call, or a fully visible block + an aligned diagonal."""
    l0: int
    length: int
    parts: list


@dataclass(frozen=True)
class AllGatherPlan:
    """What every slice repeats: the kernel calls and their backends (the same for every head slice: heads
    do not enter the choice), the token permutations, the head slices."""
    runs: list
    order: Tensor      # [S] global position of each gathered token (rank order)
    to_global: Tensor  # [S] inverse: gathered[:, to_global] is in global order
    heads: list

    @property
    def records(self) -> list:
        return [p.record for r in self.runs for p in r.parts]


def _rank(record, device: torch.device) -> int:
    order = AUTO_ORDER.get(device.type, ("torch",))
    return order.index(record.name) if record.name in order else len(order)


def _plan_run(q, k, mask: Mask, start: int, length: int, stride: int, lo: int, hi: int, backend: str,
              split: Optional[bool]) -> list:
    """The parts of one run (see the module docstring): ``split`` True cuts every run it can, False none,
    None as the backend decides."""
    qr = q[:, :length]
    # A zero-stride view stands in for the keys: the choice reads only their count, dtype and device.
    keys = lambda a, b: k[:, :1].expand(-1, b - a, -1, -1)
    local = lambda a, b: mask.local(start, length, a, b - a, q_stride=stride, device=q.device)
    plain = mask.causal and mask.window is None and mask.sinks == 0 and mask.doc_ids is None \
        and mask.block_sparse is None
    cuttable = split is not False and plain and stride == 1 and lo < start and hi == start + length
    part = lambda a, b, lm: _Part(a, b, lm, select(backend, qr, keys(a, b), lm))
    try:
        whole, refused = [part(lo, hi, local(lo, hi))], None
    except ValueError as e:
        whole, refused = None, e
    if cuttable:
        try:
            parts = [part(a, b, local(a, b)) for a, b in ((lo, start), (start, hi))]
        except ValueError:
            parts = None
        if parts is not None and (split or whole is None or (backend == "auto" and max(
                _rank(p.record, q.device) for p in parts) < _rank(whole[0].record, q.device))):
            return parts
    if whole is None:
        raise refused
    return whole


def build_plan(q: Tensor, k: Tensor, mask: Mask, group, layout: str, backend: str,
               slices: Optional[int], split: Optional[bool] = None) -> AllGatherPlan:
    """The plan of this rank (host-side; identical inputs give identical plans). Raises the registry's
    ValueError, before any communication, when ``backend`` cannot express a call."""
    heads = head_slices(q.shape[2], k.shape[2], slices)
    n, rank = group_size(group), group_rank(group)
    s = n * q.shape[1]
    order = concat_positions(s, range(n), n, layout, mask.doc_ids, q.device)
    ids = None if mask.doc_ids is None else mask.doc_ids.detach().to("cpu", torch.int64).contiguous()
    runs, l0 = [], 0
    for start, length, stride in rank_pieces(s, rank, n, layout, mask.doc_ids):
        lo, hi = key_range(mask, start, start + stride * (length - 1), s, ids)
        runs.append(_Run(l0, length, _plan_run(q, k, mask, start, length, stride, lo, hi, backend, split)))
        l0 += length
    return AllGatherPlan(runs, order, torch.argsort(order), heads)


def _merge(outs: list, lses: list) -> tuple:
    """Exact merge of partial attentions over disjoint key sets: ``[B, n, h, D]`` outs, ``[B, h, n]`` fp32 lses."""
    if len(outs) == 1:
        return outs[0], lses[0]
    out, lse = functools.reduce(lambda a, b: merge_attention(*a, *b), zip(outs, lses))
    return out.to(outs[0].dtype), lse


def _gather(comm: KVSliceComm, k: Tensor, v: Tensor, plan: AllGatherPlan, i: int):
    """Launch the gather of slice ``i`` (None past the last)."""
    if i >= len(plan.heads):
        return None
    kv = plan.heads[i][0]
    return comm.all_gather(k[:, :, kv], v[:, :, kv])


def _forward(q, k, v, comm: KVSliceComm, plan: AllGatherPlan, scale: float):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, L, H, D]
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.promote_types(q.dtype, torch.float32))
    pending = _gather(comm, k, v, plan, 0)
    for i, (_, hq) in enumerate(plan.heads):
        nxt = _gather(comm, k, v, plan, i + 1)  # in flight while this slice computes
        kv = pending.wait()[:, :, plan.to_global]  # [2, B, S, h, D] global order
        qi = q[:, :, hq]
        for r in plan.runs:
            rows = slice(r.l0, r.l0 + r.length)
            qr, outs, lses = qi[:, rows].contiguous(), [], []
            for p in r.parts:
                o, l = p.record.forward(qr, kv[0][:, p.lo:p.hi].contiguous(), kv[1][:, p.lo:p.hi].contiguous(), p.lm,
                                        softmax_scale=scale)
                outs.append(o)
                lses.append(l)
            out[:, rows, hq], lse[:, hq, rows] = _merge(outs, lses)
        pending = nxt
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, comm: KVSliceComm, plan: AllGatherPlan, scale: float):
    acc = torch.promote_types(k.dtype, torch.float32)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    pending, reducing = _gather(comm, k, v, plan, 0), None
    for i, (hk, hq) in enumerate(plan.heads):
        nxt = _gather(comm, k, v, plan, i + 1)
        kv = pending.wait()[:, :, plan.to_global]  # [2, B, S, h, D] global order
        qi, oi, gi, li = q[:, :, hq], out[:, :, hq], dout[:, :, hq], lse[:, hq]
        delta = backward_delta(plan.records, gi, oi, None if dlse is None else dlse[:, hq])  # [B, h*G, L] or None
        dkv = kv.new_zeros(kv.shape, dtype=acc)  # this rank's dK, dV of every key of the slice, fp32
        for r in plan.runs:
            rows = slice(r.l0, r.l0 + r.length)
            g_r, q_r, o_r = (t[:, rows].contiguous() for t in (gi, qi, oi))
            l_r = li[:, :, rows].contiguous()
            d_r = None if delta is None else delta[:, :, rows].contiguous()
            dq_sum = None
            for p in r.parts:  # each part's backward with the run's merged out and lse
                keys = slice(p.lo, p.hi)
                extra = {} if d_r is None else {"delta": d_r}
                if p.record.ring_accumulators and acc == torch.float32:  # the kernel adds into fp32 views in place
                    extra.update(dk_acc=dkv[0][:, keys], dv_acc=dkv[1][:, keys])
                dq_r, dk_r, dv_r = p.record.backward(g_r, q_r, kv[0][:, keys].contiguous(), kv[1][:, keys].contiguous(),
                                                     o_r, l_r, p.lm, softmax_scale=scale, **extra)
                dq_sum = dq_r if dq_sum is None else dq_sum.to(acc) + dq_r.to(acc)  # two parts: one rounding
                if dk_r is not extra.get("dk_acc"):
                    dkv[0][:, keys] += dk_r
                    dkv[1][:, keys] += dv_r
            dq[:, rows, hq] = dq_sum  # every local query is in exactly one run
        started = comm.reduce_scatter(dkv[:, :, plan.order])  # rank order; sums while the next slice computes
        if reducing is not None:
            _store(reducing, dk, dv)
        reducing, pending = (started, hk), nxt
    _store(reducing, dk, dv)
    return dq, dk, dv


def _store(reducing, dk: Tensor, dv: Tensor) -> None:
    started, hk = reducing
    mine = started.wait()  # [2, B, L, h, D]: every rank's gradient of this rank's keys, summed
    dk[:, :, hk] = mine[0]
    dv[:, :, hk] = mine[1]


class AllGatherAttentionFn(torch.autograd.Function):
    """Sliced all-gather forward/backward on local shards; saves q, k, v, out and lse (local sizes only)."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale):
        comm = KVSliceComm(group)
        out, lse = _forward(q, k, v, comm, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (comm, plan, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        comm, plan, scale = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = _backward(dout, dlse, q, k, v, out, lse, comm, plan, scale)
        return dq, dk, dv, None, None, None


def allgather_attention_with_lse(
    q: Tensor,  # [B, L, H, D] local shard
    k: Tensor,  # [B, L, Hkv, D]
    v: Tensor,  # [B, L, Hkv, D]
    *,
    group=None,
    causal: bool = False,
    mask: Optional[Mask] = None,
    softmax_scale: Optional[float] = None,
    layout: str = "zigzag",
    backend: str = "auto",
    validate: bool = True,
    slices: Optional[int] = None,
    split_causal: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention over the sequence sharded across ``group`` by ``layout``, by all-gathering K/V.

    Args as :func:`seqpar.parallel.ulysses_attention_with_lse` (any ``H % Hkv == 0``; no head constraint);
    ``slices``: head slices pipelined so each slice's transfer hides behind the previous one's kernels
    (default ``min(4, Hkv)``; at most ``Hkv``, a larger value is cut to it; 1: one gather, no overlap). The
    result does not depend on it (heads are independent). Every rank must pass the same ``slices``.
    ``split_causal``: cut runs under a plain causal mask into a fully visible block + an aligned diagonal
    (module docstring): None as the backend needs (default), True wherever a run allows it, False never.
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32, fp64 for fp64; natural log).
    Differentiable in q, k, v (dK/dV reduce-scattered to their owners).
    Raises ValueError for shapes that differ across ranks, a length the layout cannot split, a mask that
    does not fit the global sequence or that the backend cannot express, ``slices < 1``.
    """
    mask = check_shapes(q, k, v, group, layout, causal, mask) if validate else ring_mask(causal, mask)
    mask = mask if mask is not None else Mask(causal=causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plan = build_plan(q, k, mask, group, layout, backend, slices, split_causal)
    return AllGatherAttentionFn.apply(q, k, v, group, plan, scale)


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`allgather_attention_with_lse` but returns only out ``[B, L, H, D]``."""
    return allgather_attention_with_lse(q, k, v, **kwargs)[0]
