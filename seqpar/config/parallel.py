"""The ``parallel`` section: the dp x cp mesh, the sequence layout, the attention backend, FSDP."""
from __future__ import annotations

from dataclasses import dataclass

from seqpar.config.checks import check, check_choice, check_positive
from seqpar.ops.attention.registry import BACKEND_NAMES
from seqpar.parallel.fsdp import FSDP_MODES
from seqpar.parallel.layout import LAYOUTS

DIST_BACKENDS = ("auto", "nccl", "gloo")

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
    timeout_s: float = 600.0  # seconds a collective waits for a frozen rank before the run fails (exit 1)

    def __post_init__(self) -> None:
        check_choice("parallel.fsdp", self.fsdp, FSDP_MODES)
        check_positive("parallel.timeout_s", self.timeout_s)
        check(self.dp == -1 or self.dp > 0, f"parallel.dp={self.dp} must be a positive integer or -1 (auto).")
        check_positive("parallel.cp", self.cp)
        check_choice("parallel.layout", self.layout, LAYOUTS)
        check_choice("parallel.attention_backend", self.attention_backend, BACKEND_NAMES)
        check_choice("parallel.dist_backend", self.dist_backend, DIST_BACKENDS)

    def resolve(self, world_size: int) -> tuple[int, int]:
        """Return ``(dp, cp)`` for ``world_size`` processes, or raise naming the fix."""
        check(
            world_size % self.cp == 0,
            f"parallel.cp={self.cp} does not divide the world size {world_size}; "
            f"choose cp among the divisors of {world_size}.",
        )
        dp = world_size // self.cp if self.dp == -1 else self.dp
        check(
            dp * self.cp == world_size,
            f"parallel.dp={dp} x parallel.cp={self.cp} = {dp * self.cp} but the world size is {world_size}; "
            "set dp=-1 or make dp*cp equal the number of processes.",
        )
        return dp, self.cp
