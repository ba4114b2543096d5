"""Export a seqpar run (newest checkpoint, LoRA merged) or re-save an HF directory as a Hugging Face
Llama checkpoint, optionally with another rope_scaling (what the model was extended to):

    python -m seqpar.eval.export --checkpoint runs/longlora --out hf/longlora [--scaling yarn:4] \\
        [--source hf/base] [--max-shard-mb 5000] [overrides ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from seqpar.eval.common import load_model, parse_scaling, run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from seqpar.models.hf import save_hf

    parser = argparse.ArgumentParser(prog="python -m seqpar.eval.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="seqpar run directory or HF directory")
    parser.add_argument("--out", required=True, help="directory to write config.json + safetensors into")
    parser.add_argument("--scaling", default="checkpoint", help="rope_scaling to record: checkpoint | none | TYPE:FACTOR | JSON")
    parser.add_argument("--source", default=None, help="HF directory whose tokenizer files and extra config fields to keep")
    parser.add_argument("--max-shard-mb", type=int, default=5000)
    parser.add_argument("overrides", nargs="*", help="config overrides for a run directory without config.yaml")
    args = parser.parse_args(argv)
    loaded = load_model(args.checkpoint, args.overrides)
    loaded.model.set_rope_scaling(parse_scaling(args.scaling, loaded.model, loaded.train_len))
    files = save_hf(loaded.model, args.out, max_shard_bytes=args.max_shard_mb * 2**20, source=args.source)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
