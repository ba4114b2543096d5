"""``python -m seqpar.launch [torchrun arguments] train.py [overrides]``: torchrun that exits like train.py.

torchrun (``torch.distributed.run``) ends every non-zero worker exit with exit 1 and 30-40 lines of its own
traceback, so a scheduler cannot tell "stopped and saved" from "crashed". This wrapper takes exactly
torchrun's arguments, runs the same launcher, and exits with the workers' code
(:mod:`seqpar.train.exit_codes`: 0 finished, 1 crash, 2 user error, 3 stopped and saved, 4 diverged),
printing one ``seqpar.launch:`` line instead of the traceback (the workers' tracebacks still show; an ``error:``
line that several ranks of a node would print alike shows once).

Which code, when ranks differ: that of the ranks that ended FIRST (torchrun stops the others then, and
their codes only echo the first); a crash among them wins, else the highest code. When torchrun itself is signalled (SIGTERM / SIGINT to the launcher,
e.g. Ctrl-C or a scheduler's preemption), it forwards the signal to the workers, waits for them
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default) and reports only the signal; the workers' codes then
come from the files train.py leaves in a temporary folder (``SEQPAR_EXIT_DIR``).

    python -m seqpar.launch --standalone --nproc_per_node=8 train.py experiment=...
    srun python -m seqpar.launch --nnodes=$N --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HOST:29500 --rdzv_id=$SLURM_JOB_ID train.py ...
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

from seqpar.train import exit_codes as codes

_KNOWN = (codes.FINISHED, codes.CRASH, codes.USER_ERROR, codes.STOPPED, codes.DIVERGED)


def combine(failures: dict) -> int:
    """One exit code from torchrun's ``{rank: ProcessFailure}``: workers torchrun killed afterwards (a
    signal) are ignored; of the rest, those that ended first (second resolution) decide: any crash or
    unknown code gives :data:`~seqpar.train.exit_codes.CRASH`, else the highest of seqpar's codes."""
    ended = [f for f in failures.values() if f.exitcode >= 0] or list(failures.values())
    if not ended:
        return codes.CRASH
    first = min(f.timestamp for f in ended)
    found = {f.exitcode for f in ended if f.timestamp == first}
    if any(c not in _KNOWN or c == codes.CRASH for c in found):
        return codes.CRASH
    return max(found)


def _reported(folder: str) -> Optional[int]:
    """The workers' codes written by train.py: the worst of them (crash dominates), None when none wrote."""
    found = []
    for name in os.listdir(folder):
        if not name.startswith("rank-"):  # (train.py also leaves "said-*" markers there: see its _error)
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                found.append(int(f.read().strip()))
        except (OSError, ValueError):
            continue
    if not found:
        return None
    if any(c not in _KNOWN or c == codes.CRASH for c in found):
        return codes.CRASH
    return max(found)  # 4 diverged > 3 stopped > 2 user error > 0 finished


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return codes.FINISHED if argv else codes.USER_ERROR
    args = parse_args(argv)
    # torchrun's own warnings (OMP_NUM_THREADS, "failed (exitcode: 3)", ...) would drown the one line below.
    # torchrun's modules set their own loggers' levels, so each is quieted by name (all are imported by now).
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    folder = tempfile.mkdtemp(prefix="seqpar-exit-")
    os.environ[codes.EXIT_DIR_ENV] = folder  # inherited by every worker of this node
    try:
        run(args)
        code = codes.FINISHED
    except ChildFailedError as e:
        code = combine(e.failures)
    except SignalException as e:
        reported = _reported(folder)
        code = codes.CRASH if reported is None else reported
        print(f"seqpar.launch: received {e.sigval.name}; workers reported "
              f"{'nothing (killed before they finished)' if reported is None else 'their exit codes'}",
              file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = _reported(folder) or codes.CRASH
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if code != codes.FINISHED:
        print(f"seqpar.launch: workers ended with {codes.describe(code)}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
