#!/usr/bin/env bash
# Private Docker engine for JobProxy's tests and CI.
#
#   etc/dev/docker.sh start    install (if missing) and start the engine, build the test image
#   etc/dev/docker.sh stop     remove leftover containers, stop dockerd and its containerd
#   etc/dev/docker.sh env      print `export DOCKER_HOST=...` lines, for `eval "$(... env)"`
#   etc/dev/docker.sh status   exit 0 if the engine answers and the test image exists
#
# The engine is private: all its state lives under ${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}/docker
# (data-root, exec-root, pidfile, log, socket) and it never touches /var/lib/docker or
# /var/run/docker.sock. It is meant for a Debian 12 machine without systemd as PID 1, run as root.
#
# No container registry is reachable, so the test image jobproxy-test/busybox:latest is built
# locally: busybox-static copied into an empty root file system, `busybox --install -s`, a minimal
# /etc/passwd and /tmp, then `docker import`. Containers from it must be run with --pull=never.
#
# Environment:
#   JOBPROXY_DEV_ROOT          root of the dev state (default /tmp/jobproxy-dev)
#   JOBPROXY_DOCKER_TIMEOUT    seconds to wait for the engine to answer / to stop (default 60)
set -euo pipefail

readonly IMAGE="jobproxy-test/busybox:latest"
readonly DEV_ROOT="${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}"
readonly STATE="${DEV_ROOT}/docker"
readonly SOCK="${STATE}/docker.sock"
readonly DATA_ROOT="${STATE}/data"
readonly EXEC_ROOT="${STATE}/exec"
readonly PIDFILE="${STATE}/dockerd.pid"
readonly LOG="${STATE}/dockerd.log"
readonly CONFIG="${STATE}/daemon.json"
readonly LOCK="${STATE}/.lock"
readonly TIMEOUT="${JOBPROXY_DOCKER_TIMEOUT:-60}"
# Containers go under a cgroup of their own (not the shared /docker), named after the state
# directory, so that leftovers of a hard-killed engine can be found and killed.
CGROUP_PARENT="jobproxy-docker-$(printf '%s' "${STATE}" | cksum | cut -d' ' -f1)"
readonly CGROUP_PARENT

# dockerd finds containerd, runc, docker-init and docker-proxy on PATH; Debian puts some in sbin.
export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
# Talk to the private engine only, whatever the caller's environment says.
export DOCKER_HOST="unix://${SOCK}"
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH

log() { printf 'docker.sh: %s\n' "$*" >&2; }
# shellcheck source=etc/dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Print a message and the tail of the daemon log, then exit 1.
die() { die_showing "$LOG" "$@"; }


# The command line of PID with spaces between the arguments (fails if PID is gone).
cmdline_of() {
    tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline"
}

# PIDs of live processes whose name (/proc/PID/comm) matches the glob $1 and whose command line
# contains every one of the other arguments.
pids_matching() {
    local name_glob="$1" dir pid comm cmdline word ok
    shift
    for dir in /proc/[0-9]*; do
        pid="${dir#/proc/}"
        comm="$(cat 2>/dev/null "${dir}/comm")" || continue
        # shellcheck disable=SC2053  # name_glob is a glob on purpose
        [[ "${comm}" == ${name_glob} ]] || continue
        cmdline="$(cmdline_of "${pid}")" || continue
        ok=1
        for word in "$@"; do
            [[ "${cmdline}" == *"${word}"* ]] || { ok=0; break; }
        done
        if ((ok)) && alive "${pid}"; then
            echo "${pid}"
        fi
    done
}

# PID of our dockerd, if it runs: from the pidfile, else found by its exec-root.
dockerd_pid() {
    local pid=""
    if [[ -s "${PIDFILE}" ]]; then
        pid="$(cat "${PIDFILE}" 2>/dev/null || true)"
        if alive "${pid}" && [[ "$(cat 2>/dev/null "/proc/${pid}/comm" || true)" == dockerd ]]; then
            echo "${pid}"
            return 0
        fi
    fi
    pid="$(pids_matching dockerd "--exec-root ${EXEC_ROOT}")"
    pid="${pid%%$'\n'*}"
    [[ -n "${pid}" ]] && echo "${pid}"
}

# True if the engine answers on our socket (bounded: a hung daemon must not hang the caller).
engine_answers() {
    [[ -S "${SOCK}" ]] && timeout 10 docker version >/dev/null 2>&1
}

image_exists() {
    timeout 20 docker image inspect "${IMAGE}" >/dev/null 2>&1
}

