# shellcheck shell=bash
# Shared helpers of the dev-cluster scripts in etc/dev (sourced, not run). The caller defines
# `log MESSAGE` before sourcing, and may redefine `die` after it (e.g. to show a daemon's log). Written for Debian 12 as root, without systemd as PID 1.

# die MESSAGE: say what went wrong and exit 1.
die() {
    log "ERROR: $*"
    exit 1
}

# die_showing LOGFILE MESSAGE: say what went wrong, then the last lines of a daemon's LOGFILE, and
# exit 1 (a script whose daemon writes a log redefines `die` with it).
die_showing() {
    local file=$1
    shift
    log "ERROR: $*"
    if [[ -s $file ]]; then
        log "last lines of $file:"
        tail -n 30 "$file" | sed 's/^/    /' >&2
    fi
    exit 1
}

# alive PID: PID is a live process. PID 1 reaps slowly here, so a dead daemon can linger as a
# zombie for a while and `kill -0` alone would still succeed: read its state from /proc.
alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }    # the fields after "pid (comm) "; comm may hold spaces and parentheses
    [[ ${stat%% *} != [ZX] ]]
}

# missing_packages PKG...: print those of the Debian packages that are not installed.
missing_packages() {
    local pkg
    for pkg in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] || printf '%s\n' "$pkg"
    done
}

# apt_install LOG PKG...: install Debian packages non-interactively, output to LOG, without
# letting their maintainer scripts start any daemon (a policy-rc.d that refuses, created only if
# there is none and removed after). Another dev script may run apt at the same moment: installs
# wait for dpkg's lock, and a lock failure of `apt-get update` (which does not wait) is retried.
apt_install() {
    local out=$1 policy=/usr/sbin/policy-rc.d created=0 rc=0
    shift
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from JobProxy etc/dev\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created=1
    fi
    _apt "$out" update && _apt "$out" install --no-install-recommends "$@" || rc=$?
    if ((created)); then rm -f "$policy"; fi
    if ((rc != 0)); then
        tail -n 20 "$out" >&2
        return "$rc"
    fi
}

# _apt LOG ARGS...: one apt-get call, retried while another apt holds a lock.
_apt() {
    local out=$1 try
    shift
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
            -o Dpkg::Options::=--force-confold "$@" >>"$out" 2>&1; then
            return 0
        fi
        grep -q 'Could not get lock' "$out" || return 1
        log "apt-get $1: another apt holds a lock, retrying (try $try)"
        sleep 5
    done
    return 1
}

# dispatch COMMAND: run the script's cmd_start, cmd_stop (both as root), cmd_status or cmd_env.
dispatch() {
    case ${1:-} in
        start | stop)
            [[ $EUID -eq 0 ]] || { log "$1 must run as root"; exit 1; }
            "cmd_$1" ;;
        status | env) "cmd_$1" ;;
        *)
            printf 'usage: %s start|stop|status|env\n' "$0" >&2
            exit 2
            ;;
    esac
}

# busybox_rootfs DIR: a minimal root file system in DIR (emptied first) for the test image:
# busybox-static with a symlink for every applet at its usual place (/bin/sh, /usr/bin/nc, ...),
# /tmp, a passwd and group file with root and nobody, and the files engines bind-mount over.
busybox_rootfs() {
    local rootfs=$1 busybox=/bin/busybox
    [[ -x $busybox ]] || die "$busybox missing although busybox-static is installed"
    rm -rf "$rootfs"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,data,var/tmp}
    mkdir -m 1777 "$rootfs/tmp"
    cp "$busybox" "$rootfs/bin/busybox"
    chroot "$rootfs" /bin/busybox --install -s
    [[ -L $rootfs/bin/sh ]] || die "busybox --install -s did not create /bin/sh"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    : >"$rootfs/etc/hosts"
    : >"$rootfs/etc/hostname"
    : >"$rootfs/etc/resolv.conf"
}
