"""Helpers shared by the Triton forward and backward kernels: configs, pruning, mask helpers, checks.

Environment (the ONE place seqpar reads it for the Triton backend; every read is at call time):

* ``TRITON_INTERPRET=1``: run kernels in triton's CPU interpreter. Triton itself reads it when
  ``@triton.jit`` decorates a function (at import of :mod:`.fwd`/:mod:`.bwd`: that is triton's
  behaviour, not ours), so it must be set before those modules are first imported; tests run the
  interpreter in child processes with the variable set. seqpar reads it per call
  (:func:`interpreting`) to pick the interpreter's small configs, to skip timing (the autotuner
  cannot time interpreted programs), to apply :func:`interpreter_compat`, and in the registry to
  declare the backend available on CPU (fp16/fp32 only: the interpreter's bf16 dot is wrong).
* ``SEQPAR_TRITON_TMA``: default of the backward's ``tma`` argument when the caller passes None:
  ``"0"`` pointer loads only, ``"1"`` TMA loads wherever legal, unset/other: auto (both autotuned
  on sm90+). An explicit ``tma=True/False`` argument wins (see :func:`env_tma`).

Autotuning: each kernel's ``triton.autotune`` lists EVERY candidate (GPU tiles, the fp32 tile and the
interpreter tile); the ``early_config_prune`` hooks choose among them at call time from the
arguments (head_dim, dtype, size class, TMA mode, interpreter), via the same ``candidates`` functions
that the untuned path (``autotune=False``, and always under the interpreter) takes the first of.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton

from seqpar.ops.attention.mask import MASK_KINDS, LocalMask  # the kernels express every kind (.masking, .bounds)
from seqpar.ops.attention.reference import check_inputs

HEAD_DIMS = (16, 32, 64, 128, 256)
TMA_ENV = "SEQPAR_TRITON_TMA"


def interpreting() -> bool:
    """Whether triton's CPU interpreter is on (``TRITON_INTERPRET=1``), read now."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def env_tma(tma: Optional[bool]) -> Optional[bool]:
    """The caller's ``tma`` if given, else ``SEQPAR_TRITON_TMA`` read now ("0" False, "1" True, else None: auto)."""
    if tma is not None:
        return tma
    env = os.environ.get(TMA_ENV, "").strip()
    return {"0": False, "1": True}.get(env)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


FP32_CONFIG = _cfg(32, 32, 4, 2)  # fp32 tiles are twice the bytes: keep them small (fp32 is for tests)


def _all(table, *extra):
    """Every distinct config of a {head_dim: [configs]} table, then FP32_CONFIG and ``extra``."""
    seen = []
    for cfgs in [*table.values(), [FP32_CONFIG, *extra]]:
        seen += [c for c in cfgs if all(str(c) != str(s) for s in seen)]
    return seen


# Problems under this many FLOPs (4 B H Sq Sk D) run the first listed config untuned: timing them says
# little, and tests would otherwise compile every candidate of every mask variant. The size class is
# part of the autotune key, so a small call never pins the config of a large one.
TUNE_MIN_FLOPS = 1e11


def tune_size(b, h, sq, sk, d) -> int:
    return int(4.0 * b * h * sq * sk * d >= TUNE_MIN_FLOPS)


def candidates(table, interpret_config) -> Callable[[dict], list]:
    """``f(args) -> configs`` this call may use, best first: the interpreter's one tile, the fp32 tile,
    or the tiles listed for this head_dim (only the first for small problems)."""

    def pick(args):
        if interpreting():
            return [interpret_config]
        if args["Q"].dtype == torch.float32:
            return [FP32_CONFIG]
        return table[args["HEAD_DIM"]] if args["tune_size"] else table[args["HEAD_DIM"]][:1]

    return pick


def prune_by(pick: Callable[[dict], list]):
    """early_config_prune hook keeping the configs ``pick`` lists for this call (in listed order)."""

    def prune(configs, named_args, **kwargs):
        wanted = {str(c) for c in pick({**named_args, **kwargs})}
        return [c for c in configs if str(c) in wanted]

    return prune


def run_kernel(kernel, grid, pick: Callable[[dict], list], autotune: bool, args: tuple, kwargs: dict) -> None:
    """Launch an autotuned ``kernel``: through its autotuner (GPU, ``autotune=True``), or the first
    candidate straight on the jit function (``autotune=False``; always in the interpreter, where
    timing says nothing and would run every program several times in Python)."""
    if autotune and not interpreting():
        kernel[grid](*args, **kwargs)
        return
    named = dict(zip(kernel.arg_names, args))
    cfg = pick({**named, **kwargs})[0]
    kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())


def interpreter_compat() -> None:
    """Make triton 3.6's CPU interpreter run loops with run-time bounds under NumPy >= 2.4, and give it the
    tensor-descriptor reduce (TMA bulk add) it lacks.

    Works around: the interpreter holds every scalar as a 1-element array and turns it into a loop
    bound with ``int(array)``, which NumPy 2.4 refuses (an expired deprecation), so any
    ``tl.range(lo, hi)`` with computed bounds raises. Re-point that conversion at the element.
    Called by the launchers when :func:`interpreting` (never at import); idempotent; a no-op where
    the interpreter is absent.
    """
    from triton.runtime import interpreter
    if getattr(interpreter, "_seqpar_index_compat", False) or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._seqpar_index_compat = True
    builder = interpreter.InterpreterBuilder
    if not hasattr(builder, "create_descriptor_reduce"):  # TMA reduce (dQ's atomic add): absent in 3.6's interpreter
        builder.create_descriptor_reduce = _descriptor_reduce


def _descriptor_reduce(self, kind, desc, value, indices):
    """The interpreter's missing tensor-descriptor reduce, for ``add`` (what the kernels use): an atomic add over
    the block's in-bounds elements, as the TMA unit does (out-of-bounds rows are dropped)."""
    from triton._C.libtriton import ir
    if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
        raise NotImplementedError(f"descriptor reduce {kind} in the interpreter (only add is emulated)")
    ptrs, mask = desc.materialize_pointers(indices)
    op = ir.ATOMIC_OP.FADD if "float" in str(value.data.dtype) else ir.ATOMIC_OP.ADD
    return self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels index the head dim with unit stride (wide loads); other strides are passed through.
    return t if t.stride(-1) == 1 else t.contiguous()


def check_triton_inputs(q, k, v, mask: LocalMask) -> None:
    """Raise a one-sentence ValueError for anything the kernels cannot take."""
    check_inputs(q, k, v, mask)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton attention needs q, k, v of one dtype among float16/bfloat16/float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"triton attention supports head_dim in {HEAD_DIMS}; got {q.shape[-1]} "
                         "(use backend='torch' for others).")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")
    extra = mask.kinds - MASK_KINDS
    if extra:
        raise ValueError(f"triton attention supports no {sorted(extra)} masks; use backend='torch'.")


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for tests: exact fp32 dots, not TF32. Ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"
