"""Issue 18, item 9: ``parallel.timeout_s`` bounds how long a rank waits for a frozen (not dead) peer, on the
mesh's own groups (the ring's cp group, the gloo coordination group), instead of a fixed 600 s."""
import time

import pytest

from dist_utils import run_distributed


def _frozen_peer(rank, world):
    from seqpar.config import ParallelConfig
    from seqpar.parallel.mesh import init_mesh

    import torch
    import torch.distributed as dist

    mesh = init_mesh(ParallelConfig(cp=2, timeout_s=3.0), "cpu")
    waited = {}
    for name, group in (("cp", mesh.cp_group), ("cpu", mesh.cpu_group)):
        if rank == 1:
            time.sleep(6.0)  # frozen: alive, but never joins the collective
            continue
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            waited[name] = None  # it did not time out
        except Exception:  # gloo raises a timeout error (RuntimeError / DistBackendError)
            waited[name] = time.monotonic() - start
    return waited


@pytest.mark.timeout(90)
def test_timeout_s_bounds_the_wait_for_a_frozen_rank():
    waited = run_distributed(_frozen_peer, 2, timeout_s=80, pg_timeout_s=60)[0]
    for name in ("cp", "cpu"):
        assert waited[name] is not None and waited[name] < 5.5, waited  # 3 s, not the process group's 60 s
