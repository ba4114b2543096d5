#!/usr/bin/env bash
# Local multi-process launch: N GPUs (NCCL), or N CPU processes on gloo when no GPU is visible.
#   bash launch/torchrun.sh 8 experiment=... key=value
#   bash launch/torchrun.sh 2 experiment=cpu_cp2          # ring attention over 2 CPU processes
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}
shift
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
# Never use NVLink multicast (NVLS): it can take shared GPUs out of service on some hosts.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py "$@"
