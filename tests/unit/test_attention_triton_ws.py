"""The warp-specialized (WS) variants of the Triton forward and dQ kernels (seqpar/ops/attention/triton/ws.py).

On the CPU the WS code path (descriptor loads, one masked loop, lse/delta/row bounds by 1-D descriptors)
runs in triton's interpreter with the selection forced (``ws_mode`` patched to 2 in the child: the
production interpreter path never selects WS); the warp specialization itself is a GPU compiler pass
(benchmarks/bench_ws.py checks it on sm90). Candidate selection and ``ws_mode`` are checked directly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# name -> (B, S, H, Hkv, D, mask kwargs); fp16 (the interpreter's bf16 dot is wrong). S = 257: ragged, and
# not a multiple of 4, so the dQ kernel falls back to its plain variant while the forward stays WS.
CASES = {
    "d64_causal": (1, 260, 2, 2, 64, dict(causal=True)),
    "d64_full_ragged": (1, 257, 2, 1, 64, {}),
    "d128_causal_gqa": (1, 200, 4, 1, 128, dict(causal=True)),
    "d64_docs": (2, 300, 2, 2, 64, dict(causal=True, docs=[100, 70, 130])),
    "d64_window": (1, 260, 2, 2, 64, dict(causal=True, window_left=50)),
}


def _child():
    sys.path.insert(0, ROOT)
    from seqpar.ops.attention import reference as R
    from seqpar.ops.attention.mask import LocalMask
    from seqpar.ops.attention.triton import bwd_launch as BL, fwd as F, function as T
    calls = []
    force = lambda *a, **k: calls.append(1) or 2
    F.ws_mode, BL.ws_mode = force, force
    results = {}
    for i, (name, (b, s, h, hkv, d, opts)) in enumerate(CASES.items()):
        g = torch.Generator().manual_seed(i)
        mk = lambda heads: torch.randn(b, s, heads, d, generator=g).to(torch.float16)
        q, k, v, do = mk(h), mk(hkv), mk(hkv), mk(h)
        opts = dict(opts)
        docs = opts.pop("docs", None)
        if docs:
            ids = torch.cat([torch.full((n,), j) for j, n in enumerate(docs)])[None].expand(b, s).contiguous()
            opts.update(q_doc_ids=ids, k_doc_ids=ids)
        m = LocalMask(**opts)
        calls.clear()
        o, lse = T.forward(q, k, v, m)
        dq, dk, dv = T.backward(do, q, k, v, o, lse, m, dq_mode="kernel")
        ro, rl = R.forward(q.double(), k.double(), v.double(), m)
        ref = (ro, rl, *R.backward(do.double(), q.double(), k.double(), v.double(), ro, rl, m))
        errs = [f"{n} rel {e:.1e}" for n, a, r in zip(("out", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref)
                if not (e := ((a.double() - r).norm() / r.norm()).item()) < 2e-3]
        want = 1 if s % 4 else 2  # forward always; the dQ kernel when Sq % 4 == 0
        if len(calls) != want:
            errs.append(f"WS selected {len(calls)} times, expected {want}")
        results[name] = errs
    print(json.dumps(results))


@pytest.mark.timeout(300)
def test_ws_kernels_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("SEQPAR_TRITON_WS", None)
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=290)
    assert r.returncode == 0, r.stderr[-4000:]
    failed = {k: v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items() if v}
    assert not failed, json.dumps(failed, indent=1)


def test_ws_candidates():
    """Which configs the autotuner sees per ws_mode (0 plain, 1 both, 2 WS only); plain ones keep their names."""
    from seqpar.ops.attention.triton import bwd_dq as BQ, fwd as F, ws as W
    q16, q32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    for pick, table in ((F.fwd_candidates, W.FWD_WS_CONFIGS), (BQ.dq_candidates, W.DQ_WS_CONFIGS)):
        got = lambda mode, d=128, tuned=1, q=q16: [c.kwargs.get("WARP_SPEC", False) for c in
                                                   pick(dict(Q=q, HEAD_DIM=d, tune_size=tuned, ws_mode=mode))]
        assert got(0) and not any(got(0))
        assert got(2) == [True] * len(table[128])
        assert got(1) == got(0) + got(2)
        assert got(2, tuned=0) == [True] and got(1, tuned=0) == [False]
        assert not any(got(2, d=256)) and not any(got(2, q=q32))  # no WS tile listed / fp32 tests
    for table in (W.FWD_WS_CONFIGS, W.DQ_WS_CONFIGS):
        assert all(c.num_warps == 4 and c.kwargs["BLOCK_M"] == 128 for cfgs in table.values() for c in cfgs)


def test_ws_mode_cpu_and_env(monkeypatch):
    """Never on CPU tensors or in the interpreter; the environment is read per call; False wins."""
    from seqpar.ops.attention.triton import ws as W
    x = torch.zeros(1, 8, 2, 16, dtype=torch.float16)
    for env in ("1", "tune", "0", ""):
        monkeypatch.setenv(W.WS_ENV, env)
        assert W.ws_mode(x, x, x) == 0
    assert W.env_ws(False) is False and W.env_ws(True) is True
    monkeypatch.setenv(W.WS_ENV, "tune")
    assert W.env_ws(None) == "tune"
    monkeypatch.setenv(W.WS_ENV, "0")
    assert W.env_ws(None) is False and W.env_ws(True) is True
    narrow = torch.zeros(1, 8, 2, 18, dtype=torch.float16)[..., :16]  # 36-byte head stride
    assert W.descriptor_ok(x) and not W.descriptor_ok(narrow)


if __name__ == "__main__":
    _child()
