"""Recompute the weak-scaling MFU of this folder's runs with the FLOPs of the attention they actually did.

The runs trained with data.doc_mask=true (the default since issue 13): attention only within packed stdlib
documents. Their logged MFU counted dense causal attention (6 L d S per token), which over-states the work at
long sequences (71% "MFU" at 256k). This rebuilds each run's batches on the CPU (same config, seed, data
pipeline), counts the visible keys per query under the document mask (seqpar.train.metrics.mean_visible_keys:
what the trainer now logs), and recomputes MFU = flops_per_token(keys) x measured tokens/s/GPU / 989 TFLOP/s.

    .venv/bin/python benchmarks/results/session4_2026-11-28/weak_scaling/recompute_mfu.py
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))
from seqpar.cli import load_config  # noqa: E402
from seqpar.data.packing import build_data  # noqa: E402
from seqpar.models import Llama  # noqa: E402
from seqpar.train.metrics import mean_visible_keys  # noqa: E402
from seqpar.train.resolve import resolve_config  # noqa: E402


def main():
    data = json.load(open(os.path.join(HERE, "train_scaling_NVIDIA-H200_x4_2026-11-28.json")))
    rows = []
    for run in data["runs"]:
        cfg = resolve_config(load_config([o for o in run["overrides"] if not o.startswith("parallel.")]))
        with torch.device("meta"):
            model = Llama(cfg.model)
        train, _, _ = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=1, seed=cfg.train.seed)
        it = iter(train)
        keys = [mean_visible_keys(next(it)["doc_ids"], cfg.train.seq_len) for _ in range(len(run["steps"]))]
        timed = keys[-run["steps_timed"]:]
        k = sum(timed) / len(timed)
        fpt = model.flops_per_token(cfg.train.seq_len, keys_per_query=k)
        dense = model.flops_per_token(cfg.train.seq_len)
        tps = run["tokens_per_s_per_gpu"]
        rows.append(dict(run=run["name"], seq_len=cfg.train.seq_len, keys_per_query=round(k, 1),
                         logged_mfu=run["mfu"], mfu=round(fpt * tps / 989e12, 4), dense_causal_mfu=round(dense * tps / 989e12, 4),
                         tokens_per_s_per_gpu=tps))
    print("| run | seq_len | mean keys/query (doc mask) | tokens/s/GPU | MFU (mask's FLOPs) | logged (dense causal count) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seq_len']:,} | {r['keys_per_query']:,} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{100 * r['mfu']:.1f}% | {100 * r['logged_mfu']:.1f}% |")
    json.dump(rows, open(os.path.join(HERE, "recomputed_mfu.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
