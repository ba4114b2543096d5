"""Ring Attention: exact attention over a sequence sharded across a process group.

Each rank keeps its query shard ``q [B, L, H, D]``; the key/value shards ``[B, L, Hkv, D]`` (never
expanded for GQA) travel around the ring (``seqpar.parallel.ring``) while the local kernel
(``seqpar.ops``, chosen by ``backend``) computes on the block in hand. Step ``i`` on rank ``r``
holds the K/V of rank ``(r - i) mod N``.

Forward: partial ``(out, lse)`` of every block merge in fp32 by log-sum-exp (``seqpar.ops.merge``).
Backward: the saved FINAL lse and ``delta = rowsum(dout * out)`` make every block's gradient exact on
its own (FlashAttention's recompute), so dQ accumulates locally and dK/dV accumulate in fp32 in
buffers that travel with K/V and arrive back at their owner after the last step.

Causal masks come from the layout (:func:`plan_step`): every layout stores its tokens in increasing
global order, so between two ranks' blocks the global mask is either empty, full, or a causal
diagonal in local indices; each step is one or no kernel call of the kind every kernel supports
(non-causal, or causal with ``Sq == Sk`` and zero offsets).

The local kernel is a registry record (:func:`seqpar.ops.attention.registry.select`): its declared
abilities decide whether the ring uses in-kernel accumulators (``ring_accumulators``) and whether the
backward passes the global delta, so a gradient through lse can be folded in (``lse_grad``).
A ``Mask`` may be given instead of ``causal``; in this step only causal/full masks go through the ring
(documents, windows, sinks and block-sparse masks raise one ValueError on every rank, before any
communication).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.ops.attention import LocalMask, Mask, select
from seqpar.ops.attention.registry import Backend
from seqpar.ops.merge import merge_attention
from seqpar.parallel.layout import LAYOUTS, required_multiple
from seqpar.parallel.ring import RingComm


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
    """The kernel calls that compute rank ``q_rank``'s queries against rank ``k_rank``'s keys.

    Exactly the visible (query, key) pairs of the global mask are covered, each once (tested against
    :func:`seqpar.parallel.layout.local_positions`). Fully masked pairs are skipped; fully visible
    blocks run non-causal.
    """
    n = local_len
    full = (BlockCall(0, n, 0, n, False),)
    if not causal:
        return full
    if q_rank == k_rank:
        # Same token set in increasing global order: local index order is global order.
        return (BlockCall(0, n, 0, n, True),)
    if layout == "contiguous":
        return full if k_rank < q_rank else ()
    if layout == "zigzag":
        c = n // 2  # rank r holds chunk r (local [0, c)) and chunk 2N-1-r (local [c, n))
        if k_rank < q_rank:
            # k's early chunk precedes both q chunks; k's late chunk 2N-1-k_rank follows both.
            return (BlockCall(0, n, 0, c, False),)
        # q's early chunk precedes both k chunks; q's late chunk follows both.
        return (BlockCall(c, n, 0, n, False),)
    if layout == "striped":
        # q local a is at a*N + q_rank, k local b at b*N + k_rank.
        if k_rank < q_rank:
            return (BlockCall(0, n, 0, n, True),)  # visible iff a >= b
        # visible iff a > b: rows 1.. against keys ..n-2 on the aligned diagonal (k_offset = 1);
        # row 0 sees nothing from this rank.
        return (BlockCall(1, n, 0, n - 1, True),) if n > 1 else ()
    raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}.")


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


_LOCAL = {False: LocalMask(causal=False), True: LocalMask(causal=True)}  # aligned diagonal or full


def ring_causal(causal: bool, mask: Optional[Mask]) -> bool:
    """The ``causal`` flag of the ring from ``causal`` or a ``Mask``; raises the same ValueError on every
    rank (it depends only on the arguments) for masks the ring does not take yet, before any comms."""
    if mask is None:
        return bool(causal)
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a seqpar.ops.Mask; got {type(mask).__name__}.")
    if causal:
        raise ValueError("pass either causal=True or mask=Mask(...), not both; the Mask carries causal.")
    extra = mask.kinds - {"causal"}
    if extra:
        raise ValueError(f"ring_attention takes only causal or full masks for now; got {sorted(extra)}: "
                         "document/window/sink/block-sparse masks through the ring arrive with the mask work; "
                         "use parallel.cp=1 (single-device attention_with_lse(mask=...)) or a causal/full Mask.")
    return mask.causal


def _ring_forward(q, k, v, comm: RingComm, rank, n, layout, causal, scale, record: Backend):
    """Returns out ``[B, L, H, D]`` and lse ``[B, H, L]``, both in the accumulation dtype (fp32/fp64)."""
    b, L, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    # A kernel that merges into running fp32 (out, lse) in place saves the separate merge pass.
    fused = record.ring_accumulators and acc == torch.float32
    fwd = record.forward
    out = lse = None
    kv = [k, v]
    for step in range(n):
        handle = comm.send_recv(kv) if step + 1 < n else None  # next block in flight during compute
        for c in plan_step(layout, causal, rank, (rank - step) % n, n, L):
            qs, ks = slice(c.q_start, c.q_end), slice(c.k_start, c.k_end)
            all_rows = c.q_start == 0 and c.q_end == L
            extra = dict(out_acc=out, lse_acc=lse) if fused and all_rows and out is not None else {}
            o, l = fwd(q[:, qs], kv[0][:, ks], kv[1][:, ks], _LOCAL[c.causal], softmax_scale=scale, **extra)
            if extra:
                out, lse = o, l  # merged in place by the kernel
            elif out is None and all_rows:
                # A ring of one keeps the kernel's output as is (no fp32 round trip).
                out, lse = (o if n == 1 else o.to(acc)), l.to(acc).contiguous()
            else:
                if out is None:
                    out = q.new_zeros((b, L, h, d), dtype=acc)
                    lse = q.new_full((b, h, L), float("-inf"), dtype=acc)
                elif out.dtype != acc:
                    out = out.to(acc)  # partial-row merges write into out: it must hold fp32
                if all_rows:
                    out, lse = merge_attention(out, lse, o, l)
                else:
                    out[:, qs], lse[:, :, qs] = merge_attention(out[:, qs], lse[:, :, qs], o, l)
        if handle is not None:
            kv = handle.wait()
    return out, lse


def _fresh(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A kernel's fresh gradient as a contiguous accumulator (no copy when it already is one).
    if t.dtype == dtype and t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)  # one pass: cast and re-layout


def _ring_backward(dout, q, k, v, out, lse, delta, group, rank, n, layout, causal, scale, record: Backend):
    """Returns dq ``[B, L, H, D]`` in the accumulation dtype and dk, dv ``[B, L, Hkv, D]`` in k's dtype."""
    L = q.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    fused = record.ring_accumulators and acc == torch.float32  # kernel adds into fp32 buffers in place
    bwd = record.backward
    kv_comm, dkv_comm = RingComm(group), RingComm(group)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if fused else None
    kv, dkv_handle = [k, v], None
    for step in range(n):
        kv_handle = kv_comm.send_recv(kv) if step + 1 < n else None
        calls = plan_step(layout, causal, rank, (rank - step) % n, n, L)
        # This rank's contributions to the held block's dK/dV go to fresh buffers, so the accumulators
        # arriving from the previous rank are needed only after the compute (their transfer overlaps
        # it). One call over all keys needs no zero-filled buffer: its result is the contribution.
        direct = not fused and len(calls) == 1 and calls[0].k_start == 0 and calls[0].k_end == L
        dk, dv = (None, None) if direct else (torch.zeros(t.shape, dtype=acc, device=q.device) for t in kv)
        for c in calls:
            qs, ks = slice(c.q_start, c.q_end), slice(c.k_start, c.k_end)
            if dq is None and not (c.q_start == 0 and c.q_end == L):
                dq = torch.zeros(q.shape, dtype=acc, device=q.device)
            dq_view = None if dq is None else dq[:, qs]  # strided views, unit last stride
            dk_view, dv_view = (None, None) if dk is None else (dk[:, ks], dv[:, ks])
            extra = dict(dq_acc=dq_view, dk_acc=dk_view, dv_acc=dv_view) if fused else {}
            if record.takes_delta:
                extra["delta"] = delta[:, :, qs]
            dq_b, dk_b, dv_b = bwd(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs],
                                   _LOCAL[c.causal], softmax_scale=scale, **extra)
            # A kernel that added into the given views returns them; otherwise add its fresh results.
            if dq is None:
                dq = _fresh(dq_b, acc)
            elif dq_b is not dq_view:
                dq_view += dq_b
            if dk is None:
                dk, dv = _fresh(dk_b, acc), _fresh(dv_b, acc)
            elif dk_b is not dk_view:
                dk_view += dk_b
                dv_view += dv_b
        if dkv_handle is not None:
            dk_in, dv_in = dkv_handle.wait()
            dk += dk_in
            dv += dv_in
        if kv_handle is not None:
            kv = kv_handle.wait()
        if step + 1 == n:
            # The sums are complete: round to k's dtype now, which the result gets anyway, so the
            # hop that takes them home (the one transfer nothing overlaps) carries half the bytes.
            dk, dv = dk.to(k.dtype), dv.to(k.dtype)
        # After the last step the accumulators belong to rank r+1's block: one more hop takes them home.
        dkv_handle = dkv_comm.send_recv([dk, dv])
    dk, dv = dkv_handle.wait()
    return dq, dk, dv


