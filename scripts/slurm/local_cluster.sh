#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing scripts/slurm/dde_train.sbatch
# (tests/slurm). Debian 12 (Slurm 22.05), run as root, no systemd and no cgroups needed.
#
#   bash scripts/slurm/local_cluster.sh start    # install (once), configure, start, wait for idle
#   bash scripts/slurm/local_cluster.sh status   # daemons, sinfo, squeue
#   bash scripts/slurm/local_cluster.sh stop     # cancel this cluster's jobs, stop the daemons
#   bash scripts/slurm/local_cluster.sh env      # prints `export SLURM_CONF=...` for the clients
#
# Everything lives in $DDE_SLURM_DIR (default /tmp/dde-slurm): slurm.conf, state, spool, logs,
# pid files. Clients (sbatch, squeue, scontrol, ...) need SLURM_CONF=$DDE_SLURM_DIR/slurm.conf.
# munged uses the system paths (/etc/munge/munge.key, /run/munge); it is started only when no
# munged answers already, and `stop` stops it only if `start` started it.
# Job state is kept across stop/start (job ids keep increasing, so the per-job MASTER_PORT of
# dde_train.sbatch differs between runs); MinJobAge=3600 keeps finished jobs in
# `scontrol show job` for an hour (there is no slurmdbd, so no sacct).
set -euo pipefail

DIR="${DDE_SLURM_DIR:-/tmp/dde-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
export SLURM_CONF="$CONF"
START_TIMEOUT="${DDE_SLURM_START_TIMEOUT:-60}"

log() { echo "local_cluster: $*" >&2; }

dump_logs() {
  local f
  for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$DIR/log/munged.log"; do
    [[ -f "$f" ]] || continue
    echo "----- tail of $f" >&2
    tail -n 40 "$f" >&2
  done
}

die() {
  log "ERROR: $*"
  dump_logs
  exit 1
}

alive() {  # alive PID: running, not a zombie (no init may reap the daemons in a container)
  kill -0 "$1" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

pid_alive() {  # pid_alive PIDFILE
  [[ -s "$1" ]] && alive "$(cat "$1")"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
     command -v munged >/dev/null; then
    return
  fi
  [[ $EUID -eq 0 ]] || die "slurm-wlm/munge are missing and installing them needs root"
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurm-wlm munge >"$DIR/log/apt.log" 2>&1 || {
    apt-get update >>"$DIR/log/apt.log" 2>&1
    apt-get install -y --no-install-recommends slurm-wlm munge >>"$DIR/log/apt.log" 2>&1
  } || die "apt-get install slurm-wlm munge failed (see $DIR/log/apt.log)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then return; fi
  local key=/etc/munge/munge.key
  if [[ ! -s "$key" ]]; then
    log "creating $key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$key" --force
    else
      dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge /etc/munge "$key"
  chmod 700 /etc/munge
  chmod 400 "$key"
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  # As the munge user when possible (its normal mode); as root with --force otherwise.
  touch "$DIR/log/munged.log"
  chown munge:munge "$DIR/log/munged.log"
  if command -v runuser >/dev/null && runuser -u munge -- /usr/sbin/munged --log-file="$DIR/log/munged.log" \
       --pid-file=/run/munge/munged.pid 2>>"$DIR/log/munged.log"; then
    :
  else
    /usr/sbin/munged --force --log-file="$DIR/log/munged.log" --pid-file=/run/munge/munged.pid \
      2>>"$DIR/log/munged.log" || die "munged did not start"
  fi
  cp /run/munge/munged.pid "$DIR/munged.pid"  # ours: `stop` ends it
  local i
  for ((i = 0; i < 50; i++)); do munge_ok && return; sleep 0.1; done
  die "munged started but munge -n | unmunge fails"
}

write_conf() {
  local cpus mem
  # nproc honours OMP_NUM_THREADS (the tests set it to 1): count the CPUs without it.
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  cat >"$CONF.new" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node test cluster (no cgroups, no slurmdbd).
ClusterName=dde-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${DDE_SLURMCTLD_PORT:-6817}
SlurmdPort=${DDE_SLURMD_PORT:-6818}
AuthType=auth/munge
# A requeued job becomes eligible again only after the credential lifetime (default 120 s):
# short here so that the requeue test restarts quickly.
AuthInfo=cred_expire=${DDE_SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
UnkillableStepTimeout=60
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
SlurmctldTimeout=60
MessageTimeout=20
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
}

node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1; }

start() {
  mkdir -p "$DIR/log" "$DIR/state" "$DIR/spool"
  chmod 755 "$DIR"
  install_packages
  start_munge
  write_conf
  if pid_alive "$DIR/slurmctld.pid"; then
    scontrol reconfigure >/dev/null 2>&1 || true
  else
    slurmctld -f "$CONF" || die "slurmctld did not start"
  fi
  local i
  for ((i = 0; i < START_TIMEOUT * 5; i++)); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer scontrol ping"
  if ! pid_alive "$DIR/slurmd.pid"; then
    slurmd -f "$CONF" || die "slurmd did not start"
  fi
  local state=""
  for ((i = 0; i < START_TIMEOUT * 2; i++)); do
    state="$(node_state)"
    case "$state" in
      idle | mixed | allocated) break ;;
      drain* | down* | fail*)
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  case "$state" in
    idle | mixed | allocated) ;;
    *) die "node $HOST is '$state' after ${START_TIMEOUT} s (sinfo: $(sinfo -N 2>&1 | tr '\n' ' '))" ;;
  esac
  log "up: node $HOST $state; export SLURM_CONF=$CONF"
}

