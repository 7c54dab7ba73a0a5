#!/usr/bin/env bash
# A single-node Slurm on localhost for the Slurm tests (tests/test_slurm.py).
#
#   bash .ci/slurm.sh start    # munged + slurmctld + slurmd, waits until the node is idle
#   bash .ci/slurm.sh stop     # stops exactly the daemons that `start` started (pid files)
#   bash .ci/slurm.sh status   # sinfo, or "not running"
#
# Needs root and Debian's slurm-wlm + munge (scripts/install.sh --system-test-deps). No cgroups, no
# accounting: the facts in shared/reference/dependencies.md. Everything it writes lives under $state
# except /etc/slurm/slurm.conf, which the clients (sbatch, squeue, sinfo) read without any
# environment variable; a slurm.conf that this script did not write is never overwritten.
set -euo pipefail

state="${BIDS_CL_SLURM_STATE:-/var/tmp/bids_cl-slurm}"
conf=/etc/slurm/slurm.conf
marker="# written by bids_cl .ci/slurm.sh"
# Two CPUs even on a bigger machine: the tests are written for CI's 2-core machines.
cpus="${BIDS_CL_SLURM_CPUS:-2}"
wait_s="${BIDS_CL_SLURM_WAIT:-60}"

log() { echo "slurm.sh: $*" >&2; }

pid_alive() {
    # True when the pid file $1 names a running process called $2.
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null \
        && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

need_tools() {
    local tool
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin"
        command -v "$tool" >/dev/null 2>&1 || { log "$tool not found (install slurm-wlm munge)"; exit 1; }
    done
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
}

start_munge() {
    # Reuse a munged that already works (e.g. a developer's machine); otherwise start our own.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running: reusing it"
        return
    fi
    install -d -o munge -g munge -m 0700 /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    # munged daemonises itself and writes its pid file; --force removes a stale socket.
    runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$state/munged.pid"
    local i
    for i in $(seq 1 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"
    exit 1
}

write_conf() {
    local host mem_mb
    host="$(hostname -s)"
    # RealMemory below the physical total: slurmd drains a node that has less than it is told.
    mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
        log "$conf exists and was not written by this script: not touching it"
        exit 1
    fi
    install -d -m 0755 /etc/slurm
    cat >"$conf" <<EOF
$marker (state in $state)
ClusterName=bidscl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# CPUs are the consumable resource, memory is not: --mem only has to fit the node.
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
# Take the node as configured even where the machine differs (the tests assume 2 CPUs).
SlurmdParameters=config_overrides
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.daemon.pid
SlurmdPidFile=$state/slurmd.daemon.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=60
MaxArraySize=1001
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {
    # $1 name; the rest the command. Foreground mode (-D) so that $! is the daemon itself; setsid and
    # redirections so that it outlives this script and holds no pipe of the caller's open.
    local name="$1"
    shift
    if pid_alive "$state/$name.pid" "$name"; then
        log "$name already running (pid $(cat "$state/$name.pid"))"
        return
    fi
    setsid "$@" </dev/null >>"$state/$name.out" 2>&1 &
    echo $! >"$state/$name.pid"
}

wait_idle() {
    local deadline node_state
    deadline=$(( $(date +%s) + wait_s ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        node_state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)"
        case "$node_state" in
            idle|mixed|allocated) log "node $(hostname -s) is $node_state"; return 0 ;;
            down*|drain*)
                # A node left down by an earlier run: bring it back.
                scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "the node did not become idle within ${wait_s}s (last state: ${node_state:-none}); logs in $state"
    tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 2>/dev/null || true
    return 1
}

do_start() {
    need_tools
    install -d -m 0755 "$state" "$state/ctld" "$state/d"
    start_munge
    write_conf
    start_daemon slurmctld slurmctld -D -f "$conf"
    sleep 1
    start_daemon slurmd slurmd -D -f "$conf" -N "$(hostname -s)"
    wait_idle
}

stop_pid() {
    # Stops the process named by pid file $1 if it is still the program $2 (a stale file whose pid
    # was reused by another process is left alone), bounded wait, then removes the file.
    local pid_file="$1" name="$2" pid i
    [ -s "$pid_file" ] || return 0
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

do_stop() {
    # Cancel what is still queued so that no job outlives the daemons' state.
    command -v scancel >/dev/null 2>&1 && pid_alive "$state/slurmctld.pid" slurmctld \
        && scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    stop_pid "$state/slurmd.pid" slurmd
    stop_pid "$state/slurmctld.pid" slurmctld
    stop_pid "$state/munged.pid" munged
    log "stopped"
}

do_status() {
    if pid_alive "$state/slurmctld.pid" slurmctld; then
        sinfo
    else
        echo "not running"
        return 3
    fi
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 64 ;;
esac
