"""Container runtimes: how a task's `container` becomes the command its job script runs.

A runtime is a small plugin (entry-point group `jobproxy.containers`), independent of the
scheduler: local, Slurm and DRMAA job scripts alike run the argv it builds, with the task's
command appended as separate arguments (a string `cmd` through `/bin/sh -c` inside the image).
The admin enables one per scheduler instance in `[scheduler.container]`, with the site's policy:
which images may run (`allowed_images`, shell-style patterns) and which host folders may be
mounted (`allowed_mounts`; `..` and symlinks are resolved before the check).

- docker / podman: a named container (`jobproxy-<task id>`), removed when it ends; volumes,
  ports, `--cpus`, `--memory` (no extra swap) and a CPU-time ulimit inside the container. The job
  script stops and removes the container when the job is told to stop, and marks an OOM kill.
- singularity / apptainer: `exec --cleanenv --bind host:container[:ro] IMAGE CMD`; limits come
  from the job script and scheduler around it; no port mapping, so a task with ports is refused.

GPUs (a task's `gpus`): the container gets the GPUs its job holds, which the scheduler names in
`$CUDA_VISIBLE_DEVICES` when the job runs (the local scheduler and Slurm set it; elsewhere the
first N): Docker `--gpus "device=IDS"`, Podman CDI devices (`--device nvidia.com/gpu=ID` each;
option `gpu_devices` chooses for either), Singularity/Apptainer `--nv` with CUDA_VISIBLE_DEVICES.
Those ids are only known inside the job, so the argv starts with a small `/bin/sh` wrapper
(GPU_WRAP) that puts them in place of one marker argument and execs the rest unchanged.
"""
from __future__ import annotations

import abc
import asyncio
import fnmatch
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from .base import SchedulerUnavailable, TaskRefused
from .commands import run
from .script import OOM_FILE, Command, quote, quote_argv
from .task import Task, path_within
from .units import cpu_rlimit

log = logging.getLogger(__name__)

# A Docker image reference: [registry[:port]/]path[:tag][@digest], lower-case path components; the
# first component names a registry only if it has a dot or a port, or is localhost (as in Docker).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOCKER_REF = re.compile(
    rf"(?:(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+)(?::[0-9]+)?/|[a-zA-Z0-9-]+:[0-9]+/)?"
    rf"{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?"
)

COMMON_OPTIONS: dict[str, Any] = {
    "runtime": {"enum": ["docker", "podman", "singularity", "apptainer"]},
    "command": {"type": "string", "minLength": 1, "description": "the runtime's executable (default: its name)"},
    "allowed_images": {"type": "array", "items": {"type": "string", "minLength": 1}, "default": ["*"]},
    "allowed_mounts": {"type": "array", "items": {"type": "string", "pattern": "^/"}, "default": [],
                       "description": "host folders under which volumes may lie; none by default"},
    "extra_args": {"type": "array", "items": {"type": "string"}, "default": []},
}

#: The argument GPU_WRAP replaces by the GPU arguments (the first one only: the runtime's own
#: options come before the image and the task's command).
GPUS_MARK = "@jobproxy-gpus@"
#: `sh -c GPU_WRAP sh MODE N KIND ARGV...`: execs ARGV with GPUS_MARK replaced by the arguments
#: that give the container the job's GPUs ($CUDA_VISIBLE_DEVICES, else 0..N-1). MODE: `gpus`
#: (Docker's --gpus), `cdi` (--device KIND=ID per GPU), `nv` (Singularity's --nv).
GPU_WRAP = r"""mode=$1 n=$2 kind=$3
shift 3
ids=${CUDA_VISIBLE_DEVICES-}
if [ -z "$ids" ]; then i=0; while [ "$i" -lt "$n" ]; do ids=${ids:+$ids,}$i; i=$((i + 1)); done; fi
found=
for a; do
    shift
    if [ -z "$found" ] && [ "$a" = @jobproxy-gpus@ ]; then
        found=1
        case $mode in
            gpus) set -- "$@" --gpus "\"device=$ids\"" ;;
            nv) set -- "$@" --nv --env "CUDA_VISIBLE_DEVICES=$ids" ;;
            cdi) old=$IFS; IFS=,; for id in $ids; do set -- "$@" --device "$kind=$id"; done; IFS=$old ;;
        esac
    else
        set -- "$@" "$a"
    fi
done
exec "$@"
"""


def with_gpus(task: Task, argv: list[str], mode: str, kind: str = "") -> list[str]:
    """`argv` (holding GPUS_MARK where the GPU arguments go) for a task with GPUs; without GPUs,
    `argv` less the mark."""
    if not task.gpus:
        mark = argv.index(GPUS_MARK)
        return [*argv[:mark], *argv[mark + 1:]]
    return ["/bin/sh", "-c", GPU_WRAP, "sh", mode, str(task.gpus), kind, *argv]


