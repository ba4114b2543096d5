"""seqpar training entry point.

    python train.py                                   # tiny model on the embedded corpus, CPU or 1 GPU
    python train.py model=llama3-1b train.seq_len=65536 parallel.cp=2
    torchrun --nproc_per_node=8 train.py experiment=<name> key=value ...
    python train.py --cfg [overrides]                 # print the composed config and exit
    python train.py --dry-run model=llama3-8b parallel.dp=1 parallel.cp=8 train.seq_len=1048576
                                                      # validate, print mesh + per-GPU memory, allocate nothing

Hydra composes ``conf/`` with the overrides against the typed schema of ``seqpar/config.py``
(``seqpar/cli.py``); ``seqpar.train.resolve`` then fills in what needs files (an HF checkpoint's shape,
the tokenizer's vocabulary) once, and the library receives that frozen, resolved config. ``--cfg``
prints the composed config as written. User mistakes end with one ``error:`` line and exit code 2
(SEQPAR_DEBUG=1 shows the traceback).
"""
import os
import sys


def main(argv: list) -> int:
    from seqpar.cli import config_yaml, load_config
    from seqpar.errors import ConfigError
    from seqpar.train.checkpoint import CheckpointError

    show = "--cfg" in argv
    overrides = [a for a in argv if a not in ("--cfg", "--dry-run")]
    if "--dry-run" in argv:
        overrides.append("train.dry_run=true")  # same as the override; the flag is easier to remember
    try:
        cfg = load_config(overrides)
        if show:
            print(config_yaml(cfg), end="")
            return 0
        from seqpar.train import run
        from seqpar.train.resolve import resolve_config

        run(resolve_config(cfg))
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        if os.environ.get("SEQPAR_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
