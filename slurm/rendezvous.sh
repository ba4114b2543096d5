#!/usr/bin/env bash
# Rendezvous settings of a multi-node job, rendered from the Slurm environment (sourced by seqpar.sbatch;
# tests call it with a fake `scontrol` on PATH):
#   source slurm/rendezvous.sh && eval "$(seqpar_rendezvous)" && echo "$RDZV_ENDPOINT"
# Prints KEY=VALUE lines: NNODES, NPROC_PER_NODE, RDZV_ENDPOINT (first node of the job, c10d store),
# RDZV_ID (the job id: a requeued job keeps it, and every node of one job agrees on it), LOG_DIR.
# NPROC_PER_NODE: SEQPAR_NPROC_PER_NODE (or its older name SEQPAR_GPUS_PER_NODE), else the GPUs Slurm gave this
# node; a job without GPUs (--gpus-per-node=0, CPU processes on gloo) must name it: there is nothing to count.
# Other overrides: SEQPAR_RDZV_PORT, SEQPAR_LOG_DIR.

seqpar_rendezvous() {
  local nodelist=${SLURM_JOB_NODELIST:-}
  if [ -z "$nodelist" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "seqpar: SLURM_JOB_NODELIST / SLURM_JOB_ID are not set; run this inside a Slurm job (sbatch)." >&2
    return 1
  fi
  local head
  # scontrol expands compressed lists (node[003-004,7]); the first host runs the c10d store.
  head=$(scontrol show hostnames "$nodelist" | head -n 1)
  if [ -z "$head" ]; then
    echo "seqpar: 'scontrol show hostnames $nodelist' gave no host; check the job's node list." >&2
    return 1
  fi
  local nproc=${SEQPAR_NPROC_PER_NODE:-${SEQPAR_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
  if [ -z "$nproc" ] && [ "${SLURM_GPUS_PER_NODE:-}" = 0 ]; then
    echo "seqpar: this job has no GPUs (--gpus-per-node=0); set SEQPAR_NPROC_PER_NODE to the number of CPU" \
         "(gloo) processes per node, e.g. SEQPAR_NPROC_PER_NODE=2 sbatch --gpus-per-node=0 ..." >&2
    return 1
  fi
  echo "NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
  echo "NPROC_PER_NODE=${nproc:-8}"
  echo "RDZV_ENDPOINT=$head:${SEQPAR_RDZV_PORT:-29500}"
  echo "RDZV_ID=$SLURM_JOB_ID"
  echo "LOG_DIR=${SEQPAR_LOG_DIR:-logs/${SLURM_JOB_NAME:-seqpar}-$SLURM_JOB_ID}"
}
