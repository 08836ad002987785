#!/usr/bin/env bash
# Single-node Slurm development cluster for JobProxy's tests and CI.
#
# Usage: etc/dev/slurm.sh start|stop|status|env
#
#   start   Install the Debian packages if missing, make sure munged runs, write a
#           private configuration and start slurmctld + slurmd, then wait until the
#           node is idle and a trivial `srun true` has completed; then start
#           slurmrestd (Slurm's REST API, JWT auth) on 127.0.0.1:$JOBPROXY_SLURMRESTD_PORT
#           and check that a token from `scontrol token` is accepted. Idempotent: does
#           nothing if the cluster is already up and healthy.
#   stop    Stop slurmrestd, slurmd and slurmctld (no error if they are not running).
#           munged is left running on purpose: it is a machine-wide service others may
#           share. Jobs still running keep running (slurmstepd survives) and are picked
#           up again by the next `start`.
#   status  Exit 0 if the three daemons run, the node accepts work and slurmrestd
#           answers, non-zero otherwise.
#   env     Print `export SLURM_CONF=...` and `export JOBPROXY_SLURMRESTD_URL=...`
#           for `eval "$(etc/dev/slurm.sh env)"`.
#
# Everything lives under ${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}/slurm (config,
# state, spool, logs, pid files); /etc/slurm is never written. Environment knobs:
#   JOBPROXY_DEV_ROOT          state root parent (default /tmp/jobproxy-dev)
#   JOBPROXY_SLURM_CGROUP      auto (default) | v1 | none: memory/core enforcement
#                              through cgroup v1, or the no-cgroup fallback
#   JOBPROXY_SLURM_TIMEOUT     seconds to wait for the cluster to come up (default 60)
#   JOBPROXY_SLURMRESTD_PORT   slurmrestd's port on 127.0.0.1 (default 6820)
#
# slurmrestd refuses to run as root: it runs as the system user `slurmrestd` (created
# if absent) with SLURM_JWT=daemon; slurmctld checks each request's token against the
# key $ROOT/jwt.key (AuthAltTypes=auth/jwt), which only root (SlurmUser) may read.
#
# Needs root (installs packages, runs the daemons as root). Written for Debian 12
# (Slurm 22.05) without systemd; see shared/notes/platform.md for the background.
set -euo pipefail

readonly DEV_ROOT="${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}"
readonly ROOT="$DEV_ROOT/slurm"
readonly CONF="$ROOT/slurm.conf"
readonly CGROUP_CONF="$ROOT/cgroup.conf"
readonly STATE_DIR="$ROOT/state"      # slurmctld StateSaveLocation
readonly SPOOL_DIR="$ROOT/spool"      # slurmd SlurmdSpoolDir (holds unix sockets)
readonly LOG_DIR="$ROOT/log"
readonly RUN_DIR="$ROOT/run"
readonly FAKE_CGROUP_DIR="$ROOT/no-cgroup"   # fallback CgroupMountpoint
readonly CTLD_PID="$RUN_DIR/slurmctld.pid"
readonly SLURMD_PID="$RUN_DIR/slurmd.pid"
readonly RESTD_PID="$RUN_DIR/slurmrestd.pid"
readonly RESTD_PORT="${JOBPROXY_SLURMRESTD_PORT:-6820}"
readonly RESTD_USER=slurmrestd
readonly JWT_KEY="$ROOT/jwt.key"
readonly LOCK_FILE="$ROOT/.lock"
readonly CGROUP_MODE="${JOBPROXY_SLURM_CGROUP:-auto}"
readonly TIMEOUT="${JOBPROXY_SLURM_TIMEOUT:-60}"
readonly PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client slurmrestd slurm-wlm-jwt-plugin)
readonly MUNGE_KEY=/etc/munge/munge.key
# Bumped whenever write_config changes what it writes: a running cluster with an older
# configuration is restarted by `start` (running jobs survive).
readonly CONFIG_REVISION=5
# Older revisions this configuration only adds to: a script of such a revision (e.g. on
# another branch, sharing the same dev cluster) takes it as current and does not restart it.
readonly CONFIG_SATISFIES=(2 3 4)
NODE=$(hostname -s)
readonly NODE

