"""Triton kernels with every Mask kind, against the float64 naive attention with the mask written out pair by
pair (tests/reference.py:mask_matrix): random documents (one-token documents, documents across tiles, one
document filling everything), windows smaller and larger than a tile, sinks, random block-sparse layouts
(block sizes that are not multiples of the tiles, block rows that see nothing), strides (striped shards),
offsets, GQA, causal and not, fp32 and fp16; forward, lse and every gradient (both dQ modes). Plus the
tile counters that prove masked-out tiles are never loaded.

One group, one interpreter child process (see test_attention_triton.py for why children).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
F32, F16 = torch.float32, torch.float16
def _docs(b, s, seed, n_docs):
    """[B, S] random non-decreasing doc ids: boundaries anywhere (one-token documents, documents across tiles)."""
    g = torch.Generator().manual_seed(seed)
    cuts = [sorted(torch.randperm(s - 1, generator=g)[:n_docs - 1].add(1).tolist()) for _ in range(b)]
    return [[sum(i >= c for c in row) for i in range(s)] for row in cuts]


def _layout(n, seed, p=0.5, empty_row=None):
    """A random [n, n] block-sparse layout (optionally with one all-False block row: rows that see no key)."""
    vis = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < p
    if empty_row is not None:
        vis[empty_row] = False
    return vis.tolist()


# Mask kinds through Mask.local (global semantics, strides): name -> (B, Sq, Sk, H, Hkv, D, dtype, opts) with
# opts = dict(mask=Mask kwargs, S=global length, q=(offset, stride), k=(offset, stride)). Judged against the
# float64 naive attention with the pair-by-pair mask of tests/reference.py:mask_matrix.
ONE_TOKEN_DOCS = [list(range(40))]
MASK_GROUP = {
    "docs_random_causal": (2, 48, 48, 2, 1, 32, F32, dict(mask=dict(causal=True, doc_ids=_docs(2, 48, 1, 6)))),
    "docs_random_gqa4": (2, 45, 45, 4, 1, 16, F32, dict(mask=dict(causal=False, doc_ids=_docs(2, 45, 2, 4)))),
    "docs_one_token_each": (1, 40, 40, 2, 2, 16, F32, dict(mask=dict(causal=True, doc_ids=ONE_TOKEN_DOCS))),
    "docs_one_fills_all": (1, 40, 40, 2, 1, 16, F32, dict(mask=dict(causal=False, doc_ids=[[3] * 40]))),
    "docs_offsets_rows_empty": (2, 20, 24, 2, 1, 16, F32, dict(mask=dict(causal=True, doc_ids=_docs(2, 60, 3, 5)),
                                                                S=60, q=(36, 1), k=(4, 1))),
    "window3_docs_causal": (2, 48, 48, 2, 1, 16, F32, dict(mask=dict(causal=True, window=3, doc_ids=_docs(2, 48, 4, 5)))),
    "window40_two_sided": (1, 64, 64, 2, 1, 16, F32, dict(mask=dict(causal=False, window=40))),
    "window5_two_sided_docs": (2, 40, 40, 2, 2, 16, F32, dict(mask=dict(causal=False, window=5, doc_ids=_docs(2, 40, 5, 3)))),
    "sinks_causal": (1, 64, 64, 2, 1, 16, F32, dict(mask=dict(causal=True, window=5, sinks=3))),
    "sinks_docs_causal": (2, 48, 48, 4, 2, 16, F32, dict(mask=dict(causal=True, window=4, sinks=2,
                                                                     doc_ids=_docs(2, 48, 6, 4)))),
    "sinks_two_sided_docs": (2, 40, 40, 2, 1, 16, F32, dict(mask=dict(causal=False, window=3, sinks=2,
                                                                        doc_ids=_docs(2, 40, 7, 3)))),
    "sinks_offsets": (1, 30, 50, 2, 1, 16, F32, dict(mask=dict(causal=True, window=6, sinks=4), S=80, q=(45, 1),
                                                     k=(0, 1))),
    "block7_causal_empty_rows": (1, 49, 49, 2, 1, 16, F32, dict(mask=dict(causal=True, block_sparse=(7, _layout(7, 8, 0.5, 2))))),
    "block20_docs": (2, 60, 60, 2, 1, 16, F32, dict(mask=dict(causal=False, doc_ids=_docs(2, 60, 9, 4),
                                                              block_sparse=(20, _layout(3, 9, 0.6))))),
    "block16_aligned_gqa": (1, 64, 64, 4, 1, 16, F32, dict(mask=dict(causal=True, block_sparse=(16, _layout(4, 10, 0.5))))),
    "striped_causal_docs": (2, 16, 16, 2, 1, 16, F32, dict(mask=dict(causal=True, doc_ids=_docs(2, 48, 11, 4)),
                                                           S=48, q=(1, 3), k=(2, 3))),
    "striped_window_sinks": (1, 20, 20, 2, 1, 16, F32, dict(mask=dict(causal=True, window=7, sinks=2), S=40,
                                                            q=(1, 2), k=(0, 2))),
    "strided_q2_k1_block": (1, 24, 40, 2, 1, 16, F32, dict(mask=dict(causal=True, block_sparse=(5, _layout(10, 12, 0.6))),
                                                           S=50, q=(2, 2), k=(3, 1))),
    "strided_two_sided": (1, 20, 25, 2, 2, 16, F32, dict(mask=dict(causal=False, window=9), S=60, q=(1, 3), k=(0, 2))),
    "everything_fp16": (2, 48, 48, 4, 2, 32, F16, dict(mask=dict(causal=True, window=6, sinks=2, doc_ids=_docs(2, 48, 13, 4),
                                                                 block_sparse=(12, _layout(4, 13, 0.7))))),
    "docs_sinks_fp16_striped": (2, 24, 24, 2, 1, 16, F16, dict(mask=dict(causal=False, window=5, sinks=1,
                                                                         doc_ids=_docs(2, 48, 14, 3)),
                                                               S=48, q=(0, 2), k=(1, 2))),
}


# Tile skipping, proved by the kernels' tile counters: name -> whether the loaded tiles must be exactly the
# tiles holding a visible pair (documents, block-sparse, windows: the bounds are exact there), or only a
# superset strictly smaller than the dense count (sinks: a tile's rows share one sink interval; strides:
# the bounds are conservative).
SKIP_CASES = {"docs_random_causal": True, "docs_random_gqa4": True, "docs_one_token_each": True,
              "window3_docs_causal": True, "window5_two_sided_docs": True, "block7_causal_empty_rows": True,
              "block20_docs": True, "block16_aligned_gqa": True, "sinks_causal": False, "sinks_docs_causal": False,
              "sinks_offsets": False, "strided_q2_k1_block": False}


def _needed_tiles(vis, rows_per_tile, keys_per_tile):
    """[B, n_row_tiles, n_key_tiles] bool: the tile pair holds a visible (row, key) pair; vis [B, R, K]."""
    b, r, k = vis.shape
    nr, nk = -(-r // rows_per_tile), -(-k // keys_per_tile)
    pad = torch.zeros(b, nr * rows_per_tile, nk * keys_per_tile, dtype=torch.bool)
    pad[:, :r, :k] = vis
    return pad.view(b, nr, rows_per_tile, nk, keys_per_tile).any(4).any(2)


def _check_tile_counts():
    """Loaded key tiles per forward program and (query tile, head) steps per dK/dV program vs the tiles
    that hold a visible pair: masked-out tiles are never loaded."""
    from reference import global_mask_case
    from seqpar.ops.attention.triton.bwd import INTERPRET_DKDV_CONFIG
    from seqpar.ops.attention.triton.bwd_launch import attention_bwd_launch
    from seqpar.ops.attention.triton.fwd import INTERPRET_FWD_CONFIG, attention_fwd_launch
    errs = []
    fm, fn = INTERPRET_FWD_CONFIG.kwargs["BLOCK_M"], INTERPRET_FWD_CONFIG.kwargs["BLOCK_N"]
    bm, bn = INTERPRET_DKDV_CONFIG.kwargs["BLOCK_M"], INTERPRET_DKDV_CONFIG.kwargs["BLOCK_N"]
    for name, exact in SKIP_CASES.items():
        spec = MASK_GROUP[name]
        b, sq, sk, h, hkv = spec[:5]
        q, k, v, dout, _ = _inputs(spec, 5)
        local, kw = global_mask_case(spec)
        vis = kw["visible"]
        fwd_counts = torch.zeros(b * h, -(-sq // fm), dtype=torch.int32)
        out, lse = attention_fwd_launch(q, k, v, local, softmax_scale=None, tile_counts=fwd_counts)
        need = _needed_tiles(vis, fm, fn).sum(-1)  # [B, n_q_tiles]
        got = fwd_counts.view(b, h, -1)
        kv_counts = torch.zeros(b * hkv, -(-sk // bn), dtype=torch.int32)
        attention_bwd_launch(dout, q, k, v, out, lse, local, softmax_scale=None, dq_mode="kernel", tile_counts=kv_counts)
        kv_need = _needed_tiles(vis.transpose(1, 2), bn, bm).sum(-1) * (h // hkv)  # [B, n_k_tiles]
        kv_got = kv_counts.view(b, hkv, -1)
        for what, g, n, dense in (("forward", got, need[:, None], got[0, 0].numel() * -(-sk // fn)),
                                  ("dK/dV", kv_got, kv_need[:, None], kv_got[0, 0].numel() * -(-sq // bm) * (h // hkv))):
            n = n.expand_as(g)
            if exact and not torch.equal(g, n.to(g.dtype)):
                errs.append(f"{name}: {what} loaded tiles {g[:, 0].tolist()} != tiles with a visible pair {n[:, 0].tolist()}")
            below = (g.sum((1, 2)) < dense * g.shape[1]) | (n.sum((1, 2)) == dense * g.shape[1])  # skips where it can
            if not exact and (bool((g < n).any()) or not bool(below.all())):
                errs.append(f"{name}: {what} loaded tiles {g[:, 0].tolist()} must cover {n[:, 0].tolist()} and stay "
                            f"below the dense {dense} per head")
    return errs




def _child_main() -> None:
    """Entry in the interpreter subprocess: every case, then the tile counters; {case: [errors]} last."""
    sys.path[:0] = [ROOT, TESTS, HERE]
    from test_attention_triton import _check_case
    results = {}
    for i, (name, spec) in enumerate(MASK_GROUP.items()):
        mode = ("kernel", "atomic")[i % 2]
        try:
            results[f"{name}[{mode}]"] = _check_case(spec, 2000 + i, mode)
        except Exception as e:  # report, don't hide, the rest of the group
            results[f"{name}[{mode}]"] = [f"raised {type(e).__name__}: {e}"]
    try:
        results["tile_counts"] = _check_tile_counts()
    except Exception as e:
        results["tile_counts"] = [f"raised {type(e).__name__}: {e}"]
    print(json.dumps(results))


def _inputs(spec, seed):
    from test_attention_triton import _inputs as inputs
    return inputs(spec, seed)


@pytest.mark.timeout(240)
def test_interpreter_mask_kinds():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, TESTS, HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("SEQPAR_TRITON_TMA", None)
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=230)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == len(MASK_GROUP) + 1
    failed = {name: errs for name, errs in results.items() if errs}
    assert not failed, json.dumps(failed, indent=1)


def test_host_bounds_are_the_document_intervals():
    """The per-row key intervals the kernels take are exactly the same-document keys (ids non-decreasing),
    with the sink prefix and the block-sparse extent; empty ones are [n, 0)."""
    from seqpar.ops import Mask
    from seqpar.ops.attention.triton.bounds import col_bounds, row_bounds
    docs = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 3, 3, 3]])
    lm = Mask(window=1, sinks=2, doc_ids=docs).local(4, 6, 0, 10)
    rows = row_bounds(lm, 1, 6, 10, "cpu")[0]  # [4, Sq]: key lo, hi, sink lo, hi of rows 4..9
    assert rows[0].tolist() == [2, 2, 6, 7, 7, 7] and rows[1].tolist() == [6, 6, 7, 10, 10, 10]
    assert rows[2].tolist() == [2, 2, 6, 7, 7, 7] and rows[3].tolist() == [4, 4, 7, 9, 9, 9]
    cols = col_bounds(lm, 1, 6, 10, "cpu")[0]  # [3, Sk]: row lo, hi, sink flag of keys 0..9
    assert cols[0].tolist() == [6, 6, 0, 0, 0, 0, 2, 3, 3, 3] and cols[1].tolist() == [0, 0, 2, 2, 2, 2, 3, 6, 6, 6]
    assert cols[2].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 1, 0]
    layout = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)  # block 1 sees nothing
    rows = row_bounds(Mask(block_sparse=(4, layout)).local(0, 12, 0, 12), 1, 12, 12, "cpu")[0]
    assert rows[0].tolist() == [0] * 4 + [12] * 4 + [0] * 4 and rows[1].tolist() == [4] * 4 + [0] * 4 + [12] * 4


if __name__ == "__main__":
    _child_main()
