"""Generation over a cache spread along the sequence (ring prefill, lse-merged decoding) equals
single-process generation, token for token, on gloo groups of 2 and 3 processes, for every position-based
policy, with left-padded prompts of different lengths and a prompt length not divisible by the ranks."""
import pytest
import torch

from dist_utils import run_distributed

CASES = [
    ("full", {}, 0.0),  # prefill through the training ring (seqpar.parallel.ring_attention)
    ("full", dict(fused=False), 0.0),  # prefill through the materialised ring
    ("full", {}, 0.9),  # sampled: drawn on rank 0 and broadcast
    ("streaming", dict(sinks=2, window=5), 0.0),
    ("lm_infinite", dict(n_global=2, train_len=6), 0.0),
    ("dca", dict(train_len=8, chunk_size=5, local_window=1), 0.0),
]
NEW = 9


def _model():
    from seqpar.config import ModelConfig
    from seqpar.models import Llama

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    return Llama(cfg).to(torch.float64)


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # row 1: 9 tokens, left-padded
    return ids, mask


def _worker(rank, n):
    from seqpar.inference import generate
    from seqpar.inference.distributed import generate_distributed

    model, (ids, mask) = _model(), _prompts()
    results = []
    for name, opts, temp in CASES:
        kw = dict(policy=name, attention_mask=mask, temperature=temp, **opts)
        dist_out, cache = generate_distributed(model, ids, NEW, generator=torch.Generator().manual_seed(5),
                                               return_cache=True, **kw)
        single = generate(model, ids, NEW, generator=torch.Generator().manual_seed(5), **kw)
        results.append((dist_out, single, cache.length))
    try:
        generate_distributed(model, ids, 2, policy="h2o")
        refused = False
    except ValueError:
        refused = True
    return results, refused


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_generation_equals_single_process(world):
    per_rank = run_distributed(_worker, world, timeout_s=300.0)
    for rank, (results, refused) in enumerate(per_rank):
        assert refused, rank
        for (name, opts, _), (dist_out, single, length) in zip(CASES, results):
            assert torch.equal(dist_out, single), (world, rank, name)
            assert torch.equal(dist_out, per_rank[0][0][CASES.index((name, opts, _))][0])
            if name == "streaming":  # each rank holds at most its share of sinks + window (+ its slack)
                assert length <= 2 + 5, (rank, length)
            elif name in ("full", "dca"):  # the prompt split in ceil(13 / world) blocks, new tokens round-robin
                assert length == -(-13 // world) + len(range(rank, NEW - 1, world)), (name, rank, length)
