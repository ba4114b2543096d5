"""Per-token negative log-likelihood of a sequence under a cache policy: perplexity at length.

Two ways, equal wherever both apply (tested): a whole-sequence forward under the policy's rule
(:func:`~seqpar.inference.generate.policy_forward`, fused kernels, fast), or teacher-forced decoding -- the
first ``prefill`` tokens prefilled, then every later token fed one at a time through the evicting cache, as a
streaming deployment sees it. H2O exists only in the second form (its eviction follows the attention of
earlier steps).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from seqpar.inference.cache import KVCache
from seqpar.inference.generate import policy_forward, prefill as prefill_step, prompt_layout
from seqpar.inference.registry import make_policy
from seqpar.inference.runner import policy_step


def _nll(model, hidden: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """``hidden [B, n, dim]`` predicting ``targets [B, n]`` -> NLL ``[B, n]`` float64, logits in chunks of ``chunk``."""
    out = [torch.zeros(targets.shape[0], 0, dtype=torch.float64, device=targets.device)]  # n may be 0
    for a in range(0, hidden.shape[1], chunk):
        logits = model.logits(hidden[:, a:a + chunk]).double()  # [B, c, V]
        out.append(F.cross_entropy(logits.transpose(1, 2), targets[:, a:a + chunk], reduction="none"))
    return torch.cat(out, 1)


@torch.no_grad()
def token_nll(model, input_ids: Tensor, *, policy: str = "full", prefill: Optional[int] = None,
              logits_chunk: int = 2048, **policy_options) -> Tensor:
    """NLL ``[B, S - 1]`` (float64, natural log) of tokens ``1..S-1`` of unpadded ``input_ids [B, S]`` given
    everything before them under ``policy``.

    ``prefill=None``: one whole-sequence forward (not for ``h2o``). ``prefill=P`` (1 <= P <= S): prefill the
    first P tokens, then teacher-forced decoding; budgets given as fractions (H2O) are fractions of P.
    Raises ValueError for a bad ``prefill`` or policy option.
    """
    ids = input_ids.long()
    B, S = ids.shape
    if S < 2:
        raise ValueError(f"input_ids needs at least 2 tokens to score; got {S}.")
    if prefill is None:
        hidden = policy_forward(model, ids, policy=policy, **policy_options)
        return _nll(model, hidden[:, :-1], ids[:, 1:], logits_chunk)
    if isinstance(prefill, bool) or not isinstance(prefill, int) or not 1 <= prefill <= S:
        raise ValueError(f"prefill={prefill!r} must be an int in [1, {S}] (prompt tokens before decoding starts).")
    positions, valid = prompt_layout(ids[:, :prefill], None)
    pol = make_policy(policy, model, valid.sum(1), S - prefill, **policy_options)
    cache = KVCache(len(model.layers))
    hidden = prefill_step(model, ids[:, :prefill], positions, valid, cache, pol, 1024, True)
    nll = [_nll(model, hidden[:, :-1], ids[:, 1:prefill], logits_chunk)]
    last = hidden[:, -1:]
    ones = torch.ones(B, 1, dtype=torch.bool, device=ids.device)
    for s in range(prefill, S):
        nll.append(_nll(model, last, ids[:, s:s + 1], logits_chunk))
        if s + 1 < S:
            pos = torch.full((B, 1), s, dtype=torch.long, device=ids.device)
            last = policy_step(model, ids[:, s:s + 1], pos, ones, cache, pol)
    return torch.cat(nll, 1)
