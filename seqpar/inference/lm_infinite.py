"""``lm_infinite``: LM-Infinite's Lambda-shaped mask with relative distances capped at the training length.

Han, Wang, Peng, Wang, Ji, "LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language
Models", NAACL 2024 (arXiv:2308.16137). Two branches make the Lambda: a *global* branch, the first
``n_global`` tokens, visible to every query, and a *local* branch, the ``n_local`` most recent tokens
(``n_local`` = the training length by default). Distances are capped: a pair at distance ``d`` is rotated as
``min(d, train_len)``, so no attention logit sees a distance the model was not trained on.

The rule on original positions: query ``t`` sees key ``j <= t`` iff ``j < n_global`` or ``t - j < n_local``;
its RoPE distance is ``min(t - j, train_len)``. Works in a whole-sequence forward (perplexity) and in
decoding, where everything outside the two branches is evicted (memory ``n_global + n_local``).
Defaults: ``n_global=10`` starting tokens, ``n_local = train_len`` (the model's
``max_position_embeddings`` unless given).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.inference.attend import Branch
from seqpar.inference.cache import LayerCache
from seqpar.inference.fused import Part
from seqpar.inference.policy import CachePolicy, check_int, keep_by_position, rebase, train_length
from seqpar.ops.attention.mask import Mask


class LMInfinitePolicy(CachePolicy):
    """LM-Infinite. Raises ValueError for ``n_global`` > ``n_local``, ``n_local`` > ``train_len`` or a missing
    training length."""

    name = "lm_infinite"
    options = ("n_global", "n_local", "train_len")
    evicts = True

    def __init__(self, model, prompt_lens: Tensor, max_new_tokens: int, *, n_global: int = 10,
                 n_local: Optional[int] = None, train_len: Optional[int] = None):
        super().__init__(model, prompt_lens, max_new_tokens)
        self.train_len = train_length(model, train_len, self.name)
        self.n_local = check_int("n_local", self.train_len if n_local is None else n_local, 1,
                                 "recent tokens of the local branch")
        self.n_global = check_int("n_global", n_global, 0, "starting tokens of the global branch")
        if self.n_local > self.train_len:
            raise ValueError(f"n_local={self.n_local} must not exceed train_len={self.train_len}: the local branch "
                             "keeps distances the model was trained on.")
        if self.n_global > self.n_local:
            raise ValueError(f"n_global={self.n_global} must not exceed n_local={self.n_local}: the global branch is a "
                             "few starting tokens next to the local window (LM-Infinite uses 10).")

    @property
    def budget(self) -> int:
        return self.n_global + self.n_local

    def branches(self, t: Tensor, q_valid: Tensor, lc: LayerCache) -> list:
        kpos = lc.pos.permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, 1, Sk]
        dist = self.distance(t, lc)
        vis = self.causal_visible(t, q_valid, lc) & ((kpos < self.n_global) | (dist < self.n_local))
        near = dist < self.train_len  # real distance (below the cap)
        q_near, k_near = rebase(t, lc, self.train_len)
        capped_q = torch.full_like(t, self.train_len)  # query at train_len, key at 0: distance = the cap
        return [Branch(vis & near, q_near, k_near), Branch(vis & ~near, capped_q, torch.zeros_like(lc.pos))]

    def dense_parts(self, B: int, S: int, device):
        if self.n_local != self.train_len:
            return None  # global keys at a distance in [n_local, train_len) would need one more mask kind
        cap, ar = self.train_len, torch.arange(S, device=device)
        parts = [Part(0, S, 0, S, ar, ar, Mask(causal=True, window=cap - 1))]
        n = min(self.n_global, S - cap)
        if n > 0:  # query t sees global key j <= t - cap at distance cap: query index a = t - cap, causal
            parts.append(Part(cap, S, 0, n, torch.full((S - cap,), cap, device=device),
                              torch.zeros(n, dtype=torch.long, device=device), Mask(causal=True), 0, 0))
        return parts

    def evict(self, lc: LayerCache, t_now: Tensor) -> None:
        keep_by_position(lc, t_now, self.n_global, self.n_local)
