"""The local scheduler's job launcher: a long-lived process that forks each job it is asked for.

The plugin starts a few (option `launchers`) as `python -I launcher.py --serve`, so that jobs
start side by side. Each imports nothing but the standard library (so it runs from its path) and
speaks JSON lines: requests on stdin, answers on stdout.

- `{"op": "run", "id": TASK, "join": [cgroup.procs, ...], "cpus": [0, 1], "rlimit_as": BYTES or 0,
  "user": NAME or null, "stdout": PATH, "stderr": PATH, "env": {...} or null, "cwd": PATH,
  "gpus": [ID, ...] or null}` plus either
  `"script": PATH` (a job script, run by bash) or `"argv": [...], "cputime": [SOFT, HARD] or null,
  "exit_file": PATH, "spawn": BOOL` (direct exec) is answered `{"op": "started", "id": TASK, "pid": PID,
  "start_time": TICKS}` once the job runs, or `{"op": "error", "id": TASK, "error": WHY}` if it
  could not be started. `cwd` is the task's folder, made (mode 0700, the user's) if it is not
  there yet. `"env": null` means the launcher's own environment; either way the job gets
  `JOBPROXY_TASK_ID=TASK`, and with `"gpus"` a list, `CUDA_VISIBLE_DEVICES` set to those ids.
- A `run` request with `"after": TASK2` waits until the job of TASK2, one of this launcher's, ended:
  it starts as that job is reaped, its `started` after that job's `exit`. TASK2 may itself be a
  request held so; if it is neither (it ended already, or never came), it starts at once.
  `{"op": "drop", "id": TASK}` takes back such a request that still waits; it is answered
  `{"op": "error", "id": TASK, "error": "canceled before it started"}`. A drop of a job already
  started, or of a task the launcher does not hold, does nothing.
- `{"op": "exit", "id": TASK, "pid": PID, "status": WAIT_STATUS, "code": CODE or null, "busy": BOOL or
  null}` says a job ended (it is reaped); `code` is what the launcher wrote to the exit-code file of
  a direct job; `busy` whether a process was still in the job's cgroup (the first `join` file's) then.

The forked child does what a job needs before it execs: a new session, the task's cgroups, CPU
pinning, an address-space limit where no memory cgroup is. A job script (in the gateway's private
spool) is read while still privileged; then the child becomes the task's user, opens the output
files with that user's rights and runs `/bin/bash /dev/fd/3` on a memory file holding the script.

A direct job does what the built-in job script would, without bash: as the task's user it enters
the task's folder (failing that, exit status 1), sets RLIMIT_CPU like the script's `ulimit` lines
(never raising a lower hard limit) and execs the command's argv (a command not found exits 127, one
that cannot be executed 126, as in bash). Its exit status (128+N for signal N, like bash's `$?`) is
written to the exit-code file by this process, atomically and as the task's user, before the job is
reaped, so whoever watches the job through a pidfd finds the file once the zombie is gone.
A direct job with `"spawn": true` needs nothing of its own process (no rlimit, no memory limit)
but its session and its user: it is spawned rather than forked from this interpreter, several
times cheaper, by the compiled `_spawn` beside this file (built at install: a vfork-like clone
that takes the user's ids with raw system calls, see _spawn.c), else by subprocess (vfork and
exec, or for another user a fork in C that sets the ids before the exec). The compiled spawn's
child joins the job's v1 cgroups and CPUs itself before its exec (it writes its own thread id, 0,
to the groups' `tasks` files the launcher keeps open); for subprocess the launcher is inside them
for that moment (it enters them by its own thread id, and goes back to its own at once), and the
job inherits them. Its output files are opened, and its folder checked,
with the user's rights first. If that start fails (no such folder or command, a folder the user
cannot enter), the job is forked instead, which fails as described.

Forking here rather than in the threaded gateway keeps it safe, and saves an interpreter start per
job. When stdin closes (the gateway stopped or crashed) the launcher takes no more requests, and
drops those still waiting for another job (a restarted gateway queues their tasks again), but
stays until its jobs ended, to record their exit statuses; their sessions are their own. If the
launcher itself is killed, a direct job that ends after it records no exit status.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import importlib.machinery
import importlib.util
import json
import os
import pwd
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
#: `_spawn.spawn(executables, argv, envp, cwd, uid, gid, groups, fds, joins, cpus) -> pid` (see _spawn.c)
Spawn = Callable[[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...], bytes, int, int,
                  tuple[int, ...] | None, tuple[int, int, int], tuple[int, ...], tuple[int, ...] | None], int]
SCRIPT_FD = 3
#: The exit status of a child that could not start its job.
CANNOT_START = 255
#: The error of a request dropped before its job started.
DROPPED = "canceled before it started"
_QUIET = (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)


def compiled_spawn() -> Spawn | None:
    """The compiled spawn beside this file, if it was built, else None: subprocess does the job.
    Loaded from this file's folder by name, since an isolated interpreter (`-I`, as the launcher
    runs) does not put a script's folder on the path."""
    folder = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_spawn" + suffix)
        spec = importlib.util.spec_from_file_location("_spawn", path) if os.path.exists(path) else None
        if spec is None or spec.loader is None:
            continue
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError as exc:  # built for another interpreter, or damaged: the launcher says so
            print(f"jobproxy launcher: cannot load {path}, starting jobs by subprocess: {exc}", file=sys.stderr,
                  flush=True)
            return None
        if not getattr(module, "JOINS", 0):  # built from an older _spawn.c, whose child joins no cgroup
            print(f"jobproxy launcher: {path} is an older build (pip install . builds it again), starting jobs by "
                  "subprocess", file=sys.stderr, flush=True)
            return None
        spawn: Spawn = module.spawn
        return spawn
    return None


