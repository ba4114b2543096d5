"""The Mask value, the backend registry, and the reference backend's mask kinds against a float64
naive attention with the mask written out pair by pair from the contract (tests/reference.py)."""
import dataclasses

import pytest
import torch

from reference import mask_matrix, naive_attention
from seqpar.ops import BACKENDS, Mask, attention_with_lse, resolve_backend
from seqpar.ops.attention.mask import MASK_KINDS, LocalMask
from seqpar.ops.attention.registry import BACKEND_NAMES, RECORDS, Backend, select

# float64 blockwise reference vs float64 naive: only summation order differs.
FP64_TOL = dict(atol=1e-10, rtol=1e-10)


def _qkv(b, s, h, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    return mk(b, s, h, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, s, h, d)


# ---------------------------------------------------------------------------------------------------
# Mask validation: one ValueError naming the field.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(causal=1), "Mask.causal"),
    (dict(window=-1), "Mask.window"),
    (dict(window=2.5), "Mask.window"),
    (dict(sinks=-2), "Mask.sinks"),
    (dict(sinks=True), "Mask.sinks"),
    (dict(doc_ids=torch.zeros(8, dtype=torch.long)), "Mask.doc_ids"),
    (dict(doc_ids=torch.zeros(1, 8)), "Mask.doc_ids"),
    (dict(doc_ids=torch.tensor([[0, 0, 1, 0]])), "non-decreasing"),
    (dict(block_sparse=(0, torch.ones(2, 2, dtype=torch.bool))), "Mask.block_sparse"),
    (dict(block_sparse=(4, torch.ones(2, 2))), "Mask.block_sparse"),
    (dict(block_sparse=(4, torch.ones(2, 3, dtype=torch.bool))), "Mask.block_sparse"),
    (dict(block_sparse=[4, torch.ones(2, 2, dtype=torch.bool)]), "Mask.block_sparse"),
])
def test_mask_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Mask(**kwargs)


def test_mask_is_frozen_and_reports_kinds():
    m = Mask()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.causal = False
    assert Mask().kinds == {"causal"}
    assert Mask(causal=False).kinds == frozenset()
    assert Mask(window=4).kinds == {"causal", "window"}
    assert Mask(causal=False, window=4, sinks=2).kinds == {"window", "two_sided_window", "sinks"}
    assert Mask(sinks=2).kinds == {"causal"}  # sinks only widen a window
    docs = torch.tensor([[0, 0, 1, 1]])
    blocks = (2, torch.ones(2, 2, dtype=torch.bool))
    assert Mask(doc_ids=docs, block_sparse=blocks).kinds == {"causal", "documents", "block_sparse"}
    assert Mask(causal=False, window=1, sinks=1, doc_ids=docs, block_sparse=blocks).kinds == \
        MASK_KINDS - {"causal", "strided"}  # strides belong to a call (LocalMask)


def test_local_mask_slices_global_doc_ids_and_checks_ranges():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    lm = Mask(doc_ids=docs, window=2, sinks=1).local(4, 4, 1, 5)
    assert torch.equal(lm.q_doc_ids, docs[:, 4:8]) and torch.equal(lm.k_doc_ids, docs[:, 1:6])
    assert lm.k_sink.tolist() == [[False, False, True, False, True]]  # keys 1..5: doc starts at 3 and 5
    assert (lm.q_offset, lm.k_offset, lm.window_left, lm.window_right) == (4, 1, 2, None)
    with pytest.raises(ValueError, match="covers 8 tokens"):
        Mask(doc_ids=docs).local(6, 4, 0, 8)


def test_mask_and_keywords_are_exclusive():
    q, k, v, _ = _qkv(1, 8, 2, 1, 8, seed=0)
    with pytest.raises(ValueError, match="not both"):
        attention_with_lse(q, k, v, causal=True, mask=Mask())


# ---------------------------------------------------------------------------------------------------
# mask=Mask(...) equals the keywords on the reference.
# ---------------------------------------------------------------------------------------------------

