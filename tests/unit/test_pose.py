"""PoSE position ids: invariants, coverage of every distance, determinism, config errors (the ring case is in
tests/distributed/test_pose_ring.py)."""
import numpy as np
import pytest
import torch

from seqpar.config import Config, ConfigError, DataConfig, TrainConfig
from seqpar.data.pose import apply_pose, pose_position_ids


@pytest.mark.parametrize("seq_len,target,chunks", [(16, 64, 2), (16, 64, 3), (16, 16, 2), (7, 100, 7), (5, 40, 9)])
def test_invariants(seq_len, target, chunks):
    pos = pose_position_ids(64, seq_len, target, chunks, np.random.default_rng(0))  # [B, L_c]
    assert pos.shape == (64, seq_len) and pos.dtype == torch.int64
    steps = pos[:, 1:] - pos[:, :-1]
    assert (steps >= 1).all()  # strictly increasing
    assert (pos[:, 0] == 0).all() and (pos[:, -1] <= target - 1).all()
    # Contiguous chunks: consecutive ids except at most (chunks - 1) skips per row.
    assert ((steps > 1).sum(1) <= min(chunks, seq_len) - 1).all()
    if target == seq_len:
        assert torch.equal(pos, torch.arange(seq_len).expand(64, seq_len))


@pytest.mark.parametrize("chunks", [2, 3])
def test_every_distance_is_reachable(chunks):
    seq_len, target = 16, 64
    pos = pose_position_ids(4000, seq_len, target, chunks, np.random.default_rng(1)).numpy()
    dists = pos[:, None, :] - pos[:, :, None]  # [B, i, j]: pos_j - pos_i
    seen = set(np.unique(dists[dists > 0]).tolist())
    assert seen == set(range(1, target)), sorted(set(range(1, target)) - seen)[:10]


def test_apply_pose_is_deterministic_and_touches_only_positions():
    batch = {k: torch.arange(32).view(2, 16) for k in ("tokens", "labels", "positions", "doc_ids")}
    kw = dict(target_len=64, num_chunks=2, seed=3, step=5)
    a, b = apply_pose(batch, **kw), apply_pose(batch, **kw)
    assert torch.equal(a["positions"], b["positions"])  # resume / every cp rank: the same draw
    assert not torch.equal(apply_pose(batch, **{**kw, "step": 6})["positions"], a["positions"])
    assert not torch.equal(apply_pose(batch, dp_rank=1, **kw)["positions"], a["positions"])
    assert all(a[k] is batch[k] for k in ("tokens", "labels", "doc_ids"))
    assert apply_pose(batch, **{**kw, "target_len": 0}) is batch


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.pose_target_len"):
        Config(data=DataConfig(pose_target_len=100), train=TrainConfig(seq_len=256))
    with pytest.raises(ConfigError, match="data.position_ids"):
        DataConfig(pose_target_len=512, position_ids="document")
    with pytest.raises(ValueError, match="target_len"):
        pose_position_ids(1, 16, 8)
