"""Cost-model calibration after the session6 long-sequence rows: held-out check, refit, per-row table.

No GPU runs here: every efficiency below is either a measurement copied from this session's tables (in
``seqpar.parallel.cost_data.ROWS_SESSION6``) or a model prediction.

    .venv/bin/python benchmarks/results/session6_2026-11-28/cost_model/make_calibration_report.py

Writes ``cost_calibration.{md,json}`` next to this file. The predictions table/plot for 8..1024 GPUs come from
``benchmarks/cost_predictions.py --out <this folder> --skip-calibration``.
"""
import dataclasses
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))
from benchmarks.cost_predictions import prediction_rows, tok  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from seqpar.parallel import cost, cost_data  # noqa: E402

# The constants before this refit (fitted on _RING_OLD + _TODAY, 45 rows): the held-out check uses them.
# Every measured row ran the Ulysses mode unchunked (cost.MEASURED_CHUNKS): fits and checks evaluate it so.
AS_RUN = dataclasses.replace(cost.DEFAULT, ulysses_chunks=cost.MEASURED_CHUNKS)
PREVIOUS = dataclasses.replace(AS_RUN, beta_bytes=50.98, gamma=0.733, coll_eff=0.47, ag_call_s=4.31e-4)
N_OLD = 16 + len(cost_data.ROWS_2026_11_28)
OLD, NEW = cost.MEASURED[:N_OLD], cost_data.ROWS_SESSION6
assert cost.MEASURED[N_OLD:] == NEW
# torch context parallel (cuDNN + all-gather) rows of the same runs: reported, not fitted (no model of torch CP).
TORCH_CP = ((2, 131072, 0.935), (2, 262144, 0.995), (2, 524288, 1.019), (4, 131072, 0.896), (4, 262144, 0.962))
# Same-run single-GPU cuDNN rows (ms, B=1 H=32 D=128 causal fwd+bwd) against KERNEL_TFLOPS at the same length.
SINGLE_MS = (("x4", 131072, 32, 905.5495), ("x4", 131072, 8, 906.4099), ("x4", 262144, 32, 3691.856),
             ("x4", 262144, 8, 3693.834), ("x2", 131072, 32, 902.2), ("x2", 262144, 32, 3678.3),
             ("x2", 524288, 32, 15196.658))


def stats(rows: list, key: str = "error_pp") -> dict:
    e = [r[key] for r in rows]
    worst = max(rows, key=lambda r: abs(r[key]))
    return {"rows": len(e), "mean_abs_pp": sum(map(abs, e)) / len(e), "mean_signed_pp": sum(e) / len(e),
            "worst_pp": worst[key], "worst_row": f"{worst['mode']} {worst['kernel']} {worst['gpus']} GPUs "
                                                 f"{tok(worst['tokens'])} kv{worst['kv_heads']}"}


def per_mode(rows: list, key: str = "error_pp") -> dict:
    return {m: stats([r for r in rows if r["mode"] == m], key) for m in cost.MODES if any(r["mode"] == m for r in rows)}