export SLURM_CONF="$CONF"

log() { printf 'slurm.sh: %s\n' "$*" >&2; }
# shellcheck source=etc/dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Print the last lines of the daemons' logs (for failure diagnosis).
dump_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" \
        "$LOG_DIR/slurmctld.out" "$LOG_DIR/slurmd.out" "$LOG_DIR/slurmrestd.out"; do
        [[ -s $f ]] || continue
        printf '\n----- tail of %s -----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
    done
}

fail() {
    log "ERROR: $*"
    dump_logs
    exit 1
}

# ---------------------------------------------------------------- processes

# proc_alive PID NAME: true if PID runs (not a zombie) and its command is NAME.
proc_alive() {
    alive "$1" && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]
}

# gone_within TENTHS PID NAME: wait up to TENTHS tenths of a second for PID to end.
gone_within() {
    local i
    for ((i = 0; i < $1; i++)); do
        proc_alive "$2" "$3" || return 0
        sleep 0.1
    done
    ! proc_alive "$2" "$3"
}

# ours PID NAME: PID is NAME started by this script with this root (`NAME -f $CONF`).
ours() {
    local -a argv
    proc_alive "$1" "$2" || return 1
    mapfile -d '' -t argv 2>/dev/null <"/proc/$1/cmdline" || return 1
    [[ ${argv[*]} == "$2 -f $CONF" ]]
}

# daemon_pid NAME PIDFILE: print the pid of our running daemon, fail if none. The
# pid file is the quick way; the command line is the fallback when the pid file is
# gone (state root wiped underneath a running cluster).
daemon_pid() {
    local name=$1 file=$2 pid d
    if { read -r pid <"$file"; } 2>/dev/null && ours "$pid" "$name"; then
        printf '%s\n' "$pid"
        return 0
    fi
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if ours "$pid" "$name"; then
            printf '%s\n' "$pid"
            return 0
        fi
    done
    return 1
}

# other_pids NAME: pids of all live processes called NAME (used after stopping ours,
# to report daemons started by someone else, e.g. with another state root).
other_pids() {
    local name=$1 d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if proc_alive "$pid" "$name"; then printf '%s ' "$pid"; fi
    done
}

# stop_daemon NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL.
stop_daemon() {
    local name=$1 file=$2 pid
    if ! pid=$(daemon_pid "$name" "$file"); then
        rm -f "$file"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! gone_within 200 "$pid" "$name"; then
        log "$name did not stop within 20 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        gone_within 50 "$pid" "$name" || true
    fi
    proc_alive "$pid" "$name" && die "could not stop $name (pid $pid)"
    rm -f "$file"
}

# spawn OUTFILE CMD...: run a daemon's launcher with stdin from /dev/null, output
# appended to OUTFILE and every other inherited file descriptor closed. A daemon that
# inherited our lock fd would hold the lock forever, one that inherited a caller's
# pipe would keep that caller (e.g. subprocess.run(capture_output=True)) waiting.
spawn() {
    local out=$1 fd
    shift
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then exec {fd}>&- 2>/dev/null || true; fi
        done
        exec "$@" </dev/null >>"$out" 2>&1
    )
}

# ---------------------------------------------------------------- packages

ensure_packages() {
    local missing
    missing=$(missing_packages "${PACKAGES[@]}")
    [[ -n $missing ]] || return 0
    [[ $EUID -eq 0 ]] || die "packages missing (${missing//$'\n'/ }) and not root"
    log "installing: ${missing//$'\n'/ }"
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    apt_install "$LOG_DIR/apt.log" ${missing} || die "apt-get failed (full log: $LOG_DIR/apt.log)"
    missing=$(missing_packages "${PACKAGES[@]}")
    [[ -z $missing ]] || die "still missing after install: ${missing//$'\n'/ }"
}

