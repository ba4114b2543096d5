"""Trimmed ring hops (seqpar/parallel/ring_rows.py) on 2, 3 and 4 gloo processes: a hop moves only the key
rows later steps use, the backward sends back just their dK/dV, and the owner adds them at their offset.

Every case is checked in float64 against the naive reference (out, lse and all gradients), on shards of
L = 16 tokens so windows shorter and longer than a shard both occur, with batch 1 (the sent rows are a
view) and batch 2 (a copy). A second part records the rows and bytes of every transfer for a window on
the contiguous layout: W rows per hop (not the shard's L), and the whole blocks where nothing trims.
"""
import functools

import pytest
import torch

from dist_utils import run_distributed
from reference import mask_matrix, naive_attention

WORLD_SIZES = (2, 3, 4)
L = 16
TOL = dict(atol=1e-10, rtol=1e-10)


def _doc_ids(n, b):
    """Documents crossing the contiguous shard boundaries (so the neighbour's tail document is all a rank
    needs of it), one of them a single token."""
    s, row, d, sizes = n * L, [], 0, (5, 13, 1, 22, 7, 30)
    while len(row) < s:
        row += [d] * sizes[d % len(sizes)]
        d += 1
    return torch.tensor([row[:s]] * b)


def _cases(n):
    out = []
    for b in (1, 2):
        masks = {"causal": None, "window5": dict(window=5), "window20": dict(window=L + 4), "window16": dict(window=L),
                 "window5-sinks3": dict(window=5, sinks=3), "docs": dict(doc_ids=_doc_ids(n, b)),
                 "docs-window4-sinks1": dict(window=4, sinks=1, doc_ids=_doc_ids(n, b)),
                 "two-sided3": dict(causal=False, window=3)}
        for name, kw in masks.items():
            for layout in ("contiguous", "zigzag", "striped", "docs"):
                if layout == "docs" and (kw is None or "doc_ids" not in kw):
                    continue
                out.append(dict(name=f"{name}-{layout}-b{b}", mask=kw, layout=layout, b=b))
    return out


def _inputs(case, n):
    g = torch.Generator().manual_seed(sum(map(ord, case["name"])) + n)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    b, s = case["b"], n * L
    return mk(b, s, 4, 8), mk(b, s, 2, 8), mk(b, s, 2, 8), mk(b, s, 4, 8), mk(b, 4, s)


def _run_case(case, n):
    from seqpar.ops import Mask
    from seqpar.parallel import ring_attention_with_lse, shard_sequence, unshard_sequence

    mask = None if case["mask"] is None else Mask(**case["mask"])
    ids, layout = None if mask is None else mask.doc_ids, case["layout"]
    q, k, v, dout, dlse = _inputs(case, n)
    shard = lambda x, dim=1: shard_sequence(x, dim, layout=layout, doc_ids=ids)
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention_with_lse(ql, kl, vl, mask=mask, causal=mask is None, layout=layout, backend="torch")
    ((out * shard(dout)).sum() + (lse.nan_to_num(neginf=0.0) * shard(dlse, 2)).sum()).backward()
    un = lambda x, dim=1: unshard_sequence(x.detach(), dim, layout=layout, doc_ids=ids)
    return dict(out=un(out), lse=un(lse, 2), dq=un(ql.grad), dk=un(kl.grad), dv=un(vl.grad))