def candidate_fit(points, extra):
    """calibrate() with one more linear column: ``extra(mode, kernel, shape, cluster, parts)`` seconds per unit of the new constant
    (the same grid over coll_eff, least squares on relative time). Returns (constants, new constant, errors pp)."""
    fitted = cost.FITTED
    best = None
    for eff in np.arange(0.2, 1.0 + 1e-9, 0.005):
        zero = dataclasses.replace(AS_RUN, coll_eff=float(eff), **{f: 0.0 for f in fitted})
        rows, rhs, ideal, base = [], [], [], []
        for mode, kernel, n, S, hk, e in points:
            s, c = cost.AttnShape(seq_len=S, kv_heads=hk), cost.Cluster(gpus=n, kernel=kernel)
            u = cost.HYBRID_MEASURED_U if mode == "hybrid" else None
            r0 = cost.mode_time(mode, s, c, zero, ulysses=u)
            t0 = r0["time"]
            cols = [cost.mode_time(mode, s, c, dataclasses.replace(zero, **{f: 1.0}), ulysses=u)["time"] - t0
                    for f in fitted] + [extra(mode, kernel, s, c, r0["parts"])]
            rows.append([x / t0 for x in cols])
            rhs.append((cost.ideal_time(s, c) / e - t0) / t0)
            ideal.append(cost.ideal_time(s, c))
            base.append(t0)
        a, y = np.array(rows), np.array(rhs)
        sol = np.clip(np.linalg.lstsq(a, y, rcond=None)[0], 0.0, None)
        err = float(np.sum((a @ sol - y) ** 2))
        if best is None or err < best[0]:
            pred = np.array(ideal) / (np.array(base) * (1 + a @ sol))
            best = (err, float(eff), sol, pred)
    _, eff, sol, pred = best
    cal = dataclasses.replace(AS_RUN, coll_eff=eff, **{f: float(x) for f, x in zip(fitted, sol)})
    errs = [{"mode": p[0], "kernel": p[1], "gpus": p[2], "tokens": p[3], "kv_heads": p[4], "measured": p[5],
             "predicted": float(q), "error_pp": 100 * (float(q) - p[5])} for p, q in zip(points, pred)]
    return cal, float(sol[-1]), errs


def candidates(points) -> dict:
    """Extra terms tried and not adopted: (1) a cuDNN rate on H/U heads over the whole sequence below the 32-head
    table, as a fraction of the kernel time, Ulysses rows only; (2) the same on the hybrid's ring kernels too;
    (3) the same for every kernel; (4) HBM layout copies around the all-to-alls, bytes per element moved
    (Ulysses and hybrid; proportional to the all-to-all traffic, as coll_eff is)."""
    def copies(m, k, s, c, p):
        if m not in ("ulysses", "hybrid"):
            return 0.0
        u = c.gpus if m == "ulysses" else cost.HYBRID_MEASURED_U
        kv = cost._ulysses_kv(s, u)
        return 2 * s.batch * (s.seq_len / c.gpus) * s.head_dim * 2 * (s.heads + kv) / (c.hbm_gbs * 1e9)

    specs = {
        "cudnn_heads_ulysses": lambda m, k, s, c, p: p["kernel"] if (m == "ulysses" and k == "sdpa_cudnn") else 0.0,
        "cudnn_heads_ulysses_hybrid": lambda m, k, s, c, p: p["kernel"] if (m in ("ulysses", "hybrid")
                                                                              and k == "sdpa_cudnn") else 0.0,
        "any_kernel_heads_ulysses_hybrid": lambda m, k, s, c, p: p["kernel"] if m in ("ulysses", "hybrid") else 0.0,
        "a2a_hbm_copy_bytes": copies,
    }
    out = {}
    for name, fn in specs.items():
        cal, extra, errs = candidate_fit(points, fn)
        out[name] = {"extra_constant": extra, "beta": cal.beta_bytes, "gamma": cal.gamma, "coll_eff": cal.coll_eff,
                     "ag_call_s": cal.ag_call_s, "all": stats(errs), "old_rows": stats(errs[:N_OLD]),
                     "session6_rows": stats(errs[N_OLD:]), "per_mode": per_mode(errs),
                     "ulysses_2gpu_512k_pp": next(r["error_pp"] for r in errs if r["mode"] == "ulysses"
                                                  and r["gpus"] == 2 and r["tokens"] == 524288)}
    return out


def reference_rates() -> list:
    out = []
    for run, S, hk, ms in SINGLE_MS:
        rate = cost.attention_flops(cost.AttnShape(seq_len=S, kv_heads=hk)) / (ms * 1e-3) / 1e12
        table = cost.kernel_tflops("sdpa_cudnn", S)
        out.append({"run": run, "tokens": S, "kv_heads": hk, "ms": ms, "tflops": rate, "table": table,
                    "diff_pct": 100 * (rate / table - 1)})
    return out


