"""The first ring transfer on an NCCL group is preceded by one barrier (``batch_isend_irecv`` as a group's first
collective is undefined when a rank posts no op, as trimmed hops can): once per group, matched on every rank.
Run on gloo with the backend name patched to "nccl", so the barrier path itself is exercised."""
import pytest

from dist_utils import run_distributed


def _worker(rank, world):
    import torch
    import torch.distributed as dist

    from seqpar.parallel import ring
    from seqpar.parallel.ring import RingComm

    calls = []
    real_barrier = dist.barrier
    ring.dist.get_backend = lambda g=None: "nccl"  # this process only (spawned)
    ring.dist.barrier = lambda group=None: (calls.append(group), real_barrier(group=group))
    group = dist.new_group(list(range(world)))
    got = []
    for comm in (RingComm(group), RingComm(group), RingComm(None)):
        for _ in range(2):
            got.append(comm.send_recv([torch.full((3,), float(rank))]).wait()[0].clone())
    return {"barriers": len(calls), "got": got}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_one_barrier_per_nccl_group_before_its_first_transfer(n):
    for rank, res in enumerate(run_distributed(_worker, n)):
        assert res["barriers"] == 2  # the new group once, the default group once; none per transfer
        assert all(int(t[0]) == (rank - 1) % n for t in res["got"])
