"""Naive float64 attention: the obviously-correct reference every kernel is compared with.

Materialises the full score matrix, so only for small sizes. Shapes follow the public contract:
q ``[B, Sq, H, D]``, k/v ``[B, Sk, Hkv, D]``, lse ``[B, H, Sq]``.
"""
from __future__ import annotations

import math

import torch


def naive_attention(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, window_left=None,
                    q_doc_ids=None, k_doc_ids=None, visible=None):
    """Returns (out, lse) in float64; rows with no visible key give out 0 and lse -inf.

    ``visible``: an explicit boolean ``[B, Sq, Sk]`` mask (True = attend), ANDed with the keywords'.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k.repeat_interleave(h // hkv, dim=2)  # [B, Sk, H, D]: head h uses kv head h // G
    v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    qpos = torch.arange(sq)[:, None] + q_offset
    kpos = torch.arange(sk)[None, :] + k_offset
    mask = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        mask &= qpos >= kpos
    if window_left is not None:
        mask &= (qpos - kpos) <= window_left
    mask = mask[None, None].expand(b, h, sq, sk)
    if q_doc_ids is not None:
        mask = mask & (q_doc_ids[:, :, None] == k_doc_ids[:, None, :])[:, None]
    if visible is not None:
        mask = mask & visible[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None]).masked_fill(~mask, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def mask_matrix(b, s, *, causal=True, window=None, sinks=0, doc_ids=None, block_sparse=None):
    """The visibility ``[B, S, S]`` of ``seqpar.ops.Mask``, written out pair by pair from its contract:
    key j is visible to query i iff same document, ``j <= i`` when causal, ``|i - j|`` within the window
    (left only when causal) or j among the first ``sinks`` tokens of its document, and the block entry."""
    out = torch.zeros(b, s, s, dtype=torch.bool)
    for r in range(b):
        doc = [0] * s if doc_ids is None else [int(x) for x in doc_ids[r]]
        for i in range(s):
            for j in range(s):
                if doc[i] != doc[j] or (causal and j > i):
                    continue
                if window is not None:
                    in_window = i - j <= window and (causal or j - i <= window)
                    sink = j - doc.index(doc[j]) < sinks  # position of j within its document
                    if not (in_window or sink):
                        continue
                if block_sparse is not None and not bool(block_sparse[1][i // block_sparse[0], j // block_sparse[0]]):
                    continue
                out[r, i, j] = True
    return out


def global_mask_case(spec):
    """``(LocalMask, dict(visible=...))`` of a case ``(B, Sq, Sk, H, Hkv, D, dtype, opts)`` with
    ``opts = dict(mask=Mask kwargs (lists allowed), S=global length, q=(offset, stride), k=(offset, stride))``:
    ``Mask(...).local`` with strides, and the pair-by-pair visibility ``[B, Sq, Sk]`` of those rows and keys."""
    from seqpar.ops import Mask
    b, sq, sk, *_, opts = spec
    kw = dict(opts["mask"])
    if kw.get("doc_ids") is not None:
        kw["doc_ids"] = torch.as_tensor(kw["doc_ids"])
    if kw.get("block_sparse") is not None:
        kw["block_sparse"] = (kw["block_sparse"][0], torch.as_tensor(kw["block_sparse"][1]))
    s = opts.get("S", max(sq, sk))
    (qo, qs), (ko, ks) = opts.get("q", (0, 1)), opts.get("k", (0, 1))
    local = Mask(**kw).local(qo, sq, ko, sk, q_stride=qs, k_stride=ks)
    vis = mask_matrix(b, s, **kw)[:, qo::qs][:, :sq][:, :, ko::ks][:, :, :sk]  # [B, Sq, Sk]
    return local, dict(visible=vis)
