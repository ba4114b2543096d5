"""The dp x cp device mesh: process-group setup, rank/env resolution, and the topology object.

One binary runs under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set), under plain
``srun`` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID as fallback; MASTER_ADDR/PORT must be exported
by the sbatch script), or as a single process with no environment at all.

The mesh is ``[dp, cp]`` with cp innermost, so the ranks of one context-parallel ring are adjacent
(on one node when cp <= GPUs per node, where the ring's send/recv runs over NVLink). Global rank
``r`` sits at ``(dp_rank, cp_rank) = divmod(r, cp)``. Every group derives from one
``torch.distributed.device_mesh.DeviceMesh`` with named dims ``("dp", "cp")``. The mesh owns every
process group of a run: the dp and cp groups, the gloo CPU group the trainer and checkpointer
coordinate over, and the DeviceMeshes FSDP2 shards over (:func:`seqpar.parallel.fsdp.fsdp_mesh`),
each created once, in the same order on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Protocol

import torch
import torch.distributed as dist

MESH_DIMS = ("dp", "cp")


class MeshSpec(Protocol):
    """What :func:`init_mesh` reads of ``seqpar.config.ParallelConfig``. Structural, so this module
    imports no config: ``seqpar.config`` imports ``seqpar.parallel.fsdp``, which imports this module."""

    dist_backend: str  # auto | nccl | gloo
    timeout_s: float  # process-group timeout: how long a collective waits for a frozen rank

    def resolve(self, world_size: int) -> tuple[int, int]:
        """``(dp, cp)`` for ``world_size`` processes; raises ConfigError naming the fix."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def dist_env(environ: Optional[dict] = None) -> DistEnv:
    """Read rank / world size / local rank from torchrun's variables, else Slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def mesh_groups(dp: int, cp: int) -> dict:
    """Rank lists of every group of a ``[dp, cp]`` mesh, without any process group (dry-run, tests).

    Returns ``{"cp": [[ranks of ring 0], ...] (dp lists of cp), "dp": [[...], ...] (cp lists of dp)}``.
    """
    grid = torch.arange(dp * cp).view(dp, cp)  # [dp, cp]: rank = dp_rank * cp + cp_rank
    return {"cp": grid.tolist(), "dp": grid.t().tolist()}


def cp_subgroups(dp: int, cp: int, ulysses: int) -> dict:
    """The 2-D cp group of ``parallel.cp_comm=hybrid``: rank lists of the Ulysses groups (``ulysses``
    consecutive ranks of a ring: one node) and of the rings across them (one member per Ulysses group).

    cp rank ``c = i * U + j`` is member ``j`` of Ulysses group ``i`` and member ``i`` of ring ``j``.
    Returns ``{"ulysses": [...] (dp * cp/U lists of U), "ring": [...] (dp * U lists of cp/U)}``.
    """
    grid = torch.arange(dp * cp).view(dp, cp // ulysses, ulysses)  # [dp, R, U]
    return {"ulysses": grid.reshape(-1, ulysses).tolist(), "ring": grid.transpose(1, 2).reshape(-1, cp // ulysses).tolist()}


def new_cp_subgroups(dp: int, cp: int, ulysses: int, rank: int, timeout: Optional[timedelta] = None) -> tuple:
    """Create every group of :func:`cp_subgroups` (collective: all ranks, same order) and return this
    rank's ``(ulysses_group, ring_group)``."""
    mine = {}
    for name, lists in cp_subgroups(dp, cp, ulysses).items():
        for ranks in lists:
            g = dist.new_group(ranks, timeout=timeout) if timeout is not None else dist.new_group(ranks)
            if rank in ranks:
                mine[name] = g
    return mine["ulysses"], mine["ring"]


