"""Small-scale reproductions of the long-context inference claims, in one process on one GPU (or CPU).

    python3 benchmarks/repro_long_context.py --out benchmarks/results            # ~5 min on one H200
    python3 benchmarks/repro_long_context.py --preset tiny --device cpu --steps 30 --out /tmp/r   # the CPU test

1. Trains a small Llama (``--preset small``: 36.8M parameters, byte tokenizer, 1024-token context) with the
   real :class:`seqpar.train.Trainer` on the embedded corpus for ``--train-minutes`` (``train.max_minutes``: the
   trainer stops itself; the LR is constant after warmup because the step count is not known in advance).
   Rows are packed documents attending across boundaries with positions 0..L-1 (``data.doc_mask=false``), as
   the pretraining of the models in the papers; the run directory is new under ``--workdir``.
2. Scores held-out text (the corpus' val split, never trained on) with :func:`seqpar.inference.token_nll`:
   (1) StreamingLLM: window-only vs 4 sinks + window vs the full cache on streams of 4x the training length;
   (2) H2O: 10% heavy + 10% recent vs a recent-only cache of the same size vs full, decoding token by token;
   (3) LM-Infinite and DCA vs plain RoPE, PI and YaRN (factor n) at 1x, 2x, 4x, 8x the training length.
3. Writes JSON + markdown + one PNG per claim into a new ``--out/repro_long_context_<device>_<time>/``, stamped
   with device, versions, date, model size and tokens trained; prints one verdict line per claim, computed
   from the rows by the criteria in benchmarks/repro_claims.py, then the table.

One seed, a model trained for minutes: read each verdict with its numbers; where a claim is not reproduced,
the line says which condition failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name: model shape, training and evaluation sizes; every field can be overridden on the command line.
PRESETS = {
    "small": dict(dim=640, n_layers=8, n_heads=10, n_kv_heads=5, train_len=1024, batch_size=32, lr=1e-3,
                  warmup=100, log_every=50, max_bytes=None, eval_batch=8, buckets=32),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, train_len=64, batch_size=8, lr=3e-3,
                 warmup=5, log_every=10, max_bytes=500_000, eval_batch=1, buckets=8),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="a new results folder is made inside")
    p.add_argument("--workdir", default="/tmp/seqpar_repro", help="the training run directory is made inside")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--train-minutes", type=float, default=3.0, help="training wall-clock budget (train.max_minutes)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the budget decides)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sinks", type=int, default=4, help="StreamingLLM's initial tokens")
    p.add_argument("--caches", default=None, help="StreamingLLM cache sizes, comma-separated (default L/8,L/4,L/2)")
    p.add_argument("--stream-factor", type=int, default=4, help="StreamingLLM stream length in training lengths")
    p.add_argument("--factors", default="1,2,4,8", help="context-extension lengths in training lengths")
    p.add_argument("--heavy", type=float, default=0.1, help="H2O heavy-hitter budget, fraction of the sequence")
    p.add_argument("--recent", type=float, default=0.1, help="H2O recent budget, fraction of the sequence")
    for name, value in PRESETS["small"].items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value) if value is not None else int, default=None,
                       help=f"override the preset (small: {value})")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    L = args.train_len
    args.caches = [int(c) for c in args.caches.split(",")] if args.caches else [L // 8, L // 4, L // 2]
    args.factors = [int(f) for f in args.factors.split(",")]
    if any(not args.sinks < c < L for c in args.caches) or min(args.factors) != 1:
        p.error(f"--caches must lie in ({args.sinks}, train_len={L}) and --factors must start at 1.")
    return args


def fresh_dir(parent: str, name: str) -> str:
    """A new, empty ``parent/name[-k]``: never an earlier run's folder."""
    for k in range(1000):
        path = os.path.join(parent, name if k == 0 else f"{name}-{k}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no fresh directory for {name} under {parent}")


def train(args, device: str) -> dict:
    """Train through the real Trainer; return the model (eval mode), its tokenizer, data config and stats."""
    from seqpar.config import (CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                               TrainConfig)
    from seqpar.parallel.mesh import destroy_mesh, init_mesh
    from seqpar.train import Trainer

    run_dir = fresh_dir(args.workdir, f"repro-{args.preset}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    cfg = Config(
        model=ModelConfig(name="tiny", dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                          n_kv_heads=args.n_kv_heads, max_position_embeddings=args.train_len),
        data=DataConfig(max_bytes=args.max_bytes, doc_mask=False, position_ids="sequence"),
        optim=OptimConfig(lr=args.lr, warmup_steps=args.warmup, min_lr_ratio=1.0),
        train=TrainConfig(seq_len=args.train_len, batch_size=args.batch_size, steps=args.steps or 1_000_000,
                          device=device, eval_every=0, seed=args.seed, max_minutes=args.train_minutes),
        logging=LoggingConfig(run_dir=run_dir, log_every=args.log_every, progress=False),
        checkpoint=CheckpointConfig(every=0, resume=False),
    )
    start = time.time()
    mesh = init_mesh(cfg.parallel, device)
    try:
        trainer = Trainer(cfg, mesh)
        result = trainer.fit()
    finally:
        destroy_mesh()
    model = trainer.model
    model.set_attn_fn(None)
    last = [h for h in result["history"] if "loss" in h and h["loss"] is not None]
    stats = {"run_dir": run_dir, "steps": result["step"], "stopped": result["stopped"],
             "tokens_trained": result["step"] * args.batch_size * args.train_len, "train_seconds": time.time() - start,
             "last_loss": last[-1]["loss"] if last else None, "last_loss_step": last[-1]["step"] if last else None,
             "params": model.num_params(), "model": dataclasses.asdict(trainer.cfg.model)}
    return {"model": model.eval(), "tokenizer": trainer.tokenizer, "data": trainer.cfg.data, "stats": stats}


