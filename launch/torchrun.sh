#!/usr/bin/env bash
# Local multi-process launch: N GPUs (NCCL), or N CPU processes on gloo when no GPU is visible.
#   bash launch/torchrun.sh 8 experiment=... key=value
#   bash launch/torchrun.sh 2 experiment=cpu_cp2          # ring attention over 2 CPU processes
#   bash launch/torchrun.sh 2 experiment=llama3-1b_cp2_64k  # 64k tokens over 2 GPUs (FSDP2 + ring)
#   python train.py --dry-run experiment=...              # mesh + per-GPU memory estimate, no launch
# Runs torchrun through `python -m seqpar.launch`, which exits with the workers' code and one line instead of
# torchrun's traceback: 0 finished, 1 crash, 2 user error, 3 stopped and saved (requeue), 4 diverged.
# `kill -TERM <launcher pid>` or Ctrl-C: forwarded to every worker, which agree on a step, checkpoint
# (checkpoint.every > 0) and exit 3 within torchrun's grace (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}
shift
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
# Never use NVLink multicast (NVLS): it can take shared GPUs out of service on some hosts.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m seqpar.launch --standalone --nproc_per_node="$NPROC" train.py "$@"
