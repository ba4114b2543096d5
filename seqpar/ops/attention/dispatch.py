"""``attention_with_lse`` / ``attention``: one entry point, explicit backend choice from the registry.

Backends (all return natural-log fp32 lse ``[B, H, S]``; what each supports is declared in
:mod:`.registry`):

* ``torch``: pure-PyTorch blockwise kernel (:mod:`.reference`): any device, every mask kind, the
  reference for every faster kernel;
* ``triton``: seqpar's own Triton kernel (:mod:`.triton`), when installed;
* ``sdpa_flash`` / ``sdpa_cudnn``: PyTorch's fused CUDA kernels that return logsumexp (:mod:`.sdpa`),
  for the masks they express.

``auto`` picks the fastest backend whose record declares everything the call needs, decided from the
arguments each call (no global state, no device probing at import).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from seqpar.ops.attention.mask import LocalMask, Mask
from seqpar.ops.attention.reference import check_inputs
from seqpar.ops.attention.registry import select


def local_mask(q: Tensor, k: Tensor, *, mask: Optional[Mask] = None, causal: bool = False, q_offset: int = 0,
               k_offset: int = 0, window_left: Optional[int] = None, q_doc_ids: Optional[Tensor] = None,
               k_doc_ids: Optional[Tensor] = None) -> LocalMask:
    """The :class:`LocalMask` of one call, from a global ``mask`` (restricted to queries
    ``[q_offset, q_offset + Sq)`` and keys ``[k_offset, k_offset + Sk)``) or from the per-call keywords.
    Raises ValueError when both are given."""
    if mask is None:
        for name, ids in (("q_doc_ids", q_doc_ids), ("k_doc_ids", k_doc_ids)):
            if ids is not None and ids.dim() == 2 and ids.shape[1] > 1 and bool((ids[:, 1:] < ids[:, :-1]).any()):
                raise ValueError(f"{name} must be non-decreasing along the sequence (packed documents in order); "
                                 "renumber the documents of each row in order of appearance.")
        return LocalMask(causal=bool(causal), q_offset=int(q_offset), k_offset=int(k_offset), window_left=window_left,
                         q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a seqpar.ops.Mask; got {type(mask).__name__}.")
    given = [n for n, val in (("causal", causal), ("window_left", window_left), ("q_doc_ids", q_doc_ids),
                              ("k_doc_ids", k_doc_ids)) if val not in (None, False)]
    if given:
        raise ValueError(f"pass either mask=Mask(...) or the mask keywords {given}, not both; "
                         "put causal/window/doc_ids into the Mask.")
    if mask.doc_ids is not None and mask.doc_ids.shape[0] != q.shape[0]:
        raise ValueError(f"Mask.doc_ids has batch {mask.doc_ids.shape[0]} but q has batch {q.shape[0]}; give one row of "
                         "global document ids per sequence ([batch, seq]).")
    return mask.local(int(q_offset), q.shape[1], int(k_offset), k.shape[1], device=q.device)


def resolve_backend(backend: str, q: Tensor, k: Tensor, *, mask: Optional[Mask] = None, **mask_kwargs) -> str:
    """Turn ``backend`` (possibly ``auto``) into a concrete backend name for these inputs, or raise
    ValueError. ``mask``/``mask_kwargs`` as in :func:`attention_with_lse`."""
    return select(backend, q, k, local_mask(q, k, mask=mask, **mask_kwargs)).name


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
    mask: Optional[Mask] = None,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention that also returns the softmax statistics.

    Args: q ``[B, Sq, H, D]``; k, v ``[B, Sk, Hkv, D]`` with ``H % Hkv == 0`` (GQA, not expanded);
    either ``mask=Mask(...)`` (global semantics, see :class:`seqpar.ops.Mask`; this call covers queries
    ``[q_offset, q_offset + Sq)`` and keys ``[k_offset, k_offset + Sk)`` of it) or the keywords:
    ``causal`` masks on global positions ``q_offset + i >= k_offset + j``; ``window_left`` limits each
    query to keys at most that far to its left; ``*_doc_ids`` restrict attention to the same document;
    ``softmax_scale`` defaults to ``1/sqrt(D)``; ``backend`` one of ``BACKEND_NAMES``.
    Returns ``out [B, Sq, H, D]`` in q's dtype and ``lse [B, H, Sq]`` (natural log, float32; -inf and
    out 0 for rows that see no key). Differentiable in q, k, v.
    Raises ValueError for inconsistent shapes, both ``mask`` and mask keywords, or a backend that does
    not declare what the call needs.
    """
    m = local_mask(q, k, mask=mask, causal=causal, q_offset=q_offset, k_offset=k_offset, window_left=window_left,
                   q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)
    check_inputs(q, k, v, m)
    return select(backend, q, k, m).attention(q, k, v, m, softmax_scale=softmax_scale)


def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Like :func:`attention_with_lse` but returns only ``out [B, Sq, H, D]``."""
    return attention_with_lse(q, k, v, **kwargs)[0]
