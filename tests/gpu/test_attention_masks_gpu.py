"""Every mask kind through the Triton kernel on a GPU in bf16, judged against torch's own bf16 error.

The float64 reference is written from the ``Mask`` contract with one boolean ``[B, S, S]`` matrix
(vectorised here; ``tests/reference.py:mask_matrix`` is the pair-by-pair spelling used on the CPU). The bar is
SDPA in bf16 with the same boolean ``attn_mask`` (its memory-efficient kernel takes any mask): the Triton
kernel's relative error vs float64 must stay within 2x SDPA's (floor 1e-3), for out and every gradient.
Every row keeps its own key visible (the diagonal), so SDPA never sees an all-masked row.
"""
from __future__ import annotations

import math

import pytest
import torch

from seqpar.ops import Mask, attention_with_lse


def _doc_ids(b, s, n_docs, gen, device):
    cuts = torch.stack([torch.randperm(s - 1, generator=gen)[: n_docs - 1].sort().values + 1 for _ in range(b)])
    ids = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        ids[r, cuts[r]] = 1
    return ids.cumsum(1).to(device)


def _visible(mask: Mask, b, s, device):
    """``[B, S, S]`` bool from the Mask's contract (query i, key j, global positions)."""
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    vis = torch.ones(b, s, s, dtype=torch.bool, device=device)
    start = torch.zeros(b, s, dtype=torch.long, device=device)
    if mask.doc_ids is not None:
        d = mask.doc_ids
        vis &= d[:, :, None] == d[:, None, :]
        first = torch.ones_like(d, dtype=torch.bool)
        first[:, 1:] = d[:, 1:] != d[:, :-1]
        start = torch.cummax(torch.where(first, torch.arange(s, device=device).expand(b, s), 0), 1).values
    if mask.causal:
        vis &= (j <= i)[None]
    if mask.window is not None:
        win = (i - j <= mask.window) & ((j - i <= mask.window) if not mask.causal else torch.ones_like(i - j, dtype=torch.bool))
        sink = (torch.arange(s, device=device)[None] - start) < mask.sinks  # [B, S] key is a sink of its doc
        vis &= win[None] | sink[:, None, :]
    if mask.block_sparse is not None:
        bs, layout = mask.block_sparse
        vis &= layout.to(device)[(i // bs), (j // bs)][None]
    return vis


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fwd_bwd_ref(q, k, v, dout, vis):
    g = q.shape[2] // k.shape[2]
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr.repeat_interleave(g, 2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~vis[:, None], float("-inf")), -1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr.repeat_interleave(g, 2))
    (out * dout.double()).sum().backward()
    return [out.detach(), qr.grad, kr.grad, vr.grad]


def _sdpa(q, k, v, dout, vis):
    qs, ks, vs = (t.detach().clone().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=vis[:, None], enable_gqa=True)
    out.backward(dout.transpose(1, 2))
    return [t.transpose(1, 2) for t in (out, qs.grad, ks.grad, vs.grad)]


def _triton(q, k, v, dout, mask):
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_with_lse(qt, kt, vt, mask=mask, backend="triton")
    out.backward(dout)
    assert torch.isfinite(lse[lse != float("-inf")]).all()
    return [out, qt.grad, kt.grad, vt.grad]


def _cases(b, s, device, gen):
    docs = _doc_ids(b, s, 7, gen, device)
    layout = torch.rand(s // 128, s // 128, generator=gen) < 0.5
    layout |= torch.eye(s // 128, dtype=torch.bool)  # keep the diagonal: no empty rows for SDPA
    return {
        "documents": Mask(causal=True, doc_ids=docs),
        "window_sinks_docs": Mask(causal=True, window=300, sinks=4, doc_ids=docs),
        "two_sided_window_docs": Mask(causal=False, window=200, doc_ids=docs),
        "block_sparse_causal": Mask(causal=True, block_sparse=(128, layout)),
        "block_sparse_docs_noncausal": Mask(causal=False, doc_ids=docs, block_sparse=(128, layout)),
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_mask_kind_in_bf16_within_sdpa_error():
    gen = torch.Generator().manual_seed(0)
    b, s, h, hkv, d = 2, 2048, 8, 2, 128
    dev = "cuda"
    failures = []
    for name, mask in _cases(b, s, dev, gen).items():
        q = torch.randn(b, s, h, d, generator=gen).to(dev, torch.bfloat16)
        k, v = (torch.randn(b, s, hkv, d, generator=gen).to(dev, torch.bfloat16) for _ in range(2))
        dout = torch.randn(b, s, h, d, generator=gen).to(dev, torch.bfloat16)
        vis = _visible(mask, b, s, dev)
        ref = _fwd_bwd_ref(q, k, v, dout, vis)
        bar = [_rel(x, r) for x, r in zip(_sdpa(q, k, v, dout, vis), ref)]
        got = [_rel(x, r) for x, r in zip(_triton(q, k, v, dout, mask), ref)]
        print(name, "triton", [f"{e:.1e}" for e in got], "sdpa", [f"{e:.1e}" for e in bar])
        for what, e, e0 in zip(("out", "dq", "dk", "dv"), got, bar):
            if not e <= max(2 * e0, 1e-3):
                failures.append(f"{name} {what}: {e:.2e} > 2 x sdpa {e0:.2e}")
    assert not failures, failures