def main() -> None:
    refit = cost.calibrate()
    prev_refit = cost.calibrate(OLD)
    held = cost.fit_table(PREVIOUS, NEW)
    after = cost.fit_table(cost.DEFAULT)
    before_all = cost.fit_table(PREVIOUS)
    rows = []
    for i, (a, b) in enumerate(zip(after, before_all)):
        rows.append({**a, "set": "session6 (held out)" if i >= N_OLD else ("ring old" if i < 16 else "11-28"),
                     "previous": b["predicted"], "error_previous_pp": b["error_pp"]})
    cands = candidates(cost.MEASURED)
    pred_new = prediction_rows(cost.DEFAULT)
    pred_old = prediction_rows(PREVIOUS)
    changes = [{"gpus": n["gpus"], "tokens": n["tokens"], "best_previous": o["best_detail"], "best_now": n["best_detail"],
                "eff_previous": o["best_efficiency"], "eff_now": n["best_efficiency"]}
               for o, n in zip(pred_old, pred_new)]
    moved = [c for c in changes if c["best_previous"] != c["best_now"]]
    max_shift = max(changes, key=lambda c: abs(c["eff_now"] - c["eff_previous"]))
    consts = lambda c: {"beta_bytes": c.beta_bytes, "gamma": c.gamma, "coll_eff": c.coll_eff, "ag_call_s": c.ag_call_s}
    data = {
        "kind": "calibration of a cost model: measured efficiencies (H200) vs PREDICTIONS of seqpar/parallel/cost.py",
        "previous_constants": consts(PREVIOUS), "previous_constants_refit_check": consts(prev_refit),
        "constants": consts(cost.DEFAULT), "calibrate_now": consts(refit),
        "held_out": {"all": stats(held), "per_mode": per_mode(held)},
        "after_refit": {"all": stats(after), "old_rows": stats(after[:N_OLD]), "session6_rows": stats(after[N_OLD:]),
                        "per_mode": per_mode(after)},
        "previous_on_old_rows": {"all": stats(before_all[:N_OLD]), "per_mode": per_mode(before_all[:N_OLD])},
        "rows": rows, "torch_cp_not_fitted": [{"gpus": n, "tokens": S, "efficiency": e} for n, S, e in TORCH_CP],
        "single_gpu_reference_vs_table": reference_rates(), "candidate_terms_not_adopted": cands,
        "prediction_grid_changes": {"best_mode_changed": moved, "largest_best_eff_shift": max_shift},
    }
    with open(os.path.join(HERE, "cost_calibration.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(HERE, "cost_calibration.md"), "w") as f:
        f.write(markdown(data, held, rows))
    print(os.path.join(HERE, "cost_calibration.md"))


def s_line(st: dict) -> str:
    return f"{st['mean_abs_pp']:.2f} pp mean abs (signed {st['mean_signed_pp']:+.2f}), worst {st['worst_pp']:+.1f} " \
           f"({st['worst_row']})"


def mode_table(cols: dict) -> str:
    """``{column title: per_mode dict}`` -> markdown rows per mode."""
    modes = [m for m in cost.MODES if any(m in pm for pm in cols.values())]
    head = "| mode | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = ""
    for m in modes:
        cells = []
        for pm in cols.values():
            st = pm.get(m)
            cells.append("-" if st is None else f"{st['rows']} rows: {st['mean_abs_pp']:.2f} mean abs "
                                                 f"({st['mean_signed_pp']:+.2f} signed), worst {st['worst_pp']:+.1f}")
        body += f"| {m} | " + " | ".join(cells) + " |\n"
    return head + body


def markdown(d: dict, held: list, rows: list) -> str:
    p, c = d["previous_constants"], d["constants"]
    ho, af = d["held_out"], d["after_refit"]
    held_md = markdown_table(held, [("mode", "mode", ""), ("GPUs", "gpus", ""), ("tokens", lambda r: tok(r["tokens"]), ""),
                                    ("KV heads", "kv_heads", ""), ("measured", "measured", ".1%"),
                                    ("predicted (previous constants)", "predicted", ".1%"),
                                    ("error (pp)", "error_pp", "+.2f")])
    rows_md = markdown_table(rows, [("set", "set", ""), ("mode", "mode", ""), ("kernel", "kernel", ""),
                                    ("GPUs", "gpus", ""), ("tokens", lambda r: tok(r["tokens"]), ""),
                                    ("KV heads", "kv_heads", ""), ("measured", "measured", ".1%"),
                                    ("previous", "previous", ".1%"), ("error previous (pp)", "error_previous_pp", "+.1f"),
                                    ("refit", "predicted", ".1%"), ("error refit (pp)", "error_pp", "+.1f")])
    ref_md = markdown_table(d["single_gpu_reference_vs_table"], [
        ("run", "run", ""), ("tokens", lambda r: tok(r["tokens"]), ""), ("KV heads", "kv_heads", ""),
        ("single-GPU ms", "ms", ".1f"), ("TFLOP/s", "tflops", ".1f"), ("KERNEL_TFLOPS", "table", ".1f"),
        ("difference", "diff_pct", "+.1f")])
    cand_rows = []
    for name, x in d["candidate_terms_not_adopted"].items():
        pm = x["per_mode"]
        cand_rows.append({"term": name, "fraction": x["extra_constant"], "coll_eff": x["coll_eff"], "beta": x["beta"],
                          "all": x["all"]["mean_abs_pp"], "worst": x["all"]["worst_pp"],
                          "old": x["old_rows"]["mean_abs_pp"], "ulysses": pm["ulysses"]["mean_abs_pp"],
                          "hybrid": pm["hybrid"]["mean_abs_pp"], "u512": x["ulysses_2gpu_512k_pp"]})
    cand_md = markdown_table(cand_rows, [
        ("extra term", "term", ""), ("fitted value", "fraction", ".3f"),
        ("coll_eff", "coll_eff", ".3f"), ("beta", "beta", ".1f"), ("all rows mean (pp)", "all", ".2f"),
        ("worst (pp)", "worst", "+.1f"), ("old 45 rows mean", "old", ".2f"), ("ulysses mean", "ulysses", ".2f"),
        ("hybrid mean", "hybrid", ".2f"), ("ulysses 2 GPUs 512k (pp)", "u512", "+.1f")])
    moved = d["prediction_grid_changes"]["best_mode_changed"]
    shift = d["prediction_grid_changes"]["largest_best_eff_shift"]
    moved_txt = ("no best mode changes" if not moved else
                 f"{len(moved)} best-mode change(s): " + "; ".join(
                     f"{m['gpus']} GPUs {tok(m['tokens'])}: {m['best_previous']} -> {m['best_now']}" for m in moved))
    torch_txt = ", ".join(f"{n} GPUs {tok(S)} {e:.1%}" for n, S, e in
                          ((r["gpus"], r["tokens"], r["efficiency"]) for r in d["torch_cp_not_fitted"]))
    base = d["candidate_terms_not_adopted"]
    return f"""# Cost model calibration, session6 (2026-11-28): held-out check and refit

**What this is.** `seqpar/parallel/cost.py` is a model; its constants are *fits to H200 measurements* (2 and 4 GPUs,
one node). The 8..1024-GPU tables in `cost_predictions.md` next to this file are **predictions**, not measurements:
nothing ran on more than 4 GPUs or across nodes.

New rows (`cost_data.ROWS_SESSION6`, 18): cuDNN, zigzag, causal fwd+bwd, B=1 H=32 D=128 bf16; efficiency = per-GPU TFLOP/s /
the same kernel on one GPU over the whole sequence, from the same run's single-GPU row. 4 GPUs, 128k and 256k, 32
and 8 KV heads, ring / Ulysses / hybrid (Ulysses 2 x ring 2): `../modes_x4/cp_modes_NVIDIA-H200_x4_2026-11-28.json`.
2 GPUs, 32 KV heads, ring / Ulysses: 128k and 256k from `../modes_x2/cp_modes_x2_128k_256k_printed.md` (single ms /
(2 x mode ms); that run's JSON did not come back, and GPUs 2,3 of the machine were training at the time), 512k from
`../modes_x2/cp_modes_NVIDIA-H200_x2_2026-11-28.json`.

## 1. Held out: the previous constants on the new rows

Previous constants (fitted on the 45 rows before today: 16 old ring rows + 29 of 2026-11-28): beta {p['beta_bytes']},
gamma {p['gamma']}, coll_eff {p['coll_eff']}, ag_call_s {p['ag_call_s'] * 1e3:.3f} ms; `calibrate()` on those 45
rows with today's code still returns beta {d['previous_constants_refit_check']['beta_bytes']:.2f}, gamma {d['previous_constants_refit_check']['gamma']:.3f}, coll_eff
{d['previous_constants_refit_check']['coll_eff']:.3f}, ag_call_s {d['previous_constants_refit_check']['ag_call_s'] * 1e3:.3f} ms. Out-of-sample error on the 18 new rows:

- all: {s_line(ho['all'])}

{mode_table({'held out (previous constants)': ho['per_mode']})}
{held_md}

## 2. Refit on all 63 rows

`cost.calibrate()` on `MEASURED` (old 45 + 18 new), same model form:

| constant | previous (45 rows) | refit (63 rows, in `cost.py`) | `calibrate()` unrounded |
|---|---|---|---|
| beta (B/element/step) | {p['beta_bytes']} | {c['beta_bytes']} | {d['calibrate_now']['beta_bytes']:.3f} |
| gamma | {p['gamma']} | {c['gamma']} | {d['calibrate_now']['gamma']:.4f} |
| coll_eff | {p['coll_eff']} | {c['coll_eff']} | {d['calibrate_now']['coll_eff']:.3f} |
| ag_call_s (ms) | {p['ag_call_s'] * 1e3:.3f} | {c['ag_call_s'] * 1e3:.3f} | {d['calibrate_now']['ag_call_s'] * 1e3:.4f} |

- all 63 rows: {s_line(af['all'])}
- the old 45 rows: {s_line(af['old_rows'])} (previous constants: {s_line(d['previous_on_old_rows']['all'])})
- the 18 session6 rows, now in the fit: {s_line(af['session6_rows'])} (held out: {ho['all']['mean_abs_pp']:.2f})

{mode_table({'previous constants, old 45 rows': d['previous_on_old_rows']['per_mode'],
             'held out, 18 new rows': ho['per_mode'], 'refit, all 63 rows': af['per_mode']})}
The new rows barely move the fit (the old rows go {d['previous_on_old_rows']['all']['mean_abs_pp']:.2f} ->
{af['old_rows']['mean_abs_pp']:.2f} pp): at 128k-512k the modes are kernel-bound and the fitted constants matter
little. What the held-out check shows is a **bias**, not a badly placed constant: {sum(r['error_pp'] > 0 for r in held)} of the
18 new rows are over-predicted (signed mean {ho['all']['mean_signed_pp']:+.2f} pp held out, {af['session6_rows']['mean_signed_pp']:+.2f}
after the refit).

**Ulysses is over-predicted at 128k-256k by ~2 pp on both 2 and 4 GPUs** (held out +1.7..+2.6 pp on the 6 rows at
128k/256k; +0.1 at 512k on 2 GPUs). There its 8 un-overlapped all-to-alls are only 1.5-4.7% of the predicted time
(6-17% at 32k), so a slower all-to-all (lower coll_eff) cannot absorb 2 pp without wrecking the 32k rows; the fit
indeed only moves coll_eff 0.47 -> 0.45. The candidate missing term - the whole-sequence cuDNN kernel on H/U heads
running below the 32-head single-GPU rate the model assumes - fits the 128k/256k rows and the 32k cuDNN-vs-Triton
split (cuDNN Ulysses rows over-predicted, Triton ones under-predicted, since 2026-11-28), but contradicts the one
512k row (within 0.1 pp without it). Four one-term extensions were fitted together with the four constants (same
grid and least squares as `calibrate()`; none adopted):

{cand_md}

The `*_heads_*` terms are an extra fraction of the kernel time; `a2a_hbm_copy_bytes` is HBM bytes per all-to-all
element (layout copies), which scales with S/N like the all-to-alls and so cannot remove a bias that is flat in S.
The cuDNN-only Ulysses term halves the Ulysses error ({af['per_mode']['ulysses']['mean_abs_pp']:.2f} ->
{base['cudnn_heads_ulysses']['per_mode']['ulysses']['mean_abs_pp']:.2f} pp) and the overall mean
({af['all']['mean_abs_pp']:.2f} -> {base['cudnn_heads_ulysses']['all']['mean_abs_pp']:.2f}), but moves the 512k
row to {base['cudnn_heads_ulysses']['ulysses_2gpu_512k_pp']:+.1f} pp, leaves the hybrid no better, raises the worst
row ({af['all']['worst_pp']:+.1f} -> {base['cudnn_heads_ulysses']['all']['worst_pp']:+.1f} pp), and has no direct
measurement behind it (no single-GPU cuDNN rate at 16 or 8 heads exists in `KERNEL_TFLOPS` or DEVICE.md). It does
not clearly help, so the model form is kept. The cheap test that would settle it: single-GPU cuDNN fwd+bwd at H=16
and H=8 against H=32, S = 128k..512k (if H/U heads run ~2-3% slower, add the term with that measured rate rather
than a fitted one).

**Ring and hybrid on 4 GPUs at 128k-256k are mostly over-predicted too** (held out: ring +1.3..+3.0 pp on 3 of 4
rows, -1.1 at 128k with 32 KV heads; hybrid +0.8..+3.2 on all 4), while the 2-GPU ring rows straddle zero. Part of it may be the reference: today's same-run single-GPU cuDNN rates are 0.7-2.0% above `KERNEL_TFLOPS` at
the same length (table below); the model's efficiency uses the table at S for the reference and at S/(2n) for the
ring's calls, so a reference that ran faster than the table, without the 32k-64k calls speeding up as much (not
measured in these runs), lowers the measured efficiency by up to that fraction. The table is measured data and was
not changed here.

{ref_md}

torch context parallel (cuDNN + all-gather) rows of the same runs, reported only (the model has no torch-CP mode;
not fitted): {torch_txt}.

## 3. Effect on the predictions (8..1024 GPUs; PREDICTIONS)

`cost_predictions.{{md,json,png}}` in this folder were regenerated with the refit constants
(`benchmarks/cost_predictions.py --out benchmarks/results/session6_2026-11-28/cost_model --skip-calibration`).
Against the previous constants on the same grid: {moved_txt}; the largest change of the best mode's predicted
efficiency is {100 * (shift['eff_now'] - shift['eff_previous']):+.1f} pp ({shift['gpus']} GPUs,
{tok(shift['tokens'])}: {shift['eff_previous']:.1%} -> {shift['eff_now']:.1%}).

## Every row: previous constants vs refit

`set`: `ring old` (before the fused merge), `11-28` (2026-11-28 rows), `session6 (held out)` (today's; the previous
constants never saw them, the refit does).

{rows_md}

Reproduce: `.venv/bin/python benchmarks/results/session6_2026-11-28/cost_model/make_calibration_report.py`.
"""


if __name__ == "__main__":
    main()
