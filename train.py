"""seqpar training entry point.

    python train.py                                   # tiny model on the embedded corpus, CPU or 1 GPU
    python train.py model=llama3-1b train.seq_len=65536   # one GPU; ring attention needs parallel.cp processes:
    python -m seqpar.launch --nproc_per_node=2 train.py model=llama3-1b train.seq_len=65536 parallel.cp=2
    python -m seqpar.launch --nproc_per_node=8 train.py experiment=<name> key=value ...   # torchrun's arguments
    python train.py --cfg [overrides]                 # print the composed config and exit
    python train.py --help                            # config groups, how to override, where the docs are
    python train.py --dry-run model=llama3-8b parallel.dp=1 parallel.cp=8 train.seq_len=1048576
                                                      # validate, print mesh + per-GPU memory, allocate nothing

Hydra composes ``conf/`` with the overrides against the typed schema of ``seqpar/config/``
(``seqpar/cli.py``); ``seqpar.train.resolve`` then fills in what needs files (an HF checkpoint's shape,
the tokenizer's vocabulary) once, and the library receives that frozen, resolved config. ``--cfg``
prints the composed config as written.

Exit codes (``seqpar/train/exit_codes.py``; the same through ``python -m seqpar.launch`` and ``srun``):
0 finished; 1 crash (an unexpected exception, traceback printed); 2 user error (one ``error:`` line naming
the key and the fix; also a ``--dry-run`` that does not fit; SEQPAR_DEBUG=1 shows the traceback);
3 stopped and saved (SIGTERM, SIGUSR2, SIGINT, ``train.stop_file`` or ``train.max_minutes``: a checkpoint was
written, requeue to resume); 4 diverged (more than ``train.max_bad_steps`` consecutive non-finite steps;
nothing non-finite saved).
"""
import os
import sys


def usage() -> str:
    from seqpar.cli import CONF_DIR

    groups = []
    for name in sorted(os.listdir(CONF_DIR)):
        path = os.path.join(CONF_DIR, name)
        if os.path.isdir(path):
            options = sorted(f[:-5] for f in os.listdir(path) if f.endswith(".yaml"))
            groups.append(f"  {name + '=':<12} {' | '.join(options)}")
    return "\n".join([
        "usage: python train.py [--cfg | --dry-run | --help] [group=option ...] [key=value ...]",
        "       python -m seqpar.launch --nproc_per_node=N train.py [overrides]   (several processes / GPUs)",
        "",
        "Config groups (conf/), chosen with group=option:", *groups,
        "",
        "Override any key of seqpar/config/ as section.key=value, e.g.",
        "  python train.py model=llama3-1b train.seq_len=4096 train.steps=500 logging.run_dir=runs/mine",
        "  python train.py data=text 'data.paths=[corpus/*.txt]' optim.lr=1e-3",
        "--cfg prints every key with its value; --dry-run prints the mesh and a per-GPU memory estimate.",
        "",
        "Exit codes: 0 finished, 1 crash, 2 user error (one error: line), 3 stopped and saved (requeue),",
        "4 diverged (non-finite loss).  Docs: README.md, docs/architecture.md, seqpar/config/.",
    ])


def main(argv: list) -> int:
    from seqpar.train.preemption import catch_early

    release = catch_early()  # a stop signal during setup is honoured after the first step, not fatal
    try:
        return _main(argv)
    finally:
        release()


def _main(argv: list) -> int:
    from seqpar.errors import ConfigError
    from seqpar.train import exit_codes as codes
    from seqpar.train.checkpoint import CheckpointError

    if "--help" in argv or "-h" in argv:
        print(usage())
        return codes.FINISHED
    show = "--cfg" in argv
    overrides = [a for a in argv if a not in ("--cfg", "--dry-run")]
    if "--dry-run" in argv:
        overrides.append("train.dry_run=true")  # same as the override; the flag is easier to remember
    try:
        from seqpar.cli import config_yaml, load_config

        cfg = load_config(overrides)
        if show:
            print(config_yaml(cfg), end="")
            return codes.FINISHED
        from seqpar.train import run
        from seqpar.train.resolve import resolve_config

        out = run(resolve_config(cfg))
        if cfg.train.dry_run and not out["fits"]:
            raise ConfigError("the configuration does not fit in 90% of the GPU (estimate above); apply one of the "
                              "suggested changes, or drop --dry-run to try anyway.")
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        if os.environ.get("SEQPAR_DEBUG") == "1":
            raise
        _error(f"error: {e}")
        return codes.USER_ERROR
    except codes.TrainingDiverged as e:
        _error(f"error: {e}")
        return codes.DIVERGED
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asked for a checkpoint at the step's end
        print("error: interrupted before the step ended; nothing saved since the last checkpoint.", file=sys.stderr,
              flush=True)
        return codes.CRASH
    if not cfg.train.dry_run and out.get("stopped"):
        return codes.STOPPED
    return codes.FINISHED


def _error(line: str) -> None:
    """Print ``line`` once per node: under ``python -m seqpar.launch`` the ranks of a node share a folder, and
    the first rank to claim a message prints it (the same config error on 8 ranks is one line; different
    messages all show). Without the launcher (plain torchrun, srun, one process) every rank prints."""
    folder = os.environ.get("SEQPAR_EXIT_DIR")
    if folder:
        import hashlib

        try:
            os.close(os.open(os.path.join(folder, "said-" + hashlib.sha1(line.encode()).hexdigest()[:16]),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another rank of this node said it already
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)


def _report(code: int) -> int:
    """Leave the exit code where ``python -m seqpar.launch`` finds it when torchrun itself was signalled."""
    folder = os.environ.get("SEQPAR_EXIT_DIR")
    if folder:
        try:
            with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(_report(main(sys.argv[1:])))
