#!/usr/bin/env bash
# Private PostgreSQL 15 cluster for JobProxy's tests and CI (the PostgreSQL task store, replicas).
#
#   etc/dev/postgresql.sh start    install Debian's postgresql (if missing), initdb once, start the server
#   etc/dev/postgresql.sh stop     stop the server this script started (pg_ctl stop -m fast)
#   etc/dev/postgresql.sh env      print `export JOBPROXY_TEST_PG_URL=...` and the password file's path, for `eval`
#   etc/dev/postgresql.sh status   exit 0 if the server answers
#
# The cluster is private: data, socket folder, log and password file live under
# ${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}/postgresql, owned by the postgres user, which runs initdb and
# pg_ctl; it listens on 127.0.0.1:${JOBPROXY_PG_PORT:-54329} only and never touches Debian's own
# cluster (/var/lib/postgresql). Clients log in as user `jobproxy` with a password (scram-sha-256)
# kept in a file beside the data, as a site's gateway would (the password never sits in a URL).
#
# Environment:
#   JOBPROXY_DEV_ROOT     root of the dev state (default /tmp/jobproxy-dev)
#   JOBPROXY_PG_PORT      the TCP port (default 54329)
set -euo pipefail

readonly DEV_ROOT="${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}"
readonly STATE="${DEV_ROOT}/postgresql"
readonly DATA="${STATE}/data"
readonly RUN="${STATE}/run"
readonly LOG="${STATE}/server.log"
readonly PASSFILE="${STATE}/password"
readonly LOCK="${STATE}/.lock"
readonly PORT="${JOBPROXY_PG_PORT:-54329}"
readonly BIN=/usr/lib/postgresql/15/bin
readonly USER_NAME=jobproxy DB_NAME=jobproxy

log() { printf 'postgresql.sh: %s\n' "$*" >&2; }
# shellcheck source=etc/dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Print a message and the tail of the daemon log, then exit 1.
die() { die_showing "$LOG" "$@"; }

as_postgres() { runuser -u postgres -- "$@"; }

server_pid() {
    local pid
    [[ -r "${DATA}/postmaster.pid" ]] || return 1
    pid=$(head -n 1 "${DATA}/postmaster.pid")
    alive "$pid" && printf '%s\n' "$pid"
}

answers() { "${BIN}/pg_isready" -q -h 127.0.0.1 -p "${PORT}" -t 2; }

psql_admin() { as_postgres "${BIN}/psql" -X -q -v ON_ERROR_STOP=1 -h "${RUN}" -p "${PORT}" -d postgres "$@"; }

cmd_start() {
    mkdir -p "${STATE}"
    exec 9>"${LOCK}"
    flock -w 300 9 || die "another postgresql.sh start/stop holds ${LOCK}"
    if [[ ! -x "${BIN}/initdb" ]]; then
        log "installing postgresql (Debian's PostgreSQL 15)"
        apt_install "${STATE}/apt.log" postgresql || die "could not install postgresql"
    fi
    [[ -x "${BIN}/initdb" ]] || die "${BIN}/initdb missing after installing postgresql"
    chown postgres: "${STATE}"
    if [[ ! -s "${PASSFILE}" ]]; then
        head -c 18 /dev/urandom | base64 | tr -d '/+=' >"${PASSFILE}"
        chmod 0644 "${PASSFILE}"  # a dev secret for the test user, readable by the tests
    fi
    if [[ ! -s "${DATA}/PG_VERSION" ]]; then
        log "initdb in ${DATA}"
        rm -rf "${DATA}"
        as_postgres "${BIN}/initdb" -D "${DATA}" -A scram-sha-256 -U postgres \
            --pwfile="${PASSFILE}" -E UTF8 --locale=C.UTF-8 >>"${LOG}" 2>&1 || die "initdb failed"
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "port = ${PORT}"
            echo "unix_socket_directories = '${RUN}'"
            echo "max_connections = 200"
            echo "shared_buffers = 64MB"
        } >>"${DATA}/postgresql.conf"
        # the admin (postgres) over the private socket without a password; everyone else with one
        printf 'local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256\n' >"${DATA}/pg_hba.conf"
    fi
    mkdir -p "${RUN}"
    chown postgres: "${RUN}"
    if ! server_pid >/dev/null; then
        log "starting the server on 127.0.0.1:${PORT}"
        touch "${LOG}" && chown postgres: "${LOG}"
        # 9>&-: the server must not inherit (and so hold) this script's lock
        as_postgres "${BIN}/pg_ctl" -D "${DATA}" -l "${LOG}" -w -t 60 start >/dev/null 9>&- || die "pg_ctl start failed"
    fi
    local try
    for try in $(seq 60); do
        answers && break
        sleep 0.5
    done
    answers || die "the server does not answer on 127.0.0.1:${PORT}"
    local password
    password=$(cat "${PASSFILE}")
    if [[ -z $(psql_admin -tA -c "SELECT 1 FROM pg_roles WHERE rolname = '${USER_NAME}'") ]]; then
        psql_admin -c "CREATE ROLE ${USER_NAME} LOGIN PASSWORD '${password}' CREATEDB"
    fi
    if [[ -z $(psql_admin -tA -c "SELECT 1 FROM pg_database WHERE datname = '${DB_NAME}'") ]]; then
        psql_admin -c "CREATE DATABASE ${DB_NAME} OWNER ${USER_NAME}"
    fi
    log "up: postgresql://${USER_NAME}@127.0.0.1:${PORT}/${DB_NAME}"
}

cmd_stop() {
    mkdir -p "${STATE}"
    exec 9>"${LOCK}"
    flock -w 300 9 || die "another postgresql.sh start/stop holds ${LOCK}"
    if server_pid >/dev/null; then
        as_postgres "${BIN}/pg_ctl" -D "${DATA}" -m fast -w -t 60 stop >/dev/null || die "pg_ctl stop failed"
        log "stopped"
    else
        log "not running"
    fi
}

cmd_status() {
    if server_pid >/dev/null && answers; then
        log "running (pid $(server_pid)) on 127.0.0.1:${PORT}"
        return 0
    fi
    log "not running"
    return 1
}

cmd_env() {
    printf 'export JOBPROXY_TEST_PG_URL=%q\n' "postgresql://${USER_NAME}@127.0.0.1:${PORT}/${DB_NAME}"
    printf 'export JOBPROXY_TEST_PG_PASSWORD_FILE=%q\n' "${PASSFILE}"
}

dispatch "${1:-}"
