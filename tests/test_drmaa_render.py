"""The DRMAA plugin's pure parts, without a cluster: native specification, job template and job
script, state mapping from JobInfo as drmaa-python returns it, and qacct parsing, on answers
captured from Grid Engine 8.1.9 (tests/captured/)."""
from __future__ import annotations

import doctest
import logging
import subprocess
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from gateway.model import task_from_document
from gateway.validation import SchemaValidator
from schedulers.base import JobRef, Task, TaskState
from schedulers.drmaa import gridengine
from schedulers.drmaa import mapping as drmaa_map
from schedulers.drmaa.mapping import Ending, conclude
from schedulers.drmaa.plugin import DrmaaScheduler
from schedulers.script import Command, check_template, load_template, placeholders

CAPTURED = Path(__file__).parent / "captured"

#: drmaa-python's JobInfo (drmaa.session.JobInfo), whose fields the plugin reads.
JobInfo = namedtuple("JobInfo", "jobId hasExited hasSignal terminatedSignal hasCoreDump wasAborted exitStatus "
                                "resourceUsage")


def task(**fields: Any) -> Task:
    return task_from_document({"user": "u", "cmd": "true", **fields}, "1a21e6e3e7b18ca1a41",
                              "/shared/tasks/1a21e6e3e7b18ca1a41")


def spec(pe: str = "smp", queue: str | None = None, pieces: tuple[str, ...] = drmaa_map.GRID_ENGINE_SPEC,
         **fields: Any) -> str:
    return drmaa_map.native_spec(pieces, drmaa_map.native_values(task(**fields), pe, queue))


# ---- native specification ----------------------------------------------------------------------


def test_doctests() -> None:
    for module in (drmaa_map, gridengine):
        failures, tried = doctest.testmod(module)
        assert tried > 0 and failures == 0, module.__name__
        assert tried > 0 and failures == 0


def test_no_limits_asks_for_nothing_but_verification() -> None:
    assert spec() == "-w e"
    assert spec(queue="short.q") == "-w e -q short.q"


def test_one_core_needs_no_parallel_environment() -> None:
    assert spec(cores=1, memory=1) == "-w e -l h_vmem=1024K"


def test_limits_are_shared_between_slots_rounding_up() -> None:
    # 100 MiB = 102400 KiB over 3 slots: 34133.33 -> 34134 per slot, 102402 KiB in all
    assert spec(cores=3, memory=100, pe="mpi") == "-w e -pe mpi 3 -l h_vmem=34134K"
    assert 102400 <= 3 * 34134 < 102400 + 3


@pytest.mark.parametrize("cores, cputime, h_cpu", [(1, 1, 6), (1, 2, 7), (2, 2, 4), (3, 10, 5), (4, 3600, 902)])
def test_h_cpu_is_the_job_scripts_hard_limit_shared_between_slots(cores: int, cputime: int, h_cpu: int) -> None:
    """The job script kills at cputime + 5 s (SIGXCPU at cputime); Grid Engine's per-process
    limit is h_cpu x slots, which must not be below that, or the script could not set it."""
    assert spec(cores=cores, cputime=cputime).endswith(f" -l h_cpu={h_cpu}")
    assert cputime + 5 <= cores * h_cpu < cputime + 5 + cores


def test_memory_the_container_runtime_enforces_is_left_out() -> None:
    values = drmaa_map.native_values(task(cores=2, memory=64, cputime=10), "smp", None, job_memory=False)
    assert drmaa_map.native_spec(drmaa_map.GRID_ENGINE_SPEC, values) == "-w e -pe smp 2 -l h_cpu=8"
    assert values["memory"] is values["memory_per_slot_kib"] is None


def test_huge_values_are_plain_integers() -> None:
    rendered = spec(cores=100000, memory=1073741824, cputime=31536000000)
    assert rendered == "-w e -pe smp 100000 -l h_vmem=10995117K -l h_cpu=315361"


def test_admin_template_pieces_are_kept_only_with_all_their_values() -> None:
    pieces = ("-P proj", "-l mem_total={memory}M,s_cpu={cputime}", "-pe {pe} {slots}", "-ac limits={{none}}")
    assert spec(pieces=pieces) == "-P proj -pe smp 1 -ac limits={none}"
    assert (spec(pieces=pieces, memory=5, cputime=9, cores=2)
            == "-P proj -l mem_total=5M,s_cpu=9 -pe smp 2 -ac limits={none}")
    assert spec(pieces=()) == ""