def test_mask_equals_keywords_on_reference():
    q, k, v, _ = _qkv(2, 30, 4, 2, 8, seed=1)
    docs = torch.tensor([[0] * 50 + [1] * 30, [0] * 5 + [1] * 60 + [2] * 15])  # global [2, 80]
    for m, kw in ((Mask(), dict(causal=True)), (Mask(causal=False), {}),
                  (Mask(window=5), dict(causal=True, window_left=5)),
                  (Mask(window=5, doc_ids=docs), dict(causal=True, window_left=5)),
                  (Mask(causal=False, doc_ids=docs), {})):
        got = attention_with_lse(q, k, v, mask=m, q_offset=40, k_offset=30, backend="torch")
        extra = dict(q_doc_ids=docs[:, 40:70], k_doc_ids=docs[:, 30:60]) if m.doc_ids is not None else {}
        old = attention_with_lse(q, k, v, q_offset=40, k_offset=30, backend="torch", **kw, **extra)
        assert torch.equal(got[0], old[0]) and torch.equal(got[1], old[1]), sorted(m.kinds)


# ---------------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------------

def test_backend_names_and_records_agree():
    assert BACKEND_NAMES == ("auto", "torch", "triton", "sdpa_flash", "sdpa_cudnn") and BACKENDS == BACKEND_NAMES
    assert tuple(RECORDS) == BACKEND_NAMES[1:]
    for name, rec in RECORDS.items():
        assert isinstance(rec, Backend) and rec.name == name
        assert rec.mask_kinds <= MASK_KINDS and rec.devices and rec.dtypes
        assert not rec.ring_accumulators or rec.lse_grad  # the ring's fused path also passes delta
        if name == "triton":
            pytest.importorskip("triton")
        for fn in (rec.forward, rec.backward, rec.attention):
            assert callable(fn)
    assert RECORDS["torch"].mask_kinds == MASK_KINDS  # the reference is the spec: every kind
    assert RECORDS["sdpa_flash"].lse_grad is False and RECORDS["triton"].ring_accumulators is True


def test_auto_picks_torch_on_cpu():
    q, k, _, _ = _qkv(1, 8, 2, 1, 16, seed=2)
    assert select("auto", q, k, LocalMask(causal=True)).name == "torch"
    assert resolve_backend("auto", q.float(), k.float(), mask=Mask(window=2, sinks=1)) == "torch"


@pytest.mark.parametrize("backend,mask,words", [
    ("sdpa_cudnn", Mask(doc_ids=torch.zeros(1, 8, dtype=torch.long)), "document masks"),
    ("sdpa_flash", Mask(window=3), "sliding-window masks"),
    ("sdpa_flash", Mask(window=3, sinks=2), "attention-sink masks"),
    ("sdpa_cudnn", Mask(causal=False, window=3), "two-sided"),
    ("sdpa_flash", Mask(block_sparse=(4, torch.ones(2, 2, dtype=torch.bool))), "block-sparse masks"),
])
def test_undeclared_mask_kind_raises_clear_error(backend, mask, words):
    """Mask kinds are checked before the device, so the message names the kind even on CPU."""
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16, device="cpu")
    rec = dataclasses.replace(RECORDS[backend], devices=("cpu",))  # as if the device were right
    with pytest.raises(ValueError) as e:
        why = rec.missing(q, q, mask.local(0, 8, 0, 8))
        raise ValueError(f"backend={backend!r} {why}")
    assert words in str(e.value)
    with pytest.raises(ValueError, match=rf"backend='{backend}' .*; use backend=.*'torch'.*'auto'"):
        attention_with_lse(q, q, q, mask=mask, backend=backend)


