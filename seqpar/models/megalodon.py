"""MEGALODON (Ma et al. 2024, "MEGALODON: Efficient LLM Pretraining and Inference with Unlimited Context Length",
arXiv:2404.08801) as ``model.arch=megalodon``, behind the Llama interface.

One layer (Sec. 3, Fig. 3a and 3c), with ``X`` the block input:

    X_n = TimestepNorm(X)                                   Sec. 3.2  (seqpar.ops.timestep_norm)
    X'  = RMSNorm( CEMA(X_n) + omega * X_n )                Sec. 3.1  (seqpar.ops.cema; omega: MEGA's learned skip)
    Z   = X' W_z + b_z,   Z' = Z / ||Z|| per head           Sec. 3.3  normalized attention: no SiLU on Z
    Q   = kappa_q * Z' + mu_q,   K = kappa_k * Z' + mu_k    (MEGA eq. 4; RoPE on Q and K)
    V   = silu(X_n W_v + b_v)                               (MEGA eq. 5)
    O   = softmax(Q K^T) V   inside chunks of c tokens      Sec. 3.3: no 1/sqrt(d) temperature (kappa learns it);
                                                            chunk-wise causal as MEGA-chunk (Sec. 2)
    R   = silu(X' W_r + b_r)                                (MEGA eq. 7, the reset gate)
    H   = X' W_h + (R * O) W_o + b_h                        (MEGA eq. 9)
    Y   = X + H                                             pre-norm residual (Sec. 3.4)
    out = X + FFN(LayerNorm(Y))                             Sec. 3.4 two-hop residual: the FFN's residual is X, not Y

MEGA's update gate (eq. 8, 10) gives way to the plain pre-norm residual, and the final norm is a timestep norm,
both as in the authors' release (github.com/XuezheMax/megalodon). The FFN is Llama's SwiGLU (the paper's 7B).

The chunked attention is one call of the injected ``attn_fn`` under ``Mask(causal=True, doc_ids=index // c)``
(chunks as documents), so it runs on every backend that takes document masks, the Triton kernel included, and
needs no length divisible by ``c``. The value head dim may differ from the q/k head dim: the smaller of the two is
zero-padded (padding q and k with zeros leaves every score unchanged).

``parallel.cp > 1`` (``parallel.layout=contiguous``, each rank's length a multiple of ``c``): every attention chunk
lies on one rank, so attention is the plain local call; the sequential states cross ranks through an injected
:class:`~seqpar.parallel.state_pass.StateComm` (:meth:`Megalodon.set_state_comm`). Each timestep norm (every
layer's and the final one) all-gathers each shard's own statistics and starts from the merge of the earlier
shards' (:func:`~seqpar.ops.timestep_norm.norm_prefix`); each CEMA runs its shard from zero, all-gathers the final
states and adds the earlier shards' decayed share (:func:`~seqpar.ops.cema.cema_prefix`,
:func:`~seqpar.ops.cema.cema_carry`): exact, differentiable, two small all-gathers per layer.

Not built: document masks (CEMA and the timestep norm would carry state across documents): a ConfigError in
:func:`seqpar.config.model.check_architecture`, as are the other cp layouts and lengths.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from seqpar.errors import ConfigError
from seqpar.models.llama import AttnFn, FeedForward, Llama, RMSNorm, default_attention
from seqpar.ops.attention.mask import Mask
from seqpar.ops.cema import cema, cema_carry, cema_coefficients, cema_prefix
from seqpar.ops.rope import apply_rope, compute_inv_freq, rope_cos_sin
from seqpar.ops.timestep_norm import NormState, norm_prefix, norm_stats, timestep_norm


def _call(step, *args):
    return step(*args)


class TimestepNorm(nn.Module):
    """:func:`seqpar.ops.timestep_norm.timestep_norm` with a learned affine map (weight 1, bias 0 at init).
    ``state_comm`` (a :class:`~seqpar.parallel.state_pass.StateComm`, or None): start from the earlier cp shards'
    statistics."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.state_comm = None
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # cumulative statistics in fp32 at least
            state, comm, G = None, self.state_comm, self.groups
            if comm is not None:  # one all-gather of [B, 1 + 2G]: (count, mean, var) of every shard
                own = norm_stats(x, G)
                every = comm.all_gather(torch.cat([own.count[:, None], own.mean, own.var], -1))  # [N, B, 1 + 2G]
                state = norm_prefix(NormState(every[..., 0], every[..., 1:1 + G], every[..., 1 + G:]), comm.rank)
            return timestep_norm(x, G, self.weight, self.bias, self.eps, state=state)[0]


