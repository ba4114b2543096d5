"""Throughput arithmetic and metric sinks (console, JSONL, optional wandb, progress bar).

FLOPs per token follow the PaLM / Megatron convention, counted for forward + backward (x3 forward):

    6 * N_matmul                        (every weight matrix: 2 FLOPs per multiply-add, x3 for fwd+bwd)
  + 6 * n_layers * dim * seq_len        (attention scores and weighted sum, causal: half of 12*L*d*S)

With a structured mask (packed documents under ``data.doc_mask``, ``model.window``/``sinks``) the
attention term is ``12 * n_layers * dim * K``, K = the mean number of keys a query sees in the step's
batches (:func:`mean_visible_keys`): the work a tile-skipping kernel does, not the dense causal count.

``N_matmul`` counts the attention, MLP and output-projection weights (not the input embedding, a
gather). MFU = achieved FLOP/s per device / the device's dense bf16 peak. Activation recomputation
is not counted (MFU, not HFU).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """Per-device bf16 peak used for MFU; 0 when unknown (CPU), which disables MFU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, val in _PEAK_TFLOPS.items():
        if key in name:
            return val
    return 0.0


def mean_visible_keys(doc_ids: Optional[torch.Tensor], seq_len: int, *, causal: bool = True,
                      window: Optional[int] = None, sinks: int = 0) -> Optional[float]:
    """Mean keys per query of a ``[B, S]`` batch under documents / window / sinks (exact, O(S) on the
    host), or None when the mask is plain causal/full (the dense count applies)."""
    if doc_ids is None and window is None:
        return None
    from seqpar.ops.attention.mask import Mask
    from seqpar.parallel.ring_plan import visible_keys_per_query

    mask = Mask(causal=causal, window=window, sinks=sinks, doc_ids=doc_ids)
    batch = doc_ids.shape[0] if doc_ids is not None else 1
    return float(visible_keys_per_query(mask, batch, seq_len).double().mean())


def read_records(path: str) -> list[tuple[str, dict]]:
    """``(line, record)`` of every complete record of a ``metrics.jsonl`` in file order; a line cut by a kill
    (or still being written) is skipped, a missing file gives ``[]``. The one reader of the format
    :class:`MetricsLogger` writes (resume truncation, the benchmarks' read-back)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append((line, rec))
    return out


class FlopCounter:
    """FLOPs per token of the steps since the last log line: the model's dense count, or, for a dense
    Llama under a structured mask, the count from the batches' mean visible keys per query."""

    def __init__(self, model, model_cfg, data_cfg, seq_len: int):
        self.model, self.m, self.doc_mask, self.seq_len = model, model_cfg, data_cfg.doc_mask, seq_len
        self.dense = model.flops_per_token(seq_len)
        self.exact = model_cfg.arch == "llama" and model_cfg.attention == "dense"  # others: their own count
        self._sum, self._n = 0.0, 0

    def add_batch(self, batch: dict) -> None:
        if not self.exact:
            return
        keys = mean_visible_keys(batch.get("doc_ids") if self.doc_mask else None, batch["tokens"].shape[1],
                                 causal=self.m.causal, window=self.m.window, sinks=self.m.sinks)
        if keys is not None:
            self._sum, self._n = self._sum + keys, self._n + 1

    def take(self) -> float:
        """Per-token FLOPs of the batches added since the last call (the dense count if none had a mask)."""
        if not self._n:
            return self.dense
        out = self.model.flops_per_token(self.seq_len, keys_per_query=self._sum / self._n)
        self._sum, self._n = 0.0, 0
        return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory on this device since start (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    except ImportError:  # pragma: no cover - non-POSIX
        return 0.0


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank-0 sink: one console line per log step, every record to ``<run_dir>/metrics.jsonl``,
    and wandb when enabled (imported lazily; offline without WANDB_API_KEY so it never waits on a network)."""

    def __init__(self, run_dir: str, *, enabled: bool, use_wandb: bool, project: str, config: dict,
                 progress: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress and enabled and sys.stderr.isatty()
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if use_wandb:
            if not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            try:
                import wandb
            except ImportError:
                from seqpar.errors import ConfigError

                raise ConfigError("logging.wandb=true but the wandb package is not installed; pip install wandb "
                                  "(or pip install 'seqpar[wandb]'), or set logging.wandb=false.") from None
            self._wandb = wandb.init(project=project, config=config, dir=run_dir,
                                     settings=wandb.Settings(init_timeout=30))

    def log(self, record: dict, line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))
        if line is not None:
            if self.progress:
                sys.stderr.write("\r\033[K")
            print(line, flush=True)

    def tick(self, step: int, loss: float) -> None:
        """Redraw the one-line progress bar (only when attached to a terminal)."""
        if not self.progress:
            return
        width = 30
        done = int(width * step / max(1, self.total_steps))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total_steps} loss {loss:.4f}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.progress:
            sys.stderr.write("\n")
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
