"""benchmarks/curves.py: a real SIGTERM + resume through seqpar.launch on 2 gloo processes (cp=2), compared
step by step with the uninterrupted run (bitwise on CPU), and the comparison arithmetic."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
curves = pytest.importorskip("curves")


def test_summarize_counts_equal_steps_and_splits_at_the_stop():
    base = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    other = {1: 5.0, 2: 4.5, 3: 3.0, 4: 2.25, 5: 1.0}
    s = curves.summarize(base, other, split=2)
    assert s["steps"] == 4 and s["equal"] == 2 and s["max_abs_diff"] == 0.5
    assert s["max_before"] == 0.5 and s["max_after"] == 0.25 and s["mean_abs_diff"] == pytest.approx(0.1875)


@pytest.mark.timeout(300)
def test_sigterm_resume_matches_the_straight_run(tmp_path):
    overrides = ["model=tiny", "parallel.cp=2", "train.seq_len=128", "train.batch_size=2", "train.steps=24",
                 "checkpoint.every=50", "data.max_bytes=200000", "train.device=cpu"]
    out = tmp_path / "out"
    code = curves.main(["resume", "--nproc", "2", "--stop-at", "8", "--workdir", str(tmp_path / "runs"),
                        "--out", str(out), "--tag", "t", "--set", *overrides])
    data = json.load(open(out / "curves_t.json"))
    assert code == 0, data["meta"]["exit_codes"]
    assert data["meta"]["exit_codes"] == {"straight": 0, "stopped": 3, "resumed": 0}
    assert 8 <= data["meta"]["stopped_at"] < 24
    s = data["summary"]["resumed"]
    assert s["steps"] == 24 and s["equal"] == 24 and s["max_after"] == 0.0  # CPU: bit for bit
    assert (out / "curves_t.md").read_text().splitlines()[-1].startswith("![curves]")