def _transfers(rank, n):
    """{(W, batch): [(shift, rows sent per tensor, rows received, bytes sent)]} for a window on contiguous."""
    import sys

    from seqpar.ops import Mask
    from seqpar.parallel import ring_attention, shard_sequence

    ra = sys.modules["seqpar.parallel.ring_attention"]
    log, base = [], ra.RingComm

    class Recording(base):
        def send_recv(self, tensors, shift=1, recv_rows=None):
            h = super().send_recv(tensors, shift, recv_rows=recv_rows)
            log.append((shift, [t.shape[1] for t in tensors], [t.shape[1] for t in h._received],
                        sum(t.numel() * t.element_size() for t in tensors)))
            return h

    ra.RingComm, out = Recording, {}
    try:
        for w, b, sinks in ((5, 1, 0), (5, 2, 0), (L, 1, 0), (L + 4, 1, 0), (None, 1, 0), (5, 1, 3), (3, 1, 0)):
            log.clear()
            x = torch.randn(b, n * L, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
            xl = shard_sequence(x, 1, layout="contiguous").requires_grad_()
            mask = None if w is None else Mask(window=w, sinks=sinks, causal=w != 3)  # W=3: two-sided
            ring_attention(xl, xl, xl, mask=mask, causal=w is None, layout="contiguous", backend="torch").sum().backward()
            out[(w, b) if sinks == 0 and w != 3 else ("sinks" if sinks else "two-sided", w)] = list(log)
    finally:
        ra.RingComm = base
    return out


def _worker(rank, n):
    res = {c["name"]: _run_case(c, n) for c in _cases(n)}
    res["transfers"] = _transfers(rank, n)
    return res


@functools.lru_cache(maxsize=None)
def _results(n):
    return run_distributed(_worker, n, timeout_s=200)


def _reference(case, n):
    q, k, v, dout, dlse = _inputs(case, n)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    kw = {"causal": True, **(case["mask"] or {})}
    out, lse = naive_attention(q, k, v, visible=mask_matrix(case["b"], n * L, **kw))
    ((out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_trimmed_hops_match_float64(n):
    ranks = _results(n)
    for case in _cases(n):
        got, ref = ranks[0][case["name"]], _reference(case, n)
        for key in ("out", "lse", "dq", "dk", "dv"):
            torch.testing.assert_close(got[key], ref[key], **TOL, msg=lambda m: f"{case['name']} N={n} {key}: {m}")
            for r in range(1, n):
                assert torch.equal(ranks[r][case["name"]][key], got[key])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_window_hops_send_w_rows_not_the_shard(n):
    row_bytes = 2 * 8 * 8  # heads x head_dim x fp64, per batch row
    for rank, res in enumerate(_results(n)):
        t = res["transfers"]
        for b in (1, 2):
            # W=5 < L: one hop; K/V forward and backward send the last 5 rows of the shard (none from the
            # last rank: rank 0 never looks back); the dK/dV of those 5 rows go straight home (fp64 = acc).
            w_rows = 0 if rank == n - 1 else 5
            home_rows = 0 if rank == 0 else 5
            assert t[(5, b)] == [(1, [w_rows] * 2, [home_rows] * 2, 2 * w_rows * b * row_bytes)] * 2 + [
                (-1, [home_rows] * 2, [w_rows] * 2, 2 * home_rows * b * row_bytes)], (rank, b, t[(5, b)])
        # W=L: every row of the neighbour is used, whole blocks as before (fwd, bwd K/V, dK/dV x2).
        assert [x[1] for x in t[(L, 1)]] == [[L, L]] * 4
        # W=L+4 on 3+ ranks: two hops; the second moves only the 4 rows two shards back still use.
        if n > 2:
            second = 4 if 1 <= rank <= n - 2 else 0  # rank r forwards block r - 1 to r + 1 (none wrap around)
            assert [x[1] for x in t[(L + 4, 1)][:2]] == [[L, L], [second, second]]
        # Window 5 + 3 sinks: the sinks (the sequence's first 3 keys) travel apart from the window's 5 rows, so
        # no hop moves a whole block: rank 0's block goes out as 3 + 5 rows, then as its 3 sink rows only.
        fwd = [x for x in t[("sinks", 5)] if x[0] == 1][: n - 1]  # the forward K/V hops (shift 1)
        assert all(x[1][0] < L for x in t[("sinks", 5)]), t[("sinks", 5)]
        if rank == 0:
            assert fwd[0][1] == [8, 8]
        # Two-sided window 3: a block is needed by both neighbours (its last and its first 3 rows) and, on 3+
        # ranks, reaches the second one n-1 hops later: both spans travel, never the whole block.
        assert all(x[1][0] <= 6 for x in t[("two-sided", 3)]), t[("two-sided", 3)]
        # plain causal: the classic plan, untouched
        assert all(x[1] == [L, L] for x in t[(None, 1)]) and len(t[(None, 1)]) == 3 * (n - 1) + 1
