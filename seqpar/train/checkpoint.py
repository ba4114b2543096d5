"""Atomic, rank-aware checkpoints under ``<run_dir>/checkpoints/step-NNNNNNNN``.

Commit protocol: every rank writes ``rank-R.pt`` into ``step-N.tmp``; after a barrier rank 0 writes
``meta.json`` and renames the folder to ``step-N``. A save killed half-way leaves only a ``.tmp``
folder, which is never picked up, so the last complete checkpoint is always the one loaded.

Each rank stores its own file (model, optimizer, scheduler, data iterator state, RNG) so that
per-rank state such as the data position and RNG streams survives exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the fix."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of committed checkpoints, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(ckpt_dir: str, step: int, state: dict, *, rank: int, world_size: int, keep_last: int) -> str:
    """Write this rank's ``state`` for ``step`` and commit atomically once every rank has written."""
    final = os.path.join(ckpt_dir, f"step-{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    part = os.path.join(tmp, f"rank-{rank}.pt")
    torch.save(state, part + ".part")
    os.replace(part + ".part", part)
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": world_size}, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_latest(ckpt_dir: str, *, rank: int, world_size: int) -> Optional[tuple[int, dict]]:
    """Load this rank's state from the newest complete checkpoint; None when there is none.

    Raises CheckpointError naming the folder when it was written by another world size or a file
    in it is unreadable (truncated, corrupted).
    """
    found = complete_checkpoints(ckpt_dir)
    if not found:
        return None
    step, path = found[-1]
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json ({e}); delete that folder to "
                              "resume from the previous one, or set checkpoint.resume=false.") from e
    if meta.get("world_size") != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {meta.get('world_size')} processes but this run "
                              f"has {world_size}; resume with the same number of processes or set "
                              "checkpoint.resume=false.")
    part = os.path.join(path, f"rank-{rank}.pt")
    try:
        state = torch.load(part, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / garbled files
        raise CheckpointError(f"checkpoint file {part} is corrupted or unreadable ({type(e).__name__}); delete "
                              f"{path} to resume from the previous checkpoint, or set checkpoint.resume=false.") from e
    return step, state
