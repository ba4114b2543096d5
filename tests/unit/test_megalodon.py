"""MEGALODON as ``model.arch=megalodon`` (seqpar.models.megalodon): the block against its equations written out in
float64, no causal leak, chunk-wise attention, the config's errors (cp, document masks, shapes), training steps
through the real trainer, activation checkpointing, the dry run and the Hydra experiment."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from seqpar.config.model import ModelConfig
from seqpar.errors import ConfigError
from seqpar.models import build_model
from seqpar.models.megalodon import Megalodon, MegalodonBlock
from seqpar.ops.cema import cema_coefficients, cema_reference
from seqpar.ops.rope import apply_rope
from seqpar.ops.timestep_norm import timestep_norm_reference

SMALL = dict(vocab_size=50, dim=32, n_layers=2, n_heads=2, arch="megalodon", megalodon_chunk=8,
             megalodon_norm_groups=4, megalodon_ema_dim=4)


def _model(**kw) -> Megalodon:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**SMALL, **kw})).double()


def _perturb(model: Megalodon) -> None:
    """Move every parameter off its init (kappa 1, mu 0, identity norms, zero biases), so the test sees them all."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def block_reference(blk: MegalodonBlock, x, cos, sin, chunk):
    """The module docstring's equations, term by term, with the float64 references of the two ops and a dense
    softmax under an explicit chunk-causal boolean mask."""
    B, S, d = x.shape
    H, Dz, Dv = blk.n_heads, blk.z_head, blk.v_head
    tn = blk.timestep_norm
    xn = timestep_norm_reference(x, tn.groups, tn.weight, tn.bias, tn.eps)
    c = blk.cema
    p, q = cema_coefficients(c.alpha, c.delta, c.theta, c.beta)
    ema = cema_reference(xn, p, q, torch.view_as_complex(c.eta.contiguous()))[0] + c.omega * xn
    mx = ema * torch.rsqrt(ema.pow(2).mean(-1, keepdim=True) + blk.cema_norm.eps) * blk.cema_norm.weight
    z = blk.wz(mx).view(B, S, H, Dz)
    zn = z / z.norm(dim=-1, keepdim=True)
    kq, kk = blk.kappa.view(2, H, Dz)
    mq, mk = blk.mu.view(2, H, Dz)
    qh, kh = apply_rope(zn * kq + mq, cos, sin), apply_rope(zn * kk + mk, cos, sin)
    v = F.silu(blk.wv(xn)).view(B, S, H, Dv)
    i = torch.arange(S)
    visible = (i[:, None] >= i[None, :]) & (i[:, None] // chunk == i[None, :] // chunk)
    scores = torch.einsum("bihd,bjhd->bhij", qh, kh).masked_fill(~visible, float("-inf"))  # temperature 1
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v).reshape(B, S, H * Dv)
    y = x + blk.wh(mx) + blk.wo(F.silu(blk.wr(mx)) * o)
    return x + blk.feed_forward(blk.ffn_norm(y))


@pytest.mark.parametrize("dims", [dict(), dict(megalodon_z_dim=16, megalodon_value_dim=8)])
def test_block_matches_the_paper_equations(dims):
    """Value head wider (default: 32 vs 4) and narrower (4 vs 8) than the q/k head: both paddings."""
    model = _model(**dims)
    _perturb(model)
    B, S = 2, 21  # 21 = 2 full chunks of 8 and a partial one
    x = torch.randn(B, S, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(S).expand(B, S)
    cos, sin = model.rope_tables(pos)
    mask = model.chunk_mask(B, S, x.device)
    for blk in model.layers:
        torch.testing.assert_close(blk(x, cos, sin, mask), block_reference(blk, x, cos, sin, 8), atol=1e-10, rtol=1e-10)


def test_whole_model_does_not_leak_the_future():
    model = _model()
    _perturb(model)
    S = 29
    tokens = torch.randint(0, 50, (2, S), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(S).expand(2, S)
    base = model(tokens, pos)
    for t in (0, 7, 8, 13, 28):  # chunk edges included
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        out = model(changed, pos)
        assert (out[:, :t] - base[:, :t]).abs().sum() < 1e-12 and (out[:, t] - base[:, t]).abs().max() > 1e-6, t


def test_attention_is_chunk_local_but_the_ema_carries_across_chunks():
    """Without CEMA and the timestep norm's memory, chunk 2 would not see chunk 1; with them it does."""
    model = _model(n_layers=1)
    _perturb(model)
    blk = model.layers[0]
    B, S = 1, 16
    x = torch.randn(B, S, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cos, sin = model.rope_tables(torch.arange(S)[None])
    q, k, v, _ = blk.pre_attention(x, cos, sin)
    out = blk.attend(q, k, v, model.chunk_mask(B, S, x.device))
    k2, v2 = k.clone(), v.clone()
    k2[:, :8] += 1.0
    v2[:, :8] += 1.0
    out2 = blk.attend(q, k2, v2, model.chunk_mask(B, S, x.device))
    assert (out[:, 8:] - out2[:, 8:]).abs().max() < 1e-12  # attention: nothing across the chunk edge
    x2 = x.clone()
    x2[:, 3] += 1.0
    assert (blk(x, cos, sin, model.chunk_mask(B, S, x.device))
            - blk(x2, cos, sin, model.chunk_mask(B, S, x.device)))[:, 8:].abs().max() > 1e-4  # CEMA / norm: across


def test_model_gradients_by_gradcheck():
    model = _model(dim=8, n_layers=1, n_heads=1, megalodon_norm_groups=2, megalodon_ema_dim=2, megalodon_chunk=3,
                   megalodon_z_dim=4, megalodon_value_dim=4, vocab_size=11)
    _perturb(model)
    blk = model.layers[0]
    S = 5
    cos, sin = model.rope_tables(torch.arange(S)[None])
    mask = model.chunk_mask(1, S, torch.device("cpu"))
    x = torch.randn(1, S, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: blk(x, cos, sin, mask), (x,))
    out = model(torch.randint(0, 11, (1, S)), torch.arange(S)[None])
    out.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("output.")}  # the head is loss-only
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_interface_and_bad_inputs():
    model = _model()
    tokens, pos = torch.randint(0, 50, (1, 10)), torch.arange(10)[None]
    hidden = model(tokens, pos)
    assert hidden.shape == (1, 10, 32) and model.logits(hidden).shape == (1, 10, 50)
    loss, n = model.loss(hidden, tokens)
    assert n == 10 and torch.isfinite(loss)
    # Linear in the length beyond one chunk (c = 8): the per-token cost stops growing there.
    assert model.flops_per_token(4) < model.flops_per_token(8) == model.flops_per_token(4096)
    with pytest.raises(ValueError, match="no document mask"):
        model(tokens, pos, doc_ids=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="must both be"):
        model(tokens, pos[:, :5])
    for bad, words in [(dict(megalodon_norm_groups=5), "megalodon_norm_groups=5 must divide model.dim=32"),
                       (dict(megalodon_z_dim=6), "megalodon_z_dim=6 must be a multiple of 2 \\* model.n_heads"),
                       (dict(megalodon_value_dim=7), "megalodon_value_dim=7"),
                       (dict(megalodon_chunk=0), "megalodon_chunk=0 must be > 0"),
                       (dict(attention="performer"), "model.arch=megalodon brings its own attention"),
                       (dict(causal=False), "model.causal=false is not available for model.arch=megalodon")]:
        with pytest.raises(ConfigError, match=words):
            ModelConfig(**{**SMALL, **bad})


# ---------------------------------------------------------------------------------------------- config + trainer
MEGALODON = dict(arch="megalodon", megalodon_chunk=16, megalodon_norm_groups=8, megalodon_ema_dim=8)


def _train_cfg(tmp_path, steps=10, **model):
    from tiny_run import tiny_config

    cfg = tiny_config(tmp_path, steps=steps)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{**MEGALODON, **model}),
                               data=dataclasses.replace(cfg.data, doc_mask=False),
                               parallel=dataclasses.replace(cfg.parallel, fsdp="none"))


