#!/usr/bin/env bash
# Private Podman set-up for JobProxy's tests and CI.
#
#   etc/dev/podman.sh start    install (if missing) podman, write its private configuration, build
#                              the test image, and check that a container runs
#   etc/dev/podman.sh stop     remove leftover containers (every container of the private storage)
#   etc/dev/podman.sh env      print `export CONTAINERS_CONF=...` lines, for `eval "$(... env)"`
#   etc/dev/podman.sh status   exit 0 if podman answers with this configuration and the image exists
#
# Podman has no daemon: `start` only installs, configures and imports. All its state lives under
# ${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}/podman (storage, run root, tmp dir, locks, networks,
# events log); it never touches /var/lib/containers or /etc/containers. The podman CLI finds the
# configuration through CONTAINERS_CONF and CONTAINERS_STORAGE_CONF (see `env`). It is meant for a
# Debian 12 machine without systemd as PID 1, run as root, with hybrid cgroups (v1 controllers):
#   - runtime runc (crun fails on hybrid cgroups), cgroup manager cgroupfs, events to a file;
#   - default_ulimits nofile/nproc within this machine's hard limits (podman's defaults exceed them
#     and, without CAP_SYS_RESOURCE, the container would fail to start). A `--ulimit` on the command
#     line replaces these defaults, so callers adding one must repeat nofile/nproc: `env` prints
#     them as JOBPROXY_PODMAN_ULIMITS.
#
# No container registry is reachable, so the test image jobproxy-test/busybox:latest is built
# locally, as etc/dev/docker.sh does: busybox-static in an empty root file system, `busybox
# --install -s`, a minimal /etc/passwd and /tmp, then `podman import`. Run it with --pull=never.
#
# Environment:
#   JOBPROXY_DEV_ROOT          root of the dev state (default /tmp/jobproxy-dev)
#   JOBPROXY_PODMAN_TIMEOUT    seconds to wait for the lock / a podman command (default 60)
set -euo pipefail

readonly IMAGE="jobproxy-test/busybox:latest"
readonly DEV_ROOT="${JOBPROXY_DEV_ROOT:-/tmp/jobproxy-dev}"
readonly STATE="${DEV_ROOT}/podman"
readonly CONF="${STATE}/containers.conf"
readonly STORAGE_CONF="${STATE}/storage.conf"
readonly GRAPHROOT="${STATE}/storage"
readonly RUNROOT="${STATE}/run"
readonly TMP_DIR="${STATE}/tmp"
readonly NETWORKS="${STATE}/networks"
readonly EVENTS="${STATE}/events.log"
readonly BOOT_ID_FILE="${STATE}/boot_id"
readonly LOCK="${STATE}/.lock"
readonly TIMEOUT="${JOBPROXY_PODMAN_TIMEOUT:-60}"

# Podman finds conmon, runc, netavark and iptables on PATH or in libexec; Debian puts some in sbin.
export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
# Use the private configuration only, whatever the caller's environment says.
export CONTAINERS_CONF="${CONF}"
export CONTAINERS_STORAGE_CONF="${STORAGE_CONF}"
unset CONTAINER_HOST CONTAINER_CONNECTION CONTAINERS_REGISTRIES_CONF

log() { printf 'podman.sh: %s\n' "$*" >&2; }
# shellcheck source=etc/dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# podman, bounded in time, without the lock's file descriptor (conmon outlives the command).
pm() {
    timeout "${TIMEOUT}" podman "$@" 9>&-
}