class ContainerRuntime(abc.ABC):
    """Base of the runtimes: policy checks and the command line."""

    name: ClassVar[str]
    options_schema: ClassVar[dict[str, Any]]
    supports_ports: ClassVar[bool] = True
    #: The runtime enforces the task's memory limit itself (its container lives outside the job's
    #: process tree), so a scheduler must not put an address-space limit on its client.
    limits_memory: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        """`options`: the site's `[scheduler.container]` table; what it leaves out takes the
        `default` of `options_schema`, the one place each default is written."""
        defaults = {key: spec["default"] for key, spec in self.options_schema["properties"].items()
                    if "default" in spec}
        self.options = {**defaults, **options}
        self.command = str(self.options.get("command") or self.name)
        self.allowed_images = list(self.options["allowed_images"])
        self.allowed_mounts = [os.path.realpath(p) for p in self.options["allowed_mounts"]]
        self.extra_args = list(self.options["extra_args"])

    def admit(self, task: Task) -> None:
        """Refuse (400) what the site's policy or this runtime does not allow."""
        container = task.container
        assert container is not None
        self.check_image(container.image)
        if not any(fnmatch.fnmatchcase(container.image, p) for p in self.allowed_images):
            raise TaskRefused(f"$.container.image: the image {container.image!r} is not allowed here "
                              f"(allowed: {', '.join(self.allowed_images) or 'none'})")
        if container.ports and not self.supports_ports:
            raise TaskRefused(f"$.container.ports: {self.name} has no port mapping; submit the task without ports")
        for index, mount in enumerate(container.volumes):
            where = f"$.container.volumes[{index}]"
            for field, path in (("host", mount.host), ("container", mount.container)):
                if any(c in path for c in ":,"):
                    raise TaskRefused(f"{where}.{field}: {path!r} must not contain ':' or ','")
            if not path_within(mount.host, self.allowed_mounts):
                roots = ", ".join(self.allowed_mounts) or "none: this site allows no volumes"
                raise TaskRefused(f"{where}.host: {mount.host!r} is outside the folders that may be mounted ({roots})")

    def check_image(self, image: str) -> None:
        """Refuse image names this runtime cannot use."""

    def name_of(self, task: Task) -> str:
        return f"jobproxy-{task.id}"

    @abc.abstractmethod
    def job_command(self, task: Task, argv: list[str]) -> Command:
        """What the job script runs for `task`, whose own command is `argv` (maybe empty)."""

    def stop_argv(self, task: Task) -> list[str] | None:
        """A command that stops the task's container from outside the job, if there is one."""
        return None

    def exists_argv(self, task: Task) -> list[str] | None:
        """A command that succeeds while the task's container exists, if there is one."""
        return None

    async def stop(self, task: Task, timeout: float = 30) -> None:
        """Stop the task's container from the gateway's host (after its job was cancelled), and wait
        until it is gone: the job script may be removing it at the same moment."""
        argv, probe = self.stop_argv(task), self.exists_argv(task)
        if not argv:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            await run(argv, timeout, service=self.name.capitalize())
            while probe and (await run(probe, timeout, service=self.name.capitalize())).status == 0:
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("task %s: its container %s is still there after %s s", task.id, self.name_of(task),
                                timeout)
                    return
                await asyncio.sleep(0.2)
                await run(argv, timeout, service=self.name.capitalize())
        except SchedulerUnavailable as exc:
            log.warning("task %s: could not stop its container %s: %s", task.id, self.name_of(task), exc)


class DockerRuntime(ContainerRuntime):
    """Docker, or any runtime with Docker's command line."""

    name = "docker"
    limits_memory = True
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **COMMON_OPTIONS,
            "host": {"type": "string", "minLength": 1, "description": "the engine's address (docker -H)"},
            "pull": {"enum": ["always", "missing", "never"], "default": "missing"},
            "publish_address": {"type": "string", "default": "", "description": "host address ports are published on"},
            "gpu_devices": {"enum": ["gpus", "cdi"], "default": "gpus",
                            "description": "how a task's GPUs enter its container: --gpus (the NVIDIA container "
                                           "toolkit) or CDI devices (--device KIND=ID)"},
            "cdi_kind": {"type": "string", "pattern": "^[a-z0-9.-]+/[a-z0-9.-]+$", "default": "nvidia.com/gpu",
                         "x-error": {"pattern": "must be a CDI device kind, vendor/class"},
                         "description": "the CDI device kind of GPUs"},
        },
    }

    def check_image(self, image: str) -> None:
        if not _DOCKER_REF.fullmatch(image) or len(image) > 255:
            raise TaskRefused(f"$.container.image: {image!r} is not a valid image reference "
                              "(lower-case [registry/]name[:tag][@sha256:digest])")

    def _cli(self) -> list[str]:
        host = self.options.get("host")
        return [self.command, *(["-H", host] if host else [])]

    def job_command(self, task: Task, argv: list[str]) -> Command:
        container = task.container
        assert container is not None
        name = self.name_of(task)
        # --init: a small init as PID 1 forwards signals and reaps, so the container stops promptly
        run = [*self._cli(), "run", "--name", name, "--init", f"--pull={self.options.get('pull', 'missing')}",
               "--label", f"jobproxy.task={task.id}", *self.run_options()]
        if task.cores:
            run += ["--cpus", str(task.cores)]
        if task.memory:
            run += ["--memory", f"{task.memory}m", "--memory-swap", f"{task.memory}m"]
        if task.cputime:
            soft, hard = cpu_rlimit(task.cputime)
            run += ["--ulimit", f"cpu={soft}:{hard}"]
        for mount in container.volumes:
            run += ["--volume", f"{mount.host}:{mount.container}" + (":ro" if mount.read_only else "")]
        address = self.options["publish_address"]
        for port in container.ports:
            run += ["--publish", f"{address + ':' if address else ''}{port.host}:{port.container}"]
        run += [GPUS_MARK, *self.extra_args, container.image, *argv]
        return Command(
            argv=with_gpus(task, run, self.options["gpu_devices"], self.options["cdi_kind"]),
            on_stop=self.stop_argv(task),
            after=[f'{self.oom_test(task)} && : > {quote(f"{task.workdir}/{OOM_FILE}")}',
                   quote_argv([*self._cli(), "rm", "--force", name]) + " >/dev/null 2>&1"],
        )

    def run_options(self) -> list[str]:
        """Options of every `run` (after the name, init, pull policy and label)."""
        return []

    def oom_test(self, task: Task) -> str:
        """A shell test that succeeds if the task's (ended) container was killed for memory."""
        inspect = quote_argv([*self._cli(), "inspect", "--format", "{{.State.OOMKilled}}", self.name_of(task)])
        return f'[ "$({inspect} 2>/dev/null)" = true ]'

    def stop_argv(self, task: Task) -> list[str]:
        return [*self._cli(), "rm", "--force", self.name_of(task)]

    def exists_argv(self, task: Task) -> list[str]:
        return [*self._cli(), "container", "inspect", self.name_of(task)]