def _executables(argv0: str, env: dict[str, str]) -> tuple[bytes, ...]:
    """Where to look for the command `argv0`, in order: itself if it names a path, else every
    folder of the job's PATH, as subprocess and execvp search."""
    if os.path.dirname(argv0):
        return (os.fsencode(argv0),)
    return tuple(os.path.join(os.fsencode(folder), os.fsencode(argv0)) for folder in os.get_exec_path(env))


def _become(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(b")") + 2:].split()[19])


def cpu_limits(soft: int, hard: int, current_hard: int) -> tuple[int, int]:
    """The RLIMIT_CPU pair the job script's `ulimit` lines set: `hard`, unless the hard limit in
    force is lower already (never raised), and the soft one no higher than that."""
    if current_hard != resource.RLIM_INFINITY and current_hard <= hard:
        hard = current_hard
    return min(soft, hard), hard


def _job_failed(message: str, code: int) -> None:
    """A direct job's own failure, as its job script would meet it: a line on its stderr, `code`."""
    try:
        os.write(2, f"jobproxy: {message}\n".encode("utf-8", "replace"))
    finally:
        os._exit(code)


def _job_environment(request: dict[str, Any]) -> dict[str, str]:
    """The job's environment: the request's (else the launcher's), with its task id and GPUs."""
    env = dict(os.environ if request["env"] is None else request["env"], JOBPROXY_TASK_ID=request["id"])
    if request.get("gpus") is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(request["gpus"])
    return env


