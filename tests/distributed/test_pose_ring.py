"""A YaRN model under ring attention (cp=2, every layout) fed sharded PoSE positions gives the
single-process hidden states."""
import pytest
import torch

from dist_utils import run_distributed
from seqpar.data.pose import apply_pose

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def _model():
    from seqpar.config import ModelConfig
    from seqpar.models import Llama

    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, rope_scaling=YARN)).double()


def _batch():
    tokens = torch.randint(0, 53, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens, "positions": torch.arange(16).expand(2, 16), "doc_ids": tokens * 0}
    return apply_pose(batch, target_len=64, num_chunks=3, seed=0, step=0)


def _worker(rank, n):
    from seqpar.parallel import make_ring_attn_fn, shard_sequence

    batch, out = _batch(), {}
    for layout in ("zigzag", "striped", "contiguous"):
        model = _model()
        model.set_attn_fn(make_ring_attn_fn(None, layout=layout, backend="torch"))
        local = {k: shard_sequence(v, 1, layout=layout) for k, v in batch.items()}  # positions travel with tokens
        with torch.no_grad():
            out[layout] = model(local["tokens"], local["positions"])
    return out


@pytest.mark.timeout(120)
def test_pose_positions_under_ring_attention_match_single_process():
    from seqpar.parallel.layout import shard_sequence

    batch = _batch()
    assert batch["positions"].max() > 16  # the skips really go past the window
    with torch.no_grad():
        full = _model()(batch["tokens"], batch["positions"])  # [B, S, dim]
    results = run_distributed(_worker, 2)
    for layout in ("zigzag", "striped", "contiguous"):
        for rank, res in enumerate(results):
            want = shard_sequence(full, 1, layout=layout, rank=rank, world_size=2)
            # float64; ring merge vs one softmax differ only in summation order.
            torch.testing.assert_close(res[layout], want, rtol=1e-9, atol=1e-10)
