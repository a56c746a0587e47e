#!/usr/bin/env bash
# slurm-down.sh - stop exactly what slurm-up.sh started (by the pid files in
# $GPUBATCH_SLURM_DIR): slurmd, slurmctld, munged.  Idempotent.
#
#   GPUBATCH_SLURM_DIR         state folder (default /tmp/gpubatch-slurm)
#   GPUBATCH_SLURM_KEEP_JOBS   1: don't scancel queued/running jobs first (default 0)
#
# A munged that was already running before slurm-up.sh (no $DIR/munged.pid) is left alone.
set -uo pipefail

DIR="${GPUBATCH_SLURM_DIR:-/tmp/gpubatch-slurm}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
log() { echo "[slurm-down] $*" >&2; }
export SLURM_CONF="$DIR/slurm.conf"

alive() {  # alive PIDFILE COMM
    local pf="$1" comm="$2" pid
    [ -s "$pf" ] || return 1
    pid="$(cat "$pf" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

stop_pid() {  # stop_pid PIDFILE COMM
    local pf="$1" comm="$2" pid
    if ! alive "$pf" "$comm"; then
        [ -e "$pf" ] && log "$comm: stale pid file removed"
        $SUDO rm -f "$pf"; return 0
    fi
    pid="$(cat "$pf")"
    log "stopping $comm (pid $pid)"
    $SUDO kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done   # <= 15 s
    if [ -d "/proc/$pid" ]; then
        log "$comm (pid $pid) still alive after 15s: SIGKILL"
        $SUDO kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    fi
    $SUDO rm -f "$pf"
}

# Cancel jobs first so that job steps (dask workers under slurmstepd) do not outlive slurmd.
if [ "${GPUBATCH_SLURM_KEEP_JOBS:-0}" != 1 ] && alive "$DIR/slurmctld.pid" slurmctld; then
    ids="$(timeout 10 squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')"
    if [ -n "${ids// /}" ]; then
        log "cancelling jobs: $ids"
        timeout 10 scancel $ids 2>/dev/null || true
        for _ in $(seq 1 30); do   # <= 15 s
            [ -z "$(timeout 5 squeue -h -t PD,R,CG,S -o '%i' 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

stop_pid "$DIR/slurmd.pid" slurmd
stop_pid "$DIR/slurmctld.pid" slurmctld
stop_pid "$DIR/munged.pid" munged
log "done"
exit 0
