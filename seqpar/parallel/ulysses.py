"""DeepSpeed-Ulysses attention: trade the sequence split for a head split with two all-to-alls.

Each rank enters with its sequence shard ``q [B, L, H, D]`` (any layout of :mod:`seqpar.parallel.layout`).
One all-to-all (:func:`seqpar.parallel.collectives.seq_to_head`) gives every rank the WHOLE sequence for
``H / N`` heads, in rank order; one index permutation puts the tokens in global order, where the local
kernel runs once with the user's global :class:`~seqpar.ops.Mask` (documents, windows, sinks, block-sparse
need nothing special: the kernel sees the sequence as a single device would). The result is permuted back
and returned to the sequence split by the inverse all-to-all. Differentiable end to end: the all-to-alls
are each other's adjoints and the rest is autograd.

Overlap (``slices=C > 1``; default 1, see :data:`DEFAULT_SLICES`): a rank's ``H/N`` heads are cut into ``C``
chunks (GQA groups whole); the all-to-all of chunk ``c+1`` is in flight while chunk ``c`` computes, and chunk
``c``'s result travels back while ``c+1`` computes (forward and backward alike,
:class:`~seqpar.parallel.ulysses_comm.HeadChunkComm`): only the first chunk's inputs and the last chunk's results
are exposed. Heads are independent, so the result does not depend
on ``C``. The backward keeps the whole-sequence q/k/v/out/lse of each chunk from the forward (as large as
the local shards) and moves dout, dq, dk, dv by chunks the same way.

GQA: K/V heads split over the group too. When ``N`` does not divide ``Hkv`` (e.g. 2 KV heads on 4 ranks),
each KV head is replicated ``R = N / gcd(Hkv, N)`` times (LoongTrain / Transformer Engine), just enough for
an even split; ``repeat_interleave``'s backward sums the replicas' gradients into the original head.
Query heads must be divisible by ``N`` (checked, one clear error).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import LocalMask, Mask, select
from seqpar.ops.attention.registry import backward_delta
from seqpar.parallel.collectives import group_size
from seqpar.parallel.layout import local_positions
from seqpar.parallel.ring_attention import ring_mask, validate_inputs
from seqpar.parallel.ring_plan import check_mask
from seqpar.parallel.ulysses_comm import HeadChunkComm

# Head chunks per rank by default: 1 (one all-to-all per tensor). Chunking (2-4) hides all but a 1/C share of the
# all-to-alls in the model, but measured on 2 x H200 (2026-11-29) it did not pay: 4 chunks gave 508 TFLOP/s/GPU at
# 128k vs 515 unchunked (ring 534 both), and llama3-8b at 128k ran 6% behind the ring where unchunked Ulysses had
# tied it at 64k (more, smaller all-to-alls and kernel calls). Kept as an option (parallel.ulysses_chunks).
DEFAULT_SLICES = 1


def kv_replication(n_heads: int, n_kv_heads: int, group: int) -> int:
    """How many times each KV head is replicated so ``group`` ranks get whole KV heads (1: none).

    Raises ValueError naming ``model.n_heads`` / ``parallel.ulysses`` and the modes that would work when
    the query heads do not split over the group."""
    if n_heads % group != 0:
        fits = [u for u in range(2, group + 1) if n_heads % u == 0 and group % u == 0]
        raise ValueError(
            f"Ulysses splits attention heads over its group: model.n_heads={n_heads} query heads are not divisible "
            f"by the Ulysses group of {group} ranks (parallel.ulysses={group} with cp_comm=hybrid, parallel.cp={group} "
            "with cp_comm=ulysses); use "
            "parallel.cp_comm=ring or parallel.cp_comm=allgather (any head count)"
            + (f", or parallel.cp_comm=hybrid with parallel.ulysses={fits[-1]}." if fits else "."))
    return group // math.gcd(n_kv_heads, group)


def replicate_kv(k: Tensor, reps: int) -> Tensor:
    """``k [B, S, Hkv, D]`` -> ``[B, S, Hkv * reps, D]``: KV head ``m`` becomes heads ``m*reps .. m*reps+reps-1``,
    so query head ``h`` still reads (a copy of) KV head ``h // (H / Hkv)``."""
    return k if reps == 1 else k.repeat_interleave(reps, dim=2)


@functools.lru_cache(maxsize=64)
def _order_cached(seq_len: int, ranks: tuple, n: int, layout: str, device: Optional[torch.device]) -> Tensor:
    # Positions depend only on the arguments (no doc ids): one host-to-device copy per shape, not per layer.
    return torch.cat([local_positions(seq_len, r, n, layout) for r in ranks]).to(device)


