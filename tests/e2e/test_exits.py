"""Issue 18, items 3-6, 8 and the "Also" list: exits a user and a scheduler can read. The NaN guard (skip,
count, exit 4, nothing non-finite saved), one ``error:`` line and exit 2 for each user mistake, a corrupt
newest checkpoint skipped for the previous one, stale temporaries cleaned, SIGINT checkpointing like SIGTERM
(exit 3), ``--help``, and ``python -m seqpar.launch`` giving the workers' code under torchrun."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from seqpar.launch import combine
from seqpar.train import Trainer, exit_codes, run
from seqpar.train.checkpoint import complete_checkpoints
from tiny_run import tiny_config
from test_run_dirs import ROOT, TINY, train_py

CUDA = torch.cuda.is_available()


@pytest.mark.timeout(120)
def test_nan_guard_skips_counts_and_stops_with_exit_4_keeping_good_checkpoints(tmp_path):
    # The recipe: a huge rate without clipping gives a non-finite gradient norm from step 2 on.
    proc = train_py(tmp_path, "train.steps=30", "checkpoint.every=1", "checkpoint.keep_last=2", "optim.lr=1000",
                    "optim.grad_clip=0", "optim.warmup_steps=0", "train.max_bad_steps=2", "logging.log_every=1")
    assert proc.returncode == exit_codes.DIVERGED, proc.stderr
    assert proc.stderr.count("error: training diverged") == 1 and "Traceback" not in proc.stderr, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert len(skipped) == 2 and skipped[0] >= 2, records  # max_bad_steps=2: the third stops before logging
    # No save after the first non-finite step: keep_last rotated nothing good away.
    steps = [s for s, _ in complete_checkpoints(str(tmp_path / "checkpoints"))]
    assert steps and max(steps) < skipped[0], (steps, skipped)


@pytest.mark.timeout(120)
def test_one_bad_batch_is_skipped_without_touching_weights_or_schedule(tmp_path):
    torch.set_num_threads(1)
    from seqpar.parallel.mesh import init_mesh

    cfg = tiny_config(tmp_path, steps=4)
    trainer = Trainer(cfg, init_mesh(cfg.parallel, "cpu"))
    loss_sum, seen = trainer._loss_sum, {}

    def poisoned(batch):
        out = loss_sum(batch)
        if trainer.step == 1:  # the second step's loss is NaN
            seen["before"] = [p.detach().clone() for p in trainer.model.parameters()]
            seen["lr"] = trainer.scheduler.get_last_lr()[0]
            return out * float("nan")
        return out

    trainer._loss_sum = poisoned
    out = trainer.fit()
    assert out["step"] == 4 and [h.get("skipped", False) for h in out["history"]] == [False, True, False, False]
    assert out["history"][1]["loss"] is None  # valid JSON (no NaN literal)
    assert out["history"][2]["lr"] == seen["lr"]  # the schedule did not move for the skipped step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _has(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", ["jsonl", "wandb", "cuda", "triton", "garbage"])
def test_user_mistakes_are_one_error_line_and_exit_2(case, tmp_path):
    if case == "wandb" and _has("wandb"):
        pytest.skip("wandb is installed here")
    if case in ("cuda", "triton") and CUDA:
        pytest.skip("a GPU is visible")
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (data / "noise.txt").write_bytes(os.urandom(200_000))
    overrides, needle = {
        "jsonl": (["data=jsonl", f"data.paths=[{data}/bad.jsonl]"], "line 2 is not valid JSON"),
        "wandb": (["logging.wandb=true"], "logging.wandb=true"),
        "cuda": (["train.device=cuda"], "train.device=cuda"),
        "triton": (["parallel.attention_backend=triton"], "parallel.attention_backend=triton"),
        "garbage": (["data=text", f"data.paths=[{data}/noise.txt]"], "does not look like text"),
    }[case]
    proc = train_py(tmp_path / "run", "train.steps=2", *overrides)
    assert proc.returncode == exit_codes.USER_ERROR, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "params" not in proc.stdout  # refused before the model was built (no banner)


@pytest.mark.timeout(120)
def test_corrupt_newest_checkpoint_falls_back_and_stale_folders_are_cleaned(tmp_path):
    torch.set_num_threads(1)
    run(tiny_config(tmp_path, steps=4, every=2))
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-00000004" / ".metadata").write_bytes(b"")  # an empty DCP .metadata
    (ckpt / "step-00000006.tmp").mkdir()  # a save killed half-way
    (ckpt / "step-00000008").mkdir()  # an empty step folder
    with pytest.warns(UserWarning, match="step-00000004"):
        out = run(tiny_config(tmp_path, steps=5, every=2))
    assert [h["step"] for h in out["history"]] == [3, 4, 5]  # resumed from step 2
    left = sorted(os.listdir(ckpt))
    assert "step-00000006.tmp" not in left and "step-00000008" not in left, left


@pytest.mark.timeout(120)
def test_sigint_checkpoints_and_exits_3(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"logging.run_dir={tmp_path}", "train.steps=100000",
                             "checkpoint.every=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_codes.STOPPED, err
    assert "Traceback" not in err and "checkpointed; stopping cleanly" in out, (out, err)
    assert complete_checkpoints(str(tmp_path / "checkpoints"))


def test_help_prints_usage():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for needle in ("usage:", "model=", "llama3-8b", "key=value", "README.md", "Exit codes"):
        assert needle in proc.stdout, proc.stdout


def test_launcher_combines_worker_codes():
    f = lambda code, ts, rank=0: SimpleNamespace(exitcode=code, timestamp=ts, local_rank=rank)
    assert combine({0: f(3, 10), 1: f(3, 10, 1)}) == exit_codes.STOPPED
    assert combine({0: f(2, 10), 1: f(-15, 11, 1)}) == exit_codes.USER_ERROR  # the rank torchrun killed after
    assert combine({0: f(1, 10), 1: f(3, 10, 1)}) == exit_codes.CRASH  # a crash among the first wins
    assert combine({0: f(4, 10), 1: f(3, 12, 1)}) == exit_codes.DIVERGED  # the first to end decides
    assert combine({0: f(-9, 10)}) == exit_codes.CRASH and combine({0: f(7, 10)}) == exit_codes.CRASH


@pytest.mark.timeout(150)
def test_launcher_exits_with_the_workers_code_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "seqpar.launch", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
              "parallel.cp=2"]
    bad = subprocess.run([*launch, f"logging.run_dir={tmp_path}/a", "model.n_kv_heads=3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=100)
    assert bad.returncode == exit_codes.USER_ERROR, bad.stderr
    assert "Traceback" not in bad.stderr and "ChildFailedError" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("seqpar.launch: workers ended with exit 2"), bad.stderr
    said = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]  # both ranks fail alike: one line
    assert len(said) == 1 and "n_kv_heads" in said[0], bad.stderr
    # SIGTERM to the launcher (what a scheduler sends): every rank checkpoints, the launcher says 3.
    run_dir = tmp_path / "b"
    proc = subprocess.Popen([*launch, f"logging.run_dir={run_dir}", "train.steps=100000", "checkpoint.every=100000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_codes.STOPPED, err[-2000:]
    assert "Traceback" not in err and complete_checkpoints(str(run_dir / "checkpoints")), err[-2000:]
