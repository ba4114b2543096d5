"""MEGALODON under sequence parallelism (``parallel.cp > 1``, contiguous layout): the timestep norms' statistics and
the CEMA states pass from rank to rank (seqpar.parallel.state_pass), attention stays rank-local. The whole model at
cp=2 and cp=3 gives cp=1's loss and every parameter gradient (float64, 1e-10); the trainer on 2 gloo ranks (cp=2)
gives the single process's losses; a shard that would cut an attention chunk is one clear error on every rank."""
import dataclasses
import functools
import os
import sys

import pytest
import torch

from dist_utils import run_distributed

S, B = 24, 2  # 24 = 2 x 12 = 3 x 8 tokens per rank, chunks of 4
SMALL = dict(vocab_size=50, dim=16, n_layers=2, n_heads=2, arch="megalodon", megalodon_chunk=4,
             megalodon_norm_groups=4, megalodon_ema_dim=3)
TOL = dict(atol=1e-10, rtol=1e-10)


def _model():
    from seqpar.config.model import ModelConfig
    from seqpar.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init (identity norms, zero biases, kappa 1, mu 0), so every term is seen
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (B, S), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((B, 1), -100)], dim=1)
    positions = torch.arange(S).expand(B, S).contiguous()
    return tokens, labels, positions


def _loss_and_grads(model, tokens, labels, positions, reduce=None):
    loss_sum, n_tok = model.loss(model(tokens, positions), labels, chunk_size=5)
    n_tok = n_tok.clone()
    if reduce is not None:
        reduce(n_tok)
    (loss_sum / n_tok).backward()
    return (loss_sum / n_tok).detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _model_worker(rank, n, trainer_root=None):
    import torch.distributed as dist

    from seqpar.models.checkpointing import apply_ac
    from seqpar.parallel.layout import shard_sequence
    from seqpar.parallel.state_pass import StateComm

    out = {}
    tokens, labels, positions = _batch()
    local = [shard_sequence(t, 1, layout="contiguous") for t in (tokens, labels, positions)]
    for ac in ("none", "selective") if n == 2 else ("none",):
        model = _model()
        apply_ac(model, ac)
        model.set_state_comm(StateComm(None))
        loss, grads = _loss_and_grads(model, *local, reduce=dist.all_reduce)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
        out[ac] = (loss, grads)
    try:  # 2 tokens less per rank: a chunk would span two ranks; raised before any collective, on every rank
        model = _model()
        model.set_state_comm(StateComm(None))
        model(local[0][:, 2:], local[2][:, 2:])
    except ValueError as e:
        out["error"] = str(e)
    if trainer_root is not None:
        from seqpar.parallel.mesh import init_mesh
        from seqpar.train import Trainer

        cfg = _train_cfg(trainer_root, cp=n)
        hist = Trainer(cfg, init_mesh(cfg.parallel, "cpu")).fit()["history"]
        out["trainer"] = [h["loss"] for h in hist if "loss" in h]
    return out


def _train_cfg(run_dir, cp=1, steps=3):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tiny_run import tiny_config

    cfg = tiny_config(run_dir, steps=steps)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, arch="megalodon", megalodon_chunk=16, megalodon_norm_groups=8,
                                       megalodon_ema_dim=8),
        data=dataclasses.replace(cfg.data, doc_mask=False),
        parallel=dataclasses.replace(cfg.parallel, cp=cp, layout="contiguous", attention_backend="torch"))


@functools.lru_cache(maxsize=None)
def _results(n, trainer_root=None):
    return run_distributed(_model_worker, n, trainer_root, timeout_s=240, pg_timeout_s=120)


@functools.lru_cache(maxsize=None)
def _reference():
    return _loss_and_grads(_model(), *_batch())


def test_state_comm_of_one_changes_nothing():
    from seqpar.parallel.state_pass import StateComm

    model = _model()
    model.set_state_comm(StateComm())  # torch.distributed not initialised: a group of one
    loss, grads = _loss_and_grads(model, *_batch())
    ref_loss, ref_grads = _reference()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for key, g in grads.items():
        torch.testing.assert_close(g, ref_grads[key], **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3])
def test_whole_model_cp_matches_cp1(n):
    ref_loss, ref_grads = _reference()
    results = _results(n)
    for rank, res in enumerate(results):
        for ac in ("none", "selective") if n == 2 else ("none",):
            loss, grads = res[ac]
            torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"cp={n} rank {rank} ac={ac} loss: {m}")
            assert set(grads) == set(ref_grads)
            for key, g in grads.items():
                torch.testing.assert_close(g, ref_grads[key], **TOL,
                                           msg=lambda m: f"cp={n} rank {rank} ac={ac} {key}: {m}")
        assert "not a multiple of model.megalodon_chunk=4" in res["error"], res.get("error")


@pytest.mark.timeout(400)
def test_trainer_cp2_matches_single_process(tmp_path):
    from seqpar.train import run

    torch.set_num_threads(1)
    ref = [h["loss"] for h in run(_train_cfg(tmp_path / "cp1"))["history"] if "loss" in h]
    results = run_distributed(_model_worker, 2, str(tmp_path / "cp2"), timeout_s=300, pg_timeout_s=120)
    assert len(ref) == 3
    for rank, res in enumerate(results):
        assert res["trainer"] == pytest.approx(ref, rel=1e-4, abs=1e-5), (rank, res["trainer"], ref)
