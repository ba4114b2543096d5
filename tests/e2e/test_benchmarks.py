"""CPU tests of the benchmark scaffolding: max_context's search, the derived ring columns, and the
table / JSON / markdown / PNG writers on fake rows (no GPU, no torchrun)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train  # noqa: E402
import max_context  # noqa: E402
import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def threshold_probe(limit, calls=None):
    """Fake probe: fits up to ``limit`` tokens (monotone, like memory)."""

    def probe(n):
        if calls is not None:
            calls.append(n)
        return {"ok": n <= limit, "status": "ok" if n <= limit else "oom"}

    return probe


@pytest.mark.parametrize("limit", [1_000_000, 1024 * 37, 16384, 3 * 2**20 + 5])
def test_search_finds_limit_within_tolerance(limit):
    calls = []
    best, history = max_context.search_max(threshold_probe(limit, calls), start=16384, multiple=1024,
                                           max_len=1 << 24, tol=0.05)
    assert best <= limit and best % 1024 == 0
    assert limit - best <= max(1024, 0.05 * best) + 1024  # bisection stops within one step of the tolerance
    assert [h["seq_len"] for h in history] == calls
    assert all(h["ok"] == (h["seq_len"] <= limit) for h in history)
    # Doubling then bisection: logarithmic in the range, not linear.
    assert len(calls) <= 30


def test_search_exact_with_zero_tolerance():
    best, _ = max_context.search_max(threshold_probe(100_000), start=4096, multiple=4096, max_len=1 << 20, tol=0.0)
    assert best == 98304  # the largest multiple of 4096 <= 100000


def test_search_nothing_fits_and_start_too_large():
    best, history = max_context.search_max(threshold_probe(0), start=8192, multiple=1024, max_len=1 << 20)
    assert best == 0 and not any(h["ok"] for h in history)
    # start above the limit: the search bisects down from the first failure
    best, _ = max_context.search_max(threshold_probe(5000), start=65536, multiple=1024, max_len=1 << 20, tol=0.0)
    assert best == 4096


def test_search_capped_by_max_len():
    best, history = max_context.search_max(threshold_probe(10**9), start=16384, multiple=1024, max_len=100_000)
    assert best == 99328  # max_len rounded down to the multiple, probed once after the doublings
    assert max(h["seq_len"] for h in history) <= 100_000
    with pytest.raises(ValueError):
        max_context.search_max(threshold_probe(1), start=0, multiple=1024, max_len=1 << 20)


def test_configurations_and_multiples():
    plain = max_context.config_overrides("plain", 2, 40960)
    assert "train.loss_chunk=40960" in plain and "train.ac=none" in plain and "parallel.cp=1" in plain
    sp = max_context.config_overrides("seqpar", 4, 1 << 20, ffn_chunk=4096)
    assert "parallel.cp=4" in sp and "train.ffn_chunk=4096" in sp and "train.ac=full" in sp
    assert "train.ac=selective" in max_context.config_overrides("seqpar-selective", 2, 8192)
    with pytest.raises(ValueError):
        max_context.config_overrides("nope", 2, 8192)
    assert max_context.layout_multiple("seqpar", 8, 1024) == 1024
    assert max_context.layout_multiple("seqpar", 3, 1024) == 3072  # zigzag needs 2*cp = 6 | seq_len
    assert max_context.layout_multiple("plain", 8, 1024) == 1024
    ratios = max_context.summarize({"plain": {"max_seq_len": 1000}, "seqpar": {"max_seq_len": 41000}})
    assert ratios == {"seqpar": 41.0}


def test_report_writers(tmp_path):
    rows = [{"a": 1, "b": 2.5, "c": None}, {"a": 2, "b": float("nan"), "c": "x"}]
    md = report.markdown_table(rows, [("A", "a", "d"), ("B", "b", ".1f"), ("C", "c", ""), ("A+1", lambda r: r["a"] + 1, "d")])
    assert md.splitlines()[0] == "| A | B | C | A+1 |"
    assert md.splitlines()[2] == "| 1 | 2.5 | - | 2 |"
    assert md.splitlines()[3] == "| 2 | nan | x | 3 |"
    meta = {"device": "NVIDIA H200", "gpus": 2, "torch": "2.x", "triton": "3.6.0", "date": "2026-11-22 03:00 UTC"}
    assert report.stem("ring", meta) == "ring_NVIDIA-H200_x2_2026-11-22"
    paths = report.write_outputs(str(tmp_path), "t", meta, {"rows": rows}, md)
    data = json.load(open(paths["json"]))
    assert data["meta"]["triton"] == "3.6.0" and data["rows"][0]["a"] == 1
    assert open(paths["md"]).read().startswith("| A |")
    png = report.line_plot(str(tmp_path / "p.png"), {"s": [(1, 2.0), (2, None), (4, 3.0)]}, xlabel="x", ylabel="y",
                           title="t", logx=True, hline=1.0)
    assert png and open(png, "rb").read(8) == PNG_MAGIC
    assert report.line_plot(str(tmp_path / "none.png"), {"s": [(1, None)]}, xlabel="x", ylabel="y", title="t") is None


def _ring_row(method, kernel, ws, seq, ms, layout="zigzag", error=None):
    tflops = 4 * seq * seq * 32 * 128 * 0.5 * 3.5 / ws / (ms * 1e-3) / 1e12
    return dict(method=method, kernel=kernel, layout=layout, world_size=ws, seq=seq, ms=ms, tflops_per_gpu=tflops,
                peak_gib=1.0, error=error)


def test_ring_derived_columns_and_outputs(tmp_path):
    bench_ring = pytest.importorskip("bench_ring")
    s = 32768
    rows = [_ring_row("sdpa", "cudnn", 1, s, 56.0, layout="-"),
            _ring_row("ring", "sdpa_cudnn", 1, s, 57.0),
            _ring_row("ring", "sdpa_cudnn", 2, s, 30.0),
            _ring_row("ring-nocomm", "sdpa_cudnn", 2, s, 29.0),
            _ring_row("torch_cp", "cudnn+allgather", 2, s, 35.0, layout="head-tail"),
            _ring_row("ring", "sdpa_cudnn", 2, 2 * s, float("nan"), error="OOM")]
    bench_ring.derive(rows)
    assert rows[2]["efficiency"] == pytest.approx(57.0 / (2 * 30.0))  # same work per GPU halves the time ideally
    assert rows[2]["comm_share"] == pytest.approx(1.0 / 30.0)
    assert rows[4]["efficiency"] == pytest.approx(56.0 / (2 * 35.0))  # torch_cp is judged against SDPA cuDNN
    assert rows[5]["efficiency"] is None and rows[5]["comm_share"] is None  # OOM row: no partner at 64k either
    assert rows[1]["efficiency"] == pytest.approx(1.0) and rows[1]["comm_share"] is None
    meta = {"device": "NVIDIA H200", "gpus": 2, "torch": "t", "triton": "3.6.0", "date": "2026-11-22 03:00 UTC"}
    md = bench_ring.write_results(str(tmp_path), meta, [], rows)
    assert "| ring | sdpa_cudnn | zigzag | 2 | 64k | OOM |" in md
    assert "| ring | sdpa_cudnn | zigzag | 2 | 32k | 30.0 | " in md and "| 95% | 3% | 1.0 |" in md  # percentages
    stem = tmp_path / "ring_NVIDIA-H200_x2_2026-11-22"
    assert json.load(open(f"{stem}.json"))["timings"][2]["comm_share"] == pytest.approx(1 / 30)
    for suffix in ("_tflops.png", "_efficiency.png"):
        assert open(f"{stem}{suffix}", "rb").read(8) == PNG_MAGIC
    # Two runs (e.g. every kernel up to 256k, then cuDNN only at 512k) merged into one report.
    long = [_ring_row("ring", "sdpa_cudnn", 1, 16 * s, 900.0), _ring_row("ring", "sdpa_cudnn", 2, 16 * s, 470.0),
            _ring_row("ring", "sdpa_cudnn", 2, 2 * s, 110.0)]  # replaces the OOM row of the first run
    bench_ring.write_results(str(tmp_path), meta, [], long, tag="long")
    bench_ring.merge([f"{stem}.json", f"{stem}_long.json"], str(tmp_path), tag="all")
    merged = json.load(open(f"{stem}_all.json"))["timings"]
    assert len(merged) == len(rows) + 2
    by_key = {(r["method"], r["world_size"], r["seq"]): r for r in merged if r["kernel"] == "sdpa_cudnn"}
    assert by_key[("ring", 2, 2 * s)]["ms"] == 110.0 and by_key[("ring", 2, 2 * s)]["error"] is None
    assert by_key[("ring", 2, 16 * s)]["efficiency"] == pytest.approx(900.0 / (2 * 470.0))
    # --skip-ring-ws1: a ring row without its ring of one divides by bare SDPA of the same family.
    bare = [_ring_row("sdpa", "cudnn", 1, 32 * s, 3600.0, layout="-"), _ring_row("ring", "sdpa_cudnn", 4, 32 * s, 950.0),
            _ring_row("ring", "triton", 4, 32 * s, 1200.0)]
    bench_ring.derive(bare)
    assert bare[1]["efficiency"] == pytest.approx(3600.0 / (4 * 950.0)) and bare[2]["efficiency"] is None


def test_train_scaling_runs_markdown_plot(tmp_path):
    runs = bench_train.scaling_runs(["llama3-1b"], ["weak", "strong"], [1, 2, 4], 32768, 131072)
    assert runs["llama3-1b_weak_x4"][0] == 4 and "train.seq_len=131072" in runs["llama3-1b_weak_x4"][1]
    assert "train.seq_len=131072" in runs["llama3-1b_strong_x1"][1] and "parallel.cp=2" in runs["llama3-1b_strong_x2"][1]
    fake = [dict(name=f"llama3-1b_weak_x{w}", nproc=w, dp=1, cp=w, seq_len=32768 * w, ac="none", ffn_chunk=8192,
                 status="ok", tokens_per_s_per_gpu=30000.0 / w ** 0.2, tflops_per_gpu=400.0, mfu=0.42 - 0.01 * w,
                 step_time_s=1.0, peak_mem_gib=36.0, est_mem_gib=38.0) for w in (1, 2)]
    fake.append(dict(name="llama3-1b_strong_x1", nproc=1, dp=1, cp=1, seq_len=131072, ac="full", ffn_chunk=8192,
                     status="OOM", est_mem_gib=150.0))
    md = bench_train.markdown({"device": "NVIDIA H200", "gpus": 2, "date": "d"}, fake)
    assert "| llama3-1b_weak_x2 | dp=1 cp=2 | 65,536 | none | 8192 |" in md and "41.0%" in md
    assert "failed (OOM)" in md
    png = bench_train.plot(str(tmp_path / "train.png"), fake)
    assert png and open(png, "rb").read(8) == PNG_MAGIC


def test_max_context_dry_run_end_to_end(tmp_path):
    pytest.importorskip("hydra")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "max_context.py"), "--model", "llama3-1b", "--nproc", "2",
           "--dry-run-only", "--gpu-gib", "140", "--tol", "0.25", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BPT multiplier seqpar / plain" in proc.stdout
    (js,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    data = json.load(open(tmp_path / js))
    res = data["results"]
    # Estimates of the passing max fit in 90% of 140 GiB; the multiplier is a large factor (ring x2,
    # checkpointing, chunked FFN and loss), and every failing probe is longer than the max.
    for name in ("seqpar", "plain"):
        assert 0 < res[name]["max_seq_len"] and res[name]["est_at_max"] <= 0.9 * 140
        assert all(h["seq_len"] > res[name]["max_seq_len"] for h in res[name]["history"] if not h["ok"])
    assert data["bpt_multiplier"]["seqpar"] > 8
    assert any(p.endswith(".png") for p in os.listdir(tmp_path))


def test_cp_modes_report_and_predictions(tmp_path):
    """bench_cp_modes: efficiency against the same run's single-GPU row of the same kernel and KV heads,
    torch CP against cuDNN; the prediction comes from seqpar.parallel.cost for the measured shape."""
    modes = pytest.importorskip("bench_cp_modes")
    s = 32768
    t = lambda ms, w: modes.flops(s) / w / (ms * 1e-3) / 1e12
    row = lambda mode, kernel, w, kv, ms, err=None: dict(
        mode=mode, kernel=kernel, world_size=w, seq=s, kv_heads=kv, ms=ms, error=err, peak_gib=1.0,
        tflops_per_gpu=None if err else t(ms, w), predicted=modes.predicted(mode, kernel, w, s, kv))
    rows = [row("single", "sdpa_cudnn", 1, 32, 40.0), row("single", "sdpa_cudnn", 1, 8, 38.0),
            row("ulysses", "sdpa_cudnn", 2, 32, 21.0), row("ring", "sdpa_cudnn", 2, 8, 22.0),
            row("torch_cp", "cudnn+allgather", 2, 32, 24.0), row("allgather", "sdpa_cudnn", 2, 32, None, "ValueError")]
    md = modes.write(str(tmp_path), {"device": "NVIDIA H200", "gpus": 2, "torch": "t", "date": "2026-11-28 19:00 UTC"},
                     rows)
    assert rows[2]["efficiency"] == pytest.approx(40.0 / (2 * 21.0))
    assert rows[3]["efficiency"] == pytest.approx(38.0 / (2 * 22.0))  # GQA row against the GQA single row
    assert rows[4]["efficiency"] == pytest.approx(40.0 / (2 * 24.0))  # torch CP against cuDNN
    assert rows[5]["efficiency"] is None and "ValueError" in md
    assert rows[0]["predicted"] is None and 0.5 < rows[2]["predicted"] <= 1.05
    from seqpar.parallel import cost

    shape, cl = cost.AttnShape(seq_len=s, heads=32, kv_heads=8), cost.Cluster(gpus=2, kernel="sdpa_cudnn")
    assert rows[3]["predicted"] == pytest.approx(cost.ideal_time(shape, cl) / cost.mode_time("ring", shape, cl)["time"])
    assert json.load(open(tmp_path / "cp_modes_NVIDIA-H200_x2_2026-11-28.json"))["rows"][2]["mode"] == "ulysses"
    # an A/B row of the overlap setting: its prediction uses the same setting, and the table names it
    four = modes.predicted("ulysses", "sdpa_cudnn", 2, s, 8, overlap=4)
    one = modes.predicted("ulysses", "sdpa_cudnn", 2, s, 8, overlap=1)
    assert four != one and one == modes.predicted("ulysses", "sdpa_cudnn", 2, s, 8)  # the default: unchunked
    assert modes.predicted("allgather", "sdpa_cudnn", 2, s, 8, overlap=1) != modes.predicted(
        "allgather", "sdpa_cudnn", 2, s, 8, overlap=4)
    ab = [dict(rows[2], overlap=4, ms=20.0)]
    assert "| ulysses | sdpa_cudnn | 2 | 32k | 32 | 4 |" in modes.write(str(tmp_path / "ab"), {
        "device": "NVIDIA H200", "gpus": 2, "torch": "t", "date": "2026-11-28 19:00 UTC"}, rows[:1] + ab)


def test_tile_sweep_picks_and_summary():
    """bench_tiles: every grid tile is a launchable config of its kernel; the best tile per kernel is the lowest
    mean over repeats; the composites add the kernels (plus the delta pass) and compare with cuDNN's run."""
    tiles = pytest.importorskip("bench_tiles")
    from seqpar.ops.attention.triton import fwd

    jobs = list(tiles.tasks([128]))
    assert {j[0] for j in jobs} == set(tiles.MATMULS) and all(j[3] in (False, True) for j in jobs if j[0] == "dkdv")
    saved = fwd.FWD_CONFIGS[128]
    with tiles.pinned("fwd", 128, (64, 64, 4, 3)):
        (cfg,) = fwd.FWD_CONFIGS[128]
        assert (cfg.kwargs["BLOCK_M"], cfg.num_warps) == (64, 4)
    assert fwd.FWD_CONFIGS[128] is saved and tiles._listed("fwd", 128, (128, 64, 8, 3))
    assert not tiles._listed("fwd", 128, (64, 64, 4, 3))

    def rec(kernel, tile, tma, ms, rep, listed):
        return dict(kernel=kernel, head_dim=128, tile=tile, tma=tma, rep=rep, seq=16384, batch=4, heads=32,
                    listed=listed, ms=ms, others={"pre": 0.5} if kernel == "dq" else {})

    records = [rec("fwd", "128x64x8x3", None, 10.0, 0, True), rec("fwd", "64x64x4x3", None, 9.0, 0, False),
               rec("dkdv", "64x128x8x3", True, 20.0, 0, True), rec("dkdv", "64x64x4x2", True, 17.0, 0, False),
               rec("dkdv", "64x64x4x2", True, 21.0, 1, False),  # mean 19.0: still the best, by its mean
               rec("dq", "128x64x8x3", None, 12.0, 0, True),
               dict(kernel="dkdv", head_dim=128, tile="64x32x4x3", tma=False, rep=0, listed=False, error="OutOfRes"),
               dict(kernel="fwdbwd", impl="sdpa_cudnn", head_dim=128, seq=16384, batch=4, heads=32, ms=33.0,
                    tflops=500.0)]
    assert tiles.picks(records, 128, "best")["dkdv"] == ("64x64x4x2", True, 19.0)
    assert tiles.picks(records, 128, "listed")["fwd"][0] == "128x64x8x3"
    records.insert(0, rec("dkdv_atomic", "64x128x8x3", True, 25.0, 0, True))  # the atomic-dQ composite
    rows = {r["what"].split(" (")[0]: r for r in tiles.summary(records, [128])}
    assert rows["kernels, dQ kernel, listed tiles"]["ms"] == pytest.approx(10.0 + 20.0 + 12.0 + 0.5)
    assert rows["kernels, dQ kernel, best tiles"]["ms"] == pytest.approx(9.0 + 19.0 + 12.0 + 0.5)
    assert rows["kernels, dQ kernel, best tiles"]["vs_cudnn"] == pytest.approx(33.0 / 40.5, abs=1e-3)
    assert rows["kernels, atomic dQ, best tiles"]["ms"] == pytest.approx(9.0 + 25.0)  # no dQ kernel, no delta here
    assert tiles.MATMULS["dkdv_atomic"] == 5 and tiles.tables()["dkdv_atomic"] is tiles.tables()["dkdv"]
    md = tiles.markdown(records, tiles.summary(records, [128]), dict(device="d", torch="t", triton="3", date="x"))
    assert "OutOfRes" in md and md.index("## fwd+bwd") > md.index("64x64x4x2")
