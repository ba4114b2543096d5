"""Where a training step's time goes: ``logging.profile_at=N`` profiles steps ``N .. N + logging.profile_steps - 1``
with ``torch.profiler`` and writes, per rank, a breakdown by part of the model into ``<run_dir>/profile/``
(``rank<r>.json``; rank 0 also ``breakdown.md``) and, with ``logging.profile_trace=true``, the Chrome trace.

Attribution (:func:`breakdown`), for every profiled op's own time (its kernels' time on CUDA, its self CPU
time on CPU), in this order:

1. by kernel or op name: communication (NCCL / gloo / c10d) wherever it runs; then everything inside attention
   is ``attention`` (step 2's range); elsewhere GEMMs are ``matmul`` (cuBLAS / CUTLASS / ``aten::mm``-family);
2. by the innermost labelled range around the op: ``attention`` (the attention autograd Functions, whose
   backward names them; a range around the model's attention call covers the forward, Triton launches
   included), ``norm`` / ``rope`` / ``mlp`` / ``loss`` (ranges this module pushes around ``RMSNorm``, RoPE,
   ``FeedForward`` and the model's loss while profiling: nothing is added to the model otherwise), ``compiled``
   (``train.compile``'s fused norm/RoPE/MLP regions, which carry no ranges of ours), ``optimizer`` (torch's
   ``Optimizer.step`` / ``zero_grad`` ranges, grad clipping), FSDP's own copy-in/out ranges (``fsdp copies``);
3. a backward op of a generic autograd node (``MulBackward0``...) takes the category of the forward op it
   differentiates (matched by the profiler's sequence number), so the backward of a norm counts as ``norm``;
4. memory copies and fills (``memcpy``), and everything else (``other``).

Overlapping streams (the ring's and FSDP's communication under compute) make the categories sum to more than
the step: the report gives each category per step next to the step's wall time, and the device's busy time.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from typing import Optional

import torch

CATEGORIES = ("attention", "matmul", "communication", "norm", "rope", "mlp", "compiled", "loss", "optimizer",
              "fsdp copies", "memcpy", "other")
_COMM = re.compile(r"nccl|gloo|c10d::|all_gather|allgather|reduce_scatter|all_reduce|allreduce|broadcast|"
                   r"isend|irecv|batch_isend|alltoall|all_to_all", re.I)
_GEMM = re.compile(r"gemm|cutlass|cublas|xmma|nvjet|^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm)$", re.I)
_ATTN = re.compile(r"AttentionFn|_KernelFn|flash|fmha|cudnn.*(sdpa|attn|mha)|scaled_dot_product|_attn_|"
                   r"flex_attention|_merge_rows|_add_rows", re.I)
_COPY = re.compile(r"memcpy|memset|^aten::(copy_|fill_|zero_|_to_copy|to)$|Memcpy|Memset", re.I)
_RANGE = {"seqpar.attention": "attention", "seqpar.norm": "norm", "seqpar.rope": "rope", "seqpar.mlp": "mlp",
          "seqpar.loss": "loss"}
_OPTIM = re.compile(r"^Optimizer\.(step|zero_grad)|clip_grad|_foreach_norm|fused_adam", re.I)


def _own_category(name: str) -> Optional[str]:
    """The category a range or op's own name implies (step 2 of the attribution), or None."""
    if name in _RANGE:
        return _RANGE[name]
    if _ATTN.search(name):
        return "attention"
    if _OPTIM.search(name):
        return "optimizer"
    if name.startswith("FSDP::"):
        return "fsdp copies"
    if name.startswith("CompiledFunction"):  # train.compile's fused regions (forward and backward)
        return "compiled"
    return None


def _range_category(ev) -> Optional[str]:
    e = ev
    while e is not None:
        cat = _own_category(e.name)
        if cat is not None:
            return cat
        e = e.cpu_parent
    return None


def _backward_node(ev):
    """The ``autograd::engine::evaluate_function`` event an op runs under, or None (a forward op)."""
    e = ev
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return e
        e = e.cpu_parent
    return None


def _on_cuda(events) -> bool:
    """The profile timed CUDA kernels (else: a CPU run, timed by its ops)."""
    return any(k.duration > 0 for e in events for k in getattr(e, "kernels", []))


def categorize(events):
    """Yield ``(event, name, microseconds, category)`` for every kernel (CUDA) or every op's own CPU time (a CPU
    run) of a finished profiler's ``events()``, attributed as the module docstring says."""
    events = list(events)
    cuda = _on_cuda(events)
    forward_cat = {}  # (thread, sequence_nr) of a forward op -> its range category
    for e in events:
        if e.sequence_nr >= 0 and _backward_node(e) is None:
            forward_cat.setdefault((e.thread, e.sequence_nr), _range_category(e))
    for e in events:
        if cuda:
            spans = [(k.name, k.duration) for k in e.kernels]
        else:
            spans = [(e.name, e.self_cpu_time_total)] if e.self_cpu_time_total > 0 else []
        if not spans:
            continue
        cat = _range_category(e)
        if cat is None:
            node = _backward_node(e)
            if node is not None and node.sequence_nr >= 0:
                cat = forward_cat.get((getattr(node, "fwd_thread", node.thread), node.sequence_nr))
        for name, us in spans:
            if _COMM.search(name) or _COMM.search(e.name):
                c = "communication"
            elif cat == "attention":
                c = cat
            elif _GEMM.search(name) or _GEMM.search(e.name):
                c = "matmul"
            elif cat is not None:
                c = cat
            elif _COPY.search(name) or _COPY.search(e.name):
                c = "memcpy"
            else:
                c = "other"
            yield e, name, us, c


