"""The KV cache of cached decoding: per layer, UN-ROTATED keys and values with their original positions.

Keys are kept before RoPE (``[B, S, Hkv, D]``, GQA not expanded) because a cache policy decides at attention
time which position each key is rotated at: StreamingLLM shifts positions into the cache, LM-Infinite caps
distances, Dual Chunk Attention remaps them per chunk. Re-rotating the cached keys costs one elementwise pass
over the cache per step, the same order as the attention itself.

Every entry carries its ORIGINAL token position ``pos [B, S, Hkv]`` and a ``valid`` flag (left padding and
the slack of a compaction are invalid). Positions and flags are per kv head because H2O evicts per head:
after an eviction, head ``h`` of row ``b`` may keep other tokens than head ``h'``, but every (row, head)
keeps them in position order and the cache stays one rectangular tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One layer's cache. ``k``/``v [B, S, Hkv, D]`` (keys without RoPE), ``pos [B, S, Hkv]`` int64 original
    positions, ``valid [B, S, Hkv]`` bool, ``score [B, S, Hkv]`` float64 accumulated attention (H2O only)."""

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    pos: Optional[Tensor] = None
    valid: Optional[Tensor] = None
    score: Optional[Tensor] = None

    @property
    def length(self) -> int:
        """Cached entries per (row, kv head), valid or not."""
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> None:
        """Append ``k, v [B, Sn, Hkv, D]`` of tokens at ``pos [B, Sn]`` with ``valid [B, Sn]`` (False: padding)."""
        hkv = k.shape[2]
        pos = pos[:, :, None].expand(-1, -1, hkv)  # [B, Sn] -> [B, Sn, Hkv]
        valid = valid[:, :, None].expand(-1, -1, hkv)
        score = torch.zeros(pos.shape, dtype=torch.float64, device=k.device)
        if self.k is None:
            self.k, self.v, self.pos, self.valid, self.score = k, v, pos.clone(), valid.clone(), score
            return
        self.k, self.v = torch.cat((self.k, k), 1), torch.cat((self.v, v), 1)
        self.pos, self.valid = torch.cat((self.pos, pos), 1), torch.cat((self.valid, valid), 1)
        self.score = torch.cat((self.score, score), 1)

    def keep(self, keep: Tensor) -> None:
        """Drop every entry where ``keep [B, S, Hkv]`` is False, per (row, head), keeping position order.

        The new length is the largest kept count over (row, head); shorter (row, head)s are filled with
        invalid entries. Invalid entries are never kept.
        """
        keep = keep & self.valid
        n = int(keep.sum(1).max()) if keep.numel() else 0
        if n == self.length:
            return
        S = self.length
        # Kept entries first, in their order: sort by (not kept, index), stable.
        order = (~keep).long() * S + torch.arange(S, device=keep.device)[None, :, None]
        idx = order.argsort(dim=1)[:, :n]  # [B, n, Hkv]
        idx4 = idx[..., None].expand(-1, -1, -1, self.k.shape[-1])  # [B, n, Hkv, D]
        self.k, self.v = self.k.gather(1, idx4), self.v.gather(1, idx4)
        self.pos, self.score = self.pos.gather(1, idx), self.score.gather(1, idx)
        self.valid = keep.gather(1, idx)


class KVCache:
    """The cache of a whole model: one :class:`LayerCache` per decoder layer."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Entries per (row, kv head) in the first layer (every layer holds the same count under a policy
        that evicts by position; H2O's per-layer scores may differ only in which entries, not how many)."""
        return self.layers[0].length

    def shape(self) -> tuple:
        """``(B, S, Hkv, D)`` of the first layer's keys."""
        return tuple(self.layers[0].k.shape)

    def nbytes(self) -> int:
        """Bytes held by keys and values over all layers (the memory a policy bounds)."""
        return sum(lc.k.numel() * lc.k.element_size() * 2 for lc in self.layers if lc.k is not None)
