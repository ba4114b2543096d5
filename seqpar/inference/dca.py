"""``dca``: Dual Chunk Attention, a training-free remapping of RoPE positions by chunks.

An, Huang, Zhang, Gong, Qiu, Zhou, Kong, "Training-Free Long-Context Scaling of Large Language Models",
ICML 2024 (arXiv:2402.17463; code: ChunkLlama). The sequence is cut into chunks of ``chunk_size`` (s)
tokens; every key is rotated at its index inside its chunk, ``j mod s``. The query's position depends on
where the key is (``c`` = the training length ``train_len``, ``w`` = ``local_window``):

* intra-chunk (same chunk): ``t mod s`` -- the true distance;
* successive-chunk (key in the chunk just before): ``s + (t mod s)`` for the first ``w`` queries of the
  chunk (true distance, keeping locality across the boundary), else ``c - 1``;
* inter-chunk (key two or more chunks back): ``c - 1``.

Every distance stays below ``c``, so the model never sees an untrained one; every key stays visible (causal),
so the cache is not bounded by DCA. Defaults as in ChunkLlama: ``chunk_size = 3c/4``, ``local_window = c/16``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.inference.attend import Branch
from seqpar.inference.cache import LayerCache
from seqpar.inference.fused import Part
from seqpar.inference.policy import CachePolicy, check_int, train_length
from seqpar.ops.attention.mask import Mask


class DCAPolicy(CachePolicy):
    """Dual Chunk Attention. Options ``train_len``, ``chunk_size``, ``local_window``, ``capacity`` (as ``full``).
    Raises ValueError unless ``1 <= chunk_size <= train_len`` and ``local_window <= train_len - chunk_size``."""

    name = "dca"
    options = ("train_len", "chunk_size", "local_window", "capacity")

    def __init__(self, model, prompt_lens: Tensor, max_new_tokens: int, *, train_len: Optional[int] = None,
                 chunk_size: Optional[int] = None, local_window: Optional[int] = None,
                 capacity: Optional[int] = None):
        super().__init__(model, prompt_lens, max_new_tokens, capacity=capacity)
        c = self.train_len = train_length(model, train_len, self.name)
        self.chunk_size = check_int("chunk_size", 3 * c // 4 if chunk_size is None else chunk_size, 1,
                                    "tokens per chunk")
        self.local_window = check_int("local_window", c // 16 if local_window is None else local_window, 0,
                                      "queries of a chunk that keep true distances to the previous chunk")
        if self.chunk_size > c:
            raise ValueError(f"chunk_size={self.chunk_size} must not exceed train_len={c}.")
        if self.local_window > c - self.chunk_size:
            raise ValueError(f"local_window={self.local_window} must be <= train_len - chunk_size = "
                             f"{c - self.chunk_size} so successive-chunk distances stay below train_len.")

    def branches(self, t: Tensor, q_valid: Tensor, lc: LayerCache) -> list:
        s, c, w = self.chunk_size, self.train_len, self.local_window
        vis = self.causal_visible(t, q_valid, lc)
        gap = (t // s)[:, None, :, None] - (lc.pos // s).permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, Sq, Sk]
        k_pos = lc.pos % s
        r = t % s
        succ_q = torch.where(r < w, s + r, torch.full_like(r, c - 1))
        return [Branch(vis & (gap == 0), r, k_pos), Branch(vis & (gap == 1), succ_q, k_pos),
                Branch(vis & (gap >= 2), torch.full_like(t, c - 1), k_pos)]

    def dense_parts(self, B: int, S: int, device) -> list:
        s, c, w = self.chunk_size, self.train_len, self.local_window
        ar = torch.arange(S, device=device)
        chunk = (ar // s)[None].expand(B, S)  # intra-chunk = causal within "documents" of one chunk each
        parts = [Part(0, S, 0, S, ar % s, ar % s, Mask(causal=True, doc_ids=chunk))]
        for m in range(1, -(-S // s)):
            qa, qb = m * s, min((m + 1) * s, S)
            r = ar[qa:qb] % s
            succ = torch.where(r < w, s + r, torch.full_like(r, c - 1))
            parts.append(Part(qa, qb, qa - s, qa, succ, ar[qa - s:qa] % s))  # the chunk before: all visible
            if m >= 2:
                parts.append(Part(qa, qb, 0, qa - s, torch.full_like(r, c - 1), ar[:qa - s] % s))
        return parts
