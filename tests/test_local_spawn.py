"""The launcher's compiled spawn (schedulers/local/_spawn.c): a job started as another user gets
exactly that user's ids and groups, a new session, its three descriptors and nothing else, the
signal state a subprocess would have, and its folder; the launcher keeps its own ids; a step
that fails says which and why and leaves no child. Real processes as a real other user."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schedulers.local import cgroups, launcher

from .conftest import IN_CI

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def spawn() -> launcher.Spawn:
    """The compiled spawn, as the launcher loads it; in CI it must be built (pip install -e . with
    a C compiler), elsewhere its tests skip without it."""
    found = launcher.compiled_spawn()
    if found is None:
        if IN_CI:
            pytest.fail("the compiled spawn must be built in CI (pip install -e . with a C compiler)")
        pytest.skip("the compiled spawn is not built here")
    return found


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder nobody may enter and write to, outside pytest's private tree."""
    path = Path(f"/tmp/jobproxy-spawn-{os.getpid()}")
    path.mkdir(mode=0o777, exist_ok=True)
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(spawn: launcher.Spawn, folder: Path, script: str, **kw: Any) -> tuple[int, str]:
    """Run `script` by /bin/sh through `spawn` (as nobody unless told); its wait status and output."""
    out = os.open(folder / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    uid, gid, groups = kw.get("ids", (NOBODY.pw_uid, NOBODY.pw_gid, tuple(os.getgrouplist("nobody", NOBODY.pw_gid))))
    try:
        pid = spawn((b"/bin/sh",), (b"sh", b"-c", script.encode()), (b"PATH=/usr/bin:/bin", b"HELLO=there"),
                    os.fsencode(kw.get("cwd", folder)), uid, gid, groups, (null, out, out), kw.get("joins", ()),
                    kw.get("cpus"))
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(out)
        os.close(null)
    return status, (folder / "out").read_text()


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def _status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def test_the_job_is_the_user_and_nothing_of_the_launcher(spawn: launcher.Spawn, folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    leaked = os.open("/dev/null", os.O_RDONLY)  # inheritable: close_fds must keep it from the job
    os.set_inheritable(leaked, True)
    try:
        status, out = _run(spawn, folder, "cat /proc/self/status; echo cwd=$(pwd) hello=$HELLO; "
                                          "ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; "
                                          "ps -o sid= -o pgid= -p $$")
    finally:
        os.close(leaked)
    assert status == 0, out
    fields = _status_fields(out)
    assert fields["Uid"].split() == [str(NOBODY.pw_uid)] * 4  # real, effective, saved, filesystem
    assert fields["Gid"].split() == [str(NOBODY.pw_gid)] * 4
    assert sorted(fields["Groups"].split()) == sorted(str(g) for g in os.getgrouplist("nobody", NOBODY.pw_gid))
    mine = _status_fields(Path("/proc/self/status").read_text())
    python_ignores = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))  # reset, as by subprocess
    assert int(fields["SigIgn"], 16) == int(mine["SigIgn"], 16) & ~python_ignores
    assert int(fields["SigBlk"], 16) == int(mine["SigBlk"], 16)
    lines = out.splitlines()
    assert f"cwd={folder} hello=there" in lines
    fds = next(line for line in lines if line.startswith("0 1 2"))
    assert fds.split() == ["0", "1", "2", "3"]  # 3: ls's own reading of the folder
    sid, pgid = lines[-1].split()
    assert sid == pgid  # a session of its own, which it leads
    assert os.getresuid() == (0, 0, 0) and os.getresgid() == (0, 0, 0)  # the caller's ids never moved


def test_a_signal_the_launcher_catches_is_the_default_in_the_job(spawn: launcher.Spawn, folder: Path) -> None:
    before = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        status, out = _run(spawn, folder, "kill -USR1 $$; echo still here", ids=(-1, -1, None))
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1, out
    assert "still here" not in out


def test_without_ids_the_job_keeps_the_launchers(spawn: launcher.Spawn, folder: Path) -> None:
    status, out = _run(spawn, folder, "id -u", ids=(-1, -1, None))
    assert status == 0 and out.strip() == str(os.geteuid())


