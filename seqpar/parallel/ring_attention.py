"""Ring Attention: exact attention over a sequence sharded across a process group.

Each rank keeps its query shard ``q [B, L, H, D]``; the key/value shards ``[B, L, Hkv, D]`` (never
expanded for GQA) travel around the ring (``seqpar.parallel.ring``) while the local kernel
(``seqpar.ops``, chosen by ``backend``) computes on the block in hand. Step ``i`` on rank ``r``
holds the K/V of rank ``(r - i) mod N``.

Forward: partial ``(out, lse)`` of every block merge in fp32 by log-sum-exp, one pass per merge
(``seqpar.ops.accumulate``; a fused Triton kernel on CUDA, the torch reference elsewhere).
Backward: the saved FINAL lse and ``delta = rowsum(dout * out)`` make every block's gradient exact on
its own (FlashAttention's recompute), so dQ accumulates locally and dK/dV accumulate in fp32 in
buffers that travel with K/V and arrive back at their owner after the last step.

Which block pairs run comes from the plan (:mod:`seqpar.parallel.ring_plan`), computed from the
arguments alone, identically on every rank: per ring step only the visible (query piece, key piece)
pairs run, one kernel call each with its :class:`~seqpar.ops.attention.LocalMask` (global offsets and
strides of the pieces) on the backend the registry selects for it; a step with no visible pair on a
rank makes no kernel call, and the ring stops after the last step any rank needs (``plan.steps``):
the K/V blocks it skips are never sent, and the dK/dV accumulators go home in one direct hop.
A hop moves only the key rows that calls on later steps use (``plan.held``: spans sent back to back, e.g.
the last ``W`` keys of a shard for a causal window ``W`` on contiguous shards, plus the sinks' first keys;
:mod:`seqpar.parallel.ring_rows`), and the backward sends back the dK/dV of just those rows (``plan.home``),
which the owner adds to its own at their offsets.
Every :class:`~seqpar.ops.Mask` kind runs (documents, windows incl. two-sided, sinks, block-sparse)
on every layout (``zigzag``, ``striped``, ``contiguous`` and the document-balanced ``docs``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.ops.attention import Mask
from seqpar.ops.attention.registry import backward_delta
from seqpar.ops.accumulate import RunningAttention, RunningSum
from seqpar.ops.merge import MERGE_IMPLS, merge_impl
from seqpar.parallel.layout import LAYOUTS, required_multiple
from seqpar.parallel.ring import RingComm
from seqpar.parallel.ring_plan import BlockCall, RingPlan, build_plan, plan_step  # noqa: F401  (re-exported)
from seqpar.parallel.ring_rows import compact_row, num_rows


_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _coords(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("ring_attention got a process group but torch.distributed is not initialised.")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _describe(row: list[int]) -> str:
    dt = [str(_DTYPES[i]).replace("torch.", "") if 0 <= i < len(_DTYPES) else "other" for i in row[12:15]]
    return f"q{tuple(row[0:4])} {dt[0]}, k{tuple(row[4:8])} {dt[1]}, v{tuple(row[8:12])} {dt[2]}"


def validate_inputs(q: Tensor, k: Tensor, v: Tensor, group, layout: str) -> None:
    """Raise the same ValueError on every rank for shapes a ring cannot take (never a hang).

    Gathers every rank's shape tuple first (one tiny all_gather), so a mismatch seen by one rank is
    seen and reported by all; then checks the per-rank rules on identical data.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:  # same on every rank unless the shapes also differ, which the gather reports
            raise ValueError(f"ring_attention expects [batch, local_seq, heads, head_dim]; {name} has shape "
                             f"{tuple(t.shape)}.")
    code = lambda t: _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    mine = [*q.shape, *k.shape, *v.shape, code(q), code(k), code(v)]
    rank, n = _coords(group)
    rows = [mine]
    if n > 1:
        local = torch.tensor(mine, dtype=torch.int64, device=q.device)
        parts = [torch.empty_like(local) for _ in range(n)]
        dist.all_gather(parts, local, group=group)
        rows = [p.tolist() for p in parts]
        if any(r != rows[0] for r in rows):
            desc = "; ".join(f"rank {i}: {_describe(r)}" for i, r in enumerate(rows))
            raise ValueError(f"ring_attention inputs differ across the {n} ranks of the group ({desc}); "
                             "every rank must pass a shard of the same shape and dtype.")
    row = rows[0]
    qs, ks, vs = row[0:4], row[4:8], row[8:12]
    if ks != vs or qs[0] != ks[0] or qs[1] != ks[1] or qs[3] != ks[3]:
        raise ValueError(f"ring_attention shapes disagree: {_describe(row)}; k and v must match each other "
                         "and q in batch, local sequence length and head_dim.")
    if qs[2] % ks[2] != 0:
        raise ValueError(f"query heads {qs[2]} are not divisible by key/value heads {ks[2]}; "
                         "n_heads must be a multiple of n_kv_heads.")
    need = required_multiple(n, layout)
    if (qs[1] * n) % need != 0:
        raise ValueError(f"global sequence length {qs[1] * n} (local {qs[1]} x {n} ranks) is not divisible by "
                         f"{need}: layout={layout} needs a multiple of {need} (an even local length).")


