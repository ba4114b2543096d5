"""The all-gather mode's head-slice pipelining on 2, 3 and 4 gloo processes (async collectives on the real path).

Per world size one spawn runs every case (slices 1/2/3/4, GQA 8/2 and 8/8 heads, causal / documents / window
masks on zigzag, striped and the document layout); the parent compares each case with a naive float64
attention (forward and gradients through out AND lse) and every ``slices > 1`` case with ``slices=1`` to a few
ulp: heads are independent, so slicing changes nothing but the local kernel's rounding. A logged run checks the schedule
itself: the next slice's gather is issued before the current slice computes, and each slice's dK/dV
reduce-scatter is waited for only after the next slice has computed.
"""
import functools

import pytest
import torch

from cp_cases import reference, run_case
from dist_utils import run_distributed
from reference import naive_attention

L = 12  # local tokens: even (zigzag), a multiple of 4 (the docs layout cuts 4 chunks per rank)
# float64 against float64: only summation order differs.
TOL = dict(atol=1e-10, rtol=1e-10)
MASKS = {"causal": None, "docs": "docs", "window": dict(window=5, sinks=1)}
LAYOUTS = {"causal": ("zigzag", "striped"), "docs": ("zigzag", "docs"), "window": ("zigzag", "contiguous")}
HEADS = ((8, 2), (8, 8))
SLICES = (1, 2, 3, 4)  # 3 on 8 KV heads: uneven slices (3, 3, 2); 4 on 2 KV heads is cut to 2


def _cases():
    return [dict(name=f"{m}-{lay}-{h}/{hkv}-s{sl}", mask=m, layout=lay, h=h, hkv=hkv, slices=sl)
            for m in MASKS for lay in LAYOUTS[m] for h, hkv in HEADS for sl in SLICES]


def _split_cases():
    """Causal runs cut into a fully visible block + an aligned diagonal (``split_causal=True``; what cuDNN needs):
    zigzag and contiguous (consecutive queries: cut), striped (strided queries: never cut, same result)."""
    return [dict(name=f"causal-{lay}-{h}/{hkv}-split-s{sl}", mask="causal", layout=lay, h=h, hkv=hkv, slices=sl,
                 split=True) for lay in ("zigzag", "contiguous", "striped") for h, hkv in HEADS for sl in (1, 2)]


def _run_case(case, n):
    from seqpar.parallel import allgather_attention_with_lse

    return run_case(allgather_attention_with_lse, case, MASKS[case["mask"]], n * L, split_causal=case.get("split"))


class _Logged:
    """A backend record that logs its kernel calls (everything else delegated)."""

    def __init__(self, record, log):
        self._record, self._log = record, log

    def __getattr__(self, name):
        return getattr(self._record, name)

    def forward(self, *a, **kw):
        self._log.append("fwd")
        return self._record.forward(*a, **kw)

    def backward(self, *a, **kw):
        self._log.append("bwd")
        return self._record.backward(*a, **kw)


def _logged_schedule(slices):
    """The order of collectives (issue, async flag, wait) and kernel calls of one forward + backward."""
    import seqpar.parallel.allgather as ag
    import seqpar.parallel.allgather_comm as comm
    from seqpar.parallel import allgather_attention, shard_sequence

    log, saved = [], (ag.select, comm.all_gather_single, comm.reduce_scatter_single)

    class Work:
        def __init__(self, name, work):
            self.name, self.work = name, work

        def wait(self):
            log.append(f"{self.name}-wait")
            return self.work.wait()

    def issued(name, fn):
        def call(*a, async_op=False, **kw):
            log.append(f"{name}{'' if async_op else '-sync'}")
            return Work(name, fn()(*a, async_op=async_op, **kw))
        return lambda: call

    ag.select = lambda *a, **kw: _Logged(saved[0](*a, **kw), log)
    comm.all_gather_single = issued("ag", saved[1])
    comm.reduce_scatter_single = issued("rs", saved[2])
    try:
        q = shard_sequence(torch.randn(1, 4 * L, 8, 8, dtype=torch.float64), 1).requires_grad_()
        kv = shard_sequence(torch.randn(1, 4 * L, 4, 8, dtype=torch.float64), 1).requires_grad_()
        out = allgather_attention(q, kv, kv, causal=True, backend="torch", slices=slices)
        log.append("|")
        out.sum().backward()
    finally:
        ag.select, comm.all_gather_single, comm.reduce_scatter_single = saved
    return log


def _split_calls(n):
    """Kernel calls per run of this rank's plan for a causal zigzag shard, without and with the cut."""
    from seqpar.ops import Mask
    from seqpar.parallel.allgather import build_plan

    q = torch.zeros(1, L, 8, 8, dtype=torch.float64)
    return {split: [len(r.parts) for r in build_plan(q, q[:, :, :2], Mask(causal=True), None, "zigzag", "torch",
                                                     None, split).runs] for split in (None, True, False)}


