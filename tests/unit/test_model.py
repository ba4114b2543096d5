"""Llama model: shapes, parameter accounting, a float64 reference forward, causality, GQA, RoPE, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqpar.config import ConfigError, ModelConfig
from seqpar.models import Llama, default_attention


def naive_attention(q, k, v, *, causal, softmax_scale):
    """Materialised softmax attention; GQA by repeating kv head h // (H / Hkv) (HF's repeat_kv)."""
    H, Hkv, S = q.shape[2], k.shape[2], q.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=2)  # [B, S, Hkv, D] -> [B, S, H, D]
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale  # [B, H, S, S]
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)  # [B, S, H, D]


def tiny_cfg(**kw):
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    return ModelConfig(**{**base, **kw})


def tiny_model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(tiny_cfg(**kw), attn_fn=naive_attention).to(dtype)


def inputs(B=2, S=12, V=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    positions = torch.arange(S).expand(B, S)
    return tokens, positions


def closed_form_params(c: ModelConfig) -> int:
    D, H, Hkv = c.head_dim, c.n_heads, c.kv_heads
    per_layer = c.dim * H * D + 2 * c.dim * Hkv * D + H * D * c.dim + 3 * c.dim * c.ffn_dim + 2 * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + head + c.n_layers * per_layer + c.dim


# ---------------------------------------------------------------- shapes, accounting, init


def test_shapes():
    model = tiny_model(torch.float32)
    tokens, positions = inputs()
    hidden = model(tokens, positions)
    assert hidden.shape == (2, 12, 32) and hidden.dtype == torch.float32
    assert model.logits(hidden).shape == (2, 12, 61)
    loss_sum, n = model.loss(hidden, tokens, chunk_size=5)
    assert loss_sum.shape == () and n.item() == 24
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 2


@pytest.mark.parametrize("kw", [
    dict(tie_embeddings=True, n_kv_heads=4),  # tied, multi-head
    dict(tie_embeddings=False, n_kv_heads=2),  # untied, GQA
    dict(tie_embeddings=True, n_kv_heads=1, ffn_hidden=None, vocab_size=100),  # MQA, Llama ffn rule
])
def test_num_params_matches_closed_form(kw):
    model = tiny_model(torch.float32, **kw)
    c = model.cfg
    assert model.num_params() == closed_form_params(c)
    assert model.num_params(exclude_embedding=True) == closed_form_params(c) - c.vocab_size * c.dim


def test_llama3_8b_shape_has_8_03b_params_on_meta():
    cfg = ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                      rope_theta=500000.0, tie_embeddings=False)
    with torch.device("meta"):  # no memory, no init cost
        model = Llama(cfg)
    n = model.num_params()
    assert n == closed_form_params(cfg) == 8_030_261_248
    assert round(n / 1e9, 2) == 8.03


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_formula(tie):
    model = tiny_model(torch.float32, tie_embeddings=tie)
    c, S = model.cfg, 1024
    norms = (2 * c.n_layers + 1) * c.dim
    # Matmul weights: everything but norms and the embedding lookup; the V x dim head always counts.
    n_matmul = model.num_params(exclude_embedding=True) - norms + (c.vocab_size * c.dim if tie else 0)
    assert model.flops_per_token(S) == 6 * n_matmul + 6 * c.n_layers * c.dim * S
    assert model.flops_per_token(S, causal=False) == 6 * n_matmul + 12 * c.n_layers * c.dim * S


def test_flops_follow_the_mask():
    """Documents and windows count the pairs a query sees (MFU is not inflated by masked work)."""
    from types import SimpleNamespace

    from seqpar.train.metrics import FlopCounter

    model = tiny_model(torch.float32)
    c, S = model.cfg, 96
    dense = model.flops_per_token(S)
    ids = torch.tensor([[0] * 40 + [1] * 50 + [2] * 6])  # documents of 40, 50 and 6 tokens
    keys = sum(n * (n + 1) / 2 for n in (40, 50, 6)) / S
    fc = FlopCounter(model, SimpleNamespace(arch="llama", attention="dense", causal=True, window=None, sinks=0),
                     SimpleNamespace(doc_mask=True), S)
    fc.add_batch({"tokens": torch.zeros(1, S), "doc_ids": ids})
    assert fc.take() == pytest.approx(dense - 6 * c.n_layers * c.dim * S + 12 * c.n_layers * c.dim * keys)
    assert fc.take() == dense  # nothing added since: the dense count
    # window 8 with 2 sinks, one document: row i sees min(i, 8) + 1 keys plus the sinks left of its window
    win = sum(min(i, 8) + 1 + max(0, min(2, i - 8)) for i in range(S)) / S
    fc = FlopCounter(model, SimpleNamespace(arch="llama", attention="dense", causal=True, window=8, sinks=2),
                     SimpleNamespace(doc_mask=False), S)
    fc.add_batch({"tokens": torch.zeros(1, S), "doc_ids": ids})
    assert fc.take() == pytest.approx(model.flops_per_token(S, keys_per_query=win))
    assert model.flops_per_token(S, keys_per_query=S / 2) == dense