def test_cp_and_document_masks_are_one_clear_error(tmp_path):
    from seqpar.config import ParallelConfig

    cfg = _train_cfg(tmp_path)
    par = dataclasses.replace(cfg.parallel, cp=2, layout="contiguous")
    seq = cfg.train.seq_len  # 64 = 2 ranks x 2 chunks of 16 (MEGALODON below)
    dataclasses.replace(cfg, parallel=par)  # contiguous, whole chunks per rank: built
    layout = r"model.arch=megalodon with parallel.cp=2 needs parallel.layout=contiguous \(got (zigzag|striped)\)"
    length = r"model.arch=megalodon with parallel.cp=2 needs train.seq_len=\d+ to be a multiple .* set train.seq_len="
    assert dataclasses.replace(cfg, parallel=ParallelConfig(cp=2)).layout == "contiguous"  # auto picks it
    for bad, msg in ((dict(parallel=ParallelConfig(cp=2, layout="zigzag")), layout),
                     (dict(parallel=dataclasses.replace(par, layout="striped")), layout),
                     (dict(parallel=par, train=dataclasses.replace(cfg.train, seq_len=seq + 2)), length),  # 33 per rank
                     (dict(parallel=par, model=dataclasses.replace(cfg.model, megalodon_chunk=64)), length)):  # chunk > 32
        with pytest.raises(ConfigError, match=msg):
            dataclasses.replace(cfg, **bad)
    with pytest.raises(ConfigError, match=r"megalodon has no document mask.*data.doc_mask=false"):
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, doc_mask=True))


@pytest.mark.timeout(300)
def test_training_steps_lower_the_loss(tmp_path):
    from seqpar.train import run

    torch.set_num_threads(2)
    hist = run(_train_cfg(tmp_path / "plain"))["history"]
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.2, losses


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(ac):
    from seqpar.models.checkpointing import apply_ac

    plain, ckpt = _model(), _model()
    apply_ac(ckpt, ac)
    tokens, pos = torch.randint(0, 50, (2, 20)), torch.arange(20).expand(2, 20)
    for m in (plain, ckpt):
        m(tokens, pos).square().sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


def test_dry_run_does_not_crash(tmp_path, capsys):
    from seqpar.train.dry_run import dry_run

    cfg = _train_cfg(tmp_path)
    out = dry_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dry_run=True)), world_size=1)
    assert out["memory"]["params_total"] > 0
    assert "arch=megalodon" in capsys.readouterr().out
    cp2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dry_run=True),
                              parallel=dataclasses.replace(cfg.parallel, cp=2, layout="contiguous"))
    dry_run(cp2, world_size=2)
    said = capsys.readouterr().out
    assert "parallel.cp_comm does not apply" in said and "PREDICTED" not in said  # no cp mode table for it


def test_hydra_experiment_composes():
    pytest.importorskip("hydra")
    from seqpar.cli import load_config

    cfg = load_config(["experiment=megalodon_tiny"])
    assert cfg.model.arch == "megalodon" and not cfg.data.doc_mask and cfg.model.megalodon_chunk == 64
    assert cfg.model.megalodon_dims == (32, 256)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, vocab_size=320))
    assert isinstance(model, Megalodon)