def ring_mask(causal: bool, mask: Optional[Mask]) -> Optional[Mask]:
    """The ring's mask from ``causal`` or a ``Mask`` (None: the plain causal/full flag); raises the same
    ValueError on every rank (it reads only the arguments), before any communication."""
    if mask is None:
        return None
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a seqpar.ops.Mask; got {type(mask).__name__}.")
    if causal:
        raise ValueError("pass either causal=True or mask=Mask(...), not both; the Mask carries causal.")
    return mask


def _last_call(plan: RingPlan) -> tuple[int, int]:
    """(step, index) of the plan's last kernel call: the update that may write the final dtype."""
    for step in range(plan.steps - 1, -1, -1):
        if plan.calls[step]:
            return step, len(plan.calls[step]) - 1
    return -1, -1


def _row(plan: RingPlan, step: int, row: int) -> int:
    """Where owner-local key ``row`` sits in what this rank holds at ``step`` (the block itself, or its
    held spans back to back)."""
    return row if plan.held is None else compact_row(plan.held[step][plan.rank], row)


def _rows_of(x: Tensor, held, spans) -> Tensor:
    """The rows ``spans`` of a compact buffer ``x`` holding ``held``, back to back (a view for one span,
    contiguous when the batch is 1; else one copy)."""
    parts = [(compact_row(held, lo), hi - lo) for lo, hi in spans]
    if len(parts) == 1:
        return x[:, parts[0][0]:parts[0][0] + parts[0][1]].contiguous()
    return torch.cat([x[:, a:a + m] for a, m in parts], dim=1) if parts else x[:, :0]


def _hop(comm: RingComm, plan: RingPlan, kv: list, step: int):
    """Send at ``step`` the rows of the held block that the next rank holds at ``step + 1`` and receive
    the rows this rank holds then."""
    if plan.held is None:
        return comm.send_recv(kv)
    n, r = len(plan.held[0]), plan.rank
    cur, nxt, mine = plan.held[step][r], plan.held[step + 1][(r + 1) % n], plan.held[step + 1][r]
    send = kv if nxt == cur else [_rows_of(x, cur, nxt) for x in kv]
    return comm.send_recv(send, recv_rows=num_rows(mine))