@pytest.mark.parametrize("case, error, step", [
    ("no such command", FileNotFoundError, "execve"),
    ("not executable", PermissionError, "execve"),
    ("folder out of reach", PermissionError, "chdir"),
])
def test_a_failed_step_says_which_and_leaves_no_child(spawn: launcher.Spawn, folder: Path, case: str,
                                                      error: type[OSError], step: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    private = folder / "private"
    private.mkdir(mode=0o700)
    (folder / "plain").write_text("not a program\n")
    executables = {"no such command": (b"/nonexistent/x", b"/also/not/here"), "not executable": (
        os.fsencode(folder / "plain"),), "folder out of reach": (b"/bin/true",)}[case]
    cwd = private if case == "folder out of reach" else folder
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    before = _children()
    try:
        with pytest.raises(error) as raised:
            spawn(executables, (b"x",), (), os.fsencode(cwd), NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,),
                  (null, null, null), (), None)
    finally:
        os.close(null)
    assert raised.value.filename == step
    assert _children() <= before  # the failed child was reaped already


@pytest.mark.parametrize("arguments, words", [
    (((b"/bin/true",), (b"true",), (), b"/", 0, -1, None, (3, 3, 3), (), None), "given together"),
    (((b"/bin/true",), (), (), b"/", -1, -1, None, (3, 3, 3), (), None), "must not be empty"),
    (((b"/bin/true",), (b"a\0b",), (), b"/", -1, -1, None, (3, 3, 3), (), None), "without NUL"),
    (((b"/bin/true",), (b"true",), (), b"/", -1, -1, None, (0, 3, 3), (), None), "at 3 or above"),
    (((b"/bin/true",), (b"true",), (), b"/", -1, -1, None, (3, 3, 3), (-1,), None), "open descriptor"),
    (((b"/bin/true",), (b"true",), (), b"/", -1, -1, None, (3, 3, 3), (), ()), "at least one CPU"),
    (((b"/bin/true",), (b"true",), (), b"/", -1, -1, None, (3, 3, 3), (), (1 << 20,)), "CPU number below"),
])
def test_bad_arguments_are_refused_before_any_child(spawn: launcher.Spawn, arguments: tuple[Any, ...],
                                                    words: str) -> None:
    with pytest.raises(ValueError, match=words):
        spawn(*arguments)


def test_the_child_joins_the_jobs_cgroup_and_cpus_and_the_caller_stays_in_its_own(spawn: launcher.Spawn,
                                                                                   folder: Path) -> None:
    """The job is in its group and on its CPU from its first instruction (it writes itself to the
    group's `tasks` file before the exec); the launcher never moves. A group removed since its file
    was opened refuses the child: OSError names the step "cgroup", and no child is left."""
    hierarchy = cgroups.detect()
    if os.geteuid() != 0 or hierarchy is None or hierarchy.version != "v1":
        pytest.skip("needs root and a writable cgroup v1 hierarchy (where the launcher's spawn joins groups)")
    group = Path("/sys/fs/cgroup/cpu/jobproxy") / f"spawn-child-{os.getpid()}"
    group.mkdir()
    tasks = os.open(group / "tasks", os.O_WRONLY | os.O_CLOEXEC)
    mine_before, cpus_before = Path("/proc/self/cgroup").read_text(), os.sched_getaffinity(0)
    try:
        status, out = _run(spawn, folder, "grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:' /proc/self/cgroup; "
                                          "grep Cpus_allowed_list /proc/self/status", joins=(tasks,), cpus=(0,))
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out.splitlines()[0].endswith(f"/jobproxy/{group.name}"), out
        assert out.splitlines()[1].split()[-1] == "0", out
        assert Path("/proc/self/cgroup").read_text() == mine_before and os.sched_getaffinity(0) == cpus_before
        group.rmdir()  # the job ended: the group is empty
        before = _children()
        with pytest.raises(OSError) as raised:
            _run(spawn, folder, "true", joins=(tasks,))
        assert raised.value.filename == "cgroup" and _children() <= before
    finally:
        os.close(tasks)
        if group.exists():
            group.rmdir()


def test_the_files_a_spawn_joins_by_stay_open_when_room_is_made_for_them(tmp_path: Path) -> None:
    """At its limit of open files, the launcher closes others to open a job's: never one of the
    files that job joins by (their numbers could otherwise be reused for another group's file)."""
    files = launcher._CgroupFiles()
    files.MOST = 3
    paths = [str(tmp_path / name) for name in ("a", "b", "c", "d")]
    for path in paths:
        Path(path).touch()
    try:
        files.fds(paths[:2])
        files.fds(paths[2:3])
        got = files.fds([paths[0], paths[3]])  # one already open, one to open past the limit
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in got] == [paths[0], paths[3]]
        assert sorted(files._open) == [paths[0], paths[3]]
    finally:
        for path in list(files._open):
            files.forget(path)


