"""The sections of the loop: ``optim``, ``train``, ``logging``, ``checkpoint``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from seqpar.config.checks import check, check_choice, check_positive
from seqpar.models.checkpointing import AC_MODES

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
        check_positive("optim.lr", self.lr)
        check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0.")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1).")
        check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0.")
        check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")

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
    # true | false | auto (on CUDA: measured +11% tokens/s with equal losses; off on CPU). See compiled().
    compile: Union[bool, str] = "auto"
    dry_run: bool = False  # validate, print the mesh and a per-GPU memory estimate, exit (train.py --dry-run)
    stop_file: Optional[str] = None  # when this file appears, checkpoint and exit (slurm/seqpar.sbatch sets it)
    max_bad_steps: int = 3  # NaN guard: more consecutive non-finite (skipped) steps stop the run (seqpar.train.guard)
    # Bitwise-reproducible steps on a GPU (the same run twice, or interrupted + resumed, gives the same
    # losses): torch's deterministic algorithms, cuBLAS' fixed workspace, the Triton kernel's dQ without
    # atomics. Needs parallel.attention_backend=triton (or torch); costs a few percent.
    deterministic: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.compile, bool) or self.compile == "auto",
              f"train.compile={self.compile!r} must be true, false or auto (auto: on for CUDA runs, off on CPU).")
        check(self.max_bad_steps >= 0, f"train.max_bad_steps={self.max_bad_steps} must be >= 0 (0: stop at the first).")
        check(self.ffn_chunk >= 0, f"train.ffn_chunk={self.ffn_chunk} must be >= 0 (0: plain MLP).")
        check_choice("train.ac", self.ac, AC_MODES)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "loss_chunk"):
            check_positive(f"train.{name}", getattr(self, name))
        check(self.seq_len >= 2, f"train.seq_len={self.seq_len} must be >= 2.")
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        check(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0 (0 disables).")
        check(self.max_minutes >= 0, f"train.max_minutes={self.max_minutes} must be >= 0 (0: no budget).")

    def compiled(self, device_type: str) -> bool:
        """Whether ``train.compile`` is on for a run on ``device_type`` ("cuda" | "cpu"): ``auto`` compiles on
        CUDA (llama3-1b, one H200, 64k: +11% tokens/s, the same losses; benchmarks/results/session10_*) and
        not on CPU, where inductor's C++ compile costs more than the small models there gain."""
        return self.compile if isinstance(self.compile, bool) else device_type == "cuda"


@dataclass(frozen=True)
class LoggingConfig:
    """Console + JSONL always (rank 0); wandb when ``wandb=true`` (offline unless WANDB_API_KEY is set)."""

    log_every: int = 10
    run_dir: str = "runs/default"
    progress: bool = True  # a progress bar on rank 0 when attached to a terminal
    wandb: bool = False
    wandb_project: str = "seqpar"
    peak_tflops: float = 0.0  # per-device bf16 peak for MFU; 0: look up the GPU, or skip MFU on CPU
    profile_at: int = 0  # > 0: profile steps [profile_at, profile_at + profile_steps) into <run_dir>/profile/
    profile_steps: int = 2
    profile_trace: bool = False  # also write each rank's Chrome trace there (large at long sequences)

    def __post_init__(self) -> None:
        check_positive("logging.log_every", self.log_every)
        check(bool(self.run_dir), "logging.run_dir must be a non-empty path.")
        check(self.profile_at >= 0, f"logging.profile_at={self.profile_at} must be >= 0 (0: no profiling).")
        check_positive("logging.profile_steps", self.profile_steps)

@dataclass(frozen=True)
class CheckpointConfig:
    """Atomic checkpoints under ``<run_dir>/checkpoints``; ``every=0`` disables saving."""

    every: int = 0
    keep_last: int = 2
    resume: bool = True  # resume from the latest complete checkpoint in the run dir
    async_save: bool = False  # dcp.async_save: training continues while a background thread writes
    allow_changes: List[str] = field(default_factory=list)  # e.g. [train.seq_len] to resume longer (train/run_dir.py)

    def __post_init__(self) -> None:
        check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0 (0 disables).")
        check_positive("checkpoint.keep_last", self.keep_last)
