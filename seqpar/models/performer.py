"""Performer: FAVOR+ attention (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

The softmax kernel ``SM(x, y) = exp(x^T y)`` is estimated with positive random features (Sec. 2.3, Lemma 1)

    phi(x) = exp(-|x|^2 / 2) / sqrt(m) * [exp(w_1^T x), ..., exp(w_m^T x)],   E[phi(x)^T phi(y)] = exp(x^T y),

with ``w_i`` orthogonal random features (Sec. 2.4: blocks of d orthogonal directions, each row rescaled to the
norm of a d-dim Gaussian so every ``w_i`` is marginally ``N(0, I_d)`` and the estimator stays unbiased).
Queries and keys enter as ``x = q * scale^(1/2)`` so ``x^T y = scale * q^T k``. Attention is then
``D^-1 (phi(Q) (phi(K)^T V))`` with ``D = diag(phi(Q) phi(K)^T 1)`` (Sec. 2.2, eq. 4), and the causal
(unidirectional) form uses prefix sums ``S_i = sum_{j<=i} phi(k_j) v_j^T`` (Sec. 2.2 / App. B.1).

Numerically safe chunked form: the prefix sums run over chunks of ``model.performer_chunk`` keys; each
chunk's features are computed with a stabiliser (the chunk's max exponent) and the carried state is rescaled
to the running max, as an online softmax does, so no ``exp`` overflows at any length. A query's own
stabiliser (its max exponent) cancels between numerator and denominator. Both stabilisers are detached:
they are constants of the exact formula, which does not depend on them.

Not built: periodic feature redrawing (App. "feature redrawing"); the features are drawn once per layer at
init from the seed (same on every rank, rebuilt identically on resume). One sequence per process (cp=1).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from seqpar.models.llama import AttnFn, Llama
from seqpar.ops.attention.mask import Mask


def orthogonal_gaussian(m: int, d: int, *, generator: Optional[torch.Generator] = None,
                        dtype=torch.float32) -> Tensor:
    """``[m, d]`` orthogonal random features: ceil(m/d) independent d x d orthogonal blocks (QR of a Gaussian),
    rows rescaled to chi(d)-distributed norms (Choromanski et al. 2021, Sec. 2.4)."""
    g = torch.randn(math.ceil(m / d), d, d, generator=generator, dtype=torch.float64)
    qmat, r = torch.linalg.qr(g)  # [n_blocks, d, d], orthonormal columns
    # Sign fix (Mezzadri 2007): LAPACK's Q is not Haar-distributed until each column takes the sign of R's
    # diagonal; without it the features are not marginally Gaussian and the estimator is biased.
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    w = qmat.transpose(-2, -1).reshape(-1, d)[:m]  # rows: orthogonal within each block
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


def _log_features(x: Tensor, w: Tensor) -> Tensor:
    """``x [..., d], w [m, d] -> [..., m]``: the exponents ``w_i^T x - |x|^2 / 2`` of FAVOR+'s positive features."""
    return torch.einsum("...d,md->...m", x, w) - 0.5 * (x * x).sum(-1, keepdim=True)


def favor_features(x: Tensor, w: Tensor) -> Tensor:
    """``phi(x) [..., m]`` exactly as Lemma 1 writes it (no stabiliser): for references and tests."""
    return torch.exp(_log_features(x, w)) / math.sqrt(w.shape[0])


