"""Single-process checks of the trimmed ring hops (seqpar/parallel/ring_rows.py): the rows every hop moves
cover every key the later steps' calls see (against the naive boolean mask), windows on contiguous shards
move W rows, and masks that use every row (causal on zigzag) keep whole blocks."""
import pytest
import torch

from reference import mask_matrix
from seqpar.ops import Mask
from seqpar.parallel import local_positions
from seqpar.parallel.ring_plan import build_plan
from seqpar.parallel.ring_rows import key_span

IDS = torch.tensor([[0] * 5 + [1] + [2] * 9 + [3] * 17, [0] * 16 + [1] * 16])  # [2, 32]
MASKS = {"window3": dict(window=3), "window9": dict(window=9), "window2-sinks2": dict(window=2, sinks=2),
         "docs": dict(doc_ids=IDS), "docs-window3-sinks1": dict(window=3, sinks=1, doc_ids=IDS),
         "two-sided": dict(causal=False, window=3),
         "block-sparse": dict(doc_ids=IDS, block_sparse=(4, torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.4))}


def _plans(mask, layout, n, L=32):
    q = torch.empty(2, L // n, 1, 8)
    return [build_plan(q, q, mask=mask, causal=mask is None, layout=layout, rank=r, world_size=n, backend="torch")
            for r in range(n)]


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped", "docs"])
@pytest.mark.parametrize("n", [2, 4])
def test_held_rows_cover_every_visible_key_of_the_later_steps(name, layout, n):
    kw = MASKS[name]
    if layout == "docs" and "doc_ids" not in kw:
        return
    vis = mask_matrix(2, 32, **{"causal": True, **kw}).any(0)
    plans = _plans(Mask(**kw), layout, n)
    held = plans[0].held
    for r, p in enumerate(plans):
        assert (p.held, p.home) == (held, plans[0].home)  # every rank computes the same rows
        qpos = local_positions(32, r, n, layout, doc_ids=IDS)
        for s in range(1, p.steps):
            kpos = local_positions(32, (r - s) % n, n, layout, doc_ids=IDS)
            seen = vis[qpos][:, kpos].any(0).nonzero().flatten()  # owner-local rows some query of r sees
            spans = held[s][r] if held is not None else ((0, 32 // n),)
            inside = lambda a, b, sp: any(lo <= a and b <= hi for lo, hi in sp)  # [a, b) within one span
            assert all(inside(j, j + 1, spans) for j in seen.tolist()), (r, s, spans, seen)
            for c in p.calls[s]:  # the calls read inside one held span (and the dK/dV that travel)
                assert inside(c.k_start, c.k_start + c.k_len, spans)
                if p.home is not None:
                    assert inside(c.k_start, c.k_start + c.k_len, p.home[(r - s) % n])
            if s + 1 < p.steps and held is not None:  # rows only shrink along the ring: each hop sends pieces
                assert all(inside(a, b, spans) for a, b in held[s + 1][(r + 1) % n])


def test_window_4096_on_two_ranks_at_512k_moves_4096_rows():
    L = 256 * 1024
    q = torch.empty(1, L, 1, 8)
    for r in range(2):
        p = build_plan(q, q, mask=Mask(window=4096), causal=False, layout="contiguous", rank=r, world_size=2,
                       backend="torch")
        assert p.steps == 2 and p.held[1] == [(), ((L - 4096, L),)] and p.home == [((L - 4096, L),), ()]
    (c,) = p.calls[1]  # rank 1: only its first W queries reach back, only to the last W keys of rank 0
    assert (c.q_start, c.q_len, c.k_start, c.k_len) == (0, 4096, L - 4096, 4096)


def test_window_with_sinks_moves_the_sinks_apart_from_the_window():
    L, W = 256 * 1024, 4096
    q = torch.empty(1, L, 1, 8)
    for r in range(2):
        p = build_plan(q, q, mask=Mask(window=W, sinks=4), causal=False, layout="contiguous", rank=r, world_size=2,
                       backend="torch")
        assert p.steps == 2 and p.held[1] == [(), ((0, 4), (L - W, L))] and p.home == [((0, 4), (L - W, L)), ()]
    spans = sorted((c.k_start, c.k_len) for c in p.calls[1])  # rank 1 on rank 0's block: the sinks, the window
    assert spans == [(0, 4), (L - W, W)]
    p4 = [build_plan(q[:, : L // 2], q[:, : L // 2], mask=Mask(window=W, sinks=4), causal=False, layout="contiguous",
                     rank=r, world_size=4, backend="torch") for r in range(4)]
    assert p4[3].held[1][3] == ((L // 2 - W, L // 2),)  # block 2: the window only
    assert [p4[s].held[s][s] for s in (1, 2, 3)] == [((0, 4), (L // 2 - W, L // 2)), ((0, 4),), ((0, 4),)]  # block 0


@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
def test_causal_keeps_whole_blocks(layout):
    for p in _plans(None, layout, 4):
        assert p.held is None and p.home is None
    for p in _plans(Mask(doc_ids=torch.zeros(2, 32, dtype=torch.long)), "zigzag", 4):  # one document: causal
        assert p.held is None and p.home is None


def test_key_span_is_exact():
    for lo in range(8):
        for hi in range(lo, 8):
            visible = lambda q, k: any(lo <= j <= hi for j in range(k[0], k[1] + 1, k[2]))
            assert key_span(visible, (0, 0, 1), (0, 7, 1), 8) == (lo, hi)
            assert key_span(visible, (0, 0, 1), (0, 14, 2), 8) == ((lo + 1) // 2, hi // 2) or (lo + 1) // 2 > hi // 2
