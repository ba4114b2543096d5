"""Cached generation and long-context attention policies (StreamingLLM, H2O, LM-Infinite, Dual Chunk Attention).

``generate(model, input_ids, max_new_tokens, *, policy="full", **policy_options) -> [B, S + new]``;
``policy_forward(model, input_ids, *, policy=...) -> hidden`` and ``token_nll`` for perplexity under a policy;
``seqpar.inference.distributed.generate_distributed`` with the cache spread over a process group.
"""
from seqpar.inference.cache import KVCache, LayerCache
from seqpar.inference.generate import generate, policy_forward
from seqpar.inference.registry import POLICIES, POLICY_NAMES, make_policy
from seqpar.inference.sampling import sample, top_p_filter
from seqpar.inference.scoring import token_nll

__all__ = ["KVCache", "LayerCache", "POLICIES", "POLICY_NAMES", "generate", "make_policy", "policy_forward",
           "sample", "token_nll", "top_p_filter"]