def test_init_scales_and_determinism():
    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=8, n_heads=4, init_std=0.02)
    model = Llama(cfg, attn_fn=naive_attention)
    layer = model.layers[3]
    # 16k samples per matrix: the std estimate is within ~1%; 5% leaves ample room.
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(layer.ffn_norm.weight == 1) and torch.all(model.norm.weight == 1)
    other = Llama(cfg, attn_fn=naive_attention)
    model.init_weights(torch.Generator().manual_seed(7))
    other.init_weights(torch.Generator().manual_seed(7))
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_vocab_size_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        Llama(ModelConfig(vocab_size=None))


# ---------------------------------------------------------------- numerics


def reference_forward(model, tokens, positions):
    """Straightforward float64 Llama written from the paper's equations, reading the model's weights."""
    c, p = model.cfg, {k: v.double() for k, v in model.state_dict().items()}
    D, H, Hkv, S = c.head_dim, c.n_heads, c.kv_heads, tokens.shape[1]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps)

    # RoPE as complex rotation of pairs (i, i + D/2); fp32 angles as the model's contract specifies.
    angles = (positions.float()[..., None] * model._rope_inv_freq(positions.device)).double()  # [B, S, D/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # [B, S, 1, D/2]

    def rope(x):  # [B, S, h, D]
        z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * rot
        return torch.cat((z.real, z.imag), -1)

    h = p["tok_embeddings.weight"][tokens]  # [B, S, dim]
    causal_mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    for i in range(c.n_layers):
        w = {k[len(f"layers.{i}."):]: v for k, v in p.items() if k.startswith(f"layers.{i}.")}
        x = rms(h, w["attention_norm.weight"])
        q = rope((x @ w["attention.wq.weight"].T).unflatten(-1, (H, D)))
        k = rope((x @ w["attention.wk.weight"].T).unflatten(-1, (Hkv, D)))
        v = (x @ w["attention.wv.weight"].T).unflatten(-1, (Hkv, D))
        heads = []
        for hq in range(H):
            hk = hq // (H // Hkv)  # query head hq reads kv head hq // group
            s = q[:, :, hq] @ k[:, :, hk].transpose(1, 2) / math.sqrt(D)  # [B, S, S]
            heads.append(torch.softmax(s.masked_fill(~causal_mask, -math.inf), -1) @ v[:, :, hk])
        h = h + torch.cat(heads, -1) @ w["attention.wo.weight"].T
        x = rms(h, w["ffn_norm.weight"])
        gate = x @ w["feed_forward.w1.weight"].T
        h = h + (gate * torch.sigmoid(gate) * (x @ w["feed_forward.w3.weight"].T)) @ w["feed_forward.w2.weight"].T
    return rms(h, p["norm.weight"])


@pytest.mark.parametrize("tie", [False, True])
def test_matches_reference_forward_float64(tie):
    model = tiny_model(tie_embeddings=tie)
    tokens, _ = inputs()
    positions = torch.tensor([[0, 1, 2, 3, 20, 21, 22, 23, 40, 41, 42, 43], list(range(100, 112))])  # non-contiguous
    hidden = model(tokens, positions)
    # Both float64 from identical fp32 RoPE angles; the model's cos/sin are fp32 (~6e-8), the reference's
    # float64, and the small init damps that to ~3e-10 in the output (measured); 1e-8 leaves margin.
    torch.testing.assert_close(hidden, reference_forward(model, tokens, positions), rtol=1e-8, atol=1e-8)
    ref_logits = reference_forward(model, tokens, positions) @ model.output_weight.T
    torch.testing.assert_close(model.logits(hidden), ref_logits, rtol=1e-8, atol=1e-8)


