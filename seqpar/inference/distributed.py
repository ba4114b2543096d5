"""Generation over a KV cache spread along the sequence over a process group (context parallelism).

The prompt is split contiguously over the ``group``'s ranks (padded with invalid entries to equal blocks);
each rank keeps only its block's cache. Prefill: each rank's queries meet every rank's cached keys by passing
the (un-rotated) key/value blocks around the ring (:class:`seqpar.parallel.ring.RingComm`), one partial
``(out, lse)`` per block merged exactly (:func:`seqpar.ops.merge.merge_attention`). Decoding: every rank runs
the new token (replicated, cheap), attends over its own part of the cache, and the partial results of all
ranks are all-gathered and merged by lse in rank order (so every rank gets the same bits). The new token's
key/value is kept by one rank, round-robin, so the cache grows evenly.

Every position-based policy is exact this way (``full``, ``streaming``, ``lm_infinite``, ``dca``: visibility and
RoPE positions depend on the pair's positions only, eviction on a key's own position). ``h2o`` ranks scores
over the whole row and is refused here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.inference.attend import attend_with_lse, rotate
from seqpar.inference.cache import KVCache, LayerCache
from seqpar.inference.generate import check_generate_args, prompt_layout
from seqpar.inference.registry import make_policy
from seqpar.inference.runner import policy_step
from seqpar.inference.sampling import sample
from seqpar.ops.attention.mask import Mask
from seqpar.ops.merge import merge_attention
from seqpar.parallel.ring import RingComm
from seqpar.parallel.ring_attention import ring_attention


def _local_partial(model, layer, q, t, qv, lc: LayerCache, policy):
    """``(out [B, Sq, H, D] float, lse [B, H, Sq])`` of ``q`` over one block of keys (empty: 0 and -inf)."""
    if lc.length == 0:
        B, Sq, H, _ = q.shape
        return torch.zeros_like(q), torch.full((B, H, Sq), float("-inf"), dtype=torch.promote_types(
            q.dtype, torch.float32), device=q.device)
    out, lse, _ = attend_with_lse(model, q, lc.k, lc.v, policy.branches(t, qv, lc), layer.attention.softmax_scale)
    return out, lse


def ring_attend(group):
    """A ``layer_attend_fn`` for prefill: local queries over every rank's block, blocks passed around the ring."""
    def fn(model, layer, q, t, qv, lc: LayerCache, policy):
        comm = RingComm(group)
        block = [lc.k.contiguous(), lc.v.contiguous(), lc.pos.contiguous(), lc.valid.to(torch.uint8)]
        out = lse = None
        for step in range(comm.world_size):
            handle = comm.send_recv(block) if step + 1 < comm.world_size else None
            view = LayerCache(k=block[0], v=block[1], pos=block[2], valid=block[3].bool())
            o, s = _local_partial(model, layer, q, t, qv, view, policy)
            out, lse = (o, s) if out is None else merge_attention(out, lse, o, s)
            if handle is not None:
                block = handle.wait()
        return out.to(q.dtype), None
    return fn


def gathered_attend(group):
    """A ``layer_attend_fn`` for decoding: the same queries on every rank, partials all-gathered and merged."""
    def fn(model, layer, q, t, qv, lc: LayerCache, policy):
        o, s = _local_partial(model, layer, q, t, qv, lc, policy)
        n = dist.get_world_size(group)
        outs, lses = [torch.empty_like(o) for _ in range(n)], [torch.empty_like(s) for _ in range(n)]
        dist.all_gather(outs, o.contiguous(), group=group)
        dist.all_gather(lses, s.contiguous(), group=group)
        out, lse = outs[0], lses[0]
        for o_i, s_i in zip(outs[1:], lses[1:]):
            out, lse = merge_attention(out, lse, o_i, s_i)
        return out.to(q.dtype), None
    return fn


