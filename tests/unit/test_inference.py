"""Cached generation: greedy/sampled decoding equals an uncached loop over full forward passes (float64),
batched left-padded prompts, sampling helpers, cache shapes, and one clear ValueError per bad input."""
import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.inference import generate, policy_forward, sample, top_p_filter
from seqpar.models import Llama

V = 61


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    return Llama(ModelConfig(**{**cfg, **kw})).to(torch.float64)


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def left_pad(rows, pad=0):
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r):], mask[b, S - len(r):] = r, 1
    return ids, mask


def uncached(model, row, n_new, temperature=0.0, top_p=1.0, generator=None):
    """The definition: a full forward pass over everything so far, next token from the last logits."""
    toks = row[None].clone()
    for _ in range(n_new):
        hidden = model(toks, torch.arange(toks.shape[1])[None])
        nxt = sample(model.logits(hidden[:, -1]), temperature, top_p, generator)
        toks = torch.cat([toks, nxt[:, None]], 1)
    return toks[0]


@torch.no_grad()
def test_greedy_full_equals_uncached_loop():
    model = tiny_model()
    (row,) = prompts([9])
    out = generate(model, row[None], 12)
    assert out.shape == (1, 21) and out.dtype == torch.long
    assert torch.equal(out[0], uncached(model, row, 12))


@torch.no_grad()
def test_greedy_batched_left_padded_prompts_match_each_row_alone():
    model = tiny_model(seed=3, n_kv_heads=1)  # GQA with one kv head
    rows = prompts([3, 11, 7, 1], seed=2)
    ids, mask = left_pad(rows, pad=5)
    out = generate(model, ids, 8, attention_mask=mask)
    assert out.shape == (4, ids.shape[1] + 8)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for b, r in enumerate(rows):
        assert torch.equal(out[b, ids.shape[1]:], uncached(model, r, 8)[len(r):]), b


@torch.no_grad()
def test_policy_forward_full_equals_model_forward():
    model = tiny_model()
    (row,) = prompts([13])
    ref = model(row[None], torch.arange(13)[None])
    torch.testing.assert_close(policy_forward(model, row[None], q_chunk=5), ref, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_sampling_matches_uncached_loop_with_the_same_generator():
    model = tiny_model()
    (row,) = prompts([6])
    out = generate(model, row[None], 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    ref = uncached(model, row, 10, 0.8, 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(out[0], ref)
    again = generate(model, row[None], 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    # A tiny nucleus keeps only the top token: sampling collapses to greedy.
    tiny_p = generate(model, row[None], 10, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_p, generate(model, row[None], 10))


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    # row 0: 0.5 < 0.7 so 0.3 joins (0.8 >= 0.7), the 0.1s go; row 1: ties, three quarters needed
    assert kept.tolist() == [[True, False, True, False], [True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits[:1].expand(4000, -1), 1.0, 0.7, g) for _ in range(1)]).flatten()
    assert set(draws.tolist()) == {0, 2}
    freq0 = (draws == 0).double().mean().item()
    assert abs(freq0 - 0.5 / 0.8) < 0.03  # renormalised over the nucleus; 4000 draws: std ~0.008


@torch.no_grad()
def test_zero_new_tokens_returns_the_prompt():
    model = tiny_model()
    ids, mask = left_pad(prompts([2, 4]))
    assert torch.equal(generate(model, ids, 0, attention_mask=mask), ids)


@torch.no_grad()
def test_cache_shapes_are_bounded_by_each_policy_budget():
    model = tiny_model()
    (row,) = prompts([40])
    new = 6
    cases = {
        "full": ({}, 40 + new - 1),
        "streaming": (dict(sinks=2, window=8), 10),
        "lm_infinite": (dict(n_global=3, train_len=12), 15),
        "h2o": (dict(heavy=0.1, recent=0.2), 4 + 8),
        "dca": (dict(train_len=16), 40 + new - 1),
    }
    for name, (opts, expected) in cases.items():
        out, cache = generate(model, row[None], new, policy=name, return_cache=True, **opts)
        assert out.shape == (1, 40 + new), name
        assert cache.shape() == (1, expected, 2, 8), (name, cache.shape())
        assert all(lc.k.shape == lc.v.shape == (1, expected, 2, 8) for lc in cache.layers), name
        assert cache.nbytes() == 2 * 2 * expected * 2 * 8 * 8, name  # layers * (k, v) * S * Hkv * D * 8 bytes


# ---------------------------------------------------------------- bad input: one ValueError each


@pytest.mark.parametrize("call, match", [
    (lambda m, x: generate(m, x, -1), "max_new_tokens"),
    (lambda m, x: generate(m, x, 2.5), "max_new_tokens"),
    (lambda m, x: generate(m, x, 4, capacity=10), "capacity=10"),
    (lambda m, x: generate(m, x, 4, policy="dca", train_len=16, capacity=9), "capacity=9"),
    (lambda m, x: generate(m, x, 1, policy="h2o", heavy=0.0), "heavy=0.0"),
    (lambda m, x: generate(m, x, 1, policy="h2o", recent=1.5), "recent=1.5"),
    (lambda m, x: generate(m, x, 1, policy="streaming", sinks=8, window=4), "sinks=8"),
    (lambda m, x: generate(m, x, 1, policy="lm_infinite", n_global=9, train_len=6), "n_global=9"),
    (lambda m, x: generate(m, x, 1, policy="lm_infinite"), "train_len"),
    (lambda m, x: generate(m, x, 1, policy="dca", train_len=8, chunk_size=6, local_window=3), "local_window=3"),
    (lambda m, x: generate(m, x, 1, policy="nope"), "not one of"),
    (lambda m, x: generate(m, x, 1, policy="streaming", budget=3), "unknown"),
    (lambda m, x: generate(m, x, 1, temperature=-1.0), "temperature"),
    (lambda m, x: generate(m, x, 1, temperature=1.0, top_p=0.0), "top_p"),
    (lambda m, x: generate(m, x, 1, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])), "LEFT padding"),
])
def test_bad_input_raises_one_clear_value_error(call, match):
    model = tiny_model()
    (row,) = prompts([8])
    with pytest.raises(ValueError, match=match):
        call(model, row[None])


def test_capacity_that_fits_is_accepted():
    model = tiny_model()
    (row,) = prompts([8])
    assert generate(model, row[None], 2, capacity=10).shape == (1, 10)


def test_models_whose_attention_is_not_dense_are_refused():
    """Cached decoding runs the Llama block's attention through the policy: a structured architecture or a
    sliding-window model would silently be decoded with a different attention, so it is one clear error."""
    from seqpar.models import build_model

    ids = torch.randint(0, 50, (1, 8))
    performer = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, attention="performer"))
    with pytest.raises(ValueError, match="model.attention=performer"):
        generate(performer, ids, 2)
    windowed = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, window=4))
    with pytest.raises(ValueError, match="model.window=4"):
        generate(windowed, ids, 2)