def concat_positions(seq_len: int, ranks, n: int, layout: str, doc_ids: Optional[Tensor] = None,
                     device: Optional[torch.device] = None) -> Tensor:
    """Global positions ``[len(ranks) * L]`` (int64, on ``device``, default CPU) of the shards of ``ranks`` (of
    ``n``) concatenated in that order: what a rank holds after :func:`seq_to_head` over those ranks."""
    if layout == "docs":
        return torch.cat([local_positions(seq_len, r, n, layout, doc_ids=doc_ids.cpu()) for r in ranks]).to(device)
    return _order_cached(seq_len, tuple(ranks), n, layout, None if device is None else torch.device(device))


def check_shapes(q: Tensor, k: Tensor, v: Tensor, group, layout: str, causal: bool,
                 mask: Optional[Mask]) -> Optional[Mask]:
    """Same-on-every-rank checks (shapes across ranks, mask vs global length); returns the mask or None."""
    mask = ring_mask(causal, mask)
    validate_inputs(q, k, v, group, layout)
    if mask is not None or layout == "docs":
        check_mask(mask if mask is not None else Mask(causal=causal), q.shape[0], q.shape[1] * group_size(group),
                   layout)
    return mask


def head_chunks(n_heads: int, n_kv_heads: int, group: int, slices: Optional[int] = None) -> int:
    """Head chunks per rank: ``min(slices, KV heads per rank)``, lowered until it divides them (GQA groups
    stay whole). ``slices=None``: :data:`DEFAULT_SLICES`; 1: no overlap. Raises ValueError for ``slices < 1``."""
    if slices is None:
        slices = DEFAULT_SLICES
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"slices={slices!r} must be a positive integer (1: one all-to-all per tensor, no overlap).")
    per_rank = n_kv_heads // group
    c = max(1, min(slices, per_rank))
    while per_rank % c:
        c -= 1
    return c


