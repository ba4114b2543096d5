"""The model sections: the decoder's shape (``model``) and LongLoRA's adapters (``lora``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from seqpar.config.checks import check, check_choice, check_positive
from seqpar.ops.rope import validate_scaling

@dataclass(frozen=True)
class ModelConfig:
    """Llama-style decoder shape. ``vocab_size=None`` takes the tokenizer's size (rounded up to 64).

    ``n_kv_heads`` and ``ffn_hidden`` are what the user wrote (None: derived); read the effective
    values through :attr:`kv_heads` and :attr:`ffn_dim`.
    """

    name: str = "tiny"
    vocab_size: Optional[int] = None
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (multi-head attention); see kv_heads
    ffn_hidden: Optional[int] = None  # None: Llama rule from dim, multiple_of, ffn_dim_multiplier; see ffn_dim
    multiple_of: int = 64
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # Hugging Face style rope_scaling dict; None: plain RoPE
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Context extension (seqpar.models.hf): start from a local Hugging Face Llama directory; its
    # config.json then fixes the shape (dim, layers, heads, vocab, rope_theta), and rope_scaling here,
    # when set, overrides the checkpoint's. max_position_embeddings is the length the weights are meant
    # for (written to config.json on export); None: derived from rope_scaling on export.
    init_from: Optional[str] = None
    max_position_embeddings: Optional[int] = None
    # Sliding window (Mistral): keys at most `window` back (None: all); `sinks`: first tokens of each document
    window: Optional[int] = None  # stay visible through it (StreamingLLM)
    sinks: int = 0

    def __post_init__(self) -> None:
        check(self.window is None or (isinstance(self.window, int) and self.window >= 0),
               f"model.window={self.window!r} must be an int >= 0 (keys at most that far back) or null (no window).")
        check(isinstance(self.sinks, int) and self.sinks >= 0 and (self.sinks == 0 or self.window is not None),
               f"model.sinks={self.sinks!r} must be an int >= 0, and > 0 only with model.window set (sinks widen a window).")
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            check_positive(f"model.{name}", getattr(self, name))
        if self.n_kv_heads is not None:
            check_positive("model.n_kv_heads", self.n_kv_heads)
        if self.vocab_size is not None:
            check_positive("model.vocab_size", self.vocab_size)
        check(
            self.n_heads % self.kv_heads == 0,
            f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}; "
            "set n_kv_heads to a divisor of n_heads.",
        )
        check(
            self.dim % self.n_heads == 0,
            f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
            "set dim to a multiple of n_heads.",
        )
        check(
            self.head_dim % 2 == 0,
            f"model.dim / model.n_heads = {self.head_dim} must be even for RoPE; change dim or n_heads.",
        )
        check_positive("model.ffn_hidden", self.ffn_dim)
        check_positive("model.rope_theta", self.rope_theta)
        # Unknown rope_type, factor < 1 and missing keys fail here, naming model.rope_scaling.<field>.
        validate_scaling(self.rope_scaling, self.head_dim, self.rope_theta)
        if self.max_position_embeddings is not None:
            check_positive("model.max_position_embeddings", self.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` (multi-head attention) when unset."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU hidden size: ``ffn_hidden``, or Llama's rule when unset: 2/3 of ``4 * dim``, times
        ``ffn_dim_multiplier``, rounded up to a multiple of ``multiple_of``."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

@dataclass(frozen=True)
class LoRAConfig:
    """LongLoRA (seqpar.models.lora, seqpar.ops.s2attn): ``rank=0`` is full fine-tuning (LoRA off).

    With ``rank > 0`` every weight is frozen except LoRA adapters ``B @ A`` (scaled ``alpha / rank``) on
    ``targets``, plus the embeddings / norms when ``train_embeddings`` / ``train_norms``. ``s2_attn``
    trains with shifted sparse attention in groups of ``s2_group_ratio * train.seq_len`` tokens.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    train_embeddings: bool = True
    train_norms: bool = True
    s2_attn: bool = False
    s2_group_ratio: float = 0.25

    def __post_init__(self) -> None:
        check(self.rank >= 0, f"lora.rank={self.rank} must be >= 0 (0: LoRA off).")
        check_positive("lora.alpha", self.alpha)
        check(0.0 <= self.dropout < 1.0, f"lora.dropout={self.dropout} must be in [0, 1).")
        for t in self.targets:
            check_choice("lora.targets[]", t, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
        check(0.0 < self.s2_group_ratio <= 1.0, f"lora.s2_group_ratio={self.s2_group_ratio} must be in (0, 1].")