# ---------------------------------------------------------------- munge

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    munge_ok && return 0
    log "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # A stale pid file or socket from an unclean stop makes munged refuse to start.
    local pid
    if [[ -r /run/munge/munged.pid ]] && read -r pid </run/munge/munged.pid \
        && ! proc_alive "$pid" munged; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    spawn "$LOG_DIR/munged.out" runuser -u munge -- /usr/sbin/munged \
        || die "munged failed to start: $(tail -n 5 "$LOG_DIR/munged.out")"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && return 0
        sleep 0.1
    done
    die "munged does not answer (munge -n | unmunge fails)"
}

# ---------------------------------------------------------------- configuration

# can_use_cgroup_v1: the v1 hierarchies Slurm's cgroup plugins need are mounted and
# we may create (and remove) a child cgroup in each.
can_use_cgroup_v1() {
    local c probe
    for c in memory cpuset freezer; do
        [[ $(stat -f -c %T "/sys/fs/cgroup/$c" 2>/dev/null) == cgroupfs ]] || return 1
        probe="/sys/fs/cgroup/$c/jobproxy-probe-$$"
        mkdir "$probe" 2>/dev/null || return 1
        rmdir "$probe" 2>/dev/null || return 1
    done
    return 0
}

# Decide the enforcement mode: prints "v1" or "none".
cgroup_mode() {
    case $CGROUP_MODE in
        v1 | none) printf '%s\n' "$CGROUP_MODE" ;;
        auto) if can_use_cgroup_v1; then echo v1; else echo none; fi ;;
        *) die "JOBPROXY_SLURM_CGROUP must be auto, v1 or none (got '$CGROUP_MODE')" ;;
    esac
}

# node_line: NodeName=... with the machine's real CPU layout and memory.
node_line() {
    local hw cpus mem_mb field out=()
    # `slurmd -C` prints the hardware as a slurm.conf node line (and an UpTime line).
    hw=$(slurmd -C 2>/dev/null | head -n 1) || true
    if [[ $hw != NodeName=* ]]; then
        cpus=$(nproc)
        hw="NodeName=$NODE CPUs=$cpus"
    fi
    for field in $hw; do
        case $field in
            NodeName=* | RealMemory=*) ;;
            *) out+=("$field") ;;
        esac
    done
    mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    # Leave headroom for the OS and daemons: 5%, at least 512 MiB.
    local headroom=$((mem_mb / 20 > 512 ? mem_mb / 20 : 512))
    ((mem_mb - headroom >= 512)) || headroom=0
    printf 'NodeName=%s NodeAddr=127.0.0.1 NodeHostname=%s %s RealMemory=%d Gres=gpu:2 State=UNKNOWN\n' \
        "$NODE" "$NODE" "${out[*]}" "$((mem_mb - headroom))"
}

