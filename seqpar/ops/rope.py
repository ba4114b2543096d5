"""Rotary position embedding (RoPE) and its context-extension scalings.

Convention: Llama / Hugging Face "rotate_half" (non-interleaved). Feature ``i`` of a head pairs with
feature ``i + D/2`` and the pair is rotated by angle ``position * inv_freq[i]``, so checkpoints
imported from Hugging Face need no permutation of their q/k projection weights.

Positions are always passed in as GLOBAL token positions: under ring attention a rank holds a
non-contiguous set of sequence positions (zigzag / striped layouts), and packed documents may reset
positions, so nothing here assumes ``0..S-1``.

Scalings follow Hugging Face ``rope_scaling`` dicts (``transformers.modeling_rope_utils``). Each type
is one function in :data:`_SCALINGS` with the signature
``fn(head_dim, theta, scaling, seq_len) -> (inv_freq, attention_scale)``; ``linear``, ``dynamic``,
``yarn`` and ``llama3`` reproduce transformers' ``ROPE_INIT_FUNCTIONS`` bit for bit (tested), ``ntk``
(static NTK-aware, which transformers lacks) is checked against its closed form and dynamic NTK.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from seqpar.errors import ConfigError


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


def _number(scaling: dict, key: str, rope_type: str, minimum: float, why: str) -> float:
    """``scaling[key]`` as a float ``>= minimum``, or ConfigError naming ``model.rope_scaling.<key>``."""
    raw = _require(scaling, key, rope_type)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"model.rope_scaling.{key}={raw!r} must be a number.") from None
    if not value >= minimum:  # `not >=` also rejects NaN
        raise ConfigError(f"model.rope_scaling.{key}={raw!r} must be >= {minimum:g} ({why}).")
    return value


def _factor(scaling: dict, rope_type: str) -> float:
    # A factor below 1 would compress the trained context instead of extending it; HF rejects it too.
    return _number(scaling, "factor", rope_type, 1.0, "it is the context extension ratio new_len / trained_len")


def _original_len(scaling: dict, rope_type: str) -> float:
    return _number(scaling, "original_max_position_embeddings", rope_type, 1.0,
                   "the context length the model was pretrained at")


def _rope_linear(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # Position interpolation (Chen et al. 2023): positions / factor, i.e. every frequency / factor.
    # In-place divide on the fresh tensor, exactly as HF's _compute_linear_scaling_rope_parameters.
    inv_freq = _default_inv_freq(head_dim, theta)
    inv_freq /= _factor(scaling, "linear")
    return inv_freq, 1.0


def _rope_ntk(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # NTK-aware scaling (bloc97, 2023): raise the base so the LOWEST frequency is interpolated by
    # `factor` while the highest stays put: base' = base * factor^(D/(D-2)). Not in transformers; it
    # equals HF's dynamic NTK at the length where (factor*L/L0 - factor + 1) = factor (tested).
    factor = _factor(scaling, "ntk")
    return _default_inv_freq(head_dim, theta * factor ** (head_dim / (head_dim - 2))), 1.0


def _rope_dynamic(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # Dynamic NTK (emozilla, 2023): the NTK base change grows with the CURRENT length, so sequences
    # within the trained length see the original frequencies. Same math as transformers'
    # _compute_dynamic_ntk_parameters, stateless: HF caches the largest length seen; we take the one given.
    factor = _factor(scaling, "dynamic")
    original = _original_len(scaling, "dynamic")
    seq_len = original if seq_len is None else max(seq_len, original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _default_inv_freq(head_dim, base), 1.0


def _rope_yarn(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # YaRN (Peng et al. 2023): per frequency, a linear ramp between interpolation (low frequencies,
    # wavelength > trained context) and extrapolation (high frequencies), plus an attention temperature
    # (mscale) folded into cos/sin. Same op order as transformers' _compute_yarn_parameters so the
    # tables are bit-identical.
    factor = _factor(scaling, "yarn")
    original = _original_len(scaling, "yarn")
    dim = head_dim

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The feature index whose wavelength fits `num_rotations` times in the trained context.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)  # [D/2]
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)  # [D/2]
    extrapolation_factor = 1 - ramp  # 1: keep (high frequency), 0: interpolate (low frequency)
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
                + inv_freq_extrapolation * extrapolation_factor)
    return inv_freq, attention_factor


def _rope_llama3(head_dim: int, theta: float, scaling: dict, seq_len: Optional[int]):
    # Llama 3.1: keep high frequencies (short wavelengths carry local order), divide low frequencies by
    # `factor` (long wavelengths must stretch to the new context), blend linearly in between.
    # Same math as transformers' _compute_llama3_parameters.
    factor = _factor(scaling, "llama3")
    low_freq_factor = float(_require(scaling, "low_freq_factor", "llama3"))
    high_freq_factor = float(_require(scaling, "high_freq_factor", "llama3"))
    old_context_len = _original_len(scaling, "llama3")
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
    "ntk": _rope_ntk,
    "dynamic": _rope_dynamic,
    "yarn": _rope_yarn,
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
        seq_len: current GLOBAL sequence length (max position + 1), used only by ``dynamic``; None means
            the original length (no change). Under ring attention pass the global length, not a shard's.

    Returns:
        ``(inv_freq, attention_scale)``: ``inv_freq`` is ``[D/2]`` float32 on CPU; ``attention_scale``
        multiplies cos/sin (HF's ``attention_factor``: YaRN's mscale, 1.0 for the other types).

    Keys per ``rope_type`` (as in HF): ``linear``/``ntk``: factor; ``dynamic``: factor,
    original_max_position_embeddings; ``yarn``: factor, original_max_position_embeddings, optional
    beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate; ``llama3``: factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings. Other keys are ignored.

    Raises:
        ConfigError (a ValueError): unknown ``rope_type``, a missing key, ``factor < 1`` or a
        non-numeric value, naming the field ``model.rope_scaling.<key>``.
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


def validate_scaling(scaling: Optional[dict], head_dim: int, theta: float) -> None:
    """Check a ``model.rope_scaling`` value at config time (``seqpar.config.ModelConfig``), so a bad
    scaling fails before any model is built. None means plain RoPE.

    Raises:
        ConfigError: not a dict with a ``rope_type`` (or legacy ``type``) key, an unknown type, a missing
        key, ``factor < 1`` or a non-numeric value, naming ``model.rope_scaling.<key>``.
    """
    if scaling is None:
        return
    if not (isinstance(scaling, dict) and ("rope_type" in scaling or "type" in scaling)):
        raise ConfigError("model.rope_scaling must be a dict with a 'rope_type' key "
                          "(e.g. {rope_type: yarn, factor: 4}), or null for plain RoPE.")
    compute_inv_freq(head_dim, theta, dict(scaling))  # the tables are tiny; building them runs every check


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
