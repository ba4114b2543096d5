"""``attention_with_lse`` / ``attention``: one entry point, explicit backend choice.

Backends (all return natural-log fp32 lse ``[B, H, S]``):

* ``torch``: pure-PyTorch blockwise kernel (:mod:`seqpar.ops.attention_torch`): any device, any mask,
  the reference for every faster kernel;
* ``triton``: seqpar's own Triton kernel (:mod:`seqpar.ops.attention_triton`), when installed;
* ``sdpa_flash`` / ``sdpa_cudnn``: PyTorch's fused CUDA kernels that return logsumexp
  (:mod:`seqpar.ops.attention_sdpa`), for the masks they support.

``auto`` picks the fastest backend that supports the inputs, decided from the arguments each call
(no global state, no device probing at import).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

from torch import Tensor

from seqpar.ops.attention_torch import attention_backward_torch, attention_forward_torch, attention_torch

BACKENDS = ("auto", "torch", "triton", "sdpa_flash", "sdpa_cudnn")

# Optional fast backends live in their own modules; each exposes `supports(q, k, **opts) -> bool`
# and `attention(q, k, v, **opts) -> (out, lse)`. Missing modules (or missing triton) just drop out.
_OPTIONAL = {"triton": "seqpar.ops.attention_triton", "sdpa_cudnn": "seqpar.ops.attention_sdpa",
             "sdpa_flash": "seqpar.ops.attention_sdpa"}


def _module(backend: str):
    try:
        return importlib.import_module(_OPTIONAL[backend])
    except ImportError:
        return None


def resolve_backend(backend: str, q: Tensor, k: Tensor, **opts) -> str:
    """Turn ``backend`` (possibly ``auto``) into a concrete backend name for these inputs, or raise."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} is not one of {list(BACKENDS)}.")
    if backend == "torch":
        return backend
    if backend != "auto":
        mod = _module(backend)
        if mod is None:
            raise ValueError(f"attention backend={backend!r} is not available in this installation; "
                             "use backend='torch' or 'auto'.")
        if not mod.supports(q, k, backend=backend, **opts):
            raise ValueError(f"attention backend={backend!r} does not support these inputs "
                             f"(device={q.device.type}, dtype={q.dtype}, options={sorted(k for k, v in opts.items() if v)}); "
                             "use backend='auto' to fall back.")
        return backend
    if q.device.type == "cuda":
        for name in ("sdpa_cudnn", "triton", "sdpa_flash"):
            mod = _module(name)
            if mod is not None and mod.supports(q, k, backend=name, **opts):
                return name
    return "torch"


def attention_with_lse(
    q: Tensor,  # [B, Sq, H, D]
    k: Tensor,  # [B, Sk, Hkv, D]
    v: Tensor,  # [B, Sk, Hkv, D]
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    k_offset: int = 0,
    window_left: Optional[int] = None,
    q_doc_ids: Optional[Tensor] = None,  # [B, Sq]
    k_doc_ids: Optional[Tensor] = None,  # [B, Sk]
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention that also returns the softmax statistics.

    Args: q ``[B, Sq, H, D]``; k, v ``[B, Sk, Hkv, D]`` with ``H % Hkv == 0`` (GQA, not expanded);
    ``causal`` masks on global positions ``q_offset + i >= k_offset + j``; ``window_left`` limits each
    query to keys at most that far to its left; ``*_doc_ids`` restrict attention to the same document;
    ``softmax_scale`` defaults to ``1/sqrt(D)``.
    Returns ``out [B, Sq, H, D]`` in q's dtype and ``lse [B, H, Sq]`` (natural log, float32; -inf and
    out 0 for rows that see no key). Differentiable in q, k, v.
    Raises ValueError for inconsistent shapes or a backend that cannot take these inputs.
    """
    opts = dict(causal=causal, softmax_scale=softmax_scale, q_offset=q_offset, k_offset=k_offset,
                window_left=window_left, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)
    name = resolve_backend(backend, q, k, **opts)
    if name == "torch":
        return attention_torch(q, k, v, **opts)
    return _module(name).attention(q, k, v, backend=name, **opts)


def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`attention_with_lse` but returns only ``out [B, Sq, H, D]``."""
    return attention_with_lse(q, k, v, **kwargs)[0]


def kernel_pair(backend: str, q: Tensor, k: Tensor, **opts) -> tuple[Callable, Callable]:
    """Functional ``(forward_fn, backward_fn)`` of a backend, for callers that drive their own loop
    (the ring). Both have exactly the signatures of ``attention_forward_torch`` /
    ``attention_backward_torch``: forward returns ``(out, lse)``, backward takes the FINAL ``out``/``lse``
    (and optional ``delta``) and returns ``dq, dk, dv`` (fp32 for torch; fused kernels may return q's dtype).

    ``backend`` is resolved as in :func:`resolve_backend` with ``q``, ``k`` and ``opts`` (the mask the
    caller will use). Raises ValueError when the backend is missing or lacks the functional API.
    """
    name = resolve_backend(backend, q, k, **opts)
    if name == "torch":
        return attention_forward_torch, attention_backward_torch
    mod = _module(name)
    fwd, bwd = getattr(mod, "forward", None), getattr(mod, "backward", None)
    if fwd is None or bwd is None:
        raise ValueError(f"attention backend={name!r} has no functional forward/backward; use backend='torch'.")
    if name.startswith("sdpa_"):  # one module serves two kernels
        return functools.partial(fwd, backend=name), functools.partial(bwd, backend=name)
    return fwd, bwd
