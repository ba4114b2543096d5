"""Linformer: self-attention with linear complexity (Wang et al. 2020, arXiv:2006.04768).

Keys and values are projected along the SEQUENCE to ``k`` rows before softmax attention (Sec. 4, eq. 7):

    head = softmax(Q (E K)^T / sqrt(d)) (F V),      E, F in R^{k x n},

with headwise sharing (Sec. 4, "Parameter sharing": one E and one F per layer, shared by every head). A
sequence shorter than ``n = model.linformer_max_len`` uses the first ``S`` columns of E and F.

Limitation (documented, enforced): every projected key mixes all positions, so query i would see keys after
i; Linformer is bidirectional only. ``ModelConfig`` refuses ``attention=linformer`` with ``causal=true`` and
the trainer (a causal LM) refuses ``causal=false``: use it through ``build_model`` for encoder-style models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from seqpar.errors import ConfigError
from seqpar.models.llama import AttnFn, Llama, default_attention
from seqpar.ops.attention.mask import Mask


class LinformerAttention(nn.Module):
    """One layer's projections ``E, F [k, n]`` and the softmax attention over the projected keys."""

    def __init__(self, k: int, max_len: int, attn_fn: AttnFn):
        super().__init__()
        self.E = nn.Parameter(torch.empty(k, max_len))
        self.F = nn.Parameter(torch.empty(k, max_len))
        self.base = attn_fn
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # Xavier normal, as nn.Linear(n, k) in the authors' code is initialised.
        std = (2.0 / sum(self.E.shape)) ** 0.5
        for p in (self.E, self.F):
            nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                mask: Optional[Mask] = None) -> Tensor:
        """``q [B,S,H,D]``, ``k/v [B,S,Hkv,D] -> [B,S,H,D]``. Raises ValueError for a causal call or S > n."""
        if causal or mask is None or mask.kinds:
            raise ValueError("Linformer attention is bidirectional only: call it with mask=Mask(causal=False) "
                             "(a causal call would let tokens see the future through the projections).")
        S, n = k.shape[1], self.E.shape[1]
        if S > n:
            raise ValueError(f"sequence length {S} exceeds model.linformer_max_len={n}; raise it.")
        kp = torch.einsum("rs,bshd->brhd", self.E[:, :S].to(k.dtype), k)  # [B, k, Hkv, D]
        vp = torch.einsum("rs,bshd->brhd", self.F[:, :S].to(v.dtype), v)
        return self.base(q, kp, vp, causal=False, softmax_scale=softmax_scale)


class LinformerLlama(Llama):
    """The Llama block stack with Linformer attention (``model.attention=linformer``, ``model.causal=false``)."""

    def __init__(self, cfg, attn_fn: Optional[AttnFn] = None):
        if cfg.causal:
            raise ConfigError("model.attention=linformer is not causal; set model.causal=false (bidirectional use).")
        super().__init__(cfg, attn_fn)
        base = attn_fn if attn_fn is not None else default_attention
        for layer in self.layers:
            layer.attention.attn_fn = LinformerAttention(cfg.linformer_k, cfg.linformer_max_len, base)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        super().init_weights(generator)
        for layer in self.layers:
            if isinstance(layer.attention.attn_fn, LinformerAttention):
                layer.attention.attn_fn.reset_parameters(generator)

    def attention_mask(self, doc_ids: Optional[Tensor]) -> Mask:
        if doc_ids is not None:
            raise ValueError("model.attention=linformer has no document mask; pass doc_ids=None.")
        return Mask(causal=False)
