"""Next-token choice from logits: greedy, temperature, nucleus (top-p), with an explicit generator."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_sampling(temperature, top_p) -> None:
    """One ValueError for ``temperature`` < 0 or ``top_p`` outside (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0: greedy).")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1: no nucleus truncation).")


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``logits [B, V]`` with every token outside the nucleus set to -inf: the smallest set of most likely
    tokens whose probability reaches ``top_p`` (Holtzman et al., ICLR 2020); the top token always stays."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """``logits [B, V] -> tokens [B]`` int64: argmax for ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the top-p nucleus, from ``generator`` (None: global RNG)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
