"""The exit codes of ``train.py`` and of ``python -m seqpar.launch``: what a scheduler reads.

The same numbers for a plain process, under the launcher (one torchrun per node) and under ``srun``:

    0  FINISHED      trained to ``train.steps`` (or a dry run that fits)
    1  CRASH         an unexpected exception (a bug, a lost rank, out of memory); the traceback is printed
    2  USER_ERROR    a mistake the user can fix: one ``error:`` line names the key and the fix (bad config,
                     missing file, a run directory holding another run, a dry run that does not fit)
    3  STOPPED       stopped early and SAVED: SIGTERM / SIGUSR2 / SIGINT, ``train.stop_file`` or the
                     ``train.max_minutes`` budget; a checkpoint was written, so a scheduler should requeue
    4  DIVERGED      more than ``train.max_bad_steps`` consecutive non-finite steps; nothing non-finite was
                     saved, the last good checkpoint is kept; requeueing would diverge again

Only 3 means "requeue". A leaf module (imports nothing from seqpar), so launchers can read it cheaply.
"""
from __future__ import annotations

FINISHED = 0
CRASH = 1
USER_ERROR = 2
STOPPED = 3
DIVERGED = 4

MEANING = {
    FINISHED: "finished",
    CRASH: "crashed (an unexpected error; see the traceback above)",
    USER_ERROR: "user error (see the error: line above)",
    STOPPED: "stopped and saved (a checkpoint was written; requeue to resume)",
    DIVERGED: "diverged (too many non-finite steps; the last good checkpoint is kept)",
}

# The launcher learns each worker's code through this folder when torchrun itself was signalled (torchrun
# then reports only the signal): train.py writes ``<dir>/rank-<RANK>`` holding its exit code.
EXIT_DIR_ENV = "SEQPAR_EXIT_DIR"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite for more than ``train.max_bad_steps`` consecutive steps
    (exit code :data:`DIVERGED`). The message names the step and the knobs (``optim.lr``, ``optim.grad_clip``)."""


def describe(code: int) -> str:
    """A short phrase for an exit code (``"exit 3: stopped and saved (...)"``)."""
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit {code}: {MEANING.get(code, 'crashed')}"
