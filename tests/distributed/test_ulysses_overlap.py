"""The Ulysses mode's head-chunk pipelining on 2, 3 and 4 gloo processes (async all-to-alls on the real path).

Per world size one spawn runs every case (chunks 1/2/4, GQA and MHA, causal / documents / window + sinks on zigzag,
striped and the document layout); the parent compares each case with a naive float64 attention (forward and
gradients through out AND lse) and every ``slices > 1`` case with ``slices=1`` to a few ulp (heads are independent:
chunking changes nothing but the local kernel's rounding). A logged run checks the schedule itself: chunk ``c+1``'s
all-to-all is issued before chunk ``c`` computes, and chunk ``c``'s result is sent home before ``c+1`` computes.
"""
import functools

import pytest
import torch

from cp_cases import reference, run_case
from dist_utils import run_distributed

L = 12  # local tokens: even (zigzag), a multiple of 4 (the docs layout cuts 4 chunks per rank)
TOL = dict(atol=1e-10, rtol=1e-10)  # float64 against float64: only summation order differs
MASKS = {"causal": None, "docs": "docs", "window": dict(window=5, sinks=1)}
LAYOUTS = {"causal": ("zigzag", "striped"), "docs": ("docs",), "window": ("zigzag",)}
HEADS = {2: ((8, 2), (8, 8)), 3: ((12, 12), (6, 3)), 4: ((8, 8), (16, 8))}  # (6, 3) on 3: one KV head per rank
SLICES = (1, 2, 4)


def _cases(n):
    return [dict(name=f"{m}-{lay}-{h}/{hkv}-s{sl}", mask=m, layout=lay, h=h, hkv=hkv, slices=sl)
            for m in MASKS for lay in LAYOUTS[m] for h, hkv in HEADS[n] for sl in SLICES]


def _run_case(case, n):
    from seqpar.parallel import ulysses_attention_with_lse

    return run_case(ulysses_attention_with_lse, case, MASKS[case["mask"]], n * L)


def _logged_schedule(slices):
    """The order of all-to-alls (issue, wait) and kernel calls of one forward + backward on 8 query/4 KV heads."""
    import seqpar.parallel.ulysses as ul
    import seqpar.parallel.ulysses_comm as comm
    from seqpar.parallel import shard_sequence, ulysses_attention

    log, saved = [], (ul.select, comm.dist.all_to_all_single)

    class Work:
        def __init__(self, work):
            self.work = work

        def wait(self):
            log.append("a2a-wait")
            return self.work.wait()

    class Logged:
        def __init__(self, record):
            self._record = record

        def __getattr__(self, name):
            return getattr(self._record, name)

        def forward(self, *a, **kw):
            log.append("fwd")
            return self._record.forward(*a, **kw)

        def backward(self, *a, **kw):
            log.append("bwd")
            return self._record.backward(*a, **kw)

    def a2a(*a, async_op=False, **kw):
        log.append("a2a" if async_op else "a2a-sync")
        return Work(saved[1](*a, async_op=async_op, **kw))

    ul.select = lambda *a, **kw: Logged(saved[0](*a, **kw))
    comm.dist.all_to_all_single = a2a
    try:
        q = shard_sequence(torch.randn(1, 2 * L, 8, 8, dtype=torch.float64), 1).requires_grad_()
        kv = shard_sequence(torch.randn(1, 2 * L, 4, 8, dtype=torch.float64), 1).requires_grad_()
        out = ulysses_attention(q, kv, kv, causal=True, backend="torch", slices=slices)
        log.append("|")
        out.sum().backward()
    finally:
        ul.select, comm.dist.all_to_all_single = saved
    return log


def _worker(rank, n):
    res = {c["name"]: _run_case(c, n) for c in _cases(n)}
    if n == 2:
        res["schedule"] = {sl: _logged_schedule(sl) for sl in (1, 2)}
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
def test_chunks_match_float64_and_one_chunk(n):
    ranks = _results(n)
    for case in _cases(n):
        ref = _reference(tuple(case.items()), n)
        one = case["name"].rsplit("-s", 1)[0] + "-s1"
        for rank, res in enumerate(ranks):
            got = res[case["name"]]
            for key in ("out", "lse", "dq", "dk", "dv"):
                torch.testing.assert_close(got[key], ref[key], **TOL,
                                           msg=lambda m: f"n={n} {case['name']} rank {rank} {key}: {m}")
                torch.testing.assert_close(got[key], res[one][key], atol=1e-14, rtol=1e-14,
                                           msg=lambda m: f"n={n} {case['name']} rank {rank} {key} vs 1 chunk: {m}")


@pytest.mark.timeout(300)
def test_schedule_overlaps_all_to_alls_with_chunks():
    for rank, res in enumerate(_results(2)):
        one, two = res["schedule"][1], res["schedule"][2]
        fwd1, bwd1 = " ".join(one).split(" | ")
        assert fwd1 == "a2a a2a-wait fwd a2a a2a-wait" and bwd1 == "a2a a2a-wait bwd a2a a2a-wait", one
        fwd, bwd = " ".join(two).split(" | ")
        # 4 KV heads on 2 ranks, 2 chunks: chunk 1's inputs are issued before chunk 0 computes, chunk 0's result is
        # sent before chunk 1 computes; both results are collected at the end
        assert fwd == "a2a a2a a2a-wait fwd a2a a2a-wait fwd a2a a2a-wait a2a-wait", (rank, two)
        assert bwd == "a2a a2a a2a-wait bwd a2a a2a-wait bwd a2a a2a-wait a2a-wait", (rank, two)


def test_head_chunks():
    from seqpar.parallel.ulysses import head_chunks

    assert head_chunks(32, 8, 2) == 1  # the default: unchunked (measured no gain on 2 x H200)
    assert head_chunks(32, 8, 2, 4) == 4 and head_chunks(32, 8, 4, 4) == 2 and head_chunks(32, 8, 8, 4) == 1
    assert head_chunks(32, 32, 2, 3) == 2  # 16 KV heads per rank: 3 does not divide them, 2 does
    assert head_chunks(32, 8, 2, 1) == 1 and head_chunks(32, 24, 2, 8) == 6
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="slices"):
            head_chunks(8, 8, 2, bad)
