"""Measurements the cost model (:mod:`seqpar.parallel.cost`) is built on: single-GPU kernel rates and the measured
efficiency of every context-parallel mode on H200s. Data only: plain numbers, nothing imported.
"""
from __future__ import annotations

# Single-GPU fwd+bwd causal TFLOP/s per kernel vs call length in tokens (H200, bf16, H=32, D=128): averages of
# /work/shared/DEVICE.md and the single-GPU rows of benchmarks/results/ring_*.md, x4_2026-11-28, issue12_before_after.
KERNEL_TFLOPS = {
    "sdpa_cudnn": ((16384, 530.0), (32768, 549.0), (65536, 555.0), (131072, 538.0), (262144, 525.0), (524288, 515.0)),
    "sdpa_flash": ((16384, 318.0), (32768, 325.0), (65536, 327.0), (131072, 322.0)),
    "triton": ((16384, 399.0), (32768, 388.0), (65536, 404.0), (131072, 402.0)),
}
# Forward's share of the fwd+bwd kernel time: (1/3.5) * rate(fwd+bwd) / rate(fwd), from the same tables.
FWD_SHARE = {"sdpa_cudnn": 0.26, "sdpa_flash": 0.27, "triton": 0.23}

# Measured efficiencies the model is fitted to (zigzag, causal fwd+bwd, B=1 H=32 D=128 bf16; efficiency = per-GPU
# TFLOP/s / the same kernel on one GPU over the whole sequence): (mode, kernel, GPUs, total tokens, KV heads, eff).
# Ring before the fused merge (ring_NVIDIA-H200_x2_2026-11-22.md, x4_2026-11-28/, issue12_before_after/; means):
RING_OLD = (
    ("sdpa_cudnn", 2, 32768, 0.86), ("sdpa_cudnn", 2, 65536, 0.92), ("sdpa_cudnn", 2, 131072, 0.98),
    ("sdpa_cudnn", 2, 262144, 1.01), ("sdpa_cudnn", 2, 524288, 1.02), ("sdpa_cudnn", 4, 131072, 0.93),
    ("sdpa_cudnn", 4, 262144, 0.99), ("sdpa_cudnn", 4, 524288, 1.01),
    ("sdpa_flash", 2, 32768, 0.91), ("sdpa_flash", 2, 65536, 0.95), ("sdpa_flash", 2, 131072, 0.985),
    ("sdpa_flash", 4, 131072, 0.96),
    ("triton", 2, 32768, 0.93), ("triton", 2, 65536, 0.95), ("triton", 2, 131072, 0.98), ("triton", 4, 131072, 0.95),
)
# 2026-11-28, fused ring merge: session4_2026-11-28/ring_fused_merge/ (2 GPUs, 32k), ring_1m/log.txt (1M tokens),
# and the same-run table of every mode, session4_2026-11-28/cp_modes/cp_modes_NVIDIA-H200_x4_2026-11-28.json
# (hybrid: Ulysses over 2 consecutive ranks x ring over 2; all-gather runs Triton only).
ROWS_2026_11_28 = (
    ("ring", "sdpa_cudnn", 2, 32768, 32, 0.91), ("ring", "sdpa_flash", 2, 32768, 32, 0.94),
    ("ring", "triton", 2, 32768, 32, 0.93),
    ("ring", "sdpa_cudnn", 2, 1048576, 32, 1.013), ("ring", "sdpa_cudnn", 4, 1048576, 32, 1.028),
    ("ring", "sdpa_cudnn", 2, 32768, 32, 0.904), ("ring", "triton", 2, 32768, 32, 0.901),
    ("ring", "sdpa_cudnn", 4, 32768, 32, 0.686), ("ring", "triton", 4, 32768, 32, 0.782),
    ("ring", "sdpa_cudnn", 2, 32768, 8, 0.917), ("ring", "triton", 2, 32768, 8, 0.951),
    ("ring", "sdpa_cudnn", 4, 32768, 8, 0.827), ("ring", "triton", 4, 32768, 8, 0.898),
    ("ulysses", "sdpa_cudnn", 2, 32768, 32, 0.859), ("ulysses", "triton", 2, 32768, 32, 0.912),
    ("ulysses", "sdpa_cudnn", 4, 32768, 32, 0.835), ("ulysses", "triton", 4, 32768, 32, 0.899),
    ("ulysses", "sdpa_cudnn", 2, 32768, 8, 0.876), ("ulysses", "triton", 2, 32768, 8, 0.955),
    ("ulysses", "sdpa_cudnn", 4, 32768, 8, 0.856), ("ulysses", "triton", 4, 32768, 8, 0.932),
    ("allgather", "triton", 2, 32768, 32, 0.734), ("allgather", "triton", 4, 32768, 32, 0.588),
    ("allgather", "triton", 2, 32768, 8, 0.784), ("allgather", "triton", 4, 32768, 8, 0.707),
    ("hybrid", "sdpa_cudnn", 4, 32768, 32, 0.788), ("hybrid", "triton", 4, 32768, 32, 0.794),
    ("hybrid", "sdpa_cudnn", 4, 32768, 8, 0.824), ("hybrid", "triton", 4, 32768, 8, 0.866),
)
# session6_2026-11-28/ (cuDNN, long sequences; efficiency against the same run's single-GPU row): 4 GPUs
# modes_x4/cp_modes_NVIDIA-H200_x4_2026-11-28.json (hybrid: Ulysses 2 x ring 2); 2 GPUs at 128k/256k
# modes_x2/cp_modes_x2_128k_256k_printed.md (single ms / (2 x mode ms)), at 512k
# modes_x2/cp_modes_NVIDIA-H200_x2_2026-11-28.json.
# Held out first: the constants fitted without them erred 1.81 pp mean, 3.2 worst (cost_model/cost_calibration.md).
ROWS_SESSION6 = (
    ("ring", "sdpa_cudnn", 4, 131072, 32, 0.9451), ("ulysses", "sdpa_cudnn", 4, 131072, 32, 0.9325),
    ("hybrid", "sdpa_cudnn", 4, 131072, 32, 0.9486), ("ring", "sdpa_cudnn", 4, 131072, 8, 0.9620),
    ("ulysses", "sdpa_cudnn", 4, 131072, 8, 0.9514), ("hybrid", "sdpa_cudnn", 4, 131072, 8, 0.9589),
    ("ring", "sdpa_cudnn", 4, 262144, 32, 0.9875), ("ulysses", "sdpa_cudnn", 4, 262144, 32, 0.9608),
    ("hybrid", "sdpa_cudnn", 4, 262144, 32, 0.9747), ("ring", "sdpa_cudnn", 4, 262144, 8, 1.0026),
    ("ulysses", "sdpa_cudnn", 4, 262144, 8, 0.9638), ("hybrid", "sdpa_cudnn", 4, 262144, 8, 0.9968),
    ("ring", "sdpa_cudnn", 2, 131072, 32, 0.9787), ("ulysses", "sdpa_cudnn", 2, 131072, 32, 0.9437),
    ("ring", "sdpa_cudnn", 2, 262144, 32, 1.0130), ("ulysses", "sdpa_cudnn", 2, 262144, 32, 0.9643),
    ("ring", "sdpa_cudnn", 2, 524288, 32, 1.0282), ("ulysses", "sdpa_cudnn", 2, 524288, 32, 0.9916),
)
MEASURED = tuple(("ring", k, n, s, 32, e) for k, n, s, e in RING_OLD) + ROWS_2026_11_28 + ROWS_SESSION6
HYBRID_MEASURED_U = 2  # the Ulysses degree of the measured hybrid rows
