"""Model definitions. The attention function is injected, so models know nothing about parallelism.

The names below resolve on first use (PEP 562) rather than at import: ``seqpar.config`` imports
``AC_MODES`` from :mod:`seqpar.models.checkpointing`, and importing that submodule runs this file
first; an eager ``from seqpar.models.llama import ...`` here would import the model, and through it
``seqpar.config`` again, half-initialised.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seqpar.models.build import build_model
    from seqpar.models.llama import Attention, FeedForward, Llama, RMSNorm, TransformerBlock, default_attention

__all__ = ["Attention", "FeedForward", "Llama", "RMSNorm", "TransformerBlock", "build_model", "default_attention"]


def __getattr__(name: str):
    if name == "build_model":  # every architecture option (model.attention, model.arch) behind one call
        from seqpar.models.build import build_model

        return build_model
    if name in __all__:
        from seqpar.models import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'seqpar.models' has no attribute {name!r}")
