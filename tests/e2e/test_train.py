"""End-to-end: the training loop on the embedded corpus, resume exactness, and the user errors of train.py."""
import os
import subprocess
import sys

import pytest
import torch

from seqpar.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from seqpar.parallel.mesh import init_mesh
from seqpar.train import Trainer, lr_multiplier, run
from seqpar.train.checkpoint import CheckpointError, complete_checkpoints
from tiny_run import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_cfg = tiny_config


@pytest.mark.timeout(180)
def test_loss_goes_down_and_metrics_are_written(tmp_path):
    torch.set_num_threads(1)
    out = run(_cfg(tmp_path, steps=40))
    losses = [h["loss"] for h in out["history"]]
    assert out["step"] == 40
    # Bytes start near ln(320) ~ 5.8 nats; 40 steps of a 2-layer model must get well below 4.
    assert losses[0] > 5.0 and min(losses[-5:]) < 4.0, losses
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and '"tokens_per_s"' in lines[-1]


@pytest.mark.timeout(180)
def test_resume_is_exact(tmp_path):
    torch.set_num_threads(1)
    straight = run(_cfg(tmp_path / "a", steps=10))["history"]
    cfg = _cfg(tmp_path / "b", steps=10, every=5)
    Trainer(cfg, init_mesh(cfg.parallel, "cpu")).fit(until=5)  # a run stopped (preempted) half-way
    assert [s for s, _ in complete_checkpoints(str(tmp_path / "b" / "checkpoints"))] == [5]
    resumed = run(_cfg(tmp_path / "b", steps=10, every=5))["history"]
    assert [h["step"] for h in resumed] == list(range(6, 11))
    # Same data position, RNG, optimizer and schedule: bit-identical losses on CPU.
    assert [h["loss"] for h in straight[5:]] == [h["loss"] for h in resumed]


def test_half_written_checkpoint_is_ignored_and_corrupt_one_is_named(tmp_path):
    torch.set_num_threads(1)
    run(_cfg(tmp_path, steps=2, every=2))
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-00000004.tmp").mkdir()  # a save killed half-way
    assert [s for s, _ in complete_checkpoints(str(ckpt))] == [2]
    shards = list((ckpt / "step-00000002").glob("*.distcp"))
    assert shards, "DCP shard files expected"
    for f in shards:
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        run(_cfg(tmp_path, steps=4, every=2))


def test_lr_schedule():
    f = lambda s: lr_multiplier(s, warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_config_validation_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="parallel.layout"):
        ParallelConfig(layout="spiral")
    with pytest.raises(ConfigError, match="train.seq_len"):
        Config(parallel=ParallelConfig(cp=4), train=TrainConfig(seq_len=100))
    with pytest.raises(ConfigError, match="parallel.cp"):
        ParallelConfig(cp=3).resolve(4)
    with pytest.raises(ConfigError, match="attention_backend=triton"):
        Config(train=TrainConfig(deterministic=True), parallel=ParallelConfig(attention_backend="sdpa_cudnn"))


@pytest.mark.timeout(120)
def test_deterministic_flag_sets_the_process_up():
    """train.deterministic turns torch's deterministic algorithms on before the model is built (a child
    process: the setting is global); the Triton kernel's default dQ mode is the deterministic one, and the
    atomic mode is refused once determinism is on."""
    code = ("import torch; from seqpar.train.preflight import set_determinism; "
            "from seqpar.ops.attention.triton.function import _dq_mode, default_dq_mode; import os; "
            "assert default_dq_mode(64) == 'kernel' and _dq_mode(64, 'atomic', None) == 'atomic'; "
            "set_determinism(True); "
            "assert torch.are_deterministic_algorithms_enabled() and os.environ['CUBLAS_WORKSPACE_CONFIG']; "
            "assert default_dq_mode(64) == 'kernel'\n"
            "try:\n    _dq_mode(64, 'atomic', True)\nexcept ValueError:\n    print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _train_py(*overrides, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEQPAR_DEBUG", None)
    return subprocess.run([sys.executable, "train.py", f"logging.run_dir={tmp_path}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides,needle", [
    (["model.n_kv_heads=3"], "n_kv_heads"),
    (["train.nonsense=1"], "nonsense"),
    (["train.steps=many"], "steps"),
    (["train.seq_len=2000000", "data.max_bytes=100000"], "train.seq_len"),
    (["data=text", "data.paths=[/no/such/file.txt]"], "data.paths"),
    (["parallel.cp=2", "train.seq_len=101"], "train.seq_len"),
])
def test_train_py_user_errors_are_one_clear_line(overrides, needle, tmp_path):
    proc = _train_py(*overrides, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