class PodmanRuntime(DockerRuntime):
    """Podman: Docker's command line, plus `default_ulimits` and an OOM mark podman 4 does not give.

    - Any `--ulimit` (the task's CPU time) replaces the containers.conf `default_ulimits` instead of
      adding to them, and podman's own defaults for nofile/nproc exceed the hard limits of a host
      without CAP_SYS_RESOURCE (the container then fails to start): `default_ulimits` are passed as
      `--ulimit` arguments to every container.
    - Podman before 5.0 reports `OOMKilled` false (podman#13102): conmon writes its `oom` file into
      the current directory (the task's workdir, where the job script runs), where podman does not
      look; that file marks the OOM kill as well.
    """

    name = "podman"
    options_schema = {
        **DockerRuntime.options_schema,
        "properties": {
            **DockerRuntime.options_schema["properties"],
            "default_ulimits": {
                "type": "array", "default": [],
                "items": {"type": "string", "pattern": "^(?!cpu=)[a-z]+=(-1|[0-9]+)(:(-1|[0-9]+))?$",
                          "x-error": {"pattern": "must be NAME=SOFT[:HARD], e.g. nofile=20000:20000 (not cpu: "
                                                 "the task's cputime sets that)"}},
                "description": "--ulimit NAME=SOFT[:HARD] for every container, e.g. nofile and nproc within "
                               "the host's hard limits (cpu comes from the task)",
            },
        },
    }

    def run_options(self) -> list[str]:
        return [arg for limit in self.options["default_ulimits"] for arg in ("--ulimit", limit)]

    def oom_test(self, task: Task) -> str:
        return f"{{ {super().oom_test(task)} || [ -e {quote(self._conmon_oom(task))} ]; }}"

    def job_command(self, task: Task, argv: list[str]) -> Command:
        command = super().job_command(task, argv)
        return replace(command, after=[*command.after, f"rm -f {quote(self._conmon_oom(task))}"])

    def _conmon_oom(self, task: Task) -> str:
        return f"{task.workdir}/oom"


class SingularityRuntime(ContainerRuntime):
    """Singularity, or Apptainer (the same command line)."""

    name = "singularity"
    supports_ports = False
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **COMMON_OPTIONS,
            "image_rules": {
                "type": "array",
                "description": "first match wins: requested images matching `match` run from `image`",
                "items": {"type": "object", "additionalProperties": False, "required": ["match", "image"],
                          "properties": {"match": {"type": "string"}, "image": {"type": "string", "minLength": 1}}},
                "default": [],
            },
        },
    }

    def image_for(self, image: str) -> str:
        """The image argument for `exec`: the admin's rule, a path or URI as is, else docker://."""
        for rule in self.options["image_rules"]:
            if fnmatch.fnmatchcase(image, rule["match"]):
                return str(rule["image"])
        if image.startswith("/") or "://" in image:
            return image
        return f"docker://{image}"

    def job_command(self, task: Task, argv: list[str]) -> Command:
        container = task.container
        assert container is not None
        run = [self.command, "exec" if argv else "run", "--cleanenv"]
        for mount in container.volumes:
            run += ["--bind", f"{mount.host}:{mount.container}" + (":ro" if mount.read_only else "")]
        return Command(argv=with_gpus(task, [*run, GPUS_MARK, *self.extra_args, self.image_for(container.image),
                                             *argv], "nv"))


class ApptainerRuntime(SingularityRuntime):
    name = "apptainer"
