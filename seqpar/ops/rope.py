"""Rotary position embedding (RoPE) and its context-extension scalings.

Convention: Llama / Hugging Face "rotate_half" (non-interleaved). Feature ``i`` of a head pairs with
feature ``i + D/2`` and the pair is rotated by angle ``position * inv_freq[i]``, so checkpoints
imported from Hugging Face need no permutation of their q/k projection weights.

Positions are always passed in as GLOBAL token positions: under ring attention a rank holds a
non-contiguous set of sequence positions (zigzag / striped layouts), and packed documents may reset
positions, so nothing here assumes ``0..S-1``.

Scalings follow Hugging Face ``rope_scaling`` dicts (``transformers.modeling_rope_utils``). Each type
is one function in :data:`_SCALINGS` with the signature
``fn(head_dim, theta, scaling, seq_len) -> (inv_freq, attention_scale)``, so ntk / dynamic / yarn
slot in as more entries.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from seqpar.config import ConfigError


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2i/D)`` for ``i < D/2``, float32, exactly as HF's default rope parameters."""
    # device="cpu" explicitly: a model built under `with torch.device("meta")` still needs real tables.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponent)  # [D/2] float32


def _require(scaling: dict, key: str, rope_type: str):
    if key not in scaling:
        raise ConfigError(
            f"model.rope_scaling.{key} is required for rope_type={rope_type!r}; add it to model.rope_scaling."
        )
    return scaling[key]


def _rope_default(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    return _default_inv_freq(head_dim, theta), 1.0


def _rope_linear(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # Position interpolation (Chen et al. 2023): positions / factor, i.e. every frequency / factor.
    factor = float(_require(scaling, "factor", "linear"))
    return _default_inv_freq(head_dim, theta) / factor, 1.0


def _rope_llama3(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # Llama 3.1: keep high frequencies (short wavelengths carry local order), divide low frequencies by
    # `factor` (long wavelengths must stretch to the new context), blend linearly in between.
    # Same math as transformers' _compute_llama3_parameters.
    factor = float(_require(scaling, "factor", "llama3"))
    low_freq_factor = float(_require(scaling, "low_freq_factor", "llama3"))
    high_freq_factor = float(_require(scaling, "high_freq_factor", "llama3"))
    old_context_len = float(_require(scaling, "original_max_position_embeddings", "llama3"))
    if low_freq_factor == high_freq_factor:
        raise ConfigError(
            "model.rope_scaling.low_freq_factor must differ from model.rope_scaling.high_freq_factor "
            "(the smoothing band between them would be empty); Llama 3.1 uses 1 and 4."
        )
    inv_freq = _default_inv_freq(head_dim, theta)  # [D/2]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


# rope_type -> fn(head_dim, theta, scaling, seq_len) -> (inv_freq [D/2] float32, attention_scale)
_SCALINGS: dict[str, Callable] = {
    "default": _rope_default,
    "linear": _rope_linear,
    "llama3": _rope_llama3,
}


def compute_inv_freq(
    head_dim: int, theta: float, scaling: Optional[dict] = None, seq_len: Optional[int] = None
) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies, optionally rescaled for context extension.

    Args:
        head_dim: per-head feature size D (even).
        theta: RoPE base (``model.rope_theta``).
        scaling: Hugging Face style ``rope_scaling`` dict (``rope_type`` or legacy ``type`` key), or None.
        seq_len: current sequence length, for scalings that depend on it (dynamic NTK); unused so far.

    Returns:
        ``(inv_freq, attention_scale)``: ``inv_freq`` is ``[D/2]`` float32 on CPU; ``attention_scale``
        multiplies cos/sin (HF's ``attention_factor``, e.g. YaRN's mscale), 1.0 for the types here.

    Raises:
        ConfigError (a ValueError): unknown ``rope_type`` or a missing key, naming the field.
    """
    if head_dim % 2 != 0:
        raise ConfigError(f"RoPE head_dim={head_dim} must be even; change model.dim or model.n_heads.")
    if scaling is None:
        return _rope_default(head_dim, theta, {}, seq_len)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    fn = _SCALINGS.get(rope_type)
    if fn is None:
        raise ConfigError(
            f"model.rope_scaling.rope_type={rope_type!r} is not supported; use one of {sorted(_SCALINGS)}."
        )
    inv_freq, attention_scale = fn(head_dim, theta, scaling, seq_len)
    return inv_freq.float(), float(attention_scale)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for arbitrary (global, possibly non-contiguous) positions.

    Args:
        positions: ``[B, S]`` integer token positions.
        inv_freq: ``[D/2]`` from :func:`compute_inv_freq`.
        attention_scale: multiplies both tables (HF applies YaRN's mscale this way, so q.k scales by its square).

    Returns:
        ``(cos, sin)``, each ``[B, S, D/2]`` float32 on ``positions.device``.
    """
    # float32 angles as HF does (exact integer positions up to 2^24); bf16 here would wreck long contexts.
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    angles = positions.float()[..., None] * inv_freq  # [B, S, 1] * [D/2] -> [B, S, D/2]
    cos, sin = angles.cos(), angles.sin()
    if attention_scale != 1.0:
        cos, sin = cos * attention_scale, sin * attention_scale
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the RoPE angles (rotate_half convention).

    Args:
        x: ``[B, S, H, D]`` queries or keys, any float dtype.
        cos, sin: ``[B, S, D/2]`` from :func:`rope_cos_sin`.

    Returns:
        ``[B, S, H, D]`` in ``x.dtype``; computed in at least float32 (float64 stays float64 for references).
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute_dtype)
    x1, x2 = xf.chunk(2, dim=-1)  # [B, S, H, D/2] each: feature i pairs with feature i + D/2
    c = cos.to(compute_dtype).unsqueeze(2)  # [B, S, 1, D/2]: broadcast over heads
    s = sin.to(compute_dtype).unsqueeze(2)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1), written per half.
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # [B, S, H, D]
    return out.to(x.dtype)
