"""Masks are values shared by every layer and by the backward: what is derived from them is computed once.

``Mask.local`` hands every layer the same LocalMask, and the Triton kernels' per-row / per-key intervals
(:mod:`seqpar.ops.attention.triton.bounds`) are cached on it, so one training step computes each interval
tensor once per mask instead of once per layer and pass (issue 17). An in-place write to the ids
invalidates both caches. Results are unchanged: the cached intervals equal fresh ones, and a small Llama
through the Triton interpreter (child process, as test_attention_triton.py) matches the reference backend.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _docs(s=40):
    return torch.tensor([[0] * 7 + [1] * 13 + [2] + [3] * (s - 21)])


def test_local_is_shared_per_call_shape_and_invalidated_by_writes():
    ids = _docs()
    m = MaskCls()(causal=True, window=4, sinks=2, doc_ids=ids)
    a = m.local(0, 40, 0, 40)
    assert m.local(0, 40, 0, 40) is a  # every layer: one LocalMask
    assert m.local(8, 16, 0, 40) is not a and m.local(0, 40, 0, 40, q_stride=1) is a
    ids[0, 30:] = 4  # in place (still non-decreasing): a new LocalMask with fresh sink flags
    b = m.local(0, 40, 0, 40)
    assert b is not a
    fresh = MaskCls()(causal=True, window=4, sinks=2, doc_ids=ids.clone()).local(0, 40, 0, 40)
    assert torch.equal(b.k_sink, fresh.k_sink) and not torch.equal(a.k_sink, fresh.k_sink)


def MaskCls():
    from seqpar.ops.attention.mask import Mask
    return Mask


CASES = {
    "docs": dict(causal=True, doc_ids=_docs()),
    "docs_sinks_window": dict(causal=True, window=3, sinks=2, doc_ids=_docs()),
    "two_sided_docs": dict(causal=False, window=5, doc_ids=_docs()),
    "block_sparse_docs": dict(causal=False, doc_ids=_docs(), block_sparse=(8, torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) < 0.5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("call", [(0, 40, 0, 40, 1, 1), (20, 20, 0, 40, 1, 1), (1, 13, 0, 20, 3, 2)])
def test_cached_bounds_equal_fresh_and_follow_writes(name, call):
    from seqpar.ops.attention.triton import bounds
    qo, sq, ko, sk, qs, ks = call
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in CASES[name].items()}
    lm = MaskCls()(**kw).local(qo, sq, ko, sk, q_stride=qs, k_stride=ks)
    rows, cols = bounds.row_bounds(lm, 1, sq, sk, "cpu"), bounds.col_bounds(lm, 1, sq, sk, "cpu")
    assert bounds.row_bounds(lm, 1, sq, sk, "cpu") is rows and bounds.col_bounds(lm, 1, sq, sk, "cpu") is cols
    assert torch.equal(rows, bounds._row_bounds(lm, 1, sq, sk, "cpu"))
    assert torch.equal(cols, bounds._col_bounds(lm, 1, sq, sk, "cpu"))
    kw["doc_ids"][0, :10] = 0  # an in-place write through the LocalMask's views: recomputed
    again = bounds.row_bounds(lm, 1, sq, sk, "cpu")
    assert again is not rows and torch.equal(again, bounds._row_bounds(lm, 1, sq, sk, "cpu"))


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
@pytest.mark.parametrize("dq_mode", ["atomic", "kernel"])
def test_bounds_computed_once_per_step(monkeypatch, ac, dq_mode):
    """A 4-layer Llama's forward + backward (kernels stubbed out, so no interpreter is needed) computes the
    row intervals once and the column intervals once, whatever the activation checkpointing."""
    from seqpar.config.model import ModelConfig
    from seqpar.models.checkpointing import apply_ac
    from seqpar.models.llama import Llama
    from seqpar.ops.attention.triton import bounds, bwd_launch, fwd, function
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the registry's CPU availability; kernels never run
    monkeypatch.setattr(fwd, "run_kernel", lambda *a, **k: None)
    monkeypatch.setattr(bwd_launch, "run_kernel", lambda *a, **k: None)
    monkeypatch.setattr(bwd_launch, "_attn_bwd_preprocess", collections.defaultdict(lambda: lambda *a, **k: None))
    calls = {"rows": 0, "cols": 0}
    for kind, name in (("rows", "_row_bounds"), ("cols", "_col_bounds")):
        orig = getattr(bounds, name)
        monkeypatch.setattr(bounds, name, lambda *a, _o=orig, _k=kind, **k: (calls.__setitem__(_k, calls[_k] + 1), _o(*a, **k))[1])

    def attn(q, k, v, *, causal, softmax_scale, mask=None):
        from seqpar.ops.attention.dispatch import local_mask
        lm = local_mask(q, k, mask=mask, causal=causal)
        return function.attention(q, k, v, lm, softmax_scale=softmax_scale, dq_mode=dq_mode)[0]

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=32, dim=32, n_layers=4, n_heads=2, n_kv_heads=1), attn_fn=attn)
    apply_ac(model, ac)
    s = 40
    h = model(torch.randint(0, 32, (1, s)), torch.arange(s)[None], doc_ids=_docs(s))
    torch.nan_to_num(h).sum().backward()
    assert calls == {"rows": 1, "cols": 1}, calls


def _child_main():
    """In the interpreter child: a 3-layer Llama with packed documents, triton vs the reference backend."""
    sys.path[:0] = [ROOT]
    from seqpar.config.model import ModelConfig
    from seqpar.models.llama import Llama
    from seqpar.ops import attention
    errs = []
    for dq in ("kernel",):  # the default dQ mode (the atomic one is compared directly in test_attention_triton)
        res = {}
        for backend in ("torch", "triton"):
            fn = lambda q, k, v, *, causal, softmax_scale, mask=None, _b=backend: attention(
                q, k, v, causal=causal, softmax_scale=softmax_scale, mask=mask, backend=_b)
            torch.manual_seed(0)
            model = Llama(ModelConfig(vocab_size=32, dim=32, n_layers=3, n_heads=2, n_kv_heads=1), attn_fn=fn)
            model.init_weights(torch.Generator().manual_seed(0))
            tok = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(1))
            h = model(tok, torch.arange(40)[None], doc_ids=_docs(40))
            h.pow(2).sum().backward()
            res[backend] = [h.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        if len(res["torch"]) != len(res["triton"]) or len(res["torch"]) < 10:
            errs.append(f"{dq}: compared {len(res['torch'])} tensors")
        for a, b in zip(res["torch"], res["triton"]):
            if not torch.allclose(a, b, atol=2e-4, rtol=2e-3):
                errs.append(f"{dq}: max diff {(a - b).abs().max().item():.3g}")
    print(json.dumps(errs))


@pytest.mark.timeout(240)
def test_llama_with_documents_matches_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=230)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


if __name__ == "__main__":
    _child_main()
