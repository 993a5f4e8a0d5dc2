#!/bin/bash
# A real single-node Slurm on localhost for tests and CI (as root; Debian's slurm-wlm and munge).
#   cluster/local_slurm.sh install       apt-get install the packages
#   cluster/local_slurm.sh start DIR     munged + slurmctld + slurmd with state under DIR
#   cluster/local_slurm.sh stop DIR
set -euo pipefail
# start and stop refuse to touch a Slurm that is not this script's own (a real cluster node's):
# start would overwrite its slurm.conf, stop would kill its daemons.
cmd=${1:?install|start|stop}
dir=${2:-/tmp/meme_scale_slurm}
conf=/etc/slurm/slurm.conf
ours() { [ ! -e "$conf" ] || grep -qx 'ClusterName=meme_scale_local' "$conf"; }
refuse() {
  echo "$0: $conf belongs to another Slurm (not ClusterName=meme_scale_local): refusing to $1 it." >&2
  echo "This script is only for a machine without a real Slurm (tests, CI)." >&2
  exit 3
}

case "$cmd" in
install)
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  ;;
start)
  ours || refuse "overwrite"
  if [ ! -e "$conf" ] && pgrep -x 'slurmctld|slurmd' >/dev/null; then
    echo "$0: slurmctld/slurmd run without $conf (another Slurm): refusing to start a second one." >&2
    exit 3
  fi
  mkdir -p "$dir"/{spool,state,log} /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/slurm
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  cat > "$conf" <<CONF
ClusterName=meme_scale_local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobRequeue=1
KillWait=10
MinJobAge=3600
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  pgrep -x slurmctld >/dev/null || slurmctld -c
  pgrep -x slurmd >/dev/null || slurmd -N localhost
  for _ in $(seq 30); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then exit 0; fi
    sleep 1
  done
  echo "slurm did not come up; logs in $dir/log" >&2
  exit 1
  ;;
stop)
  ours || refuse "stop"
  pkill -x slurmd || true
  pkill -x slurmctld || true
  ;;
*)
  echo "usage: $0 install|start|stop [DIR]" >&2
  exit 2
  ;;
esac
