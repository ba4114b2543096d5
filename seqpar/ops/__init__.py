"""Single-device math. Nothing here imports torch.distributed."""
from seqpar.ops.attention import BACKEND_NAMES, Mask, attention, attention_with_lse, resolve_backend
from seqpar.ops.merge import merge_attention, merge_lse

BACKENDS = BACKEND_NAMES  # the name this package exported before the registry

__all__ = ["BACKENDS", "BACKEND_NAMES", "Mask", "attention", "attention_with_lse", "resolve_backend",
           "merge_attention", "merge_lse"]
