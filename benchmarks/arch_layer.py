"""One layer of each architecture option, forward + backward, against sequence length (bench_arch.py, part 2).

"One layer" is the option built with ``n_layers=1`` through :func:`seqpar.models.build_model`: embedding, one
block, final norm and the LM head with its chunked loss. With the byte tokenizer's 320-symbol head the embedding
and head are a few hundred thousand FLOPs per token, so the time is the block's; going through the model (not a
bare block) times every option the same way, whatever its block looks like (reversible stacks, MEGALODON).

Per point: one untimed call (Triton compiles and autotunes here, BigBird draws its layout), then the median of
``reps`` timed calls (host clock around a synchronised fwd+bwd) and the peak of ``torch.cuda.max_memory_allocated``
over them. An option stops at its first point that runs out of memory, fails, or takes longer than
``point_limit_s``: the next doubling would take two to four times as long.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import statistics
import time
from typing import Callable, Optional


def layer_model(model_cfg, device, backend: str = "auto"):
    """The option of ``model_cfg`` with one layer, fp32 weights on ``device`` (bf16 compute comes from autocast,
    as in the trainer). ``backend`` is the softmax attention's (``seqpar.ops.attention``; auto on CUDA: cuDNN /
    Triton, whichever declares the mask)."""
    import torch

    from seqpar.models.build import build_model
    from seqpar.ops import attention

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfg, n_layers=1)
    return build_model(cfg, attn_fn=functools.partial(attention, backend=backend)).to(device)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fwd_bwd(model, batch: int, seq_len: int, device, autocast_dtype) -> Callable[[], None]:
    """A closure running one forward + backward of ``model`` on random tokens ``[batch, seq_len]``."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seq_len)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [B, S] each
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss_sum, n = model.loss(model(inputs, positions), labels)
        (loss_sum / n).backward()

    return step


def time_point(model, batch: int, seq_len: int, device, autocast_dtype, reps: int = 3) -> dict:
    """``{time_ms, first_ms, peak_gib}`` of one fwd+bwd at ``[batch, seq_len]`` (see the module docstring).
    ``peak_gib`` is None on CPU. Exceptions (OOM included) propagate."""
    import torch

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = fwd_bwd(model, batch, seq_len, device, autocast_dtype)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps if first < 1.0 else 1):  # a slow point once: its median would cost the sweep's budget
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    model.zero_grad(set_to_none=True)
    return {"time_ms": 1e3 * statistics.median(times), "first_ms": 1e3 * first, "peak_gib": peak}


def sweep_option(name: str, model_cfg, lengths: list, device, *, autocast_dtype, backend: str,
                 point_limit_s: float, deadline: float, hard_deadline: Optional[float] = None,
                 calibrate: Optional[tuple] = None, log: Callable[[str], None] = print) -> list:
    """Points ``{option, batch, seq_len, status, time_ms, first_ms, peak_gib, error}`` of one option.

    ``lengths`` ascending, batch 1. ``calibrate=(batch, seq_len)`` adds one point at the training shape first
    (``kind="calibration"``), from which bench_arch.py sizes the training runs. Status: ok | OOM | over limit
    (measured, but above ``point_limit_s``: longer lengths skipped) | error | budget (not measured: the sweep's
    deadline would pass) | skipped (after a stop). Time spent compiling and autotuning (a first call's excess over
    the timed ones) does not count against ``deadline``, only against ``hard_deadline``: a fresh machine compiles
    each Triton mask variant once, and that must not cost the option its long lengths."""
    rows: list = []
    try:
        model = layer_model(model_cfg, device, backend)
    except Exception as e:  # an option that does not build: one row says why
        return [{"option": name, "batch": 1, "seq_len": lengths[0], "status": "error", "error": _short(e)}]
    points = ([("calibration", *calibrate)] if calibrate else []) + [("layer", 1, s) for s in lengths]
    stopped, last_s, prev_s, compile_s = None, 0.0, 0.0, 0.0
    for kind, batch, seq in points:
        row = {"option": name, "kind": kind, "batch": batch, "seq_len": seq}
        # The next point: the last one times the growth seen over the last doubling (2x..4x), for 1 untimed +
        # 3 timed calls (1 + 1 when a call takes a second or more, as time_point does).
        t_next = last_s * min(4.0, max(2.0, last_s / prev_s if prev_s > 0 else 4.0))
        nxt = time.time() + t_next * (2 if t_next >= 1.0 else 4)
        if stopped is None and kind == "layer" and (nxt - compile_s > deadline or nxt > (hard_deadline or nxt)):
            stopped = "budget"
        if stopped is not None:
            rows.append({**row, "status": "budget" if stopped == "budget" else "skipped"})
            continue
        try:
            row.update(time_point(model, batch, seq, device, autocast_dtype), status="ok")
        except Exception as e:
            row.update(status="OOM" if _is_oom(e) else "error", error=_short(e))
        if row["status"] != "ok":  # outside the except: its traceback no longer holds the point's tensors
            model.zero_grad(set_to_none=True)
            _free(device)
        if row["status"] == "ok":
            compile_s += max(0.0, row["first_ms"] - row["time_ms"]) / 1e3
        if kind == "layer":
            if row["status"] == "ok":
                prev_s, last_s = last_s, row["time_ms"] / 1e3
                if last_s > point_limit_s:
                    row["status"] = "over limit"
            if row["status"] != "ok":
                stopped = row["status"]
        rows.append(row)
        log(f"layer {name:<12} {kind:<11} B={batch} S={seq:>7}: {row['status']:<10} "
            + (f"{row['time_ms']:9.2f} ms" if "time_ms" in row else row.get("error", "")))
    del model
    _free(device)
    return rows


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200]


def doubling(lo: int, hi: int) -> list:
    """``lo, 2 lo, 4 lo, ...`` up to ``hi``."""
    out = []
    while lo <= hi:
        out.append(lo)
        lo *= 2
    return out
