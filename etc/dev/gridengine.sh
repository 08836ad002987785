#!/usr/bin/env bash
#
# etc/dev/gridengine.sh - a real single-host Grid Engine cluster (8.1.9, Debian packages) with
# DRMAA v1, for the test suite and CI.
#
# Usage: etc/dev/gridengine.sh start|stop|status|env
#
#   start   Idempotent. Installs the Debian packages if missing, configures the cell, starts
#           sge_qmaster and sge_execd, and waits (GRIDENGINE_START_TIMEOUT seconds, default 60)
#           until `qsub -sync y -b y /bin/true` succeeds. Does nothing when the cluster is already
#           up, healthy and configured. On failure: a message and the tail of the daemon logs on
#           stderr, exit status 1.
#   stop    Idempotent. Stops sge_execd, then sge_qmaster, and waits until both processes are
#           really gone (GRIDENGINE_STOP_TIMEOUT seconds each, default 60, then SIGKILL). Jobs that
#           are still running are left alone (their sge_shepherd survives, as in Grid Engine).
#   status  Exit 0 if both daemons run and the queue instance accepts jobs, 1 otherwise.
#   env     Prints `export NAME=value` lines to eval before starting a DRMAA client
#           (eval "$(etc/dev/gridengine.sh env)"). Needs neither root nor a running cluster.
#
# The machine: Debian 12, root, no systemd as PID 1. Grid Engine listens on TCP 6444 (qmaster)
# and 6445 (execd); it shares nothing with the Slurm dev cluster (6817/6818 + munge) but some
# libraries, which is why this script never purges or autoremoves packages.

set -euo pipefail

readonly SGE_ROOT=/var/lib/gridengine
readonly SGE_CELL=default
readonly SGE_QMASTER_PORT=6444
readonly SGE_EXECD_PORT=6445
export SGE_ROOT SGE_CELL SGE_QMASTER_PORT SGE_EXECD_PORT

readonly COMMON_DIR=$SGE_ROOT/$SGE_CELL/common
readonly SPOOL_DIR=/var/spool/gridengine
readonly QMASTER_SPOOL=$SPOOL_DIR/qmaster
readonly EXECD_SPOOL=$SPOOL_DIR/execd
readonly ADMIN_USER=sgeadmin
readonly DRMAA_LIBRARY=/usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0
# libdrmaa pulls in libjemalloc, whose initial-exec TLS does not fit glibc's default static TLS
# surplus when the library is dlopen()ed ("cannot allocate memory in static TLS block").
readonly TLS_TUNABLE=glibc.rtld.optional_static_tls=16384
readonly PACKAGES=(gridengine-master gridengine-exec gridengine-client gridengine-drmaa1.0)
# Where the daemons' own stdout/stderr go (messages before they daemonize and open their logs).
readonly STARTUP_LOG=$SPOOL_DIR/dev-startup.log

readonly QUEUE=all.q
readonly HOSTGROUP=@allhosts
readonly PE=smp
readonly CHECK_JOB_NAME=gridengine-sh-check

START_TIMEOUT=${GRIDENGINE_START_TIMEOUT:-60}
STOP_TIMEOUT=${GRIDENGINE_STOP_TIMEOUT:-60}

# start and stop hold this lock, so that concurrent callers (parallel test runs) take turns.
# It is held on file descriptor 9.
readonly LOCK_FILE=/tmp/gridengine-sh.lock

# Scratch files of this run, removed on exit.
WORK_DIR=

log() { printf 'gridengine.sh: %s\n' "$*" >&2; }
# shellcheck source=etc/dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cleanup() {
    if [[ -n $WORK_DIR ]]; then
        rm -rf "$WORK_DIR"
    fi
}
trap cleanup EXIT

work_dir() {
    if [[ -z $WORK_DIR ]]; then
        WORK_DIR=$(mktemp -d /tmp/gridengine-sh.XXXXXX)
    fi
}