@dataclass
class Mesh:
    """Topology of one run. Every group and ring neighbour derives from here; passed explicitly."""

    dp: int
    cp: int
    rank: int
    world_size: int
    device: torch.device
    dp_group: Optional[dist.ProcessGroup] = None  # None only for a single process
    cp_group: Optional[dist.ProcessGroup] = None  # None only for a single process
    device_mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = None  # [dp, cp]; None for 1 process
    # gloo over all ranks, for coordination that must not touch the GPU stream: checkpoint saves (async
    # saves run collectives from a thread) and the per-step stop agreement. None for 1 process.
    cpu_group: Optional[dist.ProcessGroup] = None
    _fsdp_meshes: dict = field(default_factory=dict, repr=False, compare=False)  # name -> DeviceMesh
    timeout: Optional[timedelta] = None  # parallel.timeout_s, applied to every group the mesh creates
    # parallel.ulysses = U > 1: the 2-D cp group (hybrid); U consecutive cp ranks, rings across (cp_subgroups)
    ulysses: int = 1
    ulysses_group: Optional[dist.ProcessGroup] = None
    ring_group: Optional[dist.ProcessGroup] = None

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def flat_device_mesh(self):
        """1-D DeviceMesh ``("dp_cp",)`` over all ranks (FSDP ``dp_cp``). Collective on first call; cached."""
        return self._fsdp_mesh("dp_cp", lambda ranks: ranks, ("dp_cp",))

    def hsdp_device_mesh(self):
        """2-D DeviceMesh ``("cp", "dp")``: cp replicates, dp shards (FSDP ``dp``). Collective on first call; cached."""
        # FSDP2 reads a 2-D mesh as (replicate, shard): transpose [dp, cp] so cp is the replicate dim.
        return self._fsdp_mesh("cp_dp", lambda ranks: ranks.view(self.dp, self.cp).t(), ("cp", "dp"))

    def _fsdp_mesh(self, key: str, arrange, names: tuple):
        if key not in self._fsdp_meshes:
            from torch.distributed.device_mesh import DeviceMesh

            ranks = torch.arange(self.world_size)  # [world]
            self._fsdp_meshes[key] = DeviceMesh(self.device.type, arrange(ranks), mesh_dim_names=names)
            for dim in range(len(names)):
                _set_timeout(self._fsdp_meshes[key].get_group(dim), self.timeout)
        return self._fsdp_meshes[key]

    def describe(self) -> str:
        return (f"world={self.world_size} mesh=[dp={self.dp}, cp={self.cp}] rank={self.rank} "
                f"(dp_rank={self.dp_rank}, cp_rank={self.cp_rank}) device={self.device}")


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from seqpar.errors import ConfigError

            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu (or auto).")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_mesh(cfg: MeshSpec, device_kind: str = "auto", timeout_s: Optional[float] = None) -> Mesh:
    """Initialise the default process group (if world > 1 and not done yet), the ``[dp, cp]`` mesh and
    the gloo CPU group. Collective: every rank calls it once per mesh, in the same order.

    ``timeout_s`` (default ``cfg.timeout_s``, i.e. ``parallel.timeout_s``, else 600) bounds how long any
    collective waits for a rank that froze: the run then fails instead of blocking every other rank.

    Raises ConfigError (from ``cfg.resolve``) when ``dp * cp`` does not match the world size, or for
    ``train.device=cuda`` without a visible GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh

    env = dist_env()
    dp, cp = cfg.resolve(env.world_size)
    timeout = timedelta(seconds=getattr(cfg, "timeout_s", 600.0) if timeout_s is None else timeout_s)
    device = pick_device(device_kind, env.local_rank)
    if env.world_size == 1:
        return Mesh(dp, cp, 0, 1, device)
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = dict(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        if device.type == "cuda":
            kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
        dist.init_process_group(**kwargs)
    # Collective: every rank builds the same mesh (torch.distributed creates subgroups in lockstep).
    dm = init_device_mesh(device.type, (dp, cp), mesh_dim_names=MESH_DIMS)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    for name in MESH_DIMS:
        _set_timeout(dm.get_group(name), timeout)
    u = getattr(cfg, "ulysses", 1)
    ug, rg = new_cp_subgroups(dp, cp, u, env.rank, timeout) if 1 < u and cp > 1 else (None, None)
    return Mesh(dp, cp, env.rank, env.world_size, device, dm.get_group("dp"), dm.get_group("cp"), dm,
                cpu_group=cpu_group, timeout=timeout, ulysses=u, ulysses_group=ug, ring_group=rg)


def _set_timeout(group, timeout: Optional[timedelta]) -> None:
    # DeviceMesh creates its groups with torch's default timeout (10 min NCCL, 30 min gloo) and takes none;
    # torch's own setter is private, hence looked up (a no-op where a torch version lacks it).
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if timeout is not None and setter is not None:
        setter(timeout, group)


def destroy_mesh() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
