"""``h2o``: Heavy-Hitter Oracle eviction -- keep the tokens with the largest accumulated attention + a recent window.

Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Re, Barrett, Wang, Chen, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models", NeurIPS 2023 (arXiv:2306.14048). Every cached
token accumulates the attention it receives (summed over queries and over the query heads of its kv
group, since the cache here is GQA un-expanded: eviction is per kv head). After each step the cache keeps,
per (row, kv head), the ``n_recent`` newest tokens and, among the others, the ``n_heavy`` with the largest
accumulated score (ties: the earlier token); the rest is evicted for good.

Budgets are fractions of each row's prompt length (``n = max(1, floor(fraction * prompt_len))``); the
defaults, 10% heavy + 10% recent, are the paper's 20% cache. As in the paper's generation code, the prompt
is prefilled with full causal attention, its column sums are the initial scores, then the cache is cut to
the budget; each decoded token adds its attention row to the scores before the next eviction. Positions
are the original ones (H2O does not shift positions).
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqpar.inference.cache import LayerCache
from seqpar.inference.policy import CachePolicy, check_fraction


def heavy_recent_keep(score: Tensor, pos: Tensor, valid: Tensor, t_now: Tensor, n_heavy: Tensor,
                      n_recent: Tensor) -> Tensor:
    """``keep [B, S, Hkv]``: valid entries with ``pos > t_now - n_recent`` plus the ``n_heavy`` largest scores
    among the other valid ones (``n_* [B]``; ties go to the earlier entry)."""
    recent = valid & (pos > (t_now - n_recent)[:, None, None])
    cand = valid & ~recent
    masked = torch.where(cand, score, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # [B, S, Hkv]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            [None, :, None].expand_as(order))
    return recent | (cand & (rank < n_heavy[:, None, None]))


class H2OPolicy(CachePolicy):
    """H2O. Options ``heavy``, ``recent``: fractions in (0, 1] of each row's prompt length (ValueError outside)."""

    name = "h2o"
    options = ("heavy", "recent")
    needs_scores = True
    evicts = True

    def __init__(self, model, prompt_lens: Tensor, max_new_tokens: int, *, heavy: float = 0.1,
                 recent: float = 0.1):
        super().__init__(model, prompt_lens, max_new_tokens)
        self.heavy, self.recent = check_fraction("heavy", heavy), check_fraction("recent", recent)
        lens = prompt_lens.to(torch.float64)
        self.n_heavy = torch.floor(self.heavy * lens).long().clamp(min=1)  # [B]
        self.n_recent = torch.floor(self.recent * lens).long().clamp(min=1)

    @property
    def budget(self) -> int:
        return int((self.n_heavy + self.n_recent).max())

    def dense_parts(self, B: int, S: int, device):
        return None  # the prefill must return its attention probabilities (the initial scores)

    def evict(self, lc: LayerCache, t_now: Tensor) -> None:
        dev = lc.pos.device
        lc.keep(heavy_recent_keep(lc.score, lc.pos, lc.valid, t_now, self.n_heavy.to(dev), self.n_recent.to(dev)))