class RingAttentionFn(torch.autograd.Function):
    """Ring forward/backward on local shards; saves q, k, v, out (q's dtype) and the global lse."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, record):
        rank, n = _coords(group)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the ring sends whole tensors
        out, lse = _ring_forward(q, k, v, RingComm(group), rank, n, layout, causal, scale, record)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, rank, n, layout, causal, scale, record)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, n, layout, causal, scale, record = ctx.args
        acc = torch.promote_types(q.dtype, torch.float32)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        if not record.takes_delta:
            if dlse is not None:
                raise NotImplementedError(f"backend={record.name} recomputes delta inside the fused kernel, so a "
                                          "gradient through lse is not supported; use backend='torch' or 'triton'.")
            delta = None  # the fused kernels compute it from (dout, out) themselves
        else:
            delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()  # [B, H, L]
            if dlse is not None:
                # d lse_i / d s_ij = p_ij, so an lse gradient adds dlse_i * p_ij to dS: fold it into delta.
                delta = delta - dlse.to(acc)
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, delta, group, rank, n, layout, causal, scale, record)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


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
) -> tuple[Tensor, Tensor]:
    """Exact attention over the sequence sharded across ``group`` by ``layout``, with its lse.

    Args: local shards as produced by ``shard_sequence(x, dim=1, group, layout)``: q ``[B, L, H, D]``,
    k/v ``[B, L, Hkv, D]`` with ``H % Hkv == 0`` (GQA K/V travel un-expanded); ``group`` the cp group
    (``None``: default group, or a ring of one without torch.distributed); ``causal`` on global
    positions (or ``mask=Mask(causal=...)``: causal/full only in this step); ``softmax_scale`` defaults to ``1/sqrt(D)``; ``backend`` the local kernel ("auto",
    "torch", "triton", "sdpa_flash", "sdpa_cudnn"); ``validate`` gathers the shapes of every rank
    first (one tiny all_gather and a host sync) so bad input raises everywhere instead of hanging.
    Returns out ``[B, L, H, D]`` (q's dtype) and lse ``[B, H, L]`` (fp32, fp64 for fp64 inputs;
    natural log; -inf with out 0 for a row that sees no key). Differentiable in q, k, v (and through
    lse for the torch/triton backends).
    Raises ValueError (on every rank) for shapes that differ across ranks, heads not divisible by
    kv heads, a global length the layout cannot split, or a Mask kind the ring does not take yet.
    """
    causal = ring_causal(causal, mask)
    if validate:
        validate_inputs(q, k, v, group, layout)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # Every call the ring makes is non-causal or an aligned causal diagonal of equal lengths, so
    # resolving on the whole shard with causal=True picks a kernel that can run all of them.
    record = select(backend, q, k, _LOCAL[causal])
    return RingAttentionFn.apply(q, k, v, group, causal, scale, layout, record)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`ring_attention_with_lse` but returns only out ``[B, L, H, D]``."""
    return ring_attention_with_lse(q, k, v, **kwargs)[0]


def make_ring_attn_fn(group=None, layout: str = "zigzag", backend: str = "auto",
                      validate: str = "always") -> Callable[..., Tensor]:
    """The model's injected attention, ``attn_fn(q, k, v, *, causal, softmax_scale, mask=None) -> out [B, L, H, D]``.

    ``validate="always"`` checks shapes across ranks on every call (a host sync per layer);
    ``"first"`` only the first time each shape signature is seen, which is safe while every rank sees
    the same sequence of shapes (a fixed ``seq_len``), and ``"never"`` skips it.
    """
    if validate not in ("always", "first", "never"):
        raise ValueError(f"validate={validate!r} is not one of ['always', 'first', 'never'].")
    seen: set = set()

    def attn_fn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
                mask: Optional[Mask] = None) -> Tensor:
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype)
        check = validate == "always" or (validate == "first" and key not in seen)
        # A Mask replaces the model's causal flag (it carries its own).
        out = ring_attention(q, k, v, group=group, causal=causal if mask is None else False,
                             softmax_scale=softmax_scale, layout=layout, backend=backend, validate=check, mask=mask)
        seen.add(key)
        return out

    return attn_fn
