"""The three measurements of benchmarks/repro_long_context.py: per-token NLL of held-out text under each
cache policy or RoPE variant (:func:`seqpar.inference.token_nll`), reduced to rows over position ranges.

Every NLL tensor is ``[B, S - 1]``: entry ``t`` is the loss of predicting token ``t + 1`` from the query at
position ``t``. A row covers query positions ``[start, end)`` of all ``B`` streams (see repro_claims.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def segments(stream: np.ndarray, rows: int, length: int, device) -> torch.Tensor:
    """``[rows, length]`` consecutive disjoint slices of the held-out ``stream``; ValueError when too short."""
    need = rows * length
    if len(stream) < need:
        raise ValueError(f"the held-out stream has {len(stream)} tokens but {rows} x {length} = {need} are needed: "
                         "lower --eval-batch or the lengths, or raise data.val_fraction / --max-bytes.")
    return torch.as_tensor(stream[:need].reshape(rows, length), device=device)


def row(claim: str, method: str, nll: torch.Tensor, start: int, end: int, *, cache=None, length=None,
        region: str = "all") -> dict:
    """One result row: NLL summed over query positions ``[start, end)`` of every stream, and its perplexity."""
    part = nll[:, start:end].double()
    total, n = float(part.sum()), int(part.numel())
    return {"claim": claim, "method": method, "cache": cache, "length": length, "region": region, "start": start,
            "end": end, "tokens": n, "nll_sum": total, "ppl": math.exp(total / n)}


def by_position(nll: torch.Tensor, buckets: int) -> list:
    """``[(centre position, ppl)]`` over ``buckets`` equal ranges of query positions (all streams pooled)."""
    edges = np.linspace(0, nll.shape[1], buckets + 1).astype(int)
    return [((a + b) / 2, math.exp(float(nll[:, a:b].double().mean()))) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def streaming_eval(model, ids: torch.Tensor, train_len: int, caches: list, sinks: int, buckets: int):
    """StreamingLLM's comparison on streams ``ids [B, S]`` (S past train_len): for each cache size C, a window of
    C (no sinks) vs ``sinks`` + a window of C - sinks vs the full cache. Regions: ``evicted`` = queries in
    [C, train_len) (the first tokens are gone; the full cache is still in its training range), ``beyond`` =
    queries in [train_len, S - 1) (the full cache meets unseen distances)."""
    from seqpar.inference import token_nll

    S = ids.shape[1]
    full = token_nll(model, ids, policy="full")
    rows, curves = [], {"full": by_position(full, buckets)}
    for C in caches:
        nll = {"full": full,
               "window": token_nll(model, ids, policy="streaming", sinks=0, window=C),
               "sinks": token_nll(model, ids, policy="streaming", sinks=sinks, window=C - sinks)}
        for region, (a, b) in {"evicted": (C, min(train_len, S - 1)), "beyond": (train_len, S - 1)}.items():
            if b > a:
                rows += [row("streaming", m, x, a, b, cache=C, length=S, region=region) for m, x in nll.items()]
        curves[f"window {C}"] = by_position(nll["window"], buckets)
        curves[f"{sinks} sinks + {C - sinks}"] = by_position(nll["sinks"], buckets)
    return rows, curves


def h2o_eval(model, ids: torch.Tensor, prefill: int, heavy: float, recent: float, buckets: int):
    """H2O on streams ``ids [B, S]`` within the training length: the first ``prefill`` tokens prefilled, the
    rest decoded one at a time through a cache of ``heavy`` + ``recent`` x S tokens (fractions of the whole
    sequence, as the paper's budgets), against a recent-only cache of the same size and the full cache."""
    from seqpar.inference import token_nll

    S = ids.shape[1]
    # H2OPolicy takes fractions of the prompt: rescale so the budget is the fraction of the sequence.
    h, r = heavy * S / prefill, recent * S / prefill
    n_heavy, n_recent = max(1, math.floor(h * prefill)), max(1, math.floor(r * prefill))
    budget = n_heavy + n_recent
    nll = {"full": token_nll(model, ids, policy="full"),
           "h2o": token_nll(model, ids, policy="h2o", prefill=prefill, heavy=h, recent=r),
           # window = budget + 1: every query sees the same number of keys (the kept budget + itself)
           "recent": token_nll(model, ids, policy="streaming", sinks=0, window=budget + 1)}
    rows = [row("h2o", m, x, prefill, S - 1, cache=budget, length=S, region="decoded") for m, x in nll.items()]
    curves = {f"{m} ({budget} tokens)" if m != "full" else m: by_position(x[:, prefill:], buckets)
              for m, x in nll.items()}
    curves = {k: [(p + prefill, v) for p, v in pts] for k, pts in curves.items()}
    return rows, curves


def rope_variant(kind: str, factor: int, train_len: int):
    """The ``rope_scaling`` dict of PI (``linear``) or YaRN at ``factor`` (None at 1x: no scaling needed)."""
    if factor <= 1:
        return None
    return {"rope_type": kind, "factor": float(factor), "original_max_position_embeddings": train_len}


def extension_eval(model, streams: torch.Tensor, train_len: int, factors: list, score_len: int):
    """Context extension on ``streams [B, max(factors) * train_len]``: for each n, the last n x train_len tokens
    of every stream under plain RoPE, PI and YaRN (factor n), LM-Infinite and DCA; only the last
    ``score_len`` predictions are scored, so every n scores the SAME tokens with more context before them."""
    from seqpar.inference import token_nll

    rows = []
    try:
        for n in factors:
            S = n * train_len
            ids = streams[:, -S:]
            a, b = S - 1 - score_len, S - 1
            for method in ("rope", "pi", "yarn", "lm_infinite", "dca"):
                kind = {"pi": "linear", "yarn": "yarn"}.get(method)
                model.set_rope_scaling(rope_variant(kind, n, train_len) if kind else None)
                if method in ("lm_infinite", "dca"):
                    nll = token_nll(model, ids, policy=method, train_len=train_len)
                else:
                    nll = token_nll(model, ids, policy="full")
                rows.append(row("extension", method, nll, a, b, length=S, region="last"))
    finally:
        model.set_rope_scaling(None)
    return rows
