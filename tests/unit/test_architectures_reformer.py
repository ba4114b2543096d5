"""Reformer's LSH attention (seqpar.models.reformer) against a float64 definition written pair by pair, the angular
hash, the causal leak of the paper's sorted chunks (measured) and of the leak-free variant (none), gradcheck."""
from __future__ import annotations

import pytest
import torch

from seqpar.config.model import ModelConfig
from seqpar.errors import ConfigError
from seqpar.models import build_model
from seqpar.models.reformer import SELF_SCORE, lsh_attention, lsh_buckets


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_angular_hash_is_argmax_of_rotations():
    x, rot = _rand(1, 2, 9, 6, seed=1), _rand(3, 6, 4, seed=2)
    b = lsh_buckets(x, rot)
    for r in range(3):
        for h in range(2):
            for s in range(9):
                proj = x[0, h, s] @ rot[r]
                assert b[r, 0, h, s] == int(torch.cat([proj, -proj]).argmax())
    assert torch.equal(b, lsh_buckets(x * 3.7, rot))  # angular: the scale of x does not matter
    assert b.min() >= 0 and b.max() < 8


def reference(q, v, rot, chunk, scale, leak_free):
    """Sec. 2 written pair by pair: i sees j (j <= i, same bucket, chunk rule or sorted window) in ANY round;
    softmax over that union, keys = q / |q|, self at -1e5."""
    B, S, H, D = q.shape
    out = torch.zeros_like(v)
    buckets = lsh_buckets(q.transpose(1, 2), rot)
    for b in range(B):
        for h in range(H):
            seen = torch.zeros(S, S, dtype=torch.bool)
            for r in range(rot.shape[0]):
                bk = buckets[r, b, h].tolist()
                order = sorted(range(S), key=lambda t: (bk[t], t))
                s_of = {t: i for i, t in enumerate(order)}
                for i in range(S):
                    for j in range(i + 1):
                        si, sj = s_of[i], s_of[j]
                        near = 0 <= si - sj <= chunk if leak_free else sj // chunk in (si // chunk, si // chunk - 1)
                        seen[i, j] |= bk[i] == bk[j] and near
            k = q[b, :, h] / q[b, :, h].norm(dim=-1, keepdim=True)
            scores = (q[b, :, h] @ k.T) * scale
            scores = scores.masked_fill(~seen, float("-inf"))
            scores.diagonal().fill_(SELF_SCORE)
            out[b, :, h] = torch.softmax(scores, -1) @ v[b, :, h]
    return out


@pytest.mark.parametrize("leak_free", [True, False])
@pytest.mark.parametrize("rounds", [1, 3])
def test_lsh_attention_is_softmax_over_the_union_of_rounds(leak_free, rounds):
    B, S, H, D, chunk = 2, 24, 2, 6, 4
    q, v, rot = _rand(B, S, H, D, seed=1), _rand(B, S, H, D, seed=2), _rand(rounds, D, 2, seed=3)  # 4 buckets
    out = lsh_attention(q, v, rot, chunk=chunk, softmax_scale=0.4, leak_free=leak_free)
    torch.testing.assert_close(out, reference(q, v, rot, chunk, 0.4, leak_free), atol=1e-10, rtol=1e-10)


def _leak(leak_free, trials=20):
    """Largest change of an output before t when q[t] (hence k[t], its bucket, v[t]) changes."""
    worst = 0.0
    for seed in range(trials):
        B, S, H, D, t = 1, 32, 2, 6, 20
        q, v, rot = _rand(B, S, H, D, seed=seed), _rand(B, S, H, D, seed=100 + seed), _rand(2, D, 2, seed=7)
        q2, v2 = q.clone(), v.clone()
        q2[:, t], v2[:, t] = -q2[:, t], v2[:, t] + 1.0
        a = lsh_attention(q, v, rot, chunk=4, softmax_scale=0.4, leak_free=leak_free)
        b = lsh_attention(q2, v2, rot, chunk=4, softmax_scale=0.4, leak_free=leak_free)
        worst = max(worst, float((a[:, :t] - b[:, :t]).abs().max()))
    return worst


def test_sorted_chunks_leak_and_the_leak_free_variant_does_not():
    # The paper's chunks: a later token's bucket shifts earlier tokens across chunk boundaries.
    assert _leak(leak_free=False) > 1e-3
    assert _leak(leak_free=True) < 1e-12


def test_lsh_gradcheck_and_model_leak():
    q, v, rot = _rand(1, 8, 1, 3, seed=1), _rand(1, 8, 1, 3, seed=2), _rand(2, 3, 2, seed=3)
    qv = [q.clone().requires_grad_(), v.clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, b: lsh_attention(a, b, rot, chunk=4, softmax_scale=0.5), qv)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention="reformer",
                                    reformer_buckets=4, reformer_rounds=2, reformer_chunk=8)).double()
    S, t = 32, 13
    tokens = torch.randint(0, 50, (2, S))
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 50
    pos = torch.arange(S).expand(2, S)
    a, b = model(tokens, pos), model(changed, pos)
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-12 and (a[:, t] - b[:, t]).abs().max() > 1e-6


def test_reformer_config_errors():
    with pytest.raises(ConfigError, match="reformer_buckets"):
        ModelConfig(attention="reformer", reformer_buckets=5)
    with pytest.raises(ConfigError, match="causal only"):
        ModelConfig(attention="reformer", causal=False)


def _reformer(n_layers, reversible=True):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, dim=32, n_layers=n_layers, n_heads=4, attention="reformer",
                                   reformer_buckets=4, reformer_rounds=2, reformer_chunk=8,
                                   reformer_reversible=reversible)).double()


def test_reversible_layers_give_plain_autograds_gradients():
    from seqpar.models.reversible import reversible_reference

    model = _reformer(3)
    tokens, pos = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(1)), torch.arange(32)[None]
    pos = pos.expand(2, 32)
    loss = model.loss(model(tokens, pos), tokens)[0]
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    h = model.tok_embeddings(tokens)
    from seqpar.ops.rope import rope_cos_sin

    cos, sin = rope_cos_sin(pos, model._rope_inv_freq(pos.device), model.rope_attention_scale)
    ref_loss = model.loss(model.norm(reversible_reference(model.layers, h, cos, sin)), tokens)[0]
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for n, p in model.named_parameters():
        if p.grad is not None:  # wk is unused (shared-QK): no gradient on either path
            torch.testing.assert_close(got[n], p.grad, atol=1e-9, rtol=1e-7, msg=n)  # inversion adds rounding


def _saved_bytes(model):
    saved = []
    tokens, pos = torch.randint(0, 50, (2, 32)), torch.arange(32).expand(2, 32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model.loss(model(tokens, pos), tokens)
    return sum(saved)


def test_reversible_memory_is_flat_in_depth():
    # What autograd keeps for backward: with reversible layers it does not grow with the number of layers.
    rev = [_saved_bytes(_reformer(n)) for n in (2, 8)]
    plain = [_saved_bytes(_reformer(n, reversible=False)) for n in (2, 8)]
    assert rev[1] == rev[0]
    assert plain[1] > 3 * plain[0] / 2 and plain[1] > 2 * rev[1]
