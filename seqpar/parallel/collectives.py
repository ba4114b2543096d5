"""Differentiable collectives of the context-parallel modes: no math, only data movement.

* :func:`seq_to_head` / :func:`head_to_seq`: DeepSpeed-Ulysses' all-to-all. A sequence shard
  ``[B, L, H, D]`` becomes the head shard ``[B, N*L, H/N, D]`` holding every rank's tokens (rank order,
  each rank's tokens in its local order), and back. Each is the other's adjoint, so each one's backward
  is the other one (one ``all_to_all_single`` per direction).
* :func:`gather_seq`: all-gather of sequence shards ``[B, L, ...]`` into ``[B, N*L, ...]`` (rank order);
  its backward reduce-scatters the gradient (sums every rank's contribution to this rank's shard).

``group=None`` with torch.distributed uninitialised is a group of one: every function is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor


def group_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def _a2a(x: Tensor, group) -> Tensor:
    """``x [N, ...]`` contiguous: block ``j`` goes to rank ``j``; returns ``[N, ...]`` with block ``i`` from rank ``i``."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: Tensor, group, n: int) -> Tensor:
    send = rearrange(x, "b l (n h) d -> n b l h d", n=n).contiguous()  # head group j -> rank j
    return rearrange(_a2a(send, group), "n b l h d -> b (n l) h d")  # [B, N*L, H/N, D]


def _head_to_seq(x: Tensor, group, n: int) -> Tensor:
    send = rearrange(x, "b (n l) h d -> n b l h d", n=n).contiguous()  # rank j's tokens -> rank j
    return rearrange(_a2a(send, group), "n b l h d -> b l (n h) d")  # [B, L, H, D]


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n):
        ctx.args = (group, n)
        return _seq_to_head(x, group, n)

    @staticmethod
    def backward(ctx, g):
        return _head_to_seq(g, *ctx.args), None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n):
        ctx.args = (group, n)
        return _head_to_seq(x, group, n)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_head(g, *ctx.args), None, None


def seq_to_head(x: Tensor, group) -> Tensor:
    """``x [B, L, H, D]`` (this rank's tokens, all heads) -> ``[B, N*L, H/N, D]`` (every rank's tokens in
    rank order, heads ``[r*H/N, (r+1)*H/N)`` of this rank ``r``). ``H`` must be divisible by ``N``."""
    n = group_size(group)
    return x if n == 1 else _SeqToHead.apply(x, group, n)


def head_to_seq(x: Tensor, group) -> Tensor:
    """Inverse of :func:`seq_to_head`: ``[B, N*L, h, D]`` -> ``[B, L, N*h, D]``."""
    n = group_size(group)
    return x if n == 1 else _HeadToSeq.apply(x, group, n)


def all_gather_single():
    """``dist.all_gather_single`` where torch has it, else ``all_gather_into_tensor``: torch 2.13 renamed it
    (the old name is deprecated there); 2.11 has only the old name."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_single():
    """``dist.reduce_scatter_single`` or, before torch 2.13, ``reduce_scatter_tensor``."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n):
        ctx.args = (group, n)
        x = x.contiguous()
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))
        all_gather_single()(out, x, group=group)  # [N*B, L, ...]: rank r's shard at rows r*B..
        return rearrange(out, "(n b) l ... -> b (n l) ...", n=n)

    @staticmethod
    def backward(ctx, g):
        group, n = ctx.args
        # Every rank holds a gradient for every rank's tokens: sum them where the tokens live.
        send = rearrange(g, "b (n l) ... -> (n b) l ...", n=n).contiguous()
        out = send.new_empty((send.shape[0] // n, *send.shape[1:]))
        reduce_scatter_single()(out, send, group=group)
        return out, None, None


def gather_seq(x: Tensor, group) -> Tensor:
    """All-gather ``x [B, L, ...]`` over ``group`` into ``[B, N*L, ...]`` (rank order); differentiable,
    the backward reduce-scatters (SUM) the gradient back to the shards."""
    n = group_size(group)
    return x if n == 1 else _GatherSeq.apply(x, group, n)