@pytest.mark.parametrize("piece, message", [
    ("-l h_vmem={h_vmem}", "unknown placeholder {h_vmem}"),
    ("-l h_vmem={memory", "expected '}'"),
    ("-l h_vmem={memory:>9}", "placeholders are plain names"),
    ("-l {}", "placeholders are plain names"),
    ("-l {memory!r}", "placeholders are plain names"),
])
def test_bad_template_pieces_are_refused_at_start_up(piece: str, message: str) -> None:
    with pytest.raises(ValueError, match="native_spec piece") as refused:
        drmaa_map.check_native_spec(("-w e", piece))
    assert message in str(refused.value)


def test_default_template_is_valid() -> None:
    drmaa_map.check_native_spec(drmaa_map.GRID_ENGINE_SPEC)


# ---- job template and job script -------------------------------------------------------------


def test_job_template_fields() -> None:
    t = task(stdout="/out/o.txt", stderr="/out/e.txt")
    fields = drmaa_map.job_template(t, "/shared/tasks/x/drmaa-job.sh", "-w e",
                                    {"LANG": "C.UTF-8", "JOBPROXY_TASK_ID": "forged"})
    assert fields == {
        "remoteCommand": "/shared/tasks/x/drmaa-job.sh",
        "jobName": "jobproxy-1a21e6e3e7b18ca1a41",
        "workingDirectory": "/shared/tasks/1a21e6e3e7b18ca1a41",
        "outputPath": ":/out/o.txt",
        "errorPath": ":/out/e.txt",
        "jobEnvironment": {"LANG": "C.UTF-8", "JOBPROXY_TASK_ID": "1a21e6e3e7b18ca1a41"},
        "nativeSpecification": "-w e",
    }


def test_one_file_for_both_streams_is_joined() -> None:
    fields = drmaa_map.job_template(task(stdout="/out/all", stderr="/out/all"), "/s.sh", "", {})
    assert fields["joinFiles"] is True and "errorPath" not in fields and fields["outputPath"] == ":/out/all"


def test_job_script_quotes_every_value_and_runs(tmp_path: Path) -> None:
    workdir = tmp_path / "it's a $dir"
    workdir.mkdir()
    t = task_from_document({"user": "u", "cmd": ["printf", "%s|", "a b", "$HOME", "`id`"], "cputime": 30}, "tid",
                           str(workdir))
    text = drmaa_map.job_script(load_template("schedulers.drmaa"), t,
                                Command(["printf", "%s|", "a b", "$HOME", "`id`"]))
    assert text.startswith("#!/bin/bash\n# JobProxy task tid, DRMAA scheduler (job name jobproxy-tid)\n")
    assert "jobproxy_hard=35" in text and "? jobproxy_hard : 30 ))" in text
    (tmp_path / "job.sh").write_text(text)
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "a b|$HOME|`id`|")
    assert (workdir / "exit_code").read_text() == "0\n"


def test_built_in_template_uses_known_placeholders() -> None:
    assert placeholders(load_template("schedulers.drmaa")) == {"task_id", "job_name", "resources", "run"}
    check_template(load_template("schedulers.drmaa"), drmaa_map.SCRIPT_PLACEHOLDERS, "drmaa.sh")
    with pytest.raises(ValueError, match="unknown placeholder"):
        check_template("{{run}} {{nodes}}", drmaa_map.SCRIPT_PLACEHOLDERS, "site.sh")


# ---- DRMAA states -> JobStatus -------------------------------------------------------------


@pytest.mark.parametrize("drm_state, state", [
    ("queued_active", TaskState.QUEUED), ("running", TaskState.RUNNING),
    ("user_on_hold", TaskState.PAUSED), ("system_on_hold", TaskState.PAUSED), ("user_system_on_hold", TaskState.PAUSED),
    ("user_suspended", TaskState.PAUSED), ("system_suspended", TaskState.PAUSED),
    ("user_system_suspended", TaskState.PAUSED),
])
def test_active_states(drm_state: str, state: TaskState) -> None:
    status = drmaa_map.active_status("26", drm_state)
    assert status.state == state and "26" in status.description


