"""Whole Llama model: cp=2 with ring attention gives cp=1's loss and every parameter gradient.

Tokens, labels and positions are sharded by the layout; each rank's loss is its token-loss sum over
the global token count, and the loss and the gradients are all-reduced with SUM, as the trainer does.
Everything runs in float64 so any difference beyond summation order is a real bug.
"""
import functools

import pytest
import torch

from dist_utils import run_distributed

LAYOUTS = ("zigzag", "striped", "contiguous")
CP = 2
# float64 throughout: the only difference between cp=1 and cp=2 is summation order (~1e-16 relative).
TOL = dict(atol=1e-10, rtol=1e-9)


def _cfg():
    from seqpar.config import ModelConfig

    return ModelConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)


def _batch(seq_len=12, batch=2):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 53, (batch, seq_len), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    labels[0, 3] = -100  # ignored labels must not count in the global token count
    positions = torch.arange(seq_len).expand(batch, seq_len).contiguous()
    return tokens, labels, positions


def _model():
    from seqpar.models import Llama

    torch.manual_seed(0)
    return Llama(_cfg()).to(torch.float64)


def _loss_and_grads(model, tokens, labels, positions, reduce=None):
    loss_sum, n_tok = model.loss(model(tokens, positions), labels, chunk_size=5)
    n_tok = n_tok.clone()
    if reduce is not None:
        reduce(n_tok)  # global token count
    loss = loss_sum / n_tok
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, n):
    import torch.distributed as dist

    from seqpar.parallel import make_ring_attn_fn, shard_sequence

    out = {}
    tokens, labels, positions = _batch()
    for layout in LAYOUTS:
        model = _model()
        model.set_attn_fn(make_ring_attn_fn(None, layout, "torch", validate="first"))
        tok, lab, pos = (shard_sequence(t, 1, layout=layout) for t in (tokens, labels, positions))
        loss, grads = _loss_and_grads(model, tok, lab, pos, reduce=dist.all_reduce)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
        out[layout] = (loss, grads)
    return out


@functools.lru_cache(maxsize=None)
def _cp_results():
    return run_distributed(_worker, CP, timeout_s=150)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cp2_matches_cp1(layout):
    ref_loss, ref_grads = _loss_and_grads(_model(), *_batch())
    for rank, res in enumerate(_cp_results()):
        loss, grads = res[layout]
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{layout} rank {rank} loss: {m}")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], **TOL, msg=lambda m: f"{layout} rank {rank} {name}: {m}")