def _worker(rank, n):
    res = {c["name"]: _run_case(c, n) for c in _cases() + _split_cases()}
    res["split_calls"] = _split_calls(n)
    if n == 2:
        res["schedule"] = {sl: _logged_schedule(sl) for sl in (1, 3)}
    return res


@functools.lru_cache(maxsize=None)
def _results(n):
    return run_distributed(_worker, n, timeout_s=240, pg_timeout_s=120)


@functools.lru_cache(maxsize=None)
def _reference(case, n):
    case = dict(case)
    return reference(case, MASKS[case["mask"]], n * L)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_slices_match_float64_and_slices_1(n):
    ranks = _results(n)
    cases = _cases()
    assert len(cases) == 48
    for case in cases:
        ref = _reference(tuple(case.items()), n)
        one = dict(case, slices=1, name=case["name"].rsplit("-s", 1)[0] + "-s1")
        for rank, res in enumerate(ranks):
            got = res[case["name"]]
            for key in ("out", "lse", "dq", "dk", "dv"):
                torch.testing.assert_close(got[key], ref[key], **TOL,
                                           msg=lambda m: f"n={n} {case['name']} rank {rank} {key}: {m}")
                # Every head is the same computation whatever slice it travels in; only the CPU kernel's batched
                # matmul may round differently for another head count (measured: <= 2e-16 with 3-head slices,
                # bitwise with 2 or 4), so the bound is a few ulp, not the float64-vs-float64 TOL above.
                torch.testing.assert_close(got[key], res[one["name"]][key], atol=1e-14, rtol=1e-14,
                                           msg=lambda m: f"n={n} {case['name']} rank {rank} {key} vs slices=1: {m}")


@pytest.mark.timeout(300)
def test_schedule_overlaps_gather_and_reduce_scatter():
    fwd, bwd = 2 * ["fwd"], 2 * ["bwd"]  # zigzag: two query runs per rank, one kernel call each per slice
    one = ["ag", "ag-wait", *fwd, "|", "ag", "ag-wait", *bwd, "rs", "rs-wait"]
    three = ["ag",  # forward: slice i+1's gather is issued before slice i's wait and kernels
             "ag", "ag-wait", *fwd, "ag", "ag-wait", *fwd, "ag-wait", *fwd, "|",
             "ag",  # backward: K/V gathered again, slice i's reduce-scatter waited after slice i+1 computed
             "ag", "ag-wait", *bwd, "rs",
             "ag", "ag-wait", *bwd, "rs", "rs-wait",
             "ag-wait", *bwd, "rs", "rs-wait", "rs-wait"]
    for res in _results(2):
        assert res["schedule"][1] == one
        assert res["schedule"][3] == three


def test_head_slices():
    from seqpar.parallel.allgather import head_slices

    assert head_slices(8, 2) == [(slice(0, 1), slice(0, 4)), (slice(1, 2), slice(4, 8))]  # default min(4, Hkv)
    assert [kv for kv, _ in head_slices(32, 8)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert head_slices(8, 8, 3) == [(slice(0, 2), slice(0, 2)), (slice(2, 5), slice(2, 5)), (slice(5, 8), slice(5, 8))]
    assert head_slices(8, 2, 1) == [(slice(0, 2), slice(0, 8))]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="slices=.*positive integer"):
            head_slices(8, 2, bad)


def test_group_of_one_matches_reference():
    from seqpar.parallel import allgather_attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, h, 8, generator=g, dtype=torch.float64) for h in (8, 2, 2))
    ref = naive_attention(q, k, v, causal=True)
    for slices in (1, 2):
        out, lse = allgather_attention_with_lse(q, k, v, causal=True, backend="torch", slices=slices)
        torch.testing.assert_close(out, ref[0], **TOL)
        torch.testing.assert_close(lse, ref[1], **TOL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_causal_runs_cut_for_diagonal_only_kernels_match_float64(n):
    ranks = _results(n)
    for case in _split_cases():
        ref = _reference(tuple((k, v) for k, v in case.items() if k != "split"), n)
        for rank, res in enumerate(ranks):
            got = res[case["name"]]
            for key in ("out", "lse", "dq", "dk", "dv"):
                torch.testing.assert_close(got[key], ref[key], **TOL,
                                           msg=lambda m: f"n={n} {case['name']} rank {rank} {key}: {m}")
    for rank, res in enumerate(ranks):
        calls = res["split_calls"]
        # zigzag: rank r holds chunks r and 2n-1-r; a chunk starting at 0 (rank 0's first) has no keys before it
        assert calls[True] == ([1, 2] if rank == 0 else [2, 2]), calls
        assert calls[None] == calls[False] == [1, 1], calls  # on the CPU the reference takes every run whole