class CEMA(nn.Module):
    """MEGALODON's complex EMA (Sec. 3.1) over ``dim`` channels, ``ema_dim`` complex dimensions each, plus MEGA's
    learned skip ``omega * x``. Parameters are real: ``eta`` is stored as ``[dim, h, 2]`` (real, imaginary).
    ``state_comm`` (a :class:`~seqpar.parallel.state_pass.StateComm`, or None): continue the earlier cp shards'
    state (the shards must be of equal length)."""

    def __init__(self, dim: int, ema_dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim, ema_dim))  # logits of alpha, delta in (0, 1)
        self.delta = nn.Parameter(torch.zeros(dim, ema_dim))
        self.theta = nn.Parameter(torch.zeros(dim))  # logit of the base angle omega_j in (0, 1)
        self.beta = nn.Parameter(torch.ones(dim, ema_dim))  # expansion (MEGA eq. 2)
        self.eta = nn.Parameter(torch.zeros(dim, ema_dim, 2))  # projection (complex)
        self.omega = nn.Parameter(torch.zeros(dim))  # skip
        self.state_comm = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """The release's init: alpha, delta logits ~ N(0, 0.2); base angles log-spaced over the channels; eta's real
        part ~ N(0, 1/h), imaginary 0; beta 1; the skip ~ N(0, 0.25) truncated to [-1, 1]."""
        d, h = self.alpha.shape
        nn.init.normal_(self.alpha, 0.0, 0.2, generator=generator)
        nn.init.normal_(self.delta, 0.0, 0.2, generator=generator)
        omega = torch.exp(-math.log(d) / d * torch.arange(1, d + 1, dtype=torch.float64))  # in (0, 1)
        self.theta.copy_(torch.log(omega / (1 - omega)).clamp(-20, 20).to(self.theta.dtype))
        nn.init.ones_(self.beta)
        nn.init.normal_(self.eta, 0.0, h ** -0.5, generator=generator)
        self.eta[..., 1] = 0.0
        nn.init.trunc_normal_(self.omega, 0.0, 0.25, -1.0, 1.0, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, S, dim] -> [B, S, dim]``, computed in fp32 at least (complex64 / complex128)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            p, q = cema_coefficients(self.alpha.to(dt), self.delta.to(dt), self.theta.to(dt), self.beta.to(dt))
            eta = torch.view_as_complex(self.eta.to(dt).contiguous())
            y, h_last = cema(x.to(dt), p, q, eta)
            comm = self.state_comm
            if comm is not None:  # one all-gather of the final states [B, dim, h] complex; linear in h0
                h0 = cema_prefix(comm.all_gather(h_last), q, x.shape[1], comm.rank)
                y = y + cema_carry(h0, q, eta, x.shape[1])
            return (y + self.omega.to(dt) * x.to(dt)).to(x.dtype)


