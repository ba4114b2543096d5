"""PoSE: Positional Skip-wisE training (Zhu et al. 2023) -- a long context simulated in a short window.

A training row of ``L_c`` tokens (``train.seq_len``) is cut into ``N`` contiguous chunks; chunk ``i``
keeps its tokens and consecutive position ids but is moved right by a skip bias ``u_i``, with
``0 = u_0 <= u_1 <= ... <= u_{N-1} <= L_t - L_c``, ``u_i`` uniform in ``[u_{i-1}, L_t - L_c]``. Positions therefore:

* increase strictly along the row (chunks never overlap or reorder: biases are non-decreasing),
* stay below ``L_t`` (the last position is at most ``L_c - 1 + L_t - L_c``),
* make every relative distance in ``[1, L_t - 1]`` reachable over many samples (the first token
  and the last chunk span up to ``L_t - 1``; short distances occur inside chunks),

so the model sees the relative distances of a length-``L_t`` context at the cost of ``L_c`` tokens
(and with RoPE scaling for ``L_t`` it learns the scaled frequencies at those distances).

Only ``positions`` change; tokens, labels and doc ids are untouched, and attention stays the causal
mask of the row. Under ring attention the positions are sharded with the tokens like any other
``[B, S]`` tensor, so nothing here knows about parallelism. Sampling is seeded by
``(seed, step, micro_step, dp_rank)``: cp ranks of one dp rank draw the same positions for the same
row, and a resumed run draws exactly the same ones.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def pose_position_ids(
    batch_size: int, seq_len: int, target_len: int, num_chunks: int = 2,
    rng: Optional[np.random.Generator] = None,
) -> torch.Tensor:
    """Skip-wise position ids for ``batch_size`` rows of ``seq_len`` tokens covering ``target_len``.

    Args:
        batch_size: rows ``B``. seq_len: ``L_c``, tokens per row. target_len: ``L_t >= L_c``.
        num_chunks: ``N``; chunk lengths are a uniform random split of ``L_c`` into ``N`` parts of at
            least one token (``min(N, L_c)`` chunks). rng: numpy Generator (None: a fresh unseeded one).

    Returns:
        ``[B, L_c]`` int64, each row strictly increasing, first position 0, last ``<= L_t - 1``.
    Raises:
        ValueError: ``target_len < seq_len`` or ``num_chunks < 1``.
    """
    if target_len < seq_len:
        raise ValueError(f"PoSE target_len={target_len} must be >= seq_len={seq_len} (data.pose_target_len).")
    if num_chunks < 1:
        raise ValueError(f"PoSE num_chunks={num_chunks} must be >= 1 (data.pose_chunks).")
    rng = rng if rng is not None else np.random.default_rng()
    n = min(num_chunks, seq_len)
    slack = target_len - seq_len  # room for the skips
    out = np.empty((batch_size, seq_len), dtype=np.int64)
    for row in range(batch_size):
        # n-1 distinct cut points in [1, L_c-1]: chunks of >= 1 token, every split equally likely.
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=n - 1, replace=False)) if n > 1 else np.array([], int)
        # u_0 = 0 keeps the row anchored at position 0 (as the reference implementation does); then
        # u_i ~ U{u_{i-1}, ..., slack} in order, the paper's sampling.
        biases = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            biases[i] = rng.integers(biases[i - 1], slack + 1)
        chunk_of_token = np.searchsorted(cuts, np.arange(seq_len), side="right")  # [L_c] in [0, n)
        out[row] = np.arange(seq_len) + biases[chunk_of_token]
    return torch.from_numpy(out)


def apply_pose(batch: dict, *, target_len: int, num_chunks: int, seed: int, step: int,
               micro_step: int = 0, dp_rank: int = 0) -> dict:
    """A copy of ``batch`` whose ``positions [B, S]`` are PoSE position ids (other tensors shared).

    Call on the FULL row before sequence sharding (the trainer shards ``positions`` with the tokens).
    ``target_len == 0`` returns ``batch`` unchanged. Deterministic in ``(seed, step, micro_step, dp_rank)``.
    """
    if target_len == 0:
        return batch
    b, s = batch["tokens"].shape
    rng = np.random.default_rng((seed, step, micro_step, dp_rank))
    return {**batch, "positions": pose_position_ids(b, s, target_len, num_chunks, rng)}
