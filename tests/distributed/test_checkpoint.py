"""DCP checkpoints: sharded resume is exact on 2 ranks (sync and async save), per-rank state survives
under rank-unique keys, a killed save leaves the previous checkpoint in charge, corrupted checkpoints
give one clear error, and preemption (signal on one rank, stop file, SIGTERM to train.py, time
budget) checkpoints the same step on every rank and exits cleanly."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from dist_utils import run_distributed
from seqpar.config import (CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                           ParallelConfig, TrainConfig)
from seqpar.train.checkpoint import CheckpointError, complete_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(run_dir, steps=6, every=2, cp=1, async_save=False, **train):
    return Config(
        model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2),
        parallel=ParallelConfig(cp=cp, attention_backend="torch"),
        data=DataConfig(max_bytes=200_000),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(**{"seq_len": 32, "batch_size": 2, "steps": steps, "eval_every": 0, "device": "cpu", **train}),
        logging=LoggingConfig(log_every=1, run_dir=str(run_dir), progress=False),
        checkpoint=CheckpointConfig(every=every, keep_last=2, async_save=async_save),
    )


def _fit(cfg, until=None):
    from seqpar.parallel.mesh import init_mesh
    from seqpar.train import Trainer

    return Trainer(cfg, init_mesh(cfg.parallel, "cpu")).fit(until=until)


def _losses(out):
    return {h["step"]: h["loss"] for h in out["history"]}


def _two_rank_worker(rank, world, root):
    out = {}
    # dp=1 x cp=2, FSDP over both ranks: model/optimizer sharded, ring attention, per-rank RNG state.
    out["straight"] = _losses(_fit(_cfg(f"{root}/straight", steps=4, cp=2)))
    for mode in ("sync", "async"):
        run_dir = f"{root}/{mode}"
        _fit(_cfg(run_dir, steps=4, cp=2, async_save=mode == "async"), until=2)  # preempted half-way
        out[mode] = _losses(_fit(_cfg(run_dir, steps=4, cp=2, async_save=mode == "async")))
    # A signal that reaches only rank 1, during step 2: both ranks must stop after step 2 and save it.
    from seqpar.parallel.mesh import init_mesh
    from seqpar.train import Trainer

    cfg = _cfg(f"{root}/signal", steps=50, every=100, cp=2)
    trainer = Trainer(cfg, init_mesh(cfg.parallel, "cpu"))
    step_fn = trainer.train_step

    def train_step():
        if rank == 1 and trainer.step == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return step_fn()

    trainer.train_step = train_step
    res = trainer.fit()
    out["signal"] = (res["step"], res["stopped"])
    return out


@pytest.mark.timeout(170)
def test_two_rank_sharded_resume_async_save_and_signal_agreement():
    from torch.distributed.checkpoint import FileSystemReader

    with tempfile.TemporaryDirectory() as root:
        results = run_distributed(_two_rank_worker, 2, root, timeout_s=150)
        keys = FileSystemReader(f"{root}/sync/checkpoints/step-00000004").read_metadata().state_dict_metadata
        assert [s for s, _ in complete_checkpoints(f"{root}/async/checkpoints")] == [2, 4]
        signal_ckpts = [s for s, _ in complete_checkpoints(f"{root}/signal/checkpoints")]
    for r in results:
        straight = r["straight"]
        assert sorted(straight) == [1, 2, 3, 4]
        for mode in ("sync", "async"):
            # Same shards, optimizer moments, schedule, data position and RNG: bit-identical losses.
            assert r[mode] == {3: straight[3], 4: straight[4]}, (mode, r[mode], straight)
        assert r["signal"] == (2, "signal received")
    assert signal_ckpts == [2]
    # Per-rank state under rank-unique keys (DCP would keep one copy of a shared key).
    assert {"rank0.rng_cpu", "rank1.rng_cpu", "rank0.data.step", "rank1.data.step"} <= set(keys)


_KILL_SCRIPT = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {here!r}]
from test_checkpoint import _cfg
from seqpar.train import checkpoint as ck, run
commit = ck.Checkpointer._commit
def killed(self, step, tmp):
    if step == 4:  # shards written, one half-truncated, then the process dies before the commit
        shard = sorted(f for f in os.listdir(tmp) if f.endswith(".distcp"))[0]
        path = os.path.join(tmp, shard)
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self, step, tmp)
ck.Checkpointer._commit = killed
run(_cfg({run_dir!r}, steps=6, every=2))
"""


