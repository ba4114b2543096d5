"""Checks that need the machine (an installed package, the attention backend on this device), run before
the data and the model are built, so a user mistake costs one ``error:`` line and no minutes of set-up.

The pure config checks live in ``seqpar.config``; ``train.device=cuda`` without a GPU is refused where the
device is picked (``seqpar.parallel.mesh.pick_device``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from seqpar.config import Config
from seqpar.errors import ConfigError


def check_wandb(cfg: Config) -> None:
    """``logging.wandb=true`` needs the wandb package (checked without importing it: that takes seconds)."""
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true but the wandb package is not installed; pip install wandb "
                          "(or pip install 'seqpar[wandb]'), or set logging.wandb=false.")


def check_attention_backend(cfg: Config, device: torch.device, dtype: torch.dtype) -> None:
    """``parallel.attention_backend`` can run this model's attention on ``device`` in ``dtype``: asked of the
    backend registry with a two-token causal call of the model's head_dim (what every step's call needs)."""
    from seqpar.ops.attention import Mask, select

    q = torch.empty(1, 2, 1, cfg.model.head_dim, device=device, dtype=dtype)  # [B, S, H, D], never read
    try:
        select(cfg.parallel.attention_backend, q, q, Mask(causal=True).local(0, 2, 0, 2))
    except ValueError as e:
        raise ConfigError(f"parallel.attention_backend={cfg.parallel.attention_backend} cannot run here: {e}") from None


def set_determinism(enabled: bool) -> None:
    """``train.deterministic``: torch's deterministic algorithms (the Triton kernel then computes dQ without
    atomics, embedding backward without atomics), cuDNN's deterministic convolutions, and cuBLAS' fixed
    workspace (read when its handle is created: before the first matmul, which is why this runs here)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def preflight(cfg: Config, device: torch.device, dtype: torch.dtype) -> None:
    """Every machine-dependent user-error check, before anything is built (and ``train.deterministic``'s
    process settings, which must precede the first kernel). Raises ConfigError."""
    check_wandb(cfg)
    check_attention_backend(cfg, device, dtype)
    set_determinism(cfg.train.deterministic)
