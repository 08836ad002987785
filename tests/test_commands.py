"""schedulers.commands.run: the one way plugins run a batch system's command."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from schedulers import commands
from schedulers.base import SchedulerUnavailable
from schedulers.commands import CommandTimeout, run


async def test_exit_status_and_both_streams() -> None:
    done = await run(["/bin/sh", "-c", "echo out; echo 'err ü' >&2; exit 3"], 30)
    assert (done.status, done.stdout, done.stderr) == (3, "out\n", "err ü\n")


async def test_arguments_reach_the_command_unchanged() -> None:
    odd = ["it's", "$HOME", "a b", "`id`", ""]
    done = await run(["/usr/bin/printf", "[%s]", *odd], 30)
    assert done.stdout == "".join(f"[{arg}]" for arg in odd)


async def test_input_is_empty() -> None:
    assert (await run(["/bin/cat"], 30)).stdout == ""


async def test_input_reaches_the_command_whole() -> None:
    """Small and larger than a pipe holds: the rest is written as the command reads it."""
    assert (await run(["/bin/cat"], 30, input=b"#!/bin/bash\ntrue\n")).stdout == "#!/bin/bash\ntrue\n"
    big = b"".join(b"%07d\n" % n for n in range(200_000))  # 1.6 MB
    assert (await run(["/bin/cat"], 30, input=big)).stdout == big.decode()


async def test_input_a_command_does_not_read_is_no_error() -> None:
    done = await run(["/bin/sh", "-c", "exec 0<&-; echo done"], 30, input=b"x" * 1_000_000)
    assert (done.status, done.stdout) == (0, "done\n")


async def test_a_command_that_cannot_start_is_unavailable_with_a_readable_message(tmp_path: Path) -> None:
    with pytest.raises(SchedulerUnavailable, match=r"^cannot run the Slurm command sbatch: No such file or directory$"):
        await run([str(tmp_path / "sbatch")], 30, service="Slurm")
    plain = tmp_path / "qstat"
    plain.write_text("not executable")
    with pytest.raises(SchedulerUnavailable, match=r"^cannot run the Grid Engine command qstat: Permission denied$"):
        await run([str(plain)], 30, service="Grid Engine")


async def test_a_command_over_its_time_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(CommandTimeout, match=r"^Slurm did not answer within 0.5 s \(sh\)$") as raised:
        await run(["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], 0.5, service="Slurm")
    assert isinstance(raised.value, SchedulerUnavailable)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
        os.kill(pid, 0)


async def test_many_commands_at_once_each_get_their_own_answer() -> None:
    done = await asyncio.gather(*(run(["/bin/sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 7}"], 30)
                                  for i in range(40)))
    assert [(d.status, d.stdout, d.stderr) for d in done] == [(i % 7, f"{i}\n", f"e{i}\n") for i in range(40)]


async def test_large_output_is_read_whole() -> None:
    done = await run(["/usr/bin/head", "-c", "3000000", "/dev/zero"], 30)
    assert (done.status, len(done.stdout)) == (0, 3000000)


async def test_a_caller_that_gives_up_leaves_no_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    pending = asyncio.ensure_future(run(["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], 30))
    while not pid_file.exists() or not pid_file.read_text().strip():
        await asyncio.sleep(0.01)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_command_dies_with_the_gateway(tmp_path: Path) -> None:
    """A gateway killed while its command runs (an sbatch, say) leaves no command running on its
    own: nobody would time it out, and it could still submit after another replica took over."""
    pid_file = tmp_path / "pid"
    gateway = subprocess.Popen([sys.executable, "-c", "import asyncio, sys; from schedulers.commands import run; "
                                f"asyncio.run(run(['/bin/sh', '-c', 'echo $$ > {pid_file}; exec sleep 60'], 120))"],
                               cwd=Path(commands.__file__).parent.parent)
    try:
        for _ in range(500):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.01)
        pid = int(pid_file.read_text())
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
    finally:
        gateway.kill()
        gateway.wait(10)
    for _ in range(500):  # its parent gone, the command is killed, and reaped by init
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        pytest.fail("the command outlived the process that ran it")


async def test_commands_start_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a process returns once the child has exec'd, which a busy machine makes slow: the
    loop goes on serving meanwhile, so the start (and the rest of the command) happens in a runner
    thread."""
    threads: list[str] = []
    real = subprocess.Popen

    def recording(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if args[0] != commands.WATCHDOG:  # started (in a runner thread too) by the first command
            threads.append(threading.current_thread().name)
        return real(*args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "Popen", recording)
    done = await asyncio.gather(*(run(["/bin/echo", str(i)], 30) for i in range(6)))
    assert [d.stdout for d in done] == [f"{i}\n" for i in range(6)]
    assert len(threads) == 6 and threading.current_thread().name not in threads
    assert all(name.startswith("command_") for name in threads), threads


async def test_a_caller_that_gives_up_while_its_command_starts_leaves_no_process(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cancelled before the runner thread has the process: the process, once started, is killed
    and reaped before the cancellation reaches the caller."""
    started: list[int] = []
    real = commands._start

    def slow(argv: list[str], with_input: bool) -> subprocess.Popen[bytes]:
        time.sleep(0.3)
        process = real(argv, with_input)
        started.append(process.pid)
        return process

    monkeypatch.setattr(commands, "_start", slow)
    pending = asyncio.ensure_future(run(["/bin/sleep", "60"], 30))
    await asyncio.sleep(0.05)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert len(started) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
        os.kill(started[0], 0)


async def replaced(watchdog: int) -> subprocess.Popen[bytes]:
    """The watchdog that replaced the one of pid `watchdog`, once there is one."""
    for _ in range(500):
        current = commands._watchdog
        if current is not None and current.pid != watchdog:
            return current
        await asyncio.sleep(0.01)
    raise AssertionError(f"the watchdog {watchdog} was not replaced")


async def test_commands_run_in_the_watchdogs_process_group(tmp_path: Path) -> None:
    """Each command is one process in the watchdog's group (not this process's), and a watchdog
    that was killed is reaped and replaced at once, with no command running: in a group of its own."""
    done = await run(["/bin/sh", "-c", "ps -o pgid= -p $$"], 30)
    group = int(done.stdout)
    assert group != os.getpgrp()
    assert Path(f"/proc/{group}/cmdline").read_bytes().split(b"\0")[:2] == [b"/bin/sh", b"-c"]
    os.kill(group, 9)
    new = await replaced(group)
    assert os.getpgid(new.pid) == new.pid
    assert not Path(f"/proc/{group}").exists()  # the killed one was reaped
    again = int((await run(["/bin/sh", "-c", "ps -o pgid= -p $$"], 30)).stdout)
    assert again == new.pid and again != os.getpgrp()


async def test_a_watchdog_that_replaces_a_killed_one_guards_the_commands_still_running() -> None:
    """Commands that ran when their watchdog was killed still die with the gateway, also one that
    ends before its next command: the new watchdog, started at once, joins their group, which
    outlives its first leader while they run."""
    group = int((await run(["/bin/sh", "-c", "ps -o pgid= -p $$"], 30)).stdout)
    running = asyncio.ensure_future(run(["/bin/sleep", "60"], 120))

    def sleeping() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and (entry / "comm").read_text() == "sleep\n":
                    found += [int(entry.name)] if os.getpgid(int(entry.name)) == group else []
        return found

    for _ in range(500):
        if sleeping():
            break
        await asyncio.sleep(0.01)
    assert sleeping(), "the command did not start"
    os.kill(group, 9)  # the watchdog, alone: the command runs on
    new = await replaced(group)  # no other command started
    assert os.getpgid(new.pid) == group and not running.done()
    assert new.stdin is not None
    new.stdin.close()  # as when the gateway ends: the new watchdog kills the group
    done = await asyncio.wait_for(running, 10)
    assert done.status == -9
    again = await replaced(new.pid)  # that one ended too, and is replaced: commands still have one
    assert int((await run(["/bin/sh", "-c", "ps -o pgid= -p $$"], 30)).stdout) == os.getpgid(again.pid)


async def test_a_command_cancelled_while_it_waits_for_a_runner_never_starts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """More commands than runners wait their turn; one whose caller gave up meanwhile is not run."""
    monkeypatch.setattr(commands, "_runners", ThreadPoolExecutor(1, thread_name_prefix="command"))
    gate, mark = tmp_path / "gate", tmp_path / "ran"
    holding = asyncio.ensure_future(run(["/bin/sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"], 30))
    waiting = asyncio.ensure_future(run(["/bin/touch", str(mark)], 30))
    await asyncio.sleep(0.2)
    waiting.cancel()
    gate.touch()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (await holding).status == 0
    assert not mark.exists()
