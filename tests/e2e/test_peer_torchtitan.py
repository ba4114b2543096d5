"""torchtitan as bench_train's same-run peer (issue 17): its step lines are read back exactly, its rows use
seqpar's FLOP formula, only comparable configs get a row, and the real bundle's pre-flight runs through
the same code path (skipped where the bundle is not on disk)."""
import dataclasses
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train  # noqa: E402
import peer_torchtitan  # noqa: E402

# torchtitan 0.3.0's step line (components/metrics.py), as torchrun's "--role rank --tee 3" prints it, colours on.
LINE = ("[rank0]:[titan] 2026-11-28 10:00:0{s},000 - root - INFO - \x1b[31mstep: {s:2}  \x1b[32mloss: {loss:8.5f}  "
        "\x1b[33mgrad_norm: {gn:7.4f}  \x1b[34mmemory: {mem:5.2f}GiB({pct:.2f}%)  \x1b[34mtps: {tps:,}  "
        "\x1b[36mtflops: {tfl:,.2f}  \x1b[35mmfu: {mfu}\x1b[39m")


def _log(rows):
    return "\n".join(["=== tt_llama3_1b_cp_ngpu2_cp2_seq65536", "CONFIG_OK"]
                     + [LINE.format(s=s, loss=l, gn=1.5, mem=m, pct=50.0, tps=t, tfl=f, mfu=u) for s, l, m, t, f, u in rows])


def _cfg(**over):
    from seqpar.cli import load_config

    return load_config(["model=llama3-1b", "train.seq_len=65536", "train.batch_size=1", "data.doc_mask=false",
                        "parallel.cp=2", *over.get("args", [])])


def test_step_lines_are_read_back_exactly():
    text = _log([(1, 12.1, 60.5, 3100, 140.3, "14.19%"), (2, 11.9, 67.9, 12000, 543.21, "54.93%"),
                 (2, 11.8, 67.9, 12124, 548.75, "55.49%"), (3, 11.5, 66.0, 12200, 552.2, "N/A")])
    steps = peer_torchtitan.parse_steps(text + "\nstep: garbage\n")
    assert [s["step"] for s in steps] == [1, 2, 3]  # a step logged twice keeps its last line
    assert steps[1] == {"step": 2, "loss": 11.8, "grad_norm": 1.5, "mem_gib": 67.9, "tps": 12124.0, "tflops": 548.75,
                        "mfu": pytest.approx(0.5549)}
    assert steps[2]["mfu"] is None and steps[0]["tps"] == 3100.0


def test_rows_use_seqpar_flops_and_leave_out_the_warmup():
    cfg = _cfg()
    fpt = peer_torchtitan.flops_per_token(cfg.model, 65536)
    per_layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192  # wq wo, wk wv (8 KV heads x 64), w1-3
    assert fpt == 6 * (16 * per_layer + 128256 * 2048) + 6 * 16 * 2048 * 65536  # causal half of attention
    steps = peer_torchtitan.parse_steps(_log([(1, 12.0, 60.0, 1000, 1.0, "1.00%"), (2, 11.0, 61.0, 10000, 2.0, "2.00%"),
                                              (3, 10.0, 62.5, 14000, 4.0, "4.00%")]))
    rec = peer_torchtitan.summarize(steps, 1, seq_len=65536, cp=2, flops=fpt, peak_tflops=989.0)
    assert rec["steps_timed"] == 2 and rec["tokens_per_s_per_gpu"] == 12000.0
    assert rec["tflops_per_gpu"] == round(fpt * 12000 / 1e12, 1)
    assert rec["mfu"] == round(fpt * 12000 / 989e12, 4) and rec["tt_mfu"] == 0.03 and rec["tt_tflops"] == 3.0
    assert rec["step_time_s"] == round((65536 / 20000 + 65536 / 28000) / 2, 3)  # one sequence over cp=2 GPUs
    assert rec["peak_mem_gib"] == 62.5  # warm-up steps count for the peak
    assert peer_torchtitan.summarize(steps, 3, seq_len=65536, cp=2, flops=fpt, peak_tflops=0)["steps"] == [1, 2, 3]


def test_only_the_same_training_gets_a_peer_row():
    assert peer_torchtitan.unsupported(_cfg(), 2) is None
    assert "doc_mask" in peer_torchtitan.unsupported(_cfg(args=["data.doc_mask=true"]), 2)
    assert "window" in peer_torchtitan.unsupported(_cfg(args=["model.window=4096"]), 2)
    assert "n_layers" in peer_torchtitan.unsupported(_cfg(args=["model.n_layers=4"]), 2)
    assert "batch_size" in peer_torchtitan.unsupported(_cfg(args=["train.batch_size=2"]), 2)
    tiny = dataclasses.replace(_cfg(), model=dataclasses.replace(_cfg().model, dim=64))
    assert "dim" in peer_torchtitan.unsupported(tiny, 2)


def test_the_report_puts_the_ratio_under_the_table(monkeypatch):
    ours = {"name": "llama3-1b_strong_x2", "dp": 1, "cp": 2, "seq_len": 65536, "ac": "selective", "status": "ok",
            "tokens_per_s_per_gpu": 22000.0, "args": ["model=llama3-1b", "train.seq_len=65536", "train.batch_size=1",
                                                                     "data.doc_mask=false", "parallel.cp=2"]}
    args = types.SimpleNamespace(steps=4, warmup=1, out="", peer_timeout=1, peer_dry_run=False)
    monkeypatch.setattr(peer_torchtitan, "run", lambda *a, **k: {**ours, "name": a[1], "peer": "torchtitan",
                                                                  "tokens_per_s_per_gpu": 11000.0})
    peer = bench_train._peer_run("bundle", ours, 2, args)
    skipped = bench_train._peer_run("bundle", {**ours, "name": "docs", "args": ours["args"] + ["data.doc_mask=true"]},
                                    2, args)
    assert skipped["status"] == "not comparable"
    md = bench_train.markdown({"gpus": 2, "device": "H200"}, [ours, peer, skipped])
    assert "llama3-1b_strong_x2: seqpar / torchtitan tokens/s = 2.00x" in md
    assert "| docs_torchtitan | dp=1 cp=2 | 65,536 |" in md and "no peer row: packed documents" in md


@pytest.mark.timeout(300)
def test_the_real_bundle_passes_its_preflight_through_this_path(tmp_path, monkeypatch):
    try:
        bundle = peer_torchtitan.find_bundle()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with pytest.raises(FileNotFoundError, match="--peer-bundle"):
        peer_torchtitan.find_bundle(str(tmp_path / "nowhere"))
    monkeypatch.setenv("VENV", str(tmp_path / "venv"))
    rec = peer_torchtitan.run(bundle, "tt_dry", _cfg(args=["train.seq_len=4096"]), nproc=2, steps=2, warmup=1,
                              out_dir=str(tmp_path), timeout_s=240, peak_tflops=0.0, python=sys.executable, dry_run=True)
    assert rec["status"] == "dry run", open(os.path.join(rec["log_dir"], "run.log")).read()[-2000:]
    log = open(os.path.join(rec["log_dir"], "tt_llama3_1b_cp_ngpu2_cp2_seq4096.log")).read()
    assert "seq_len 4096" in log and "cp 2" in log
    with pytest.raises(FileExistsError):  # a second run of the same name never reads the first one's lines
        peer_torchtitan.run(bundle, "tt_dry", _cfg(), nproc=2, steps=2, warmup=1, out_dir=str(tmp_path), timeout_s=5,
                            peak_tflops=0.0, python=sys.executable, dry_run=True)
