"""Single-device math. Nothing here imports torch.distributed."""
from seqpar.ops.attention import BACKENDS, attention, attention_with_lse, resolve_backend
from seqpar.ops.merge import merge_attention, merge_lse

__all__ = ["BACKENDS", "attention", "attention_with_lse", "resolve_backend", "merge_attention", "merge_lse"]
