"""``generate``: prefill + cached decoding of a Llama model under a cache policy; ``policy_forward`` for
perplexity through a policy's attention.

Batched prompts of different lengths are LEFT-padded (as Hugging Face does for decoder-only generation):
``attention_mask [B, S]`` is 0 on the padding at the start of a row and 1 on its tokens; each row's
positions count its real tokens from 0, padding never enters attention, and every row's newest token
sits in the last column, so all rows decode in lockstep.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.inference.cache import KVCache
from seqpar.inference.fused import fused_attend
from seqpar.inference.registry import make_policy
from seqpar.inference.runner import policy_step
from seqpar.inference.sampling import check_sampling, sample


def check_generate_args(max_new_tokens, temperature, top_p) -> None:
    """One ValueError for ``max_new_tokens`` not an int >= 0, ``temperature`` < 0 or ``top_p`` outside (0, 1]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0.")
    check_sampling(temperature, top_p)


def prompt_layout(input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(positions [B, S], valid [B, S] bool)`` of a left-padded batch; ValueError for a mask that is not
    left padding or leaves a row empty."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, seq]; got "
                         f"{type(input_ids).__name__} {list(getattr(input_ids, 'shape', []))}.")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token per row.")
    if attention_mask is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}.")
        valid = attention_mask.bool()
        if bool((valid[:, 1:] < valid[:, :-1]).any()) or not bool(valid[:, -1].all()):
            raise ValueError("attention_mask must be LEFT padding (0s then 1s in every row, at least one 1): "
                             "pad prompts of different lengths on the left.")
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return positions, valid


def prefill(model, ids: Tensor, positions: Tensor, valid: Tensor, cache: KVCache, pol, q_chunk: int,
            fused: bool) -> Tensor:
    """The first step into an empty ``cache``: through the attention kernels (:mod:`.fused`) when ``fused``,
    nothing is padded and the policy has a dense form; else the materialised path in ``q_chunk`` blocks."""
    parts = pol.dense_parts(ids.shape[0], ids.shape[1], ids.device) if fused and bool(valid.all()) else None
    if parts is None:
        return policy_step(model, ids, positions, valid, cache, pol, q_chunk)
    return policy_step(model, ids, positions, valid, cache, pol, ids.shape[1], layer_attend_fn=fused_attend(parts))


def policy_forward(model, input_ids: Tensor, *, policy: str = "full", attention_mask: Optional[Tensor] = None,
                   q_chunk: int = 1024, fused: bool = True, **policy_options) -> Tensor:
    """Final-normed hidden states ``[B, S, dim]`` of a whole sequence under a policy's attention rule (e.g.
    LM-Infinite or StreamingLLM for perplexity); ``model.logits(hidden)`` gives the logits. Equals
    token-by-token decoding under the same policy. ``fused``: see :func:`prefill`."""
    positions, valid = prompt_layout(input_ids, attention_mask)
    pol = make_policy(policy, model, valid.sum(1), 0, **policy_options)
    if pol.needs_scores:
        raise ValueError(f"policy {policy!r} evicts by the attention of earlier decoding steps, so a whole-sequence "
                         "forward would be full attention; score it token by token (seqpar.inference.token_nll "
                         "with prefill=...).")
    with torch.no_grad():
        return prefill(model, input_ids.long(), positions, valid, KVCache(len(model.layers)), pol, q_chunk, fused)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, *, policy: str = "full",
             attention_mask: Optional[Tensor] = None, temperature: float = 0.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, q_chunk: int = 1024, fused: bool = True,
             return_cache: bool = False, **policy_options):
    """Generate ``max_new_tokens`` tokens after each prompt with a KV cache.

    Args:
        model: a :class:`seqpar.models.Llama` (any module with its interface: ``tok_embeddings``, ``layers``
            of blocks with ``pre_attention``/``post_attention``, ``norm``, ``logits``, ``rope_tables``).
        input_ids: ``[B, S]`` prompts, left-padded when of different lengths.
        max_new_tokens: >= 0.
        policy: ``full`` | ``streaming`` | ``h2o`` | ``lm_infinite`` | ``dca``; ``policy_options`` are its
            options (see each policy's module).
        attention_mask: ``[B, S]`` 1 on tokens, 0 on left padding (None: no padding).
        temperature: 0 is greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus truncation in (0, 1] when sampling.
        generator: a ``torch.Generator`` on the logits' device for reproducible sampling.
        q_chunk: queries per attention block in a materialised prefill (bounds the score matrix).
        fused: prefill an unpadded batch through the attention kernels where the policy allows (:func:`prefill`).
        return_cache: also return the :class:`KVCache` (to inspect its shape / memory).

    Returns:
        ``LongTensor [B, S + max_new_tokens]``: the prompts (padding included) then the new tokens; with
        ``return_cache``, ``(tokens, cache)``.

    Raises:
        ValueError: bad ``max_new_tokens``, sampling arguments, ``attention_mask``, policy name or option,
            or a prompt longer than a non-evicting policy's ``capacity``.
    """
    check_generate_args(max_new_tokens, temperature, top_p)
    positions, valid = prompt_layout(input_ids, attention_mask)
    pol = make_policy(policy, model, valid.sum(1), max_new_tokens, **policy_options)
    cache = KVCache(len(model.layers))
    out = [input_ids.long()]
    if max_new_tokens > 0:
        hidden = prefill(model, input_ids.long(), positions, valid, cache, pol, q_chunk, fused)
        next_pos = positions[:, -1:] + 1  # [B, 1]
        ones = torch.ones_like(next_pos, dtype=torch.bool)
        for step in range(max_new_tokens):
            tok = sample(model.logits(hidden[:, -1]), temperature, top_p, generator)[:, None]  # [B, 1]
            out.append(tok)
            if step + 1 < max_new_tokens:
                hidden = policy_step(model, tok, next_pos, ones, cache, pol, q_chunk)
                next_pos = next_pos + 1
    tokens = torch.cat(out, 1)
    return (tokens, cache) if return_cache else tokens
