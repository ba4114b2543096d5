"""The sparse patterns (seqpar.models.sparse_patterns) through ring attention: a MaskedLlama at cp=2 gives cp=1's
loss and every parameter gradient, with and without packed documents, on zigzag and striped shards. The block
layout must span the GLOBAL sequence on every rank (build_model's ``cp``), which is what this checks end to end.
float64 throughout: only summation order differs (~1e-16 relative)."""
import functools

import pytest
import torch

from dist_utils import run_distributed

CP, S = 2, 32
TOL = dict(atol=1e-10, rtol=1e-9)
OPTIONS = {
    "longformer": dict(attention="longformer", window=5, sinks=2),
    "bigbird": dict(attention="bigbird", sparse_block=4, bigbird_global_blocks=1, bigbird_random_blocks=1),
    "blocksparse": dict(attention="blocksparse", sparse_stride=8, sparse_summary=4),
}
LAYOUTS = ("zigzag", "striped")


def _model(name, cp):
    from seqpar.config import ModelConfig
    from seqpar.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=41, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, **OPTIONS[name])
    return build_model(cfg, cp=cp).to(torch.float64)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 41, (2, S), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    positions = torch.arange(S).expand(2, S).contiguous()
    doc_ids = torch.tensor([[0] * 7 + [1] * 13 + [2] * 12, [0] * S])
    return tokens, labels, positions, doc_ids


def _loss_and_grads(model, tokens, labels, positions, doc_ids, reduce=None):
    loss_sum, n_tok = model.loss(model(tokens, positions, doc_ids=doc_ids), labels, chunk_size=7)
    n_tok = n_tok.clone()
    if reduce is not None:
        reduce(n_tok)
    (loss_sum / n_tok).backward()
    return (loss_sum / n_tok).detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, n):
    import torch.distributed as dist

    from seqpar.parallel import make_ring_attn_fn, shard_sequence

    out = {}
    tokens, labels, positions, doc_ids = _batch()
    for name in OPTIONS:
        for layout in LAYOUTS:
            for docs in (False, True):
                ids = doc_ids if docs else None
                model = _model(name, cp=n)
                model.set_attn_fn(make_ring_attn_fn(None, layout, "torch", validate="first"))
                tok, lab, pos = (shard_sequence(t, 1, layout=layout) for t in (tokens, labels, positions))
                loss, grads = _loss_and_grads(model, tok, lab, pos, ids, reduce=dist.all_reduce)
                dist.all_reduce(loss)
                for g in grads.values():
                    dist.all_reduce(g)
                out[(name, layout, docs)] = (loss, grads)
    return out


@functools.lru_cache(maxsize=None)
def _cp_results():
    return run_distributed(_worker, CP, timeout_s=150)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_sparse_pattern_cp2_matches_cp1(name, layout, docs):
    tokens, labels, positions, doc_ids = _batch()
    ids = doc_ids if docs else None
    ref_loss, ref_grads = _loss_and_grads(_model(name, cp=1), tokens, labels, positions, ids)
    for rank, res in enumerate(_cp_results()):
        loss, grads = res[(name, layout, docs)]
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{name} {layout} rank {rank} loss: {m}")
        for key, g in grads.items():
            torch.testing.assert_close(g, ref_grads[key], **TOL, msg=lambda m: f"{name} {layout} rank {rank} {key}: {m}")
