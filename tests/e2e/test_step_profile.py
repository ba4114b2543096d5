"""``logging.profile_at`` (issue 17: account for every part of a step): the profiled steps' time is split by part
of the model, backward ops count where their forward op belongs, the model is left as it was, and a cp=2 run on
gloo shows its ring communication on both ranks."""
import dataclasses
import json
import os
import sys

import pytest
import torch

from dist_utils import run_distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_run import tiny_config  # noqa: E402


def _cfg(run_dir, cp=1, **logging):
    cfg = tiny_config(run_dir, steps=4)
    return dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, profile_at=2, profile_steps=2, **logging),
                               parallel=dataclasses.replace(cfg.parallel, cp=cp, attention_backend="torch"))


def test_backward_ops_count_where_their_forward_op_belongs():
    from seqpar.train.profile import categorize

    x = torch.randn(32, 48, requires_grad=True)
    w = torch.randn(48, 40, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("seqpar.norm"):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        with torch.profiler.record_function("seqpar.loss"):
            loss = (y @ w).logsumexp(-1).sum()
        loss.backward()
        torch.optim.SGD([x, w], lr=0.1).step()
    cats = {}
    for e, _, _, c in categorize(prof.events()):
        node = e
        while node is not None and not node.name.startswith("autograd::engine::evaluate_function: "):
            node = node.cpu_parent
        if node is not None:
            cats.setdefault(node.name.split(": ", 1)[1], set()).add(c)
    assert cats["RsqrtBackward0"] == {"norm"} and cats["PowBackward0"] == {"norm"}  # linked by sequence number
    assert cats["LogsumexpBackward0"] == {"loss"}
    assert {c for e, _, _, c in categorize(prof.events()) if e.name == "aten::mm"} == {"matmul"}  # whichever range
    assert cats["MmBackward0"] <= {"matmul", "loss"}  # its transposes/copies follow the forward matmul's range
    optim = {c for e, _, _, c in categorize(prof.events()) if e.cpu_parent and "Optimizer.step" in e.cpu_parent.name}
    assert optim == {"optimizer"}


def test_a_profiled_run_writes_its_breakdown_and_leaves_the_model_as_it_was(tmp_path):
    from seqpar.models.llama import RMSNorm
    from seqpar.parallel.mesh import init_mesh
    from seqpar.train import Trainer

    cfg = _cfg(tmp_path, profile_trace=True)
    trainer = Trainer(cfg, init_mesh(cfg.parallel, "cpu"))
    attn_fns = [m.attn_fn for m in trainer.model.modules() if hasattr(m, "attn_fn")]
    trainer.fit()
    rec = json.load(open(tmp_path / "profile" / "rank0.json"))
    assert (rec["first_step"], rec["last_step"], rec["device"], rec["steps"]) == (2, 3, "cpu", 2)
    ms = rec["ms_per_step"]
    for part in ("attention", "matmul", "norm", "rope", "mlp", "loss", "optimizer"):
        assert ms[part] > 0, (part, ms)
    assert ms["communication"] == 0  # one process
    assert sum(ms.values()) == pytest.approx(rec["busy_ms"], abs=0.01)
    assert 0 < rec["busy_ms"] <= rec["step_ms"] * 1.5  # one process, ops on one thread: about the wall time at most
    assert "| norm |" in (tmp_path / "profile" / "breakdown.md").read_text()
    assert json.load(open(tmp_path / "profile" / "rank0.trace.json"))["traceEvents"]
    model = trainer.model
    assert "loss" not in model.__dict__
    assert attn_fns and [m.attn_fn for m in model.modules() if hasattr(m, "attn_fn")] == attn_fns
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "rope_fn" not in m.__dict__ and not (isinstance(m, RMSNorm) and m.__dict__.get("_profile_ranges"))


def test_a_profile_cut_short_by_the_last_step_or_a_stop_is_still_written(tmp_path):
    from seqpar.parallel.mesh import init_mesh
    from seqpar.train import Trainer

    for name, (at, n, until), last in (("end", (4, 3, None), 4), ("stop", (2, 3, 3), 3)):
        cfg = _cfg(tmp_path / name)
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, profile_at=at, profile_steps=n))
        Trainer(cfg, init_mesh(cfg.parallel, "cpu")).fit(until=until)
        rec = json.load(open(tmp_path / name / "profile" / "rank0.json"))
        assert (rec["first_step"], rec["last_step"], rec["steps"]) == (at, last, last - at + 1), name


def test_profile_settings_are_checked():
    from seqpar.cli import load_config
    from seqpar.config import ConfigError

    with pytest.raises(ConfigError, match=r"logging.profile_at=9 is past train.steps=8: .* between 1 and 8"):
        load_config(["logging.profile_at=9", "train.steps=8"])

    with pytest.raises(ConfigError, match="logging.profile_at=-1 must be >= 0"):
        load_config(["logging.profile_at=-1"])
    with pytest.raises(ConfigError, match="logging.profile_steps"):
        load_config(["logging.profile_steps=0"])


def _cp_worker(rank, world, root):
    from seqpar.parallel.mesh import init_mesh
    from seqpar.train import Trainer

    cfg = _cfg(root, cp=2)
    Trainer(cfg, init_mesh(cfg.parallel, "cpu")).fit()
    return json.load(open(os.path.join(root, "profile", f"rank{rank}.json")))


@pytest.mark.timeout(180)
def test_each_rank_of_a_ring_reports_its_communication(tmp_path):
    recs = run_distributed(_cp_worker, 2, str(tmp_path), timeout_s=150)
    for rank, rec in enumerate(recs):
        assert rec["rank"] == rank and rec["ms_per_step"]["communication"] > 0, rec
        assert rec["ms_per_step"]["attention"] > 0


@pytest.mark.timeout(240)
def test_profile_step_puts_cases_side_by_side(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = "model=tiny train.seq_len=128 parallel.cp=2 data.max_bytes=300000 parallel.attention_backend=torch"
    proc = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--nproc", "2", "--out", str(tmp_path / "out"),
                           "--workdir", str(tmp_path / "wd"), "--steps", "1", "--warmup", "1", "--rank", "1",
                           "--case", f"dense={base} data.doc_mask=false", "--case", f"docs={base} data.doc_mask=true"],
                          cwd=root, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (js,) = [p for p in os.listdir(tmp_path / "out") if p.endswith(".json")]
    res = json.load(open(tmp_path / "out" / js))
    assert [c["name"] for c in res["cases"]] == ["dense", "docs"]
    for case in res["cases"]:
        assert [r["rank"] for r in case["ranks"]] == [0, 1]
        assert all(r["ms_per_step"]["communication"] > 0 and r["steps"] == 1 for r in case["ranks"])
    assert "| part | dense ms/step | dense % | docs ms/step | docs % |" in proc.stdout
    per_rank = [" / ".join(f"{r['ms_per_step']['attention']:.0f}" for r in c["ranks"]) for c in res["cases"]]
    assert f"Attention ms per step, rank by rank: dense {per_rank[0]}; docs {per_rank[1]}" in proc.stdout
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import profile_step

    assert list(profile_step.default_cases(1, 4096)) == ["dense causal", "packed documents"]
    two = profile_step.default_cases(2, 4096)  # cp > 1: the layout A/B for packed documents too
    assert two["packed documents, zigzag"] == two["packed documents"] + ["parallel.layout=zigzag"]
    bad = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--case", "nameless"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "NAME=" in bad.stderr
