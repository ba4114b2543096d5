"""Shared cases of the all-gather and Ulysses pipelining tests (tests/distributed/test_*_overlap.py): the same
documents, inputs, one sharded forward + backward through out AND lse, and the naive float64 reference.

A case is a dict with ``name`` (its prefix before ``-s<slices>`` seeds the inputs, so every slice count of a case
sees the same data), ``layout``, ``h`` / ``hkv`` heads and ``slices``; ``spec`` is its mask: None (causal=True),
"docs" (the documents below) or Mask keyword arguments.
"""
import torch

from reference import mask_matrix, naive_attention


def doc_ids(s):
    """``[2, s]``: a one-token document and a few long ones in row 0, two halves in row 1."""
    cuts = [0, 3, 4, s // 3, s // 2 + 1, s - 5, s]
    row0 = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))])
    return torch.stack([row0, (torch.arange(s) >= s // 2).long()])


def mask_kwargs(spec, s):
    return None if spec is None else dict(doc_ids=doc_ids(s)) if spec == "docs" else dict(spec)


def inputs(case, s):
    """q, k, v, dout ``[2, s, heads, 8]`` and dlse ``[2, h, s]`` in float64, the same for every slice count."""
    g = torch.Generator().manual_seed(sum(map(ord, case["name"].rsplit("-s", 1)[0])) + s)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    h, hkv = case["h"], case["hkv"]
    return mk(2, s, h, 8), mk(2, s, hkv, 8), mk(2, s, hkv, 8), mk(2, s, h, 8), mk(2, h, s)


def run_case(attn_with_lse, case, spec, s, **kwargs):
    """This rank's shard through ``attn_with_lse`` (backend torch), backward of out . dout + lse . dlse; returns the
    unsharded out, lse and gradients (every rank returns the whole sequence)."""
    from seqpar.ops import Mask
    from seqpar.parallel import shard_sequence, unshard_sequence

    layout, kw, ids = case["layout"], mask_kwargs(spec, s), doc_ids(s)
    q, k, v, dout, dlse = inputs(case, s)
    shard = lambda x, dim=1: shard_sequence(x, dim, layout=layout, doc_ids=ids)
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    extra = dict(causal=True) if kw is None else dict(mask=Mask(**kw))
    out, lse = attn_with_lse(ql, kl, vl, layout=layout, backend="torch", slices=case["slices"], **extra, **kwargs)
    ((out * shard(dout)).sum() + (lse.nan_to_num(neginf=0.0) * shard(dlse, 2)).sum()).backward()
    un = lambda x, dim=1: unshard_sequence(x.detach(), dim, layout=layout, doc_ids=ids)
    return dict(out=un(out), lse=un(lse, 2), dq=un(ql.grad), dk=un(kl.grad), dv=un(vl.grad))


def reference(case, spec, s):
    """The naive float64 attention of the whole sequence: out, lse and the gradients of the same loss."""
    q, k, v, dout, dlse = inputs(case, s)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    kw = mask_kwargs(spec, s)
    out, lse = naive_attention(q, k, v, visible=mask_matrix(2, s, **({"causal": True} if kw is None else kw)))
    ((out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
