"""The dp x cp device mesh: process-group setup, rank/env resolution, and the topology object.

One binary runs under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set), under plain
``srun`` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID as fallback; MASTER_ADDR/PORT must be exported
by the sbatch script), or as a single process with no environment at all.

The mesh is ``[dp, cp]`` with cp innermost, so the ranks of one context-parallel ring are adjacent
(on one node when cp <= GPUs per node, where the ring's send/recv runs over NVLink).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from seqpar.config import ParallelConfig


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


@dataclass
class Mesh:
    """Topology of one run. Every group and ring neighbour derives from here; passed explicitly."""

    dp: int
    cp: int
    rank: int
    world_size: int
    device: torch.device
    dp_group: Optional[dist.ProcessGroup] = None  # None when dp == 1
    cp_group: Optional[dist.ProcessGroup] = None  # None when cp == 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"world={self.world_size} mesh=[dp={self.dp}, cp={self.cp}] rank={self.rank} "
                f"(dp_rank={self.dp_rank}, cp_rank={self.cp_rank}) device={self.device}")


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_mesh(cfg: ParallelConfig, device_kind: str = "auto", timeout_s: float = 600.0) -> Mesh:
    """Initialise the default process group (if world > 1) and build the dp / cp subgroups.

    Raises ConfigError (from ``cfg.resolve``) when ``dp * cp`` does not match the world size.
    """
    env = dist_env()
    dp, cp = cfg.resolve(env.world_size)
    device = pick_device(device_kind, env.local_rank)
    if env.world_size == 1:
        return Mesh(dp, cp, 0, 1, device)
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = dict(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
        if device.type == "cuda":
            kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
        dist.init_process_group(**kwargs)
    dp_group = cp_group = None
    # Every rank must create every subgroup, in the same order (a torch.distributed rule).
    for d in range(dp):
        ranks = list(range(d * cp, (d + 1) * cp))
        g = dist.new_group(ranks) if cp > 1 else None
        if env.rank in ranks:
            cp_group = g
    for c in range(cp):
        ranks = list(range(c, dp * cp, cp))
        g = dist.new_group(ranks) if dp > 1 else None
        if env.rank in ranks:
            dp_group = g
    return Mesh(dp, cp, env.rank, env.world_size, device, dp_group, cp_group)


def destroy_mesh() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
