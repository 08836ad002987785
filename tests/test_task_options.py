"""Scheduler options (v1 `options`, TES backend parameters), GPUs and preemption, without a
cluster: the schema's checks, the `#SBATCH` lines and native specifications they become, the GPU
arguments of the container runtimes (run through a real /bin/sh), the local scheduler's GPU
admission, and Slurm's PREEMPTED read from captured output."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.model import task_from_document
from gateway.validation import SchemaValidator
from schedulers.base import Task, TaskRefused, TaskState
from schedulers.containers import DockerRuntime, PodmanRuntime, SingularityRuntime
from schedulers.drmaa import mapping as drmaa_map
from schedulers.drmaa.plugin import DrmaaScheduler
from schedulers.local.admission import Admission
from schedulers.slurm.parse import directives, job_status, parse_scontrol, parse_squeue
from schedulers.task import PARAMETERS

CAPTURED = Path(__file__).parent / "captured" / "slurm-22.05-preempted.txt"
TASKS = SchemaValidator.named("task")


def task(**fields: Any) -> Task:
    return task_from_document({"user": "u", "cmd": "true", **fields}, "1a21e6e3e7b18ca1a41", "/shared/t")


# ---- the schema ----------------------------------------------------------------------------------


def test_every_built_in_parameter_is_in_the_schema() -> None:
    assert set(TASKS.schema["$defs"]["options"]["properties"]) == set(PARAMETERS)


@pytest.mark.parametrize("options", [
    {"slurm.partition": "long"}, {"slurm.partition": "long,short"}, {"slurm.constraint": "haswell&[ib|opa]*2"},
    {"sge.queue": "all.q@node1,gpu.q"}, {"sge.project": "p_1.x"}, {"slurm.account": "lab-a", "slurm.qos": "high"},
])
def test_good_options(options: dict[str, str]) -> None:
    assert TASKS.problems({"user": "u", "cmd": "true", "options": options, "gpus": 2}) == []
    assert task(options=options).backend_parameters == options


@pytest.mark.parametrize("options, path, words", [
    ({"slurm.partition": "a b"}, "$.options['slurm.partition']", "separated by commas"),
    ({"slurm.partition": "x\n#SBATCH --uid=0"}, "$.options['slurm.partition']", "separated by commas"),
    ({"slurm.account": "-x"}, "$.options['slurm.account']", "not starting with"),
    ({"slurm.constraint": "a;rm"}, "$.options['slurm.constraint']", "feature expression"),
    ({"sge.queue": "all.q -l h_vmem=1T"}, "$.options['sge.queue']", "queue list"),
    ({"sge.project": "$(id)"}, "$.options['sge.project']", "a name of 1 to 64"),
    ({"slurm.partition": ""}, "$.options['slurm.partition']", "separated by commas"),
    ({"slurm.nodes": "2"}, "$.options", "unknown field(s): 'slurm.nodes'"),
])
def test_bad_options_name_the_path(options: dict[str, str], path: str, words: str) -> None:
    problems = TASKS.problems({"user": "u", "cmd": "true", "options": options})
    assert problems and problems[0].path.replace('"', "'") == path and words in problems[0].message, problems


@pytest.mark.parametrize("gpus", [-1, 1025, 1.5, "2"])
def test_bad_gpu_counts(gpus: Any) -> None:
    assert [p.path for p in TASKS.problems({"user": "u", "cmd": "true", "gpus": gpus})] == ["$.gpus"]


# ---- Slurm ---------------------------------------------------------------------------------------


def test_slurm_lines_of_options_and_gpus() -> None:
    t = task(gpus=2, options={"slurm.partition": "long", "slurm.constraint": "a&b", "slurm.reservation": "r1",
                              "sge.queue": "ignored.q"})
    lines = directives(t, partition="site", account="acct", requeue=True)
    assert "#SBATCH --gres=gpu:2" in lines and "#SBATCH --partition=long" in lines
    assert "#SBATCH --constraint='a&b'" in lines and "#SBATCH --reservation=r1" in lines
    assert "#SBATCH --account=acct" in lines and "#SBATCH --requeue" in lines
    assert not any("site" in line or "ignored" in line for line in lines)
    assert not any("gres" in line or "requeue" in line for line in directives(task()))


def test_slurm_refuses_a_value_its_directives_cannot_carry() -> None:
    """The schema never lets one through; a third-party caller of `directives` is refused too."""
    with pytest.raises(TaskRefused) as refused:
        directives(Task("t", "u", "/w", "/w/o", "/w/e", backend_parameters={"slurm.qos": "a\\b"}))
    assert refused.value.path == "$.options.slurm.qos"


def captured() -> dict[str, str]:
    lines = [line for line in CAPTURED.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("|", 1) for line in lines)


@pytest.mark.parametrize("kind", ["preempted", "scontrol-preempted"])
def test_preempted_is_final_with_the_reason(kind: str) -> None:
    text = captured()[kind]
    job = parse_scontrol(text) if kind.startswith("scontrol") else parse_squeue(text)["18042"]
    assert job is not None and job.state == "PREEMPTED"
    status = job_status(task(), job, None)
    assert status is not None and status.state == TaskState.PREEMPTED and status.state.terminal
    assert status.description.startswith("preempted by Slurm (job 18042)") and status.exit_code == 143
    assert status.finished is not None
    # Submitted with --requeue but PREEMPTED all the same: Slurm cancelled it (PreemptMode CANCEL),
    # it does not run again (a job Slurm requeues is PENDING at once, never PREEMPTED).
    again = job_status(task(), job, None, requeue=True)
    assert again is not None and again.state == TaskState.PREEMPTED and again.state.terminal
    assert "cancelled it rather than requeue it" in again.description


def test_captured_cancel_and_run_are_read_as_before() -> None:
    found = captured()
    running, cancelled = parse_squeue(found["running"])["18042"], parse_squeue(found["cancelled"])["18042"]
    assert job_status(task(), running).state == TaskState.RUNNING  # type: ignore[union-attr]
    assert job_status(task(), cancelled).state == TaskState.CANCELED  # type: ignore[union-attr]


# ---- Grid Engine (DRMAA) -------------------------------------------------------------------------


def test_grid_engine_native_specification_of_options_and_gpus() -> None:
    t = task(cores=2, gpus=3, options={"sge.queue": "gpu.q@node1", "sge.project": "lab", "slurm.qos": "x"})
    values = drmaa_map.native_values(t, "smp", "all.q", gpu_resource="gpu")
    assert (drmaa_map.native_spec(drmaa_map.GRID_ENGINE_SPEC, values)
            == "-w e -pe smp 2 -q gpu.q@node1 -P lab -l gpu=3")
    plain = drmaa_map.native_values(task(), "smp", "all.q", gpu_resource="gpu")
    assert drmaa_map.native_spec(drmaa_map.GRID_ENGINE_SPEC, plain) == "-w e -q all.q"


# ---- container runtimes: the GPU arguments, put in place by a real /bin/sh -----------------------


def run_argv(argv: list[str], visible: str | None) -> list[str]:
    """Run `argv` with `docker`/`podman`/`apptainer` being a program that prints its arguments."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


