"""Single-process checks of the ring plan (seqpar/parallel/ring_plan.py), the docs layout and the CPU-side
pieces of benchmarks/bench_masks.py: exact visibility of piece pairs against the naive boolean mask,
ring steps of a window on contiguous shards, document balance, and the masked work a benchmark prints."""
import math
import os
import sys

import pytest
import torch

from reference import mask_matrix
from seqpar.ops import Mask
from seqpar.parallel import docs_assignment, local_positions, rank_pieces, ring_work, visible_pairs_per_rank
from seqpar.parallel.ring_plan import build_plan

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

LAYOUTS = ("zigzag", "striped", "contiguous", "docs")
IDS = torch.tensor([[0] * 5 + [1] + [2] * 9 + [3] * 17, [0] * 16 + [1] * 16])  # [2, 32]
MASKS = {"docs": dict(doc_ids=IDS), "window3": dict(window=3), "window9-sinks": dict(window=9, sinks=2),
         "two-sided": dict(causal=False, window=4, doc_ids=IDS), "full-docs": dict(causal=False, doc_ids=IDS),
         "block-sparse": dict(doc_ids=IDS, block_sparse=(4, torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.4))}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_pieces_are_the_local_positions(layout, n):
    for r in range(n):
        pos = torch.cat([g0 + st * torch.arange(length) for g0, length, st in rank_pieces(32, r, n, layout, IDS)])
        assert pos.tolist() == local_positions(32, r, n, layout, doc_ids=IDS).tolist()


@pytest.mark.parametrize("name,layout", [(m, lay) for m in MASKS for lay in LAYOUTS
                                         if lay != "docs" or "doc_ids" in MASKS[m]])  # docs layouts need doc ids
@pytest.mark.parametrize("n", [2, 4])
def test_plan_calls_are_exactly_the_visible_blocks(name, layout, n):
    kw = MASKS[name]
    mask, vis = Mask(**kw), mask_matrix(2, 32, **{"causal": True, **kw})
    q = torch.empty(2, 32 // n, 1, 8)
    covered = torch.zeros(32, 32, dtype=torch.bool)  # union over rows: the plan is per batch
    for r in range(n):
        plan = build_plan(q, q, mask=mask, causal=False, layout=layout, rank=r, world_size=n, backend="torch")
        pos = local_positions(32, r, n, layout, doc_ids=IDS)
        for s in range(n):
            kpos = local_positions(32, (r - s) % n, n, layout, doc_ids=IDS)
            calls = plan.calls[s] if s < plan.steps else ()
            for c in calls:  # every call holds a visible pair ...
                qi, kj = pos[c.q_start:c.q_start + c.q_len], kpos[c.k_start:c.k_start + c.k_len]
                assert vis[:, qi][:, :, kj].any(), (r, s, c)
                covered[qi[:, None], kj[None, :]] = True
    assert not (vis.any(0) & ~covered).any()  # ... and every visible pair is in a call


@pytest.mark.parametrize("n", [2, 3, 4])
def test_window_on_contiguous_costs_ceil_w_over_m_steps(n):
    m = 8
    for w in (0, 1, 7, 8, 9, 16, 17, 100):
        work = ring_work(Mask(window=w), "contiguous", n, m)
        assert work["steps"] == 1 + min(math.ceil(w / m), n - 1), w
        assert work["calls"] == [1 + min(r, math.ceil(w / m)) for r in range(n)], w
    assert ring_work(Mask(causal=False, window=3), "contiguous", n, m)["steps"] == n  # right neighbours: full ring


def test_docs_layout_balances_documents_and_is_zigzag_for_one_document():
    assert docs_assignment(torch.zeros(1, 32, dtype=torch.long), 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]
    ids = torch.tensor([[0] * 24 + [1] * 4 + [2] * 4] * 2)
    mask = Mask(doc_ids=ids)
    docs, zig = visible_pairs_per_rank(mask, "docs", 2, 32), visible_pairs_per_rank(mask, "zigzag", 2, 32)
    assert sum(docs) == sum(zig) == int(mask_matrix(2, 32, doc_ids=ids).sum())
    assert max(docs) / min(docs) < max(zig) / min(zig)
    with pytest.raises(ValueError, match="doc_ids"):
        local_positions(32, 0, 2, "docs")


@pytest.mark.parametrize("name", MASKS)
def test_visible_pairs_per_rank_counts_the_mask(name):
    kw = MASKS[name]
    ref = mask_matrix(2, 32, **{"causal": True, **kw})
    for layout in ("zigzag", "contiguous"):
        got = visible_pairs_per_rank(Mask(**kw), layout, 2, 32, batch=2)
        want = [int(ref[:, local_positions(32, r, 2, layout)].sum()) for r in range(2)]
        assert got == want


def test_bench_masks_cpu_pieces():
    import bench_masks as bm

    big = bm.stdlib_doc_ids(1 << 16, seed=1)
    assert big.shape == (1, 1 << 16) and bool((big[:, 1:] >= big[:, :-1]).all()) and big.max() > 2
    ids = big[:, -4096:]
    rows = bm.plan_rows([4096], [1, 2], 256, torch_cp=True)
    assert {(r["mask"], r["layout"], r["method"]) for r in rows if r["ws"] == 2} >= {
        ("docs", "docs", "ring"), ("window", "contiguous", "ring"), ("docs", "ptrr", "torch_cp_flex")}
    assert [r["layout"] for r in rows if r["ws"] == 1 and r["mask"] == "docs"] == ["docs"]  # no duplicate row
    assert {r["layout"] for r in rows if r["ws"] == 2 and r["mask"] == "docs" and r["method"] == "ring"} == {
        "docs", "zigzag"}
    for r in rows:
        r.update(bm.masked_work(r, 256, ids if r["mask"] == "docs" else None))
        r["ms"] = 1.0
    win = next(r for r in rows if r["mask"] == "window" and r["ws"] == 2 and r["method"] == "ring")
    assert win["steps"] == 2 and win["pairs"] == sum(min(i, 256) + 1 for i in range(4096))
    bm.derive(rows, 256, t_block=0.01)
    causal = next(r for r in rows if r["mask"] == "causal" and r["ws"] == 2 and r["method"] == "ring")
    assert causal["vs_dense"] == 1.0 and win["vs_dense"] < 1 and win["vs_blocks"] == pytest.approx(1.0 / (16 * 0.01 / 2))
    assert "eff. TFLOP/s/GPU" in bm.markdown_table(rows, bm.COLUMNS)