def favor_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, causal: bool, softmax_scale: float,
                    chunk: int = 64) -> Tensor:
    """FAVOR+ attention. ``q [B, S, H, D]``, ``k/v [B, S, H, D]`` (same heads), ``w [m, D]`` -> ``[B, S, H, D]``.

    Raises ValueError when the shapes do not match.
    """
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"favor_attention needs q, k of one shape and v of k's [B, S, H]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}.")
    r = softmax_scale ** 0.5
    lq = _log_features(q * r, w)  # [B, S, H, m]
    lk = _log_features(k * r, w)
    qf = torch.exp(lq - lq.amax(-1, keepdim=True).detach())  # per-query constant: cancels in the ratio
    if not causal:
        mk = lk.amax(dim=(1, 3), keepdim=True).detach()  # [B, 1, H, 1]: one constant for all keys
        kf = torch.exp(lk - mk)
        kv = torch.einsum("bshm,bshd->bhmd", kf, v)
        num = torch.einsum("bshm,bhmd->bshd", qf, kv)
        den = torch.einsum("bshm,bhm->bsh", qf, kf.sum(1))
        return num / den[..., None]
    B, S, H, _ = q.shape
    state = v.new_zeros(B, H, w.shape[0], v.shape[-1])  # sum phi(k) v^T, scaled by exp(-run)
    norm = v.new_zeros(B, H, w.shape[0])  # sum phi(k), same scale
    run = torch.full((B, 1, H, 1), -math.inf, dtype=lk.dtype, device=lk.device)
    outs = []
    for s0 in range(0, S, chunk):
        lkc, qc, vc = lk[:, s0:s0 + chunk], qf[:, s0:s0 + chunk], v[:, s0:s0 + chunk]
        new = torch.maximum(run, lkc.amax(dim=(1, 3), keepdim=True).detach())  # [B, 1, H, 1]
        decay = torch.exp(run - new).view(B, H, 1)  # rescale the carried state to the new stabiliser
        state, norm = state * decay[..., None], norm * decay
        kc = torch.exp(lkc - new)  # [B, C, H, m]
        scores = torch.einsum("bihm,bjhm->bhij", qc, kc).tril()  # causal inside the chunk
        num = torch.einsum("bhij,bjhd->bihd", scores, vc) + torch.einsum("bihm,bhmd->bihd", qc, state)
        den = scores.sum(-1).transpose(1, 2) + torch.einsum("bihm,bhm->bih", qc, norm)
        outs.append(num / den[..., None])
        state = state + torch.einsum("bjhm,bjhd->bhmd", kc, vc)
        norm = norm + kc.sum(1)
        run = new
    return torch.cat(outs, 1)


class FavorAttention(nn.Module):
    """One layer's FAVOR+ attention with its random features (a buffer, redrawn by :meth:`reset`)."""

    def __init__(self, head_dim: int, n_features: int, chunk: int, n_rep: int):
        super().__init__()
        self.head_dim, self.n_features, self.chunk, self.n_rep = head_dim, n_features, chunk, n_rep
        self.register_buffer("features", orthogonal_gaussian(n_features, head_dim), persistent=False)

    @torch.no_grad()
    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        self.features.copy_(orthogonal_gaussian(self.n_features, self.head_dim, generator=generator))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                mask: Optional[Mask] = None) -> Tensor:
        """The ``attn_fn`` interface of :class:`Llama`: ``q [B,S,H,D]``, ``k/v [B,S,Hkv,D]``; a ``mask`` may only
        say causal or not (FAVOR+ has no windows or documents). Raises ValueError otherwise."""
        if mask is not None:
            if mask.kinds - {"causal"}:
                raise ValueError(f"Performer attention supports only a (non-)causal Mask; got {sorted(mask.kinds)}.")
            causal = mask.causal
        if self.n_rep > 1:  # GQA: the prefix sums are per query head
            k, v = k.repeat_interleave(self.n_rep, 2), v.repeat_interleave(self.n_rep, 2)
        # Prefix sums and exponents in fp32 at least, also under bf16 autocast (a bf16 running sum loses the past).
        dt = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            out = favor_attention(q.to(dt), k.to(dt), v.to(dt), self.features.to(dt), causal=causal,
                                  softmax_scale=softmax_scale, chunk=self.chunk)
        return out.to(v.dtype)


class PerformerLlama(Llama):
    """The Llama decoder with FAVOR+ in every layer (``model.attention=performer``); ``attn_fn`` is unused."""

    def __init__(self, cfg, attn_fn: Optional[AttnFn] = None):
        super().__init__(cfg, attn_fn)
        for layer in self.layers:  # an nn.Module attribute: each layer owns its features
            layer.attention.attn_fn = FavorAttention(cfg.head_dim, cfg.performer_features, cfg.performer_chunk,
                                                     cfg.n_heads // cfg.kv_heads)

    def set_attn_fn(self, attn_fn: Optional[AttnFn]) -> None:
        raise ValueError("model.attention=performer computes its own attention; it takes no attn_fn.")

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        super().init_weights(generator)
        for layer in self.layers:  # after a meta-device build the buffers are empty: redraw them too
            if isinstance(layer.attention.attn_fn, FavorAttention):
                gen = generator if generator is None or generator.device.type == "cpu" else None
                layer.attention.attn_fn.reset(gen)

    def attention_mask(self, doc_ids: Optional[Tensor]) -> Optional[Mask]:
        if doc_ids is not None:
            raise ValueError("model.attention=performer has no document mask; pass doc_ids=None "
                             "(data.doc_mask=false).")
        return None if self.cfg.causal else Mask(causal=False)
