"""Container runtimes: command lines and site policy (pure), and Singularity/Apptainer end to end
through a bubblewrap stand-in (the real runtime cannot be installed on these machines)."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.model import task_from_document
from gateway.plugins import create_scheduler
from schedulers import script
from schedulers.base import Task, TaskRefused
from schedulers.containers import ApptainerRuntime, DockerRuntime, PodmanRuntime, SingularityRuntime

from .conftest import Gateway, writable_by_jobs

STANDIN = Path(__file__).parent / "standin" / "apptainer"


def _task(tmp_path: Path, **fields: Any) -> Task:
    document = {"user": "u", "cmd": "echo hi", "container": {"image": "busybox"}, **fields}
    return task_from_document(document, "t1", str(tmp_path / "t1"))


def test_docker_command_line(tmp_path: Path) -> None:
    runtime = DockerRuntime({"runtime": "docker", "host": "unix:///run/d.sock", "pull": "never",
                             "allowed_mounts": [str(tmp_path)], "publish_address": "127.0.0.1"})
    task = _task(tmp_path, cmd=["printf", "%s", "a b"], cores=2, memory=300, cputime=60, container={
        "image": "registry.example:5000/lab/tool:1.2", "ports": [[8080, 80]],
        "volumes": [{"host": str(tmp_path), "container": "/in", "mode": "RO"},
                    {"host": str(tmp_path), "container": "/out"}]})
    runtime.admit(task)
    command = runtime.job_command(task, script.command_argv(task))
    assert list(command.argv) == [
        "docker", "-H", "unix:///run/d.sock", "run", "--name", "jobproxy-t1", "--init", "--pull=never",
        "--label", "jobproxy.task=t1",
        "--cpus", "2", "--memory", "300m", "--memory-swap", "300m", "--ulimit", "cpu=60:65",
        "--volume", f"{tmp_path}:/in:ro", "--volume", f"{tmp_path}:/out", "--publish", "127.0.0.1:8080:80",
        "registry.example:5000/lab/tool:1.2", "printf", "%s", "a b"]
    assert command.on_stop == ["docker", "-H", "unix:///run/d.sock", "rm", "--force", "jobproxy-t1"]
    assert any("OOMKilled" in line and script.OOM_FILE in line for line in command.after)


def test_string_command_runs_through_sh_inside(tmp_path: Path) -> None:
    task = _task(tmp_path, cmd="echo $HOME > /tmp/x")
    argv = PodmanRuntime({"runtime": "podman"}).job_command(task, script.command_argv(task)).argv
    assert list(argv[-4:]) == ["busybox", "/bin/sh", "-c", "echo $HOME > /tmp/x"] and argv[0] == "podman"


def test_job_script_with_container_parses(tmp_path: Path) -> None:
    task = _task(tmp_path, cmd="echo 'quoted' \"$x\"", memory=10)
    body = script.run_block(task, DockerRuntime({"runtime": "docker"}).job_command(task, script.command_argv(task)))
    path = tmp_path / "job.sh"
    path.write_text(body)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "trap " in body and "--format '{{.State.OOMKilled}}'" in body


def test_podman_repeats_default_ulimits_and_finds_conmons_oom_file(tmp_path: Path) -> None:
    # Any --ulimit replaces containers.conf's default_ulimits: nofile/nproc are repeated on every run.
    runtime = PodmanRuntime({"runtime": "podman", "pull": "never",
                             "default_ulimits": ["nofile=20000:20000", "nproc=32768:32768"]})
    task = _task(tmp_path, cmd=["sh", "-c", "exit 3"], memory=64, cputime=2)
    command = runtime.job_command(task, script.command_argv(task))
    assert list(command.argv) == [
        "podman", "run", "--name", "jobproxy-t1", "--init", "--pull=never", "--label", "jobproxy.task=t1",
        "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
        "--memory", "64m", "--memory-swap", "64m", "--ulimit", "cpu=2:7", "busybox", "sh", "-c", "exit 3"]
    assert command.on_stop == ["podman", "rm", "--force", "jobproxy-t1"]
    # podman 4 says OOMKilled=false; conmon's `oom` file in the job's working directory tells.
    workdir, bin_dir = Path(task.workdir), tmp_path / "bin"
    workdir.mkdir()
    bin_dir.mkdir()
    (bin_dir / "podman").write_text("#!/bin/sh\n[ \"$1\" = inspect ] && echo false\nexit 0\n")  # as podman 4.3 answers
    (bin_dir / "podman").chmod(0o755)
    body = script.run_block(task, replace(command, argv=["true"], on_stop=None))
    for conmon_wrote_oom in (False, True):
        if conmon_wrote_oom:
            (workdir / "oom").touch()
        subprocess.run(["bash", "-c", body], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        assert (workdir / script.OOM_FILE).exists() == conmon_wrote_oom and not (workdir / "oom").exists()
    assert PodmanRuntime({"runtime": "podman"}).run_options() == []


@pytest.mark.parametrize("limit", ["cpu=10:20", "nofile", "nofile=a:b", "NOFILE=1:2", "nofile=1:2 --privileged"])
def test_podman_default_ulimits_are_checked_at_start_up(tmp_path: Path, limit: str) -> None:
    document: dict[str, Any] = {"scheduler": {"type": "local", "container": {"runtime": "podman",
                                                                           "default_ulimits": [limit]}},
                                "run_as": {"allow_root_jobs": True}}  # as root with auth off, nobody may not use podman
    with pytest.raises(configuration.ConfigError,
                       match=r"\$\.scheduler\.container\.default_ulimits\[0\]: must be NAME=SOFT\[:HARD\]"):
        create_scheduler(configuration.from_document(document, tmp_path, "t"))
    document["scheduler"]["container"]["default_ulimits"] = ["nofile=1024:4096", "nproc=-1", "core=0"]
    assert create_scheduler(configuration.from_document(document, tmp_path, "t")).runtime is not None


@pytest.mark.parametrize("image", ["UPPER/case", "a b", "ok/../x", "-rm", "x:", "name@sha256:short"])
def test_bad_docker_images_are_refused(tmp_path: Path, image: str) -> None:
    with pytest.raises(TaskRefused, match=r"\$\.container\.image: .* is not a valid image reference"):
        DockerRuntime({"runtime": "docker"}).admit(_task(tmp_path, container={"image": image}))


def test_image_policy(tmp_path: Path) -> None:
    runtime = DockerRuntime({"runtime": "docker", "allowed_images": ["busybox*", "lab/*"]})
    runtime.admit(_task(tmp_path, container={"image": "lab/tool:1"}))
    with pytest.raises(TaskRefused, match=r"the image 'ubuntu' is not allowed here \(allowed: busybox\*, lab/\*\)"):
        runtime.admit(_task(tmp_path, container={"image": "ubuntu"}))


def test_mount_policy_resolves_dots_and_symlinks(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "escape").symlink_to("/etc")
    runtime = DockerRuntime({"runtime": "docker", "allowed_mounts": [str(allowed)]})

    def mount(host: str) -> Task:
        return _task(tmp_path, container={"image": "busybox", "volumes": [{"host": host, "container": "/d"}]})

    runtime.admit(mount(str(allowed / "sub")))
    runtime.admit(mount(str(allowed)))
    for host in (f"{allowed}/../allowed-not", f"{allowed}/sub/../../x", str(allowed / "escape"), "/etc", f"{allowed}x"):
        with pytest.raises(TaskRefused, match=r"\$\.container\.volumes\[0\]\.host: .* is outside"):
            runtime.admit(mount(host))
    with pytest.raises(TaskRefused, match="must not contain ':'"):
        runtime.admit(mount(f"{allowed}/a:b"))
    with pytest.raises(TaskRefused, match="this site allows no volumes"):
        DockerRuntime({"runtime": "docker"}).admit(mount(str(allowed)))


def test_singularity_command_line_and_images(tmp_path: Path) -> None:
    runtime = SingularityRuntime({"runtime": "singularity", "allowed_mounts": ["/"],
                                  "image_rules": [{"match": "busybox*", "image": "/images/busybox.sif"}]})
    task = _task(tmp_path, container={"image": "busybox:1.36",
                                      "volumes": [{"host": "/data", "container": "/d", "mode": "RO"}]})
    assert list(runtime.job_command(task, ["cat", "/d/x"]).argv) == [
        "singularity", "exec", "--cleanenv", "--bind", "/data:/d:ro", "/images/busybox.sif", "cat", "/d/x"]
    assert runtime.image_for("ubuntu:22.04") == "docker://ubuntu:22.04"
    assert runtime.image_for("/shared/tool.sif") == "/shared/tool.sif"
    assert runtime.image_for("oras://reg/x:1") == "oras://reg/x:1"
    no_command = ApptainerRuntime({"runtime": "apptainer"}).job_command(_task(tmp_path), [])
    assert list(no_command.argv) == ["apptainer", "run", "--cleanenv", "docker://busybox"]


def test_singularity_refuses_ports(tmp_path: Path) -> None:
    with pytest.raises(TaskRefused, match=r"\$\.container\.ports: apptainer has no port mapping"):
        ApptainerRuntime({"runtime": "apptainer"}).admit(_task(tmp_path, container={"image": "x", "ports": [[1, 2]]}))


# ---- end to end through the stand-in -------------------------------------------------------------


def test_apptainer_standin_end_to_end(gateway_factory: Callable[..., Gateway], tmp_path: Path, rootfs: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "input.txt").write_text("from the host\n")
    writable = writable_by_jobs(tmp_path / "writable")  # jobs run as nobody when the tests run as root
    config = f"""
