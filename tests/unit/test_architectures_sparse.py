"""Sparse patterns as masks (seqpar.models.sparse_patterns): each pattern's Mask against a float64 definition of
the paper's pattern written here token by token, the causal leak test through the whole model, the config errors."""
from __future__ import annotations

import pytest
import torch

from seqpar.config.model import ModelConfig
from seqpar.errors import ConfigError
from seqpar.models import build_model
from seqpar.models.sparse_patterns import MaskedLlama, bigbird_layout, fixed_layout
from seqpar.ops import Mask, attention


def softmax_reference(q, k, v, visible, scale):
    """float64 attention with a token-level ``visible [S, S]`` (or ``[B, S, S]``) bool; rows with no key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    vis = visible if visible.dim() == 3 else visible[None]
    s = s.masked_fill(~vis[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def _qkv(B=2, S=64, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _check_mask(mask: Mask, visible: torch.Tensor, S=64):
    q, k, v = _qkv(S=S)
    out = attention(q, k, v, mask=mask, softmax_scale=0.3, backend="torch")
    ref = softmax_reference(q, k, v, visible, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)  # float64 both: only summation order differs


def longformer_definition(S, w, g, doc_ids=None):
    """Beltagy et al. 2020 Sec. 3.1, causal: j <= i, same document, and (i - j <= w or j among the first g of its
    document: a global token, seen by every later token; its own row is full since all before it are global)."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    doc = torch.zeros(1, S, dtype=torch.long) if doc_ids is None else doc_ids
    start = torch.stack([torch.searchsorted(r, r, side="left") for r in doc])  # first index of each token's doc
    same = doc[:, :, None] == doc[:, None, :]
    glob = (j - start[:, None, :]) < g
    return same & (j <= i) & ((i - j <= w) | glob)


@pytest.mark.parametrize("docs", [False, True])
def test_longformer_mask_is_window_plus_global_tokens(docs):
    S, w, g = 64, 7, 3
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64]) if docs else None
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, attention="longformer", window=w, sinks=g)
    model = build_model(cfg)
    model._global_len = S  # set by forward
    vis = longformer_definition(S, w, g, doc_ids)
    _check_mask(model.attention_mask(doc_ids), vis if docs else vis.expand(2, S, S))


def test_bigbird_layout_follows_the_paper():
    n, w, g, r = 12, 3, 2, 3
    vis = bigbird_layout(n, window_blocks=w, global_blocks=g, random_blocks=r, seed=5)
    for i in range(n):
        window = set(range(max(0, i - 1), i + 1))  # causal half of the 3-block window
        glob = set(range(min(g, i + 1)))
        seen = set(torch.nonzero(vis[i]).flatten().tolist())
        assert window | glob <= seen and max(seen) <= i  # nothing after the query block
        rand = seen - window - glob
        cand = set(range(g, max(g, i - 1)))  # earlier blocks outside window and globals
        assert rand <= cand and len(rand) == min(r, len(cand))
    assert torch.equal(vis, bigbird_layout(n, window_blocks=w, global_blocks=g, random_blocks=r, seed=5))
    assert not torch.equal(vis, bigbird_layout(n, window_blocks=w, global_blocks=g, random_blocks=r, seed=6))
    # A shorter sequence gets the top-left corner: the pattern does not depend on the length.
    assert torch.equal(vis[:7, :7], bigbird_layout(7, window_blocks=w, global_blocks=g, random_blocks=r, seed=5))
    full = bigbird_layout(6, window_blocks=3, global_blocks=1, random_blocks=1, causal=False)
    assert full[0].all() and full[:, 0].all() and bool(full[3, 2]) and bool(full[3, 4])


