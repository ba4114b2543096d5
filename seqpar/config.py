"""Typed configuration for seqpar: immutable values, validated once, derived values as properties.

Library code takes these frozen dataclasses. The command-line edge (``seqpar/cli.py``) composes the
YAML groups under ``conf/`` (mirroring these classes) with ``key=value`` overrides and builds them, so
every ``__post_init__`` check below runs on the final values. Nothing here writes to a field: a field
holds what the user wrote (``n_kv_heads=None`` stays ``None``) and a property gives the effective value
(``ModelConfig.kv_heads``, ``ModelConfig.ffn_dim``, ``Config.tokenizer_dir``), so a config printed or
saved is the one the user gave, and no later stage can see half-derived state. Values that need files
(an HF checkpoint's shape, the tokenizer's vocabulary) are filled in once, before training, by
``seqpar.train.resolve.resolve_config``, which returns a new Config.

Choice lists come from the modules that implement the choices (one source of truth), and every check
raises :class:`~seqpar.errors.ConfigError` with one sentence that names the field and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from seqpar.errors import ConfigError
from seqpar.models.checkpointing import AC_MODES
from seqpar.ops.attention.registry import BACKEND_NAMES
from seqpar.ops.rope import validate_scaling
from seqpar.parallel.fsdp import FSDP_MODES
from seqpar.parallel.layout import LAYOUTS, required_multiple

# ConfigError is re-exported: tests and users import it from here.
__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoRAConfig", "LoggingConfig", "ModelConfig",
           "OptimConfig", "ParallelConfig", "TrainConfig"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not one of {list(choices)}; pick one of those.")


def _check_positive(name: str, value: Any) -> None:
    _check(value > 0, f"{name}={value} must be > 0.")


DIST_BACKENDS = ("auto", "nccl", "gloo")


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

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.n_kv_heads is not None:
            _check_positive("model.n_kv_heads", self.n_kv_heads)
        if self.vocab_size is not None:
            _check_positive("model.vocab_size", self.vocab_size)
        _check(
            self.n_heads % self.kv_heads == 0,
            f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}; "
            "set n_kv_heads to a divisor of n_heads.",
        )
        _check(
            self.dim % self.n_heads == 0,
            f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
            "set dim to a multiple of n_heads.",
        )
        _check(
            self.head_dim % 2 == 0,
            f"model.dim / model.n_heads = {self.head_dim} must be even for RoPE; change dim or n_heads.",
        )
        _check_positive("model.ffn_hidden", self.ffn_dim)
        _check_positive("model.rope_theta", self.rope_theta)
        # Unknown rope_type, factor < 1 and missing keys fail here, naming model.rope_scaling.<field>.
        validate_scaling(self.rope_scaling, self.head_dim, self.rope_theta)
        if self.max_position_embeddings is not None:
            _check_positive("model.max_position_embeddings", self.max_position_embeddings)

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
class ParallelConfig:
    """Device mesh: ``dp * cp`` must equal the world size (``dp=-1`` fills in the rest)."""

    dp: int = -1
    cp: int = 1
    layout: str = "zigzag"
    attention_backend: str = "auto"
    dist_backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    # FSDP2 sharding of params / grads / optimizer state (seqpar.parallel.fsdp): dp_cp shards over all
    # dp*cp ranks (least memory); dp shards over dp and replicates over cp (HSDP: grads all-reduced
    # over cp); none replicates everything (gradients all-reduced, DDP-like).
    fsdp: str = "dp_cp"

    def __post_init__(self) -> None:
        _check_choice("parallel.fsdp", self.fsdp, FSDP_MODES)
        _check(self.dp == -1 or self.dp > 0, f"parallel.dp={self.dp} must be a positive integer or -1 (auto).")
        _check_positive("parallel.cp", self.cp)
        _check_choice("parallel.layout", self.layout, LAYOUTS)
        _check_choice("parallel.attention_backend", self.attention_backend, BACKEND_NAMES)
        _check_choice("parallel.dist_backend", self.dist_backend, DIST_BACKENDS)

    def resolve(self, world_size: int) -> tuple[int, int]:
        """Return ``(dp, cp)`` for ``world_size`` processes, or raise naming the fix."""
        _check(
            world_size % self.cp == 0,
            f"parallel.cp={self.cp} does not divide the world size {world_size}; "
            f"choose cp among the divisors of {world_size}.",
        )
        dp = world_size // self.cp if self.dp == -1 else self.dp
        _check(
            dp * self.cp == world_size,
            f"parallel.dp={dp} x parallel.cp={self.cp} = {dp * self.cp} but the world size is {world_size}; "
            "set dp=-1 or make dp*cp equal the number of processes.",
        )
        return dp, self.cp


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. ``source=stdlib`` is the embedded corpus (no download)."""

    source: str = "stdlib"  # stdlib | text | jsonl
    paths: List[str] = field(default_factory=list)  # files or globs for text / jsonl
    jsonl_field: str = "text"
    tokenizer: str = "byte"  # byte | bpe | hf (a checkpoint's tokenizer.json)
    tokenizer_path: Optional[str] = None  # hf: dir with tokenizer.json (None: model.init_from; Config.tokenizer_dir)
    bpe_vocab_size: int = 4096
    cache_dir: str = "~/.cache/seqpar"
    val_fraction: float = 0.01
    position_ids: str = "sequence"  # sequence: 0..S-1 per packed row; document: reset at each document
    max_bytes: Optional[int] = None  # cap on corpus size read (None: all)
    # PoSE (seqpar.data.pose): train windows of train.seq_len whose position ids skip to cover
    # pose_target_len (0: off) in pose_chunks contiguous chunks. Needs position_ids=sequence.
    pose_target_len: int = 0
    pose_chunks: int = 2

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("stdlib", "text", "jsonl"))
        _check(self.pose_target_len >= 0, f"data.pose_target_len={self.pose_target_len} must be >= 0 (0: off).")
        _check(self.pose_chunks >= 1, f"data.pose_chunks={self.pose_chunks} must be >= 1.")
        _check(
            self.pose_target_len == 0 or self.position_ids == "sequence",
            "data.pose_target_len > 0 (PoSE) needs data.position_ids=sequence: PoSE rewrites the row's positions.",
        )
        _check_choice("data.tokenizer", self.tokenizer, ("byte", "bpe", "hf"))
        _check_choice("data.position_ids", self.position_ids, ("sequence", "document"))
        _check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in [0, 1).")
        _check(
            self.source == "stdlib" or len(self.paths) > 0,
            f"data.source={self.source} needs data.paths (a list of files or globs), e.g. data.paths=[corpus.txt].",
        )
        _check(self.bpe_vocab_size >= 260, f"data.bpe_vocab_size={self.bpe_vocab_size} must be >= 260.")
        if self.max_bytes is not None:
            _check_positive("data.max_bytes", self.max_bytes)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # <= 0 disables clipping

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0.")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1).")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0.")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: global sequence length, per-data-parallel-rank micro-batch, accumulation, steps."""

    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 200
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    eval_every: int = 100  # 0 disables
    eval_batches: int = 4
    max_minutes: float = 0.0  # 0: no wall-clock budget
    loss_chunk: int = 1024  # tokens per chunk of the chunked cross-entropy
    # Memory at long context (seqpar.models.blockwise, seqpar.parallel.fsdp): ffn_chunk > 0 runs the
    # MLP blockwise over chunks of that many tokens under recompute (BPT); ac is activation
    # checkpointing per block: none | full (keep only the block input) | selective (keep the attention
    # inputs/outputs, recompute norms, projections and MLP).
    ffn_chunk: int = 0
    ac: str = "none"
    # torch.compile the norms, RoPE and MLP of every block (seqpar.models.compile): fused element-wise
    # kernels and fewer saved activations; attention is never compiled. Costs a compile on the first step.
    compile: bool = False
    dry_run: bool = False  # validate, print the mesh and a per-GPU memory estimate, exit (train.py --dry-run)
    stop_file: Optional[str] = None  # when this file appears, checkpoint and exit (slurm/seqpar.sbatch sets it)

    def __post_init__(self) -> None:
        _check(self.ffn_chunk >= 0, f"train.ffn_chunk={self.ffn_chunk} must be >= 0 (0: plain MLP).")
        _check_choice("train.ac", self.ac, AC_MODES)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "loss_chunk"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check(self.seq_len >= 2, f"train.seq_len={self.seq_len} must be >= 2.")
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        _check(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0 (0 disables).")
        _check(self.max_minutes >= 0, f"train.max_minutes={self.max_minutes} must be >= 0 (0: no budget).")


@dataclass(frozen=True)
class LoggingConfig:
    """Console + JSONL always (rank 0); wandb when ``wandb=true`` (offline unless WANDB_API_KEY is set)."""

    log_every: int = 10
    run_dir: str = "runs/default"
    progress: bool = True  # a progress bar on rank 0 when attached to a terminal
    wandb: bool = False
    wandb_project: str = "seqpar"
    peak_tflops: float = 0.0  # per-device bf16 peak for MFU; 0: look up the GPU, or skip MFU on CPU

    def __post_init__(self) -> None:
        _check_positive("logging.log_every", self.log_every)
        _check(bool(self.run_dir), "logging.run_dir must be a non-empty path.")


@dataclass(frozen=True)
class CheckpointConfig:
    """Atomic checkpoints under ``<run_dir>/checkpoints``; ``every=0`` disables saving."""

    every: int = 0
    keep_last: int = 2
    resume: bool = True  # resume from the latest complete checkpoint in the run dir
    async_save: bool = False  # dcp.async_save: training continues while a background thread writes

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0 (0 disables).")
        _check_positive("checkpoint.keep_last", self.keep_last)


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
        _check(self.rank >= 0, f"lora.rank={self.rank} must be >= 0 (0: LoRA off).")
        _check_positive("lora.alpha", self.alpha)
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout={self.dropout} must be in [0, 1).")
        for t in self.targets:
            _check_choice("lora.targets[]", t, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
        _check(0.0 < self.s2_group_ratio <= 1.0, f"lora.s2_group_ratio={self.s2_group_ratio} must be in (0, 1].")


@dataclass(frozen=True)
class Config:
    """The whole run: one frozen value per group, checked across groups here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        _check(
            self.data.tokenizer != "hf" or bool(self.tokenizer_dir),
            "data.tokenizer=hf needs data.tokenizer_path or model.init_from "
            "(a Hugging Face checkpoint directory with tokenizer.json).",
        )
        _check(
            self.data.pose_target_len == 0 or self.data.pose_target_len >= self.train.seq_len,
            f"data.pose_target_len={self.data.pose_target_len} must be >= train.seq_len={self.train.seq_len} "
            "(PoSE simulates a LONGER target context inside the training window), or 0 to turn PoSE off.",
        )
        _check(
            not self.lora.s2_attn or self.parallel.cp == 1,
            "lora.s2_attn=true needs parallel.cp=1: ring attention has no group (document-id) masks yet; "
            "use full attention under ring (lora.s2_attn=false), which LongLoRA's LoRA+ also trains with.",
        )
        if self.lora.s2_attn:
            group = int(self.lora.s2_group_ratio * self.train.seq_len)
            _check(
                group >= 2 and group % 2 == 0,
                f"lora.s2_group_ratio={self.lora.s2_group_ratio} x train.seq_len={self.train.seq_len} gives "
                f"S2-Attn groups of {group} tokens; it must be an even number >= 2 (the shift is half a group).",
            )
        cp, layout = self.parallel.cp, self.parallel.layout
        need = required_multiple(cp, layout)  # the layout module's rule, so config and sharding agree
        _check(
            self.train.seq_len % need == 0,
            f"train.seq_len={self.train.seq_len} is not divisible by {need} "
            f"(parallel.layout={layout} with cp={cp} needs a multiple of {need}); "
            f"use seq_len={need * max(1, round(self.train.seq_len / need))}.",
        )

    @property
    def tokenizer_dir(self) -> Optional[str]:
        """For ``data.tokenizer=hf``: the directory whose tokenizer.json is read, ``data.tokenizer_path``
        or else the checkpoint being extended (``model.init_from``); None for the other tokenizers."""
        if self.data.tokenizer != "hf":
            return None
        return self.data.tokenizer_path or self.model.init_from