def breakdown(events, *, steps: int, wall_s: float) -> dict:
    """``{category: ms per step}`` plus ``step_ms`` (wall), ``busy_ms`` (the device's own time per step, or the
    CPU's on a CPU run), ``device`` ("cuda" | "cpu"), from a finished profiler's ``events()``."""
    events, total = list(events), defaultdict(float)
    for _, _, us, c in categorize(events):
        total[c] += us
    cuda = _on_cuda(events)
    n = max(1, steps)
    out = {c: round(total.get(c, 0.0) / 1e3 / n, 3) for c in CATEGORIES}
    busy = sum(total.values()) / 1e3 / n
    return {"device": "cuda" if cuda else "cpu", "steps": steps, "step_ms": round(1e3 * wall_s / n, 3),
            "busy_ms": round(busy, 3), "ms_per_step": out}


def markdown(rows: dict) -> str:
    """``rows``: ``{label: breakdown}`` -> one table, a column per label (ms per step and % of busy time)."""
    labels = list(rows)
    head = "| part | " + " | ".join(f"{k} ms/step | {k} %" for k in labels) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(labels))]
    for c in CATEGORIES:
        cells = []
        for k in labels:
            ms, busy = rows[k]["ms_per_step"][c], rows[k]["busy_ms"]
            cells += [f"{ms:.1f}", f"{100 * ms / busy:.1f}" if busy else "-"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **busy (sum)** | " + " | ".join(f"{rows[k]['busy_ms']:.1f} | 100" for k in labels) + " |")
    lines.append("| **step wall time** | " + " | ".join(f"{rows[k]['step_ms']:.1f} | -" for k in labels) + " |")
    return "\n".join(lines) + "\n"


class _Labels:
    """Profiler ranges around norms, RoPE, MLPs and the loss while profiling (module hooks and instance
    attributes, removed afterwards): the model's code carries no profiling."""

    def __init__(self, model):
        from seqpar.models.llama import Attention, FeedForward, RMSNorm

        self.handles, self.patched = [], []
        for m in model.modules():
            label = ("seqpar.norm" if isinstance(m, RMSNorm) else "seqpar.mlp" if isinstance(m, FeedForward) else None)
            # A compiled module (train.compile) runs its hooks inside the compiled call: new hooks would
            # recompile it; its kernels count as "compiled" (the CompiledFunction ranges) instead.
            if label is not None and getattr(m, "_compiled_call_impl", None) is None:
                self.handles.append(m.register_forward_pre_hook(self._enter(label)))
                self.handles.append(m.register_forward_hook(self._exit))
            if isinstance(m, Attention):
                self._wrap(m, "rope_fn", "seqpar.rope")
                # Kernels launched from Python (Triton) inside the attention Function's forward have no aten
                # op around them: this range is what they are attributed to.
                self._wrap(m, "attn_fn", "seqpar.attention")
        if callable(getattr(model, "loss", None)):
            self._wrap(model, "loss", "seqpar.loss")

    @staticmethod
    def _enter(label):
        def hook(module, args):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            module.__dict__.setdefault("_profile_ranges", []).append(rf)
        return hook

    @staticmethod
    def _exit(module, args, output):
        stack = module.__dict__.get("_profile_ranges")
        if stack:
            stack.pop().__exit__(None, None, None)

    def _wrap(self, obj, attr: str, label: str):
        inner, had = getattr(obj, attr), attr in obj.__dict__

        def labelled(*args, **kwargs):
            with torch.profiler.record_function(label):
                return inner(*args, **kwargs)
        setattr(obj, attr, labelled)
        self.patched.append((obj, attr, inner, had))

    def remove(self):
        for h in self.handles:
            h.remove()
        for obj, attr, inner, had in self.patched:
            if had:
                setattr(obj, attr, inner)
            else:
                delattr(obj, attr)


class StepProfiler:
    """Profiles steps ``[start, start + steps)`` of a run (``start=0``: off). Call :meth:`before` with the step
    about to run and :meth:`after` with the step just finished; the files are written after the last one."""

    def __init__(self, model, *, start: int, steps: int, run_dir: str, rank: int, device: torch.device,
                 trace: bool = False, last_step: Optional[int] = None):
        end = start + steps - 1
        self.model, self.start, self.end = model, start, end if last_step is None else min(end, last_step)
        self.dir, self.rank, self.device, self.trace = os.path.join(run_dir, "profile"), rank, device, trace
        self.prof, self.labels, self.t0, self.result = None, None, 0.0, None

    def before(self, step: int) -> None:
        if self.start <= 0 or step != self.start:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self.labels = _Labels(self.model)
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.start()
        self.t0 = time.perf_counter()

    def after(self, step: int, *, stopping: bool = False) -> Optional[dict]:
        """After the last profiled step (or ``stopping``: the run ends early, after ``step``, while profiling):
        stop, write the files for the steps profiled, return this rank's breakdown."""
        if self.prof is None or (step != self.end and not stopping):
            return None
        self.end = step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        self.labels.remove()
        self.result = breakdown(self.prof.events(), steps=self.end - self.start + 1, wall_s=wall)
        self.result.update(first_step=self.start, last_step=self.end, rank=self.rank)
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, f"rank{self.rank}.json"), "w") as f:
            json.dump(self.result, f, indent=1)
        if self.trace:
            self.prof.export_chrome_trace(os.path.join(self.dir, f"rank{self.rank}.trace.json"))
        if self.rank == 0:
            with open(os.path.join(self.dir, "breakdown.md"), "w") as f:
                f.write(f"# Steps {self.start}-{self.end}, rank 0 ({self.result['device']})\n\n"
                        + markdown({"rank 0": self.result}))
        self.prof = None
        return self.result
