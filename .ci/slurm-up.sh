#!/usr/bin/env bash
# slurm-up.sh - bring up a single-node SLURM "cluster" on loopback, without systemd.
#
# Idempotent: re-running when everything is up just re-checks and re-prints the env.
#
#   GPUBATCH_SLURM_DIR    state folder (default /tmp/gpubatch-slurm)
#   GPUBATCH_SLURM_CPUS   CPUs advertised by the node (default: nproc)
#   GPUBATCH_SLURM_MEM_MB RealMemory advertised (default: 95% of `free -m` total)
#   GPUBATCH_SLURM_GPUS   number of fake GPUs (default 4; 0 disables GRES)
#   GPUBATCH_SLURM_WAIT   seconds to wait for the node to become idle (default 60)
#   GPUBATCH_SLURM_ENFORCE_PART_LIMITS  NO (default, SLURM's default: a job asking more CPUs
#                         than the partition has is accepted and stays PENDING, reason
#                         PartitionConfig) or ALL (sbatch rejects it at submit time)
#   GPUBATCH_SLURM_ETC    1 (default): also install the config as /etc/slurm/slurm.conf
#                         so plain sinfo/sbatch work without SLURM_CONF; 0: don't.
#
# Prints `export ...` lines and writes them to $GPUBATCH_SLURM_DIR/env.sh.
set -euo pipefail

DIR="${GPUBATCH_SLURM_DIR:-/tmp/gpubatch-slurm}"
WAIT="${GPUBATCH_SLURM_WAIT:-60}"
NGPU="${GPUBATCH_SLURM_GPUS:-4}"
WRITE_ETC="${GPUBATCH_SLURM_ETC:-1}"
MARK="# managed by gpubatch slurm-up.sh"

