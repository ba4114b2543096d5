"""The verdicts of the small-scale reproductions, computed from the measured rows (never asserted).

Each claim is a criterion on perplexity ratios; the thresholds are stated here and copied into the results,
so a reader (and tests/e2e/test_repro_long_context.py) can recompute every verdict from the rows alone.

A row is ``{claim, method, cache, length, region, start, end, tokens, nll_sum, ppl}`` with
``ppl = exp(nll_sum / tokens)`` over the predictions made at query positions ``[start, end)``.

Pure Python on purpose: imports neither torch nor seqpar.
"""
from __future__ import annotations

import math
from typing import Optional

NEAR = 1.10  # "stays near": perplexity within 10% of the reference
FAR = 1.25  # "far worse": a recent-only cache at least 25% above the full cache (H2O)
BLOWUP = 2.0  # "degrades sharply" / "explodes": more than twice the reference perplexity
CRITERIA = {
    "streaming": f"at every cache size C, on queries at positions [C, train_len) (past the first eviction, inside the "
                 f"training length where the full cache is the reference): sinks+window ppl <= {NEAR} x full and "
                 f"window-only ppl >= {BLOWUP} x full",
    "h2o": f"on the decoded tokens: H2O (heavy+recent = 20% of the sequence) ppl <= {NEAR} x full and recent-only "
           f"(same budget) ppl >= {FAR} x full",
    "extension": f"same target tokens scored with n x train_len of context, reference = plain RoPE at 1x: at every "
                 f"n >= 4, lm_infinite and dca ppl <= {NEAR} x reference while plain RoPE ppl >= {BLOWUP} x reference",
}


def find(rows: list, **match) -> Optional[dict]:
    """The one row whose fields equal ``match`` (None if there is none)."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(hits) > 1:
        raise ValueError(f"{len(hits)} rows match {match}; a claim reads exactly one")
    return hits[0] if hits else None


def _ratio(a: dict, b: dict) -> float:
    return a["ppl"] / b["ppl"]


def judge_streaming(rows: list) -> dict:
    checks = []
    for cache in sorted({r["cache"] for r in rows if r["claim"] == "streaming" and r["region"] == "evicted"}):
        full, sinks, window = (find(rows, claim="streaming", region="evicted", cache=cache, method=m)
                               for m in ("full", "sinks", "window"))
        s, w = _ratio(sinks, full), _ratio(window, full)
        checks.append({"cache": cache, "full": full["ppl"], "sinks": sinks["ppl"], "window": window["ppl"],
                       "sinks_over_full": s, "window_over_full": w, "holds": s <= NEAR and w >= BLOWUP})
    return _verdict("streaming", checks)


def judge_h2o(rows: list) -> dict:
    full, h2o, recent = (find(rows, claim="h2o", method=m) for m in ("full", "h2o", "recent"))
    h, r = _ratio(h2o, full), _ratio(recent, full)
    check = {"cache": h2o["cache"], "full": full["ppl"], "h2o": h2o["ppl"], "recent": recent["ppl"],
             "h2o_over_full": h, "recent_over_full": r, "holds": h <= NEAR and r >= FAR}
    return _verdict("h2o", [check])


def judge_extension(rows: list, train_len: int) -> dict:
    ref = find(rows, claim="extension", method="rope", length=train_len)
    checks = []
    for length in sorted({r["length"] for r in rows if r["claim"] == "extension"}):
        ratios = {r["method"]: _ratio(r, ref) for r in rows if r["claim"] == "extension" and r["length"] == length}
        judged = length >= 4 * train_len
        holds = (ratios["lm_infinite"] <= NEAR and ratios["dca"] <= NEAR and ratios["rope"] >= BLOWUP) if judged else None
        checks.append({"length": length, "factor": length / train_len, "reference": ref["ppl"],
                       **{f"{m}_over_ref": v for m, v in sorted(ratios.items())}, "judged": judged, "holds": holds})
    return _verdict("extension", checks)


def _verdict(claim: str, checks: list) -> dict:
    judged = [c for c in checks if c.get("judged", True)]
    ok = bool(judged) and all(c["holds"] for c in judged)
    return {"criterion": CRITERIA[claim], "checks": checks, "reproduced": ok}


def judge_all(rows: list, train_len: int) -> dict:
    """``{claim: {criterion, checks, reproduced}}`` for the claims whose rows are present."""
    out = {}
    present = {r["claim"] for r in rows}
    if "streaming" in present:
        out["streaming"] = judge_streaming(rows)
    if "h2o" in present:
        out["h2o"] = judge_h2o(rows)
    if "extension" in present:
        out["extension"] = judge_extension(rows, train_len)
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def claim_lines(claims: dict) -> list:
    """One line per claim: reproduced or not, and the numbers that decided it."""
    lines = []
    titles = {"streaming": "(1) StreamingLLM: 4 sinks + window stays near the full cache, window-only degrades",
              "h2o": "(2) H2O: a 20% heavy-hitter cache stays near full, far better than recent-only 20%",
              "extension": "(3) LM-Infinite / DCA stay flat at 4-8x the training length where plain RoPE explodes"}
    for claim, v in claims.items():
        word = "REPRODUCED" if v["reproduced"] else "NOT REPRODUCED"
        if claim == "streaming":
            detail = "; ".join(f"C={c['cache']}: sinks/full {_fmt(c['sinks_over_full'])}, window/full "
                               f"{_fmt(c['window_over_full'])}" for c in v["checks"])
        elif claim == "h2o":
            c = v["checks"][0]
            detail = f"budget {c['cache']}: h2o/full {_fmt(c['h2o_over_full'])}, recent/full {_fmt(c['recent_over_full'])}"
        else:
            detail = "; ".join(f"{c['factor']:g}x: rope {_fmt(c['rope_over_ref'])}, lm_infinite "
                               f"{_fmt(c['lm_infinite_over_ref'])}, dca {_fmt(c['dca_over_ref'])}, yarn "
                               f"{_fmt(c['yarn_over_ref'])}, pi {_fmt(c['pi_over_ref'])}"
                               for c in v["checks"] if c["factor"] > 1)
        lines.append(f"claim {titles[claim]}: {word} [{detail}] (criterion: {v['criterion']})")
    return lines


def summary_table(rows: list) -> str:
    """The rows as one markdown table (perplexity with 4 significant digits)."""
    cols = ["claim", "method", "cache", "length", "region", "start", "end", "tokens", "ppl"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else ("-" if r[c] is None else str(r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
