"""schedulers.commands.run: the one way plugins run a batch system's command."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from schedulers.base import SchedulerUnavailable
from schedulers.commands import CommandTimeout, run


async def test_exit_status_and_both_streams() -> None:
    done = await run(["/bin/sh", "-c", "echo out; echo 'err ü' >&2; exit 3"], 30)
    assert (done.status, done.stdout, done.stderr) == (3, "out\n", "err ü\n")


async def test_arguments_reach_the_command_unchanged() -> None:
    odd = ["it's", "$HOME", "a b", "`id`", ""]
    done = await run(["/usr/bin/printf", "[%s]", *odd], 30)
    assert done.stdout == "".join(f"[{arg}]" for arg in odd)


async def test_input_is_empty_unless_given() -> None:
    assert (await run(["/bin/cat"], 30)).stdout == ""
    assert (await run(["/bin/cat"], 30, stdin=b"fed\n")).stdout == "fed\n"


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