PRINT_ARGS = ["/bin/sh", "-c", 'for a; do printf "%s\\0" "$a"; done', "runtime"]


@pytest.mark.parametrize("visible, expected", [("1,3", '"device=1,3"'), (None, '"device=0,1"')])
def test_docker_gets_the_jobs_gpus(tmp_path: Path, visible: str | None, expected: str) -> None:
    runtime = DockerRuntime({"runtime": "docker", "command": "/bin/true"})
    t = task_from_document({"user": "u", "cmd": ["nvidia-smi", "@jobproxy-gpus@"], "gpus": 2,
                            "container": {"image": "cuda"}}, "t1", str(tmp_path))
    argv = runtime.job_command(t, ["nvidia-smi", "@jobproxy-gpus@"]).argv
    assert argv[:2] == ["/bin/sh", "-c"] and argv.count("/bin/true") == 1
    args = run_argv([*argv[:argv.index("/bin/true")], *PRINT_ARGS, *argv[argv.index("/bin/true") + 1:]], visible)
    at = args.index("--gpus")
    assert args[at + 1] == expected and args[at + 2:] == ["cuda", "nvidia-smi", "@jobproxy-gpus@"]
    assert "@jobproxy-gpus@" not in args[:at]  # only the runtime's marker is replaced


def test_podman_cdi_devices_and_apptainer_nv(tmp_path: Path) -> None:
    t = task_from_document({"user": "u", "cmd": "true", "gpus": 2, "container": {"image": "cuda"}}, "t1",
                           str(tmp_path))
    podman = PodmanRuntime({"runtime": "podman", "command": "/bin/true", "gpu_devices": "cdi"})
    argv = list(podman.job_command(t, ["true"]).argv)
    args = run_argv([*argv[:argv.index("/bin/true")], *PRINT_ARGS, *argv[argv.index("/bin/true") + 1:]], "2,5")
    at = args.index("--device")
    assert args[at:at + 4] == ["--device", "nvidia.com/gpu=2", "--device", "nvidia.com/gpu=5"]
    apptainer = SingularityRuntime({"runtime": "apptainer", "command": "/bin/true"})
    argv = list(apptainer.job_command(t, ["true"]).argv)
    args = run_argv([*argv[:argv.index("/bin/true")], *PRINT_ARGS, *argv[argv.index("/bin/true") + 1:]], "4")
    assert args[args.index("--nv"):args.index("--nv") + 3] == ["--nv", "--env", "CUDA_VISIBLE_DEVICES=4"]