# Prints the last lines of every log that may explain a failure.
show_logs() {
    local file
    # (sge_execd names its spool directory after the name qmaster resolves it to, "localhost"
    # here, hence the glob.)
    for file in "$STARTUP_LOG" "$QMASTER_SPOOL/messages" "$EXECD_SPOOL"/*/messages \
        /tmp/qmaster_messages /tmp/execd_messages.*; do
        if [[ -s $file ]]; then
            printf '\n==> %s (last 25 lines) <==\n' "$file" >&2
            tail -n 25 "$file" >&2
        fi
    done
}

die() {
    log "ERROR: $*"
    show_logs
    exit 1
}

take_lock() {
    exec 9>>"$LOCK_FILE"
    flock -w 600 9 || die "another gridengine.sh holds $LOCK_FILE"
}

# ---------------------------------------------------------------------------------------------
# Processes. PID 1 on these machines reaps slowly, so a dead daemon can linger as a zombie and
# `kill -0` still succeeds: only a process whose state is not Z counts as running.


# Prints the PIDs of live processes whose command name is exactly $1.
daemon_pids() {
    local pid
    for pid in $(pgrep -x "$1" || true); do
        if alive "$pid"; then
            echo "$pid"
        fi
    done
}

# The same, on one line.
pid_list() {
    local pids
    pids=$(daemon_pids "$1")
    echo "${pids//$'\n'/ }"
}

# wait_gone TIMEOUT PID...: succeeds once none of the PIDs is alive, fails after TIMEOUT seconds.
wait_gone() {
    local deadline=$((SECONDS + $1)) pid alive
    shift
    while :; do
        alive=false
        for pid in "$@"; do
            if alive "$pid"; then alive=true; fi
        done
        [[ $alive == false ]] && return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Runs a self-daemonizing Grid Engine daemon in its own session, detached from our stdio (a
# caller that captures our output must not wait for the daemon to close it) and without our
# lock's file descriptor (the daemon would hold the lock for ever).
launch() {
    (
        cd /
        exec 9>&-
        exec setsid "$@" </dev/null >>"$STARTUP_LOG" 2>&1
    )
}

# ---------------------------------------------------------------------------------------------
# Installation

install_packages() {
    [[ -n $(missing_packages "${PACKAGES[@]}") ]] || return 0
    log "installing ${PACKAGES[*]}"
    local host pkg
    host=$(hostname)
    # Answers for the packages' debconf questions: create cell "default" with this host as master.
    for pkg in gridengine-common gridengine-client gridengine-master gridengine-exec; do
        printf '%s shared/gridengineconfig boolean true\n' "$pkg"
        printf '%s shared/gridenginecell string %s\n' "$pkg" "$SGE_CELL"
        printf '%s shared/gridenginemaster string %s\n' "$pkg" "$host"
    done | debconf-set-selections
    # apt_install keeps maintainer scripts from starting daemons (Grid Engine's own and the mail
    # transport that bsd-mailx pulls in): we start Grid Engine ourselves, with our environment.
    work_dir
    apt_install "$WORK_DIR/apt.log" "${PACKAGES[@]}" || die "apt-get install ${PACKAGES[*]} failed"
    [[ -z $(missing_packages "${PACKAGES[@]}") ]] || die "packages still not installed: ${PACKAGES[*]}"
}

# The packages' maintainer scripts create the cell when debconf says so. Should the packages have
# been installed without that (shared/gridengineconfig false), do what their postinst would have.
ensure_cell() {
    if [[ -f $COMMON_DIR/bootstrap && -e $SPOOL_DIR/spooldb/sge ]]; then
        return 0
    fi
    log "creating cell $SGE_CELL in $SGE_ROOT"
    install -d -o "$ADMIN_USER" -g "$ADMIN_USER" -m 0755 "$SGE_ROOT/$SGE_CELL" "$COMMON_DIR" \
        "$QMASTER_SPOOL" "$QMASTER_SPOOL/job_scripts" "$SPOOL_DIR/spooldb" "$EXECD_SPOOL"
    if [[ ! -f $COMMON_DIR/bootstrap ]]; then
        install -m 0644 -o "$ADMIN_USER" -g "$ADMIN_USER" /usr/share/gridengine/default-bootstrap \
            "$COMMON_DIR/bootstrap"
    fi
    runuser -u "$ADMIN_USER" -- /usr/share/gridengine/scripts/init_cluster \
        "$SGE_ROOT" "$SGE_CELL" "$SPOOL_DIR/spooldb" "$ADMIN_USER" >&2 ||
        die "init_cluster failed"
}

# ---------------------------------------------------------------------------------------------
# Host names. Grid Engine compares the name a client's IP address resolves to with the host's
# own name. Here `hostname` resolves to 127.0.0.1, which resolves back to "localhost", and every
# command is refused ("client IP resolved to host name localhost ..."). host_aliases makes the
# reverse names aliases of the host name, without touching /etc/hosts.

sge_host() {
    hostname
}

check_host_name() {
    local host
    host=$(sge_host)
    getent hosts "$host" >/dev/null ||
        die "the host name $host does not resolve (add it to /etc/hosts)"
}

# The names this host's addresses resolve back to (other than the host name itself).
host_aliases_of() {
    local host=$1 addr
    {
        echo localhost
        for addr in $(getent ahosts "$host" | awk '{print $1}' | sort -u); do
            getent hosts "$addr" | awk '{for (i = 2; i <= NF; i++) print $i}'
        done
    } | awk -v host="$host" '$0 != host && !seen[$0]++'
}

# Writes $1 to file $2 (owned by the admin user) only if the content differs.
write_if_changed() {
    local content=$1 file=$2
    if [[ ! -f $file || $(cat "$file") != "$content" ]]; then
        printf '%s\n' "$content" >"$file"
        chown "$ADMIN_USER:$ADMIN_USER" "$file"
        chmod 0644 "$file"
    fi
}

write_host_files() {
    local host aliases
    host=$(sge_host)
    aliases=$(host_aliases_of "$host" | tr '\n' ' ')
    write_if_changed "$host" "$COMMON_DIR/act_qmaster"
    write_if_changed "$host ${aliases% }" "$COMMON_DIR/host_aliases"
}

# ---------------------------------------------------------------------------------------------
# Daemons

qmaster_answers() {
    qconf -sconf global >/dev/null 2>&1
}

start_qmaster() {
    if [[ -n $(daemon_pids sge_qmaster) ]]; then
        return 0
    fi
    log "starting sge_qmaster"
    rm -f /tmp/qmaster_messages
    launch /usr/sbin/sge_qmaster || die "sge_qmaster failed to start"
}

wait_qmaster() {
    local deadline=$1
    until qmaster_answers; do
        [[ -n $(daemon_pids sge_qmaster) ]] || die "sge_qmaster exited"
        ((SECONDS < deadline)) || die "sge_qmaster does not answer"
        sleep 0.2
    done
}

start_execd() {
    if [[ -n $(daemon_pids sge_execd) ]]; then
        return 0
    fi
    log "starting sge_execd"
    rm -f /tmp/execd_messages.*
    launch /usr/sbin/sge_execd || die "sge_execd failed to start"
}

# stop_daemon NAME: SIGTERM, wait, SIGKILL as a last resort. sge_qmaster takes 8-10 s.
stop_daemon() {
    local name=$1 pids
    pids=$(daemon_pids "$name")
    if [[ -z $pids ]]; then
        return 0
    fi
    pids=${pids//$'\n'/ }
    log "stopping $name (pid $pids)"
    # shellcheck disable=SC2086 # one PID per word
    kill -TERM $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    if ! wait_gone "$STOP_TIMEOUT" $pids; then
        log "$name did not stop within ${STOP_TIMEOUT}s: SIGKILL"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        # shellcheck disable=SC2086
        wait_gone 10 $pids || die "$name (pid $pids) survives SIGKILL"
    fi
}

# ---------------------------------------------------------------------------------------------
# Cluster configuration (needs a running qmaster; every step may be repeated).

# Prints a qconf dump from stdin with continued lines ("... \\" newline) joined into one and
# comments dropped, so that each attribute is one line.
join_lines() {
    sed -e ':a' -e '/\\$/N' -e 's/[[:space:]]*\\\n[[:space:]]*/ /' -e 'ta' | grep -v '^#'
}