def test_sdpa_declares_aligned_causal_only():
    rec = dataclasses.replace(RECORDS["sdpa_flash"], devices=("cpu",))
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    assert rec.missing(q, q, LocalMask(causal=True)) is None
    assert "aligned diagonal" in rec.missing(q, q, LocalMask(causal=True, q_offset=3))
    assert "head_dim 72" not in (rec.missing(q, q, LocalMask()) or "")
    assert "head_dim 264" in dataclasses.replace(rec).missing(torch.zeros(1, 8, 2, 264, dtype=torch.float16),
                                                             torch.zeros(1, 8, 2, 264, dtype=torch.float16), LocalMask())
    assert "gradient through lse" in rec.missing(q, q, LocalMask(), need_lse_grad=True)


# ---------------------------------------------------------------------------------------------------
# Reference backend: sinks, two-sided windows, block-sparse, against the pair-by-pair mask.
# ---------------------------------------------------------------------------------------------------

DOCS_24 = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 24])
SEMANTIC_CASES = {
    "causal_window_sinks": dict(causal=True, window=3, sinks=2),
    "two_sided_window": dict(causal=False, window=2),
    "two_sided_window_sinks_docs": dict(causal=False, window=2, sinks=1, doc_ids=DOCS_24),
    "causal_window_sinks_docs": dict(causal=True, window=2, sinks=3, doc_ids=DOCS_24),
    # Block rows 1 and 4 see nothing: rows with no visible key (out 0, lse -inf, no NaN).
    "block_sparse_empty_rows": dict(causal=True, block_sparse=(4, torch.tensor(
        [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0],
         [1, 0, 1, 0, 1, 1]], dtype=torch.bool))),
    "everything": dict(causal=True, window=4, sinks=2, doc_ids=DOCS_24, block_sparse=(3, torch.ones(8, 8).tril().bool())),
}


@pytest.mark.parametrize("case", list(SEMANTIC_CASES))
@pytest.mark.parametrize("offsets", [(0, 0), (8, 4)])
def test_reference_mask_kinds_match_pair_by_pair_mask(case, offsets):
    spec = SEMANTIC_CASES[case]
    qo, ko = offsets
    sq, sk = 24 - qo, 24 - ko
    q, k, v, dout = _qkv(2, 24, 4, 2, 8, seed=len(case) + qo)
    q, dout = q[:, qo:].contiguous(), dout[:, qo:].contiguous()
    k, v = k[:, ko:].contiguous(), v[:, ko:].contiguous()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention_with_lse(q, k, v, mask=Mask(**spec), q_offset=qo, k_offset=ko)  # auto: torch on CPU
    (out * dout).sum().backward()
    visible = mask_matrix(2, 24, **spec)[:, qo:, ko:]  # [B, Sq, Sk]
    assert visible.shape == (2, sq, sk)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, visible=visible)
    (ref_out * dout).sum().backward()
    for t in (out, lse, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()
    torch.testing.assert_close(out, ref_out, **FP64_TOL)
    finite = ref_lse > float("-inf")
    assert torch.equal(lse.isinf(), ~finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], **FP64_TOL)
    for got, ref in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, ref, **FP64_TOL)
    empty = ~visible.any(-1)  # [B, Sq] rows that see no key
    if case == "block_sparse_empty_rows":
        assert empty.any()
    if empty.any():
        rows = empty[:, :, None, None].expand_as(out)
        assert torch.all(out[rows] == 0) and torch.all(q.grad[rows] == 0)
        assert torch.all(lse.transpose(1, 2)[empty] == float("-inf"))


def test_reference_small_blocks_with_sinks_and_two_sided_window():
    """Block skipping must not skip sinks or keys right of a two-sided window: 3x5 blocks vs one block."""
    from seqpar.ops.attention.reference import forward
    q, k, v, _ = _qkv(2, 24, 2, 2, 8, seed=9)
    for spec in (dict(causal=True, window=2, sinks=2, doc_ids=DOCS_24), dict(causal=False, window=3)):
        m = Mask(**spec).local(0, 24, 0, 24)
        small = forward(q, k, v, m, block_q=3, block_k=5)
        whole = forward(q, k, v, m, block_q=1024, block_k=1024)
        torch.testing.assert_close(small, whole, **FP64_TOL)


