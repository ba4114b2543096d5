"""Issue 18, items 1, 2 and 7: a run directory holds one run. A run with another shape, seq_len or batch
is refused with one line naming the keys and the ways out, config.yaml survives it, an allowed change
(checkpoint.allow_changes) resumes, a lock keeps a second live run out (a dead run's lock is no lock),
and metrics.jsonl holds each step once after a resume."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from seqpar.train import run
from seqpar.train.run_dir import RunLock
from tiny_run import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "train.seq_len=32", "train.batch_size=2",
        "train.device=cpu", "train.eval_every=0", "data.max_bytes=200000", "logging.progress=false"]


def train_py(run_dir, *overrides, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEQPAR_DEBUG", None)
    return subprocess.run([sys.executable, "train.py", *TINY, f"logging.run_dir={run_dir}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(120)
def test_a_different_run_is_refused_in_one_line_and_config_yaml_survives(tmp_path):
    run_dir = tmp_path / "run"
    first = train_py(run_dir, "train.steps=2", "checkpoint.every=2")
    assert first.returncode == 0, first.stderr
    saved = (run_dir / "config.yaml").read_text()
    metrics = (run_dir / "metrics.jsonl").read_text()
    # The README's second example after its first: more steps (fine), another seq_len and depth (not).
    second = train_py(run_dir, "train.steps=4", "train.seq_len=64", "model.n_layers=3")
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
    for needle in ("model.n_layers (2 -> 3)", "train.seq_len (32 -> 64)", "logging.run_dir",
                   "checkpoint.allow_changes=[train.seq_len]"):
        assert needle in lines[0], lines[0]
    assert "train.steps" not in lines[0] and "corrupted" not in lines[0]
    assert (run_dir / "config.yaml").read_text() == saved  # item 2: the trained run stays evaluable
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    batch = train_py(run_dir, "train.steps=4", "train.batch_size=4")  # item 4: another batch size
    assert batch.returncode == 2 and "train.batch_size (2 -> 4)" in batch.stderr, batch.stderr
    # The explicit way out: a longer context for the same weights resumes, and config.yaml says so.
    longer = train_py(run_dir, "train.steps=3", "train.seq_len=64", "checkpoint.allow_changes=[train.seq_len]")
    assert longer.returncode == 0, longer.stderr
    assert "resumed from" in longer.stdout and "step      3/3" in longer.stdout, longer.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seq_len"] == 64
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]  # written atomically (tmp + rename)
    # A shape key is never allowed to change in a resumed run.
    bad = train_py(run_dir, "checkpoint.allow_changes=[model.n_layers]")
    assert bad.returncode == 2 and "checkpoint.allow_changes" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(120)
def test_metrics_continue_from_the_checkpoint_without_duplicates(tmp_path):
    torch.set_num_threads(1)
    run(tiny_config(tmp_path, steps=3, every=2))  # checkpoints at 2 and 3 (the last step)
    # Killed after logging step 3 but before its checkpoint: only step-2 survives.
    for p in (tmp_path / "checkpoints" / "step-00000003").iterdir():
        p.unlink()
    (tmp_path / "checkpoints" / "step-00000003").rmdir()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0')  # and a line torn by the kill
    out = run(tiny_config(tmp_path, steps=5, every=2))
    assert [h["step"] for h in out["history"]] == [3, 4, 5]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.timeout(120)
def test_a_live_run_locks_its_directory_and_a_dead_runs_lock_is_ignored(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    live = subprocess.Popen([sys.executable, "train.py", *TINY, f"logging.run_dir={run_dir}", "train.steps=100000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists():  # it is training
            assert time.monotonic() < deadline and live.poll() is None
            time.sleep(0.1)
        second = train_py(run_dir, "train.steps=2")
        assert second.returncode == 2, second.stderr
        assert "in use by another live run" in second.stderr and f"pid {live.pid}" in second.stderr, second.stderr
    finally:
        live.kill()  # SIGKILL: its lock file stays behind, naming a dead process
        live.communicate()
    assert f"pid {live.pid}" in (run_dir / ".lock").read_text()
    again = train_py(run_dir, "train.steps=2")
    assert again.returncode == 0, again.stderr
    # In one process, a second Trainer on the same directory is no conflict (tests, notebooks).
    lock = RunLock(str(tmp_path / "x")).acquire()
    RunLock(str(tmp_path / "x")).acquire()
    lock.release()


@pytest.mark.timeout(120)
def test_a_run_dir_without_config_yaml_says_what_differs_and_takes_allow_changes(tmp_path):
    # A run directory written before config.yaml existed (older seqpar): its checkpoint's data stream is
    # what can tell a changed seq_len: one line, exit 2, and the allow_changes way out works.
    run_dir = tmp_path / "old"
    assert train_py(run_dir, "train.steps=2", "checkpoint.every=2").returncode == 0
    (run_dir / "config.yaml").unlink()
    longer = train_py(run_dir, "train.steps=4", "checkpoint.every=2", "train.seq_len=64")
    lines = longer.stderr.strip().splitlines()
    assert longer.returncode == 2 and len(lines) == 1, longer.stderr
    assert not (run_dir / "config.yaml").exists()  # a refused run does not claim the directory
    assert lines[0].startswith("error: cannot resume this run's data stream: train.seq_len gives seq_len=64")
    assert "checkpoint.allow_changes=[train.seq_len]" in lines[0]
    allowed = train_py(run_dir, "train.steps=4", "checkpoint.every=2", "train.seq_len=64",
                       "checkpoint.allow_changes=[train.seq_len]")
    assert allowed.returncode == 0, allowed.stderr
    assert "resumed from" in allowed.stdout and "the data stream restarts" in allowed.stdout
    assert sorted(os.listdir(run_dir / "checkpoints"))[-1] == "step-00000004"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seq_len"] == 64  # claimed once resumed
