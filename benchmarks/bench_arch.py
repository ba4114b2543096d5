"""The architecture options side by side on one GPU: training, perplexity vs length, one layer vs length.

    python benchmarks/bench_arch.py                                   # one H200: about --budget-s (420 s)
    python benchmarks/bench_arch.py --options dense,performer --budget-s 120 --dim 256 --layers 4

Every ``model.attention`` / ``model.arch`` option (issue 16) is built with the same shape through
``seqpar.models.build_model`` and

1. one layer (``n_layers=1``) is timed forward + backward at batch 1 against sequence length (``--layer-min`` ..
   ``--layer-max`` doubling; :mod:`arch_layer`) until it runs out of memory or passes ``--point-limit-s``, with
   its peak memory; one more point at the training shape ``[batch, seq_len]`` calibrates the training runs;
2. each causal option trains with the real trainer (``python train.py``, one process, a fresh run directory
   under ``--workdir``, only its own ``metrics.jsonl`` records read back, as bench_train.py) for the same number
   of tokens, at the same number of TRAINED parameters (an option more than 1% off dense's gets its MLP widened
   or narrowed: Reformer's unused key projection is not counted, MEGALODON's extra weights are); ``--tokens 0``
   (default) sizes the runs from the calibration so the whole benchmark takes about ``--budget-s``; a run still
   going at its time cap (twice its estimate + 30 s, shrunk so training ends within ``--hard-limit-s``, 1.25 x
   budget) is stopped and saved by ``train.max_minutes``, and the table says so (and how many tokens it saw);
3. the final checkpoint is evaluated: validation loss at the training length, perplexity at 1x, 2x, 4x it (the
   same targets at every length, :mod:`seqpar.eval.perplexity`).

Options that cannot train as a causal LM (Linformer) or do not exist in this build (MEGALODON before it lands)
get a row with the configuration's own one-sentence reason. Output: a fresh directory under ``--out`` with
``arch.json`` (every record), ``arch.md`` (tables, one sentence per option where it underperforms dense, computed
from the numbers), ``loss_ppl.png``, ``layer_time.png``, ``layer_memory.png`` and one training log per option;
the markdown is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arch_layer  # noqa: E402
import arch_report  # noqa: E402
import report  # noqa: E402
from bench_train import fresh_run_dir, own_records  # noqa: E402

OPTIONS = "dense,longformer,bigbird,blocksparse,reformer,performer,linformer,infini,megalodon"
STEP_OVERHEAD = 1.3  # a training step vs n_layers x one layer at the training shape (head, optimizer, logging)


def option_overrides(name: str, seq_len: int) -> list:
    """Overrides selecting option ``name`` with its paper's defaults (the config's), scaled down only where a
    default would not fit a short ``seq_len`` (CPU runs); at 2k they are the defaults, except Infini-attention's
    segment (a quarter of the context, so the memory is used: at the default 2048 one segment is the whole row)."""
    from seqpar.models.options import ARCHS

    ov = [f"model.arch={name}"] if name in ARCHS or name == "megalodon" else [f"model.attention={name}"]
    if name == "longformer":
        ov.append(f"model.window={seq_len // 4}")  # the paper's largest window (512) at 2k
    elif name == "bigbird":
        ov.append(f"model.sparse_block={min(64, seq_len // 8)}")
    elif name == "blocksparse":
        stride = min(128, seq_len // 4)
        ov += [f"model.sparse_stride={stride}", f"model.sparse_summary={min(32, stride // 4)}"]
    elif name == "reformer":
        chunk = min(64, seq_len // 8)  # Sec. 2: chunks of m = 2 l / n_buckets
        ov += [f"model.reformer_chunk={chunk}", f"model.reformer_buckets={min(64, 2 * seq_len // chunk)}"]
    elif name == "performer":
        ov.append(f"model.performer_chunk={min(64, seq_len // 4)}")
    elif name == "infini":
        ov.append(f"model.infini_segment={seq_len // 4}")
    return ov


def base_overrides(args, device: str) -> list:
    """What every option shares: shape, data, optimiser, one process without FSDP (Reformer's reversible
    layers need parallel.fsdp=none; one GPU shards nothing anyway), no document mask (the non-mask options
    have none, so dense attends across documents too)."""
    ov = ["model.name=bench_arch", f"model.dim={args.dim}", f"model.n_layers={args.layers}",
          f"model.n_heads={args.heads}", f"model.n_kv_heads={args.heads}", f"train.seq_len={args.seq_len}",
          f"train.batch_size={args.batch}", f"train.device={device}", "train.eval_every=0", "data.doc_mask=false",
          "parallel.cp=1", "parallel.fsdp=none", f"parallel.attention_backend={args.backend}", f"optim.lr={args.lr}",
          "checkpoint.resume=false", "logging.progress=false"]
    return ov + ([f"data.max_bytes={args.max_bytes}"] if args.max_bytes else [])


def trained_params(model_cfg, seq_len: int) -> tuple:
    """``(all, trained)`` parameters of the option's model; trained leaves out parameters that get no gradient,
    found by one backward of a one-layer copy on the CPU at ``seq_len`` (per-layer ones counted n_layers times)."""
    import torch

    from seqpar.models.build import build_model

    total = _meta_params(model_cfg)
    torch.manual_seed(0)
    one = build_model(dataclasses.replace(model_cfg, n_layers=1))
    tokens = torch.randint(0, model_cfg.vocab_size, (1, seq_len))
    loss, n = one.loss(one(tokens, torch.arange(seq_len)[None]), tokens)
    (loss / n).backward()
    unused = sum(p.numel() * (model_cfg.n_layers if k.startswith("layers.") else 1)
                 for k, p in one.named_parameters() if p.grad is None)
    return total, total - unused


def plan_option(name: str, base: list, args, target=None) -> dict:
    """Config, overrides and parameter counts of one option, or ``{"reason": ...}`` when it cannot train.

    With ``target`` (dense's trained parameters) an option more than 1% off gets ``model.ffn_hidden`` moved by
    whole ``multiple_of`` steps towards it (the slope measured by one more meta-device build, so any block whose
    size follows ``ffn_dim`` is matched, whatever its layout)."""
    from seqpar.cli import load_config
    from seqpar.train.resolve import resolve_config

    ov = base + option_overrides(name, args.seq_len)
    try:
        cfg = resolve_config(load_config(ov))
        total, trained = trained_params(cfg.model, args.seq_len)
        m = cfg.model
        plan = {"option": name, "overrides": ov, "cfg": cfg, "params_total": total, "params_trained": trained,
                "ffn_hidden": m.ffn_dim}
        if target and abs(target - trained) > 0.01 * target:
            slope = (_meta_params(dataclasses.replace(m, ffn_hidden=m.ffn_dim + m.multiple_of)) - total) / m.multiple_of
            delta = round((target - trained) / slope / m.multiple_of) * m.multiple_of if slope > 0 else 0
            delta = max(delta, m.multiple_of - m.ffn_dim)
            if delta:
                ov = ov + [f"model.ffn_hidden={m.ffn_dim + delta}"]
                cfg = resolve_config(load_config(ov))
                new_total = _meta_params(cfg.model)
                plan.update(overrides=ov, cfg=cfg, params_total=new_total,
                            params_trained=trained + new_total - total, ffn_hidden=m.ffn_dim + delta)
        return plan
    except Exception as e:  # ConfigError (Linformer causal, an option not in this build) or a build failure
        return {"option": name, "reason": str(e).strip().splitlines()[0]}


def _meta_params(model_cfg) -> int:
    import torch

    from seqpar.models.build import build_model

    with torch.device("meta"):
        return build_model(model_cfg).num_params()


def train_option(plan: dict, steps: int, cap_s: float, args, out_dir: str) -> dict:
    """One training run (``python train.py``) in a fresh run directory; its own step records only."""
    name = plan["option"]
    run_dir = fresh_run_dir(args.workdir, name)
    log_every = max(1, min(10, steps // 20))
    ov = plan["overrides"] + [f"train.steps={steps}", f"checkpoint.every={steps}", f"logging.run_dir={run_dir}",
                              f"logging.log_every={log_every}", f"optim.warmup_steps={max(1, steps // 10)}"]
    if cap_s > 0:
        ov.append(f"train.max_minutes={cap_s / 60:.4f}")
    log_path = os.path.join(out_dir, f"{name}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run([sys.executable, "train.py", *ov], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=(cap_s or args.budget_s) + args.timeout_grace_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = open(log_path, errors="replace").read()
    run = {"option": name, "overrides": plan["overrides"], "run_dir": run_dir, "returncode": rc,
           "wall_s": round(time.time() - t0, 1), "steps_target": steps, "log": os.path.basename(log_path),
           "tokens_per_step": args.seq_len * args.batch, "cap_s": round(cap_s, 1),
           **{k: plan.get(k) for k in ("params_total", "params_trained", "ffn_hidden")}}
    try:
        run["records"] = [{k: r[k] for k in ("time", "step", "loss", "tokens_per_s", "peak_mem_gib")}
                          for r in own_records(os.path.join(run_dir, "metrics.jsonl"), t0, steps)]
    except ValueError as e:
        run.update(records=[], error=str(e))
    done = [int(d[5:]) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if re.fullmatch(r"step-\d+", d)] \
        if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
    last = max(done or [r["step"] for r in run["records"]] or [0])  # a time cap may stop between two logged steps
    run["steps_done"] = last
    if rc == 0 and last == steps:
        run["status"] = "ok"
    elif rc == 3 and last:
        run["status"] = f"time cap at step {last}/{steps}"
    elif re.search(r"out of memory|OutOfMemoryError", text, re.I):
        run["status"] = "OOM"
    else:
        run["status"] = f"failed (exit {rc})"
        run["error"] = run.get("error") or " | ".join(text.strip().splitlines()[-3:])[-400:]
    return run


def evaluate(run_dir: str, args, device, lengths: list) -> dict:
    """Validation loss of the run's final checkpoint at the training length (non-overlapping windows) and
    perplexity at each of ``lengths`` (sliding windows, the same ``--eval-targets`` targets at every length)."""
    import torch

    from seqpar.eval.common import eval_text_stream, load_model
    from seqpar.eval.perplexity import sliding_window_nll

    loaded = load_model(run_dir, device=str(device))
    model, bos, S = loaded.model, loaded.tokenizer.bos_id, args.seq_len
    stride = S // 2
    ids = eval_text_stream(loaded, None, max(lengths) + args.eval_targets + 1)
    out = {"stride": stride, "text_tokens": int(len(ids)), "ppl": []}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        n_val = max(1, min(len(ids) - 1, max(args.eval_targets, S)) // S) * S
        total, count = sliding_window_nll(model, ids[:n_val + 1], S, S, 1, args.eval_batch, device, bos)
        out.update(val_loss=total / count, val_tokens=count)
        first = max(lengths) - stride + 1
        for n in lengths:
            batch = max(1, args.eval_batch * S // n)  # the same tokens per batch at every length
            total, count = sliding_window_nll(model, ids, n, stride, first, batch, device, bos)
            out["ppl"].append({"length": n, "nll": total / count, "ppl": math.exp(min(total / count, 50.0)),
                               "tokens": count})
    del model, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def size_runs(plans: list, points: list, args, seconds_left: float) -> tuple:
    """``(steps, {option: time cap in s})``: the same tokens for every option, as many as the calibration points
    (one layer at ``[batch, seq_len]``) say fit into ``seconds_left`` after ``--overhead-s`` per option."""
    tps = args.seq_len * args.batch
    est = {p["option"]: args.layers * p["time_ms"] / 1e3 * STEP_OVERHEAD
           for p in points if p.get("kind") == "calibration" and "time_ms" in p}
    worst = max(est.values(), default=1.0)
    per_step = {p["option"]: est.get(p["option"], 2 * worst) for p in plans}  # no calibration: assume slow
    if args.tokens:
        steps = max(1, args.tokens // tps)
    else:
        train_s = max(0.0, seconds_left - args.overhead_s * len(plans))
        steps = max(args.min_steps, int(train_s / max(sum(per_step.values()), 1e-9)))
    caps = {o: args.cap_s or (2.0 * s * steps + args.cap_slack_s if not args.tokens else 0.0)
            for o, s in per_step.items()}
    return steps, caps


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="a fresh directory is made under it")
    a("--workdir", default="/tmp/seqpar_bench_arch", help="training run directories, one new per run")
    a("--options", default=OPTIONS, help="model.attention / model.arch names, comma-separated")
    a("--budget-s", type=float, default=420.0, help="wall-clock target of the whole benchmark")
    a("--layer-share", type=float, default=0.2, help="part of the budget for the layer sweep")
    a("--overhead-s", type=float, default=15.0, help="per option: start-up, checkpoint and evaluation")
    a("--tokens", type=int, default=0, help="training tokens per option (0: from the budget)")
    a("--min-steps", type=int, default=20)
    a("--cap-s", type=float, default=0.0, help="training time cap per option (0: twice its estimate + slack)")
    a("--cap-slack-s", type=float, default=30.0, help="added to the estimate-based cap (start-up, first steps)")
    a("--hard-limit-s", type=float, default=0.0, help="caps shrink so training ends by then (0: 1.25 x budget)")
    a("--timeout-grace-s", type=float, default=120.0, help="beyond the cap before a run is killed")
    a("--dim", type=int, default=512)
    a("--layers", type=int, default=8)
    a("--heads", type=int, default=8)
    a("--seq-len", type=int, default=2048)
    a("--batch", type=int, default=8)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    a("--max-bytes", type=int, default=0, help="data.max_bytes (0: the whole corpus)")
    a("--eval-targets", type=int, default=16384, help="scored tokens per evaluation length")
    a("--eval-batch", type=int, default=8, help="windows per batch at the training length")
    a("--layer-min", type=int, default=2048)
    a("--layer-max", type=int, default=262144)
    a("--point-limit-s", type=float, default=2.0, help="stop an option's sweep after a slower point")
    a("--backend", default="auto", help="parallel.attention_backend for the softmax options")
    a("--device", default="auto", help="auto | cuda | cpu")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    t_start = time.time()
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    info = report.environment() if dev == "cuda" else {**report.environment(), "device": "cpu", "gpus": 0}
    os.makedirs(args.out, exist_ok=True)
    out_dir = fresh_run_dir(args.out, report.stem("arch", info, 1 if dev == "cuda" else 0))
    eval_lengths = [args.seq_len, 2 * args.seq_len, 4 * args.seq_len]
    layer_lengths = arch_layer.doubling(args.layer_min, args.layer_max)
    base = base_overrides(args, dev)

    plans, not_trained, target = [], {}, None
    for name in args.options.split(","):
        plan = plan_option(name, base, args, target)
        if "reason" in plan:
            not_trained[name] = plan["reason"]
            print(f"{name}: not trained: {plan['reason']}", flush=True)
            continue
        target = target or plan["params_trained"]  # the first option's (dense by default) is the target
        plans.append(plan)

    autocast = torch.bfloat16 if dev == "cuda" else None
    # Each option's sweep gets an equal share of --layer-share (more when earlier ones left time), compiling not
    # counted; the whole sweep never passes 2 x --layer-share of the budget.
    points, share = [], args.layer_share * args.budget_s / max(1, len(plans))
    sweep_end, sweep_hard = t_start + args.layer_share * args.budget_s, t_start + 2 * args.layer_share * args.budget_s
    for i, p in enumerate(plans):
        deadline = time.time() + max(share, (sweep_end - time.time()) / (len(plans) - i))
        points += arch_layer.sweep_option(p["option"], p["cfg"].model, layer_lengths, device,
                                          autocast_dtype=autocast, backend=args.backend,
                                          point_limit_s=args.point_limit_s, deadline=deadline,
                                          hard_deadline=sweep_hard, calibrate=(args.batch, args.seq_len))

    steps, caps = size_runs(plans, points, args, args.budget_s - (time.time() - t_start))
    print(f"training {len(plans)} options for {steps} steps ({steps * args.seq_len * args.batch:,} tokens) each",
          flush=True)
    settings = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "seq_len": args.seq_len,
                "batch_size": args.batch, "steps": steps, "tokens": steps * args.seq_len * args.batch, "lr": args.lr,
                "backend": args.backend, "warmup": args.warmup, "eval_targets": args.eval_targets,
                "stride": args.seq_len // 2, "eval_lengths": eval_lengths, "layer_lengths": layer_lengths,
                "point_limit_s": args.point_limit_s, "params_target": target or 0, "not_trained": not_trained,
                "budget_s": args.budget_s, "caps_s": caps, "argv": sys.argv[1:] if argv is None else list(argv)}
    runs, hard_end = [], t_start + (args.hard_limit_s or 1.25 * args.budget_s)
    for i, p in enumerate(plans):
        cap = caps[p["option"]]
        if cap:  # never past the hard limit: what is left, shared by the runs still to go
            cap = min(cap, max(10.0, (hard_end - time.time()) / (len(plans) - i) - args.overhead_s))
        run = train_option(p, steps, cap, args, out_dir)
        if run["records"] and os.path.isdir(os.path.join(run["run_dir"], "checkpoints")):
            try:
                run["eval"] = evaluate(run["run_dir"], args, device, eval_lengths)
            except Exception as e:  # the row shows the training numbers and says why evaluation failed
                run["eval_error"] = f"{type(e).__name__}: {e}"[:400]
        print(f"{p['option']}: {run['status']} in {run['wall_s']} s"
              + (f", val loss {run['eval']['val_loss']:.4f}" if "eval" in run else ""), flush=True)
        runs.append(run)
        write(out_dir, info, settings, runs, points, eval_lengths, t_start)
    settings["wall_s"] = round(time.time() - t_start, 1)
    md = write(out_dir, info, settings, runs, points, eval_lengths, t_start, final=True)
    print(md, end="", flush=True)
    return 0 if all(r["status"] == "ok" and "eval" in r for r in runs) else 1


def write(out_dir, info, settings, runs, points, lengths, t_start, final=False) -> str:
    """``arch.json`` and ``arch.md`` (rewritten after every run: a cut benchmark keeps what it measured); with
    ``final`` also the plots. Returns the markdown."""
    rows = [arch_report.train_row(r, settings["warmup"]) for r in runs]
    rows += [{"option": o, "status": "not trained"} for o in settings["not_trained"]]
    sentences = arch_report.verdicts(rows, points, lengths)
    md = arch_report.markdown(info, settings, rows, points, sentences)
    if final:
        pngs = arch_report.plots(out_dir, runs, rows, points, lengths)
        md += "\n" + "\n".join(f"![{n[:-4]}]({n})" for n in pngs) + "\n"
    meta = {**info, "wall_s": round(time.time() - t_start, 1)}
    report.write_outputs(out_dir, "arch", meta, {"settings": settings, "runs": runs, "rows": rows,
                                                 "layer": points, "verdicts": sentences}, md)
    return md


if __name__ == "__main__":
    sys.exit(main())