@pytest.mark.parametrize("drm_state", ["undetermined", "some_new_state"])
def test_unknown_states_are_unknown_with_a_log_line(drm_state: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        status = drmaa_map.active_status("26", drm_state)
    assert status.state == TaskState.UNKNOWN and drm_state in status.description
    assert any("26" in r.getMessage() and drm_state in r.getMessage() for r in caplog.records)


# JobInfo as wait() returned it from Grid Engine 8.1.9 (resourceUsage trimmed to what is read)
EXIT_3 = JobInfo("26", True, False, "", False, False, 3,
                 {"cpu": "0.0144", "maxvmem": "0.0000", "end_time": "1795806368.0000"})
H_CPU_KILL = JobInfo("27", False, True, "SIGKILL", False, False, 0, {"cpu": "1.9849", "maxvmem": "3256320.0000"})
ALLOCATION_FAILED = JobInfo("28", True, False, "", False, False, 1, {"cpu": "0.0284", "maxvmem": "0.0000"})
H_VMEM_KILL = JobInfo("29", False, True, "SIGKILL", False, False, 0, {"cpu": "0.1700", "maxvmem": "343490560.0000"})
TERMINATED = JobInfo("30", False, False, "", False, True, 0, {"cpu": "0.0094", "maxvmem": "1929216.0000"})


def ended(info: JobInfo) -> Ending:
    return drmaa_map.ending_from_jobinfo(info)


def test_exit_status_from_the_exit_code_file() -> None:
    status = conclude(task(), "26", exit_code=3, ending=ended(EXIT_3))
    assert (status.state, status.description, status.exit_code) == (TaskState.EXECUTOR_ERROR, "exit code 3", 3)
    assert conclude(task(), "26", exit_code=0, ending=ended(EXIT_3)).state == TaskState.COMPLETE
    finished = ended(EXIT_3).finished
    assert finished is not None and finished.timestamp() == 1795806368


def test_h_cpu_kill_without_exit_file_is_the_cputime_limit() -> None:
    status = conclude(task(cputime=2), "27", exit_code=None, ending=ended(H_CPU_KILL))
    assert (status.state, status.description, status.exit_code) == (
        TaskState.EXECUTOR_ERROR, "killed: CPU time limit of 2 s exceeded", 137)


def test_sigkill_without_cpu_evidence_says_only_the_signal() -> None:
    assert (conclude(task(cputime=100), "27", exit_code=None, ending=ended(H_CPU_KILL)).description
            == "killed by SIGKILL")
    assert conclude(task(), "27", exit_code=None, ending=ended(H_CPU_KILL)).description == "killed by SIGKILL"


def test_sigxcpu_and_sigkill_in_the_exit_code_file() -> None:
    assert (conclude(task(cputime=2), "1", exit_code=152, ending=None).description
            == "killed: CPU time limit of 2 s exceeded")
    spent = Ending(exit_status=137, cpu=7.0)
    assert (conclude(task(cputime=2), "1", exit_code=137, ending=spent).description
            == "killed: CPU time limit of 2 s exceeded")
    assert conclude(task(cputime=2), "1", exit_code=137, ending=None).description == "killed by SIGKILL"


def test_processes_over_memory_together_are_killed_for_memory() -> None:
    status = conclude(task(memory=150), "29", exit_code=None, ending=ended(H_VMEM_KILL))
    assert (status.description, status.exit_code) == ("killed: memory limit of 150 MiB exceeded", 137)


def test_failed_allocation_names_memory_only_with_evidence() -> None:
    memory = task(memory=150)
    with_words = conclude(memory, "28", exit_code=1, ending=ended(ALLOCATION_FAILED),
                          stderr_tail="Traceback...\nMemoryError\n")
    assert with_words.description == "memory limit of 150 MiB exceeded (MemoryError on stderr); exit code 1"
    assert with_words.exit_code == 1
    without = conclude(memory, "28", exit_code=1, ending=ended(ALLOCATION_FAILED),
                       stderr_tail="error: file not found\n")
    assert without.description == "exit code 1"
    no_limit = conclude(task(), "28", exit_code=1, ending=ended(ALLOCATION_FAILED), stderr_tail="MemoryError\n")
    assert no_limit.description == "exit code 1"
    peak = conclude(memory, "28", exit_code=2, ending=Ending(exit_status=2, maxvmem=149.5 * 1048576))
    assert peak.description == "memory limit of 150 MiB exceeded (peak virtual memory 150 MiB); exit code 2"
    success = conclude(memory, "28", exit_code=0, ending=None, stderr_tail="caught a MemoryError, carried on\n")
    assert success.state == TaskState.COMPLETE


def test_aborted_job_is_a_system_error_with_the_drms_reason() -> None:
    status = conclude(task(), "30", exit_code=None, ending=ended(TERMINATED))
    assert status.state == TaskState.SYSTEM_ERROR and "aborted job 30" in status.description
    failed = conclude(task(), "35", exit_code=None,
                      ending=Ending(aborted=True, reason="26 : opening input/output file"))
    assert failed.description.endswith("(26 : opening input/output file)")


def test_job_script_that_died_before_recording() -> None:
    status = conclude(task(), "9", exit_code=None, ending=Ending(exit_status=1))
    assert status.state == TaskState.EXECUTOR_ERROR and status.exit_code == 1
    assert status.description.startswith("exit code 1 (the job script ended before recording it")
    assert conclude(task(), "9", exit_code=None, ending=Ending(exit_status=0)).state == TaskState.COMPLETE


def test_no_record_at_all_is_a_system_error() -> None:
    status = conclude(task(), "9", exit_code=None, ending=None)
    assert status.state == TaskState.SYSTEM_ERROR and "no exit-code file" in status.description


def test_other_signals() -> None:
    status = conclude(task(), "9", exit_code=None, ending=Ending(signal="SIGTERM"))
    assert (status.description, status.exit_code) == ("killed by SIGTERM", 143)
    odd = conclude(task(), "9", exit_code=None, ending=Ending(signal="SIGWHAT"))
    assert (odd.description, odd.exit_code) == ("killed by SIGWHAT", None)


# ---- qacct ---------------------------------------------------------------------------------


def qacct_text() -> str:
    return (CAPTURED / "gridengine-8.1.9-qacct.txt").read_text()


def test_qacct_record_is_found_by_job_name() -> None:
    record = gridengine.parse_qacct(qacct_text(), "mem2")
    assert record is not None and record["jobnumber"] == "29" and record["slots"] == "1"
    assert gridengine.parse_qacct(qacct_text(), "jobproxy-nosuchtask") is None
    assert gridengine.parse_qacct("", "cpu") is None


def test_reused_job_id_takes_the_last_record_of_that_name() -> None:
    text = qacct_text()
    first = text.split("==============================================================\n")[1]
    again = (first.replace("exit_status  137", "exit_status  0  ")
             .replace("failed       100 : assumedly after job", "failed       0"))
    record = gridengine.parse_qacct(text + "==============================================================\n" + again,
                                    "cpu")
    assert record is not None and record["failed"] == "0"


def test_qacct_records_become_endings() -> None:
    h_cpu = gridengine.ending_from_record(gridengine.parse_qacct(qacct_text(), "cpu") or {})
    assert (h_cpu.signal, h_cpu.cpu, h_cpu.reason) == ("SIGKILL", 1.985, "assumedly after job")
    assert h_cpu.finished is not None and h_cpu.finished.strftime("%H:%M:%S") == "19:07:14"
    h_vmem = gridengine.ending_from_record(gridengine.parse_qacct(qacct_text(), "mem2") or {})
    assert h_vmem.signal == "SIGKILL" and h_vmem.maxvmem == pytest.approx(327.578 * 1048576)
    never_ran = gridengine.ending_from_record(gridengine.parse_qacct(qacct_text(), "true") or {})
    assert never_ran.aborted and never_ran.reason == "26 : opening input/output file" and never_ran.finished is None
    exited = gridengine.ending_from_record({"failed": "0", "exit_status": "3", "cpu": "0.014s", "maxvmem": "0.000B"})
    assert (exited.exit_status, exited.signal, exited.aborted) == (3, None, False)


def test_qacct_endings_give_the_same_outcomes_as_jobinfo() -> None:
    for name, t, info in (("cpu", task(cputime=2), H_CPU_KILL), ("mem2", task(memory=150), H_VMEM_KILL)):
        from_accounting = conclude(t, "1", exit_code=None, ending=gridengine.ending_from_record(
            gridengine.parse_qacct(qacct_text(), name) or {}))
        from_session = conclude(t, "1", exit_code=None, ending=ended(info))
        assert (from_accounting.state, from_accounting.description, from_accounting.exit_code) == (
            from_session.state, from_session.description, from_session.exit_code)


def test_environment_problems(tmp_path: Path) -> None:
    assert "SGE_ROOT is not set" in (gridengine.environment_problem("", "default") or "")
    assert "not a Grid Engine cell" in (gridengine.environment_problem(str(tmp_path), "default") or "")
    (tmp_path / "default" / "common").mkdir(parents=True)
    (tmp_path / "default" / "common" / "act_qmaster").write_text("vm\n")
    assert gridengine.environment_problem(str(tmp_path), "default") is None


# ---- qstat -xml -u '*' -----------------------------------------------------------------------------

# tests/captured/gridengine-8.1.9-qstat.xml: 53 sleeping (r), 49 suspended by qmod -sj (s), 54 waiting
# for a slot (qw), 51 submitted with qsub -h (hqw), 52 with an output folder that does not exist (Eqw)


def qstat_text(name: str = "qstat") -> str:
    return (CAPTURED / f"gridengine-8.1.9-{name}.xml").read_text()


def test_qstat_lists_running_and_pending_jobs_with_their_states() -> None:
    jobs = gridengine.parse_qstat(qstat_text())
    assert {j.job_id: (j.name, j.state) for j in jobs.values()} == {
        "53": ("cap-run", "r"), "49": ("cap-susp", "s"), "54": ("cap-pend", "qw"), "51": ("cap-hold", "hqw"),
        "52": ("cap-err", "Eqw")}
    assert jobs["53"].owner == "root"
    assert jobs["53"].started is not None and jobs["53"].started.strftime("%H:%M:%S") == "06:21:58"
    assert jobs["54"].started is None  # pending jobs carry their submission time only
    assert gridengine.parse_qstat(qstat_text("qstat-empty")) == {}


@pytest.mark.parametrize("text", ["", "error: commlib error: got select error (Connection refused)\n",
                                  "<?xml version='1.0'?><unexpected/>"])
def test_qstat_output_that_is_not_its_job_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        gridengine.parse_qstat(text)


@pytest.mark.parametrize("letters, state", [
    ("qw", TaskState.QUEUED), ("hqw", TaskState.PAUSED), ("Eqw", TaskState.PAUSED), ("r", TaskState.RUNNING),
    ("t", TaskState.INITIALIZING), ("Rr", TaskState.RUNNING), ("Rq", TaskState.QUEUED), ("s", TaskState.PAUSED),
    ("S", TaskState.PAUSED), ("T", TaskState.PAUSED), ("dr", TaskState.CANCELING), ("dt", TaskState.CANCELING),
    ("hRwq", TaskState.PAUSED), ("Ehqw", TaskState.PAUSED),
])
def test_qstat_states(letters: str, state: TaskState) -> None:
    mapped = gridengine.job_state(letters)
    assert mapped is not None and mapped[0] == state and mapped[1]


def test_captured_states_in_the_common_vocabulary() -> None:
    jobs = gridengine.parse_qstat(qstat_text())
    assert {j.name: gridengine.job_state(j.state) for j in jobs.values()} == {
        "cap-run": (TaskState.RUNNING, "running"), "cap-susp": (TaskState.PAUSED, "suspended"),
        "cap-pend": (TaskState.QUEUED, "queued"), "cap-hold": (TaskState.PAUSED, "on hold"),
        "cap-err": (TaskState.PAUSED, "in error state (Grid Engine could not start it; qstat -j says why)")}


@pytest.mark.parametrize("letters", ["", "X", "qX", "R", "z"])
def test_qstat_states_not_understood_are_none(letters: str) -> None:
    assert gridengine.job_state(letters) is None


def test_a_state_not_understood_is_unknown_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    library = tmp_path / "libdrmaa.so"
    library.write_bytes(b"")
    options = SchemaValidator(DrmaaScheduler.options_schema).with_defaults(
        {"drm": "other", "native_spec": [], "library_path": str(library)})
    plugin = DrmaaScheduler("drmaa", options, tmp_path / "state")
    job = JobRef(task(), "77")
    odd = gridengine.QueuedJob("77", drmaa_map.job_name(job.task_id), "qX")
    with caplog.at_level(logging.WARNING, logger="schedulers.drmaa.plugin"):
        statuses = [plugin._listed(job, odd) for _ in range(3)]
    assert ({(s.state, s.description) for s in statuses}
            == {(TaskState.UNKNOWN, "Grid Engine reports job 77 in state qX")})
    assert [r.getMessage() for r in caplog.records] == [
        f"task {job.task_id}: Grid Engine job 77 is in state 'qX', which JobProxy does not know; reporting UNKNOWN"]
    held = plugin._listed(job, gridengine.QueuedJob("77", "n", "hqw"))
    assert (held.state, held.description) == (TaskState.PAUSED, "on hold as Grid Engine job 77")
