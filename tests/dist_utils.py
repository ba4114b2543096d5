"""Run a function on N real processes (gloo on CPU, or NCCL on one GPU each) and bring the results back to the test.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with the ``spawn`` start
method, a free TCP port on 127.0.0.1, and a hard deadline: if any process fails or the group does
not finish in time, every child is killed and the test fails with the children's tracebacks, so a
distributed bug never hangs the suite. Each rank's return value comes back through a file
(``torch.save``), which avoids sharing tensor storage through a queue after the child exited.

Spawning costs a few seconds per process (importing torch), so tests batch many cases into one
group and assert per case in the parent.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world_size: int, port: int, outdir: str, args: tuple, pg_timeout_s: float,
           backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # N processes on few cores: oversubscription makes gloo waits look like hangs
    try:
        # The store is made here, not by init_process_group, so rank 0 can keep its server up after its own group
        # is gone: a peer's teardown still talks to it (had rank 0 exited first, the peer could abort in C++,
        # "terminate called without an active exception", after a run that was otherwise correct).
        timeout = timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":  # rank r drives GPU r; device_id binds the group to it (eager NCCL init)
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, timeout=timeout,
                                    device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        if dist.is_initialized():  # (unless fn tore the group down itself)
            try:
                dist.barrier()  # nobody tears down while a peer is still inside a collective
            except RuntimeError:
                pass  # a test that timed a peer out on purpose leaves the pairs closed; fn's result stands
            # Every rank tears down at once: NCCL's communicator teardown may wait for its peers, so rank 0 must not
            # hold back its own (it did until 2026-11-29: rank 1 blocked in teardown, rank 0 waited for rank 1's
            # marker, and a 2-GPU test idled pg_timeout_s = 300 s before finishing).
            dist.destroy_process_group()
        open(os.path.join(outdir, f"rank{rank}.down"), "w").close()
        if rank == 0:  # rank 0 hosts the store: it stays up until every peer has torn its group down
            _wait_for_peers(outdir, world_size, pg_timeout_s)
        del store
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)


def _wait_for_peers(outdir: str, world_size: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(outdir, f"rank{r}.down")) for r in range(1, world_size)):
            return
        time.sleep(0.02)


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0, pg_timeout_s: float = 60.0,
                    backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo (or nccl) processes; return each rank's result.

    ``backend="nccl"``: one GPU per rank (rank r on ``cuda:r``), so ``world_size`` must not exceed the GPU count.

    ``fn`` must be a module-level function (picklable). Raises AssertionError with the children's
    tracebacks if any rank fails, or after ``timeout_s`` seconds (all children killed).
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: run_distributed supports 'gloo' and 'nccl'.")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, outdir, args, pg_timeout_s, backend),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed = False
        while time.monotonic() < deadline:
            if all(not p.is_alive() for p in procs):
                break
            if any(p.exitcode not in (None, 0) for p in procs):
                failed = True  # one rank died: the others may wait for it forever
                time.sleep(1.0)  # let siblings write their own tracebacks first
                break
            time.sleep(0.05)
        timed_out = any(p.is_alive() for p in procs) and not failed
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        errors = {}
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.err")
            if os.path.exists(path):
                errors[r] = open(path).read()
        if timed_out or errors or any(p.exitcode != 0 for p in procs):
            why = f"timed out after {timeout_s:.0f}s" if timed_out else "failed"
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            codes = [p.exitcode for p in procs]
            raise AssertionError(f"distributed run on {world_size} ranks {why} (exit codes {codes})\n{detail}")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
