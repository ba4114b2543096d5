"""benchmarks/bench_arch.py end to end on the CPU at a tiny size (2 trained options + Linformer, which cannot train
as a causal LM): the files it promises, finite numbers, and a training table that is recomputed here from the
trainer's own metrics.jsonl in each run directory (not through the benchmark's code), so a wrong span, a
stale record or a mislabelled column fails."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEQ, BATCH, WARMUP = 64, 2, 1


def _table(md: str, section: str) -> dict:
    """``{first cell: {header: cell}}`` of the first markdown table after ``## <section>``."""
    lines = md[md.index(f"## {section}"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def _tokens_per_s(records: list, tokens_per_step: int, warmup: int) -> float:
    """Tokens over time of the logged spans that start after the warm-up (each record: tokens/s since the last)."""
    tokens = seconds = 0.0
    prev = 0
    for r in sorted(records, key=lambda r: r["step"]):
        if prev >= warmup:
            n = (r["step"] - prev) * tokens_per_step
            tokens += n
            seconds += n / r["tokens_per_s"]
        prev = r["step"]
    return tokens / seconds


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("hydra")
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("bench_arch")
    cmd = [sys.executable, "benchmarks/bench_arch.py", "--device", "cpu", "--out", str(tmp / "out"),
           "--workdir", str(tmp / "work"), "--options", "dense,performer,linformer", "--dim", "32", "--layers", "2",
           "--heads", "2", "--seq-len", str(SEQ), "--batch", str(BATCH), "--tokens", str(6 * SEQ * BATCH),
           "--warmup", str(WARMUP), "--max-bytes", "400000", "--eval-targets", "128", "--eval-batch", "4",
           "--layer-min", "64", "--layer-max", "256", "--point-limit-s", "10", "--budget-s", "60",
           "--layer-share", "0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = list((tmp / "out").iterdir())  # one fresh directory per invocation
    return proc, out, json.loads((out / "arch.json").read_text()), (out / "arch.md").read_text()


def test_files_and_stamp(bench):
    proc, out, data, md = bench
    for name in ("arch.json", "arch.md", "loss_ppl.png", "layer_time.png", "dense.log", "performer.log"):
        assert (out / name).is_file(), name
    for png in ("loss_ppl.png", "layer_time.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "layer_memory.png").exists()  # CPU: no CUDA peak memory to plot
    for key in ("device", "torch", "triton", "date"):
        assert key in data["meta"], key
    assert proc.stdout.rstrip().endswith(md.rstrip())  # the table is printed last


def test_numbers_are_finite(bench):
    _, _, data, _ = bench
    rows = {r["option"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "performer", "linformer"}
    assert rows["linformer"]["status"] == "not trained" and "not causal" in data["settings"]["not_trained"]["linformer"]
    for o in ("dense", "performer"):
        r = rows[o]
        assert r["status"] == "ok" and r["tokens"] == data["settings"]["tokens"] == 6 * SEQ * BATCH
        for k in ("val_loss", "val_ppl", "tokens_per_s", "peak_mem_gib", "ppl_0", "ppl_1", "ppl_2", "params"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (o, k, r.get(k))
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
        ev = next(run["eval"] for run in data["runs"] if run["option"] == o)
        assert [p["length"] for p in ev["ppl"]] == [SEQ, 2 * SEQ, 4 * SEQ]
        assert len({p["tokens"] for p in ev["ppl"]}) == 1  # the same targets at every length
        pts = [p for p in data["layer"] if p["option"] == o and p["kind"] == "layer"]
        assert pts[0]["seq_len"] == 64 and pts[0]["status"] == "ok"
        assert all(math.isfinite(p["time_ms"]) and p["time_ms"] > 0 for p in pts if "time_ms" in p)
    # same trained parameter count (performer adds only non-trained random features)
    assert rows["performer"]["params"] == rows["dense"]["params"]


def test_table_is_recomputed_from_the_run_directories(bench):
    _, out, data, md = bench
    table = _table(md, "Training")
    assert set(table) == {"dense", "performer", "linformer"}
    for run in data["runs"]:
        o = run["option"]
        with open(os.path.join(run["run_dir"], "metrics.jsonl")) as f:
            recs = [r for r in map(json.loads, f) if "tokens_per_s" in r]
        assert sorted(r["step"] for r in recs) == list(range(1, 7))  # a fresh directory: only this run's steps
        cells = table[o]
        assert cells["tokens/s"] == f"{_tokens_per_s(recs, SEQ * BATCH, WARMUP):,.0f}"
        assert cells["peak mem (GiB)"] == f"{max(r['peak_mem_gib'] for r in recs):.2f}"
        assert cells["tokens"] == f"{max(r['step'] for r in recs) * SEQ * BATCH:,d}"
        ev = run["eval"]
        assert cells["val loss"] == f"{ev['val_loss']:.4f}" and cells["val ppl"] == f"{math.exp(ev['val_loss']):.3f}"
        for p in ev["ppl"]:
            assert cells[f"ppl @{p['length']:,}"] == f"{math.exp(p['nll']):.3f}"
    assert table["linformer"]["status"] == "not trained"
    # one verdict per option other than dense, naming it, with numbers when it underperforms
    sentences = data["verdicts"]
    assert [s.split(":")[0].split(" ")[0] for s in sentences] == ["performer", "linformer"]
    assert all(f"- {s}" in md for s in sentences)
    layer = _table(md, "One layer")
    dense64 = next(p for p in data["layer"]
                   if p["option"] == "dense" and p.get("kind") == "layer" and p["seq_len"] == 64)
    assert layer["dense"]["64"] == f"{dense64['time_ms']:.2f}"


def test_verdicts_are_computed_from_the_numbers():
    """Fake rows: each clause appears exactly when its number is worse than dense's, with the numbers."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import arch_report

    dense = {"option": "dense", "status": "ok", "tokens": 1000, "val_loss": 2.0, "tokens_per_s": 1000.0,
             "peak_mem_gib": 10.0, "ppl_0": 8.0, "ppl_1": 8.0, "ppl_2": 9.0}
    fast = {**dense, "option": "longformer", "val_loss": 2.004, "tokens_per_s": 990.0}  # within the tolerances
    slow = {**dense, "option": "performer", "tokens": 500, "val_loss": 2.2, "tokens_per_s": 250.0,
            "peak_mem_gib": 12.0, "ppl_2": 12.0}
    layer = lambda o, n, t: {"option": o, "kind": "layer", "seq_len": n, "status": "ok", "time_ms": t}
    points = [layer("dense", 2048, 1.0), layer("dense", 4096, 4.0), layer("dense", 8192, 16.0),
              layer("longformer", 2048, 2.0), layer("longformer", 4096, 3.0), layer("longformer", 8192, 6.0),
              layer("longformer", 16384, 12.0), layer("performer", 2048, 5.0), layer("performer", 4096, 9.0)]
    out = arch_report.verdicts([dense, fast, slow, {"option": "linformer", "status": "not trained"}], points,
                               [2048, 4096, 8192])
    assert out[0] == ("longformer: no measured number is worse than dense's. One layer is faster than dense "
                      "from 4,096 tokens on.")
    assert out[1] == ("performer underperforms dense: trained on 500 tokens, fewer than dense's 1,000 (time cap); "
                      "validation loss 2.2000 vs dense 2.0000 (+10.0%); 250 tokens/s, 25% of dense's 1,000; peak "
                      "memory 12.00 GiB vs 10.00; perplexity 12 vs 9 at 8,192 tokens of context; one layer at 4,096 "
                      "tokens takes 9.0 ms vs dense 4.0 ms; one layer reaches 4,096 tokens, dense 8,192.")
    assert out[2] == "linformer: not compared (not trained)."
    assert arch_report.throughput([{"step": 1, "tokens_per_s": 1.0}, {"step": 3, "tokens_per_s": 100.0},
                                   {"step": 4, "tokens_per_s": 50.0}], 10, warmup=1) == pytest.approx(30 / 0.4)
