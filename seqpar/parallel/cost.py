"""Cost model: predicted attention time per training step (forward + backward) for each context-parallel mode.

Everything this module returns is a PREDICTION from measured kernel rates and link bandwidths; it is
calibrated on 2- and 4-GPU H200 measurements of every mode (``MEASURED``), nothing more. Plain numbers in,
plain numbers out: it imports nothing from ``seqpar`` but its data (``cost_data.py``: no model, no config), so
the config and ``train.py --dry-run`` can use it.

Notation: ``S`` tokens per sequence, ``B`` batch, ``H``/``Hk`` query/KV heads, ``D`` head_dim, ``b`` dtype bytes,
``v`` visible fraction of (query, key) pairs (0.5 causal, 1 full), ``N`` GPUs, ``g`` GPUs per node.

- FLOPs (fwd+bwd) ``F = 3.5 * 4 * B * H * S^2 * D * v``; a kernel call on ``L`` local queries runs at
  ``rate(kernel, L)`` (``KERNEL_TFLOPS``, measured, log-interpolated, clamped at the measured ends); the forward
  is ``FWD_SHARE`` of the kernel time.
- ring over ``n`` ranks, ``T = S/n`` tokens per rank (zigzag: every step has the same visible work):
  per step ``c = F/(n^2 rate(T))`` split fwd/bwd; K/V transfer ``m_kv = 2 B T Hk D b / bw``; backward also moves
  the fp32 dK/dV accumulators (n-2 hops overlapped, the last one in ``b`` bytes exposed).
  ``t = c_f + (n-1)(max(c_f, m_kv) + gam m_kv) + c_b + (n-1)(max(c_b, m_b) + gam m_b) + m_last
  + n (alpha + beta B T H D / hbm)``; ``alpha`` (fixed per step, assumed), ``beta`` (merge/cast bytes per
  element per step), ``gam`` (kernel slowdown per second of overlapped transfer: NCCL's copy kernels share the
  SMs) are fitted (``calibrate``), with ``coll_eff`` and ``ag_call_s`` below, to every measured mode at once.
  ``bw`` is NVLink inside a node, the inter-node link per GPU once the ring spans nodes (every step waits for
  its slowest hop).
- ulysses over ``U = N`` (``U | H``; KV heads replicated to ``Hk' = max(Hk, U)``): 4 all-to-alls forward (q, k, v,
  out) and 4 backward (dout, dq, dk, dv), in ``ch`` head chunks (``ulysses_chunks``) of which only the first
  chunk's inputs and the last one's results are exposed (1 chunk, as every measured row ran: none hidden), each
  moving ``(U-1)/U`` of ``B (S/U) heads D b`` at
  ``coll_eff`` of the link's send/recv rate (NCCL collectives over NVLink reach less than send/recv; fitted);
  then the whole-sequence kernel on ``H/U`` heads: ``F/(U rate(S))``.
- allgather: K/V in ``k = min(slices, Hk)`` head slices; per slice one kernel call per run of local queries
  (zigzag: ``RUNS`` = 2 runs of ``S/(2N)`` queries, against key ranges of different lengths), so ``2 k RUNS``
  calls fwd+bwd, each at ``rate(S/(2N))`` plus ``ag_call_s`` (fitted: per-call glue, launches, short-call
  tails). Gather K/V (``2 B S Hk D b (n-1)/n``) forward, gather AGAIN in the backward (K/V are not saved),
  reduce-scatter fp32 dK/dV, all at ``coll_eff`` of the link; the first slice exposed, the rest hidden behind
  the previous slice's kernels (plus ``gam`` contention while overlapped). Causal calls sit at an offset into
  their keys, which cuDNN/flash take only cut in two (a fully visible block + an aligned diagonal: twice the
  calls, at the kernel's own rate; a prediction, not yet measured); other masks run at Triton's rates.
- hybrid: Ulysses over ``U`` GPUs of one node, then the ring over ``R = N/U`` groups with ``S/R`` tokens and
  ``H/U`` heads per GPU; the best ``U`` is chosen.
- efficiency = ``F/(N rate(S)) / t``: the same kernel on one GPU at the same total tokens, as the benchmarks do.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

# The measured kernel rates and mode efficiencies (data only).
from seqpar.parallel.cost_data import FWD_SHARE, HYBRID_MEASURED_U, KERNEL_TFLOPS, MEASURED

MODES = ("ring", "allgather", "ulysses", "hybrid")
RUNS = 2  # kernel calls per head slice in the all-gather mode: zigzag gives every rank 2 runs of S/(2N) queries
# Kernels that express a causal mask only on aligned diagonals: the all-gather's causal calls (queries at an offset
# into the keys) run on them cut in two (a full block + a diagonal); other masks run at Triton's rates.
ALIGNED_CAUSAL_ONLY = ("sdpa_cudnn", "sdpa_flash")


@dataclass(frozen=True)
class AttnShape:
    """One attention's shape. ``visible``: fraction of (q, k) pairs computed (0.5 causal, 1.0 full, less for
    document/window masks); ``layers`` multiplies the time (the model's attention per step)."""
    seq_len: int
    heads: int = 32
    kv_heads: Optional[int] = None
    head_dim: int = 128
    batch: int = 1
    dtype_bytes: int = 2
    visible: float = 0.5
    layers: int = 1

    @property
    def hk(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads


@dataclass(frozen=True)
class Cluster:
    """``gpus`` in the context-parallel group, ``gpus_per_node`` on NVLink; bandwidths in GB/s per GPU."""
    gpus: int
    gpus_per_node: int = 8
    intra_gbs: float = 328.0   # NCCL send/recv between two H200s (DEVICE.md)
    inter_gbs: float = 50.0    # per GPU across nodes (400 Gb/s NIC per GPU); configurable
    hbm_gbs: float = 4000.0    # device copy (DEVICE.md)
    kernel: str = "sdpa_cudnn"


# calibrate()'s result on MEASURED (tests/unit/test_cost.py checks they are the fit). Before the 2026-11-28 rows
# (ring only, unfused merges): beta 55.66, gamma 0.582, no coll_eff (1.0) and no per-call term; before the
# session6 rows (_RING_OLD + _TODAY): beta 50.98, gamma 0.733, coll_eff 0.47, ag_call_s 4.31e-4.
BETA, GAMMA, COLL_EFF, AG_CALL_S = 53.97, 0.699, 0.45, 4.28e-4


@dataclass(frozen=True)
class Calib:
    """Fitted constants (``calibrate()`` reproduces them) and the assumed ones."""
    alpha_s: float = 5.0e-5       # assumed: fixed cost per ring step (~10 launches + waits; the ms-long measured
    #                               steps cannot resolve it: a free fit returns a negative value)
    beta_bytes: float = BETA      # fitted: HBM bytes per (token*head*dim) per ring step (merges, casts, accumulators)
    gamma: float = GAMMA          # fitted: kernel slowdown per second of overlapped transfer
    coll_eff: float = COLL_EFF    # fitted: all-to-all / all-gather / reduce-scatter rate as a fraction of send/recv
    ag_call_s: float = AG_CALL_S  # fitted: extra seconds per all-gather kernel call (fwd or bwd)
    coll_latency_s: float = 30e-6  # assumed: one collective inside a node
    inter_latency_s: float = 1e-4  # assumed: one collective/step across nodes
    grad_bytes: int = 4           # dK/dV accumulators travel in fp32
    slices: int = 4               # all-gather overlap slices
    ulysses_chunks: Optional[int] = None  # Ulysses head chunks per rank (None: the code's default, DEFAULT_CHUNKS,
    #                               cut to a divisor of the KV heads/rank); the MEASURED rows' chunks: MEASURED_CHUNKS


DEFAULT = Calib()
MEASURED_CHUNKS = 1  # the Ulysses mode of every calibration row moved all heads in one all-to-all per tensor
DEFAULT_CHUNKS = 1  # = seqpar.parallel.ulysses.DEFAULT_SLICES (chunking measured no gain on 2 x H200, 2026-11-29)


SLICE_CHOICES = (1, 2, 4, 8)  # the all-gather slice counts ``best_slices`` weighs


def best_slices(s: AttnShape, c: Cluster, cal: Calib = DEFAULT) -> int:
    """The all-gather slice count with the least PREDICTED time for this shape (ties: fewer slices): more
    slices hide more of the gathers but make more, smaller kernel calls (``ag_call_s`` each)."""
    cands = [x for x in SLICE_CHOICES if x <= max(1, s.hk)]
    times = {x: mode_time("allgather", s, c, dataclasses.replace(cal, slices=x))["time"] for x in cands}
    return min(cands, key=lambda x: (times[x], x))


def run_shape(cfg: Any, cp: int, gpus_per_node: int = 8) -> tuple:
    """``(AttnShape, Cluster)`` of a training run (a seqpar Config, read by attribute) on ``cp`` GPUs: its
    attention shape (a window's visible share), and the kernel ``parallel.attention_backend`` names when its
    rates are measured, else cuDNN's (auto's first choice)."""
    m, t, backend = cfg.model, cfg.train, cfg.parallel.attention_backend
    window = getattr(m, "window", None)
    visible = 0.5 if window is None else min(0.5, (window + 1) / t.seq_len)
    shape = AttnShape(seq_len=t.seq_len, heads=m.n_heads, kv_heads=m.kv_heads, head_dim=m.head_dim,
                      batch=t.batch_size, visible=visible, layers=m.n_layers)
    kernel = backend if backend in KERNEL_TFLOPS else "sdpa_cudnn"
    return shape, Cluster(gpus=cp, gpus_per_node=max(1, gpus_per_node), kernel=kernel)


def calib_for(parallel: Any, s: AttnShape, c: Cluster, cal: Calib = DEFAULT) -> Calib:
    """``cal`` with a run's own overlap settings: ``parallel.allgather_slices`` (0 = auto: :func:`best_slices`
    for this shape) and ``parallel.ulysses_chunks``."""
    cal = dataclasses.replace(cal, ulysses_chunks=getattr(parallel, "ulysses_chunks", cal.ulysses_chunks))
    slices = getattr(parallel, "allgather_slices", cal.slices)
    return dataclasses.replace(cal, slices=slices if slices else best_slices(s, c, cal))


def ulysses_chunks(kv_heads: int, u: int, cal: Calib) -> int:
    """Head chunks per rank of the Ulysses mode, as ``seqpar.parallel.ulysses.head_chunks`` picks them."""
    per_rank = max(1, kv_heads // u)
    c = max(1, min(DEFAULT_CHUNKS if cal.ulysses_chunks is None else cal.ulysses_chunks, per_rank))
    while per_rank % c:
        c -= 1
    return c


def kernel_tflops(kernel: str, length: float) -> float:
    """Measured fwd+bwd TFLOP/s of ``kernel`` for calls on ``length`` query tokens (log-linear between points,
    clamped outside the measured range: below 16k the fixed per-call costs are in the ring's ``alpha``)."""
    if kernel not in KERNEL_TFLOPS:
        raise ValueError(f"no measured rate for kernel {kernel!r}; known: {', '.join(KERNEL_TFLOPS)}")
    pts = KERNEL_TFLOPS[kernel]
    if length <= pts[0][0]:
        return pts[0][1]
    for (l0, r0), (l1, r1) in zip(pts, pts[1:]):
        if length <= l1:
            w = math.log(length / l0) / math.log(l1 / l0)
            return r0 + w * (r1 - r0)
    return pts[-1][1]


def attention_flops(s: AttnShape) -> float:
    """Forward + backward FLOPs of one step's attention (all layers): 3.5 * 4 B H S^2 D * visible."""
    return 3.5 * 4.0 * s.batch * s.heads * float(s.seq_len) ** 2 * s.head_dim * s.visible * s.layers


def ideal_time(s: AttnShape, c: Cluster) -> float:
    """The same kernel on one GPU at the whole length, divided by the GPUs: the 100%-efficiency time."""
    return attention_flops(s) / (c.gpus * kernel_tflops(c.kernel, s.seq_len) * 1e12)


def _bw(c: Cluster, span: int) -> float:
    """Bytes/s of the slowest hop of a group of ``span`` consecutive ranks."""
    return (c.intra_gbs if span <= c.gpus_per_node else c.inter_gbs) * 1e9


def _ring_terms(s: AttnShape, c: Cluster, n: int, heads: int, kv_heads: int, bw: float, cal: Calib) -> dict:
    """The ring's time split into its parts (seconds, all layers) for ``n`` ranks, ``S/n`` tokens each."""
    T = s.seq_len / n
    share = FWD_SHARE[c.kernel]
    step = 3.5 * 4.0 * s.batch * heads * T * T * s.head_dim * s.visible / (kernel_tflops(c.kernel, T) * 1e12)
    cf, cb = share * step, (1 - share) * step
    kv = 2.0 * s.batch * T * kv_heads * s.head_dim  # K and V elements of one shard
    m_kv = kv * s.dtype_bytes / bw
    m_b = m_kv + (kv * cal.grad_bytes / bw) * (n - 2) / (n - 1) if n > 1 else 0.0
    parts = {"kernel": n * step,
             "exposed_comm": (n - 1) * (max(cf, m_kv) - cf + max(cb, m_b) - cb),
             "contention": cal.gamma * (n - 1) * (m_kv + m_b),
             "last_hop": m_kv if n > 1 else 0.0,
             "merge": n * cal.beta_bytes * s.batch * T * heads * s.head_dim / (c.hbm_gbs * 1e9),
             "fixed": n * (cal.alpha_s + (cal.inter_latency_s if bw < c.intra_gbs * 1e9 else 0.0))}
    return {k: v * s.layers for k, v in parts.items()}


def _a2a(s: AttnShape, c: Cluster, u: int, kv_heads: int, cal: Calib) -> float:
    """Ulysses' 8 all-to-alls (q, k, v, out; dout, dq, dk, dv) over ``u`` consecutive ranks holding ``S/N``
    tokens each (seconds, all layers). Traffic to ranks in other nodes goes over the inter-node link."""
    if u <= 1:
        return 0.0
    elems = s.batch * (s.seq_len / c.gpus) * s.head_dim * 2 * (s.heads + kv_heads)  # fwd; bwd the same
    out = 2 * elems * s.dtype_bytes * (u - 1) / u
    in_node = min(u, c.gpus_per_node) - 1
    bw_in, bw_out = (cal.coll_eff * x * 1e9 for x in (c.intra_gbs, c.inter_gbs))
    t = max(out * in_node / (u - 1) / bw_in, out * (u - 1 - in_node) / (u - 1) / bw_out)
    lat = cal.coll_latency_s if u <= c.gpus_per_node else cal.inter_latency_s
    return (t + 8 * lat) * s.layers


def _ulysses_kv(s: AttnShape, u: int) -> Optional[int]:
    """KV heads after replication for a Ulysses degree ``u`` (None when the heads do not split)."""
    if s.heads % u:
        return None
    if s.hk % u == 0:
        return s.hk
    return u if u % s.hk == 0 else None


def mode_time(mode: str, s: AttnShape, c: Cluster, cal: Calib = DEFAULT, *, ulysses: Optional[int] = None) -> dict:
    """Predicted time of one ``mode`` (seconds, fwd+bwd, all layers) and its parts; ``{"time": inf, "why": ...}``
    when the shapes cannot use it. ``ulysses``: the hybrid's Ulysses degree (default: the best one)."""
    n = c.gpus
    if mode == "ring":
        parts = _ring_terms(s, c, n, s.heads, s.hk, _bw(c, n), cal)
    elif mode == "ulysses":
        kv = _ulysses_kv(s, n)
        if kv is None:
            return {"time": math.inf, "why": f"heads {s.heads}/{s.hk} do not split over {n} GPUs"}
        t_k = attention_flops(s) / (n * kernel_tflops(c.kernel, s.seq_len) * 1e12)
        ch = ulysses_chunks(kv, n, cal)
        # fwd (q, k, v in; out back) and bwd (dout in; dq, dk, dv back) move the same bytes; with ch chunks only the
        # first chunk's inputs and the last one's results are exposed, the rest hides behind the other chunks'
        # kernels (as far as they last), slowing them by gamma per second overlapped
        a = (_a2a(s, c, n, kv, cal) + 8 * (ch - 1) * cal.coll_latency_s * s.layers) / 2
        share = FWD_SHARE[c.kernel]
        exposed = sum(a / ch + max(0.0, a - comp) * (ch - 1) / ch for comp in (share * t_k, (1 - share) * t_k))
        parts = {"kernel": t_k, "exposed_comm": exposed, "contention": cal.gamma * (ch - 1) / ch * 2 * a}
    elif mode == "allgather":
        parts = _allgather(s, c, cal)
    elif mode == "hybrid":
        us = [ulysses] if ulysses else [u for u in range(2, min(n, c.gpus_per_node) + 1) if n % u == 0 and u < n]
        best = {"time": math.inf, "why": f"no Ulysses degree 1 < U < {n} within a node splits the heads"}
        for u in us:
            kv = _ulysses_kv(s, u)
            if kv is None or n % u:
                continue
            r = n // u
            p = _ring_terms(s, c, r, s.heads // u, kv // u,
                            _bw(c, n if r > 1 else u), cal)
            # the ring over R groups sees S/R tokens per rank, H/U heads: _ring_terms with n=r does exactly that
            p["a2a"] = _a2a(s, c, u, kv, cal)
            t = sum(p.values())
            if t < best["time"]:
                best = {"time": t, "parts": p, "ulysses": u}
        return best
    else:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return {"time": sum(parts.values()), "parts": parts}


def _allgather(s: AttnShape, c: Cluster, cal: Calib) -> dict:
    n = c.gpus
    if n == 1:
        return {"kernel": attention_flops(s) / (kernel_tflops(c.kernel, s.seq_len) * 1e12)}
    k = min(cal.slices, s.hk)  # the code never cuts more slices than KV heads
    bw = cal.coll_eff * _bw(c, n)
    cut = c.kernel in ALIGNED_CAUSAL_ONLY and s.visible == 0.5  # plain causal: each run cut in two calls
    kernel = "triton" if c.kernel in ALIGNED_CAUSAL_ONLY and s.visible < 1 and not cut else c.kernel
    t_k = attention_flops(s) / (n * kernel_tflops(kernel, s.seq_len / (RUNS * n)) * 1e12)
    cf, cb = FWD_SHARE[kernel] * t_k, (1 - FWD_SHARE[kernel]) * t_k
    kv = 2.0 * s.batch * s.seq_len * s.hk * s.head_dim * (n - 1) / n * s.layers
    g, r = kv * s.dtype_bytes / bw, kv * cal.grad_bytes / bw  # gather (fwd, again bwd); fp32 reduce-scatter
    exposed = g / k + max(0.0, g - cf) * (k - 1) / k + (g + r) / k + max(0.0, g + r - cb) * (k - 1) / k
    lat = (cal.coll_latency_s if n <= c.gpus_per_node else cal.inter_latency_s) * 3 * k * s.layers
    calls = 2 * RUNS * (2 if cut else 1) * k * cal.ag_call_s * s.layers
    return {"kernel": t_k, "calls": calls, "exposed_comm": exposed,
            "contention": cal.gamma * (k - 1) / k * (2 * g + r), "fixed": lat}


def predict(s: AttnShape, c: Cluster, cal: Calib = DEFAULT) -> dict:
    """``{mode: {"time", "efficiency", "parts" | "why"[, "ulysses"]}}`` for every mode (PREDICTIONS)."""
    ideal = ideal_time(s, c)
    out = {}
    for m in MODES:
        r = mode_time(m, s, c, cal)
        r["efficiency"] = ideal / r["time"] if math.isfinite(r["time"]) else 0.0
        out[m] = r
    return out


def best_of(s: AttnShape, c: Cluster, cal: Calib = DEFAULT) -> tuple:
    """(mode, prediction) with the smallest predicted time; ties go to the earlier mode in ``MODES``."""
    p = predict(s, c, cal)
    mode = min(MODES, key=lambda m: (p[m]["time"], MODES.index(m)))
    return mode, p[mode]


def best_mode(seq_len: int, *, gpus: int, heads: int, kv_heads: Optional[int] = None, head_dim: int = 128,
              batch: int = 1, causal: bool = True, visible: Optional[float] = None, gpus_per_node: int = 8,
              kernel: str = "sdpa_cudnn", intra_gbs: float = 328.0, inter_gbs: float = 50.0,
              dtype_bytes: int = 2) -> str:
    """The mode (one of ``MODES``) with the smallest predicted attention time for this shape on ``gpus``
    context-parallel GPUs (``gpus_per_node`` on NVLink). Plain numbers only; used by ``parallel.cp_comm=auto``.

    ``visible`` overrides the visible-pair fraction (default 0.5 causal, 1.0 otherwise); ``kernel`` one of
    ``KERNEL_TFLOPS``. A mode the heads cannot use is never returned; ``ring`` always works."""
    s = AttnShape(seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch,
                  dtype_bytes=dtype_bytes, visible=visible if visible is not None else (0.5 if causal else 1.0))
    c = Cluster(gpus=gpus, gpus_per_node=gpus_per_node, intra_gbs=intra_gbs, inter_gbs=inter_gbs, kernel=kernel)
    return best_of(s, c)[0]


def efficiency(mode: str, kernel: str, gpus: int, seq_len: int, kv_heads: int = 32, cal: Calib = DEFAULT) -> float:
    """Predicted efficiency of ``mode`` in the measured benchmark's shape (B=1 H=32 D=128 causal bf16; the
    hybrid at the measured U=2)."""
    s, c = AttnShape(seq_len=seq_len, kv_heads=kv_heads), Cluster(gpus=gpus, kernel=kernel)
    u = HYBRID_MEASURED_U if mode == "hybrid" else None
    return ideal_time(s, c) / mode_time(mode, s, c, cal, ulysses=u)["time"]


def ring_efficiency(kernel: str, gpus: int, seq_len: int, cal: Calib = DEFAULT) -> float:
    """Predicted efficiency of the ring in the measured benchmark's shape (B=1 H=32 D=128 causal bf16)."""
    return efficiency("ring", kernel, gpus, seq_len, 32, cal)


FITTED = ("beta_bytes", "gamma", "ag_call_s")  # linear in the time; coll_eff is searched on a grid


def calibrate(points=MEASURED, base: Calib = DEFAULT) -> Calib:
    """Least-squares fit to the measured times ``ideal / efficiency`` (relative errors) of every mode: for each
    ``coll_eff`` on a 0.005 grid in [0.2, 1] the model is linear in (beta, gamma, ag_call_s), ``t = t0 + beta b +
    gamma g + call c``, solved by least squares (clipped at 0); the grid point with the smallest squared error
    wins. ``alpha`` and the latencies are kept from ``base`` (numpy, host only)."""
    import numpy as np

    best, chunks = None, base.ulysses_chunks
    base = dataclasses.replace(base, ulysses_chunks=MEASURED_CHUNKS)  # as the measured rows ran
    for eff in np.arange(0.2, 1.0 + 1e-9, 0.005):
        zero = dataclasses.replace(base, coll_eff=float(eff), **{f: 0.0 for f in FITTED})
        rows, rhs = [], []
        for mode, kernel, n, S, hk, e in points:
            s, c = AttnShape(seq_len=S, kv_heads=hk), Cluster(gpus=n, kernel=kernel)
            u = HYBRID_MEASURED_U if mode == "hybrid" else None
            t0 = mode_time(mode, s, c, zero, ulysses=u)["time"]
            cols = [mode_time(mode, s, c, dataclasses.replace(zero, **{f: 1.0}), ulysses=u)["time"] - t0
                    for f in FITTED]
            rows.append([x / t0 for x in cols])
            rhs.append((ideal_time(s, c) / e - t0) / t0)
        a, y = np.array(rows), np.array(rhs)
        sol = np.clip(np.linalg.lstsq(a, y, rcond=None)[0], 0.0, None)
        err = float(np.sum((a @ sol - y) ** 2))
        if best is None or err < best[0]:
            best = (err, float(eff), sol)
    _, eff, sol = best
    return dataclasses.replace(base, coll_eff=eff, ulysses_chunks=chunks, **{f: float(x) for f, x in zip(FITTED, sol)})


def fit_table(cal: Calib = DEFAULT, points=MEASURED) -> list:
    """Per measured point: measured and predicted efficiency (the code as it ran then: Ulysses unchunked) and the
    error (percentage points)."""
    out, cal = [], dataclasses.replace(cal, ulysses_chunks=MEASURED_CHUNKS)
    for mode, kernel, n, S, hk, eff in points:
        pred = efficiency(mode, kernel, n, S, hk, cal)
        out.append({"mode": mode, "kernel": kernel, "gpus": n, "tokens": S, "kv_heads": hk, "measured": eff,
                    "predicted": pred, "error_pp": 100 * (pred - eff)})
    return out


def fit_error(cal: Calib = DEFAULT, points=MEASURED) -> tuple:
    """(mean |error|, worst |error|) in percentage points over ``points``."""
    e = [abs(r["error_pp"]) for r in fit_table(cal, points)]
    return sum(e) / len(e), max(e)