def test_bigbird_mask_matches_token_level_pattern():
    S, b = 64, 8
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, attention="bigbird", sparse_block=b,
                      bigbird_global_blocks=1, bigbird_random_blocks=2, sparse_seed=3)
    model = build_model(cfg)
    model._global_len = S
    mask = model.attention_mask(None)
    layout = bigbird_layout(S // b, window_blocks=3, global_blocks=1, random_blocks=2, seed=3)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    qb, kb = i // b, j // b
    nb = torch.arange(S // b)
    rand = layout & ~((nb[:, None] - nb[None] >= 0) & (nb[:, None] - nb[None] <= 1)) & ~(nb[None] < 1)  # drawn blocks
    window = (qb - kb >= 0) & (qb - kb <= 1)
    vis = (j <= i) & (window | (kb < 1) | rand[qb, kb])  # window U global U random, causal at token level
    _check_mask(mask, vis.expand(2, S, S))


def test_sparse_transformer_fixed_pattern():
    S, l, c = 64, 16, 4
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, attention="blocksparse", sparse_stride=l,
                      sparse_summary=c)
    model = build_model(cfg)
    model._global_len = S
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    a1 = (i // l) == (j // l)  # Child et al. 2019, Sec. 4.2
    a2 = (j % l) >= l - c
    _check_mask(model.attention_mask(None), ((j <= i) & (a1 | a2)).expand(2, S, S))
    assert torch.equal(fixed_layout(4, stride=8, summary=4, causal=False),
                       torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool))


@pytest.mark.parametrize("options", [
    dict(attention="longformer", window=6, sinks=2),
    dict(attention="bigbird", sparse_block=8, bigbird_random_blocks=1),
    dict(attention="blocksparse", sparse_stride=16, sparse_summary=8),
])
def test_sparse_models_do_not_leak_the_future(options):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, **options)).double()
    assert isinstance(model, MaskedLlama)
    S, t = 64, 37
    tokens = torch.randint(0, 50, (2, S))
    pos = torch.arange(S).expand(2, S)
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 50
    a, b = model(tokens, pos), model(changed, pos)
    assert torch.equal(a[:, :t], b[:, :t])  # masked keys contribute exact zeros: bit-for-bit equal
    assert (a[:, t] - b[:, t]).abs().max() > 1e-6


def test_block_layout_spans_the_global_sequence_under_cp():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, attention="bigbird", sparse_block=8)
    model = build_model(cfg, cp=4)
    tokens = torch.randint(0, 50, (1, 16))
    model(tokens, torch.arange(16)[None])  # a rank's local shard: 16 of 64 tokens
    size, vis = model.block_layout(model._global_len)
    assert size * vis.shape[0] == 64


@pytest.mark.parametrize("options, words", [
    (dict(attention="longformer"), "model.window"),
    (dict(attention="bigbird", window=8), "model.window"),
    (dict(attention="longformer", window=8, sinks=2, causal=False), "global tokens"),
    (dict(attention="blocksparse", sparse_stride=24, sparse_summary=16), "sparse_stride"),
    (dict(attention="nope"), "model.attention"),
])
def test_sparse_config_errors(options, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**options)


_TRITON_SCRIPT = r"""
import json, torch
from seqpar.ops import Mask, attention
from seqpar.models.sparse_patterns import bigbird_layout, fixed_layout
S, out = 128, {}
masks = {"longformer": Mask(causal=True, window=20, sinks=3),
         "bigbird": Mask(causal=True, block_sparse=(16, bigbird_layout(8, random_blocks=2, seed=1))),
         "blocksparse": Mask(causal=True, block_sparse=(16, fixed_layout(8, stride=32, summary=16)))}
for name, mask in masks.items():
    torch.manual_seed(0)
    qkv = [torch.randn(1, S, 2, 16, requires_grad=True) for _ in range(3)]
    res = []
    for backend in ("triton", "torch"):
        o = attention(*qkv, mask=mask, backend=backend)
        g = torch.autograd.grad((o * o).sum(), qkv)
        res.append([o, *g])
    out[name] = max(float((a - b).abs().max()) for a, b in zip(*res))
print(json.dumps(out))
"""


@pytest.mark.timeout(240)
def test_patterns_run_exactly_on_the_triton_kernel_interpreted():
    """The same Masks on the Triton kernel (CPU interpreter): forward and gradients equal the reference backend's."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=230)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert errs.keys() == {"longformer", "bigbird", "blocksparse"}
    assert max(errs.values()) < 1e-4, errs  # float32 kernels, different summation order
