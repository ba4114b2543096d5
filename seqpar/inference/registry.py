"""Policy names -> classes, and the one place that validates a policy's name and options."""
from __future__ import annotations

from torch import Tensor

from seqpar.inference.dca import DCAPolicy
from seqpar.inference.h2o import H2OPolicy
from seqpar.inference.lm_infinite import LMInfinitePolicy
from seqpar.inference.policy import CachePolicy
from seqpar.inference.streaming import StreamingPolicy

POLICIES = {p.name: p for p in (CachePolicy, StreamingPolicy, H2OPolicy, LMInfinitePolicy, DCAPolicy)}
POLICY_NAMES = tuple(POLICIES)


def make_policy(name: str, model, prompt_lens: Tensor, max_new_tokens: int, **options) -> CachePolicy:
    """Build policy ``name`` for prompts of ``prompt_lens [B]`` real tokens. Raises ValueError for an unknown
    name, an option the policy does not take, or an invalid option value."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r} is not one of {list(POLICY_NAMES)}.")
    cls = POLICIES[name]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"policy {name!r} takes the options {list(cls.options)}; got unknown {unknown}.")
    return cls(model, prompt_lens, max_new_tokens, **options)
