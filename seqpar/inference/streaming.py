"""``streaming``: StreamingLLM's attention sinks + a rolling window, with positions assigned in the cache.

Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). The cache keeps the first ``sinks`` tokens (the "attention sinks" that absorb the
softmax's surplus mass) and the ``window`` most recent tokens; everything in between is evicted. Positions
are assigned within the cache ("pos-shift", the paper's Section 3.2): the newest token sits at slot
``min(t, sinks + window - 1)``, sinks at ``0..sinks-1``, the window right after them, so RoPE never sees a
distance beyond the cache size however long the stream.

The rule on original positions (what the float64 reference test builds): query ``t`` sees key ``j <= t``
iff ``j < sinks`` or ``t - j < window``; the distance is ``t - j`` for a window key and
``min(t, sinks + window - 1) - j`` for a sink. Defaults: 4 sinks (the paper's finding that four initial
tokens suffice) and a window of 1020, a 1024-token cache (one of the cache sizes the paper evaluates).
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqpar.inference.attend import Branch
from seqpar.inference.cache import LayerCache
from seqpar.inference.fused import Part
from seqpar.inference.policy import CachePolicy, check_int, keep_by_position, rebase
from seqpar.ops.attention.mask import Mask


class StreamingPolicy(CachePolicy):
    """StreamingLLM: ``sinks`` first tokens + ``window`` newest, pos-shift positions. Raises ValueError for
    ``sinks`` < 0, ``window`` < 1 or ``sinks`` > ``window``."""

    name = "streaming"
    options = ("sinks", "window")
    evicts = True

    def __init__(self, model, prompt_lens: Tensor, max_new_tokens: int, *, sinks: int = 4, window: int = 1020):
        super().__init__(model, prompt_lens, max_new_tokens)
        self.sinks = check_int("sinks", sinks, 0, "initial tokens kept as attention sinks")
        self.window = check_int("window", window, 1, "recent tokens kept, the current one included")
        if sinks > window:
            raise ValueError(f"sinks={sinks} must not exceed window={window}: the sinks are a few initial tokens "
                             "next to a longer rolling window (StreamingLLM uses 4 sinks).")

    @property
    def budget(self) -> int:
        return self.sinks + self.window

    def branches(self, t: Tensor, q_valid: Tensor, lc: LayerCache) -> list:
        vis = self.causal_visible(t, q_valid, lc)
        kpos = lc.pos.permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, 1, Sk]
        is_sink = kpos < self.sinks
        in_window = self.distance(t, lc) < self.window
        q_slot, k_slot = rebase(t, lc, self.budget)  # window keys: same distances, cache-slot angles
        sink_q = t.clamp(max=self.budget - 1)  # the newest token's slot in a full cache
        return [Branch(vis & ~is_sink & in_window, q_slot, k_slot), Branch(vis & is_sink, sink_q, lc.pos)]

    def dense_parts(self, B: int, S: int, device) -> list:
        ar = torch.arange(S, device=device)
        parts = [Part(0, S, self.sinks, S, ar, ar[self.sinks:], Mask(causal=True, window=self.window - 1))]
        if self.sinks:  # the sinks, seen by every later query from the newest cache slot
            parts.append(Part(0, S, 0, min(self.sinks, S), ar.clamp(max=self.budget - 1), ar[:self.sinks],
                              Mask(causal=True)))
        return [p for p in parts if p.kb > p.ka]

    def evict(self, lc: LayerCache, t_now: Tensor) -> None:
        keep_by_position(lc, t_now, self.sinks, self.window)