log() { echo "[slurm-up] $*" >&2; }
die() { echo "[slurm-up] ERROR: $*" >&2; echo "[slurm-up] (clean up with slurm-down.sh)" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and sudo not available"
    SUDO="sudo"
fi

# ---------------------------------------------------------------- packages
need_pkgs=()
command -v slurmctld >/dev/null || need_pkgs+=(slurm-wlm)
command -v slurmd    >/dev/null || need_pkgs+=(slurm-wlm)
command -v sbatch    >/dev/null || need_pkgs+=(slurm-wlm)
command -v munged    >/dev/null || need_pkgs+=(munge)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing: slurm-wlm munge (apt)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null
fi

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    $SUDO mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        $SUDO mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 0400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
$SUDO chmod 0755 /run/munge

$SUDO mkdir -p "$DIR"
$SUDO chown "$(id -u):$(id -g)" "$DIR"

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

alive() {  # alive PIDFILE COMM
    local pf="$1" comm="$2" pid
    [ -s "$pf" ] || return 1
    pid="$(cat "$pf" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

if munge_ok; then
    if alive "$DIR/munged.pid" munged; then log "munged already running (ours)"
    else log "munged already running (not started by us; will not be stopped by slurm-down.sh)"; fi
else
    rm -f "$DIR/munged.pid"
    log "starting munged"
    $SUDO rm -f /run/munge/munged.pid
    $SUDO runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not come up: $(tail -5 /var/log/munge/munged.log 2>/dev/null)"
    $SUDO cat /run/munge/munged.pid > "$DIR/munged.pid"
fi

# ---------------------------------------------------------------- config
NODE="$(hostname -s)"
CPUS="${GPUBATCH_SLURM_CPUS:-$(nproc)}"
if [ -n "${GPUBATCH_SLURM_MEM_MB:-}" ]; then
    MEM="$GPUBATCH_SLURM_MEM_MB"
else
    MEM="$(free -m | awk '/^Mem:/{printf "%d", $2*0.95}')"
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"

GRES_NODE=""
GRES_TYPES=""
: > "$DIR/gres.conf.new"
if [ "$NGPU" -gt 0 ]; then
    GRES_TYPES="GresTypes=gpu"
    GRES_NODE="Gres=gpu:$NGPU"
    echo "$MARK" >> "$DIR/gres.conf.new"
    for i in $(seq 0 $((NGPU - 1))); do
        touch "$DIR/fakegpu$i"
        # every GPU needs a File= (a Count= line without File= drains the node)
        echo "NodeName=$NODE Name=gpu File=$DIR/fakegpu$i" >> "$DIR/gres.conf.new"
    done
fi

cat > "$DIR/slurm.conf.new" <<EOF
$MARK
ClusterName=gpubatch
MailProg=/bin/true
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
SlurmdParameters=config_overrides
$GRES_TYPES
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
DefMemPerCPU=512
EnforcePartLimits=${GPUBATCH_SLURM_ENFORCE_PART_LIMITS:-NO}
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF

changed=0
for f in slurm.conf gres.conf; do
    if ! cmp -s "$DIR/$f.new" "$DIR/$f" 2>/dev/null; then changed=1; mv "$DIR/$f.new" "$DIR/$f"
    else rm -f "$DIR/$f.new"; fi
done

ETC_OK=0
if [ "$WRITE_ETC" = "1" ]; then
    if [ ! -e /etc/slurm/slurm.conf ] || grep -qF "$MARK" /etc/slurm/slurm.conf; then
        $SUDO mkdir -p /etc/slurm
        for f in slurm.conf gres.conf; do
            cmp -s "$DIR/$f" "/etc/slurm/$f" 2>/dev/null || $SUDO cp "$DIR/$f" "/etc/slurm/$f"
        done
        ETC_OK=1
    else
        log "/etc/slurm/slurm.conf exists and is not ours: leaving it; set SLURM_CONF for clients"
    fi
fi

export SLURM_CONF="$DIR/slurm.conf"

# ---------------------------------------------------------------- daemons
stop_pid() {  # stop_pid PIDFILE COMM
    local pf="$1" comm="$2" pid
    alive "$pf" "$comm" || { rm -f "$pf"; return 0; }
    pid="$(cat "$pf")"
    $SUDO kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && $SUDO kill -9 "$pid" 2>/dev/null || true
    rm -f "$pf"
}

if [ "$changed" = 1 ] && { alive "$DIR/slurmctld.pid" slurmctld || alive "$DIR/slurmd.pid" slurmd; }; then
    log "config changed: restarting slurmd/slurmctld"
    stop_pid "$DIR/slurmd.pid" slurmd
    stop_pid "$DIR/slurmctld.pid" slurmctld
fi

if alive "$DIR/slurmctld.pid" slurmctld; then
    log "slurmctld already running (pid $(cat "$DIR/slurmctld.pid"))"
else
    log "starting slurmctld"
    $SUDO env SLURM_CONF="$SLURM_CONF" /usr/sbin/slurmctld -f "$SLURM_CONF" \
        >>"$DIR/log/slurmctld.stdout" 2>&1 || die "slurmctld failed to start: $(tail -20 "$DIR/log/slurmctld.log" 2>/dev/null)"
fi
if alive "$DIR/slurmd.pid" slurmd; then
    log "slurmd already running (pid $(cat "$DIR/slurmd.pid"))"
else
    log "starting slurmd"
    REG_AFTER=$(( $(date +%s) - 1 ))
    $SUDO env SLURM_CONF="$SLURM_CONF" /usr/sbin/slurmd -f "$SLURM_CONF" -N "$NODE" \
        >>"$DIR/log/slurmd.stdout" 2>&1 || die "slurmd failed to start: $(tail -20 "$DIR/log/slurmd.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- wait for idle
# The node state recovered from $DIR/state can be stale (e.g. "idle" from the last run),
# so when we (re)started slurmd, only trust it once slurmd has registered again.
registered() {
    [ "${REG_AFTER:-0}" = 0 ] && return 0
    local st
    st="$(scontrol -o show node "$NODE" 2>/dev/null | tr ' ' '\n' | sed -n 's/^SlurmdStartTime=//p')"
    [ -n "$st" ] && [ "$st" != None ] && [ "$(date -d "$st" +%s 2>/dev/null || echo 0)" -ge "$REG_AFTER" ]
}
t0=$(date +%s)
state=""
while :; do
    state="$(sinfo -h -N -n "$NODE" -p debug -o '%t' 2>/dev/null | head -1 || true)"
    registered || state="$state (slurmd not registered yet)"
    case "$state" in
        idle|mix|alloc) break ;;
        inval*) WAIT=0 ;;  # slurmctld rejected the node's registration: no point waiting
        down*|drain*|drng*|fail*)
            # ReturnToService=2 normally resumes it; nudge once if not
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ $(( $(date +%s) - t0 )) -ge "$WAIT" ]; then
        echo "[slurm-up] ERROR: node $NODE not idle after ${WAIT}s (state='$state')" >&2
        sinfo -R >&2 2>&1 || true
        echo "--- slurmctld.log (tail) ---" >&2; tail -25 "$DIR/log/slurmctld.log" >&2 2>/dev/null || true
        echo "--- slurmd.log (tail) ---" >&2;    tail -25 "$DIR/log/slurmd.log" >&2 2>/dev/null || true
        echo "[slurm-up] (clean up with slurm-down.sh)" >&2
        exit 1
    fi
    sleep 0.5
done
log "node $NODE is $state after $(( $(date +%s) - t0 ))s"

cat > "$DIR/env.sh" <<EOF
export SLURM_CONF=$DIR/slurm.conf
export GPUBATCH_SLURM_DIR=$DIR
export GPUBATCH_SLURM_NODE=$NODE
EOF
if [ "$ETC_OK" = 1 ]; then
    echo "# /etc/slurm/slurm.conf is a copy of \$SLURM_CONF: plain sinfo/sbatch also work without it" >> "$DIR/env.sh"
fi
cat "$DIR/env.sh"
