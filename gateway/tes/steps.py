"""The steps script of a TES task: stage inputs in, run the executors in order, copy outputs back.

A TES task becomes one JobProxy task whose command is `/bin/bash <task folder>/tes/steps.sh`; the
job script the scheduler renders around it applies the task's cores, memory and CPU-time limits
and records the overall exit status. The steps script, written into the task's folder when the
task is accepted, does the TES part on the node that runs the job (so it works on Slurm nodes as
well as locally, given a file system shared with the gateway):

1. Private paths. Every path the task names (inputs, outputs, volumes, executor workdirs and
   stdin/stdout/stderr, and always `/tmp`) lives under the task's own folder `tes/root/`, so two
   tasks that both use `/tmp/run.sh` never collide. The smallest set of folders (and files) that
   covers those paths is mounted at the requested places: as bind mounts of the container runtime
   for executors that run in an image, or by a bubblewrap sandbox for executors that run on the
   host. The sandbox shows the rest of the host read-only (software installed on the nodes), with
   fresh folders along the way to each private path, so no mount point has to be created on the
   host itself; only the folders the admin lists in `[tes] host_writable` (e.g. a shared scratch
   folder a workflow engine's storage plugin writes to) are writable, and `[tes] host_readable`
   lists folders to show even where a private path covers them (software installed under /tmp).
2. Inputs: `file://` sources are copied (files and folders) into the private root; `content`
   inputs were already written there by the gateway; URLs of a scheme the admin enabled
   (`[tes] url_schemes`) are fetched by the admin's command.
3. Executors run in order, each through a small `/bin/sh` wrapper that changes to its workdir,
   exports its env and redirects its stdin/stdout/stderr. Start and end times and the exit code
   of each are written to `tes/exec/<n>.start|end|exit`; without a stdout/stderr path, its output
   goes to `tes/exec/<n>.stdout|stderr`. The first failure stops the task unless the executor has
   `ignore_error`; the script exits with the last failing executor's code.
4. Outputs are copied back to their `file://` URLs at the end, also after a failure (what exists);
   an output missing after success fails the task. A wildcard output copies each file that
   matches, less its `path_prefix`, into the URL's folder. Problems are logged to `tes/system.log`, which
   the TES API shows as `system_logs`.

Every value enters the script through `schedulers.script.quote`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from schedulers.script import quote, quote_argv, stoppable

#: Runs one executor: `sh -c WRAP sh WORKDIR STDIN STDOUT STDERR N NAME=VALUE... COMMAND...`.
WRAP = (
    'if [ -n "$1" ]; then cd "$1" || exit 1; fi\n'
    'i=$2 o=$3 e=$4 n=$5\n'
    'shift 5\n'
    'while [ "$n" -gt 0 ]; do export "$1" || exit 1; shift; n=$((n - 1)); done\n'
    'if [ -n "$i" ]; then exec <"$i" || exit 1; fi\n'
    'if [ -n "$o" ]; then exec >"$o" || exit 1; fi\n'
    'if [ -n "$e" ]; then exec 2>"$e" || exit 1; fi\n'
    'exec "$@"'
)

_PRELUDE = r"""set -u
shopt -s nullglob dotglob
jp_status=0
jp_now() { date -u +%Y-%m-%dT%H:%M:%S.%3NZ; }
jp_log() { printf '%s %s\n' "$(jp_now)" "$*" >> "$jp_tes/system.log"; }
# jp_copy WHAT SOURCE TARGET REQUIRED: copy a file, or a folder's contents; a missing source is an
# error only if REQUIRED is 1. Symbolic links are copied as links, never followed, except for an
# input's own (host) path, which the gateway checked; what the task made is never followed out.
jp_copy() {
    if [ -L "$2" ] && [[ $1 == outputs* ]]; then
        jp_log "$1: $2 is a symbolic link; outputs must be files or folders"
        return 1
    elif [ -d "$2" ]; then
        mkdir -p -- "$3" && cp -pPR -- "$2/." "$3/" && return 0
    elif [ -e "$2" ]; then
        mkdir -p -- "$(dirname -- "$3")" && cp -pP --remove-destination -- "$2" "$3" && return 0
    elif [ "$4" = 0 ]; then
        return 0
    else
        jp_log "$1: $2 does not exist"
        return 1
    fi
    jp_log "$1: could not copy $2 to $3"
    return 1
}
# jp_glob WHAT PATTERN PREFIX TARGET: copy each regular file matching PATTERN (a private path with
# wildcards) to TARGET/<its private path less PREFIX>; no match is no error.
jp_glob() {
    local IFS= jp_m jp_rel
    local -a jp_found=("$jp_root"$2)
    for jp_m in "${jp_found[@]}"; do
        [ -f "$jp_m" ] && [ ! -L "$jp_m" ] || continue
        jp_rel=${jp_m#"$jp_root$3"}
        jp_copy "$1" "$jp_m" "$4/${jp_rel#/}" 1 || return 1
    done
}
jp_failed() { [ "$jp_status" != 0 ] || jp_status=1; }
jp_begin() { jp_now > "$jp_tes/exec/$1.start"; }
jp_end() {
    jp_code=$2
    printf '%s\n' "$jp_code" > "$jp_tes/exec/$1.exit"
    jp_now > "$jp_tes/exec/$1.end"
    [ "$jp_code" = 0 ] || jp_status=$jp_code
}
"""

_SANDBOX = r"""# the host, read-only, with fresh folders on the way to the task's private paths
declare -A jp_skip=()
for jp_p in "${jp_routes[@]}" "${jp_targets[@]}"; do jp_skip[$jp_p]=1; done
jp_box=(bwrap --die-with-parent --chdir /)
for jp_d in / "${jp_routes[@]}"; do
    [ "$jp_d" = / ] || jp_box+=(--dir "$jp_d")
    for jp_e in "${jp_d%/}"/*; do
        [ -n "${jp_skip[$jp_e]:-}" ] && continue
        case $jp_e in
            /proc) jp_box+=(--proc /proc) ;;
            /dev) jp_box+=(--dev /dev --tmpfs /dev/shm) ;;
            *) if [ -L "$jp_e" ]; then jp_box+=(--symlink "$(readlink -- "$jp_e")" "$jp_e")
               else jp_box+=(--ro-bind "$jp_e" "$jp_e"); fi ;;
        esac
    done
done
for jp_t in "${jp_targets[@]}"; do jp_box+=(--bind "$jp_root$jp_t" "$jp_t"); done
for jp_r in "${jp_readable[@]}"; do jp_box+=(--ro-bind-try "$jp_r" "$jp_r"); done
for jp_w in "${jp_writable[@]}"; do jp_box+=(--bind-try "$jp_w" "$jp_w"); done
jp_box+=(--)
"""


@dataclass(frozen=True)
class Transfer:
    """A copy between the host and the task's private root (`private` is the path the task sees).
    With a `command` (the admin's for a URL scheme), that command moves the data instead of `cp`."""

    where: str
    host: str
    private: str
    command: Sequence[str] | None = None
    prefix: str | None = None  # an output whose `private` path has wildcards: the part left out of each match

    def line(self, inbound: bool) -> str:
        """The bash line that copies this input in (failing the task) or this output back."""
        if self.prefix is not None:
            return (f"jp_glob {quote(self.where)} {quote(self.private)} {quote(self.prefix)} {quote(self.host)}"
                    " || jp_failed")
        if self.command is None:
            ends = (quote(self.host), f'"$jp_root"{quote(self.private)}')
            source, target = ends if inbound else ends[::-1]
            return (f"jp_copy {quote(self.where)} {source} {target} 1 || exit 1" if inbound
                    else f'jp_copy {quote(self.where)} {source} {target} "$required" || jp_failed')
        if inbound:
            return (f'mkdir -p -- "$(dirname -- "$jp_root"{quote(self.private)})" && {quote_argv(self.command)} '
                    f'|| {{ jp_log {quote(self.where + ": fetching " + self.host + " failed")}; exit 1; }}')
        return (f'if [ -e "$jp_root"{quote(self.private)} ]; then {quote_argv(self.command)} '
                f'|| {{ jp_log {quote(self.where + ": sending to " + self.host + " failed")}; jp_failed; }}; '
                f'elif [ "$required" = 1 ]; then jp_log {quote(f"{self.where}: {self.private} does not exist")}; '
                'jp_failed; fi')


@dataclass(frozen=True)
class Step:
    """One executor. `argv` runs it (after the sandbox when `on_host`); `on_stop` stops it from
    outside (a container), `after` are bash lines to run once it ended."""

    title: str
    argv: Sequence[str]
    on_host: bool
    ignore_error: bool = False
    stdout: bool = True
    stderr: bool = True
    on_stop: Sequence[str] | None = None
    after: Sequence[str] = field(default_factory=tuple)


def wrapper_argv(command: Sequence[str], workdir: str | None, stdin: str | None, stdout: str | None,
                 stderr: str | None, env: dict[str, str]) -> list[str]:
    """The argv that runs `command` with its workdir, environment and redirections."""
    pairs = [f"{name}={value}" for name, value in env.items()]
    return ["/bin/sh", "-c", WRAP, "sh", workdir or "", stdin or "", stdout or "", stderr or "",
            str(len(pairs)), *pairs, *command]


def cover(paths: Sequence[str]) -> list[str]:
    """The paths not inside another of `paths`, shallowest first.

    >>> cover(["/tmp/a", "/tmp", "/data/x/y", "/data/x", "/data2"])
    ['/data2', '/tmp', '/data/x']
    """
    kept: list[str] = []
    for path in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept


def routes(targets: Sequence[str]) -> list[str]:
    """The folders on the way to `targets` (not `/`), shallowest first.

    >>> routes(["/tmp", "/work/proj/out"])
    ['/work', '/work/proj']
    """
    found = {"/".join(t.split("/")[:n]) for t in targets for n in range(2, t.count("/") + 1)}
    return sorted(found, key=lambda p: (p.count("/"), p))


def render(task_id: str, tes_dir: str, root: str, folders: Sequence[str], inputs: Sequence[Transfer],
           steps: Sequence[Step], outputs: Sequence[Transfer], targets: Sequence[str],
           writable: Sequence[str] = (), readable: Sequence[str] = ()) -> str:
    """The steps script. `folders` are private paths to create before the executors start;
    `writable` are host folders the sandbox shows writable (`[tes] host_writable`), `readable`
    host folders it shows read-only even where a private path (such as /tmp) covers them
    (`[tes] host_readable`)."""
    lines = [
        "#!/bin/bash",
        f"# JobProxy TES task {task_id}: inputs in, {len(steps)} executor(s) in order, outputs back",
        f"jp_tes={quote(tes_dir)}",
        f"jp_root={quote(root)}",
        _PRELUDE,
        "jp_outputs() {",
        "    local required=0",
        '    [ "$jp_status" = 0 ] && required=1',
        *(f"    {o.line(inbound=False)}" for o in outputs),
        "    :",
        "}",
        'jp_finish() { jp_outputs; exit "$jp_status"; }',
        "",
        "# the task's private paths",
        'mkdir -p -- "$jp_tes/exec" || exit 1',
        *(f'mkdir -p -- "$jp_root"{quote(f)} || {{ jp_log "cannot create the private folder "{quote(f)}; exit 1; }}'
          for f in folders),
        'chmod 1777 -- "$jp_root/tmp" 2>/dev/null',
        "",
        "# inputs",
        *(i.line(inbound=True) for i in inputs),
    ]
    if any(step.on_host for step in steps):
        lines += ["", f"jp_targets=({quote_argv(targets)})", f"jp_routes=({quote_argv(routes(targets))})",
                  f"jp_writable=({quote_argv(writable)})", f"jp_readable=({quote_argv(readable)})", _SANDBOX]
    for index, step in enumerate(steps):
        lines += ["", f"# executor {index}: {step.title}", f"jp_begin {index}"]
        command = ('"${jp_box[@]}" ' if step.on_host else "") + quote_argv(step.argv)
        redirect = " </dev/null"
        redirect += f' >"$jp_tes/exec/{index}.stdout"' if step.stdout else ""
        redirect += f' 2>"$jp_tes/exec/{index}.stderr"' if step.stderr else ""
        if step.on_stop:
            lines += [*stoppable(command + redirect, step.on_stop, "jp_child", "jp_rc"), "trap - TERM INT HUP"]
        else:
            lines += [f"{command}{redirect}", "jp_rc=$?"]
        lines += [*step.after, f'jp_end {index} "$jp_rc"']
        if not step.ignore_error:
            lines.append('[ "$jp_code" = 0 ] || jp_finish')
    lines += ["", "jp_finish", ""]
    return "\n".join(lines)