# ---------------------------------------------------------------------------------------------------
# Strides (the striped layout's shards), the ring's contract: Mask.local(..., q_stride, k_stride),
# LocalMask.kinds "strided", Mask.any_visible.
# ---------------------------------------------------------------------------------------------------

def test_triton_declares_every_kind_and_sdpa_only_causal():
    assert RECORDS["triton"].mask_kinds == MASK_KINDS
    assert RECORDS["sdpa_flash"].mask_kinds == RECORDS["sdpa_cudnn"].mask_kinds == {"causal"}


def test_local_mask_strides_slice_ids_and_report_strided():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]])
    lm = Mask(doc_ids=docs, window=2, sinks=1).local(1, 3, 0, 4, q_stride=3, k_stride=3)  # q 1, 4, 7; k 0, 3, 6, 9
    assert lm.q_doc_ids.tolist() == [[0, 1, 2]] and lm.k_doc_ids.tolist() == [[0, 1, 2, 3]]
    assert lm.k_sink.tolist() == [[True, True, False, True]]  # 0, 3 and 9 start documents; 6 is 2nd of its doc
    assert (lm.q_stride, lm.k_stride) == (3, 3) and "strided" in lm.kinds
    assert "strided" not in Mask(causal=False, doc_ids=docs).local(0, 3, 1, 3, q_stride=3, k_stride=3).kinds
    assert "strided" not in Mask().local(0, 4, 0, 4).kinds
    with pytest.raises(ValueError, match="covers 10 tokens"):
        Mask(doc_ids=docs).local(1, 4, 0, 2, q_stride=3)  # last query at position 10
    with pytest.raises(ValueError, match="q_stride"):
        Mask().local(0, 2, 0, 2, q_stride=0)
    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    rec = dataclasses.replace(RECORDS["sdpa_flash"], devices=("cpu",))
    assert "strided" in rec.missing(q, q, Mask().local(0, 4, 1, 4, q_stride=2, k_stride=2))


STRIDE_SPECS = [dict(causal=True), dict(causal=False, window=3), dict(causal=True, window=2, sinks=2, doc_ids=DOCS_24),
                dict(causal=True, block_sparse=(5, torch.tensor([[1, 0, 1, 0, 1], [1, 1, 0, 0, 0], [0, 1, 1, 0, 1],
                                                                 [1, 0, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)))]


@pytest.mark.parametrize("spec", range(len(STRIDE_SPECS)))
@pytest.mark.parametrize("qo,qs,sq,ko,ks,sk", [(1, 3, 8, 2, 3, 7), (0, 2, 12, 5, 1, 10), (3, 4, 5, 0, 4, 6)])
def test_reference_strides_match_pair_by_pair_mask(spec, qo, qs, sq, ko, ks, sk):
    kw = STRIDE_SPECS[spec]
    q, k, v, dout = _qkv(2, 24, 4, 2, 8, seed=spec + qs)
    q, dout, k, v = (t[:, :n].contiguous() for t, n in ((q, sq), (dout, sq), (k, sk), (v, sk)))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lm = Mask(**kw).local(qo, sq, ko, sk, q_stride=qs, k_stride=ks)
    from seqpar.ops.attention.reference import attention as ref_attention
    out, lse = ref_attention(q, k, v, lm)
    (out * dout).sum().backward()
    visible = mask_matrix(2, 25, **kw)[:, qo::qs][:, :sq][:, :, ko::ks][:, :, :sk] if "block_sparse" in kw else \
        mask_matrix(2, 24, **kw)[:, qo::qs][:, :sq][:, :, ko::ks][:, :, :sk]
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, visible=visible)
    (ref_out * dout).sum().backward()
    torch.testing.assert_close(out, ref_out, **FP64_TOL)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    for got, ref in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, ref, **FP64_TOL)