write_config() {
    local mode=$1 tmp
    tmp=$(mktemp "$ROOT/.slurm.conf.XXXXXX")
    {
        cat <<EOF
# Generated by JobProxy etc/dev/slurm.sh — rewritten on every start; do not edit.
# revision $CONFIG_REVISION
$(for r in "${CONFIG_SATISFIES[@]}"; do printf '# revision %s\n' "$r"; done)
ClusterName=jobproxy-dev
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Tokens for slurmrestd (scontrol token), checked against a key only root can read.
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$JWT_KEY
# Default ports; Grid Engine uses 6444/6445.
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ReturnToService=2
# Scheduling: start jobs at once, reject impossible requests at submit time.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
# Finished jobs stay visible to scontrol/squeue for an hour; room for the jobs of an hour of
# several test runs and benchmarks at once (Slurm's default of 10000 fills up).
MinJobAge=3600
MaxJobCount=20000
KillWait=5
InactiveLimit=0
Waittime=0
JobRequeue=0
# No slurmdbd: no accounting database; completed jobs go to a text file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt
JobAcctGatherType=jobacct_gather/linux
# Two stand-in GPUs (gres.conf: device files that are /dev/null) for the gpus tests.
GresTypes=gpu
# Preemption by partition: a job of the partition 'urgent' (PriorityTier 2) takes the cores of
# jobs of 'debug' or 'requeueable' (tier 1). A preempted debug job is cancelled and ends
# PREEMPTED; a preempted job of 'requeueable' submitted with --requeue waits to run again.
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
EOF
        if [[ $mode == v1 ]]; then
            cat <<EOF
# Enforcement through cgroup v1 (see cgroup.conf).
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherFrequency=task=5
EOF
        else
            cat <<EOF
# No usable cgroups: memory is enforced by polling (OverMemoryKill), cores by affinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=1
EOF
        fi
        node_line
        echo "PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1"
        echo "PartitionName=requeueable Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE"
        echo "PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2"
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"

    # Slurm wants a device file per GPU: two character devices with /dev/null's numbers
    # stand in for them (there are no GPUs here; jobs only see the count and CUDA_VISIBLE_DEVICES).
    mkdir -p "$ROOT/gpu"
    local i
    for i in 0 1; do
        [[ -c $ROOT/gpu/$i ]] || mknod -m 0666 "$ROOT/gpu/$i" c 1 3
    done
    tmp=$(mktemp "$ROOT/.gres.conf.XXXXXX")
    printf '# Generated by JobProxy etc/dev/slurm.sh.\nNodeName=%s Name=gpu File=%s/gpu/[0-1]\n' "$NODE" "$ROOT" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$ROOT/gres.conf"

    tmp=$(mktemp "$ROOT/.cgroup.conf.XXXXXX")
    if [[ $mode == v1 ]]; then
        cat >"$tmp" <<EOF
# Generated by JobProxy etc/dev/slurm.sh.
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=yes
ConstrainRAMSpace=yes
AllowedRAMSpace=100
ConstrainSwapSpace=no
ConstrainDevices=no
EOF
    else
        # slurmd 22.05 loads a cgroup plugin even when no cgroup plugin is configured;
        # an empty mount point with an empty systemd/ folder satisfies cgroup/v1.
        mkdir -p "$FAKE_CGROUP_DIR/systemd"
        cat >"$tmp" <<EOF
# Generated by JobProxy etc/dev/slurm.sh (no usable cgroups: placeholder only).
CgroupPlugin=cgroup/v1
CgroupMountpoint=$FAKE_CGROUP_DIR
CgroupAutomount=no
EOF
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CGROUP_CONF"
}

# ---------------------------------------------------------------- slurmrestd

# ensure_jwt_key: the random key slurmctld signs and checks tokens with, for root only.
ensure_jwt_key() {
    [[ -s $JWT_KEY ]] || (umask 077 && dd if=/dev/urandom of="$JWT_KEY" bs=32 count=1 status=none)
    chown root:root "$JWT_KEY"
    chmod 0600 "$JWT_KEY"
}

# ensure_restd_user: the unprivileged system account slurmrestd runs as.
ensure_restd_user() {
    getent passwd "$RESTD_USER" >/dev/null && return 0
    log "creating the system user $RESTD_USER"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$RESTD_USER" \
        || die "could not create the system user $RESTD_USER"
}

# restd_ours PID: PID is a slurmrestd started by this script with this root.
restd_ours() {
    proc_alive "$1" slurmrestd || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "slurmrestd -f $CONF " || return 1
}

# restd_pid: print the pid of our running slurmrestd (its pid file, else a search by
# command line), fail if none.
restd_pid() {
    local pid d
    if { read -r pid <"$RESTD_PID"; } 2>/dev/null && restd_ours "$pid"; then
        printf '%s\n' "$pid"
        return 0
    fi
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if restd_ours "$pid"; then
            printf '%s\n' "$pid" | tee "$RESTD_PID"
            return 0
        fi
    done
    return 1
}

# restd_answers: a token from `scontrol token` is accepted and slurmctld answers
# slurmrestd's ping: one HTTP request through bash's /dev/tcp (no client needed), the
# answer read up to its Content-Length (slurmrestd keeps the connection open).
restd_answers() {
    local token fd line status length=0 body
    token=$(timeout 10 scontrol token username=root lifespan=60 2>/dev/null) || return 1
    token=${token#SLURM_JWT=}
    { exec {fd}<>"/dev/tcp/127.0.0.1/$RESTD_PORT"; } 2>/dev/null || return 1
    printf 'GET /slurm/v0.0.38/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-SLURM-USER-NAME: root\r\nX-SLURM-USER-TOKEN: %s\r\n\r\n' \
        "$token" >&"$fd"
    IFS= read -r -t 10 status <&"$fd" || { exec {fd}>&-; return 1; }
    while IFS= read -r -t 10 line <&"$fd"; do
        line=${line%$'\r'}
        [[ -n $line ]] || break
        [[ ${line,,} =~ ^content-length:\ *([0-9]+) ]] && length=${BASH_REMATCH[1]}
    done
    body=
    ((length == 0)) || IFS= read -r -t 10 -N "$length" body <&"$fd" || true
    exec {fd}>&-
    [[ $status =~ ^HTTP/1\.[01]\ 200 ]] && [[ $body == *'"UP"'* ]]
}

restd_healthy() { restd_pid >/dev/null && restd_answers; }

stop_restd() {
    local pid
    if ! pid=$(restd_pid); then
        rm -f "$RESTD_PID"
        return 0
    fi
    log "stopping slurmrestd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! gone_within 100 "$pid" slurmrestd; then
        kill -KILL "$pid" 2>/dev/null || true
        gone_within 50 "$pid" slurmrestd || true
    fi
    proc_alive "$pid" slurmrestd && die "could not stop slurmrestd (pid $pid)"
    rm -f "$RESTD_PID"
}

# start_restd: slurmrestd (which stays in the foreground) as a background subshell that
# closes every inherited fd (our lock!) and execs it, so $! is the daemon's own pid
# (setpriv drops to $RESTD_USER without forking).
start_restd() {
    ensure_restd_user
    local uid gid
    uid=$(id -u "$RESTD_USER") && gid=$(id -g "$RESTD_USER") || die "no uid/gid for $RESTD_USER"
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then exec {fd}>&- 2>/dev/null || true; fi
        done
        SLURM_JWT=daemon exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- \
            slurmrestd -f "$CONF" -a rest_auth/jwt -s openapi/v0.0.38 "127.0.0.1:$RESTD_PORT" \
            </dev/null >>"$LOG_DIR/slurmrestd.out" 2>&1
    ) &
    printf '%s\n' "$!" >"$RESTD_PID"
    wait_for "$TIMEOUT" "slurmrestd to accept a token on 127.0.0.1:$RESTD_PORT" restd_healthy
    log "slurmrestd (pid $(restd_pid)) on http://127.0.0.1:$RESTD_PORT"
}

# ---------------------------------------------------------------- health

ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# node_state: print the node's State= value, e.g. IDLE, MIXED, IDLE+DRAIN, DOWN*.
node_state() {
    local line
    line=$(timeout 10 scontrol -o show node "$NODE" 2>/dev/null) || return 1
    [[ $line =~ (^|\ )State=([^ ]+) ]] || return 1
    printf '%s\n' "${BASH_REMATCH[2]}"
}

# node_usable: the node is registered and can run jobs.
node_usable() {
    local state
    state=$(node_state) || return 1
    [[ $state =~ ^(IDLE|MIXED|ALLOCATED|COMPLETING) ]] || return 1
    [[ ! $state =~ DRAIN|DOWN|FAIL|NOT_RESPONDING|POWER|INVAL|\* ]]
}

# config_mode: the enforcement mode of the config written last (v1 or none).
config_mode() {
    if grep -q '^ProctrackType=proctrack/cgroup' "$CONF" 2>/dev/null; then echo v1; else echo none; fi
}

healthy() {
    [[ -r $CONF ]] || return 1
    daemon_pid slurmctld "$CTLD_PID" >/dev/null || return 1
    daemon_pid slurmd "$SLURMD_PID" >/dev/null || return 1
    ctld_up && node_usable
}

# wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${secs} s waiting for $what"
        sleep 0.2
    done
}

