"""One forward step of the decoder through a cache policy: prefill (many tokens) and decode (one) alike.

The model's own blocks run it: :meth:`TransformerBlock.pre_attention` with identity RoPE tables returns
q/k/v *before* rotation, the policy's attention (:func:`seqpar.inference.attend.attend`) rotates queries
and cached keys at the positions it assigns, and :meth:`TransformerBlock.post_attention` finishes the block.
So the model's weights, norms and MLP are used exactly as in training; only the attention differs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqpar.inference.attend import attend
from seqpar.inference.cache import KVCache
from seqpar.inference.policy import CachePolicy


def check_model(model) -> None:
    """Raise ValueError for a model whose attention the cache policies would silently replace by dense
    attention: the structured architectures of ``seqpar.models.build_model`` (their attention is not the
    Llama block's) and sliding-window / sink models (their training mask is not the full causal one)."""
    cfg = model.cfg
    attention, arch = getattr(cfg, "attention", "dense"), getattr(cfg, "arch", "llama")
    if attention != "dense" or arch != "llama":
        raise ValueError(f"seqpar.inference decodes dense Llama models only; this one has model.attention={attention}, "
                         f"model.arch={arch}: evaluate it with full forward passes (seqpar.eval.perplexity).")
    if getattr(cfg, "window", None) is not None:
        raise ValueError(f"this model was trained with model.window={cfg.window} (sinks={getattr(cfg, 'sinks', 0)}); "
                         "cached decoding would attend beyond its window: evaluate it with full forward passes "
                         "(seqpar.eval.perplexity), which apply the model's own mask.")


def policy_step(model, tokens: Tensor, positions: Tensor, valid: Tensor, cache: KVCache, policy: CachePolicy,
                q_chunk: int = 1024, *, store: bool = True, layer_attend_fn=None) -> Tensor:
    """Run ``tokens [B, Sn]`` at original ``positions [B, Sn]`` (``valid``: False for left padding) through
    every layer, appending their keys/values to ``cache`` and evicting by ``policy`` after the step.

    ``store=False`` attends without keeping the new keys (a rank of a distributed cache that does not own
    the token); ``layer_attend_fn`` replaces :func:`layer_attend` (same signature), e.g. to attend over a
    cache spread over ranks. Returns the final-normed hidden states ``[B, Sn, dim]`` (padding rows are
    finite but meaningless).
    """
    check_model(model)
    layer_attend_fn = layer_attend if layer_attend_fn is None else layer_attend_fn
    B, Sn = tokens.shape
    h = model.tok_embeddings(tokens)  # [B, Sn] -> [B, Sn, dim]
    half = model.cfg.head_dim // 2
    ones = torch.ones(B, Sn, half, dtype=torch.float32, device=tokens.device)  # identity RoPE: q/k unrotated
    zeros = torch.zeros_like(ones)
    t_now = torch.where(valid, positions, -1).max(dim=1).values  # [B] newest real position
    for layer, lc in zip(model.layers, cache.layers):
        q, k, v = layer.pre_attention(h, ones, zeros)  # [B, Sn, H, D], [B, Sn, Hkv, D] x2, no RoPE
        if store:
            lc.append(k, v, positions, valid)
        outs = []
        for a in range(0, Sn, q_chunk):
            t, qv = positions[:, a:a + q_chunk], valid[:, a:a + q_chunk]
            out, acc = layer_attend_fn(model, layer, q[:, a:a + q_chunk], t, qv, lc, policy)
            if acc is not None:
                lc.score += acc
            outs.append(out)
        h = layer.post_attention(h, torch.cat(outs, 1))
        policy.evict(lc, t_now)
    return model.norm(h)


def layer_attend(model, layer, q: Tensor, t: Tensor, q_valid: Tensor, lc, policy: CachePolicy):
    """The policy's attention of one query block over one layer's cache -> ``(out [B, Sq, H, D], acc | None)``."""
    return attend(model, q, lc.k, lc.v, policy.branches(t, q_valid, lc), layer.attention.softmax_scale,
                  need_probs=policy.needs_scores)
