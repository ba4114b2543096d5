"""The ``parallel`` section: the dp x cp mesh, the sequence layout, the attention backend, FSDP."""
from __future__ import annotations

from dataclasses import dataclass

from seqpar.config.checks import check, check_choice, check_positive
from seqpar.ops.attention.registry import BACKEND_NAMES
from seqpar.parallel.attention_fn import CP_COMM_CHOICES
from seqpar.parallel.fsdp import FSDP_MODES
from seqpar.parallel.hybrid import HYBRID_LAYOUTS
from seqpar.parallel.layout import LAYOUTS

DIST_BACKENDS = ("auto", "nccl", "gloo")
# auto: the run's layout is Config.layout (docs for packed documents under the document mask, else zigzag)
LAYOUT_CHOICES = (*LAYOUTS, "auto")

@dataclass(frozen=True)
class ParallelConfig:
    """Device mesh: ``dp * cp`` must equal the world size (``dp=-1`` fills in the rest)."""

    dp: int = -1
    cp: int = 1
    layout: str = "auto"  # zigzag | striped | contiguous | docs | auto (see seqpar.config.Config.layout)
    attention_backend: str = "auto"
    dist_backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    # FSDP2 sharding of params / grads / optimizer state (seqpar.parallel.fsdp): dp_cp shards over all
    # dp*cp ranks (least memory); dp shards over dp and replicates over cp (HSDP: grads all-reduced
    # over cp); none replicates everything (gradients all-reduced, DDP-like).
    fsdp: str = "dp_cp"
    timeout_s: float = 600.0  # seconds a collective waits for a frozen rank before the run fails (exit 1)
    # How the cp ranks exchange attention inputs (seqpar.parallel.attention_fn): ring | allgather (K/V) |
    # ulysses (head all-to-all over cp) | hybrid (ulysses over `ulysses` consecutive ranks, ring across) |
    # auto (the cost model's fastest usable mode).
    cp_comm: str = "ring"
    ulysses: int = 1  # hybrid's Ulysses degree U (divides cp); also offered to auto when > 1
    # cp_comm=allgather: K/V head slices pipelined (the next slice's gather hides behind this slice's
    # kernels; backward reduce-scatters behind the next slice); cut to the KV heads; 1 = no overlap;
    # 0 = auto: the cost model's best count for the run's shape (more slices: more hidden, more kernel calls)
    allgather_slices: int = 0
    # cp_comm=ulysses: head chunks per rank pipelined (chunk c+1's all-to-all behind chunk c's kernel); cut to a
    # divisor of the KV heads per rank; 1 = one all-to-all per tensor (default: chunking measured no gain)
    ulysses_chunks: int = 1

    def __post_init__(self) -> None:
        check_choice("parallel.fsdp", self.fsdp, FSDP_MODES)
        check_positive("parallel.timeout_s", self.timeout_s)
        check(self.dp == -1 or self.dp > 0, f"parallel.dp={self.dp} must be a positive integer or -1 (auto).")
        check_positive("parallel.cp", self.cp)
        check_choice("parallel.layout", self.layout, LAYOUT_CHOICES)
        check_choice("parallel.attention_backend", self.attention_backend, BACKEND_NAMES)
        check_choice("parallel.dist_backend", self.dist_backend, DIST_BACKENDS)
        self._check_cp_comm()

    def _check_cp_comm(self) -> None:
        check_choice("parallel.cp_comm", self.cp_comm, CP_COMM_CHOICES)
        check_positive("parallel.ulysses", self.ulysses)
        check(isinstance(self.allgather_slices, int) and not isinstance(self.allgather_slices, bool)
              and self.allgather_slices >= 0, f"parallel.allgather_slices={self.allgather_slices!r} must be a "
              "non-negative integer (0: auto, the cost model's count; 1: no overlap; 2-8: pipelined slices).")
        check_positive("parallel.ulysses_chunks", self.ulysses_chunks)
        u, cp, mode = self.ulysses, self.cp, self.cp_comm
        check(cp % u == 0, f"parallel.ulysses={u} does not divide parallel.cp={cp}; choose a divisor of {cp} "
                           "(Ulysses groups of U consecutive cp ranks) or parallel.cp_comm=ring with ulysses=1.")
        if mode == "hybrid":
            check(1 < u < cp, f"parallel.cp_comm=hybrid needs 1 < parallel.ulysses < parallel.cp={cp} (got ulysses={u}); "
                              "use parallel.cp_comm=ring (U=1) or parallel.cp_comm=ulysses (U=cp).")
            check(self.layout in (*HYBRID_LAYOUTS, "auto"),
                  f"parallel.cp_comm=hybrid needs parallel.layout in {list(HYBRID_LAYOUTS)} (got {self.layout}); "
                  "or use parallel.cp_comm=ulysses or allgather.")
        elif mode == "ulysses":
            check(u in (1, cp), f"parallel.cp_comm=ulysses runs over the whole cp group (parallel.ulysses=1 or "
                                f"{cp}; got {u}); use parallel.cp_comm=hybrid for Ulysses inside groups of {u}.")
        elif mode in ("ring", "allgather"):
            check(u == 1, f"parallel.ulysses={u} is read only by parallel.cp_comm=hybrid or auto; set "
                          f"parallel.cp_comm=hybrid, or parallel.ulysses=1 with cp_comm={mode}.")

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
