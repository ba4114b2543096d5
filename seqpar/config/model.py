"""The model sections: the decoder's shape (``model``) and LongLoRA's adapters (``lora``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from seqpar.config.checks import check, check_choice, check_positive
from seqpar.models.options import ARCHS, ATTENTIONS, MASK_ATTENTIONS, RANK_LOCAL_ATTENTION
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
    # Architecture options (seqpar.models.build; each paper's defaults, see docs/architecture.md). `causal=false`
    # (bidirectional) is for build_model users; the trainer trains a causal LM and refuses it.
    # dense | longformer (window + sinks as global tokens) | bigbird | blocksparse | performer | linformer | reformer
    attention: str = "dense"
    arch: str = "llama"  # llama | infini | megalodon
    causal: bool = True
    sparse_block: int = 64  # BigBird block b (Zaheer et al. 2020, App. D)
    bigbird_window_blocks: int = 3  # w: blocks i-1, i, i+1 (causal: i-1, i)
    bigbird_global_blocks: int = 2  # g
    bigbird_random_blocks: int = 3  # r
    sparse_seed: int = 0  # BigBird's random blocks: one deterministic layout per seed
    sparse_stride: int = 128  # Sparse Transformer "fixed" pattern l (Child et al. 2019, Sec. 4.2)
    sparse_summary: int = 32  # c: last c positions of each l-block seen by all later tokens (block size of the layout)
    performer_features: int = 256  # m random features (Choromanski et al. 2021)
    performer_chunk: int = 64  # chunk of the causal prefix sums
    linformer_k: int = 256  # projected length k (Wang et al. 2020)
    linformer_max_len: int = 4096  # n: length of the E, F projections (shorter sequences use their first columns)
    reformer_buckets: int = 64  # LSH buckets (even), Kitaev et al. 2020
    reformer_rounds: int = 4  # hash rounds
    reformer_chunk: int = 64  # m: sorted chunk length (leak-free: sorted-order window)
    reformer_leak_free: bool = True  # false: the paper's sorted chunks (later tokens can change earlier outputs)
    reformer_reversible: bool = True  # reversible residual layers (Sec. 3); needs parallel.fsdp=none
    infini_segment: int = 2048  # N: segment length (Munkhdalai et al. 2024)
    infini_update: str = "delta"  # linear | delta
    # MEGALODON (Ma et al. 2024; seqpar.models.megalodon). z/value dims None: dim / 4 and 2 * dim (the paper's 7B:
    # 1024 and 8192 at dim 4096); see megalodon_dims. Heads: model.n_heads (no GQA: n_kv_heads is not used).
    megalodon_chunk: int = 2048  # attention chunk c (causal inside each chunk, none across)
    megalodon_ema_dim: int = 16  # h: complex EMA dimensions per channel
    megalodon_norm_groups: int = 32  # G: timestep-norm groups (must divide dim)
    megalodon_z_dim: Optional[int] = None  # shared q/k representation Z
    megalodon_value_dim: Optional[int] = None  # value / gate width

    def __post_init__(self) -> None:
        self._check_architecture()
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

    def _check_architecture(self) -> None:
        check_choice("model.attention", self.attention, ATTENTIONS)
        check_choice("model.arch", self.arch, ARCHS)
        check_choice("model.infini_update", self.infini_update, ("linear", "delta"))
        check(isinstance(self.causal, bool), f"model.causal={self.causal!r} must be true or false.")
        for name in ("sparse_block", "bigbird_window_blocks", "sparse_stride", "sparse_summary", "performer_features",
                     "performer_chunk", "reformer_rounds", "reformer_chunk", "linformer_k", "linformer_max_len",
                     "infini_segment"):
            check_positive(f"model.{name}", getattr(self, name))
        for name in ("bigbird_global_blocks", "bigbird_random_blocks"):
            check(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0.")
        a = self.attention
        check(self.reformer_buckets >= 2 and self.reformer_buckets % 2 == 0,
              f"model.reformer_buckets={self.reformer_buckets} must be an even number >= 2 (argmax over [xR; -xR]).")
        check(a != "reformer" or self.causal, "model.attention=reformer is built causal only; set model.causal=true.")
        check(self.window is None or a in ("dense", "longformer"),
              f"model.window={self.window} only goes with model.attention=dense or longformer (it would cut "
              f"{a}'s pattern); unset model.window.")
        check(a != "longformer" or self.window is not None,
              "model.attention=longformer needs model.window (the sliding window w) and takes its global tokens "
              "from model.sinks; set model.window=512 (say).")
        check(a != "longformer" or self.causal or self.sinks == 0,
              "model.attention=longformer with model.causal=false cannot express global tokens as a Mask (a global "
              "token must see keys beyond its window on the right); set model.sinks=0 or model.causal=true.")
        check(a != "blocksparse" or self.sparse_stride % self.sparse_summary == 0,
              f"model.sparse_stride={self.sparse_stride} must be a multiple of model.sparse_summary="
              f"{self.sparse_summary} (the fixed pattern is laid out in blocks of c tokens).")
        check(a != "linformer" or not self.causal,
              "model.attention=linformer is not causal (each projected key mixes the whole sequence, so a token "
              "would see the future): use it with model.causal=false through build_model, not for causal LM "
              "training; pick performer or a sparse pattern for that.")
        check(self.causal or self.arch == "llama",
              f"model.causal=false is not available for model.arch={self.arch} (its memory is causal by "
              "construction); set model.causal=true.")
        check(self.arch == "llama" or a == "dense",
              f"model.arch={self.arch} brings its own attention; model.attention={a} cannot be combined with it: "
              "set model.attention=dense.")
        if self.arch == "megalodon":
            self._check_megalodon()

    def _check_megalodon(self) -> None:
        for name in ("megalodon_chunk", "megalodon_ema_dim", "megalodon_norm_groups"):
            check_positive(f"model.{name}", getattr(self, name))
        for name in ("megalodon_z_dim", "megalodon_value_dim"):
            if getattr(self, name) is not None:
                check_positive(f"model.{name}", getattr(self, name))
        check(self.dim % self.megalodon_norm_groups == 0, f"model.megalodon_norm_groups={self.megalodon_norm_groups} "
              f"must divide model.dim={self.dim}; pick a divisor.")
        z, v = self.megalodon_dims
        check(z % self.n_heads == 0 and (z // self.n_heads) % 2 == 0, f"model.megalodon_z_dim={z} must be a multiple "
              f"of 2 * model.n_heads={2 * self.n_heads} (an even head dim for RoPE); set megalodon_z_dim.")
        check(v % self.n_heads == 0, f"model.megalodon_value_dim={v} must be a multiple of model.n_heads="
              f"{self.n_heads}; set megalodon_value_dim.")

    @property
    def megalodon_dims(self) -> tuple:
        """MEGALODON's ``(z_dim, value_dim)``: as set, else ``dim / 4`` and ``2 * dim`` (the paper's ratios)."""
        z = self.megalodon_z_dim if self.megalodon_z_dim is not None else max(self.dim // 4, 2 * self.n_heads)
        v = self.megalodon_value_dim if self.megalodon_value_dim is not None else 2 * self.dim
        return z, v

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

def check_architecture(cfg: Any) -> None:
    """Cross-section checks of the architecture options against the root config (train.seq_len,
    parallel.cp, data.doc_mask, lora, model.init_from); one ConfigError naming the field and the fix."""
    m, seq, cp = cfg.model, cfg.train.seq_len, cfg.parallel.cp
    a = m.arch if m.arch != "llama" else m.attention
    check(m.causal, "model.causal=false: the trainer trains a causal LM on next-token labels, which a "
          "bidirectional model would read off its input; set model.causal=true.")
    if a not in MASK_ATTENTIONS:
        check(cp == 1 or a in RANK_LOCAL_ATTENTION, f"model.{'arch' if m.arch != 'llama' else 'attention'}={a} needs "
              "parallel.cp=1: its state is not carried from rank to rank yet; use parallel.cp=1 (data parallelism "
              "still works).")
        check(not cfg.data.doc_mask, f"{a} has no document mask (its state would cross documents); set "
              "data.doc_mask=false (documents then attend across boundaries, as in the paper's LM training).")
        check(m.init_from is None, f"model.init_from with {a}: the Hugging Face import knows Llama weights only; "
              "unset model.init_from or use a mask option (dense, longformer, bigbird, blocksparse).")
    if a == "megalodon" and cp > 1:  # the states pass rank to rank; every attention chunk must be on one rank
        need, layout = cp * m.megalodon_chunk, cfg.layout
        check(layout == "contiguous", f"model.arch=megalodon with parallel.cp={cp} needs parallel.layout=contiguous "
              f"(got {layout}): its state passes from each rank to the next in sequence order; set "
              "parallel.layout=contiguous.")
        check(seq % need == 0, f"model.arch=megalodon with parallel.cp={cp} needs train.seq_len={seq} to be a multiple "
              f"of parallel.cp x model.megalodon_chunk = {need} (no attention chunk across ranks); set "
              f"train.seq_len={need * max(1, round(seq / need))} (or a smaller model.megalodon_chunk).")
    check(a == "dense" or not cfg.lora.s2_attn, f"lora.s2_attn=true replaces the attention; it cannot be combined "
          f"with model.{'arch' if m.arch != 'llama' else 'attention'}={a}: set lora.s2_attn=false.")
    check(a != "reformer" or not m.reformer_reversible or cfg.parallel.fsdp == "none",
          "model.reformer_reversible=true accumulates gradients inside its own backward, which FSDP2 does not "
          "see: set parallel.fsdp=none (data parallelism then all-reduces), or model.reformer_reversible=false.")
    check(a != "reformer" or seq % m.reformer_chunk == 0,
          f"model.reformer_chunk={m.reformer_chunk} must divide train.seq_len={seq}; pick a divisor.")
    check(m.arch != "infini" or seq % m.infini_segment == 0,
          f"model.infini_segment={m.infini_segment} must divide train.seq_len={seq} (the memory is updated once "
          "per whole segment); pick a divisor.")
    block = {"bigbird": m.sparse_block, "blocksparse": m.sparse_summary}.get(a)
    check(block is None or seq % block == 0, f"train.seq_len={seq} must be a multiple of the {a} block size "
          f"{block} (model.{'sparse_block' if a == 'bigbird' else 'sparse_summary'}); pick a multiple.")


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