class MegalodonBlock(nn.Module):
    """One MEGALODON layer (module docstring). Three sub-steps as :class:`~seqpar.models.llama.TransformerBlock`, so
    ``train.ac=selective`` recomputes around the attention call: :meth:`pre_attention` (timestep norm, CEMA,
    projections), the attention, :meth:`post_attention` (gate, output projections, both residuals, the FFN)."""

    recompute = staticmethod(_call)
    rope_fn = staticmethod(apply_rope)

    def __init__(self, cfg, attn_fn: AttnFn):
        super().__init__()
        d, H = cfg.dim, cfg.n_heads
        z, v = cfg.megalodon_dims
        self.n_heads, self.z_head, self.v_head = H, z // H, v // H
        self.timestep_norm = TimestepNorm(d, cfg.megalodon_norm_groups, cfg.norm_eps)
        self.cema = CEMA(d, cfg.megalodon_ema_dim)
        self.cema_norm = RMSNorm(d, cfg.norm_eps)
        self.wz = nn.Linear(d, z)
        self.wv = nn.Linear(d, v)
        self.wr = nn.Linear(d, v)
        self.wh = nn.Linear(d, d)
        self.wo = nn.Linear(v, d, bias=False)
        self.kappa = nn.Parameter(torch.ones(2, z))  # kappa_q, kappa_k
        self.mu = nn.Parameter(torch.zeros(2, z))  # mu_q, mu_k
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(d, cfg.ffn_dim)
        self.attn_fn = attn_fn

    def pre_attention(self, x: Tensor, cos: Tensor, sin: Tensor):
        """``x [B, S, dim] -> q, k [B, S, H, Dz], v [B, S, H, Dv], x' [B, S, dim]``."""
        B, S, _ = x.shape
        xn = self.timestep_norm(x)
        mx = self.cema_norm(self.cema(xn))  # X'
        zn = F.normalize(self.wz(mx).view(B, S, self.n_heads, self.z_head), dim=-1)  # Z' = Z / ||Z|| per head
        kappa = self.kappa.view(2, self.n_heads, self.z_head)
        mu = self.mu.view(2, self.n_heads, self.z_head)
        q, k = zn * kappa[0] + mu[0], zn * kappa[1] + mu[1]
        v = F.silu(self.wv(xn)).view(B, S, self.n_heads, self.v_head)
        return self.rope_fn(q, cos, sin), self.rope_fn(k, cos, sin), v, mx

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
        """Chunk-wise causal attention, temperature 1 (Sec. 3.3): ``[B, S, H, Dz|Dv] -> [B, S, H, Dv]``."""
        D = max(self.z_head, self.v_head)
        pad = lambda t: F.pad(t, (0, D - t.shape[-1])) if t.shape[-1] < D else t  # zeros: q.k and out unchanged
        # q/k come out of the fp32 normalisation, v out of an autocast matmul: one dtype for the kernel (v's)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = self.attn_fn(pad(q), pad(k), pad(v), causal=False, softmax_scale=1.0, mask=mask)
        return out[..., :self.v_head]

    def post_attention(self, x: Tensor, mx: Tensor, out: Tensor) -> Tensor:
        """``x`` (block input), ``mx`` (X'), ``out [B, S, H, Dv]`` -> ``[B, S, dim]``."""
        B, S = x.shape[:2]
        gated = F.silu(self.wr(mx)) * out.reshape(B, S, -1)  # R * O
        y = x + self.wh(mx) + self.wo(gated)  # Y = X + H
        return x + self.feed_forward(self.ffn_norm(y))  # two-hop: the FFN's residual is X

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask) -> Tensor:
        q, k, v, mx = self.recompute(self.pre_attention, x, cos, sin)
        out = self.attend(q, k, v, mask)
        return self.recompute(self.post_attention, x, mx, out)


