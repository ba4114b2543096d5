"""Attention backends as declared records, looked up in one registry (as PyTorch's SDPA dispatcher checks
each backend's constraints before choosing).

Every backend is registered ONCE as a frozen :class:`Backend` saying what it supports: devices, dtypes,
head dims, mask kinds, whether a gradient through lse is supported (its backward takes the global
``delta``), whether it has in-kernel ring accumulators, any kernel constraint (the fused SDPA kernels
express causality only as the aligned diagonal), and whether it is available now (triton installed;
on CPU only under ``TRITON_INTERPRET=1``, read at call time). :func:`select` checks a call against the
records and returns one, or raises ONE ValueError naming what is missing and which backends would do.
Dispatch, the ring and the config read names and abilities from here: nothing is found by string
import, signature inspection or name prefix.

Import cost: this module imports only torch and :mod:`.mask`; each record loads its functions lazily
(triton is imported the first time a triton record's functions or availability are asked for).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from seqpar.ops.attention.mask import MASK_KINDS, LocalMask

# The public backend names, in the order the config and docs list them ("auto" first).
BACKEND_NAMES = ("auto", "torch", "triton", "sdpa_flash", "sdpa_cudnn")
# Best first, per device type, for backend="auto"; a device not listed gets the reference.
AUTO_ORDER = {"cuda": ("sdpa_cudnn", "triton", "sdpa_flash", "torch")}
_KIND_WORDS = {"causal": "causal masks", "window": "sliding-window masks",
               "two_sided_window": "two-sided (non-causal) window masks", "documents": "document masks",
               "sinks": "attention-sink masks", "block_sparse": "block-sparse masks",
               "strided": "strided positions (q_stride/k_stride != 1, striped shards)"}
_HALF = (torch.float16, torch.bfloat16)


def _always(q: Tensor) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """What one attention backend supports, and its functions (loaded on first use).

    Functions (see :mod:`.reference` for the contract; all take a :class:`LocalMask`):
    ``forward(q, k, v, mask, *, softmax_scale) -> (out, lse)``; ``backward(dout, q, k, v, out, lse, mask, *,
    softmax_scale[, delta]) -> (dq, dk, dv)`` (``delta`` only when ``lse_grad``); ``attention(q, k, v, mask,
    *, softmax_scale) -> (out, lse)`` differentiable. With ``ring_accumulators`` the forward also takes
    ``out_acc/lse_acc`` and the backward ``dq_acc/dk_acc/dv_acc`` (fp32 buffers added into in-kernel).
    """

    name: str
    load: Callable[[], tuple]  # () -> (forward, backward, attention); imports the backend module lazily
    devices: tuple  # device types ("cpu", "cuda"); availability may narrow them further
    dtypes: tuple  # torch dtypes of q, k, v
    mask_kinds: frozenset  # subset of mask.MASK_KINDS
    head_dims: Optional[tuple] = None  # exact head dims, or None for any (then max/multiple below)
    max_head_dim: Optional[int] = None
    head_dim_multiple: int = 1
    aligned_causal_only: bool = False  # causal only as the aligned diagonal (Sq == Sk, equal offsets) or fully visible
    lse_grad: bool = False  # a gradient through lse is supported: the backward takes the global delta
    ring_accumulators: bool = False  # in-kernel fp32 (out, lse) merge and gradient accumulation
    available: Callable[[Tensor], Optional[str]] = _always  # q -> None, or why the backend cannot run now

    @property
    def forward(self) -> Callable:
        return self.load()[0]

    @property
    def backward(self) -> Callable:
        return self.load()[1]

    @property
    def attention(self) -> Callable:
        return self.load()[2]

    @property
    def takes_delta(self) -> bool:
        """The backward accepts ``delta=`` (how an lse gradient is folded in)."""
        return self.lse_grad

    def missing(self, q: Tensor, k: Tensor, mask: LocalMask, need_lse_grad: bool = False) -> Optional[str]:
        """None when this backend can compute the call exactly, else what it lacks (a phrase). Mask kinds come
        first: they are what the user chose, so the error names them whatever the device."""
        extra = sorted(mask.kinds - self.mask_kinds)
        if extra:
            return "does not support " + " or ".join(_KIND_WORDS[k] for k in extra)
        if q.device.type not in self.devices:
            return f"does not run on {q.device.type} tensors (only {', '.join(self.devices)})"
        if q.dtype not in self.dtypes:
            return f"does not support {str(q.dtype).replace('torch.', '')} (only " \
                   f"{', '.join(str(t).replace('torch.', '') for t in self.dtypes)})"
        d = q.shape[-1]
        if self.head_dims is not None and d not in self.head_dims:
            return f"does not support head_dim {d} (only {self.head_dims})"
        if self.max_head_dim is not None and (d > self.max_head_dim or d % self.head_dim_multiple):
            return f"does not support head_dim {d} (needs <= {self.max_head_dim} and a multiple of " \
                   f"{self.head_dim_multiple})"
        if self.aligned_causal_only and mask.causal:
            from seqpar.ops.attention.sdpa import mask_kind
            if mask_kind(q.shape[1], k.shape[1], True, mask.q_offset, mask.k_offset) is None:
                return (f"expresses causal masks only on the aligned diagonal (Sq == Sk, q_offset == k_offset) or "
                        f"fully visible blocks; got Sq={q.shape[1]}, Sk={k.shape[1]}, q_offset={mask.q_offset}, "
                        f"k_offset={mask.k_offset}")
        if need_lse_grad and not self.lse_grad:
            return "does not support a gradient through lse (its kernel recomputes delta itself)"
        return self.available(q)


# ---------------------------------------------------------------------------------------------------
# The records. Loaders import lazily and are cached (one import per process).
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _load_reference():
    from seqpar.ops.attention.reference import attention, backward, forward
    return forward, backward, attention


@functools.lru_cache(maxsize=None)
def _load_triton():
    from seqpar.ops.attention.triton.function import attention, backward, forward
    return forward, backward, attention


@functools.lru_cache(maxsize=None)
def _load_flash():
    from seqpar.ops.attention.sdpa import flash_attention, flash_backward, flash_forward
    return flash_forward, flash_backward, flash_attention


@functools.lru_cache(maxsize=None)
def _load_cudnn():
    from seqpar.ops.attention.sdpa import cudnn_attention, cudnn_backward, cudnn_forward
    return cudnn_forward, cudnn_backward, cudnn_attention


def _triton_available(q: Tensor) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "is not available: triton is not installed"
    from seqpar.ops.attention.triton.common import interpreting  # the one place that reads the environment
    if q.is_cuda:
        return None
    if q.device.type == "cpu" and interpreting():
        if q.dtype == torch.bfloat16:
            return "does not support bfloat16 under TRITON_INTERPRET=1 (the interpreter's bf16 dot is wrong)"
        return None
    return "needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"


RECORDS = {
    "torch": Backend("torch", _load_reference, devices=("cpu", "cuda"),
                     dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), mask_kinds=MASK_KINDS,
                     lse_grad=True),
    "triton": Backend("triton", _load_triton, devices=("cuda", "cpu"), dtypes=(*_HALF, torch.float32),
                      mask_kinds=MASK_KINDS, head_dims=(16, 32, 64, 128, 256),
                      lse_grad=True, ring_accumulators=True, available=_triton_available),
    "sdpa_flash": Backend("sdpa_flash", _load_flash, devices=("cuda",), dtypes=_HALF, mask_kinds=frozenset({"causal"}),
                          max_head_dim=256, head_dim_multiple=8, aligned_causal_only=True),
    "sdpa_cudnn": Backend("sdpa_cudnn", _load_cudnn, devices=("cuda",), dtypes=_HALF, mask_kinds=frozenset({"causal"}),
                          max_head_dim=128, head_dim_multiple=8, aligned_causal_only=True),
}


def backward_delta(records, dout: Tensor, out: Tensor, dlse: Optional[Tensor]) -> Optional[Tensor]:
    """The ``delta [B, H, Sq]`` to pass to the backward of ``records`` (those of one differentiable call):
    ``rowsum(dout * out) - dlse`` in fp32 (fp64 for fp64) when any of them takes it, else None (the fused
    kernels recompute it from ``dout``/``out``). An lse gradient folds into delta because
    ``d lse_i / d s_ij = p_ij``; a record that recomputes delta itself cannot take one: NotImplementedError
    naming it."""
    records = list(records)
    fused = [r.name for r in records if not r.takes_delta]
    if fused and dlse is not None:
        raise NotImplementedError(f"backend={fused[0]} recomputes delta inside the fused kernel, so a gradient "
                                  "through lse is not supported; use backend='torch' or 'triton'.")
    if not any(r.takes_delta for r in records):
        return None
    acc = torch.promote_types(out.dtype, torch.float32)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()  # [B, Sq, H, D] -> [B, H, Sq]
    return delta if dlse is None else delta - dlse.to(acc)


def select(backend: str, q: Tensor, k: Tensor, mask: LocalMask, need_lse_grad: bool = False) -> Backend:
    """The record that computes attention of ``q [B, Sq, H, D]`` against ``k [B, Sk, Hkv, D]`` under ``mask``.

    ``backend="auto"`` picks the first record of :data:`AUTO_ORDER` for q's device that declares
    everything the call needs (the reference elsewhere). Raises ValueError naming the backend, what it
    lacks and the backends that would do.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"attention backend={backend!r} is not one of {list(BACKEND_NAMES)}.")
    if backend == "auto":
        for name in AUTO_ORDER.get(q.device.type, ("torch",)):
            if RECORDS[name].missing(q, k, mask, need_lse_grad) is None:
                return RECORDS[name]
        backend = "torch"  # raise the reference's reason below (e.g. a mask kind nothing declares)
    record = RECORDS[backend]
    why = record.missing(q, k, mask, need_lse_grad)
    if why is None:
        return record
    others = [n for n in BACKEND_NAMES[1:] if n != backend and RECORDS[n].missing(q, k, mask, need_lse_grad) is None]
    use = " or ".join(f"'{n}'" for n in [*others, "auto"])
    raise ValueError(f"backend={backend!r} {why}; use backend={use}.")
