"""Infini-attention (Munkhdalai, Faruqui, Gopal 2024, "Leave No Context Behind", arXiv:2404.07143, Sec. 2.1).

The sequence is split into segments of ``N = model.infini_segment`` tokens. Inside a segment: causal dot-product
attention ``A_dot`` (the injected softmax attention, run on every segment at once). Across segments: a
compressive memory per head, ``M [D, D]`` and normaliser ``z [D]``, read and written with ``sigma = ELU + 1``:

    retrieval (eq. 3):     A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})
    linear update (eq. 4): M_s = M_{s-1} + sigma(K)^T V
    delta update (eq. 5):  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
    normaliser:            z_s = z_{s-1} + sum_t sigma(K_t)
    gate (eq. 6):          A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot,  one learned beta per head.

``M_0 = 0, z_0 = 0``: the first segment retrieves 0 (the 0/0 is taken as 0). Queries and keys are the
layer's (RoPE'd) q and k. The linear update is a prefix sum over segments (computed at once); the delta rule
reads ``M_{s-1}``, so it runs as a loop over segments. One sequence per process (cp=1): carrying ``(M, z)``
from rank to rank is not built.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from seqpar.errors import ConfigError
from seqpar.models.llama import AttnFn, Llama, default_attention
from seqpar.ops.attention.mask import Mask

_TINY = 1e-30  # the 0/0 of the first segment (z_0 = 0) reads as 0; any z > 0 divides exactly


def elu1(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def memory_retrieval(q: Tensor, k: Tensor, v: Tensor, *, update: str) -> Tensor:
    """``A_mem`` of every segment: ``q, k [B, n_seg, N, H, D]``, ``v [B, n_seg, N, H, Dv]`` -> ``[B, n_seg, N, H, Dv]``.

    Segment s reads the memory written by segments ``< s`` (so the result is causal).
    """
    sq, sk = elu1(q), elu1(k)
    if update == "linear":
        writes = torch.einsum("bsnhd,bsnhe->bshde", sk, v)  # sigma(K)^T V per segment
        M = torch.cumsum(writes, 1) - writes  # exclusive prefix sum: M_{s-1}
        zs = sk.sum(2)  # [B, n_seg, H, D]
        z = torch.cumsum(zs, 1) - zs
        num = torch.einsum("bsnhd,bshde->bsnhe", sq, M)
        den = torch.einsum("bsnhd,bshd->bsnh", sq, z)
        return num / den.clamp_min(_TINY)[..., None]
    if update != "delta":
        raise ValueError(f"update must be 'linear' or 'delta'; got {update!r}.")
    B, n_seg, _, H, D = q.shape
    M = v.new_zeros(B, H, D, v.shape[-1])
    z = v.new_zeros(B, H, D)
    outs = []
    for s in range(n_seg):
        outs.append(torch.einsum("bnhd,bhde->bnhe", sq[:, s], M)
                    / torch.einsum("bnhd,bhd->bnh", sq[:, s], z).clamp_min(_TINY)[..., None])
        old = torch.einsum("bnhd,bhde->bnhe", sk[:, s], M) \
            / torch.einsum("bnhd,bhd->bnh", sk[:, s], z).clamp_min(_TINY)[..., None]
        M = M + torch.einsum("bnhd,bnhe->bhde", sk[:, s], v[:, s] - old)
        z = z + sk[:, s].sum(1)
    return torch.stack(outs, 1)


class InfiniAttention(nn.Module):
    """One layer's gate ``beta [H]`` and the segment-wise combination of memory and local attention."""

    def __init__(self, n_heads: int, n_rep: int, segment: int, update: str, attn_fn: AttnFn):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(n_heads))  # sigmoid(0) = 1/2: memory and local mixed evenly at init
        self.n_rep, self.segment, self.update, self.base = n_rep, segment, update, attn_fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                mask: Optional[Mask] = None) -> Tensor:
        """``q [B,S,H,D]``, ``k/v [B,S,Hkv,D] -> [B,S,H,D]``; causal always. Raises ConfigError when the
        segment length does not divide S, ValueError for a mask (no documents or windows)."""
        if mask is not None:
            raise ValueError("model.arch=infini takes no Mask (documents or windows); pass doc_ids=None.")
        B, S, H, D = q.shape
        N = self.segment
        if S % N:
            raise ConfigError(f"model.infini_segment={N} must divide the sequence length {S}; pick a divisor.")
        n_seg = S // N
        seg = lambda x: x.reshape(B * n_seg, N, *x.shape[2:])  # [B, S, h, D] -> [B*n_seg, N, h, D]
        local = self.base(seg(q), seg(k), seg(v), causal=True, softmax_scale=softmax_scale).reshape(B, S, H, D)
        if self.n_rep > 1:  # GQA: one memory per query head
            k, v = k.repeat_interleave(self.n_rep, 2), v.repeat_interleave(self.n_rep, 2)
        dt = torch.promote_types(q.dtype, torch.float32)  # the memory accumulates in fp32 at least, also under autocast
        with torch.autocast(q.device.type, enabled=False):
            mem = memory_retrieval(q.reshape(B, n_seg, N, H, D).to(dt), k.reshape(B, n_seg, N, H, D).to(dt),
                                   v.reshape(B, n_seg, N, H, D).to(dt), update=self.update).reshape(B, S, H, D)
        mem = mem.to(local.dtype)
        g = torch.sigmoid(self.beta.to(q.dtype))[:, None]  # [H, 1]
        return g * mem + (1 - g) * local


class InfiniLlama(Llama):
    """The Llama decoder with Infini-attention in every layer (``model.arch=infini``)."""

    def __init__(self, cfg, attn_fn: Optional[AttnFn] = None):
        super().__init__(cfg, attn_fn)
        base = attn_fn if attn_fn is not None else default_attention
        for layer in self.layers:
            layer.attention.attn_fn = InfiniAttention(cfg.n_heads, cfg.n_heads // cfg.kv_heads, cfg.infini_segment,
                                                      cfg.infini_update, base)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        super().init_weights(generator)
        for layer in self.layers:
            if isinstance(layer.attention.attn_fn, InfiniAttention):
                layer.attention.attn_fn.beta.zero_()

    def attention_mask(self, doc_ids: Optional[Tensor]) -> Optional[Mask]:
        if doc_ids is not None:
            raise ValueError("model.arch=infini has no document mask; pass doc_ids=None (data.doc_mask=false).")
        return None
