"""Every Mask kind through the ring on 2, 3 and 4 gloo processes, every layout, against float64.

One spawn per world size runs every case (spawning costs seconds, a case milliseconds). The parent
compares each case's gathered out, lse and gradients with a naive float64 attention under the explicit
boolean mask of the contract (``tests/reference.py: mask_matrix``). A second part counts kernel calls
and ring transfers for a window on the contiguous layout (the proof that empty ring steps are skipped),
and bad masks must raise the same ValueError on every rank without a hang.
"""
import dataclasses
import functools
import math
import random

import pytest
import torch

from dist_utils import run_distributed
from reference import mask_matrix, naive_attention

WORLD_SIZES = (2, 3, 4)
LAYOUTS = ("zigzag", "striped", "contiguous", "docs")
L = 8  # local tokens: a multiple of 4 (the docs layout cuts 4 chunks per rank)
# float64 ring vs float64 naive: only summation order differs.
FP64_TOL = dict(atol=1e-10, rtol=1e-10)
# float32 ring vs float64 naive on O(1) random data, rows of <= 32 keys: ~1e-6 (as the unit kernel tests).
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def _doc_ids(n, seed):
    """[2, S] non-decreasing ids: one-token documents, documents crossing shard and chunk boundaries,
    and (row 1) a document filling exactly the second contiguous shard."""
    rng, s = random.Random(seed), n * L
    row0, d = [], 3
    while len(row0) < s:
        row0 += [d] * rng.choice((1, 1, 2, 3, 5, L + 3))
        d += rng.choice((1, 2))  # ids need not be consecutive
    row1 = [0] * 3 + [1] * (L - 3) + [2] * L + [3] * (s - 2 * L) if n > 2 else [0] * L + [1] * L
    return torch.tensor([row0[:s], row1[:s]])


def _block_sparse(n, seed, bs=2):
    g = torch.Generator().manual_seed(seed)
    nb = n * L // bs
    vis = torch.rand(nb, nb, generator=g) < 0.5
    return bs, vis | torch.eye(nb, dtype=torch.bool) if seed % 2 else vis


def _masks(n):
    """name -> Mask kwargs for world size n (global length n * L)."""
    docs = _doc_ids(n, 10 + n)
    return {
        "docs": dict(doc_ids=docs),
        "docs-full": dict(causal=False, doc_ids=docs),
        "window3": dict(window=3),  # smaller than a shard
        "window11": dict(window=L + 3),  # larger than a shard
        "window0": dict(window=0),
        "two-sided5": dict(causal=False, window=5),
        "sinks": dict(window=2, sinks=2),
        "docs-window-sinks": dict(window=3, sinks=1, doc_ids=docs),
        "two-sided-sinks-docs": dict(causal=False, window=2, sinks=1, doc_ids=docs),
        "block-sparse": dict(block_sparse=_block_sparse(n, n)),
        "block-sparse-full-docs": dict(causal=False, block_sparse=_block_sparse(n, n + 1, bs=4), doc_ids=docs),
    }


def _cases(n):
    cases = []
    for name, kw in _masks(n).items():
        for layout in LAYOUTS:
            if layout == "docs" and "doc_ids" not in kw:
                continue
            cases.append(dict(name=f"{name}-{layout}", mask=kw, layout=layout, dtype=torch.float64, h=4, hkv=2))
    cases.append(dict(name="docs-fp32-mha", mask=_masks(n)["docs-window-sinks"], layout="docs", dtype=torch.float32,
                      h=2, hkv=2))
    return cases


def _inputs(case, n):
    g = torch.Generator().manual_seed(sum(map(ord, case["name"])) + n)
    s, h, hkv = n * L, case["h"], case["hkv"]
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    return mk(2, s, h, 8), mk(2, s, hkv, 8), mk(2, s, hkv, 8), mk(2, s, h, 8), mk(2, h, s)


def _run_case(case, n, backend="torch"):
    from seqpar.ops import Mask
    from seqpar.parallel import ring_attention_with_lse, shard_sequence, unshard_sequence

    mask = Mask(**case["mask"])
    ids, layout, dtype = mask.doc_ids, case["layout"], case["dtype"]
    q, k, v, dout, dlse = _inputs(case, n)
    shard = lambda x, dim=1: shard_sequence(x, dim, layout=layout, doc_ids=ids).to(dtype)
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention_with_lse(ql, kl, vl, mask=mask, layout=layout, backend=backend)
    ((out * shard(dout)).sum() + (lse.nan_to_num(neginf=0.0) * shard(dlse, 2)).sum()).backward()
    un = lambda x, dim=1: unshard_sequence(x.detach(), dim, layout=layout, doc_ids=ids)
    return dict(out=un(out), lse=un(lse, 2), dq=un(ql.grad), dk=un(kl.grad), dv=un(vl.grad),
                nan=bool(torch.isnan(out).any() or torch.isnan(lse).any()))