[paths]
roots = ["{tmp_path}"]
[scheduler]
type = "local"
poll_interval = 0.2
[scheduler.container]
runtime = "apptainer"
command = "{STANDIN}"
allowed_mounts = ["{tmp_path}"]
image_rules = [{{ match = "busybox*", image = "{rootfs}" }}]
"""
    gateway = gateway_factory(config).start()
    volumes = [{"host": str(shared), "container": "/data", "mode": "RO"}, {"host": str(writable), "container": "/out"}]
    task_id = gateway.submit({"user": "a", "cmd": "cat /data/input.txt; echo x > /data/new || echo refused; "
                              "echo written > /out/result; env | grep -c JOBPROXY_TASK_ID; exit 3",
                              "container": {"image": "busybox", "volumes": volumes}})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"]) == ("EXECUTOR_ERROR", 3)
    assert Path(state["stdout"]).read_text() == "from the host\nrefused\n0\n"  # RO bind; clean environment
    assert "Read-only file system" in Path(state["stderr"]).read_text()
    assert (writable / "result").read_text() == "written\n" and not (shared / "new").exists()

    status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(
        {"user": "a", "cmd": "true", "container": {"image": "busybox", "ports": [[8080, 80]]}}).encode(),
        {"Content-Type": "application/json"})
    assert status == 400 and b"no port mapping" in body
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(
        {"user": "a", "cmd": "true",
         "container": {"image": "busybox", "volumes": [{"host": "/etc", "container": "/e"}]}}).encode(),
        {"Content-Type": "application/json"})
    assert status == 400 and b"'/etc' is outside" in body


def test_real_apptainer_binary(tmp_path: Path) -> None:
    binary = shutil.which("apptainer") or shutil.which("singularity")
    if binary is None:
        pytest.skip("no Apptainer/Singularity binary: neither is packaged for Debian bookworm nor on PyPI, "
                    "so the stand-in tests above cover the command line")
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip()
