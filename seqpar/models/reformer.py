"""Reformer's LSH attention (Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer", ICLR, Sec. 2).

* Shared-QK (Sec. 2, "Shared-QK Transformer"): keys are the unit-normalised queries, ``k_j = q_j / |q_j|``; the
  layer's own key projection is not used.
* Angular LSH (Sec. 2, "Locality sensitive hashing"): ``h(x) = argmax([xR; -xR])`` with a random rotation
  ``R [D, n_buckets/2]``, one per hash round (drawn once at init, a buffer; trax redraws per call).
* Sorted chunks (Sec. 2, "LSH attention", Fig. 2): tokens are sorted by (bucket, position) and cut into chunks of
  ``m`` tokens; a query attends to keys of its own and the previous chunk that are in its bucket, causal by
  position, and never to itself unless nothing else is visible (its score is -1e5, others -inf when masked).
* Multi-round (Sec. 2, "Multi-round LSH attention", eq. 6-7): rounds are merged through their log-sum-exp, and a
  key seen in ``N_ij`` rounds has ``log N_ij`` subtracted from its score, so the result is exactly softmax
  attention over the UNION of the keys the rounds let i see (what the test checks against a float64 definition).

The causal leak of the original design: a query's chunk depends on how many tokens sort before it, i.e. on the
buckets of LATER tokens, so changing token t can move an earlier query into another chunk and change its output
(``tests/unit/test_architectures_reformer.py`` measures it). ``model.reformer_leak_free=true`` (the default, for LM
training) replaces the chunk rule by a sliding window in sorted order: i sees same-bucket keys j <= i with at most
``m`` tokens sorted between them; tokens sorted between two tokens of one bucket are that bucket's tokens between
them in position, so the set depends on tokens <= i only.

Reversible residual layers (Sec. 3): ``model.reformer_reversible`` (:mod:`seqpar.models.reversible`); the
chunked feed-forward (Sec. 3) is ``train.ffn_chunk``. Not built: document masks; cp > 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from seqpar.models.llama import AttnFn, Llama
from seqpar.ops.attention.mask import Mask
from seqpar.ops.rope import rope_cos_sin

SELF_SCORE = -1e5  # Sec. 2: attend to yourself only when nothing else is visible


def lsh_buckets(x: Tensor, rotations: Tensor) -> Tensor:
    """Angular LSH: ``x [B, H, S, D]``, ``rotations [R, D, n_buckets/2]`` -> buckets ``[R, B, H, S]`` int64."""
    rot = torch.einsum("bhsd,rdk->rbhsk", x, rotations.to(x.dtype))
    return torch.cat([rot, -rot], -1).argmax(-1)


def lsh_attention(q: Tensor, v: Tensor, rotations: Tensor, *, chunk: int, softmax_scale: float,
                  leak_free: bool = True) -> Tensor:
    """Causal shared-QK LSH attention. ``q [B, S, H, D]``, ``v [B, S, H, Dv]`` -> ``[B, S, H, Dv]``.

    Raises ValueError when ``chunk`` does not divide S.
    """
    B, S, H, D = q.shape
    if S % chunk:
        raise ValueError(f"model.reformer_chunk={chunk} must divide the sequence length {S}.")
    qh, vh = q.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    kh = qh / qh.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # shared-QK: unit-norm keys
    buckets = lsh_buckets(qh, rotations)  # [R, B, H, S]
    R, nc = rotations.shape[0], S // chunk
    pos = torch.arange(S, device=q.device)
    perm = torch.argsort(buckets * S + pos, -1)  # sort by (bucket, position)
    inv = torch.argsort(perm, -1)  # sorted index of each token
    # Candidates of sorted query s (chunk c): sorted keys [(c-1) m, (c+1) m), the previous chunk of chunk 0 empty.
    s_q = torch.arange(S, device=q.device).view(nc, chunk)  # [nc, m]
    s_k = (s_q[:, :1] - chunk + torch.arange(2 * chunk, device=q.device)).view(nc, 2 * chunk)  # [nc, 2m]
    in_range = s_k >= 0
    s_k = s_k.clamp_min(0)

    outs, lses = [], []
    for r in range(R):
        tq = perm[r][..., s_q]  # [B, H, nc, m] token index of each sorted query
        tk = perm[r][..., s_k]  # [B, H, nc, 2m]
        tq_, tk_ = tq[..., :, None], tk[..., None, :]
        vis = _visible_all(buckets, inv, tq_, tk_, chunk, leak_free, r) & in_range[:, None, :]
        # N_ij: in how many rounds j is visible to i (eq. 6-7), counted on the same pairs.
        n = sum(_visible_all(buckets, inv, tq_, tk_, chunk, leak_free, r2).to(q.dtype) for r2 in range(R))
        qs, ks, vs = _gather(qh, tq), _gather(kh, tk), _gather(vh, tk)  # [B, H, nc, m|2m, D]
        scores = torch.einsum("bhcid,bhcjd->bhcij", qs, ks) * softmax_scale
        scores = torch.where(tq_ == tk_, torch.full_like(scores, SELF_SCORE), scores)
        scores = (scores - torch.log(n.clamp_min(1.0))).masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(scores, -1, keepdim=True)  # [B, H, nc, m, 1]
        o = torch.einsum("bhcij,bhcjd->bhcid", torch.exp(scores - lse), vs)
        # back to token order: sorted query (c, i) is token tq[c, i]
        outs.append(_scatter(o, tq, S))
        lses.append(_scatter(lse, tq, S))
    lse_all = torch.stack(lses)  # [R, B, H, S, 1]
    w = torch.softmax(lse_all, 0)  # eq. 6: weights exp(lse_r - logsumexp_r lse_r)
    out = (w * torch.stack(outs)).sum(0)  # [B, H, S, Dv]
    return out.transpose(1, 2)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """``t [B, H, S]`` at token indices ``idx [B, H, ...]``."""
    return torch.gather(t, -1, idx.reshape(*idx.shape[:2], -1)).view(idx.shape)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, H, S, D]`` at ``idx [B, H, nc, n]`` -> ``[B, H, nc, n, D]``."""
    flat = idx.reshape(*idx.shape[:2], -1, 1).expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 2, flat).view(*idx.shape, x.shape[-1])


