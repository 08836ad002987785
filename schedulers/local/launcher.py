"""The local scheduler's job launcher: one long-lived process that forks each job.

Started once by the plugin as `python -I launcher.py --serve`, it imports nothing but the standard
library (so it runs from its path) and speaks JSON lines: requests on stdin, answers on stdout.

- `{"op": "run", "id": TASK, "join": [cgroup.procs, ...], "cpus": [0, 1], "rlimit_as": BYTES or 0,
  "user": NAME or null, "stdout": PATH, "stderr": PATH, "script": PATH, "env": {...}, "cwd": PATH}`
  is answered `{"op": "started", "id": TASK, "pid": PID, "start_time": TICKS}` once the job script
  runs, or `{"op": "error", "id": TASK, "error": WHY}` if it could not be started.
- `{"op": "exit", "id": TASK, "pid": PID, "status": WAIT_STATUS}` says a job ended (it is reaped).

The forked child does what a job needs before it execs: a new session, the task's cgroups, CPU
pinning, an address-space limit where no memory cgroup is; it reads the script (in the gateway's
private spool) while still privileged, becomes the task's user, copies the script into a memory
file that user owns and opens the output files with that user's rights, then runs
`/bin/bash /dev/fd/3`. Forking here rather than in the threaded gateway keeps it safe, and saves
an interpreter start per job. When stdin closes (the gateway stopped or crashed) the launcher
exits; its jobs live on in their own sessions.
"""
from __future__ import annotations

import gc
import json
import os
import pwd
import resource
import selectors
import signal
import sys
from typing import Any

SCRIPT_FD = 3
#: The exit status of a child that could not start its job.
CANNOT_START = 255


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


def _child(request: dict[str, Any], errors: int, launcher: int) -> None:
    """In the forked child: prepare the job and exec it. Never returns; any failure is written to
    `errors` (closed on exec) and ends the child."""
    try:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        os.setsid()
        pid = str(os.getpid())
        for procs in request["join"]:
            with open(procs, "w", encoding="ascii") as f:
                f.write(pid)
        if request["cpus"]:
            os.sched_setaffinity(0, set(request["cpus"]))
        if request["rlimit_as"]:
            resource.setrlimit(resource.RLIMIT_AS, (request["rlimit_as"], request["rlimit_as"]))
        os.chdir(request["cwd"])
        with open(request["script"], "rb") as f:
            script_text = f.read()
        if request["user"]:
            _become(request["user"])
        script = os.memfd_create("jobproxy-job")  # made after dropping privileges: the job may read it
        os.write(script, script_text)
        os.lseek(script, 0, os.SEEK_SET)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        for path, target in ((request["stdout"], 1), (request["stderr"], 2)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            os.dup2(fd, target)
            os.close(fd)
        os.dup2(script, SCRIPT_FD)
        os.set_inheritable(SCRIPT_FD, True)
        if os.getppid() != launcher:  # the launcher died: the plugin no longer knows of this job
            raise OSError("the launcher stopped before the job started")
        os.execve("/bin/bash", ["/bin/bash", f"/dev/fd/{SCRIPT_FD}"], request["env"])
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the child must end here
        why = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        try:
            os.write(errors, f"{type(exc).__name__}: {why}".encode("utf-8", "replace")[:4000])
        finally:
            os._exit(CANNOT_START)


class _Job:
    """A forked child, until it is reaped."""

    __slots__ = ("task_id", "pid", "start_time", "errors", "error")

    def __init__(self, task_id: str, pid: int, start_time: int | None, errors: int) -> None:
        self.task_id = task_id
        self.pid = pid
        self.start_time = start_time
        self.errors: int | None = errors  # the read end of the child's error pipe until the exec is known
        self.error = b""


class Launcher:
    """The serving loop: requests in, jobs forked, answers and exit notices out."""

    def __init__(self, requests: int, answers: int) -> None:
        self.requests = requests
        self.answers = answers
        self.jobs: dict[int, _Job] = {}
        self.selector = selectors.DefaultSelector()
        self.pending = b""
        self.out: list[bytes] = []  # answers of this round, written together after it

    def flush(self) -> None:
        data = b"".join(self.out)
        self.out.clear()
        while data:
            data = data[os.write(self.answers, data):]

    def send(self, message: dict[str, Any]) -> None:
        self.out.append((json.dumps(message, separators=(",", ":")) + "\n").encode())

    def run(self, request: dict[str, Any]) -> None:
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
        job = _Job(request["id"], pid, _start_time(pid), read_end)
        self.jobs[pid] = job
        os.set_blocking(read_end, False)
        self.selector.register(read_end, selectors.EVENT_READ, job)

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
            self.send({"op": "error", "id": job.task_id, "error": job.error.decode("utf-8", "replace")})
        else:
            self.send({"op": "started", "id": job.task_id, "pid": job.pid, "start_time": job.start_time})

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.pop(pid, None)
            if job is None:
                continue
            if job.errors is not None:
                os.set_blocking(job.errors, True)  # the child is gone: its pipe holds all it wrote
                self.exec_known(job)
            self.send({"op": "exit", "id": job.task_id, "pid": pid, "status": status})

    def read_requests(self) -> bool:
        """Handle the complete lines on stdin; False at end of file."""
        chunk = os.read(self.requests, 65536)
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
            self.run(request)
        else:
            print(f"jobproxy launcher: unknown op {op!r}", file=sys.stderr, flush=True)

    def serve(self) -> None:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")
        self.selector.register(self.requests, selectors.EVENT_READ, "requests")
        self.reap()
        self.flush()
        while True:
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
                        self.flush()
                        return
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the gateway; stdin's end stops us
    # every fork copies this process's page tables, and each page either side writes afterwards:
    # no garbage collector walking (and writing) the whole heap between forks
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        Launcher(requests, answers).serve()
    except BrokenPipeError:
        pass


if __name__ == "__main__":
    main()