class _Counting:
    """Counts ring transfers (RingComm.send_recv) and reference kernel calls in this process."""

    def __init__(self):
        import sys

        from seqpar.ops.attention import registry

        ra = sys.modules["seqpar.parallel.ring_attention"]  # the package attribute is the function

        self.sends, self.fwd, self.bwd = [], 0, 0
        counter, base = self, ra.RingComm

        class CountingComm(base):
            def send_recv(self, tensors, shift=1, **kw):
                counter.sends.append(shift)
                return super().send_recv(tensors, shift, **kw)

        ra.RingComm = CountingComm
        f, b, a = registry.RECORDS["torch"].load()

        def fwd(*args, **kw):
            counter.fwd += 1
            return f(*args, **kw)

        def bwd(*args, **kw):
            counter.bwd += 1
            return b(*args, **kw)

        registry.RECORDS["torch"] = dataclasses.replace(registry.RECORDS["torch"], load=lambda: (fwd, bwd, a))


def _count(rank, n):
    """Window W on contiguous shards of L: ceil(W / L) ring transfers forward, kernel calls only for
    the visible blocks; returns {W: (sends, fwd calls, bwd calls)} for this rank."""
    from seqpar.ops import Mask
    from seqpar.parallel import ring_attention, shard_sequence

    counter, out = _Counting(), {}
    for w in (0, 3, L, L + 1, 100):
        counter.sends, counter.fwd, counter.bwd = [], 0, 0
        x = torch.randn(1, n * L, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(w))
        xl = shard_sequence(x, 1, layout="contiguous").requires_grad_()
        ring_attention(xl, xl, xl, mask=Mask(window=w), layout="contiguous", backend="torch").sum().backward()
        out[w] = (list(counter.sends), counter.fwd, counter.bwd)
    return out


def _bad(rank, n):
    """Each bad mask must raise ValueError on every rank (not hang); the group stays usable after."""
    from seqpar.ops import Mask
    from seqpar.parallel import ring_attention

    x = torch.randn(1, L, 2, 8)
    msgs = {}
    for name, kw in (("doc-shape", dict(mask=Mask(doc_ids=torch.zeros(1, L, dtype=torch.long)))),
                     ("doc-batch", dict(mask=Mask(doc_ids=torch.zeros(3, n * L, dtype=torch.long)))),
                     ("block-size", dict(mask=Mask(block_sparse=(2, torch.ones(3, 3, dtype=torch.bool))))),
                     ("docs-layout", dict(mask=Mask(window=2), layout="docs")),
                     ("backend", dict(mask=Mask(doc_ids=torch.zeros(1, n * L, dtype=torch.long)),
                                      backend="sdpa_cudnn"))):
        try:
            ring_attention(x, x, x, **{"layout": "zigzag", "backend": "torch", **kw})
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    return msgs


def _worker(rank, n):
    res = {c["name"]: _run_case(c, n) for c in _cases(n)}
    res["bad"] = _bad(rank, n)
    res["count"] = _count(rank, n)
    res["after-bad"] = _run_case(_cases(n)[0], n)
    return res


@functools.lru_cache(maxsize=None)
def _results(n):
    return run_distributed(_worker, n, timeout_s=150)


def _reference(case, n):
    q, k, v, dout, dlse = _inputs(case, n)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    kw = case["mask"]
    vis = mask_matrix(2, n * L, **{"causal": True, **kw})
    out, lse = naive_attention(q, k, v, visible=vis)
    ((out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_every_mask_every_layout_matches_float64(n):
    ranks = _results(n)
    for case in _cases(n):
        got, ref = ranks[0][case["name"]], _reference(case, n)
        tol = FP64_TOL if case["dtype"] == torch.float64 else FP32_TOL
        assert not got["nan"], case["name"]
        for key in ("out", "lse", "dq", "dk", "dv"):
            torch.testing.assert_close(got[key].double(), ref[key], **tol,
                                       msg=lambda m: f"{case['name']} N={n} {key}: {m}")
            for r in range(1, n):
                assert torch.equal(ranks[r][case["name"]][key], got[key])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_window_on_contiguous_skips_empty_ring_steps(n):
    for rank, res in enumerate(_results(n)):
        for w, (sends, fwd, bwd) in res["count"].items():
            hops = min(math.ceil(w / L), n - 1)  # ring steps past the local one
            # forward: `hops` K/V transfers; backward: `hops` K/V transfers + `hops` dK/dV transfers along
            # the ring, the last of which goes straight home (shift -hops). A window shorter than a shard
            # moves only the rows steps >= 1 use: the owner keeps its own dK/dV, one hop fewer.
            dkv = [1] * (hops - 1 if 0 < w < L else hops)
            assert sends == [1] * hops + [1] * hops + dkv + [-hops], (w, rank, sends)
            assert fwd == bwd == 1 + min(rank, hops), (w, rank, fwd, bwd)  # only visible blocks: none wrap around


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_bad_masks_raise_on_every_rank(n):
    ranks = _results(n)
    for r in range(n):
        bad = ranks[r]["bad"]
        assert bad == ranks[0]["bad"]  # the same sentence everywhere
        assert f"[1, {L}]" in bad["doc-shape"] and "GLOBAL" in bad["doc-shape"]
        assert f"[3, {n * L}]" in bad["doc-batch"]
        assert "block_sparse covers 2 x 3 = 6 tokens" in bad["block-size"]
        assert "layout='docs'" in bad["docs-layout"] and "doc_ids" in bad["docs-layout"]
        assert "backend='sdpa_cudnn'" in bad["backend"]
    ref = _reference(_cases(n)[0], n)
    torch.testing.assert_close(ranks[0]["after-bad"]["out"], ref["out"], **FP64_TOL)
