#!/bin/bash
# Usage: scripts/slurm_cluster.sh start|stop|status [STATE_DIR]
#   A private single-node SLURM cluster (munged + slurmctld + slurmd, no systemd) for tests and for
#   trying the launch/*.sbatch scripts on one machine. Everything lives in STATE_DIR (default
#   $ENKI_SLURM_DIR, else /tmp/enki-slurm): slurm.conf, munge key and socket, state, spool, logs, pids.
#   start   installs slurm-wlm + munge with apt-get when sbatch is missing (needs root), writes the
#           config, starts the daemons, waits (at most ENKI_SLURM_WAIT seconds, default 30) for the node
#           to be idle and prints `export SLURM_CONF=STATE_DIR/slurm.conf` for the caller to eval.
#           Starting a running cluster only prints that line again.
#   stop    cancels its jobs, stops the daemons by their pid files and waits for them (bounded).
#   status  prints sinfo and squeue of the cluster.
# Environment: ENKI_SLURMCTLD_PORT (default 6817) and ENKI_SLURMD_PORT (default ctld port + 1) let two
#   clusters share a machine; ENKI_SLURM_CPUS (default nproc); ENKI_SLURM_MEMORY_MB (RealMemory, optional).
set -euo pipefail

action="${1:-}"
state_dir="${2:-${ENKI_SLURM_DIR:-/tmp/enki-slurm}}"
conf="$state_dir/slurm.conf"
wait_seconds="${ENKI_SLURM_WAIT:-30}"

die() { echo "slurm_cluster: $*" >&2; exit 1; }
log() { echo "slurm_cluster: $*" >&2; }

pid_alive() {  # pid_alive PIDFILE: the process named in PIDFILE exists
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

ensure_installed() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is unavailable; install slurm-wlm and munge"
    [ "$(id -u)" = 0 ] || die "SLURM is not installed; run as root (apt-get install slurm-wlm munge) or install it yourself"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >"$state_dir/apt.log" 2>&1; then
        timeout 300 apt-get update -q >>"$state_dir/apt.log" 2>&1 || true
        timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$state_dir/apt.log" 2>&1 \
            || { tail -20 "$state_dir/apt.log" >&2; die "apt-get install slurm-wlm munge failed (log: $state_dir/apt.log)"; }
    fi
}

