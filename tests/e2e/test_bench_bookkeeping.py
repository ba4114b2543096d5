"""Benchmark bookkeeping (issue 17): a benchmark run starts in a fresh directory and reads only its own
records, so a second run of the same name can never average in the first run's steps."""
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train  # noqa: E402


def _rec(step, t, tps, loss=5.0):
    return {"time": t, "step": step, "loss": loss, "tokens_per_s": tps, "tokens_per_s_per_device": tps / 2,
            "tflops_per_device": tps / 1000, "mfu": tps / 1e5, "peak_mem_gib": 1.0}


def test_own_records_ignore_a_stale_run_in_the_same_file(tmp_path):
    # A 64k run's steps (fast) left in metrics.jsonl, then a 128k run's (slow): the old bug averaged both.
    path = tmp_path / "metrics.jsonl"
    t0 = time.time()
    stale = [_rec(s, t0 - 100 + s, 49700.0) for s in range(1, 9)]
    own = [_rec(s, t0 + s, 25300.0) for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in stale + own) + '{"step": 7, "tok')  # + a torn line
    recs = bench_train.own_records(str(path), t0, steps=6)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    summary = bench_train.summarize(recs, warmup=2, tokens_per_step=131072)
    assert summary["tokens_per_s_per_gpu"] == 12650.0 and summary["steps_timed"] == 4
    assert summary["mfu"] == pytest.approx(0.253)
    # Two runs writing the same steps after our start: an error, never a silent mean.
    with open(path, "a") as f:
        f.write("\n" + json.dumps(_rec(3, t0 + 50, 1.0)) + "\n")
    with pytest.raises(ValueError, match="more than once"):
        bench_train.own_records(str(path), t0, steps=6)


def test_a_run_whose_directory_another_run_writes_to_fails_its_row(tmp_path, monkeypatch):
    """Belt and braces: should two runs ever share a directory, the row says so instead of averaging."""
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(bench_train, "fresh_run_dir", lambda workdir, name: str(shared))

    def fake_torchrun(cmd, **kw):  # two writers log the same steps into the one metrics.jsonl
        now = time.time()
        (shared / "metrics.jsonl").write_text("".join(json.dumps(_rec(s, now, tps)) + "\n"
                                                      for tps in (49700.0, 25300.0) for s in (1, 2, 3)))
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(bench_train.subprocess, "run", fake_torchrun)
    pytest.importorskip("hydra")
    rec = bench_train._run("x", ["model=tiny"], 3, 1, 1, str(tmp_path), str(tmp_path), 10)
    assert rec["status"] == "mixed records" and "tokens_per_s_per_gpu" not in rec
    assert "failed (mixed records)" in bench_train.markdown({"device": "cpu", "gpus": 0, "date": "d"}, [rec])


def test_fresh_run_dir_never_reuses(tmp_path):
    dirs = [bench_train.fresh_run_dir(str(tmp_path), "cp2_64k") for _ in range(3)]
    assert len(set(dirs)) == 3 and all(os.path.isdir(d) and not os.listdir(d) for d in dirs)
    assert all(os.path.basename(d).startswith("cp2_64k-") for d in dirs)


def test_second_run_of_the_same_name_reports_only_its_own_steps(tmp_path):
    """Two real torchrun invocations of train.py (tiny model, CPU) under one name and workdir: the second
    (other length, other step count) reports exactly its own steps, from its own directory."""
    pytest.importorskip("hydra")
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    os.makedirs(out)
    base = ["model=tiny", "train.batch_size=2", "data.max_bytes=200000", "train.device=cpu"]
    first = bench_train._run("same", [*base, "train.seq_len=128"], 5, 1, 1, work, out, 300)
    second = bench_train._run("same", [*base, "train.seq_len=64"], 3, 1, 1, work, out, 300)
    assert first["status"] == "ok" and second["status"] == "ok", (first, second)
    assert first["run_dir"] != second["run_dir"]
    assert first["steps"] == [1, 2, 3, 4, 5] and second["steps"] == [1, 2, 3]
    assert second["steps_timed"] == 2 and second["seq_len"] == 64
    # The second summary is recomputed from its own directory's file alone, and that file holds its steps only.
    with open(os.path.join(second["run_dir"], "metrics.jsonl")) as f:
        mine = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    assert [r["step"] for r in mine] == [1, 2, 3]
    assert second["tokens_per_s_per_gpu"] == pytest.approx(
        sum(r["tokens_per_s_per_device"] for r in mine[1:]) / 2, abs=0.1)
