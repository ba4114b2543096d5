"""The cache-policy interface, and ``full`` (plain causal attention over the whole cache).

A policy answers three questions for cached decoding (:mod:`seqpar.inference.runner`):

* :meth:`CachePolicy.branches`: for a block of queries at original positions ``t [B, Sq]``, which cached
  keys each sees and at which RoPE positions (disjoint :class:`~seqpar.inference.attend.Branch`es);
* :meth:`CachePolicy.evict`: which entries to drop after a step (the policy's memory budget);
* :attr:`CachePolicy.needs_scores`: whether attention probabilities must be accumulated (H2O).

The visibility rule is stated on original positions, so the same policy serves a whole-sequence forward
(perplexity), a prefill, and token-by-token decoding, and the three agree.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.inference.attend import Branch
from seqpar.inference.cache import LayerCache
from seqpar.inference.fused import Part
from seqpar.ops.attention.mask import Mask


def check_int(name: str, value, minimum: int, why: str) -> int:
    """``value`` as an int >= ``minimum``, or one ValueError naming the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum} ({why}).")
    return value


def check_fraction(name: str, value) -> float:
    """``value`` as a float in (0, 1], or one ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a fraction in (0, 1] of the prompt length.")
    return float(value)


def train_length(model, value, policy: str) -> int:
    """The training context length a position-remapping policy needs: ``value`` or the model's
    ``max_position_embeddings``."""
    if value is None:
        value = getattr(model.cfg, "max_position_embeddings", None)
    if value is None:
        raise ValueError(f"policy {policy!r} needs the training context length: pass train_len=... "
                         "or set model.max_position_embeddings.")
    return check_int("train_len", value, 1, "the context length the model was trained at")


class CachePolicy:
    """``full``: every cached key of the row, at its original position (causal attention).

    Options: ``capacity`` (None: unbounded): the most tokens the cache may hold; a prompt plus
    ``max_new_tokens`` beyond it raises ValueError, since full attention never evicts.
    """

    name = "full"
    options: tuple = ("capacity",)
    needs_scores = False
    evicts = False

    def __init__(self, model, prompt_lens: Tensor, max_new_tokens: int, *, capacity: Optional[int] = None):
        self.model = model
        self.capacity = None if capacity is None else check_int("capacity", capacity, 1, "tokens the cache may hold")
        total = int(prompt_lens.max()) + max_new_tokens
        if self.capacity is not None and total > self.capacity:
            raise ValueError(
                f"policy {self.name!r} keeps every token but the prompt ({int(prompt_lens.max())} tokens) plus "
                f"max_new_tokens={max_new_tokens} needs {total} > capacity={self.capacity}; raise capacity or use "
                "an evicting policy (streaming, h2o, lm_infinite).")

    @property
    def budget(self) -> Optional[int]:
        """Most entries per (row, kv head) kept between steps (None: unbounded)."""
        return self.capacity

    @staticmethod
    def causal_visible(t: Tensor, q_valid: Tensor, lc: LayerCache) -> Tensor:
        """``[B, Hkv, Sq, Sk]``: key valid, not after the query, query real (not padding)."""
        kpos = lc.pos.permute(0, 2, 1)[:, :, None, :]  # [B, Sk, Hkv] -> [B, Hkv, 1, Sk]
        kval = lc.valid.permute(0, 2, 1)[:, :, None, :]
        return kval & (kpos <= t[:, None, :, None]) & q_valid[:, None, :, None]

    @staticmethod
    def distance(t: Tensor, lc: LayerCache) -> Tensor:
        """``[B, Hkv, Sq, Sk]`` original distance ``t - j`` of each (query, key)."""
        return t[:, None, :, None] - lc.pos.permute(0, 2, 1)[:, :, None, :]

    def branches(self, t: Tensor, q_valid: Tensor, lc: LayerCache) -> list:
        """Disjoint branches for queries at original positions ``t [B, Sq]`` (``q_valid``: not padding)."""
        return [Branch(self.causal_visible(t, q_valid, lc), t, lc.pos)]

    def evict(self, lc: LayerCache, t_now: Tensor) -> None:
        """Drop entries after a step whose newest token sits at ``t_now [B]`` (nothing for ``full``)."""

    def dense_parts(self, B: int, S: int, device) -> Optional[list]:
        """The branches of a whole unpadded sequence ``0..S-1`` as :class:`~seqpar.inference.fused.Part`s for
        the attention kernels, or None where the policy has no such form (then the materialised path runs)."""
        ar = torch.arange(S, device=device)
        return [Part(0, S, 0, S, ar, ar, Mask(causal=True))]


def rebase(t: Tensor, lc: LayerCache, span: int) -> tuple[Tensor, Tensor]:
    """Original positions shifted per row so the newest query sits at ``min(t, span - 1)``: the same
    relative distances with small angles (the cache-slot positions of a full rolling cache of ``span``)."""
    shift = (t.max(dim=1).values - (span - 1)).clamp(min=0)  # [B]
    return t - shift[:, None], lc.pos - shift[:, None, None]


def keep_by_position(lc: LayerCache, t_now: Tensor, n_first: int, n_recent: int) -> None:
    """Keep the first ``n_first`` positions and the ``n_recent`` newest (``pos > t_now - n_recent``)."""
    recent = lc.pos > (t_now[:, None, None] - n_recent)
    lc.keep((lc.pos < n_first) | recent)