write_conf() {
    local ctld_port="${ENKI_SLURMCTLD_PORT:-6817}"
    local slurmd_port="${ENKI_SLURMD_PORT:-$((ctld_port + 1))}"
    local cpus="${ENKI_SLURM_CPUS:-$(nproc)}"
    local memory=""
    [ -n "${ENKI_SLURM_MEMORY_MB:-}" ] && memory="RealMemory=$ENKI_SLURM_MEMORY_MB"
    mkdir -p "$state_dir"/{state,spool,log,run}
    cat >"$conf" <<EOF
# Written by scripts/slurm_cluster.sh; private single-node cluster in $state_dir
ClusterName=enki
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket=$state_dir/run/munge.socket,cred_expire=10
StateSaveLocation=$state_dir/state
SlurmdSpoolDir=$state_dir/spool
SlurmctldPidFile=$state_dir/run/slurmctld.pid
SlurmdPidFile=$state_dir/run/slurmd.pid
SlurmctldLogFile=$state_dir/log/slurmctld.log
SlurmdLogFile=$state_dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# CPUs may be set above the cores present (ENKI_SLURM_CPUS) without the node being drained
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=300
# a short scheduling interval so tests see requeued jobs start again quickly
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus $memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    local key="$state_dir/munge.key"
    if [ ! -s "$key" ]; then
        (umask 077; dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$key"
    pid_alive "$state_dir/run/munged.pid" && return 0
    rm -f "$state_dir/run/munge.socket" "$state_dir/run/munge.socket.lock"
    munged --force --key-file "$key" --socket "$state_dir/run/munge.socket" \
        --pid-file "$state_dir/run/munged.pid" --log-file "$state_dir/log/munged.log" \
        --seed-file "$state_dir/run/munged.seed" \
        || die "munged failed to start (log: $state_dir/log/munged.log)"
}

cluster_answers() {  # the controller answers and the node is idle (or allocated/mixed: jobs running)
    local state
    state="$(timeout 5 sinfo -h -N -o %T -n localhost 2>/dev/null)" || return 1
    [[ "$state" =~ ^(idle|mixed|allocated) ]]
}

start() {
    mkdir -p "$state_dir"
    export SLURM_CONF="$conf"
    if [ -f "$conf" ] && pid_alive "$state_dir/run/munged.pid" && pid_alive "$state_dir/run/slurmctld.pid" \
            && pid_alive "$state_dir/run/slurmd.pid" && cluster_answers; then
        log "already running ($state_dir)"
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    ensure_installed
    stop_daemons  # leftovers of a half-started cluster
    write_conf
    start_munge
    # -c: no state from an earlier start (jobs of a dead cluster); -i: ignore unreadable state files
    slurmctld -c -i -f "$conf" || die "slurmctld failed to start (log: $state_dir/log/slurmctld.log)"
    slurmd -N localhost -f "$conf" || die "slurmd failed to start (log: $state_dir/log/slurmd.log)"
    local deadline=$((SECONDS + wait_seconds))
    until cluster_answers; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -5 "$state_dir/log/slurmctld.log" "$state_dir/log/slurmd.log" >&2 || true
            stop_daemons
            die "the node did not become idle within ${wait_seconds}s (logs in $state_dir/log)"
        fi
        sleep 0.3
    done
    log "running: $(timeout 5 sinfo -h -o '%P %D %C %T' 2>/dev/null)"
    echo "export SLURM_CONF=$conf"
}

stop_pidfiles() {  # stop_pidfiles PIDFILE...: SIGTERM to all, wait up to 10 s, then SIGKILL
    local file pid pids=()
    for file in "$@"; do
        pid="$(cat "$file" 2>/dev/null)" || continue
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    local deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$@"
}

kill_job_leftovers() {
    # slurmstepd and job processes outlive slurmd; ours are the ones whose environment names our
    # slurm.conf (the daemons were started with SLURM_CONF=$conf and their children inherit it)
    local pid environ leftovers=()
    for environ in /proc/[0-9]*/environ; do
        pid="${environ#/proc/}"; pid="${pid%/environ}"
        [ "$pid" = "$$" ] && continue
        if { tr '\0' '\n' <"$environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$conf"; then
            leftovers+=("$pid")
        fi
    done
    [ "${#leftovers[@]}" -eq 0 ] && return 0
    # only processes that are not this script or its ancestors (a caller may itself run with SLURM_CONF set)
    local keep=" $$ " p=$$
    while [ "$p" -gt 1 ] 2>/dev/null; do
        p="$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null)" || break
        keep+="$p "
    done
    local victims=()
    for pid in "${leftovers[@]}"; do
        [[ "$keep" == *" $pid "* ]] || victims+=("$pid")
    done
    [ "${#victims[@]}" -eq 0 ] && return 0
    log "killing ${#victims[@]} leftover job process(es): ${victims[*]}"
    kill -KILL "${victims[@]}" 2>/dev/null || true
}

stop_daemons() {
    stop_pidfiles "$state_dir/run/slurmd.pid" "$state_dir/run/slurmctld.pid"
    stop_pidfiles "$state_dir/run/munged.pid"  # last: the others authenticate through it
}

stop() {
    export SLURM_CONF="$conf"
    if [ -f "$conf" ] && pid_alive "$state_dir/run/slurmctld.pid"; then
        timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local deadline=$((SECONDS + 15))
        while [ -n "$(timeout 5 squeue -h -o %i -t RUNNING,COMPLETING,CONFIGURING 2>/dev/null)" ] \
                && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.3
        done
    fi
    stop_daemons
    [ -f "$conf" ] && kill_job_leftovers
    log "stopped ($state_dir)"
}

status() {
    [ -f "$conf" ] || die "no cluster in $state_dir (run: $0 start $state_dir)"
    export SLURM_CONF="$conf"
    timeout 10 sinfo || die "the controller does not answer (logs in $state_dir/log)"
    timeout 10 squeue
}

case "$action" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
