"""wandb for real: ``logging.wandb=true`` without an API key writes an OFFLINE run (no account, no network) whose
history holds exactly the metrics of ``metrics.jsonl``, read back from the run's own ``.wandb`` file with wandb's
protobuf definitions; and without the package, one ``error:`` line and exit 2.

wandb (>= 0.2x) writes runs from its Go core and ships no Python reader, so :func:`read_wandb_records` undoes the
file's framing itself: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB
blocks (7-byte record headers: crc32c, length, type FULL/FIRST/MIDDLE/LAST), each record one
``wandb_internal_pb2.Record``."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=64",
        "train.batch_size=4", "train.device=cpu", "train.eval_every=0", "data.max_bytes=200000",
        "logging.progress=false", "logging.log_every=1"]
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path):
    """Every ``Record`` protobuf of a ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", buf[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, hex(magic), version)
    records, parts, pos = [], b"", _HEADER
    while pos + _HEADER <= len(buf):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos:pos + _HEADER])
        data = buf[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero fill
            continue
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), f"bad record type {kind} at {pos}"
        parts = data if kind in (_FULL, _FIRST) else parts + data
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


def wandb_history(records):
    """{step: {key: value}} from the history records (wandb's own ``_step``/``_runtime``/``_timestamp`` dropped)."""
    out = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out[rec.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no key: offline
    # wandb's own settings, cache and artifacts go to the test folder, never to ~/.config or ~/.cache.
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-data"), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.timeout(180)
def test_wandb_offline_run_holds_the_logged_metrics(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (it is in the `test` extra: pip install -e '.[test]')")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *TINY, "train.steps=4", "logging.wandb=true",
                           f"logging.run_dir={run_dir}"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, (runs, proc.stdout[-2000:])  # offline (no key), under the run directory
    records = read_wandb_records(runs[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and kinds[-1] == "exit", kinds
    assert records[-1].exit.exit_code == 0
    history = wandb_history(records)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
    assert sorted(history) == [1, 2, 3, 4], history
    for rec in jsonl:
        numeric = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(numeric)
        # Exact: both sides are the same float64 written as shortest round-trip JSON.
        assert history[rec["step"]] == numeric, (rec["step"], history[rec["step"]], numeric)


@pytest.mark.timeout(120)
def test_wandb_missing_package_is_one_error_line(tmp_path):
    # A `wandb` module that fails to import, first on the path: the machine may well have the real one.
    shim = tmp_path / "no_wandb"
    shim.mkdir()
    (shim / "wandb.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    env = _env(tmp_path, PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "train.py", *TINY, "train.steps=2", "logging.wandb=true",
                           f"logging.run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "wandb" in lines[0], proc.stderr
    assert "pip install" in lines[0] and "logging.wandb=false" in lines[0], lines[0]