def _scatter(y: Tensor, idx: Tensor, S: int) -> Tensor:
    """Inverse of :func:`_gather` for a permutation ``idx [B, H, nc, m]`` of the S tokens: ``[B, H, S, D]``."""
    out = y.new_empty(*y.shape[:2], S, y.shape[-1])
    flat = idx.reshape(*idx.shape[:2], -1, 1).expand(-1, -1, -1, y.shape[-1])
    return out.scatter(2, flat, y.reshape(*y.shape[:2], -1, y.shape[-1]))


def _visible_all(buckets: Tensor, inv: Tensor, tq: Tensor, tk: Tensor, chunk: int, leak_free: bool, r: int) -> Tensor:
    """Pairs of tokens ``tq [B, H, nc, m, 1]``, ``tk [B, H, nc, 1, 2m]`` visible in round r (self included)."""
    shape = torch.broadcast_shapes(tq.shape, tk.shape)
    tq, tk = tq.expand(shape), tk.expand(shape)
    same = _take(buckets[r], tq) == _take(buckets[r], tk)
    sq, sk = _take(inv[r], tq), _take(inv[r], tk)
    if leak_free:
        near = (sq >= sk) & (sq - sk <= chunk)
    else:
        near = (sk // chunk >= sq // chunk - 1) & (sk // chunk <= sq // chunk)
    return same & near & (tk <= tq)


class LSHAttention(nn.Module):
    """One layer's random rotations (a buffer) and LSH attention in the ``attn_fn`` interface."""

    def __init__(self, head_dim: int, n_buckets: int, rounds: int, chunk: int, leak_free: bool, n_rep: int):
        super().__init__()
        self.shape = (rounds, head_dim, n_buckets // 2)
        self.chunk, self.leak_free, self.n_rep = chunk, leak_free, n_rep
        self.register_buffer("rotations", torch.randn(self.shape), persistent=False)

    @torch.no_grad()
    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        self.rotations.copy_(torch.randn(self.shape, generator=generator))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                mask: Optional[Mask] = None) -> Tensor:
        """``q [B,S,H,D]``, ``v [B,S,Hkv,D]`` (``k`` unused: shared-QK). Raises ValueError for a mask or a
        non-causal call."""
        if mask is not None or not causal:
            raise ValueError("model.attention=reformer is causal LSH attention without other masks; pass doc_ids=None.")
        if self.n_rep > 1:
            v = v.repeat_interleave(self.n_rep, 2)
        dt = torch.promote_types(q.dtype, torch.float32)  # hashes and log-sum-exps in fp32 at least
        with torch.autocast(q.device.type, enabled=False):
            out = lsh_attention(q.to(dt), v.to(dt), self.rotations.to(dt), chunk=self.chunk,
                                softmax_scale=softmax_scale, leak_free=self.leak_free)
        return out.to(v.dtype)


class ReformerLlama(Llama):
    """The Llama decoder with Reformer's LSH attention in every layer (``model.attention=reformer``)."""

    def __init__(self, cfg, attn_fn: Optional[AttnFn] = None):
        super().__init__(cfg, attn_fn)
        for layer in self.layers:
            layer.attention.attn_fn = LSHAttention(cfg.head_dim, cfg.reformer_buckets, cfg.reformer_rounds,
                                                   cfg.reformer_chunk, cfg.reformer_leak_free,
                                                   cfg.n_heads // cfg.kv_heads)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        super().init_weights(generator)
        for layer in self.layers:
            if isinstance(layer.attention.attn_fn, LSHAttention):
                layer.attention.attn_fn.reset(generator if generator is None or generator.device.type == "cpu" else None)

    def attention_mask(self, doc_ids: Optional[Tensor]) -> Optional[Mask]:
        if doc_ids is not None:
            raise ValueError("model.attention=reformer has no document mask; pass doc_ids=None (data.doc_mask=false).")
        return None

    def forward(self, tokens: Tensor, positions: Tensor, *, doc_ids: Optional[Tensor] = None) -> Tensor:
        """As :meth:`Llama.forward`; with ``model.reformer_reversible`` the blocks are reversible residual layers
        (:mod:`seqpar.models.reversible`, Reformer Sec. 3)."""
        if not self.cfg.reformer_reversible:
            return super().forward(tokens, positions, doc_ids=doc_ids)
        from seqpar.models.reversible import reversible_stack

        if tokens.shape != positions.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must both be [B, S].")
        mask = self.attention_mask(doc_ids)
        h = self.tok_embeddings(tokens)  # [B, S] -> [B, S, dim]
        cos, sin = rope_cos_sin(positions, self._rope_inv_freq(positions.device), self.rope_attention_scale)
        return self.norm(reversible_stack(self.layers, h, cos, sin, mask))
