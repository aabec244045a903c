#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying the sbatch templates
# in configs/slurm/ before a real cluster:
#
#   scripts/local_slurm.sh install   Debian's slurm-wlm and munge (idempotent; needs root)
#   scripts/local_slurm.sh start     munged, slurmctld and slurmd on localhost (rerunnable)
#   scripts/local_slurm.sh stop      stop the daemons it started (by pid file), remove the state folder
#   scripts/local_slurm.sh status    sinfo
#
# No systemd and no cgroups (containers have neither): processes are tracked by parent pid
# (proctrack/linuxproc) and tasks are not bound (task/none). EnforcePartLimits=ALL makes a job that
# asks for more CPUs or memory than the node has fail at submission instead of pending forever.
# Everything lives under $SCALE_SLURM_DIR (default /tmp/scale-slurm); /etc/slurm/slurm.conf is
# written there as a link, because the SLURM commands look for it there.
set -euo pipefail

STATE=${SCALE_SLURM_DIR:-/tmp/scale-slurm}
CONF=$STATE/slurm.conf

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "local_slurm.sh: installing slurm-wlm and munge needs root" >&2
        exit 1
    fi
    # `apt-get update` only when the package lists do not know slurm-wlm yet.
    apt-cache show slurm-wlm >/dev/null 2>&1 || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, 1 GiB kept for the OS
    mkdir -p "$STATE"/{spool,state,log}
    cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster on $host.
ClusterName=scale-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=10
InactiveLimit=0
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    mkdir -p /etc/slurm
    ln -sf "$CONF" /etc/slurm/slurm.conf
}

running() { pgrep -x "$1" >/dev/null; }

start() {
    install
    write_config
    if ! running munged; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
        if [ ! -s /etc/munge/munge.key ]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
        chmod 0400 /etc/munge/munge.key
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged
        else
            /usr/sbin/munged --force
        fi
        touch "$STATE/munged.started"  # `stop` stops only a munged this script started
    fi
    running slurmctld || /usr/sbin/slurmctld -f "$CONF"
    running slurmd || /usr/sbin/slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 0.5
    done
    echo "local_slurm.sh: the node did not come up; logs in $STATE/log" >&2
    sinfo >&2 || true
    exit 1
}

# Stop the daemon whose pid is in file $1 (by that pid, not by name): SIGTERM, then SIGKILL after 10 s.
stop_pidfile() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    if [ -e "$STATE/munged.started" ]; then
        stop_pidfile /run/munge/munged.pid
    fi
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
    rm -rf "$STATE"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