@pytest.mark.parametrize("spec", [dict(causal=True), dict(causal=False, window=3), dict(causal=True, window=2),
                                  dict(causal=True, window=1, sinks=2, doc_ids=DOCS_24),
                                  dict(causal=False, doc_ids=DOCS_24), STRIDE_SPECS[3]])
def test_any_visible_never_misses_a_visible_pair(spec):
    """False must be a proof (checked against the pair-by-pair mask); exact for unit strides without documents."""
    s = 25 if "block_sparse" in spec else 24
    m, full = Mask(**spec), mask_matrix(2, s, **spec)
    exact = spec.get("doc_ids") is None and spec.get("block_sparse") is None
    for qo, qs, sq, ko, ks, sk in [(0, 1, 6, 6, 1, 6), (12, 1, 6, 0, 1, 6), (6, 1, 6, 6, 1, 6), (0, 1, 6, 18, 1, 6),
                                   (1, 4, 6, 2, 4, 5), (16, 1, 8, 0, 1, 5), (3, 1, 4, 17, 1, 7), (5, 3, 6, 0, 3, 2)]:
        truth = bool(full[:, qo::qs][:, :sq][:, :, ko::ks][:, :, :sk].any())
        got = m.any_visible(qo, sq, ko, sk, q_stride=qs, k_stride=ks)
        assert got or not truth, (qo, qs, sq, ko, ks, sk)
        if exact and qs == ks == 1:
            assert got == truth, (qo, sq, ko, sk)
    assert not m.any_visible(0, 0, 0, 4)


def test_window_on_contiguous_shards_needs_few_ring_steps():
    """A window W on shards of M tokens reaches ceil(W / M) earlier shards, so the ring can skip the rest."""
    m, n, shard = Mask(window=5), 8, 4
    for rank in range(n):
        steps = [s for s in range(n) if m.any_visible(rank * shard, shard, ((rank - s) % n) * shard, shard)]
        assert steps == [s for s in range(min(rank, 2) + 1)]  # ceil(5 / 4) = 2 earlier shards


# ---------------------------------------------------------------------------------------------------
# Bad input: one ValueError naming the field and the fix.
# ---------------------------------------------------------------------------------------------------

def test_bad_mask_inputs_name_the_field():
    q = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match=r"Mask\.doc_ids covers 6 tokens"):
        attention_with_lse(q, q, q, mask=Mask(doc_ids=torch.zeros(2, 6, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"Mask\.doc_ids has batch 1"):
        attention_with_lse(q, q, q, mask=Mask(doc_ids=torch.zeros(1, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"Mask\.block_sparse covers 4 tokens"):
        attention_with_lse(q, q, q, mask=Mask(block_sparse=(2, torch.ones(2, 2, dtype=torch.bool))))
    with pytest.raises(ValueError, match="q_doc_ids must be non-decreasing"):
        attention_with_lse(q, q, q, q_doc_ids=torch.tensor([[0, 1, 0, 1, 2, 2, 3, 3]] * 2),
                           k_doc_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="window_left must be an int >= 0"):
        attention_with_lse(q, q, q, window_left=-1)
    with pytest.raises(ValueError, match=r"backend='sdpa_cudnn' does not support document masks; use backend="):
        attention_with_lse(q.half(), q.half(), q.half(), mask=Mask(doc_ids=torch.zeros(2, 8, dtype=torch.long)),
                           backend="sdpa_cudnn")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_attention_rejects_integer_dtypes_and_head_dim_zero(backend):
    """Issue 18 item 10: int64 inputs used to come back as int64, head_dim 0 raised ZeroDivisionError."""
    x = torch.ones(1, 4, 2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="floating-point q, k, v"):
        attention_with_lse(x, x, x, backend=backend)
    z = torch.zeros(1, 4, 2, 0)
    with pytest.raises(ValueError, match="head_dim >= 1"):
        attention_with_lse(z, z, z, backend=backend)