def plot(path: str, series: dict, *, title: str, xlabel: str, vline=None, logx: bool = False) -> str:
    """One PNG: ``{label: [(x, ppl)]}`` on a log perplexity axis, the training length dashed."""
    from seqpar.eval.common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=label)
    if vline:
        ax.axvline(vline, color="gray", ls="--", lw=1, label="training length")
    if logx:  # ticked at exactly the measured lengths
        xs = sorted({x for pts in series.values() for x, _ in pts})
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(xs, [str(int(x)) for x in xs])
    ax.set(yscale="log", xlabel=xlabel, ylabel="perplexity", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(args, trained: dict, device: str) -> tuple[list, dict, dict]:
    """Run the three measurements; return ``(rows, curves, seconds per claim)``."""
    import repro_evals as ev
    import torch

    from seqpar.eval.common import Loaded, eval_text_stream

    model, L, B = trained["model"].to(device), args.train_len, args.eval_batch
    loaded = Loaded(model, trained["tokenizer"], L, trained["stats"]["run_dir"], trained["data"])
    S_max = max(args.stream_factor, max(args.factors)) * L
    stream = eval_text_stream(loaded, None, B * S_max)
    rows, curves, seconds = [], {}, {}
    torch.manual_seed(args.seed)

    t = time.time()
    ids = ev.segments(stream, B, args.stream_factor * L, device)
    r, curves["streaming"] = ev.streaming_eval(model, ids, L, args.caches, args.sinks, args.buckets)
    rows += r
    seconds["streaming"] = time.time() - t
    print(f"streaming: {time.time() - t:.1f}s", flush=True)

    t = time.time()
    r, curves["h2o"] = ev.h2o_eval(model, ev.segments(stream, B, L, device), L // 2, args.heavy, args.recent,
                                   args.buckets)
    rows += r
    seconds["h2o"] = time.time() - t
    print(f"h2o: {time.time() - t:.1f}s", flush=True)

    t = time.time()
    longest = max(args.factors) * L  # as many rows of the longest length as the held-out stream holds (<= B)
    rows += ev.extension_eval(model, ev.segments(stream, max(1, min(B, len(stream) // longest)), longest, device), L,
                              args.factors, L // 2)
    seconds["extension"] = time.time() - t
    print(f"extension: {time.time() - t:.1f}s", flush=True)
    return rows, curves, seconds


def write_plots(out_dir: str, rows: list, curves: dict, L: int) -> dict:
    ext = {}
    for r in (r for r in rows if r["claim"] == "extension"):
        ext.setdefault(r["method"], []).append((r["length"], r["ppl"]))
    return {
        "streaming": plot(os.path.join(out_dir, "streaming.png"), curves["streaming"], xlabel="query position",
                          title="(1) StreamingLLM: perplexity by position", vline=L),
        "h2o": plot(os.path.join(out_dir, "h2o.png"), curves["h2o"], xlabel="query position (decoded)",
                    title="(2) H2O: 20% cache vs recent-only vs full"),
        "extension": plot(os.path.join(out_dir, "extension.png"), ext, xlabel="context length (tokens)", logx=True,
                          title="(3) the same last tokens scored with longer context", vline=L),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [ROOT, HERE]  # seqpar from this checkout; report / repro_* next to this file
    import report
    import repro_claims
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    trained = train(args, device)
    st = trained["stats"]
    print(f"trained {st['params'] / 1e6:.1f}M params for {st['steps']} steps ({st['tokens_trained'] / 1e6:.1f}M tokens) "
          f"in {st['train_seconds']:.0f}s; last loss {st['last_loss']}", flush=True)
    rows, curves, seconds = evaluate(args, trained, device)
    claims = repro_claims.judge_all(rows, args.train_len)
    lines = repro_claims.claim_lines(claims)

    env = report.environment()
    meta = {**env, "eval_device": device, "python": platform.python_version(), "machine": platform.machine(),
            **{k: v for k, v in st.items() if k != "model"}, "model": st["model"], "train_len": args.train_len,
            "args": {k: v for k, v in vars(args).items()}, "thresholds": {"near": repro_claims.NEAR,
            "far": repro_claims.FAR, "blowup": repro_claims.BLOWUP}, "eval_seconds": seconds,
            "total_seconds": None}
    slug = env["device"].replace(" ", "-")
    out_dir = fresh_dir(args.out, f"repro_long_context_{slug}_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    try:
        pngs = write_plots(out_dir, rows, curves, args.train_len)
    except ImportError as e:  # no matplotlib: the measured numbers still reach the JSON and markdown
        pngs = {"error": str(e)}
        print(f"no plots: {e}", flush=True)
    meta["total_seconds"] = time.time() - t0
    table = repro_claims.summary_table(rows)
    md = "\n".join([f"# Long-context reproductions ({env['device']}, {env['date']})", "",
                    f"{st['params'] / 1e6:.1f}M parameters, trained {st['steps']} steps = {st['tokens_trained']:,} tokens "
                    f"at {args.train_len} tokens (torch {env['torch']}).", "", "## Verdicts", "",
                    *[f"- {line}" for line in lines], "", "## Rows", "", table, "", "```json",
                    json.dumps(meta, default=str), "```"])
    report.write_outputs(out_dir, "repro_long_context", meta,
                         {"rows": rows, "claims": claims, "curves": curves, "plots": pngs}, md)
    print(f"results: {out_dir} (total {meta['total_seconds']:.0f}s)")
    for line in lines:
        print(line)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