def test_no_gpus_no_wrapper(tmp_path: Path) -> None:
    t = task_from_document({"user": "u", "cmd": "true", "container": {"image": "cuda"}}, "t1", str(tmp_path))
    argv = DockerRuntime({"runtime": "docker"}).job_command(t, ["true"]).argv
    assert argv[0] == "docker" and "@jobproxy-gpus@" not in argv and "--gpus" not in argv


# ---- the local scheduler's GPU admission ---------------------------------------------------------


def test_local_admission_gives_each_gpu_to_one_job() -> None:
    admission = Admission((0, 1, 2, 3), 10_000, ("0", "1", "2"))
    first, second, third = (Task(f"t{n}", "u", "/w", "/o", "/e", gpus=g) for n, g in ((1, 2), (2, 2), (3, 1)))
    for t in (first, second, third):
        admission.enqueue(t)
    started = list(admission.admissible())
    assert [(s.task_id, s.gpus) for s in started] == [("t1", ("0", "1")), ("t3", ("2",))]
    assert "waiting for 1 core, 2 free, 2 GPU(s), 0 free, and 0 MiB" in admission.waiting(second).description
    admission.free("t1")
    assert [(s.task_id, s.gpus) for s in admission.admissible()] == [("t2", ("0", "1"))]


def test_drmaa_admits_gpus_only_where_the_site_counts_them(tmp_path: Path) -> None:
    library = tmp_path / "libdrmaa.so"
    library.write_bytes(b"")

    def plugin(**options: Any) -> DrmaaScheduler:
        document = {"drm": "other", "native_spec": list(drmaa_map.GRID_ENGINE_SPEC), "library_path": str(library),
                    **options}
        return DrmaaScheduler("drmaa", SchemaValidator(DrmaaScheduler.options_schema).with_defaults(document),
                              tmp_path / "state")

    with pytest.raises(TaskRefused) as refused:
        plugin().admit(task(gpus=1))
    assert refused.value.path == "$.gpus" and "no gpu_resource" in str(refused.value)
    counted = plugin(gpu_resource="gpu", max_gpus=2, queue="all.q")
    with pytest.raises(TaskRefused) as refused:
        counted.admit(task(gpus=3))
    assert refused.value.path == "$.gpus" and "at most 2" in str(refused.value)
    counted.admit(task(gpus=2))
    assert counted.native_specification(task(gpus=2, options={"sge.project": "lab"})) == "-w e -q all.q -P lab -l gpu=2"