def _ring_forward(q, k, v, comm: RingComm, plan: RingPlan, scale, merge: str = "auto"):
    """Returns out ``[B, L, H, D]`` in q's dtype and lse ``[B, H, L]`` in the accumulation dtype (fp32/fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    # One pass per merge (seqpar.ops.accumulate): the first partial kept as the kernel gave it, fp32 after,
    # the plan's last call writing q's dtype.
    run = RunningAttention(q.shape, q.dtype, q.device, merge_impl(merge, q))
    final_at = _last_call(plan)
    kv = [k, v]
    last = plan.steps - 1
    for step in range(plan.steps):
        handle = _hop(comm, plan, kv, step) if step < last else None  # next block in flight during compute
        for i, (c, lm, record) in enumerate(zip(plan.calls[step], plan.masks[step], plan.records[step])):
            k0 = _row(plan, step, c.k_start)
            qs, ks = slice(c.q_start, c.q_start + c.q_len), slice(k0, k0 + c.k_len)
            all_rows = c.q_start == 0 and c.q_len == q.shape[1]
            # A kernel that merges into running fp32 (out, lse) in place saves the separate merge pass.
            if record.ring_accumulators and acc == torch.float32 and all_rows and run.started:
                out_acc, lse_acc = run.buffers()
                record.forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], lm, softmax_scale=scale, out_acc=out_acc,
                               lse_acc=lse_acc)
                continue
            o, l = record.forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], lm, softmax_scale=scale)
            run.add(o, l, c.q_start, final=(step, i) == final_at)
        if handle is not None:
            kv = handle.wait()
    return run.result()  # no visible key anywhere (e.g. an all-False block-sparse layout): out 0, lse -inf


def _ring_backward(dout, q, k, v, out, lse, delta, group, plan: RingPlan, scale, merge: str = "auto"):
    """Returns dq ``[B, L, H, D]`` in q's dtype and dk, dv ``[B, L, Hkv, D]`` in k's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    impl = merge_impl(merge, q)
    kv_comm, dkv_comm = RingComm(group), RingComm(group)
    dq = RunningSum(q.shape, q.dtype, q.device, impl)
    final_at = _last_call(plan)
    # Every rank receives its neighbour's dK/dV into buffers shaped like what it sends itself, so the dtype
    # of each hop must agree everywhere: k's on the last; after step 0 of a classic plan (one call over all
    # keys on every rank, one backend) the kernel's own gradient, exact, half the bytes of fp32 and no cast
    # pass; fp32 otherwise.
    classic = bool(plan.calls[0]) and plan.calls[0][0].classic is not None
    # Trimmed hops: the rows of block o that steps >= 1 touch travel alone (in fp32, added once at home),
    # where that is fewer bytes than the whole block in k's dtype; the owner keeps its step-0 gradient.
    n, r, L = len(plan.work), plan.rank, k.shape[1]
    home = plan.home if plan.home is not None and \
        max(num_rows(h) for h in plan.home) * acc.itemsize < L * k.element_size() else None
    kv, dkv_handle, own = [k, v], None, None
    last = plan.steps - 1
    for step in range(plan.steps):
        kv_handle = _hop(kv_comm, plan, kv, step) if step < last else None
        # This rank's contributions to the held block's dK/dV are summed apart from the accumulators
        # arriving from the previous rank, so those are needed only after the compute (their transfer
        # overlaps it), then added in one pass.
        acc_rows = home[(r - step) % n] if home is not None and step > 0 else ((0, L),)
        sums = [RunningSum((t.shape[0], num_rows(acc_rows), *t.shape[2:]), t.dtype, t.device, impl) for t in (k, v)]
        for i, (c, lm, record) in enumerate(zip(plan.calls[step], plan.masks[step], plan.records[step])):
            k0, a0 = _row(plan, step, c.k_start), compact_row(acc_rows, c.k_start)
            qs, ks = slice(c.q_start, c.q_start + c.q_len), slice(k0, k0 + c.k_len)
            ka = slice(a0, a0 + c.k_len)  # the rows in the accumulators
            extra = {}
            if record.ring_accumulators and acc == torch.float32:  # the kernel adds into fp32 views in place
                extra = dict(dq_acc=dq.buffer()[:, qs], dk_acc=sums[0].buffer()[:, ka], dv_acc=sums[1].buffer()[:, ka])
            if record.takes_delta:
                extra["delta"] = delta[:, :, qs]
            dq_b, dk_b, dv_b = record.backward(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                                               lse[:, :, qs], lm, softmax_scale=scale, **extra)
            # A kernel that added into the given views returns them; otherwise add its fresh results.
            if dq_b is not extra.get("dq_acc"):
                dq.add(dq_b, c.q_start, final=(step, i) == final_at)
            if dk_b is not extra.get("dk_acc"):
                sums[0].add(dk_b, ka.start)
                sums[1].add(dv_b, ka.start)
        if home is not None and step == 0:  # the owner's own gradient stays here
            own = sums
            kv = kv_handle.wait()
            continue
        incoming = dkv_handle.wait() if dkv_handle is not None else (None, None)
        if kv_handle is not None:
            kv = kv_handle.wait()
        # Complete sums are rounded to k's dtype now, which the result gets anyway, so the hop that takes
        # them home (the one transfer nothing overlaps) carries half the bytes.
        dtype = acc if home is not None else k.dtype if step == last else (None if step == 0 and classic else acc)
        dk, dv = (s.added_to(a, dtype).contiguous() for s, a in zip(sums, incoming))  # a kernel's own may be strided
        # The accumulators travel with their K/V block; after the last step the block of rank
        # r - last is complete and goes straight home (shift -last; -(N-1) is the next rank).
        rows = None if home is None else num_rows(home[r] if step == last else home[(r - 1 - step) % n])  # sender's
        dkv_handle = dkv_comm.send_recv([dk, dv], shift=-last if step == last else 1, recv_rows=rows)
    dk, dv = dkv_handle.wait()
    if own is not None:  # rows home[r] of this block's gradient came home: add them at their offsets
        for s, t in zip(own, (dk, dv)):
            off = 0
            for j, (lo, hi) in enumerate(home[r]):
                s.add(t[:, off:off + hi - lo], lo, final=j == len(home[r]) - 1)
                off += hi - lo
        dk, dv = own[0].result(), own[1].result()
    return dq.result(), dk, dv


