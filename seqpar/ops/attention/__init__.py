"""Attention: a ``Mask`` value, backends declared in one registry, one dispatching entry point.

Module map: :mod:`.mask` (``Mask``, ``LocalMask``), :mod:`.registry` (backend records, ``select``,
``BACKEND_NAMES``), :mod:`.dispatch` (``attention_with_lse``, ``attention``, ``resolve_backend``),
:mod:`.reference` (pure-PyTorch blockwise kernel, the spec), :mod:`.sdpa` (PyTorch's fused flash and
cuDNN kernels), :mod:`.triton` (seqpar's Triton kernels; imported only when used).
"""
from seqpar.ops.attention.dispatch import attention, attention_with_lse, resolve_backend
from seqpar.ops.attention.mask import LocalMask, Mask
from seqpar.ops.attention.registry import BACKEND_NAMES, select

__all__ = ["BACKEND_NAMES", "LocalMask", "Mask", "attention", "attention_with_lse", "resolve_backend", "select"]