# Install whatever of docker.io / busybox-static is missing.
ensure_packages() {
    local pkgs=()
    if ! command -v dockerd >/dev/null || ! command -v containerd >/dev/null \
        || ! command -v runc >/dev/null; then
        pkgs+=(docker.io)
    fi
    [[ -z $(missing_packages busybox-static) ]] || pkgs+=(busybox-static)
    if ((${#pkgs[@]})); then
        log "apt-get install ${pkgs[*]}"
        mkdir -p "${STATE}"
        apt_install "${STATE}/apt.log" "${pkgs[@]}" || die "could not install ${pkgs[*]} (log: ${STATE}/apt.log)"
    fi
    # Debian's docker.io brings its own CLI; a newer one may already be first on PATH.
    command -v docker >/dev/null || die "no docker CLI on PATH after installing docker.io"
    command -v dockerd >/dev/null || die "dockerd not found after installing docker.io"
}

# Build the test image from busybox-static by import.
build_image() {
    [[ -z $(missing_packages busybox-static) ]] || { mkdir -p "${STATE}"; apt_install "${STATE}/apt.log" busybox-static; } \
        || die "could not install busybox-static (log: ${STATE}/apt.log)"
    local rootfs="${STATE}/build/rootfs"
    busybox_rootfs "${rootfs}"
    log "importing ${IMAGE}"
    tar --numeric-owner --owner=0 --group=0 -C "${rootfs}" -cf - . \
        | timeout 120 docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/sh"]' \
            - "${IMAGE}" >/dev/null \
        || die "docker import of ${IMAGE} failed"
    rm -rf "${STATE}/build"
}

ensure_image() {
    image_exists || build_image
}

# Remove pidfiles whose process is gone or a zombie. dockerd refuses to start while /proc/<pid>
# of its old pidfile exists, and it waits in vain for a "still running" managed containerd whose
# pid answers kill -0 - both still the case for a zombie.
clear_stale_pidfiles() {
    local file
    for file in "${PIDFILE}" "${EXEC_ROOT}/containerd/containerd.pid"; do
        if [[ -e "${file}" ]] && ! alive "$(cat "${file}" 2>/dev/null || true)"; then
            rm -f "${file}"
        fi
    done
}

# Clean up what a dead (e.g. SIGKILLed) engine leaves behind: its containerd and shims, the
# container processes (found through our cgroup parent), their cgroups, mounts under the state
# directory, stale pidfiles and the socket. Call only when our dockerd is not running.
cleanup_leftovers() {
    # containerd and shims serving this exec-root only.
    # shellcheck disable=SC2046  # one pid per word
    terminate $(pids_matching 'containerd*' "${EXEC_ROOT}/containerd")
    # Container processes outlive their shims; kill them and remove their cgroups.
    local dirs=() dir pids=() pid
    for dir in /sys/fs/cgroup/*/"${CGROUP_PARENT}" /sys/fs/cgroup/"${CGROUP_PARENT}"; do
        [[ -d "${dir}" ]] && dirs+=("${dir}")
    done
    if ((${#dirs[@]})); then
        while read -r pid; do
            alive "${pid}" && pids+=("${pid}")
        done < <(find "${dirs[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un)
        if ((${#pids[@]})); then
            log "killing leftover container processes: ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
            wait_gone "${pids[@]}" || log "still alive after SIGKILL: ${pids[*]}"
        fi
        # Deepest first; a cgroup whose last process is still exiting may refuse once: retry.
        for _ in 1 2 3 4 5; do
            find "${dirs[@]}" -depth -type d -exec rmdir {} + 2>/dev/null && break
            sleep 0.2
        done
    fi
    # Mounts under our state (container shm, network namespaces).
    local mnt
    awk -v prefix="${STATE}/" 'index($5, prefix) == 1 {print $5}' /proc/self/mountinfo \
        | sort -r | while read -r mnt; do
            umount -l "${mnt}" 2>/dev/null || true
        done
    rm -f "${SOCK}"
    clear_stale_pidfiles
}

# Remove every container of the engine (running or not).
remove_all_containers() {
    local ids
    ids="$(timeout 20 docker ps -aq 2>/dev/null || true)"
    if [[ -n "${ids}" ]]; then
        log "removing leftover containers: $(echo "${ids}" | tr '\n' ' ')"
        # shellcheck disable=SC2086  # one id per word
        timeout 60 docker rm -f ${ids} >/dev/null 2>&1 || log "could not remove every container"
    fi
}

start_engine() {
    ensure_packages
    cleanup_leftovers
    mkdir -p "${DATA_ROOT}" "${EXEC_ROOT}"
    # An empty config file keeps a system /etc/docker/daemon.json out of the private engine.
    [[ -s "${CONFIG}" ]] || echo '{}' >"${CONFIG}"
    rm -f "${SOCK}"
    # Keep the log bounded across many starts: one old generation.
    if [[ -f "${LOG}" ]] && (($(stat -c %s "${LOG}") > 20 * 1024 * 1024)); then
        mv -f "${LOG}" "${LOG}.1"
    fi
    log "starting dockerd (log: ${LOG})"
    printf '\n==== %s docker.sh start ====\n' "$(date -Is)" >>"${LOG}"
    # setsid + nohup: the daemon outlives this script and its terminal. 9>&-: the daemon must not
    # inherit the lock's file descriptor, or it would hold the lock for as long as it runs.
    setsid nohup dockerd \
        --config-file "${CONFIG}" \
        --storage-driver vfs \
        --data-root "${DATA_ROOT}" \
        --exec-root "${EXEC_ROOT}" \
        --pidfile "${PIDFILE}" \
        --cgroup-parent "/${CGROUP_PARENT}" \
        --host "unix://${SOCK}" \
        >>"${LOG}" 2>&1 </dev/null 9>&- &
    local pid=$! waited=0
    # Bounded wait until the engine answers.
    until engine_answers; do
        alive "${pid}" || die "dockerd (pid ${pid}) exited during start-up"
        if ((waited >= TIMEOUT * 5)); then
            die "dockerd (pid ${pid}) did not answer on ${SOCK} within ${TIMEOUT} s"
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    log "dockerd up (pid ${pid}) after ~$((waited / 5)) s"
    # Containers of an engine that died without `stop` are still recorded in the data-root (as
    # "Exited (255)") and would clash with the names tests use: a fresh engine starts empty.
    remove_all_containers
}

# Serialise start/stop between concurrent callers (bounded, so a stuck holder cannot hang CI).
take_lock() {
    exec 9>"${LOCK}"
    flock -w "${TIMEOUT}" 9 || die "another docker.sh start/stop holds ${LOCK} for more than ${TIMEOUT} s"
}

cmd_start() {
    mkdir -p "${STATE}"
    take_lock
    # Unix socket paths are limited to 107 bytes (containerd's socket lives under the exec-root).
    local longest="${EXEC_ROOT}/containerd/containerd.sock.ttrpc"
    ((${#longest} < 100)) || die "JOBPROXY_DEV_ROOT is too long for unix socket paths: ${longest}"
    if ! engine_answers; then
        local running
        running="$(dockerd_pid || true)"
        if [[ -n "${running}" ]]; then
            die "dockerd runs (pid ${running}) but does not answer on ${SOCK}; run '$0 stop'"
        fi
        start_engine
    fi
    ensure_image
    log "ready: ${DOCKER_HOST}, image ${IMAGE}"
}

# Wait (bounded by TIMEOUT) until each PID is gone or a zombie; fail if some are still alive.
wait_gone() {
    local pid waited=0 left
    while :; do
        left=()
        for pid in "$@"; do
            alive "${pid}" && left+=("${pid}")
        done
        ((${#left[@]})) || return 0
        ((waited < TIMEOUT * 5)) || return 1
        sleep 0.2
        waited=$((waited + 1))
    done
}

# SIGTERM the PIDs, wait until they are gone, SIGKILL those still running after TIMEOUT.
terminate() {
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait_gone "$@" && return 0
    log "still running after ${TIMEOUT} s, sending SIGKILL: $*"
    kill -KILL "$@" 2>/dev/null || true
    wait_gone "$@" || log "still alive after SIGKILL: $*"
}

cmd_stop() {
    [[ -d "${STATE}" ]] || return 0
    take_lock
    local pid
    if engine_answers; then
        remove_all_containers
    fi
    pid="$(dockerd_pid || true)"
    if [[ -n "${pid}" ]]; then
        log "stopping dockerd (pid ${pid})"
        terminate "${pid}"
    fi
    # dockerd stops its containerd itself; this is for what a hard kill left behind.
    cleanup_leftovers
    log "stopped"
}

cmd_env() {
    printf 'export DOCKER_HOST=%q\n' "unix://${SOCK}"
    printf 'export JOBPROXY_DOCKER_TEST_IMAGE=%q\n' "${IMAGE}"
}

cmd_status() {
    if ! engine_answers; then
        log "engine does not answer on ${SOCK}"
        return 1
    fi
    if ! image_exists; then
        log "engine up, image ${IMAGE} missing"
        return 1
    fi
    log "engine up on ${DOCKER_HOST}, image ${IMAGE} present"
}

dispatch "$@"
