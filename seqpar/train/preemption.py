"""Stop requests -> one agreed decision across ranks, checked between steps.

Sources, any rank: SIGTERM (torchrun forwards it to workers; Slurm sends it before a kill), SIGINT
(Ctrl-C: the first one checkpoints like SIGTERM, a later one interrupts at once), SIGUSR2
(``sbatch --signal=USR2@T`` under plain srun), a stop file (``train.stop_file``; slurm/seqpar.sbatch
touches it from its USR2 trap, since a signal cannot reach workers through torchrun safely), and the
``train.max_minutes`` budget. Signal handlers only set a flag; the loop asks :meth:`StopRequest.poll`
after each step, which takes the MAX over ranks with an all-reduce, so every rank stops after the same
step and saves the same checkpoint even when the signal reached only some of them. train.py calls
:func:`catch_early` first, so a signal that arrives while a rank is still setting up is kept for the loop
instead of killing that rank while its peers wait in a collective.

The all-reduce runs on a gloo group on CPU tensors: no CUDA synchronisation in the step loop.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

REASONS = {0: None, 1: "train.max_minutes reached", 2: "stop file found", 3: "signal received"}
SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
_EARLY: dict = {"signum": None}  # a stop signal that arrived before the loop's StopRequest took over


def catch_early() -> Callable[[], None]:
    """From process start (train.py calls it first), remember stop signals instead of dying of them, until a
    :class:`StopRequest` is installed and adopts the signal: a SIGTERM while this rank still builds its model
    (its peers may already be in a collective) then ends in a checkpoint after the first step, not in a dead
    rank and a crash. A second Ctrl-C still interrupts. Returns the function that puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _remember) for sig in SIGNALS}

    def release() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _EARLY["signum"] = None
    return release


def _remember(signum, frame) -> None:
    if signum == signal.SIGINT and _EARLY["signum"] == signal.SIGINT:
        raise KeyboardInterrupt
    _EARLY["signum"] = signum


class StopRequest:
    """Collects stop requests on this rank and agrees on them across ranks.

    Args:
        max_minutes: wall-clock budget from ``start_time`` (0: none).
        stop_file: path whose existence asks for a stop (None: none); checked on rank 0 only.
        rank, group: this rank and the group to agree over (None / world 1: no communication).
    """

    def __init__(self, *, max_minutes: float = 0.0, stop_file: Optional[str] = None, start_time: Optional[float] = None,
                 rank: int = 0, group=None, world_size: int = 1):
        self.max_minutes, self.stop_file = max_minutes, stop_file
        self.start_time = time.time() if start_time is None else start_time
        self.rank, self.group, self.world_size = rank, group, world_size
        self.signum: Optional[int] = None
        self._sigint_at: Optional[float] = None  # time.monotonic() of the first SIGINT
        self._previous: dict = {}

    # Handlers must be installed from the main thread (a Python rule); elsewhere we only poll.
    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            if _EARLY["signum"] is not None:  # asked for before the loop began (catch_early): honoured now
                self.signum, _EARLY["signum"] = _EARLY["signum"], None
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            # A later Ctrl-C aborts a step that hangs. One within a second or two is the same keypress twice:
            # under a launcher, a worker gets the terminal's SIGINT and the one torchrun forwards.
            if self._sigint_at is not None and now - self._sigint_at > 2.0:
                raise KeyboardInterrupt
            if self._sigint_at is None and self.rank == 0:
                print("\nCtrl-C: checkpointing after this step, then stopping (Ctrl-C again aborts at once)",
                      flush=True)
            self._sigint_at = self._sigint_at or now
        self.signum = signum  # act between steps, never inside a collective

    def local_code(self) -> int:
        """This rank's request: the largest key of :data:`REASONS` that applies (0: none)."""
        if self.signum is not None:
            return 3
        if self.rank == 0 and self.stop_file and os.path.exists(self.stop_file):
            return 2
        if self.max_minutes and (time.time() - self.start_time) / 60 >= self.max_minutes:
            return 1
        return 0

    def poll(self) -> Optional[str]:
        """The reason to stop agreed by all ranks (collective), or None to continue."""
        code = torch.tensor([self.local_code()], dtype=torch.int32)
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.group)
        return REASONS[int(code.item())]