class RingAttentionFn(torch.autograd.Function):
    """Ring forward/backward on local shards; saves q, k, v, out (q's dtype) and the global lse."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale, merge="auto"):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the ring sends whole tensors
        out, lse = _ring_forward(q, k, v, RingComm(group), plan, scale, merge)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, plan, scale, merge)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, plan, scale, merge = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = backward_delta([r for rs in plan.records for r in rs], dout, out, dlse)
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, delta, group, plan, scale, merge)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention_with_lse(
    q: Tensor,  # [B, L, H, D] local shard
    k: Tensor,  # [B, L, Hkv, D]
    v: Tensor,  # [B, L, Hkv, D]
    *,
    group=None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    layout: str = "zigzag",
    backend: str = "auto",
    validate: bool = True,
    mask: Optional[Mask] = None,
    plan: Optional[RingPlan] = None,
    merge: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact attention over the sequence sharded across ``group`` by ``layout``, with its lse.

    Args: local shards as produced by ``shard_sequence(x, dim=1, group, layout)`` (``doc_ids=`` for
    ``layout="docs"``): q ``[B, L, H, D]``, k/v ``[B, L, Hkv, D]`` with ``H % Hkv == 0`` (GQA K/V travel
    un-expanded); ``group`` the cp group (``None``: default group, or a ring of one without
    torch.distributed); ``causal`` on global positions, or ``mask=Mask(...)`` with GLOBAL ``doc_ids
    [B, N*L]`` (identical on every rank) and any mask kind; ``softmax_scale`` defaults to ``1/sqrt(D)``;
    ``backend`` the local kernel (``"auto"`` picks per call, see the registry); ``validate`` gathers
    the shapes of every rank first (one tiny all_gather and a host sync) so bad input raises everywhere
    instead of hanging; ``plan`` a :func:`~seqpar.parallel.ring_plan.build_plan` result to reuse
    (the same mask and shapes; what :func:`make_ring_attn_fn` does across layers); ``merge`` the per-step
    merge/accumulation passes: ``"auto"`` the fused Triton kernels on CUDA (the torch reference elsewhere),
    ``"torch"`` the reference, ``"triton"`` the kernels (on CPU only under ``TRITON_INTERPRET=1``).
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32, fp64 for fp64 inputs;
    natural log; -inf with out 0 for a row that sees no key). Differentiable in q, k, v (and through
    lse for the torch/triton backends).
    Raises ValueError (on every rank) for shapes that differ across ranks, heads not divisible by
    kv heads, a global length the layout cannot split, a mask that does not fit the global sequence
    (doc ids of another shape, a block-sparse layout of another size) or that the backend cannot express.
    """
    mask = ring_mask(causal, mask)
    merge_impl(merge, q)  # an unknown or unusable merge raises here, on every rank, before any comms
    if validate:
        validate_inputs(q, k, v, group, layout)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if plan is None:
        rank, n = _coords(group)
        plan = build_plan(q, k, mask=mask, causal=causal, layout=layout, rank=rank, world_size=n, backend=backend)
    return RingAttentionFn.apply(q, k, v, group, plan, scale, merge)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`ring_attention_with_lse` but returns only out ``[B, L, H, D]``."""
    return ring_attention_with_lse(q, k, v, **kwargs)[0]


def make_ring_attn_fn(group=None, layout: str = "zigzag", backend: str = "auto",
                      validate: str = "always", merge: str = "auto") -> Callable[..., Tensor]:
    """The model's injected attention, ``attn_fn(q, k, v, *, causal, softmax_scale, mask=None) -> out [B, L, H, D]``.

    The ring plan of a ``Mask`` is built once and reused while the same Mask object comes back (the
    model passes one Mask to every layer of a forward), so the host-side planning runs once per step.

    ``validate="always"`` checks shapes across ranks on every call (a host sync per layer);
    ``"first"`` only the first time each shape signature is seen, which is safe while every rank sees
    the same sequence of shapes (a fixed ``seq_len``), and ``"never"`` skips it. ``merge`` as in
    :func:`ring_attention_with_lse`.
    """
    if validate not in ("always", "first", "never"):
        raise ValueError(f"validate={validate!r} is not one of ['always', 'first', 'never'].")
    if merge not in MERGE_IMPLS:
        raise ValueError(f"merge={merge!r} is not one of {list(MERGE_IMPLS)}.")
    seen: set = set()
    last: list = [None, None, None]  # (mask, key, plan) of the previous call: every layer shares one Mask

    def attn_fn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
                mask: Optional[Mask] = None) -> Tensor:
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, bool(causal))
        check = validate == "always" or (validate == "first" and key not in seen)
        causal = causal if mask is None else False  # a Mask replaces the model's causal flag (it carries its own)
        plan = last[2] if (last[0] is mask and last[1] == key and mask is not None) else None
        if check:
            validate_inputs(q, k, v, group, layout)
        if plan is None:
            rank, n = _coords(group)
            plan = build_plan(q, k, mask=ring_mask(causal, mask), causal=causal, layout=layout, rank=rank,
                              world_size=n, backend=backend)
            last[:] = [mask, key, plan]
        out = ring_attention(q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout,
                             backend=backend, validate=False, mask=mask, plan=plan, merge=merge)
        seen.add(key)
        return out

    return attn_fn