wait_gone() {  # wait_gone SECONDS PID...: true once none of the pids is alive
  local i p any
  for ((i = 0; i < $1 * 5; i++)); do
    any=0
    for p in "${@:2}"; do alive "$p" && any=1; done
    [[ $any -eq 0 ]] && return 0
    sleep 0.2
  done
  return 1
}

stop() {
  # The daemons delete their pid files while shutting down: read the pids first.
  local ctld="" slurmd="" munged="" i p
  pid_alive "$DIR/slurmctld.pid" && ctld="$(cat "$DIR/slurmctld.pid")"
  pid_alive "$DIR/slurmd.pid" && slurmd="$(cat "$DIR/slurmd.pid")"
  pid_alive "$DIR/munged.pid" && munged="$(cat "$DIR/munged.pid")"
  if [[ -n "$ctld" ]]; then
    # Every job of this private cluster was submitted by its tests: cancel them, and let their
    # slurmstepd finish (it needs slurmd and munged) before the daemons go.
    local jobs
    jobs="$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [[ -n "${jobs// /}" ]] && { scancel $jobs 2>/dev/null || true; }
    for ((i = 0; i < 150; i++)); do
      if [[ -z "$(squeue -h -o '%i' -t running,completing,pending,configuring,suspended 2>/dev/null)" ]] &&
         ! pgrep -x slurmstepd >/dev/null; then
        break
      fi
      sleep 0.2
    done
    scontrol shutdown >/dev/null 2>&1 || kill "$ctld" 2>/dev/null || true
  elif [[ -n "$slurmd" ]]; then
    kill "$slurmd" 2>/dev/null || true
  fi
  for p in $ctld $slurmd; do
    wait_gone 30 "$p" || { log "pid $p still alive after 30 s: SIGKILL"; kill -9 "$p" 2>/dev/null || true; }
  done
  if [[ -n "$munged" ]]; then
    kill "$munged" 2>/dev/null || true
    wait_gone 10 "$munged" || kill -9 "$munged" 2>/dev/null || true
  fi
  rm -f "$DIR/slurmctld.pid" "$DIR/slurmd.pid" "$DIR/munged.pid"
  log "stopped"
}

status() {
  local name f rc=0
  for name in slurmctld slurmd munged; do
    f="$DIR/$name.pid"
    if pid_alive "$f"; then echo "$name: running (pid $(cat "$f"))"
    elif [[ $name == munged ]] && munge_ok; then echo "munged: running (not started by this script)"
    else echo "$name: not running"; rc=1; fi
  done
  echo "SLURM_CONF=$CONF"
  if [[ $rc -eq 0 ]]; then sinfo -N -l || rc=1; squeue || rc=1; fi
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (DDE_SLURM_DIR=${DIR})" >&2; exit 2 ;;
esac