# set_attrs FILE NAME VALUE...: replaces the value of each attribute NAME in a qconf dump.
set_attrs() {
    local file=$1 name value
    shift
    while (($# >= 2)); do
        name=$1 value=$2
        shift 2
        grep -q "^${name}[[:space:]]" "$file" || die "attribute $name missing in $file"
        sed -i "s|^${name}[[:space:]].*|$name $value|" "$file"
    done
}

# Runs qconf quietly (it reports every change on stderr); on failure dies with its output.
qconf_quiet() {
    local out
    out=$(qconf "$@" 2>&1) || die "qconf $* failed: $out"
}

# Adds the object from FILE with qconf -A<kind>, or replaces it with -M<kind> when it exists.
# add_or_modify KIND SHOW_OPTION NAME FILE
add_or_modify() {
    local kind=$1 show=$2 name=$3 file=$4
    if qconf "$show" "$name" >/dev/null 2>&1; then
        qconf_quiet "-M$kind" "$file"
    else
        qconf_quiet "-A$kind" "$file"
    fi
}

configure() {
    local host slots
    host=$(sge_host)
    slots=$(nproc)
    work_dir

    # Global configuration: let root (uid 0) submit, and flush accounting at once so that
    # `qacct -j ID` knows a job as soon as it has finished. The file name is the config name.
    # (A line whose name holds "=" is debris of a badly edited reporting_params: drop it.)
    qconf -sconf global | join_lines | awk '$1 !~ /=/' >"$WORK_DIR/global"
    set_attrs "$WORK_DIR/global" \
        min_uid 0 \
        min_gid 0 \
        reporting_params "accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00"
    qconf_quiet -Mconf "$WORK_DIR/global"

    # Scheduler: run every second and right after a submit or a finished job (default 15 s).
    qconf -ssconf | join_lines >"$WORK_DIR/sched"
    set_attrs "$WORK_DIR/sched" \
        schedule_interval 0:0:1 \
        flush_submit_sec 1 \
        flush_finish_sec 1
    qconf_quiet -Msconf "$WORK_DIR/sched"

    # This host is admin, submit and execution host.
    # (Lists are captured first: `qconf ... | grep -q` can fail on SIGPIPE under pipefail.)
    local list
    list=$(qconf -sh 2>/dev/null || true)
    grep -qxF "$host" <<<"$list" || qconf_quiet -ah "$host"
    list=$(qconf -ss 2>/dev/null || true)
    grep -qxF "$host" <<<"$list" || qconf_quiet -as "$host"
    cat >"$WORK_DIR/exechost" <<EOF
hostname              $host
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
    add_or_modify e -se "$host" "$WORK_DIR/exechost"

    cat >"$WORK_DIR/hostgroup" <<EOF
group_name $HOSTGROUP
hostlist   $host
EOF
    add_or_modify hgrp -shgrp "$HOSTGROUP" "$WORK_DIR/hostgroup"

    # Parallel environment smp: all slots of a job on one host (`-pe smp N`). Per-slot limits
    # (h_vmem, h_cpu, ...) are multiplied by N. control_slaves FALSE (no qrsh -inherit, which a
    # one-host PE does not need): with TRUE, a job killed for h_cpu is reported as failed
    # ("master task failed", DRMAA wasAborted) instead of as killed by SIGKILL.
    cat >"$WORK_DIR/pe" <<EOF
pe_name            $PE
slots              $slots
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary TRUE
qsort_args         NONE
EOF
    add_or_modify p -sp "$PE" "$WORK_DIR/pe"

    # Queue all.q: one slot per core, no load threshold (a busy test machine must not put the
    # queue into alarm state), PE smp.
    cat >"$WORK_DIR/queue" <<EOF
qname                 $QUEUE
hostlist              $HOSTGROUP
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               $PE
rerun                 FALSE
slots                 $slots
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
    add_or_modify q -sq "$QUEUE" "$WORK_DIR/queue"
}

# Succeeds when the running cluster already has the configuration configure() writes.
configured() {
    local host slots global sched queue pe hgrp
    host=$(sge_host)
    slots=$(nproc)
    global=$(qconf -sconf global 2>/dev/null) &&
        sched=$(qconf -ssconf 2>/dev/null) &&
        queue=$(qconf -sq "$QUEUE" 2>/dev/null) &&
        pe=$(qconf -sp "$PE" 2>/dev/null) &&
        hgrp=$(qconf -shgrp "$HOSTGROUP" 2>/dev/null) || return 1
    grep -qE '^min_uid[[:space:]]+0$' <<<"$global" &&
        grep -qE 'accounting_flush_time=00:00:00' <<<"$global" &&
        grep -qE '^schedule_interval[[:space:]]+0:0:1$' <<<"$sched" &&
        grep -qE "^slots[[:space:]]+$slots$" <<<"$queue" &&
        grep -qE "^pe_list[[:space:]]+$PE$" <<<"$queue" &&
        grep -qE "^load_thresholds[[:space:]]+NONE$" <<<"$queue" &&
        grep -qE '^allocation_rule[[:space:]]+[$]pe_slots$' <<<"$pe" &&
        grep -qE '^control_slaves[[:space:]]+FALSE$' <<<"$pe" &&
        grep -qE "^hostlist[[:space:]]+$host$" <<<"$hgrp"
}

# Succeeds when the queue instance on this host exists and has no state flag (u = execd
# unknown, E = error, d = disabled, a = alarm, s = suspended, ...).
queue_ok() {
    local line
    line=$(qstat -f -q "$QUEUE@$(sge_host)" 2>/dev/null) || return 1
    line=$(grep "^$QUEUE@" <<<"$line") || return 1
    # queuename qtype resv/used/tot load_avg arch [states]
    [[ $(awk '{print NF}' <<<"$line") -eq 5 ]]
}

running() {
    [[ -n $(daemon_pids sge_qmaster) && -n $(daemon_pids sge_execd) ]] && queue_ok
}

# Waits until the queue instance is usable, then runs a real job through the cluster.
wait_usable() {
    local deadline=$1 left out action
    # A queue left in error, disabled or suspended state (by a test, say) is put right.
    for action in -cq -e -usq; do
        qmod "$action" "$QUEUE" >/dev/null 2>&1 || true
    done
    until queue_ok; do
        [[ -n $(daemon_pids sge_execd) ]] || die "sge_execd exited"
        [[ -n $(daemon_pids sge_qmaster) ]] || die "sge_qmaster exited"
        ((SECONDS < deadline)) ||
            die "queue $QUEUE@$(sge_host) not usable after ${START_TIMEOUT}s: $(qstat -f 2>&1 | tail -n 3)"
        sleep 0.2
    done
    left=$((deadline - SECONDS))
    ((left > 5)) || left=5
    if ! out=$(timeout "$left" qsub -sync y -b y -N "$CHECK_JOB_NAME" -o /dev/null \
        -e /dev/null /bin/true 2>&1); then
        qdel "$CHECK_JOB_NAME" >/dev/null 2>&1 || true
        die "test job (qsub -sync y -b y /bin/true) failed or timed out after ${left}s: $out
$(qstat -f 2>&1)"
    fi
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_start() {
    take_lock
    install_packages
    ensure_cell
    check_host_name
    # The time budget starts after the (one-off) installation.
    local started=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    if running && configured; then
        log "already running"
        return 0
    fi
    mkdir -p "$(dirname "$STARTUP_LOG")"
    write_host_files
    start_qmaster
    wait_qmaster "$deadline"
    configure
    start_execd
    wait_usable "$deadline"
    log "up after $((SECONDS - started))s (sge_qmaster pid $(pid_list sge_qmaster), sge_execd pid $(pid_list sge_execd))"
}

cmd_stop() {
    take_lock
    if [[ -z $(daemon_pids sge_execd) && -z $(daemon_pids sge_qmaster) ]]; then
        log "not running"
        return 0
    fi
    local started=$SECONDS
    stop_daemon sge_execd
    stop_daemon sge_qmaster
    log "stopped after $((SECONDS - started))s"
}

cmd_status() {
    if running; then
        log "running"
        return 0
    fi
    log "not running"
    return 1
}

cmd_env() {
    cat <<EOF
export SGE_ROOT=$SGE_ROOT
export SGE_CELL=$SGE_CELL
export SGE_QMASTER_PORT=$SGE_QMASTER_PORT
export SGE_EXECD_PORT=$SGE_EXECD_PORT
export DRMAA_LIBRARY_PATH=$DRMAA_LIBRARY
export GLIBC_TUNABLES=$TLS_TUNABLE
EOF
}

dispatch "$@"
