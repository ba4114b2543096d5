"""Llama-style decoder with an injected attention function.

The model knows nothing about sequence parallelism: it takes global ``positions`` for RoPE and calls
``attn_fn(q, k, v, *, causal, softmax_scale)`` per layer, or ``attn_fn(q, k, v, *, causal=False,
softmax_scale, mask=Mask(...))`` when the batch's GLOBAL ``doc_ids`` or the config's sliding window
(``model.window``, ``model.sinks``) mask attention; one Mask per forward, shared by every layer. On one device that is
:func:`seqpar.ops.attention`; under context parallelism the trainer injects ring attention over the
cp group, and the same module runs on each rank's local shard of the sequence.

Parameter names follow Meta's Llama / torchtitan (``tok_embeddings``, ``layers.{i}.attention.wq``,
``feed_forward.w1``, ``norm``, ``output``); ``seqpar.models.hf`` maps them to Hugging Face names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.errors import ConfigError
from seqpar.ops.attention.mask import Mask
from seqpar.ops.loss import chunked_cross_entropy
from seqpar.ops.rope import apply_rope, compute_inv_freq, rope_cos_sin

if TYPE_CHECKING:
    from seqpar.config import ModelConfig

# attn_fn(q [B,S,H,D], k [B,S,Hkv,D], v [B,S,Hkv,D], *, causal, softmax_scale) -> [B,S,H,D]
AttnFn = Callable[..., torch.Tensor]


def default_attention(q, k, v, *, causal: bool, softmax_scale: float, mask: Optional[Mask] = None) -> torch.Tensor:
    """Single-device attention via :func:`seqpar.ops.attention` (imported lazily: ops may load kernels)."""
    from seqpar.ops import attention

    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend="auto", mask=mask)


class RMSNorm(nn.Module):
    """Root-mean-square norm; the statistic is computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight, as HF's LlamaRMSNorm does, so imported checkpoints match bit-for-bit.
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention: RoPE on q and k, then the injected ``attn_fn``."""

    # RoPE as an attribute so seqpar.models.compile can swap in a fused (torch.compile'd) copy per instance.
    rope_fn = staticmethod(apply_rope)

    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attn_fn = attn_fn
        # 1/sqrt(D) always: a RoPE attention_scale (YaRN mscale) is already folded into cos/sin, as in
        # HF, so applying it here too would scale the logits twice.
        self.softmax_scale = 1.0 / math.sqrt(cfg.head_dim)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``x [B, S, dim] -> q [B, S, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D]``, RoPE applied to q and k."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)  # [B, S, H*D] -> [B, S, H, D]
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, Hkv*D] -> [B, S, Hkv, D]
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        return self.rope_fn(q, cos, sin), self.rope_fn(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[Mask] = None) -> torch.Tensor:
        """The injected ``attn_fn``: ``q [B,S,H,D], k/v [B,S,Hkv,D] -> out [B,S,H,D]``; ``mask`` (global
        positions, causal inside) replaces the plain causal flag when given."""
        # k/v stay un-expanded: the attention kernel (and ring attention, which ships k/v around the
        # ring) handles GQA, so we never send n_heads/n_kv_heads times more bytes than needed.
        if mask is None:
            return self.attn_fn(q, k, v, causal=True, softmax_scale=self.softmax_scale)
        return self.attn_fn(q, k, v, causal=False, softmax_scale=self.softmax_scale, mask=mask)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """Output projection ``out [B, S, H, D] -> [B, S, dim]``."""
        B, S = out.shape[:2]
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))  # [B, S, H, D] -> [B, S, H*D]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [B, S, dim] -> [B, S, dim]``; the block calls the three steps itself (see TransformerBlock)."""
        return self.project(self.attend(*self.qkv(x, cos, sin)))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _call(step: Callable, *args):
    return step(*args)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + ffn(norm(h))``. The unit FSDP2 and AC wrap.

    The forward is three named sub-steps so activation checkpointing can recompute around the
    attention instead of through it (:mod:`seqpar.models.checkpointing`): :meth:`pre_attention`
    (norm, projections, RoPE), the attention call, :meth:`post_attention` (output projection,
    residual, norm, MLP, residual). There is one definition of the block: this forward.
    """

    # How the two non-attention sub-steps run: ``recompute(step, *args)`` returns ``step(*args)``. A
    # plain call here; train.ac=selective installs, per instance, a checkpoint with an op-level policy.
    # The attention call never goes through it: under context parallelism a recompute would rerun the
    # whole ring, communication included.
    recompute = staticmethod(_call)

    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attn_fn)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def pre_attention(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``h [B, S, dim] -> q [B, S, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D]``."""
        return self.attention.qkv(self.attention_norm(h), cos, sin)

    def post_attention(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``h [B, S, dim]`` (block input), ``out [B, S, H, D]`` (attention output) ``-> [B, S, dim]``."""
        h = h + self.attention.project(out)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[Mask] = None) -> torch.Tensor:
        q, k, v = self.recompute(self.pre_attention, h, cos, sin)
        out = self.attention.attend(q, k, v, mask)  # [B, S, H, D]
        return self.recompute(self.post_attention, h, out)


class Llama(nn.Module):
    """Llama-style decoder LM returning final-normed hidden states (the loss applies the head in chunks).

    Args:
        cfg: model shape; ``cfg.vocab_size`` must already be set (the trainer fills it from the tokenizer).
        attn_fn: ``attn_fn(q [B,S,H,D], k [B,S,Hkv,D], v [B,S,Hkv,D], *, causal, softmax_scale) -> [B,S,H,D]``;
            None uses :func:`default_attention` (``seqpar.ops.attention``, backend "auto").

    Raises:
        ConfigError: ``cfg.vocab_size`` is not set.
    """

    def __init__(self, cfg: ModelConfig, attn_fn: Optional[AttnFn] = None):
        super().__init__()
        if not isinstance(cfg.vocab_size, int) or isinstance(cfg.vocab_size, bool):
            raise ConfigError(
                f"model.vocab_size={cfg.vocab_size!r} must be set to an int before building the model; "
                "set it explicitly or let the trainer fill it from the tokenizer."
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        attn_fn = attn_fn if attn_fn is not None else default_attention
        self.layers = nn.ModuleList(TransformerBlock(cfg, attn_fn) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: no second module; the head reads the embedding table (see output_weight), which keeps
        # one parameter, one state-dict entry and one FSDP shard instead of an aliased pair.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # RoPE tables live outside parameters/buffers on purpose: model.to(bf16) must not round them,
        # and building on the meta device must not leave them empty. Per-device copies are cached.
        inv_freq, self.rope_attention_scale = compute_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self._inv_freq = {torch.device("cpu"): inv_freq}  # device -> [D/2] float32
        self.init_weights()

    # ---- attention injection ---------------------------------------------------------------------
    def set_attn_fn(self, attn_fn: Optional[AttnFn]) -> None:
        """Swap the attention function of every layer (None: back to :func:`default_attention`)."""
        for layer in self.layers:
            layer.attention.attn_fn = attn_fn if attn_fn is not None else default_attention

    def set_rope_scaling(self, scaling: Optional[dict], seq_len: Optional[int] = None) -> None:
        """Recompute the RoPE tables for another ``rope_scaling`` dict (evaluating a model with a scaling
        it was not trained with) or another GLOBAL length ``seq_len`` (dynamic NTK depends on it).

        Raises ConfigError (naming ``model.rope_scaling.<field>``) for an invalid dict.
        """
        inv_freq, self.rope_attention_scale = compute_inv_freq(
            self.cfg.head_dim, self.cfg.rope_theta, scaling, seq_len)
        self.cfg = dataclasses.replace(self.cfg, rope_scaling=scaling)  # a copy: the caller's config stays as is
        self._inv_freq = {torch.device("cpu"): inv_freq}  # device copies are re-made on demand

    # ---- init --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-initialise all parameters (also the path after ``to_empty`` for a meta-device build).

        normal(0, init_std) for embedding and linears; the residual-branch output projections (``wo``,
        ``w2``) get ``init_std / sqrt(2 * n_layers)`` because the residual stream is a sum of
        ``2 * n_layers`` such branch outputs, so this keeps its variance at init independent of depth
        (GPT-2 / Megatron). Norm weights are 1.

        Args:
            generator: for a reproducible init independent of the global RNG; it must live on the
                parameters' device. None draws from the global RNG (``torch.manual_seed``).
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            for lin in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
                nn.init.normal_(lin.weight, 0.0, std, generator=generator)
            for lin in (attn.wo, ffn.w2):
                nn.init.normal_(lin.weight, 0.0, residual_std, generator=generator)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)

    # ---- forward -----------------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        """``[V, dim]`` weight of the LM head (the embedding table when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def _rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[*positions.shape, D/2]`` float32, for integer ``positions`` of any shape
        (the model's RoPE scaling and attention scale included). Cached decoding (:mod:`seqpar.inference`)
        rotates keys at positions its cache policy assigns, possibly one per kv head."""
        return rope_cos_sin(positions, self._rope_inv_freq(positions.device), self.rope_attention_scale)

    def attention_mask(self, doc_ids: Optional[torch.Tensor]) -> Optional[Mask]:
        """The forward's :class:`~seqpar.ops.Mask` (causal, ``model.window``/``model.sinks``, documents
        from the GLOBAL ``doc_ids [B, S_global]``), or None for the plain causal mask."""
        c = self.cfg
        window, sinks = getattr(c, "window", None), getattr(c, "sinks", 0)
        if doc_ids is None and window is None:
            return None
        return Mask(causal=True, window=window, sinks=sinks, doc_ids=doc_ids)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-normed hidden states.

        Args:
            tokens: ``[B, S]`` int64 token ids (a rank's local shard under context parallelism).
            positions: ``[B, S]`` int64 GLOBAL positions of those tokens (drive RoPE only; causality
                comes from ``attn_fn``, which knows the layout).
            doc_ids: ``[B, S_global]`` GLOBAL document ids of the whole rows (NOT sharded: every cp rank
                passes all of them): attention stays inside each document. None: one document per row.

        Returns:
            ``[B, S, dim]`` hidden states after the final norm; use :meth:`loss` or :meth:`logits`.
        """
        if tokens.shape != positions.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must both be [B, S].")
        mask = self.attention_mask(doc_ids)
        h = self.tok_embeddings(tokens)  # [B, S] -> [B, S, dim]
        cos, sin = rope_cos_sin(positions, self._rope_inv_freq(positions.device), self.rope_attention_scale)
        for layer in self.layers:
            h = layer(h, cos, sin) if mask is None else layer(h, cos, sin, mask)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, dim] -> [B, S, V]`` full logits (evaluation / generation; training uses :meth:`loss`)."""
        return F.linear(hidden, self.output_weight)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, ignore_index: int = -100):
        """``(loss_sum, n_tokens)`` of the LM head on ``hidden [B,S,dim]`` vs ``labels [B,S]``; see
        :func:`seqpar.ops.loss.chunked_cross_entropy`. Divide by the token count summed over ranks."""
        return chunked_cross_entropy(
            hidden, self.output_weight, labels, chunk_size=chunk_size, ignore_index=ignore_index
        )

    # ---- accounting --------------------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters; ``exclude_embedding`` drops the input embedding table (which, when
        tied, is also the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int, causal: bool = True, keys_per_query: Optional[float] = None) -> float:
        """Training (forward + backward) FLOPs per token, for MFU.

        ``6 * N_matmul + attention``, where ``N_matmul`` counts the weights used in matmuls (q/k/v/o,
        w1/w2/w3 of every layer, and the ``V x dim`` LM head, tied or not; not the embedding lookup nor
        the norms): each such weight costs 2 FLOPs forward and 4 backward per token. Attention scores
        ``QK^T`` and ``PV`` cost ``2 * 2 * seq_len * dim`` forward per token per layer, x3 with
        backward: ``12 * n_layers * dim * seq_len`` with full attention. With ``causal`` (the default)
        we count only the unmasked half, ``6 * n_layers * dim * seq_len``, i.e. the work a
        causal-skipping kernel actually does (some MFU reports use the full 12; ours is conservative).
        ``keys_per_query`` (the mean number of keys a query sees under the step's mask: documents,
        windows, sinks) replaces ``seq_len / 2``: ``12 * n_layers * dim * keys_per_query``, the work a
        tile-skipping kernel does, so document masks do not inflate MFU.
        """
        c = self.cfg
        kv_dim = c.kv_heads * c.head_dim
        per_layer = c.dim * c.dim * 2 + c.dim * kv_dim * 2 + 3 * c.dim * c.ffn_dim  # wq, wo, wk, wv, w1..3
        n_matmul = c.n_layers * per_layer + c.vocab_size * c.dim
        attn = (6 if causal else 12) * c.n_layers * c.dim * seq_len
        if keys_per_query is not None:
            attn = 12 * c.n_layers * c.dim * keys_per_query
        return float(6 * n_matmul + attn)