def test_the_launcher_finds_it_beside_itself() -> None:
    """launcher.py runs as a script in an isolated interpreter (`-I`), whose path does not hold
    the script's folder: it loads the compiled spawn from beside itself all the same."""
    found = subprocess.run([sys.executable, "-I", "-S", "-c", "import runpy, sys; "
                            f"found = runpy.run_path({launcher.__file__!r})['compiled_spawn'](); "
                            "print(found is not None, 'launcher' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    built = any(Path(launcher.__file__).parent.glob("_spawn*.so"))
    if IN_CI:
        assert built, "the compiled spawn must be built in CI"
    assert found.stdout.split() == [str(built), "False"], found.stderr


def test_the_launcher_keeps_its_cgroup_files_and_opens_a_removed_groups_again() -> None:
    """The launcher moves itself in and out of a job's v1 group through `tasks` files it keeps
    open; a group removed and made again under the same name is entered all the same."""
    hierarchy = cgroups.detect()
    if hierarchy is None or hierarchy.version != "v1":
        pytest.skip("needs a writable cgroup v1 hierarchy (the only one the launcher moves itself on)")
    group = Path("/sys/fs/cgroup/cpu/jobproxy") / f"spawn-test-{os.getpid()}"
    script = f"""
import os, sys
from pathlib import Path
sys.path.insert(0, {str(Path(launcher.__file__).parent)!r})
from launcher import _CgroupFiles, _Home
group, home = Path({str(group)!r}), _Home()
back = home.tasks_for(str(group / "cgroup.procs"))
files = _CgroupFiles()
def mine():
    return next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if "cpu" in line.split(":")[1].split(","))
seen = []
for _ in range(2):
    group.mkdir()
    files.enter(str(group / "tasks"))
    seen.append(mine())
    files.enter(back)
    seen.append(mine())
    group.rmdir()  # an open tasks file does not keep the group
print(" ".join(seen), len(files._open))
"""
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=60)
    finally:
        if group.exists():
            group.rmdir()
    assert done.returncode == 0, done.stderr
    *seen, kept = done.stdout.split()
    inside = f"/jobproxy/{group.name}"
    assert seen[0] == seen[2] == inside and seen[1] == seen[3] != inside
    assert kept == "2"  # the group's file (opened again) and the launcher's own


@pytest.mark.parametrize("how", ["compiled", "subprocess"])
def test_the_launcher_spawns_a_direct_job_as_its_user_either_way(folder: Path, how: str,
                                                                 request: pytest.FixtureRequest) -> None:
    """The launcher's spawn of a direct job, with the compiled spawn and without it (an install
    without a C compiler): the same job, as its user, in its folder, with its exit-code file."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    compiled: launcher.Spawn | None = request.getfixturevalue("spawn") if how == "compiled" else None
    requests, to_launcher = os.pipe()
    from_launcher, answers = os.pipe()
    serving = launcher.Launcher(requests, answers, compiled)
    run = {"op": "run", "id": "t-1", "join": [], "cpus": [], "rlimit_as": 0, "user": "nobody",
               "stdout": str(folder / "out"), "stderr": str(folder / "err"), "env": {"PATH": "/usr/bin:/bin"},
               "cwd": str(folder), "gpus": None, "argv": ["sh", "-c", "id -u; pwd; exit 4"], "cputime": None,
               "exit_file": str(folder / "exit"), "spawn": True}
    try:
        assert serving.spawn(run)
        (job,) = serving.jobs.values()
        assert (job.popen is None) == (how == "compiled")
        for _ in range(500):
            serving.reap()
            if not serving.jobs:
                break
            time.sleep(0.01)
        serving.flush()
        answered = [json.loads(line) for line in os.read(from_launcher, 65536).decode().splitlines()]
    finally:
        for fd in (requests, to_launcher, from_launcher, answers, serving.null):
            os.close(fd)
    assert [a["op"] for a in answered] == ["started", "exit"] and answered[1]["code"] == 4
    assert (folder / "out").read_text().split() == [str(NOBODY.pw_uid), str(folder)]
    assert (folder / "exit").read_text() == "4\n" and os.stat(folder / "out").st_uid == NOBODY.pw_uid