@pytest.mark.timeout(170)
def test_killed_save_leaves_previous_checkpoint_in_charge(tmp_path):
    torch.set_num_threads(1)
    straight = _losses(_fit(_cfg(tmp_path / "straight", steps=6, every=0)))
    run_dir = tmp_path / "killed"
    script = _KILL_SCRIPT.format(tests=TESTS, here=os.path.dirname(os.path.abspath(__file__)), run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = run_dir / "checkpoints"
    assert [s for s, _ in complete_checkpoints(str(ckpt))] == [2]
    assert (ckpt / "step-00000004.tmp").is_dir()  # the half-written save is there, and ignored
    resumed = _losses(_fit(_cfg(run_dir, steps=6, every=2)))
    assert resumed == {s: straight[s] for s in (3, 4, 5, 6)}
    # Re-saving step 4 replaced the stale .tmp; keep_last=2 pruned step 2.
    assert sorted(os.listdir(ckpt)) == ["step-00000004", "step-00000006"]


@pytest.mark.timeout(120)
def test_corrupted_or_mismatched_checkpoints_name_the_folder(tmp_path):
    torch.set_num_threads(1)
    _fit(_cfg(tmp_path, steps=2, every=2))
    step_dir = tmp_path / "checkpoints" / "step-00000002"
    meta = (step_dir / "meta.json").read_text()
    (step_dir / "meta.json").write_text(meta.replace('"world_size": 1', '"world_size": 4'))
    with pytest.raises(CheckpointError, match="written by 4 processes"):
        _fit(_cfg(tmp_path, steps=4, every=2))
    (step_dir / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable meta.json"):
        _fit(_cfg(tmp_path, steps=4, every=2))
    (step_dir / "meta.json").write_text(meta)
    shard = next(step_dir.glob("*.distcp"))
    good = shard.read_bytes()
    for damage in (lambda: shard.write_bytes(good[: len(good) // 3]),  # truncated
                   lambda: (step_dir / ".metadata").write_bytes(b"\x00garbage"),  # garbled index
                   lambda: shard.unlink()):  # missing
        damage()
        with pytest.raises(CheckpointError, match=f"{step_dir}.* is corrupted or does not match"):
            _fit(_cfg(tmp_path, steps=4, every=2))


@pytest.mark.timeout(120)
def test_stop_file_and_time_budget_checkpoint_and_stop(tmp_path):
    torch.set_num_threads(1)
    stop = tmp_path / "STOP"
    stop.touch()
    out = _fit(_cfg(tmp_path / "a", steps=20, every=100, stop_file=str(stop)))
    assert (out["step"], out["stopped"]) == (1, "stop file found")
    assert [s for s, _ in complete_checkpoints(str(tmp_path / "a" / "checkpoints"))] == [1]
    out = _fit(_cfg(tmp_path / "b", steps=20, every=100, max_minutes=1e-6))
    assert (out["step"], out["stopped"]) == (1, "train.max_minutes reached")
    assert [s for s, _ in complete_checkpoints(str(tmp_path / "b" / "checkpoints"))] == [1]


@pytest.mark.timeout(120)
def test_sigterm_to_train_py_checkpoints_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-u", "train.py", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
           "train.seq_len=32", "train.batch_size=2", "train.steps=100000", "train.device=cpu", "train.eval_every=0",
           "data.max_bytes=200000", "checkpoint.every=100000", "logging.log_every=1", "logging.progress=false",
           f"logging.run_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:  # wait until training runs
            if line.startswith("step      2/"):
                break
            assert time.monotonic() < deadline, "train.py did not start training in time"
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, rest  # stopped and saved (seqpar/train/exit_codes.py): a scheduler requeues
    assert "signal received at step" in rest and "checkpointed; stopping cleanly" in rest, rest
    saved = [s for s, _ in complete_checkpoints(str(tmp_path / "checkpoints"))]
    assert len(saved) == 1 and 2 <= saved[0] < 100000
