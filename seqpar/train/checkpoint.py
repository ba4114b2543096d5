"""Atomic, sharded checkpoints under ``<run_dir>/checkpoints/step-NNNNNNNN`` (torch.distributed.checkpoint).

Commit protocol: every rank writes its shards into ``step-N.tmp`` with ``dcp.save`` (or
``dcp.async_save``); once every rank has finished, rank 0 writes ``meta.json`` and renames the folder
to ``step-N``. A save killed half-way leaves only a ``.tmp`` folder, which is never picked up (and is
cleared by the next save of that step), so the newest complete checkpoint is always the one loaded.

The state is a DCP "application state" dict built by the trainer: sharded model and optimizer
(DTensors under FSDP2; DCP writes each shard once and can reshard them on load), the scheduler, and
per-rank state (data iterator position, RNG streams) under RANK-UNIQUE keys (``rank3/...``): DCP
deduplicates entries that share a key across ranks, so a per-rank tensor under a common key would
silently keep one rank's value for all.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from typing import Optional

import torch.distributed as dist

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the fix."""


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of committed checkpoints, oldest first (``.tmp`` folders never count)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


@contextlib.contextmanager
def _single_process_quiet():
    # DCP warns on every single-process save/load that it assumes a single process: that is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: str) -> None:
    # A rename is durable only once its directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_init_state(model, state: dict, model_name: str = "") -> None:
    """Copy a whole model's state dict (plain tensors, the un-adapted model's keys: another model's
    ``state_dict()``) into ``model``, each rank keeping its own shard; LoRA adapters stay freshly
    initialised. A checkpoint to resume from (``checkpoint.resume``) still wins over it.

    Raises ConfigError when the keys differ from the model's (another shape or architecture).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from seqpar.errors import ConfigError

    # Canonical names (no AC / compile wrapper prefixes); sharded values, so nothing is gathered.
    want = {k for k in get_model_state_dict(model) if "lora_" not in k}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ConfigError(f"init_state does not fit model {model_name!r}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}; give the config the weights' own model shape "
                          "(model.dim, model.n_layers, ...).")
    # strict=False: the adapters are not in ``state`` (checked above: nothing else is missing).
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


class Checkpointer:
    """Saves and loads DCP checkpoints of one run; one instance per rank, same calls on every rank.

    Args:
        ckpt_dir: ``<run_dir>/checkpoints``. rank, world_size: this process in the default group.
        keep_last: committed checkpoints to keep (older ones are deleted after each commit).
        async_save: write in a background thread (``dcp.async_save``); the commit happens at the next
            :meth:`save` or :meth:`wait`, which every rank must reach.
        process_group: group for DCP's coordination and the commit barriers. Use a gloo group: an
            async save runs collectives from its own thread, which must not share the training group.
    """

    def __init__(self, ckpt_dir: str, *, rank: int, world_size: int, keep_last: int, async_save: bool = False,
                 process_group=None):
        self.ckpt_dir, self.rank, self.world_size = ckpt_dir, rank, world_size
        self.keep_last, self.async_save, self.pg = keep_last, async_save, process_group
        self._pending = None  # (future, step, tmp path) of an async save not yet committed
        self.distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)

    # ------------------------------------------------------------------------------------------- save
    def save(self, step: int, state: dict) -> None:
        """Write ``state`` (DCP application state) for ``step``; commit now, or later when async."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save in flight at a time; commits the previous one
        final = os.path.join(self.ckpt_dir, f"step-{step:08d}")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
            os.makedirs(tmp, exist_ok=True)
        self._barrier()
        kwargs = dict(checkpoint_id=tmp, process_group=self.pg, no_dist=not self.distributed)
        if self.async_save:
            with _single_process_quiet():
                resp = dcp.async_save(state, **kwargs)
            # torch returns a Future, or (newer staging APIs) a response holding one.
            self._pending = (getattr(resp, "upload_completion", resp), step, tmp)
        else:
            with _single_process_quiet():
                dcp.save(state, **kwargs)
            self._commit(step, tmp)

    def wait(self) -> None:
        """Finish an async save in flight (if any) and commit it. Collective."""
        if self._pending is None:
            return
        future, step, tmp = self._pending
        self._pending = None
        future.result()  # raises here if the background write failed
        self._commit(step, tmp)

    def _commit(self, step: int, tmp: str) -> None:
        self._barrier()  # every rank's shards are on disk
        if self.rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": self.world_size, "format": "dcp"}, f)
                f.flush()
                os.fsync(f.fileno())
            final = tmp[: -len(".tmp")]
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            for _, old in complete_checkpoints(self.ckpt_dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def clean_stale(self) -> list[str]:
        """Delete what a killed save leaves: ``step-N.tmp`` folders and empty ``step-N`` folders. Rank 0 only,
        before this run's first save, while it holds the run directory's lock (no other live run writes
        here); returns the removed paths."""
        removed = []
        if self.rank != 0 or self._pending is not None or not os.path.isdir(self.ckpt_dir):
            return removed
        for name in sorted(os.listdir(self.ckpt_dir)):
            path = os.path.join(self.ckpt_dir, name)
            stale_tmp = name.startswith("step-") and name.endswith(".tmp")
            empty = bool(_STEP_DIR.match(name)) and os.path.isdir(path) and not os.listdir(path)
            if os.path.isdir(path) and (stale_tmp or empty):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # ------------------------------------------------------------------------------------------- load
    def candidates(self) -> list[tuple[int, str]]:
        """Complete checkpoints newest first, as rank 0 sees them (so all ranks agree)."""
        found = [list(reversed(complete_checkpoints(self.ckpt_dir)))]
        if self.distributed:
            dist.broadcast_object_list(found, src=0, group=self.pg)
        return found[0]

    def latest(self) -> Optional[tuple[int, str]]:
        """``(step, path)`` of the newest complete checkpoint, as rank 0 sees it (so all ranks agree)."""
        found = self.candidates()
        return found[0] if found else None

    def load_latest(self, state: dict) -> Optional[int]:
        """Load the newest usable checkpoint into ``state`` in place; its step, or None when there is none.

        ``state`` is the application state with the same keys and tensor shapes as saved (templates). A
        corrupted newest checkpoint (unreadable meta.json, empty or truncated ``.metadata``, garbled shards)
        is skipped with a warning naming it, in favour of the previous one; it is left on disk.

        Raises:
            CheckpointError: naming the folder, when it was written by another world size, or when no
                checkpoint can be loaded (every one corrupted, or none matches this model).
        """
        found = self.candidates()
        if not found:
            return None
        errors = []
        for step, path in found:
            why = self._try_load(state, path)
            if why is None:
                if errors and self.rank == 0:
                    warnings.warn(f"skipped corrupted checkpoint(s) {'; '.join(errors)}; resumed from {path} "
                                  "instead (the skipped folders are left for inspection).", stacklevel=2)
                return step
            errors.append(f"{path} ({why})")
        newest = found[0][1]
        raise CheckpointError(f"no checkpoint in {self.ckpt_dir} can be loaded: {newest} is corrupted or does not "
                              f"match this run (last error: {errors[0].split(' (', 1)[1][:-1]}); check that the "
                              "config is the run's own, or set checkpoint.resume=false and use another "
                              "logging.run_dir.")

    def _try_load(self, state: dict, path: str) -> Optional[str]:
        """Load ``path`` into ``state``; None on success, else why it cannot be read. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            return f"unreadable meta.json: {e}"
        if meta.get("world_size") != self.world_size:
            raise CheckpointError(f"checkpoint {path} was written by {meta.get('world_size')} processes but this run "
                                  f"has {self.world_size}; resume with the same number of processes or set "
                                  "checkpoint.resume=false.")
        metadata = os.path.join(path, ".metadata")
        if not os.path.isfile(metadata) or os.path.getsize(metadata) == 0:
            return "its .metadata is missing or empty"  # DCP would print pages of tracebacks first
        try:
            with _single_process_quiet(), _quiet_dcp_logs():
                dcp.load(state, checkpoint_id=path, process_group=self.pg, no_dist=not self.distributed)
        # DCP gathers every rank's failure (truncated / garbled file, shape mismatch) into a
        # CheckpointException, raised on all ranks; it derives from BaseException, hence named here.
        except (Exception, CheckpointException) as e:
            return (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()[:300]
        return None


@contextlib.contextmanager
def _quiet_dcp_logs():
    # DCP logs each rank's failure with its traceback before raising; the one-line summary is ours.
    import logging

    log = logging.getLogger("torch.distributed.checkpoint")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
