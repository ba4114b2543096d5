"""One run per run directory: a lock, the saved config's agreement, and metrics that continue on resume.

``logging.run_dir`` holds ONE run: ``config.yaml`` (the resolved config, read back by ``seqpar.eval``),
``metrics.jsonl`` and ``checkpoints/``. Before a run touches any of them, rank 0
(:func:`prepare_run_dir`):

1. takes ``<run_dir>/.lock`` with ``fcntl.flock`` (held until the run ends; the kernel drops it when the
   process dies, so a lock left by a killed run is never stale); the file names the holder's pid and
   host for the message a second run gets;
2. compares the new config with the saved ``config.yaml`` on :data:`MUST_AGREE` (the model's shape and
   the data / batch stream the checkpoint's state belongs to), when the directory holds something to
   protect (a checkpoint or metrics). A difference stops the run with one line naming the keys and the
   two ways out: another ``logging.run_dir``, or ``checkpoint.allow_changes=[...]`` for the keys of
   :data:`CHANGEABLE` (e.g. a longer ``train.seq_len`` to extend the context of a trained run);
3. only then writes ``config.yaml``, atomically (tmp + rename).

On resume from step N, :func:`truncate_metrics` drops the records after N (logged by the run that was
interrupted after its last checkpoint), so ``metrics.jsonl`` holds each step once.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import TYPE_CHECKING, Optional

from seqpar.errors import ConfigError

if TYPE_CHECKING:
    from seqpar.config import Config

# What the saved and the new config must agree on before a run may resume (or overwrite) a run directory.
MUST_AGREE = (
    "model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_hidden",
    "model.multiple_of", "model.ffn_dim_multiplier", "model.tie_embeddings", "model.rope_theta",
    "model.rope_scaling", "model.max_position_embeddings",
    "data.source", "data.paths", "data.jsonl_field", "data.tokenizer", "data.tokenizer_path", "data.bpe_vocab_size",
    "data.val_fraction", "data.position_ids", "data.max_bytes", "data.pose_target_len", "data.pose_chunks",
    "train.seq_len", "train.batch_size", "train.grad_accum", "train.seed", "parallel.cp",
    "lora.rank", "lora.targets",
)
# The keys ``checkpoint.allow_changes`` may name: they change positions or the data stream, no tensor's shape
# (the data iterator then starts afresh: its saved position belongs to the old stream).
CHANGEABLE = ("train.seq_len", "train.batch_size", "train.grad_accum", "train.seed", "model.rope_theta",
              "model.rope_scaling", "model.max_position_embeddings",
              *(k for k in MUST_AGREE if k.startswith("data.")))
# Changes that invalidate the saved data-iterator position (the trainer then restarts the stream).
DATA_STREAM = ("train.seq_len", "train.batch_size", "train.grad_accum", "train.seed",
               *(k for k in MUST_AGREE if k.startswith("data.")))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not name.endswith("rope_scaling"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(cfg: "Config") -> dict:
    """``cfg`` as config.yaml records it (a YAML round trip, so values compare like saved ones)."""
    import yaml

    return _flatten(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))


def _has_history(run_dir: str) -> bool:
    """A checkpoint (complete or being written) or a logged record: something a new run must not clobber."""
    ckpt = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt) and any(n.startswith("step-") for n in os.listdir(ckpt)):
        return True
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return os.path.isfile(metrics) and os.path.getsize(metrics) > 0


def changed_keys(cfg: "Config", run_dir: Optional[str] = None) -> list[str]:
    """The :data:`MUST_AGREE` keys where ``cfg`` differs from ``<run_dir>/config.yaml`` ([] when there is
    no saved config, or nothing in the directory to protect). Keys the saved file lacks (written by an
    older seqpar) are not compared."""
    import yaml

    run_dir = run_dir or cfg.logging.run_dir
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path) or not _has_history(run_dir):
        return []
    try:
        with open(path) as f:
            saved = _flatten(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is unreadable ({str(e).splitlines()[0]}); restore it, or use another "
                          "logging.run_dir.") from None
    new = _plain(cfg)
    return [k for k in MUST_AGREE if k in saved and k in new and saved[k] != new[k]]


def check_same_run(cfg: "Config") -> list[str]:
    """Raise ConfigError unless ``cfg`` may continue the run in ``logging.run_dir``; return the keys that
    differ and ``checkpoint.allow_changes`` allows (the trainer restarts the data stream for some)."""
    allow = list(cfg.checkpoint.allow_changes)
    bad = [k for k in allow if k not in CHANGEABLE]
    if bad:
        raise ConfigError(f"checkpoint.allow_changes={bad} cannot change in a resumed run (only {', '.join(CHANGEABLE[:7])} "
                          "or data.* can: the weights fix the rest); start a new run with another logging.run_dir.")
    if not os.path.isfile(os.path.join(cfg.logging.run_dir, "config.yaml")):
        # Nothing to compare with (a new run, or a run dir written by an older seqpar): the keys the user
        # allows are taken as changed, so a checkpoint there resumes with a restarted data stream.
        return allow
    changed = changed_keys(cfg)
    blocked = [k for k in changed if k not in allow]
    if not blocked:
        return changed
    run_dir = cfg.logging.run_dir
    saved = _flatten(_load_yaml(os.path.join(run_dir, "config.yaml")))
    new = _plain(cfg)
    diffs = ", ".join(f"{k} ({saved[k]!r} -> {new[k]!r})" for k in blocked)
    can = [k for k in changed if k in CHANGEABLE]
    fixed = [k for k in blocked if k not in CHANGEABLE]
    if can and not fixed:
        second = f"or continue this run with the change: checkpoint.allow_changes=[{','.join(can)}]"
    elif can:
        second = (f"or continue this run with checkpoint.allow_changes=[{','.join(can)}] and the saved "
                  f"{', '.join(fixed)} (the checkpoint fixes {'it' if len(fixed) == 1 else 'them'})")
    else:
        second = f"or continue this run with the saved {', '.join(fixed)} (the checkpoint fixes them)"
    raise ConfigError(f"logging.run_dir={run_dir} holds another run: its config.yaml differs in {diffs}; start a "
                      f"new run with another logging.run_dir (e.g. logging.run_dir={run_dir.rstrip('/')}-2), {second}.")


def _load_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` (rank 0 holds it for the whole run).

    A lock held by this same process (a second Trainer on one directory, e.g. a test or a notebook) is
    not a conflict: flock locks belong to open files, and a process never races itself between steps.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self._file = None

    def acquire(self) -> "RunLock":
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            if holder == self._me():
                return self  # this process already holds it (through another open file)
            raise ConfigError(f"logging.run_dir={os.path.dirname(self.path)} is in use by another live run "
                              f"({holder or 'unknown process'}); wait for it to finish or stop it, or use another "
                              "logging.run_dir.") from None
        f.seek(0)
        f.truncate()
        f.write(self._me())
        f.flush()
        self._file = f
        return self

    @staticmethod
    def _me() -> str:
        return f"pid {os.getpid()} on {socket.gethostname()}"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (it is only a name to lock)
            self._file = None


def prepare_run_dir(cfg: "Config") -> tuple[RunLock, list[str]]:
    """Rank 0's start of a run: lock, agreement check, then the atomic config.yaml (see the module doc).

    Returns the held lock and the allowed changed keys. Raises ConfigError (the lock is released then).
    """
    from seqpar.train.resolve import write_config

    lock = RunLock(cfg.logging.run_dir).acquire()
    try:
        changed = check_same_run(cfg)
        if not _unclaimed_checkpoints(cfg.logging.run_dir):
            write_config(cfg)
    except BaseException:
        lock.release()
        raise
    return lock, changed


def _unclaimed_checkpoints(run_dir: str) -> bool:
    """Checkpoints but no config.yaml (a run dir of an older seqpar): nothing says yet whether this config can
    continue them, so its config.yaml waits for the resume to succeed (:func:`claim_run`)."""
    ckpts = os.path.join(run_dir, "checkpoints")
    return not os.path.isfile(os.path.join(run_dir, "config.yaml")) and os.path.isdir(ckpts) and any(
        os.path.isfile(os.path.join(ckpts, name, "meta.json")) for name in os.listdir(ckpts))


def claim_run(cfg: "Config") -> None:
    """Rank 0, once the run has resumed (or chosen not to): write the config.yaml that
    :func:`prepare_run_dir` held back for a run dir without one."""
    from seqpar.train.resolve import write_config

    if not os.path.isfile(os.path.join(cfg.logging.run_dir, "config.yaml")):
        write_config(cfg)


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keep the records of ``<run_dir>/metrics.jsonl`` up to ``step`` (atomically); a torn last line goes too."""
    from seqpar.train.metrics import read_records

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = [line if line.endswith("\n") else line + "\n" for line, rec in read_records(path)
            if isinstance(rec.get("step"), int) and rec["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_run(cfg: "Config", *, rank: int, world_size: int, group=None) -> tuple[Optional[RunLock], list[str]]:
    """:func:`prepare_run_dir` on rank 0, its verdict shared with every rank (collective over ``group``), so
    all ranks stop with the same one-line ConfigError or go on together. Returns (rank 0's lock or None,
    the allowed changed keys)."""
    import torch.distributed as dist

    lock, verdict = None, [None, []]
    if rank == 0:
        try:
            lock, changed = prepare_run_dir(cfg)
            verdict = [None, changed]
        except ConfigError as e:
            verdict = [str(e), []]
    if world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0, group=group)
    if verdict[0] is not None:
        raise ConfigError(verdict[0])
    return lock, verdict[1]
