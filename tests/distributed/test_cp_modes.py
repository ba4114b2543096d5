"""The Ulysses, all-gather and hybrid (Ulysses x ring) context-parallel modes on 4 gloo processes.

One spawn runs every attention case (ulysses over 4, allgather over 4, hybrid 2 x 2) and the whole-model
cases; the parent compares each case's gathered out, lse and gradients (through out AND lse) with a naive
float64 attention under the contract's explicit boolean mask (``tests/reference.py: mask_matrix``), and each
model's loss and gradients with cp=1. Bad input must raise one clear error on every rank (no hang).
"""
import functools
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from reference import mask_matrix, naive_attention

N, U = 4, 2  # 4 cp ranks; hybrid: Ulysses groups of 2 consecutive ranks, ring of 2 across
L = 8  # local tokens (the docs layout cuts 4 chunks per rank)
S = N * L
# float64 against float64: only summation order differs.
TOL = dict(atol=1e-10, rtol=1e-10)
DOCS = torch.tensor([[0] * 3 + [1] + [2] * 7 + [4] * 13 + [5] * (S - 24), [0] * 8 + [1] * 8 + [2] * (S - 16)])
MASKS = {  # name -> Mask kwargs (None: the causal=True flag, no Mask)
    "causal": None,
    "full": dict(causal=False),
    "docs": dict(doc_ids=DOCS),
    "docs-window-sinks": dict(window=3, sinks=1, doc_ids=DOCS),
    "two-sided-window": dict(causal=False, window=5),
    "block-sparse": dict(block_sparse=(4, (torch.rand(S // 4, S // 4, generator=torch.Generator().manual_seed(3))
                                           < 0.5) | torch.eye(S // 4, dtype=torch.bool))),
}
MODE_LAYOUTS = {"ulysses": ("zigzag", "striped", "contiguous", "docs"),
                "allgather": ("zigzag", "striped", "contiguous", "docs"),
                "hybrid": ("zigzag", "contiguous")}
HEADS = {"ulysses": ((8, 2), (8, 8)), "allgather": ((8, 2), (8, 8)), "hybrid": ((8, 2), (8, 8), (8, 1))}


def _cases():
    out = []
    for mode, layouts in MODE_LAYOUTS.items():
        for mname, kw in MASKS.items():
            for layout in layouts:
                if layout == "docs" and (kw is None or "doc_ids" not in kw):
                    continue
                for h, hkv in HEADS[mode]:
                    out.append(dict(name=f"{mode}-{mname}-{layout}-{h}/{hkv}", mode=mode, mask=mname,
                                    layout=layout, h=h, hkv=hkv))
    return out


def _inputs(case):
    g = torch.Generator().manual_seed(sum(map(ord, case["name"])))
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    h, hkv = case["h"], case["hkv"]
    return mk(2, S, h, 8), mk(2, S, hkv, 8), mk(2, S, hkv, 8), mk(2, S, h, 8), mk(2, h, S)


def _attn(mode, groups):
    from seqpar.parallel import allgather_attention_with_lse, hybrid_attention_with_lse, ulysses_attention_with_lse

    if mode == "hybrid":
        return functools.partial(hybrid_attention_with_lse, ulysses_group=groups[0], ring_group=groups[1])
    return ulysses_attention_with_lse if mode == "ulysses" else allgather_attention_with_lse


def _run_case(case, groups):
    from seqpar.ops import Mask
    from seqpar.parallel import shard_sequence, unshard_sequence

    kw = MASKS[case["mask"]]
    mask = None if kw is None else Mask(**kw)
    ids, layout = DOCS, case["layout"]
    q, k, v, dout, dlse = _inputs(case)
    shard = lambda x, dim=1: shard_sequence(x, dim, layout=layout, doc_ids=ids)
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    extra = dict(causal=True) if mask is None else dict(mask=mask)
    out, lse = _attn(case["mode"], groups)(ql, kl, vl, layout=layout, backend="torch", **extra)
    ((out * shard(dout)).sum() + (lse.nan_to_num(neginf=0.0) * shard(dlse, 2)).sum()).backward()
    un = lambda x, dim=1: unshard_sequence(x.detach(), dim, layout=layout, doc_ids=ids)
    return dict(out=un(out), lse=un(lse, 2), dq=un(ql.grad), dk=un(kl.grad), dv=un(vl.grad))


# ------------------------------------------------------------------------------ whole model
def _model_cfg():
    from seqpar.config import ModelConfig

    return ModelConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 53, (2, S), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    return tokens, labels, torch.arange(S).expand(2, S).contiguous()


def _loss_and_grads(attn_fn=None, shard=lambda t: t, reduce=None, doc_ids=None):
    from seqpar.models import Llama

    torch.manual_seed(0)
    model = Llama(_model_cfg()).to(torch.float64)
    if attn_fn is not None:
        model.set_attn_fn(attn_fn)
    tokens, labels, positions = (shard(t) for t in _batch())
    kw = {} if doc_ids is None else {"doc_ids": doc_ids}
    loss_sum, n_tok = model.loss(model(tokens, positions, **kw), labels, chunk_size=5)
    n_tok = n_tok.clone()
    if reduce is not None:
        reduce(n_tok)
    loss = loss_sum / n_tok
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


MODEL_CASES = [("hybrid", "zigzag", False), ("hybrid", "contiguous", True), ("ulysses", "striped", True),
               ("allgather", "docs", True), ("ulysses", "zigzag", False)]


def _run_model(mode, layout, docs, groups):
    import torch.distributed as dist

    from seqpar.parallel import make_cp_attn_fn, shard_sequence

    fn = make_cp_attn_fn(mode, group=None, ulysses_group=groups[0], ring_group=groups[1], layout=layout,
                         backend="torch", validate="first", allgather_slices=2,  # 2 KV heads: 2 pipelined slices
                         ulysses_chunks=2)
    ids = DOCS if docs else None
    loss, grads = _loss_and_grads(fn, lambda t: shard_sequence(t, 1, layout=layout, doc_ids=DOCS), dist.all_reduce,
                                  doc_ids=ids)
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    return loss, grads


# ------------------------------------------------------------------------------ bad input
def _bad(groups):
    from seqpar.parallel import allgather_attention, hybrid_attention, ulysses_attention

    msgs = {}
    x6 = torch.randn(1, L, 6, 8)  # 6 heads: not divisible by 4 (ulysses) nor by ... 2 is fine
    x3 = torch.randn(1, L, 3, 8)  # 3 heads: divides neither group
    cases = {"ulysses-heads": lambda: ulysses_attention(x6, x6, x6, causal=True, backend="torch"),
             "hybrid-heads": lambda: hybrid_attention(x3, x3, x3, ulysses_group=groups[0], ring_group=groups[1],
                                                      causal=True, backend="torch"),
             "hybrid-layout": lambda: hybrid_attention(x6, x6, x6, ulysses_group=groups[0], ring_group=groups[1],
                                                       layout="striped", backend="torch"),
             "allgather-docs": lambda: allgather_attention(x6, x6, x6, layout="docs", backend="torch")}
    for name, fn in cases.items():
        try:
            fn()
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    return msgs


def _worker(rank, n):
    from seqpar.parallel.mesh import new_cp_subgroups

    groups = new_cp_subgroups(1, n, U, rank)
    res = {c["name"]: _run_case(c, groups) for c in _cases()}
    res["models"] = {c: _run_model(*c, groups) for c in MODEL_CASES}
    res["bad"] = _bad(groups)
    res["after-bad"] = _run_case(_cases()[0], groups)  # the group is still usable
    return res


@functools.lru_cache(maxsize=None)
def _results():
    return run_distributed(_worker, N, timeout_s=180)


def _reference(case):
    q, k, v, dout, dlse = _inputs(case)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    kw = MASKS[case["mask"]]
    vis = mask_matrix(2, S, **({"causal": True} if kw is None else kw))
    out, lse = naive_attention(q, k, v, visible=vis)
    ((out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(MODE_LAYOUTS))
def test_mode_matches_float64(mode):
    ranks = _results()
    cases = [c for c in _cases() if c["mode"] == mode]
    assert len(cases) >= 20
    for case in cases:
        ref = _reference(case)
        for rank, res in enumerate(ranks):
            got = res[case["name"]]
            for key in ("out", "lse", "dq", "dk", "dv"):
                torch.testing.assert_close(got[key], ref[key], **TOL,
                                           msg=lambda m: f"{case['name']} rank {rank} {key}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_model_cp4_matches_cp1(case):
    ref_loss, ref_grads = _loss_and_grads(doc_ids=DOCS if case[2] else None)
    for rank, res in enumerate(_results()):
        loss, grads = res["models"][case]
        torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=1e-9)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-10, rtol=1e-9,
                                       msg=lambda m: f"{case} rank {rank} {name}: {m}")


@pytest.mark.timeout(300)
def test_bad_input_raises_everywhere():
    ranks = _results()
    for res in ranks:
        bad = res["bad"]
        assert "model.n_heads=6" in bad["ulysses-heads"] and "parallel.cp_comm=ring" in bad["ulysses-heads"]
        assert "parallel.cp_comm=allgather" in bad["ulysses-heads"]
        assert "model.n_heads=3" in bad["hybrid-heads"] and "parallel.ulysses" in bad["hybrid-heads"]
        assert "parallel.layout" in bad["hybrid-layout"] and "ulysses" in bad["hybrid-layout"]
        assert "doc_ids" in bad["allgather-docs"]
        assert res["after-bad"]["out"].shape == (2, S, 8, 8)
    assert len({tuple(sorted(r["bad"].items())) for r in ranks}) == 1  # the same message on every rank


# ------------------------------------------------------------------------------ single process
def test_hybrid_union_is_a_ring_shard():
    from seqpar.parallel import local_positions
    from seqpar.parallel.mesh import cp_subgroups
    from seqpar.parallel.ulysses import concat_positions

    assert cp_subgroups(1, 4, 2) == {"ulysses": [[0, 1], [2, 3]], "ring": [[0, 2], [1, 3]]}
    assert cp_subgroups(2, 4, 2)["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for n, u in ((4, 2), (8, 2), (8, 4), (6, 3)):
        for layout in ("zigzag", "contiguous"):
            s = 4 * n
            for i in range(n // u):
                union = concat_positions(s, range(i * u, (i + 1) * u), n, layout).sort().values
                assert torch.equal(union, local_positions(s, i, n // u, layout)), (n, u, layout, i)


def test_config_errors_name_fields_and_a_mode():
    from seqpar.config import ParallelConfig
    from seqpar.errors import ConfigError
    from seqpar.parallel import make_cp_attn_fn
    from seqpar.parallel.attention_fn import choose_mode

    bad = {dict(cp_comm="bogus").__repr__(): (dict(cp_comm="bogus"), ("parallel.cp_comm", "ring")),
           "u-not-dividing": (dict(cp=4, ulysses=3, cp_comm="hybrid"), ("parallel.ulysses=3", "parallel.cp=4", "ring")),
           "hybrid-u1": (dict(cp=4, cp_comm="hybrid"), ("parallel.ulysses", "cp_comm=ring")),
           "hybrid-striped": (dict(cp=4, ulysses=2, cp_comm="hybrid", layout="striped"), ("parallel.layout", "ulysses")),
           "ulysses-u": (dict(cp=8, ulysses=2, cp_comm="ulysses"), ("parallel.ulysses", "hybrid")),
           "slices": (dict(cp=2, cp_comm="allgather", allgather_slices=-1), ("parallel.allgather_slices", "0: auto")),
           "chunks": (dict(cp=2, cp_comm="ulysses", ulysses_chunks=-1), ("parallel.ulysses_chunks",))}
    for name, (kw, words) in bad.items():
        with pytest.raises(ConfigError) as e:
            ParallelConfig(**kw)
        assert all(w in str(e.value) for w in words), (name, str(e.value))
    assert ParallelConfig(cp=4, ulysses=2, cp_comm="hybrid").ulysses == 2
    with pytest.raises(ValueError, match="parallel.cp_comm='bogus'.*ring"):
        make_cp_attn_fn("bogus")
    model = SimpleNamespace(n_heads=6, kv_heads=2, head_dim=64, n_layers=2)
    train = SimpleNamespace(seq_len=4096, batch_size=1)
    cfg = lambda **p: SimpleNamespace(model=model, train=train, parallel=ParallelConfig(**p))
    with pytest.raises(ConfigError, match=r"model.n_heads=6.*parallel.cp_comm=ring"):
        choose_mode(cfg(cp=4, cp_comm="ulysses"))
    assert choose_mode(cfg(cp=4, cp_comm="auto")) in ("ring", "allgather")  # 6 heads: no ulysses/hybrid
    assert choose_mode(cfg(cp=4, cp_comm="ring")) == "ring"
    model.n_heads = 32
    assert choose_mode(cfg(cp=8, ulysses=4, cp_comm="auto")) in ("ring", "allgather", "ulysses", "hybrid")
