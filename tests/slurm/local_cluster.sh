#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests (tests/e2e/test_slurm_cluster.py) and for trying
# slurm/seqpar.sbatch by hand. Debian's slurm-wlm (slurmctld + slurmd) and munge, started as plain daemons: no
# systemd, no cgroups (proctrack/linuxproc, task/none), everything private under one folder, so a system
# Slurm or munge on the machine is neither used nor disturbed.
#
#   bash tests/slurm/local_cluster.sh up       # install if missing (root + apt), start, or reuse a running one
#   export SLURM_CONF=/tmp/seqpar-slurm/slurm.conf   # then sbatch / squeue / scontrol talk to it
#   bash tests/slurm/local_cluster.sh down     # stop the daemons (the folder stays, for the logs)
#   bash tests/slurm/local_cluster.sh status
#
# `up` prints `SLURM_CONF=<path>` and `cluster: started` or `cluster: reused` last; it exits 77 when the
# packages are missing and cannot be installed (not root, no apt-get, apt failed): the tests skip then, with this
# script's message. Any other failure exits 1 with the daemons' log tails.
# Settings: SEQPAR_SLURM_DIR (folder, default /tmp/seqpar-slurm), SEQPAR_SLURM_PORT (slurmctld; slurmd uses +1,
# default 16817: away from a real cluster's 6817/6818).
set -uo pipefail
BASE=${SEQPAR_SLURM_DIR:-/tmp/seqpar-slurm}
PORT=${SEQPAR_SLURM_PORT:-16817}
CONF=$BASE/slurm.conf
SOCKET=$BASE/munge/munge.socket
HOST=$(hostname -s)
export SLURM_CONF=$CONF PATH=$PATH:/usr/sbin  # Debian puts the daemons in /usr/sbin

die() { echo "local_cluster: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the daemon recorded there is running
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

install_packages() {
  local missing=0 cmd
  for cmd in munged slurmctld slurmd sbatch scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
  done
  [ "$missing" = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "local_cluster: slurm-wlm/munge are not installed and this is not root: cannot apt-get install them" >&2
    exit 77
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "local_cluster: slurm-wlm/munge are not installed and there is no apt-get to install them" >&2
    exit 77
  fi
  echo "local_cluster: installing slurm-wlm and munge (apt-get)"
  # --no-install-recommends: 9 packages, ~4 MB (the recommended plugins would add 34 more: HDF5, IPMI, ROCm SMI...).
  if ! { apt-get update -q >"$BASE/apt.log" 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
           >>"$BASE/apt.log" 2>&1; }; then
    echo "local_cluster: apt-get install slurm-wlm munge failed:" >&2
    tail -n 5 "$BASE/apt.log" >&2
    exit 77
  fi
}

write_config() {
  # The node as slurmd sees the hardware (CPUs, sockets, cores, threads, RealMemory from /proc/meminfo).
  local node
  node=$(slurmd -C 2>/dev/null | head -n 1)
  case "$node" in
    NodeName=*) ;;
    *) node="NodeName=$HOST CPUs=$(nproc) RealMemory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))";;
  esac
  NODE=${node%% *}
  NODE=${NODE#NodeName=}
  cat >"$CONF.new" <<EOF
# Written by tests/slurm/local_cluster.sh: a one-node test cluster (no cgroups, no accounting database).
ClusterName=seqpar-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
MailProg=/bin/true
PlugStackConfig=$BASE/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$BASE/plugstack.conf"
  mv -f "$CONF.new" "$CONF"
}

start_munge() {
  alive "$BASE/munge/munged.pid" && return 0
  mkdir -p "$BASE/munge" && chmod 0755 "$BASE/munge"
  if [ ! -s "$BASE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none || die "cannot write the munge key"
    chmod 0400 "$BASE/munge/munge.key"
  fi
  # --force: start even where munged finds a folder above SEQPAR_SLURM_DIR too open (a throwaway test key).
  munged --force --socket="$SOCKET" --key-file="$BASE/munge/munge.key" --pid-file="$BASE/munge/munged.pid" \
    --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed" </dev/null >>"$BASE/log/munged.log" 2>&1 \
    || { tail -n 5 "$BASE/log/munged.log" >&2; die "munged did not start"; }
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local secs=$1 what=$2
  shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      echo "local_cluster: $what not reached within ${secs}s; log tails:" >&2
      tail -n 15 "$BASE"/log/*.log >&2
      exit 1
    fi
    sleep 0.2
  done
}

node_ready() {  # registered and schedulable (idle, or running an earlier caller's job)
  case "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac
}
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

up() {
  mkdir -p "$BASE/log" "$BASE/state" "$BASE/spool"
  install_packages
  if alive "$BASE/slurmctld.pid" && alive "$BASE/slurmd.pid" && alive "$BASE/munge/munged.pid" && [ -s "$CONF" ] \
      && ctld_up; then
    NODE=$(sed -n 's/^PartitionName=.* Nodes=\([^ ]*\) .*/\1/p' "$CONF")
    wait_for 30 "node $NODE ready" node_ready
    echo "SLURM_CONF=$CONF"
    echo "cluster: reused"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "local_cluster: not root: cannot start slurmctld/slurmd (this one-node test cluster runs them as root)" >&2
    exit 77
  fi
  down quiet
  # The node's name must resolve: the sbatch script's c10d rendezvous runs on it (scontrol show hostnames).
  if ! getent hosts "$HOST" >/dev/null; then
    [ -w /etc/hosts ] || die "hostname $HOST does not resolve and /etc/hosts is not writable"
    echo "127.0.0.1 $HOST  # added by seqpar tests/slurm/local_cluster.sh" >>/etc/hosts
  fi
  write_config
  start_munge
  # -c: start from a clean state (no jobs of an earlier cluster come back); -i: ignore unreadable state.
  slurmctld -c -i -f "$CONF" </dev/null >>"$BASE/log/slurmctld.out" 2>&1 || die "slurmctld did not start: $(tail -n 5 "$BASE/log/slurmctld.out")"
  wait_for 30 "slurmctld up" ctld_up
  slurmd -N "$NODE" -f "$CONF" </dev/null >>"$BASE/log/slurmd.out" 2>&1 || die "slurmd did not start: $(tail -n 5 "$BASE/log/slurmd.out")"
  wait_for 30 "node $NODE ready" node_ready
  echo "SLURM_CONF=$CONF"
  echo "cluster: started"
}

down() {
  local f pid pids=()
  # All at once: each daemon takes ~2 s to wind down on TERM.
  for f in "$BASE/slurmd.pid" "$BASE/slurmctld.pid" "$BASE/munge/munged.pid"; do
    pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  rm -f "$BASE/slurmd.pid" "$BASE/slurmctld.pid" "$BASE/munge/munged.pid"
  [ "${1:-}" = quiet ] || echo "cluster: stopped"
}

status() {
  alive "$BASE/slurmctld.pid" && alive "$BASE/slurmd.pid" && ctld_up || { echo "cluster: down"; return 1; }
  sinfo
  squeue
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
