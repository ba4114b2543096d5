"""Performer, Linformer, Infini-attention (seqpar.models.{performer,linformer,infini}) against float64 definitions,
causal leak tests, gradchecks, config errors; every option through the trainer (the loss goes down), resume
and the dry run."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from seqpar.config.model import ModelConfig
from seqpar.errors import ConfigError
from seqpar.models import build_model
from seqpar.models.infini import InfiniAttention, elu1, memory_retrieval
from seqpar.models.performer import _log_features, favor_attention, favor_features, orthogonal_gaussian


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ---------------------------------------------------------------------------------------------- Performer
def test_orthogonal_features_are_orthogonal_in_blocks():
    w = orthogonal_gaussian(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for blk in w.split(4):
        gram = blk @ blk.T
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-10, rtol=0)


def test_favor_estimator_is_unbiased_on_average():
    d, m, draws = 8, 16, 4000
    q, k = _rand(3, d, seed=1, scale=0.35), _rand(3, d, seed=2, scale=0.35)
    # One call draws independent d x d blocks: consecutive groups of m rows are independent feature draws.
    w = orthogonal_gaussian(m * draws, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = torch.stack([(favor_features(q, wd) * favor_features(k, wd)).sum(-1) for wd in w.split(m)])
    exact = torch.exp((q * k).sum(-1))
    stderr = est.std(0) / math.sqrt(draws)
    assert ((est.mean(0) - exact).abs() < 4 * stderr).all(), (est.mean(0), exact, stderr)  # 4 sigma: no flake


def favor_reference(q, k, v, w, scale, causal):
    """float64 definition: out_i = sum_j a_ij v_j / sum_j a_ij, a_ij = phi(q_i)^T phi(k_j) (j <= i when causal),
    in log space (log a_ij = logsumexp_m of the feature exponents) so it never overflows."""
    r = scale ** 0.5
    lq, lk = _log_features(q * r, w), _log_features(k * r, w)  # [B, S, H, m]
    loga = torch.logsumexp(lq[:, :, None] + lk[:, None], -1)  # [B, i, j, H]
    if causal:
        S = q.shape[1]
        loga = loga.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril()[None, :, :, None], float("-inf"))
    return torch.einsum("bijh,bjhd->bihd", torch.softmax(loga, 2), v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_favor_attention_matches_its_definition(causal, chunk):
    B, S, H, D, m = 2, 23, 2, 8, 16
    q, k, v = _rand(B, S, H, D, seed=1), _rand(B, S, H, D, seed=2), _rand(B, S, H, D, seed=3)
    w = orthogonal_gaussian(m, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = favor_attention(q, k, v, w, causal=causal, softmax_scale=D ** -0.5, chunk=chunk)
    torch.testing.assert_close(out, favor_reference(q, k, v, w, D ** -0.5, causal), atol=1e-9, rtol=1e-9)


def test_favor_chunked_form_is_numerically_safe():
    """Large q/k norms: the exponents reach -150, so Lemma 1's features underflow to 0 in float32 (0/0 in the
    plain form); the stabilised chunked form stays finite and within float32 error of the float64 definition."""
    B, S, H, D, m = 2, 23, 2, 8, 16
    q, k, v = _rand(B, S, H, D, seed=1, scale=6), _rand(B, S, H, D, seed=2, scale=6), _rand(B, S, H, D, seed=3)
    w = orthogonal_gaussian(m, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    qf, kf = favor_features(q.float() * D ** -0.25, w.float()), favor_features(k.float() * D ** -0.25, w.float())
    plain = torch.einsum("bihm,bjhm->bhij", qf, kf).tril().sum(-1)  # the denominators of the plain form
    assert (plain == 0).any()
    out = favor_attention(q.float(), k.float(), v.float(), w.float(), causal=True, softmax_scale=D ** -0.5, chunk=8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), favor_reference(q, k, v, w, D ** -0.5, True), atol=2e-5, rtol=1e-4)


def test_favor_approaches_softmax_attention_with_many_features():
    B, S, H, D = 1, 16, 1, 8
    q, k, v = _rand(B, S, H, D, seed=1, scale=0.5), _rand(B, S, H, D, seed=2, scale=0.5), _rand(B, S, H, D, seed=3)
    w = orthogonal_gaussian(8192, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = favor_attention(q, k, v, w, causal=True, softmax_scale=D ** -0.5, chunk=4)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * D ** -0.5
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    exact = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)
    assert (out - exact).abs().max() < 0.05  # Monte Carlo error ~ 1/sqrt(m); softmax itself is O(1)


def test_favor_causal_leak_and_gradcheck():
    B, S, H, D, m = 1, 12, 1, 4, 6
    w = orthogonal_gaussian(m, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, k, v = _rand(B, S, H, D, seed=1), _rand(B, S, H, D, seed=2), _rand(B, S, H, D, seed=3)
    out = favor_attention(q, k, v, w, causal=True, softmax_scale=0.5, chunk=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, 7] += 3.0
    v2[:, 7] -= 2.0
    out2 = favor_attention(q, k2, v2, w, causal=True, softmax_scale=0.5, chunk=5)
    # Rows 5, 6 share key 7's chunk: its stabiliser cancels exactly in the formula, so only rounding remains.
    assert (out[:, :7] - out2[:, :7]).abs().max() < 1e-12 and (out[:, 7:] - out2[:, 7:]).abs().max() > 1e-3
    small = [x[:, :6].clone().requires_grad_() for x in (q, k, v)]
    for causal in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b, c: favor_attention(a, b, c, w, causal=causal, softmax_scale=0.5, chunk=4), small)


# ---------------------------------------------------------------------------------------------- Linformer
def test_linformer_matches_its_definition_and_refuses_causal():
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, attention="linformer",
                      causal=False, linformer_k=5, linformer_max_len=32)
    model = build_model(cfg).double()
    attn = model.layers[0].attention.attn_fn
    B, S, H, D = 2, 20, 4, 8
    q, k, v = _rand(B, S, H, D, seed=1), _rand(B, S, 2, D, seed=2), _rand(B, S, 2, D, seed=3)
    from seqpar.ops import Mask

    out = attn(q, k, v, causal=False, softmax_scale=D ** -0.5, mask=Mask(causal=False))
    E, F = attn.E[:, :S], attn.F[:, :S]  # Wang et al. 2020, eq. 7, headwise-shared E, F
    kp, vp = torch.einsum("rs,bshd->brhd", E, k), torch.einsum("rs,bshd->brhd", F, v)
    kp, vp = kp.repeat_interleave(2, 2), vp.repeat_interleave(2, 2)
    ref = torch.einsum("bhir,brhd->bihd", torch.softmax(torch.einsum("bihd,brhd->bhir", q, kp) * D ** -0.5, -1), vp)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="bidirectional"):
        attn(q, k, v, causal=True, softmax_scale=0.3)
    with pytest.raises(ConfigError, match="not causal"):
        ModelConfig(attention="linformer")
    tokens = torch.randint(0, 40, (1, S))
    assert model(tokens, torch.arange(S)[None]).shape == (1, S, 32)


# ---------------------------------------------------------------------------------------------- Infini
def memory_naive(q, k, v, N, update):
    """float64 loop over batch, head and segment, eqs. 3-5 of Munkhdalai et al. 2024 written out."""
    B, S, H, D = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            M, z = torch.zeros(D, v.shape[-1], dtype=v.dtype), torch.zeros(D, dtype=v.dtype)
            for s0 in range(0, S, N):
                sq, sk, vs = elu1(q[b, s0:s0 + N, h]), elu1(k[b, s0:s0 + N, h]), v[b, s0:s0 + N, h]
                if s0 > 0:  # M_0 = 0, z_0 = 0: the first segment retrieves nothing
                    out[b, s0:s0 + N, h] = (sq @ M) / (sq @ z)[:, None]
                    target = vs - (sk @ M) / (sk @ z)[:, None] if update == "delta" else vs
                else:
                    target = vs
                M = M + sk.T @ target
                z = z + sk.sum(0)
    return out


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_infini_memory_matches_naive_loop(update):
    B, S, H, D, N = 2, 24, 3, 4, 6
    q, k, v = _rand(B, S, H, D, seed=1), _rand(B, S, H, D, seed=2), _rand(B, S, H, D, seed=3)
    seg = lambda x: x.view(B, S // N, N, H, D)
    out = memory_retrieval(seg(q), seg(k), seg(v), update=update).reshape(B, S, H, D)
    torch.testing.assert_close(out, memory_naive(q, k, v, N, update), atol=1e-10, rtol=1e-10)
    small = [seg(x)[:1, :3, :2, :1].clone().requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: memory_retrieval(a, b, c, update=update), small)


def test_infini_gate_mixes_memory_and_segment_local_attention():
    from seqpar.models.llama import default_attention

    B, S, H, D, N = 1, 16, 2, 4, 8
    q, k, v = _rand(B, S, H, D, seed=1), _rand(B, S, H, D, seed=2), _rand(B, S, H, D, seed=3)
    attn = InfiniAttention(H, 1, N, "linear", default_attention).double()
    with torch.no_grad():
        attn.beta.fill_(-50.0)  # sigmoid ~ 0: local attention only, which sees nothing of the earlier segment
    local = attn(q, k, v, causal=True, softmax_scale=0.5)
    ref = default_attention(q[:, N:], k[:, N:], v[:, N:], causal=True, softmax_scale=0.5)
    torch.testing.assert_close(local[:, N:], ref, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        attn.beta.fill_(50.0)  # memory only
    mem = attn(q, k, v, causal=True, softmax_scale=0.5)
    torch.testing.assert_close(mem, memory_naive(q, k, v, N, "linear"), atol=1e-12, rtol=1e-12)
    with pytest.raises(ConfigError, match="infini_segment"):
        attn(q[:, :12], k[:, :12], v[:, :12], causal=True, softmax_scale=0.5)


@pytest.mark.parametrize("options", [
    dict(arch="infini", infini_segment=8),
    dict(arch="infini", infini_segment=8, infini_update="linear"),
    dict(attention="performer", performer_features=16, performer_chunk=8),
])
def test_recurrent_models_do_not_leak_the_future(options):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, **options)).double()
    S, t = 32, 13
    tokens = torch.randint(0, 50, (2, S))
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 50
    pos = torch.arange(S).expand(2, S)
    a, b = model(tokens, pos), model(changed, pos)
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-12 and (a[:, t] - b[:, t]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------- config + trainer
def _train_cfg(tmp_path, model_options, steps=8, every=0, **data):
    from tiny_run import tiny_config

    cfg = tiny_config(tmp_path, steps=steps, every=every)
    parallel = dataclasses.replace(cfg.parallel, fsdp="none")  # one process: no FSDP either way (reversible asks)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_options),
                               data=dataclasses.replace(cfg.data, **data), parallel=parallel)


@pytest.mark.parametrize("options, fix, words", [
    (dict(arch="infini", infini_segment=48), dict(doc_mask=False), "infini_segment=48 must divide"),
    (dict(attention="performer"), dict(), "data.doc_mask=false"),
    (dict(attention="bigbird", sparse_block=48), dict(), "multiple of the bigbird block"),
])
def test_architecture_config_errors(tmp_path, options, fix, words):
    with pytest.raises(ConfigError, match=words):
        _train_cfg(tmp_path, options, **fix)


def test_cp_is_refused_where_the_state_is_not_carried(tmp_path):
    from seqpar.config import Config, ParallelConfig

    cfg = _train_cfg(tmp_path, dict(attention="performer"), doc_mask=False)
    with pytest.raises(ConfigError, match="parallel.cp=1"):
        dataclasses.replace(cfg, parallel=ParallelConfig(cp=2))
    with pytest.raises(ConfigError, match="causal LM"):
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, causal=False))
    assert isinstance(dataclasses.replace(cfg, model=ModelConfig(dim=64, n_heads=4, attention="bigbird",
                                                                 sparse_block=16), parallel=ParallelConfig(cp=2)), Config)


OPTIONS = {
    "longformer": (dict(attention="longformer", window=16, sinks=2), {}),
    "bigbird": (dict(attention="bigbird", sparse_block=8, bigbird_random_blocks=1), {}),
    "blocksparse": (dict(attention="blocksparse", sparse_stride=16, sparse_summary=8), {}),
    "performer": (dict(attention="performer", performer_features=32, performer_chunk=16), dict(doc_mask=False)),
    "infini": (dict(arch="infini", infini_segment=16), dict(doc_mask=False)),
    "reformer": (dict(attention="reformer", reformer_buckets=4, reformer_rounds=2, reformer_chunk=16),
                 dict(doc_mask=False)),
}


@pytest.mark.timeout(300)
def test_every_option_trains_and_the_loss_goes_down(tmp_path):
    from seqpar.train import run

    torch.set_num_threads(2)
    for name, (options, data) in OPTIONS.items():
        hist = run(_train_cfg(tmp_path / name, options, steps=10, **data))["history"]
        losses = [h["loss"] for h in hist if "loss" in h]
        assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.2, (name, losses)


@pytest.mark.timeout(300)
def test_resume_rebuilds_the_same_model(tmp_path):
    """Performer's features are not in the checkpoint: they are redrawn from train.seed, identically."""
    from seqpar.parallel.mesh import destroy_mesh, init_mesh
    from seqpar.train import Trainer

    options, data = OPTIONS["performer"]
    straight = _train_cfg(tmp_path / "a", options, steps=4, every=2, **data)
    split = _train_cfg(tmp_path / "b", options, steps=4, every=2, **data)
    try:
        a = Trainer(straight, init_mesh(straight.parallel, "cpu")).fit()["history"]
        Trainer(split, init_mesh(split.parallel, "cpu")).fit(until=2)
        b = Trainer(split, init_mesh(split.parallel, "cpu")).fit()["history"]
    finally:
        destroy_mesh()
    assert [h["loss"] for h in a if "loss" in h][-2:] == [h["loss"] for h in b if "loss" in h]


def test_dry_run_says_it_estimates_dense_attention(tmp_path, capsys):
    from seqpar.train.dry_run import dry_run

    cfg = _train_cfg(tmp_path, OPTIONS["infini"][0], **OPTIONS["infini"][1])
    out = dry_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dry_run=True)), world_size=1)
    assert out["memory"]["params_total"] > 0
    assert "estimated for DENSE attention" in capsys.readouterr().out