def _exec_direct(request: dict[str, Any], env: dict[str, str]) -> None:
    """The rest of a direct job's start, once the launcher knows it runs: its folder, its CPU-time
    limit, its command."""
    try:
        os.chdir(request["cwd"])
    except OSError as exc:
        _job_failed(f"cd: {request['cwd']}: {exc.strerror}", 1)
    if request["cputime"]:
        try:
            wanted_soft, wanted_hard = request["cputime"]
            soft, hard = cpu_limits(wanted_soft, wanted_hard, resource.getrlimit(resource.RLIMIT_CPU)[1])
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        except (OSError, ValueError) as exc:
            _job_failed(f"ulimit -t: {exc}", 1)
    argv = request["argv"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        if exc.errno == errno.ENOEXEC:  # no #! line: bash runs such a file as a script
            with contextlib.suppress(OSError):
                os.execve("/bin/bash", ["/bin/bash", *argv], env)
        not_found = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        _job_failed(f"{argv[0]}: {'command not found' if not_found else exc.strerror}", 127 if not_found else 126)


def _child(request: dict[str, Any], errors: int, launcher: int) -> None:
    """In the forked child: prepare the job and exec it. Never returns; any failure before the job
    runs is written to `errors` (closed on exec, or before a direct job's own steps) and ends the child."""
    try:
        signal.set_wakeup_fd(-1)
        for number in _QUIET:
            signal.signal(number, signal.SIG_DFL)
        os.setsid()
        pid = str(os.getpid())
        for procs in request["join"]:
            with open(procs, "w", encoding="ascii") as f:
                f.write(pid)
        if request["cpus"]:
            os.sched_setaffinity(0, request["cpus"])
        if request["rlimit_as"]:
            resource.setrlimit(resource.RLIMIT_AS, (request["rlimit_as"], request["rlimit_as"]))
        direct = "argv" in request
        script_text = b""
        if not direct:
            os.chdir(request["cwd"])
            with open(request["script"], "rb") as f:
                script_text = f.read()
        if request["user"]:
            _become(request["user"])
        env = _job_environment(request)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        for path, target in ((request["stdout"], 1), (request["stderr"], 2)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            os.dup2(fd, target)
            os.close(fd)
        if not direct:
            script = os.memfd_create("jobproxy-job")  # made after dropping privileges: the job may read it
            os.write(script, script_text)
            os.lseek(script, 0, os.SEEK_SET)
            os.dup2(script, SCRIPT_FD)
            os.set_inheritable(SCRIPT_FD, True)
        if os.getppid() != launcher:  # the launcher died: the plugin no longer knows of this job
            raise OSError("the launcher stopped before the job started")
        if not direct:
            os.execve("/bin/bash", ["/bin/bash", f"/dev/fd/{SCRIPT_FD}"], env)
        os.close(errors)  # the job runs: what fails from here on is the job's own
    except BaseException as exc:  # whatever it is, the child must end here
        why = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        try:
            os.write(errors, f"{type(exc).__name__}: {why}".encode("utf-8", "replace")[:4000])
        finally:
            os._exit(CANNOT_START)
    try:
        _exec_direct(request, env)
    finally:
        os._exit(CANNOT_START)


def exit_code(wait_status: int) -> int:
    """The exit status as bash's `$?` gives it: 128+N for a process killed by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def write_exit_file(path: str, code: int, user: _Identity | None) -> bool:
    """Write `code` to `path` atomically (a `.part` file renamed over it), as `user` if given (and
    the launcher runs as root), so that nothing the user put in their folder makes the launcher
    write elsewhere. False on failure."""
    partial = path + ".part"
    identity = None
    if user is not None and os.geteuid() == 0:
        identity = os.geteuid(), os.getegid()
        os.setegid(user.gid)
        os.seteuid(user.uid)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(partial, flags, 0o644)
        except FileExistsError:  # left over, or put there: never written through
            os.unlink(partial)
            fd = os.open(partial, flags, 0o644)
        try:
            os.write(fd, b"%d\n" % code)
        finally:
            os.close(fd)
        os.rename(partial, path)
        return True
    except OSError:
        return False
    finally:
        if identity is not None:
            os.seteuid(identity[0])
            os.setegid(identity[1])


class _Home:
    """Where the launcher itself belongs: its cgroups (by the `tasks` file of its group in each v1
    hierarchy) and its CPUs, to go back to after it spawned a job from inside the job's."""

    def __init__(self) -> None:
        self.cpus = os.sched_getaffinity(0)
        self.mine: dict[str, str] = {}  # controller (v1) -> the launcher's group path
        try:
            with open("/proc/self/cgroup", encoding="ascii") as f:
                for line in f:
                    _, controllers, path = line.rstrip("\n").split(":", 2)
                    for controller in controllers.split(","):
                        if controller:
                            self.mine[controller] = path
        except (OSError, ValueError):
            pass
        self.tasks: dict[str, str | None] = {}

    def tasks_for(self, job_procs: str) -> str | None:
        """The launcher's own `tasks` file in the v1 hierarchy of `job_procs`
        (`<mount>/jobproxy/<group>/cgroup.procs`), or None if unknown."""
        root = job_procs.rpartition("/jobproxy/")[0]
        if root not in self.tasks:
            path = self.mine.get(os.path.basename(root)) if root else None
            self.tasks[root] = f"{root}{path.rstrip('/')}/tasks" if path is not None else None
        return self.tasks[root]


class _CgroupFiles:
    """The v1 `tasks` files a spawned job joins by, or the launcher moves itself through, each
    opened once and kept: a write to an open file costs a fraction of an open, write and close.
    Writing 0 (the calling thread itself) spares the kernel the process-wide lock a pid written to
    `cgroup.procs` takes, with its RCU wait. A file of a group removed since (ENODEV), or made
    again, is opened again."""

    MOST = 256  # open files kept, at most: past that they are all closed and opened as needed

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def enter(self, tasks: str) -> None:
        """Move the calling thread into the v1 group of `tasks`."""
        try:
            os.write(self.fds([tasks])[0], b"0")
            return
        except OSError as exc:
            if exc.errno not in (errno.ENODEV, errno.ENOENT):
                raise
            self.forget(tasks)
        try:
            os.write(self.fds([tasks])[0], b"0")
        except OSError:
            self.forget(tasks)
            raise

    def fds(self, paths: list[str]) -> tuple[int, ...]:
        """The open files of the `tasks` files `paths` (for a spawned child to write itself to).
        Room for those not open yet is made by closing the others, never one of `paths`."""
        missing = [path for path in paths if path not in self._open]
        if missing and len(self._open) + len(missing) > self.MOST:
            for path in [p for p in self._open if p not in paths]:
                self.forget(path)
        for path in missing:
            self._open[path] = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        return tuple(self._open[path] for path in paths)

    def forget(self, tasks: str) -> None:
        """Close the file of `tasks` (its group was removed, or refused a process): opened again
        when next needed."""
        fd = self._open.pop(tasks, None)
        if fd is not None:
            os.close(fd)


class _Identity:
    """A user's ids and groups, as `initgroups` + `setgid` + `setuid` would set them."""

    __slots__ = ("gid", "groups", "uid")

    def __init__(self, uid: int, gid: int, groups: list[int]) -> None:
        self.uid, self.gid, self.groups = uid, gid, groups

    def popen_arguments(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}

    def spawn_arguments(self) -> tuple[int, int, tuple[int, ...] | None]:
        return self.uid, self.gid, tuple(self.groups)


class _Accounts:
    """Users' identities, looked up again after `TTL` seconds (a changed account is seen soon)."""

    TTL = 10.0

    def __init__(self) -> None:
        self._known: dict[str, tuple[float, _Identity]] = {}

    def get(self, user: str) -> _Identity | None:
        """The identity of `user`, or None if there is no such account."""
        now = time.monotonic()
        known = self._known.get(user)
        if known is not None and now - known[0] < self.TTL:
            return known[1]
        try:
            entry = pwd.getpwnam(user)
            identity = _Identity(entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid))
        except (KeyError, OSError):
            return None
        self._known[user] = (now, identity)
        return identity


def _as_user(identity: _Identity, action: Callable[[], T]) -> T | None:
    """`action()` run with `identity` as this process's effective ids and groups (None if it
    raises OSError, or they cannot be taken); the launcher's own are back afterwards."""
    groups = os.getgroups()
    try:
        os.setgroups(identity.groups)
        os.setegid(identity.gid)
        os.seteuid(identity.uid)
    except OSError:
        _restore(groups)
        return None
    try:
        return action()
    except OSError:
        return None
    finally:
        _restore(groups)


def _restore(groups: list[int]) -> None:
    """Back to root's effective ids (the launcher of a job run as another user runs as root)."""
    os.seteuid(0)
    os.setegid(0)
    os.setgroups(groups)


def _holds_processes(procs: str | None) -> bool | None:
    """Whether a process is still in the cgroup whose `cgroup.procs` file is `procs` (one that
    left the job's session); None if unknown."""
    if procs is None:
        return None
    try:
        with open(procs, "rb") as f:
            return bool(f.read().strip())
    except OSError:
        return None


def _can_enter(folder: str) -> bool:
    """Whether the effective user may enter `folder` (a job's `cd`)."""
    return os.path.isdir(folder) and os.access(folder, os.X_OK, effective_ids=True)


def _open_outputs(request: dict[str, Any]) -> list[int]:
    """The job's stdout and stderr files, opened for it (close-on-exec: the job gets its copies)."""
    opened: list[int] = []
    try:
        for path in (request["stdout"], request["stderr"]):
            opened.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    except OSError:
        for fd in opened:
            os.close(fd)
        raise
    return opened


class _Job:
    """A child, until it is reaped."""

    __slots__ = ("error", "errors", "exit_file", "group", "pid", "popen", "start_time", "task_id", "user")

    def __init__(self, request: dict[str, Any], pid: int, errors: int | None,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        self.task_id: str = request["id"]
        self.pid = pid
        self.start_time = _start_time(pid)
        self.errors: int | None = errors  # the read end of the child's error pipe until the exec is known
        self.error = b""
        self.exit_file: str | None = request.get("exit_file")
        self.user: str | None = request["user"]
        joined = request.get("join") or ()
        self.group: str | None = joined[0] if joined else None  # a cgroup.procs file of its group
        self.popen = popen  # a spawned job: the Popen object, told its returncode when it is reaped


class Launcher:
    """The serving loop: requests in, jobs forked, answers and exit notices out."""

    def __init__(self, requests: int, answers: int, spawn: Spawn | None = None) -> None:
        self.requests = requests
        self.compiled_spawn = spawn
        self.null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.answers: int | None = answers  # None once nobody reads them
        self.jobs: dict[int, _Job] = {}
        self.selector = selectors.DefaultSelector()
        self.pending = b""
        self.out: list[bytes] = []  # answers of this round, written together after it
        self.home = _Home()
        self.cgroup_files = _CgroupFiles()
        self.accounts = _Accounts()
        self.waiting: dict[str, dict[str, Any]] = {}  # run requests held, by the task whose job they wait for
        self.reading = True  # stdin is open: a held request may still start

    def flush(self) -> None:
        data = b"".join(self.out)
        self.out.clear()
        while data and self.answers is not None:
            try:
                data = data[os.write(self.answers, data):]
            except BrokenPipeError:  # the gateway is gone: the jobs still get their exit-code files
                self.answers = None

    def send(self, message: dict[str, Any]) -> None:
        self.out.append((json.dumps(message, separators=(",", ":")) + "\n").encode())

    def run(self, request: dict[str, Any]) -> None:
        """Start the job of `request` in its folder, made if it is not there: spawned if it may
        be, else forked."""
        why = self.make_folder(request["cwd"], request["user"])
        if why is not None:
            self.send({"op": "error", "id": request["id"], "error": why})
            return
        if request.get("spawn") and self.spawn(request):
            return
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        me = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            self.send({"op": "error", "id": request["id"], "error": f"cannot fork: {exc.strerror}"})
            return
        if pid == 0:
            os.close(read_end)
            _child(request, write_end, me)
        os.close(write_end)
        job = _Job(request, pid, read_end)
        self.jobs[pid] = job
        os.set_blocking(read_end, False)
        self.selector.register(read_end, selectors.EVENT_READ, job)

    def make_folder(self, path: str, user: str | None) -> str | None:
        """Make the job's folder `path` if it is not there, mode 0700, and give it to `user` (when
        the launcher runs as root and the account exists; else the job's start says what is
        wrong). None, or why it cannot be made."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return None
        except OSError as exc:
            return f"cannot make the task's folder {path}: {exc.strerror}"
        identity = self.accounts.get(user) if user and os.geteuid() == 0 else None
        if identity is not None:
            try:
                os.chown(path, identity.uid, identity.gid)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                return f"cannot give the task's folder {path} to {user}: {exc.strerror}"
        return None

    def spawn(self, request: dict[str, Any]) -> bool:
        """Start a direct job that needs nothing set in its own process but its session, its
        cgroups, its CPUs and its user: by the compiled spawn if there is one, else by subprocess
        (vfork and exec; for another user, fork, setgroups, setregid, setreuid and exec in C),
        much cheaper than a fork of this interpreter that runs Python before its exec. The compiled
        spawn's child joins the job's cgroups (v1) and CPUs itself; for subprocess the launcher
        enters them, so that the job inherits them, and goes back to its own at once. The output
        files are opened, and the job's folder checked, with the user's rights. False if it must be
        forked instead (which also says why a start fails)."""
        compiled = self.compiled_spawn
        tasks_files = [procs.rpartition("/")[0] + "/tasks" for procs in request["join"]]
        homes = [] if compiled is not None else [self.home.tasks_for(procs) for procs in request["join"]]
        if None in homes:
            return False
        identity = None
        if request["user"]:
            identity = self.accounts.get(request["user"]) if os.geteuid() == 0 else None
            if identity is None:
                return False
        # (a cpuset group pins the job by itself)
        cpus = tuple(request["cpus"]) if request["cpus"] and not any("/cpuset/" in p for p in request["join"]) else None
        opened: list[int] = []
        joined = 0
        pinned = False
        try:
            if identity is None:
                opened = _open_outputs(request)
            else:  # with the job's own rights, as its forked start would: None if its folder is out of reach
                outputs = _as_user(identity, lambda: _open_outputs(request) if _can_enter(request["cwd"]) else None)
                if outputs is None:
                    return False
                opened = outputs
            env = _job_environment(request)
            popen = None
            if compiled is not None:
                uid, gid, groups = identity.spawn_arguments() if identity is not None else (-1, -1, None)
                joins = self.cgroup_files.fds(tasks_files)
                try:
                    pid = compiled(_executables(request["argv"][0], env),
                                   tuple(os.fsencode(arg) for arg in request["argv"]),
                                   tuple(os.fsencode(f"{k}={v}") for k, v in env.items()), os.fsencode(request["cwd"]),
                                   uid, gid, groups, (self.null, opened[0], opened[1]), joins, cpus)
                except OSError as exc:
                    if exc.filename == "cgroup":  # a group removed (or made again) since its file was opened
                        for tasks in tasks_files:
                            self.cgroup_files.forget(tasks)
                    raise
            else:
                for tasks in tasks_files:
                    self.cgroup_files.enter(tasks)
                    joined += 1
                if cpus is not None:
                    pinned = True
                    os.sched_setaffinity(0, cpus)
                popen = subprocess.Popen(request["argv"], stdin=self.null, stdout=opened[0], stderr=opened[1],
                                         cwd=request["cwd"], env=env, start_new_session=True, close_fds=True,
                                         **(identity.popen_arguments() if identity is not None else {}))
                pid = popen.pid
        except (OSError, ValueError):
            return False
        finally:
            try:
                for home in homes[:joined]:
                    assert home is not None
                    self.cgroup_files.enter(home)
                if (joined or pinned) and os.sched_getaffinity(0) != self.home.cpus:
                    os.sched_setaffinity(0, self.home.cpus)
            except OSError as exc:
                print(f"jobproxy launcher: cannot go back to its own cgroups and CPUs: {exc}", file=sys.stderr,
                      flush=True)
            for fd in opened:
                os.close(fd)
        job = _Job(request, pid, None, popen)
        self.jobs[pid] = job
        self.send({"op": "started", "id": job.task_id, "pid": job.pid, "start_time": job.start_time})
        return True

    def exec_known(self, job: _Job) -> None:
        """Read the child's error pipe; on end of file (exec or exit), say how the start went."""
        assert job.errors is not None
        while True:
            try:
                chunk = os.read(job.errors, 4096)
            except BlockingIOError:
                return
            if not chunk:
                break
            job.error += chunk
        self.selector.unregister(job.errors)
        os.close(job.errors)
        job.errors = None
        if job.error:
            job.exit_file = None  # it never ran: no exit status of its own
            self.send({"op": "error", "id": job.task_id, "error": job.error.decode("utf-8", "replace")})
        else:
            self.send({"op": "started", "id": job.task_id, "pid": job.pid, "start_time": job.start_time})

    def reap(self) -> None:
        """Every child that ended: a direct job's exit-code file written while it is still a
        zombie, then reaped and reported."""
        while True:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if ended is None or ended.si_pid == 0:
                return
            job = self.jobs.get(ended.si_pid)
            if job is not None and job.errors is not None:
                os.set_blocking(job.errors, True)  # the child is gone: its pipe holds all it wrote
                self.exec_known(job)
            code = None
            if job is not None and job.exit_file is not None:
                status = ended.si_status if ended.si_code == os.CLD_EXITED else 128 + ended.si_status
                if job.user and os.geteuid() == 0:  # as the job's user (cached: no passwd read per job)
                    user = self.accounts.get(job.user)  # None: the account is gone, no file is written
                    code = status if user is not None and write_exit_file(job.exit_file, status, user) else None
                else:
                    code = status if write_exit_file(job.exit_file, status, None) else None
            pid, wait_status = os.waitpid(ended.si_pid, 0)
            job = self.jobs.pop(pid, None)
            if job is not None and job.popen is not None:
                job.popen.returncode = os.waitstatus_to_exitcode(wait_status)
            if job is not None:
                self.send({"op": "exit", "id": job.task_id, "pid": pid, "status": wait_status, "code": code,
                           "busy": _holds_processes(job.group)})
                self.release(job.task_id)

    def release(self, task_id: str) -> None:
        """The job of `task_id` is gone: start the request held for its end, and, if that one could
        not start at all, the one held behind it, and so on."""
        held = self.waiting.pop(task_id, None)
        while held is not None and self.reading:
            self.run(held)
            if self._has(held["id"]):
                return
            held = self.waiting.pop(held["id"], None)

    def _has(self, task_id: str) -> bool:
        """Whether a job of `task_id` runs here (or ended, not reaped yet)."""
        return any(job.task_id == task_id for job in self.jobs.values())

    def read_requests(self) -> bool:
        """Handle the complete lines on stdin; False at end of file."""
        chunk = os.read(self.requests, 1 << 20)
        if not chunk:
            return False
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            if line.strip():
                self.handle(line)
        return True

    def handle(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError) as exc:
            print(f"jobproxy launcher: bad request {line[:200]!r}: {exc}", file=sys.stderr, flush=True)
            return
        if op == "run":
            ahead = request.get("after")
            if ahead is not None and ahead not in self.waiting \
                    and (self._has(ahead) or any(held["id"] == ahead for held in self.waiting.values())):
                self.waiting[ahead] = request  # behind a job here, or behind a request held itself
            else:
                self.run(request)
        elif op == "drop":
            for ahead, held in list(self.waiting.items()):
                if held["id"] == request["id"]:
                    del self.waiting[ahead]
                    behind = self.waiting.pop(held["id"], None)
                    if behind is not None:  # what waited for the dropped one waits for what it waited for
                        self.waiting[ahead] = behind
                    self.send({"op": "error", "id": held["id"], "error": DROPPED})
        else:
            print(f"jobproxy launcher: unknown op {op!r}", file=sys.stderr, flush=True)

    def serve(self) -> None:
        """Until stdin closes and every job ended."""
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")
        self.selector.register(self.requests, selectors.EVENT_READ, "requests")
        self.reap()
        self.flush()
        while self.reading or self.jobs:
            for key, _ in self.selector.select():
                if key.data == "wake":
                    try:
                        while os.read(wake_read, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                elif key.data == "requests":
                    if not self.read_requests():
                        self.reading = False
                        self.waiting.clear()  # never answered: a restarted gateway queues them again
                        self.selector.unregister(self.requests)
                elif isinstance(key.data, _Job) and key.data.errors is not None:
                    self.exec_known(key.data)
            self.flush()


def main(argv: list[str] | None = None) -> None:
    """Serve job requests on stdin until it closes (`--serve`, the only mode)."""
    if (sys.argv[1:] if argv is None else argv) != ["--serve"]:
        print("usage: launcher.py --serve  (JSON-line job requests on stdin; see its docstring)", file=sys.stderr)
        sys.exit(2)
    # keep the protocol off fds 0 and 1, so that a child holds neither before it opens its own
    requests, answers = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    # a terminal's ^C is for the gateway; stdin's end stops us. Caught, not ignored: a spawned job
    # starts with the default action, as a forked one (which resets it) does
    signal.signal(signal.SIGINT, lambda *_: None)
    # every fork copies this process's page tables, and each page either side writes afterwards:
    # no garbage collector walking (and writing) the whole heap between forks
    gc.collect()
    gc.freeze()
    gc.disable()
    Launcher(requests, answers, compiled_spawn()).serve()


if __name__ == "__main__":
    main()