class UlyssesAttentionFn(torch.autograd.Function):
    """Chunked, overlapped Ulysses on local shards (``k``, ``v`` already replicated to whole KV heads per rank);
    returns out ``[B, L, H, D]`` and lse ``[B, H, L]`` (lse not moved, and None, unless ``need_lse``)."""

    @staticmethod
    def forward(ctx, q, k, v, comm, record, lm, scale, order, to_global, need_lse):
        n, chunks = comm.n, comm.chunks
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty((*q.shape[:2], n, chunks, q.shape[2] // (n * chunks), q.shape[3]))
        lse = out.new_empty(out.shape[:-1], dtype=lse_dtype) if need_lse else None
        saved, back = [], []
        pending = comm.to_head([q, k, v], 0)
        for c in range(chunks):
            nxt = comm.to_head([q, k, v], c + 1) if c + 1 < chunks else None  # in flight while c computes
            qh, kh, vh = (t[:, to_global] for t in pending.wait())  # global order, whole sequence
            o, l = record.forward(qh, kh, vh, lm, softmax_scale=scale)
            saved += [qh, kh, vh, o, l]
            back.append((comm.to_seq([o[:, order]]),  # travels home while the next chunk computes
                         comm.to_seq([l.to(lse_dtype).transpose(1, 2)[:, order, :, None]]) if need_lse else None))
            pending = nxt
        for c, (po, pl) in enumerate(back):
            out[:, :, :, c] = po.wait()[0]
            if pl is not None:
                lse[:, :, :, c] = pl.wait()[0][..., 0]
        ctx.save_for_backward(*saved)
        ctx.args = (comm, record, lm, scale, order, to_global, q.shape, k.shape, v.shape, q.dtype)
        ctx.set_materialize_grads(False)
        return out.flatten(2, 4), None if lse is None else lse.flatten(2, 4).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout, dlse):
        comm, record, lm, scale, order, to_global, q_shape, k_shape, v_shape, dtype = ctx.args
        saved, n, chunks = ctx.saved_tensors, comm.n, comm.chunks
        device = saved[0].device
        grads = [torch.empty((*shp[:2], n, chunks, shp[2] // (n * chunks), shp[3]), dtype=dtype, device=device)
                 for shp in (q_shape, k_shape, v_shape)]
        dout = torch.zeros(q_shape, dtype=dtype, device=device) if dout is None else dout
        dl_seq = None if dlse is None else dlse.transpose(1, 2)[..., None].contiguous()  # [B, L, H, 1]
        start = lambda c: (comm.to_head([dout], c), None if dl_seq is None else comm.to_head([dl_seq], c))
        pending, back = start(0), []
        for c in range(chunks):
            nxt = start(c + 1) if c + 1 < chunks else None  # in flight while c computes
            qh, kh, vh, o, l = saved[5 * c:5 * c + 5]
            g = pending[0].wait()[0][:, to_global]
            dl = None if pending[1] is None else pending[1].wait()[0][:, to_global, :, 0].transpose(1, 2)
            delta = backward_delta([record], g, o, dl)  # [B, h, S], or None (the kernel recomputes it)
            extra = {} if delta is None else {"delta": delta}
            dq, dk, dv = record.backward(g, qh, kh, vh, o, l, lm, softmax_scale=scale, **extra)
            back.append(comm.to_seq([t.to(dtype)[:, order] for t in (dq, dk, dv)]))
            pending = nxt
        for c, p in enumerate(back):
            for grad, got in zip(grads, p.wait()):
                grad[:, :, :, c] = got
        return (*(g.flatten(2, 4) for g in grads), None, None, None, None, None, None, None)


def _ulysses(q, k, v, group, causal, mask, scale, layout, backend, need_lse, slices):
    n = group_size(group)
    b, L, h, d = q.shape
    s = n * L
    reps = kv_replication(h, k.shape[2], n)
    k, v = replicate_kv(k, reps), replicate_kv(v, reps)
    comm = HeadChunkComm(group, head_chunks(h, k.shape[2], n, slices))
    order = concat_positions(s, range(n), n, layout, None if mask is None else mask.doc_ids, q.device)
    to_global = torch.argsort(order)  # x_global = x_cat[:, to_global]; x_cat = x_global[:, order]
    lm = LocalMask(causal=causal) if mask is None else mask.local(0, s, 0, s, device=q.device)
    hc, kc = h // (n * comm.chunks), k.shape[2] // (n * comm.chunks)
    # A zero-stride view stands in for one chunk's whole-sequence q/k: the choice reads shapes, dtype and device.
    record = select(backend, q[:, :1, :hc].expand(b, s, hc, d), k[:, :1, :kc].expand(b, s, kc, d), lm)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    return UlyssesAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), comm, record, lm, scale, order,
                                    to_global, need_lse)


def ulysses_attention_with_lse(
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
) -> tuple[Tensor, Tensor]:
    """Exact attention over the sequence sharded across ``group`` by ``layout``, by head-parallel all-to-all.

    Args: local shards from ``shard_sequence(x, 1, group, layout)`` (``doc_ids=`` for ``layout="docs"``):
    q ``[B, L, H, D]``, k/v ``[B, L, Hkv, D]`` (``H % N == 0``; KV heads replicated when ``N`` does not
    divide ``Hkv``); ``causal`` on global positions or ``mask=Mask(...)`` with GLOBAL ``doc_ids``;
    ``softmax_scale`` default ``1/sqrt(D)``; ``backend`` the local kernel (whole sequence, ``H/N`` heads);
    ``validate`` gathers every rank's shapes first so bad input raises everywhere instead of hanging;
    ``slices``: head chunks per rank pipelined against the all-to-alls (default ``min(4, KV heads per rank)``, cut
    to a divisor of them; 1: no overlap); every rank must pass the same value, the result does not depend on it.
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32; natural log). Differentiable.
    Raises ValueError for heads not divisible by the group, shapes that differ across ranks, a length
    the layout cannot split, a mask that does not fit the global sequence.
    """
    mask = check_shapes(q, k, v, group, layout, causal, mask) if validate else ring_mask(causal, mask)
    return _ulysses(q, k, v, group, causal, mask, softmax_scale, layout, backend, True, slices)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False,
                      mask: Optional[Mask] = None, softmax_scale: Optional[float] = None, layout: str = "zigzag",
                      backend: str = "auto", validate: bool = True, slices: Optional[int] = None) -> Tensor:
    """Like :func:`ulysses_attention_with_lse` but returns only out ``[B, L, H, D]`` (no lse all-to-all)."""
    mask = check_shapes(q, k, v, group, layout, causal, mask) if validate else ring_mask(causal, mask)
    return _ulysses(q, k, v, group, causal, mask, softmax_scale, layout, backend, False, slices)[0]


__all__ = ["concat_positions", "head_chunks", "kv_replication", "replicate_kv", "ulysses_attention",
           "ulysses_attention_with_lse"]
