#!/usr/bin/env bash
# Bring up (or reuse) a one-node Slurm cluster on localhost for the launch tests, and print its slurm.conf path.
#   tests/cluster/slurm_up.sh            # then: export SLURM_CONF=<printed path>; sinfo; sbatch ...
#   tests/cluster/slurm_down.sh          # stop it
# Installs Debian's slurm-wlm + munge if missing. The node is "localhost" with 2 CPUs. Everything lives under
# $MEGADISTIL_SLURM_DIR (default /var/tmp/megadistil-slurm), so a later run finds the daemons up and reuses them.
# Settings that work in containers/gVisor sandboxes: no cgroups (proctrack/linuxproc, task/none), daemons and
# jobs as root, no accounting database.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${MEGADISTIL_SLURM_DIR:-/var/tmp/megadistil-slurm}
CPUS=${MEGADISTIL_SLURM_CPUS:-2}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

"$HERE/install_packages.sh" slurm
mkdir -p "$DIR"/{state,spool,log}
exec 9>"$DIR/.lock"
flock -w 120 9 || { echo "slurm_up.sh: another bring-up holds $DIR/.lock" >&2; exit 1; }

CTL_HOST=$(hostname -s)
conf() {
  cat <<CONF
# written by tests/cluster/slurm_up.sh
ClusterName=megadistil-test
SlurmctldHost=$CTL_HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemons() {
  for d in slurmd slurmctld; do
    if alive "$DIR/$d.pid"; then kill "$(cat "$DIR/$d.pid")"; fi
  done
  for _ in $(seq 50); do alive "$DIR/slurmd.pid" || alive "$DIR/slurmctld.pid" || return 0; sleep 0.1; done
}

if [[ ! -f $CONF ]] || ! diff -q <(conf) "$CONF" >/dev/null; then
  stop_daemons
  conf > "$CONF"
fi

# munged: one per machine; its socket is where every munge client looks.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || create-munge-key -f
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --force 9>&-
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" 9>&-  # daemons must not inherit the lock
alive "$DIR/slurmd.pid" || slurmd -f "$CONF" -N localhost 9>&-

state=""
for _ in $(seq 300); do
  state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
  case $state in
    idle|mix|alloc|comp) echo "$CONF"; exit 0 ;;
    down*|drain*|drng*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  sleep 0.1
done
echo "slurm_up.sh: node 'localhost' is not idle after 30 s (state '${state:-none}'); logs in $DIR/log:" >&2
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
