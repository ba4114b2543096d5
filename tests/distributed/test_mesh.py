"""The dp x cp mesh: environment resolution (torchrun, srun, none), validation, rank layout, FSDP meshes."""
import subprocess
import sys

import pytest
import torch

from seqpar.config import ConfigError, ParallelConfig
from seqpar.parallel.fsdp import fsdp_mesh
from seqpar.parallel.mesh import DistEnv, Mesh, dist_env, init_mesh, mesh_groups


def test_dist_env_prefers_torchrun_then_slurm_then_single_process():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert dist_env(torchrun) == DistEnv(5, 8, 1)
    assert dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}) == DistEnv(3, 16, 3)
    assert dist_env({}) == DistEnv(0, 1, 0)


def test_resolve_fills_dp_and_names_the_fix():
    assert ParallelConfig(cp=2).resolve(8) == (4, 2)
    assert ParallelConfig(dp=2, cp=4).resolve(8) == (2, 4)
    with pytest.raises(ConfigError, match=r"parallel.dp=3 x parallel.cp=2 = 6 but the world size is 8"):
        ParallelConfig(dp=3, cp=2).resolve(8)
    with pytest.raises(ConfigError, match="parallel.cp=3 does not divide the world size 8"):
        ParallelConfig(cp=3).resolve(8)
    with pytest.raises(ConfigError, match="parallel.fsdp"):
        ParallelConfig(fsdp="zero2")


def test_rank_layout_keeps_cp_rings_adjacent():
    groups = mesh_groups(2, 4)
    assert groups["cp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one ring per dp rank, on one node when cp <= GPUs/node
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = Mesh(dp=2, cp=4, rank=6, world_size=8, device=torch.device("cpu"))
    assert (mesh.dp_rank, mesh.cp_rank) == (1, 2) and mesh.rank in groups["cp"][mesh.dp_rank]


def test_single_process_mesh_has_no_groups_and_no_fsdp(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    mesh = init_mesh(ParallelConfig(), "cpu")
    assert (mesh.dp, mesh.cp, mesh.world_size, mesh.device_mesh, mesh.cpu_group) == (1, 1, 1, None, None)
    assert fsdp_mesh(mesh, "dp_cp") is None
    with pytest.raises(ConfigError, match="parallel.cp=2 does not divide the world size 1"):
        init_mesh(ParallelConfig(cp=2), "cpu")


def test_fsdp_mesh_and_ac_modes_import_neither_config_nor_model():
    """seqpar.config imports FSDP_MODES and AC_MODES from these modules: importing seqpar.config (or a
    model) back at runtime would be an import cycle; the comms layer knows no model."""
    code = ("import sys, seqpar.parallel.fsdp, seqpar.parallel.mesh, seqpar.models.checkpointing; "
            "print(sorted(m for m in sys.modules if m == 'seqpar.config' or m.startswith('seqpar.models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['seqpar.models.checkpointing']"], out.stdout
