"""Whole Llama model: cp=2 with ring attention gives cp=1's loss and every parameter gradient, with the
plain causal mask and with packed documents (``doc_ids``, as ``data.doc_mask=true`` trains), alone and
with a sliding window and sinks (``model.window``, ``model.sinks``), on every layout incl. ``docs``.

Tokens, labels and positions are sharded by the layout; each rank's loss is its token-loss sum over
the global token count, and the loss and the gradients are all-reduced with SUM, as the trainer does.
Everything runs in float64 so any difference beyond summation order is a real bug.
"""
import functools

import pytest
import torch

from dist_utils import run_distributed

LAYOUTS = ("zigzag", "striped", "contiguous", "docs")
# mask variant -> (ModelConfig extras, use doc ids); the docs layout needs doc ids.
VARIANTS = {"causal": ({}, False), "docs": ({}, True), "docs-window-sinks": (dict(window=5, sinks=2), True)}
CP = 2
# float64 throughout: the only difference between cp=1 and cp=2 is summation order (~1e-16 relative).
TOL = dict(atol=1e-10, rtol=1e-9)


def _cfg(**extra):
    from seqpar.config import ModelConfig

    return ModelConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, **extra)


def _doc_ids(seq_len=16):
    # Row 0: a one-token document and documents crossing the cp=2 shard and chunk boundaries; row 1: one
    # document filling the first contiguous shard exactly.
    return torch.tensor([[0] * 3 + [1] + [2] * 7 + [4] * (seq_len - 11), [0] * 8 + [1] * (seq_len - 8)])


def _batch(seq_len=16, batch=2):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 53, (batch, seq_len), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    labels[0, 3] = -100  # ignored labels must not count in the global token count
    positions = torch.arange(seq_len).expand(batch, seq_len).contiguous()
    return tokens, labels, positions


def _model(**extra):
    from seqpar.models import Llama

    torch.manual_seed(0)
    return Llama(_cfg(**extra)).to(torch.float64)


def _loss_and_grads(model, tokens, labels, positions, reduce=None, doc_ids=None):
    kw = {} if doc_ids is None else {"doc_ids": doc_ids}
    loss_sum, n_tok = model.loss(model(tokens, positions, **kw), labels, chunk_size=5)
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
    for variant, (extra, docs) in VARIANTS.items():
        ids = _doc_ids() if docs else None
        for layout in LAYOUTS:
            if layout == "docs" and not docs:
                continue
            model = _model(**extra)
            model.set_attn_fn(make_ring_attn_fn(None, layout, "torch", validate="first"))
            tok, lab, pos = (shard_sequence(t, 1, layout=layout, doc_ids=ids) for t in (tokens, labels, positions))
            loss, grads = _loss_and_grads(model, tok, lab, pos, reduce=dist.all_reduce, doc_ids=ids)
            dist.all_reduce(loss)
            for g in grads.values():
                dist.all_reduce(g)
            out[(variant, layout)] = (loss, grads)
    return out


@functools.lru_cache(maxsize=None)
def _cp_results():
    return run_distributed(_worker, CP, timeout_s=150)


CASES = [(v, lay) for v in VARIANTS for lay in LAYOUTS if lay != "docs" or VARIANTS[v][1]]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("variant,layout", CASES)
def test_cp2_matches_cp1(variant, layout):
    extra, docs = VARIANTS[variant]
    ids = _doc_ids() if docs else None
    ref_loss, ref_grads = _loss_and_grads(_model(**extra), *_batch(), doc_ids=ids)
    if docs:  # the mask matters: without it the loss differs
        assert not torch.allclose(ref_loss, _loss_and_grads(_model(**extra), *_batch())[0])
    for rank, res in enumerate(_cp_results()):
        loss, grads = res[(variant, layout)]
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{layout} rank {rank} loss: {m}")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], **TOL, msg=lambda m: f"{layout} rank {rank} {name}: {m}")