def ring_kernel_attend(group, doc_ids: Tensor, backend: str = "auto"):
    """A ``layer_attend_fn`` for a ``full`` prefill through :func:`seqpar.parallel.ring_attention` (the
    training ring and its kernels, contiguous layout): q and k rotated at their positions, padding kept apart
    by ``doc_ids [B, N*L]`` (left padding 0, tokens 1, tail padding 2: non-decreasing, as Mask requires)."""
    mask = Mask(causal=True, doc_ids=doc_ids)

    def fn(model, layer, q, t, qv, lc: LayerCache, policy):
        cos, sin = model.rope_tables(t)  # [B, L, D/2]: this rank's positions (the cache was empty)
        qr, kr = rotate(q, cos[:, :, None], sin[:, :, None]), rotate(lc.k, cos[:, :, None], sin[:, :, None])
        out = ring_attention(qr, kr, lc.v, group=group, mask=mask, layout="contiguous",
                             softmax_scale=layer.attention.softmax_scale, backend=backend)
        return out, None
    return fn


def _src(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


@torch.no_grad()
def generate_distributed(model, input_ids: Tensor, max_new_tokens: int, *, group=None, policy: str = "full",
                         attention_mask: Optional[Tensor] = None, temperature: float = 0.0, top_p: float = 1.0,
                         generator: Optional[torch.Generator] = None, q_chunk: int = 1 << 30, fused: bool = True,
                         return_cache: bool = False, **policy_options):
    """:func:`seqpar.inference.generate` with the cache spread over ``group`` (every rank calls it with the
    same arguments and the same model; the whole ``input_ids`` on every rank). Sampling happens on group
    rank 0 and is broadcast. ``fused``: prefill ``full`` through the training ring and its attention
    kernels (any padding; other policies use the materialised ring of :func:`ring_attend`). Returns the same ``[B, S + max_new_tokens]`` on every rank (with
    ``return_cache``: also this rank's :class:`KVCache`). Raises ValueError as ``generate`` does, and for
    ``policy="h2o"``."""
    check_generate_args(max_new_tokens, temperature, top_p)
    positions, valid = prompt_layout(input_ids, attention_mask)
    pol = make_policy(policy, model, valid.sum(1), max_new_tokens, **policy_options)
    if pol.needs_scores:
        raise ValueError(f"policy {policy!r} ranks accumulated scores over the whole row and has no distributed "
                         "cache yet; use generate() on one process.")
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    B, S = input_ids.shape
    L = -(-S // n)  # ceil: every rank holds L entries, the tail padded with invalid ones
    pad = n * L - S
    ids = torch.nn.functional.pad(input_ids.long(), (0, pad))
    pos, val = torch.nn.functional.pad(positions, (0, pad)), torch.nn.functional.pad(valid, (0, pad))
    mine = slice(rank * L, (rank + 1) * L)
    cache = KVCache(len(model.layers))
    out = [input_ids.long()]
    if max_new_tokens > 0:
        attend_fn, chunk = ring_attend(group), q_chunk
        if fused and pol.name == "full":
            doc_ids = torch.where(val, 1, 0)
            doc_ids[:, S:] = 2
            attend_fn, chunk = ring_kernel_attend(group, doc_ids), n * L
        hidden = policy_step(model, ids[:, mine], pos[:, mine], val[:, mine], cache, pol, chunk,
                             layer_attend_fn=attend_fn)
        owner = (S - 1) // L  # the rank holding every row's last prompt token
        last = hidden[:, (S - 1) - owner * L].contiguous() if rank == owner else hidden.new_empty(B, hidden.shape[-1])
        dist.broadcast(last, src=_src(group, owner), group=group)
        next_pos = positions[:, -1:] + 1
        ones = torch.ones_like(next_pos, dtype=torch.bool)
        for step in range(max_new_tokens):
            tok = sample(model.logits(last), temperature, top_p, generator)[:, None].contiguous()  # [B, 1]
            dist.broadcast(tok, src=_src(group, 0), group=group)
            out.append(tok)
            if step + 1 < max_new_tokens:
                hidden = policy_step(model, tok, next_pos, ones, cache, pol, q_chunk, store=(rank == step % n),
                                     layer_attend_fn=gathered_attend(group))
                last, next_pos = hidden[:, -1], next_pos + 1
    tokens = torch.cat(out, 1)
    return (tokens, cache) if return_cache else tokens