# ---------------------------------------------------------------- commands

# Serialise start/stop (parallel test workers may call us at once). Daemons are
# started through spawn() so that they do not inherit the lock's fd 9.
take_lock() {
    exec 9>"$LOCK_FILE"
    flock -w 120 9 || die "another slurm.sh holds $LOCK_FILE"
}

cmd_start() {
    [[ $EUID -eq 0 ]] || die "must run as root"
    mkdir -p "$ROOT"
    take_lock
    local t0=$SECONDS mode others
    mode=$(cgroup_mode)
    if healthy; then
        if [[ $(config_mode) != "$mode" ]]; then
            log "running with enforcement '$(config_mode)', '$mode' wanted: restarting"
        elif ! grep -qx "# revision $CONFIG_REVISION" "$CONF"; then
            log "running with an older configuration: restarting"
        elif restd_healthy; then
            log "already running (node $NODE $(node_state))"
            return 0
        else
            log "cluster up, slurmrestd not answering: restarting slurmrestd only"
            stop_restd
            start_restd
            return 0
        fi
    fi
    install -d -m 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    # slurmd keeps a unix socket per job step in its spool dir: keep the path short.
    ((${#SPOOL_DIR} <= 70)) || die "JOBPROXY_DEV_ROOT is too long for unix socket paths: $SPOOL_DIR"

    ensure_packages
    ensure_munge

    # Something half-up (one daemon died, node drained by a crash...): restart both.
    # Running jobs survive this, their slurmstepd processes are independent.
    stop_restd
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    others="$(other_pids slurmctld)$(other_pids slurmd)"
    [[ -z $others ]] || die "Slurm daemons not started from $ROOT are running (pids: $others); stop them first"

    ensure_jwt_key
    write_config "$mode"
    log "config $CONF (enforcement: $([[ $mode == v1 ]] && echo cgroup v1 || echo 'no cgroups, OverMemoryKill'))"

    spawn "$LOG_DIR/slurmctld.out" slurmctld -f "$CONF" \
        || fail "slurmctld failed to start"
    wait_for "$TIMEOUT" "slurmctld to answer" ctld_up
    spawn "$LOG_DIR/slurmd.out" slurmd -f "$CONF" \
        || fail "slurmd failed to start"
    # After an unclean stop the saved node state may be DOWN/DRAIN: resume it once.
    local deadline=$((SECONDS + TIMEOUT)) resumed=0 state
    until node_usable; do
        ((SECONDS < deadline)) || fail "timed out waiting for node $NODE (state: $(node_state || echo '?'))"
        daemon_pid slurmd "$SLURMD_PID" >/dev/null || fail "slurmd exited"
        daemon_pid slurmctld "$CTLD_PID" >/dev/null || fail "slurmctld exited"
        state=$(node_state || true)
        if ((!resumed)) && [[ $state =~ DRAIN|DOWN ]] && [[ ! $state =~ \* ]]; then
            log "node state $state: resuming"
            timeout 10 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.2
    done

    # Smoke test: a real job step through slurmd/slurmstepd. A smoke allocation that
    # a killed slurmctld never saw end would hold a core until its 1-minute limit.
    timeout 10 scancel --quiet --name=jobproxy-dev-smoke >/dev/null 2>&1 || true
    timeout "$TIMEOUT" srun --quiet --job-name=jobproxy-dev-smoke --time=1 --mem=64 \
        --ntasks=1 --chdir=/ true </dev/null >"$LOG_DIR/smoke.out" 2>&1 9>&- \
        || { cat "$LOG_DIR/smoke.out" >&2; fail "smoke test 'srun true' failed"; }
    start_restd
    log "up in $((SECONDS - t0)) s: node $NODE $(node_state); eval \"\$($0 env)\" to use it"
}

cmd_stop() {
    mkdir -p "$ROOT"
    take_lock
    stop_restd
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    log "stopped (munged left running)"
}

cmd_status() {
    if healthy; then
        if restd_healthy; then
            printf 'slurm: up, node %s %s, SLURM_CONF=%s, slurmrestd http://127.0.0.1:%s\n' \
                "$NODE" "$(node_state)" "$CONF" "$RESTD_PORT"
            return 0
        fi
        printf 'slurm: up, node %s %s, but slurmrestd does not answer on 127.0.0.1:%s\n' \
            "$NODE" "$(node_state)" "$RESTD_PORT"
        return 1
    fi
    printf 'slurm: down or unusable (SLURM_CONF=%s)\n' "$CONF"
    return 1
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
    printf 'export JOBPROXY_SLURMRESTD_URL=%q\n' "http://127.0.0.1:$RESTD_PORT"
}

dispatch "$@"
