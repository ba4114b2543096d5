"""Model definitions. The attention function is injected, so models know nothing about parallelism."""
from seqpar.models.llama import Attention, FeedForward, Llama, RMSNorm, TransformerBlock, default_attention

__all__ = ["Attention", "FeedForward", "Llama", "RMSNorm", "TransformerBlock", "default_attention"]