def test_default_attention_matches_injected_naive():
    pytest.importorskip("seqpar.ops.attention")
    model = tiny_model()
    tokens, positions = inputs()
    expected = model(tokens, positions)
    model.set_attn_fn(None)  # back to seqpar.ops.attention(backend="auto"): the torch backend on CPU
    # float64 blockwise online softmax vs materialised softmax: only rounding order differs.
    torch.testing.assert_close(model(tokens, positions), expected, rtol=1e-10, atol=1e-10)


def test_attn_fn_receives_unexpanded_kv_and_plain_softmax_scale():
    model = tiny_model()
    calls = []

    def spy(q, k, v, *, causal, softmax_scale):
        calls.append((q.shape, k.shape, v.shape, causal, softmax_scale))
        return naive_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)

    model.set_attn_fn(spy)
    model(*inputs(S=6))
    assert calls == [((2, 6, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8), True, 1 / math.sqrt(8))] * 2
    model.set_attn_fn(None)
    assert all(layer.attention.attn_fn is default_attention for layer in model.layers)


def test_causal_perturbing_token_t_leaves_earlier_outputs():
    model = tiny_model()
    tokens, positions = inputs()
    t = 5
    perturbed = tokens.clone()
    perturbed[:, t] = (perturbed[:, t] + 1) % 61
    a, b = model(tokens, positions), model(perturbed, positions)
    # float64 and masked keys get weight exactly 0; only reduction order could differ.
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-6  # every later position sees the change


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = tiny_model(n_kv_heads=2)
    mha = tiny_model(n_kv_heads=4)
    D, group = gqa.cfg.head_dim, 2
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # [Hkv*D, dim] -> [Hkv, D, dim] -> repeat each kv head `group` times -> [H*D, dim]
            w = w.view(-1, D, w.shape[-1]).repeat_interleave(group, dim=0).reshape(-1, w.shape[-1])
        state[name] = w
    mha.load_state_dict(state)
    tokens, positions = inputs()
    # Same float64 arithmetic on repeated heads: equal up to rounding order.
    torch.testing.assert_close(gqa(tokens, positions), mha(tokens, positions), rtol=1e-12, atol=1e-12)


def test_positions_shift_invariant_but_order_sensitive():
    model = tiny_model()
    tokens, positions = inputs()
    base = model(tokens, positions)
    shifted = positions + torch.tensor([[100], [1234]])  # a different constant per row
    # RoPE scores depend on position differences only, up to fp32 angle rounding (~1e-4 rad near 1250
    # rad) that the small-init network damps to ~1e-8 in the output (measured); 1e-6 leaves margin.
    torch.testing.assert_close(model(tokens, shifted), base, rtol=0, atol=1e-6)
    permuted = positions[:, torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    assert (model(tokens, permuted) - base).abs().max() > 1e-3


def test_loss_decreases_with_adam():
    model = tiny_model(torch.float32)
    tokens, positions = inputs(B=2, S=24)
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss_sum, n = model.loss(model(inp, positions[:, :-1]), labels, chunk_size=16)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(61), rel=0.1)  # init predicts ~uniform over the vocab
    assert losses[-1] < 0.5 * losses[0]  # memorising one batch: well below half in 30 steps
    ref = F.cross_entropy(model.logits(model(inp, positions[:, :-1])).flatten(0, 1), labels.flatten())
    assert ref.item() < 0.5 * losses[0]


def test_doc_ids_mask_attention_at_document_boundaries_and_window_config():
    """doc_ids: each document's hidden states equal those of the document run alone (positions reset);
    model.window/sinks build the Mask the attention receives; sinks need a window."""
    from seqpar.config import ConfigError, ModelConfig
    from seqpar.models import Llama

    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    model = Llama(cfg).double()
    tokens = torch.randint(0, 40, (1, 12))
    ids = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    packed = model(tokens, pos, doc_ids=ids)
    alone = torch.cat([model(tokens[:, :5], pos[:, :5]), model(tokens[:, 5:], pos[:, 5:])], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(tokens, pos), alone)  # without doc ids the second document sees the first
    m = Llama(ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, window=3, sinks=1)).attention_mask(ids)
    assert (m.window, m.sinks, m.causal) == (3, 1, True) and m.doc_ids is ids
    with pytest.raises(ConfigError, match="model.sinks"):
        ModelConfig(sinks=2)