# Install whatever is missing: podman with runc (its dependency is `crun | runc`, and crun fails on
# hybrid cgroups), catatonit for --init and netavark for bridge networks and port mappings (both
# only recommended), iptables (netavark's firewall), busybox-static (the test image).
ensure_packages() {
    local pkgs=()
    mapfile -t pkgs < <(missing_packages podman runc catatonit netavark iptables busybox-static)
    if ((${#pkgs[@]})); then
        log "apt-get install ${pkgs[*]}"
        mkdir -p "${STATE}"
        apt_install "${STATE}/apt.log" "${pkgs[@]}" || die "could not install ${pkgs[*]} (log: ${STATE}/apt.log)"
    fi
    command -v podman >/dev/null || die "no podman on PATH after installing podman"
    command -v runc >/dev/null || die "no runc on PATH after installing runc"
}

# The init podman's --init runs as PID 1 (Debian: /usr/bin/catatonit; older: /usr/libexec/podman).
init_path() {
    local path
    for path in /usr/libexec/podman/catatonit /usr/bin/catatonit; do
        [[ -x "${path}" ]] && { echo "${path}"; return 0; }
    done
    die "catatonit not found although the package is installed"
}

# A hard limit of this shell (ulimit option $1), capped at $2 (podman's default) or if unlimited.
hard_limit() {
    local value
    value="$(ulimit -H "$1")"
    if [[ "${value}" == unlimited ]] || ((value > $2)); then
        value="$2"
    fi
    echo "${value}"
}

# nofile and nproc limits containers get by default: this machine's hard limits (soft = hard, as
# podman's own defaults have it), capped at podman's defaults for nofile and at 32768 for nproc:
# the podman 4.3 process runs with an nproc hard limit of 32768 (seen here although the shell's is
# higher), and a container cannot be given more than the process that creates it has.
default_ulimits() {
    local nofile nproc
    nofile="$(hard_limit -n 1048576)"
    nproc="$(hard_limit -u 32768)"
    printf 'nofile=%s:%s nproc=%s:%s\n' "${nofile}" "${nofile}" "${nproc}" "${nproc}"
}

# Write both configuration files (each time: they are cheap, and the limits may have changed).
write_config() {
    local nofile nproc init
    read -r nofile nproc <<<"$(default_ulimits)"
    init="$(init_path)"
    mkdir -p "${GRAPHROOT}" "${RUNROOT}" "${TMP_DIR}" "${NETWORKS}"
    cat >"${CONF}.tmp" <<EOF
# Written by etc/dev/podman.sh: podman for JobProxy's tests, all state under ${STATE}.
[containers]
default_ulimits = ["${nofile}", "${nproc}"]
init_path = "${init}"
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "${EVENTS}"
tmp_dir = "${TMP_DIR}"
volume_path = "${STATE}/volumes"
# File locks under tmp_dir, not the machine-wide /dev/shm/libpod_lock another podman may use.
lock_type = "file"

[network]
network_backend = "netavark"
network_config_dir = "${NETWORKS}"
EOF
    mv -f "${CONF}.tmp" "${CONF}"
    cat >"${STORAGE_CONF}.tmp" <<EOF
# Written by etc/dev/podman.sh.
[storage]
driver = "vfs"
graphroot = "${GRAPHROOT}"
runroot = "${RUNROOT}"
EOF
    mv -f "${STORAGE_CONF}.tmp" "${STORAGE_CONF}"
}

# The run root and tmp dir hold the state of running containers; podman expects them on a tmpfs
# that a reboot empties. Here they are on disk, so after a reboot empty them by hand (podman then
# refreshes its database: containers that ran are marked stopped) and answer true: the containers
# still recorded are dead leftovers to remove.
reset_after_reboot() {
    local boot_id old=""
    boot_id="$(cat /proc/sys/kernel/random/boot_id)"
    [[ -f "${BOOT_ID_FILE}" ]] && old="$(cat "${BOOT_ID_FILE}")"
    echo "${boot_id}" >"${BOOT_ID_FILE}.tmp"
    mv -f "${BOOT_ID_FILE}.tmp" "${BOOT_ID_FILE}"
    if [[ -n "${old}" && "${old}" != "${boot_id}" ]]; then
        log "machine rebooted since the last start: emptying ${RUNROOT} and ${TMP_DIR}"
        rm -rf "${RUNROOT}" "${TMP_DIR}"
        mkdir -p "${RUNROOT}" "${TMP_DIR}"
        return 0
    fi
    return 1
}

podman_answers() {
    [[ -f "${CONF}" && -f "${STORAGE_CONF}" ]] && pm info >/dev/null 2>&1
}

image_exists() {
    pm image exists "${IMAGE}" >/dev/null 2>&1
}

# Build the test image from busybox-static by import.
build_image() {
    local rootfs="${STATE}/build/rootfs"
    busybox_rootfs "${rootfs}"
    log "importing ${IMAGE}"
    tar --numeric-owner --owner=0 --group=0 -C "${rootfs}" -cf - . \
        | pm import --quiet \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/sh"]' \
            - "${IMAGE}" >/dev/null \
        || die "podman import of ${IMAGE} failed"
    rm -rf "${STATE}/build"
}

# Remove every container of the private storage (running or not).
remove_all_containers() {
    local ids
    ids="$(pm ps --all --quiet 2>/dev/null || true)"
    if [[ -n "${ids}" ]]; then
        log "removing leftover containers: $(echo "${ids}" | tr '\n' ' ')"
        pm rm --force --all --time 0 >/dev/null 2>&1 || log "could not remove every container"
    fi
}

# Run a throw-away container: the configuration really works (runtime, cgroups, limits, init).
smoke_test() {
    local name out nofile nproc
    name="jobproxy-podman-sh-check-$$"
    read -r nofile nproc <<<"$(default_ulimits)"
    # Any --ulimit replaces default_ulimits: repeat nofile/nproc, as JobProxy has to.
    out="$(pm run --rm --name "${name}" --init --pull=never --memory 32m --memory-swap 32m \
        --ulimit cpu=60:65 --ulimit "${nofile}" --ulimit "${nproc}" "${IMAGE}" sh -c 'echo ok' 2>&1)" \
        || { pm rm --force "${name}" >/dev/null 2>&1 || true; die "a test container did not run: ${out}"; }
    [[ "${out}" == ok ]] || die "a test container printed '${out}' instead of 'ok'"
}

# Serialise start/stop between concurrent callers (bounded, so a stuck holder cannot hang CI).
take_lock() {
    exec 9>"${LOCK}"
    flock -w "${TIMEOUT}" 9 || die "another podman.sh start/stop holds ${LOCK} for more than ${TIMEOUT} s"
}

cmd_start() {
    mkdir -p "${STATE}"
    take_lock
    ensure_packages
    write_config
    local rebooted=0
    reset_after_reboot && rebooted=1
    podman_answers || die "podman does not work with ${CONF}: $(pm info 2>&1 | tail -n 5)"
    # Unlike a fresh Docker engine, `start` leaves containers alone: with no daemon there is no
    # "already running" to tell a second caller (another test session) from the first, and its
    # containers must survive. `stop` removes them; after a reboot they are dead anyway.
    if ((rebooted)); then
        remove_all_containers
    fi
    image_exists || build_image
    smoke_test
    log "ready: CONTAINERS_CONF=${CONF}, image ${IMAGE}"
}

cmd_stop() {
    [[ -f "${CONF}" ]] || return 0
    take_lock
    command -v podman >/dev/null || return 0
    remove_all_containers
    log "stopped"
}

cmd_env() {
    printf 'export CONTAINERS_CONF=%q\n' "${CONF}"
    printf 'export CONTAINERS_STORAGE_CONF=%q\n' "${STORAGE_CONF}"
    printf 'export JOBPROXY_PODMAN_TEST_IMAGE=%q\n' "${IMAGE}"
    # (Not %q: it would escape the comma.)
    printf "export JOBPROXY_PODMAN_ULIMITS='%s'\n" "$(default_ulimits | tr ' ' ',')"
}

cmd_status() {
    if ! command -v podman >/dev/null; then
        log "podman is not installed"
        return 1
    fi
    if ! podman_answers; then
        log "podman does not answer with ${CONF}"
        return 1
    fi
    if ! image_exists; then
        log "podman works, image ${IMAGE} missing"
        return 1
    fi
    log "podman works with ${CONF}, image ${IMAGE} present"
}

dispatch "$@"