class Megalodon(Llama):
    """The MEGALODON decoder (``model.arch=megalodon``): embedding -> N x :class:`MegalodonBlock` -> timestep norm.

    A :class:`~seqpar.models.llama.Llama` by interface (``forward``, ``logits``, ``loss``, ``init_weights``,
    ``num_params``, ``set_attn_fn``, ``set_rope_scaling``), not by layers: ``__init__`` builds its own.
    RoPE runs on the q/k head dim ``megalodon_z_dim / n_heads``.
    """

    def __init__(self, cfg, attn_fn: Optional[AttnFn] = None):
        nn.Module.__init__(self)
        if not isinstance(cfg.vocab_size, int) or isinstance(cfg.vocab_size, bool):
            raise ConfigError(f"model.vocab_size={cfg.vocab_size!r} must be set to an int before building the model; "
                              "set it explicitly or let the trainer fill it from the tokenizer.")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        attn_fn = attn_fn if attn_fn is not None else default_attention
        self.layers = nn.ModuleList(MegalodonBlock(cfg, attn_fn) for _ in range(cfg.n_layers))
        self.norm = TimestepNorm(cfg.dim, cfg.megalodon_norm_groups, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.set_rope_scaling(cfg.rope_scaling)
        self.state_comm = None
        self.init_weights()

    def set_attn_fn(self, attn_fn: Optional[AttnFn]) -> None:
        for layer in self.layers:
            layer.attn_fn = attn_fn if attn_fn is not None else default_attention

    def set_state_comm(self, comm) -> None:
        """Sequence parallelism (``parallel.cp > 1``, contiguous layout): every timestep norm and CEMA passes its
        state over ``comm`` (a :class:`~seqpar.parallel.state_pass.StateComm` of the cp group; None: off).
        Attention stays local (the injected ``attn_fn`` must be the plain one): this rank's length must be a
        multiple of ``model.megalodon_chunk``, which :meth:`forward` checks."""
        self.state_comm = comm
        for module in self.modules():
            if isinstance(module, (TimestepNorm, CEMA)):
                module.state_comm = comm

    def set_rope_scaling(self, scaling: Optional[dict], seq_len: Optional[int] = None) -> None:
        """As :meth:`Llama.set_rope_scaling`, for the q/k head dim."""
        z_head = self.cfg.megalodon_dims[0] // self.cfg.n_heads
        inv_freq, self.rope_attention_scale = compute_inv_freq(z_head, self.cfg.rope_theta, scaling, seq_len)
        self.cfg = dataclasses.replace(self.cfg, rope_scaling=scaling)  # a copy: the caller's config stays as is
        self._inv_freq = {torch.device("cpu"): inv_freq}

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """normal(0, init_std) for the embedding and every projection, ``init_std / sqrt(2 n_layers)`` for the two
        that write the residual stream (``wo``, ``w2``), as :meth:`Llama.init_weights`; biases 0; CEMA as the
        release (:meth:`CEMA.reset_parameters`); kappa 1, mu 0; norms identity."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        for blk in self.layers:
            for lin in (blk.wz, blk.wv, blk.wr, blk.wh, blk.feed_forward.w1, blk.feed_forward.w3):
                nn.init.normal_(lin.weight, 0.0, std, generator=generator)
            for lin in (blk.wo, blk.feed_forward.w2):
                nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layers), generator=generator)
            for lin in (blk.wz, blk.wv, blk.wr, blk.wh):
                nn.init.zeros_(lin.bias)
            blk.cema.reset_parameters(generator)
            nn.init.ones_(blk.kappa)
            nn.init.zeros_(blk.mu)
            blk.timestep_norm.reset_parameters()
            blk.cema_norm.reset_parameters()
            blk.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)

    def attention_mask(self, doc_ids: Optional[Tensor]) -> Optional[Mask]:
        if doc_ids is not None:
            raise ValueError("model.arch=megalodon has no document mask; pass doc_ids=None (data.doc_mask=false).")
        return None

    def chunk_mask(self, batch: int, seq: int, device: torch.device) -> Mask:
        """Chunk-wise causal attention as a Mask: token i is in 'document' ``i // megalodon_chunk``."""
        ids = (torch.arange(seq, device=device) // self.cfg.megalodon_chunk).expand(batch, seq)
        return Mask(causal=True, doc_ids=ids)

    def forward(self, tokens: Tensor, positions: Tensor, *, doc_ids: Optional[Tensor] = None) -> Tensor:
        """As :meth:`Llama.forward` (``doc_ids`` must be None): ``tokens, positions [B, S] -> hidden [B, S, dim]``."""
        if tokens.shape != positions.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must both be [B, S].")
        self.attention_mask(doc_ids)
        comm, c = self.state_comm, self.cfg.megalodon_chunk
        if comm is not None and comm.size > 1 and tokens.shape[1] % c:
            raise ValueError(f"model.arch=megalodon under cp: this rank's {tokens.shape[1]} tokens are not a multiple "
                             f"of model.megalodon_chunk={c}, so an attention chunk would span two ranks.")
        mask = self.chunk_mask(*tokens.shape, tokens.device)
        h = self.tok_embeddings(tokens)  # [B, S] -> [B, S, dim]
        cos, sin = rope_cos_sin(positions, self._rope_inv_freq(positions.device), self.rope_attention_scale)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """``6 * N_matmul`` (projections, FFN, head) plus chunked attention ``12 * L * keys * H * D`` (QK^T and PV,
        forward + backward; ``H * D = max(z_dim, value_dim)`` after padding) with ``keys = min(seq_len, chunk) / 2``
        on average (the causal half). CEMA's ``O(dim * h * 64)`` per token is left out."""
        c = self.cfg
        z, v = c.megalodon_dims
        d = c.dim
        per_layer = d * z + 2 * d * v + d * d + v * d + 3 * d * c.ffn_dim
        n_matmul = c.n_layers * per_layer + c.vocab_size * d
        keys = min(seq_len, c.megalodon_chunk) / (2 if causal else 1)
        attn = 12 * c.n_layers * keys * max(z, v)
        return float(6 * n_matmul + attn)
