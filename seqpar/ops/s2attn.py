"""Shifted sparse attention (S2-Attn, LongLoRA, Chen et al. 2023) without the future-token leak.

S2-Attn splits the sequence into groups of ``G`` tokens and lets each token attend (causally) only
inside its group; half of the heads use groups shifted by ``G/2`` so information flows between
neighbouring groups. Training cost drops from ``O(S^2)`` to ``O(S * G)``; at inference the model
runs full attention.

The public implementation shifts by ``roll(-G/2)`` along the sequence: the last group then holds
the last ``G/2`` tokens followed by the FIRST ``G/2`` tokens, and the causal mask inside that
group lets the early tokens (placed after the late ones) see the end of the sequence: a leak of
future tokens into the loss of the first ``G/2`` tokens. Here the shifted heads use the groups
``[0, G/2), [G/2, 3G/2), ..., [S - G/2, S)`` instead: group ids are non-decreasing in position, no
wrap-around, so with the causal mask no token ever sees a later one (tested by perturbation).

Two implementations of the same pattern:

* :func:`s2_attention_with_lse` with explicit ``positions`` / ``doc_ids`` expresses the groups as
  document ids of :func:`seqpar.ops.attention_with_lse` (``group id = position // G``, shifted:
  ``(position + G/2) // G``), so any backend with doc-id masks (torch, triton) runs it, on any
  positions (packed documents combine with the groups). This is also the reference.
* without them, when ``G`` divides ``S``, groups are folded into the batch (``[B, S] -> [B*S/G, G]``)
  and each runs plain causal attention: ``O(S * G)`` work on every backend, no mask needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention import attention_with_lse


def s2_group_ids(positions: Tensor, group_size: int, shifted: bool) -> Tensor:
    """Group id of every token: ``positions // G``, or ``(positions + G/2) // G`` for shifted heads.

    Args: positions: integer sequence indices (any shape), NOT RoPE positions (PoSE skips those);
    group_size: ``G``, even. Returns a LongTensor of the same shape, non-decreasing along increasing
    positions (which is what rules out a leak under the causal mask).
    """
    offset = group_size // 2 if shifted else 0
    return torch.div(positions.long() + offset, group_size, rounding_mode="floor")


def _check(q: Tensor, k: Tensor, group_size: int) -> None:
    if group_size < 2 or group_size % 2 != 0:
        raise ValueError(f"S2-Attn group_size={group_size} must be an even number >= 2 (the shift is G/2).")
    if q.shape[2] % 2 != 0:
        raise ValueError(f"S2-Attn splits the heads in two halves; n_heads={q.shape[2]} must be even.")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}.")


def _head_halves(q: Tensor, k: Tensor, v: Tensor):
    """``[(q_half, k_half, v_half)] x 2``: first half of the heads unshifted, second half shifted.

    With an even number of kv heads the GQA groups split cleanly; otherwise K/V are expanded to one
    head per query head (correct for MQA / odd kv counts, at the cost of a copy).
    """
    h, hkv = q.shape[2], k.shape[2]
    if hkv % 2 != 0:
        k = k.repeat_interleave(h // hkv, dim=2)  # [B, S, H, D]: query head i uses kv head i // (H/Hkv)
        v = v.repeat_interleave(h // hkv, dim=2)
        hkv = h
    return [(q[:, :, s * h // 2:(s + 1) * h // 2], k[:, :, s * hkv // 2:(s + 1) * hkv // 2],
             v[:, :, s * hkv // 2:(s + 1) * hkv // 2]) for s in (0, 1)]


def _grouped_causal(q: Tensor, k: Tensor, v: Tensor, g: int, scale, backend: str) -> tuple[Tensor, Tensor]:
    """Causal attention inside consecutive groups of ``g`` tokens (``S % g == 0``), groups folded into
    the batch. q ``[B, S, h, D]``, k/v ``[B, S, hkv, D]`` -> out ``[B, S, h, D]``, lse ``[B, h, S]``."""
    b, s, h, d = q.shape
    fold = lambda x: x.reshape(b * (s // g), g, x.shape[2], d)  # [B, S, h, D] -> [B*S/g, g, h, D]
    out, lse = attention_with_lse(fold(q), fold(k), fold(v), causal=True, softmax_scale=scale, backend=backend)
    out = out.reshape(b, s, h, d)
    lse = lse.reshape(b, s // g, h, g).permute(0, 2, 1, 3).reshape(b, h, s)  # [B*S/g, h, g] -> [B, h, S]
    return out, lse


def _shifted_grouped_causal(q, k, v, g: int, scale, backend: str) -> tuple[Tensor, Tensor]:
    """Groups ``[0, g/2), [g/2, 3g/2), ..., [S-g/2, S)``: the interior as ``S/g - 1`` full groups, the
    two half groups at the ends folded together as a batch of two. Shapes as :func:`_grouped_causal`."""
    s, half = q.shape[1], g // 2
    ends = lambda x: torch.cat([x[:, :half], x[:, s - half:]], dim=1)  # [B, g, h, D]: head group | tail group
    e_out, e_lse = _grouped_causal(ends(q), ends(k), ends(v), half, scale, backend)
    if s == g:
        return e_out, e_lse
    m_out, m_lse = _grouped_causal(q[:, half:s - half], k[:, half:s - half], v[:, half:s - half], g, scale, backend)
    out = torch.cat([e_out[:, :half], m_out, e_out[:, half:]], dim=1)  # [B, S, h, D]
    lse = torch.cat([e_lse[..., :half], m_lse, e_lse[..., half:]], dim=-1)  # [B, h, S]
    return out, lse


def s2_attention_with_lse(
    q: Tensor,  # [B, S, H, D]
    k: Tensor,  # [B, S, Hkv, D]
    v: Tensor,  # [B, S, Hkv, D]
    *,
    group_size: int,
    softmax_scale: Optional[float] = None,
    positions: Optional[Tensor] = None,  # [S] or [B, S] sequence indices
    doc_ids: Optional[Tensor] = None,  # [B, S]
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Causal S2-Attn: heads ``[0, H/2)`` attend inside groups of ``group_size`` tokens, heads
    ``[H/2, H)`` inside groups shifted by ``group_size / 2`` (no wrap-around, so no future leak).

    Args:
        q, k, v: self-attention inputs over the same ``S`` tokens (GQA allowed).
        group_size: ``G``, even; LongLoRA uses ``S / 4`` at training length.
        positions: sequence indices of the tokens (default ``0..S-1``); give them when the tokens are
            not the contiguous sequence ``0..S-1`` (a shard, or a gap). Not RoPE/PoSE positions.
        doc_ids: packed-document ids; tokens then also stay inside their document.
        backend: as :func:`seqpar.ops.attention_with_lse`; the mask path needs doc-id support.

    Returns:
        ``out [B, S, H, D]`` (q's dtype) and ``lse [B, H, S]`` (fp32; fp64 for fp64 inputs).
    Raises:
        ValueError: odd ``group_size``, odd ``H``, or shapes the attention kernels reject.
    """
    _check(q, k, group_size)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"S2-Attn is self-attention: q has {q.shape[1]} tokens, k has {k.shape[1]}.")
    b, s = q.shape[:2]
    halves = _head_halves(q, k, v)
    if positions is None and doc_ids is None and s % group_size == 0:
        outs = [_grouped_causal(*halves[0], group_size, softmax_scale, backend),
                _shifted_grouped_causal(*halves[1], group_size, softmax_scale, backend)]
    else:
        pos = torch.arange(s, device=q.device) if positions is None else positions.to(q.device)
        pos = pos.expand(b, s)  # [B, S]
        outs = []
        for shifted, (qh, kh, vh) in zip((False, True), halves):
            ids = s2_group_ids(pos, group_size, shifted)  # [B, S]
            if doc_ids is not None:
                # One id per (document, group) pair; both are non-decreasing, so the pair order is too.
                ids = doc_ids.to(ids.device).long() * (int(ids.max()) + 1) + ids
            outs.append(attention_with_lse(qh, kh, vh, causal=True, softmax_scale=softmax_scale,
                                           q_doc_ids=ids, k_doc_ids=ids, backend=backend))
    out = torch.cat([outs[0][0], outs[1][0]], dim=2)  # [B, S, H, D]
    lse = torch.cat([outs[0][1], outs[1][1]], dim=1)  # [B, H, S]
    return out, lse


def make_s2_attn_fn(group_size: int, backend: str = "auto"):
    """The model's injected attention (``attn_fn(q, k, v, *, causal, softmax_scale) -> out``) running
    S2-Attn on a single device (the full sequence ``0..S-1`` in hand); training-time only."""
    if group_size < 2 or group_size % 2 != 0:
        raise ValueError(f"S2-Attn group_size={group_size} must be an even number >= 2 (the shift is G/2).")

    def attn_fn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: Optional[float],
                mask=None) -> Tensor:
        # A model Mask (data.doc_mask) brings the packed documents: groups then also stop at their edges.
        if mask is not None and (not mask.causal or mask.kinds - {"causal", "documents"}):
            raise ValueError(f"S2-Attn takes a causal document mask only; got mask kinds {sorted(mask.kinds)} "
                             "(leave model.window unset with lora.s2_attn=true).")
        if mask is None and not causal:
            raise ValueError("S2-Attn is defined for causal language models; got causal=False.")
        doc_ids = None if mask is None else mask.doc_ids
        return s2_attention_with_lse(q, k, v, group_size=group_size, softmax_scale=softmax_scale,
                                     doc_ids=doc_ids, backend=backend)[0]

    return attn_fn
