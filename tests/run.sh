#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine:
#   1. a virtualenv (.venv) with JobProxy and its test extras, and what the TES client tests need
#      fetched once ($JOBPROXY_TEST_DEPS, default .venv/test-deps), so that no test reaches the package index;
#   2. the linters, ruff and mypy (configured in pyproject.toml); a finding fails the run;
#   3. the dev clusters the tests drive for real (etc/dev/*.sh: Slurm, Grid Engine, Docker, Podman, an S3 server), where
#      this machine can run them (root on Debian); their environment is exported before pytest
#      starts, since libdrmaa must see it at load time;
#   4. pytest, with any arguments given to this script.
# Clusters this script started are stopped again at the end (JOBPROXY_KEEP_CLUSTERS=1 keeps them).
# In CI (CI=true) a cluster that cannot start is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[tests/run.sh] %s\n' "$*" >&2; }

if ! python3 -m venv --help >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# the launcher's compiled spawn (schedulers/local/_spawn.c) needs a C compiler and Python's headers;
# an install without them works, but the tests of the spawn want it built
if [ "$(id -u)" = 0 ] && ! { command -v gcc >/dev/null && .venv/bin/python -c \
        'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }; then
    log "installing a C compiler and Python's headers"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev python3-dev >/dev/null
fi
log "installing JobProxy and its test dependencies into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# What tests/test_tes_clients.py would otherwise fetch from the package index while it runs, fetched
# once here (no test reaches the index): the wheels of the storage plugins that each Snakemake TES job
# pip-installs (its pip then runs with PIP_NO_INDEX and PIP_FIND_LINKS), and py-tes 1.1 in a virtualenv
# of its own (ours has the py-tes 0.4 that the Snakemake plugin pins).
export JOBPROXY_TEST_DEPS="${JOBPROXY_TEST_DEPS:-$PWD/.venv/test-deps}"
plugins="$(.venv/bin/python - <<'PY'
from importlib.metadata import version
from snakemake_interface_storage_plugins.registry import StoragePluginRegistry
registry = StoragePluginRegistry()  # the same list Snakemake's job pre-command installs
names = sorted({registry.get_plugin_package_name(name) for name in registry.get_registered_plugins()})
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
)"
wheels="$JOBPROXY_TEST_DEPS/wheels"
if [ "$(cat "$wheels/.requirements" 2>/dev/null)" != "$plugins" ]; then
    log "fetching wheels for Snakemake's jobs into $wheels: $plugins"
    rm -rf "$wheels"
    # shellcheck disable=SC2086 # one argument per requirement
    .venv/bin/python -m pip wheel -q --disable-pip-version-check -w "$wheels" $plugins
    printf '%s\n' "$plugins" >"$wheels/.requirements"
fi
py_tes="$JOBPROXY_TEST_DEPS/py-tes-1.1"
if ! "$py_tes/bin/python" -c 'from importlib.metadata import version; assert version("py-tes").startswith("1.1.")' 2>/dev/null; then
    log "installing py-tes 1.1 into $py_tes"
    rm -rf "$py_tes"
    .venv/bin/python -m venv "$py_tes"
    "$py_tes/bin/python" -m pip install -q --disable-pip-version-check 'py-tes>=1.1,<1.2'
fi

# Tools the tests use: bubblewrap (the Apptainer stand-in, TES host executors), busybox (their root
# file systems), rsync (Snakemake's file-system storage plugin), openssl (test certificates), curl
# (local users calling the gateway over TCP and its Unix socket), chromium (the dashboard's browser
# test, driven by Playwright; Playwright's own browser download cannot work without internet).
if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] \
        && ! { command -v bwrap && command -v busybox && command -v rsync && command -v openssl \
               && command -v curl && command -v chromium; } >/dev/null; then
    log "installing bubblewrap, busybox-static, rsync, openssl, curl and chromium"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap busybox-static rsync \
        openssl curl chromium >/dev/null
fi

# The linters (configured in pyproject.toml): a finding fails the run (set -e), before any cluster starts.
log "ruff"
.venv/bin/ruff check .
log "mypy"
.venv/bin/mypy

started=()
stop_clusters() {
    [ "${JOBPROXY_KEEP_CLUSTERS:-0}" = 1 ] && return
    for name in "${started[@]}"; do
        bash "etc/dev/$name.sh" stop || log "could not stop $name"
    done
}
trap stop_clusters EXIT

for name in slurm gridengine docker podman s3 postgresql; do
    script="etc/dev/$name.sh"
    [ -f "$script" ] || continue
    if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
        log "$name: skipped (the dev clusters need root on Debian); its tests will skip"
        continue
    fi
    was_up=0
    bash "$script" status >/dev/null 2>&1 && was_up=1
    log "$name: starting"
    if bash "$script" start; then
        [ "$was_up" = 1 ] || started+=("$name")
        eval "$(bash "$script" env)"
    elif [ "${CI:-}" = true ]; then
        log "$name: could not start, and CI needs it"
        exit 1
    else
        log "$name: could not start; its tests will skip"
    fi
done

log "running pytest"
status=0
.venv/bin/python -m pytest "$@" || status=$?
exit "$status"
