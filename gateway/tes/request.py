"""GA4GH TES 1.1 tasks as JobProxy tasks, and back.

A TES task is an ordinary Task: the same store, the same scheduler, the same state vocabulary, so
it is visible through both APIs. What is TES-only lives in `Task.extra["tes"]` (persisted with the
task): the request as received, notes for `system_logs`, and the backend parameters passed on to
the scheduler plugin. The task's command runs the steps
script of `gateway.tes.steps`, written into its folder when it is accepted.

Decisions:
- Owner: with auth on, the caller (an admin may name another user in `tags["user"]`); with auth
  off, `tags["user"]` if given, else "anonymous". The owner is the task's `user` (in the store and
  in `logs[].metadata.user`), never added to the tags: `tags` are the client's own, as sent, and
  the `tag_key`/`tag_value` filters match only those.
- Resources: `cpu_cores` -> cores; `ram_gb` is decimal gigabytes (10^9 bytes, as the TES spec
  says), rounded up to whole MiB of memory; `disk_gb`, `preemptible` and `zones` are recorded.
  `backend_parameters`: `cputime` (CPU seconds) sets the task's CPU-time limit and `gpus` its
  GPUs; `scheduler` asks for a scheduler instance by name (always read: the routing rules say
  whether it may); the scheduler options (`slurm.partition`, `sge.queue`, ... as the v1 `options`)
  the admin allows (`[tes] backend_parameters`) are checked against the task schema's patterns and
  recorded in `Task.backend_parameters` for the scheduler plugin; other keys answer 400 under
  `backend_parameters_strict`, else they are ignored with a note in `system_logs`.
- Images: `[tes] images` rules, first match wins: `run = "host"` runs the executor on the host in
  a bubblewrap sandbox, `image = "..."` runs it in that local image through the scheduler's
  container runtime. An image no rule matches answers 400 naming it.
- Files: `file://` URLs (on the gateway's machine, which shares its file system with the nodes);
  http(s):// and s3:// URLs (`[staging] schemes`), which the gateway stages itself before and
  after the job (`gateway.staging`: planned here into `Task.extra["tes"]["staging"]`, with
  DIRECTORY inputs from S3 and wildcard outputs with `path_prefix`); and URL schemes the admin
  enables with a command each to get and/or put a file
  (`[tes] url_schemes`, e.g. `https = {get = ["curl", "-fsSLo", "{path}", "{url}"]}`, run on the
  node by the steps script); other schemes answer 400. file:// sources must exist when the task
  is submitted (checked here, so a mistake answers 400 at once); they are copied in by the steps
  script on the node, not by the gateway, so that a large input never blocks the gateway and
  staging works the same on every scheduler. With `[paths] roots` set, URLs must lie under the
  owner's roots.
- Failures of the job's own staging (a missing file:// input or output) make the job exit
  non-zero, so the task ends EXECUTOR_ERROR in both APIs with the reason in `system_logs`;
  SYSTEM_ERROR is kept for the gateway or scheduler failing, and for the gateway's own staging
  failing (a URL that cannot be fetched or sent).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

import schemas
from schedulers.base import Container, Mount, SchedulerError, Task, path_within
from schedulers.script import command_argv

from .. import service
from ..auth import Identity
from ..config import ImageRule, StagingSettings, TesSettings
from ..keys import CONFIG, SCHEDULERS
from ..policy import confinement_roots, user_roots
from ..responses import ApiError
from ..staging import local as staging_local
from ..staging import s3 as staging_s3
from ..validation import SchemaValidator
from . import steps as tes_steps

TES_VERSION = "1.1.0"
DEFAULT_USER = "anonymous"
OUTPUT_ONLY = ("id", "state", "logs", "creation_time")
RESERVED = ("/proc", "/dev", "/sys")
#: `backend_parameters.cputime`: whole CPU seconds, at least 1 (ASCII digits, at most 10 significant).
CPUTIME_PATTERN = "0*[1-9][0-9]{0,9}"
#: `backend_parameters.gpus`: whole GPUs, 0 to 1024 (the task schema's `gpus`).
GPUS_PATTERN = "0*(?:[0-9]{1,3}|10[01][0-9]|102[0-4])"
_OPTIONS = schemas.load("task")["$defs"]["options"]["properties"]


@functools.cache
def _option_validator(key: str) -> SchemaValidator:
    return SchemaValidator({"$defs": schemas.load("task")["$defs"], **_OPTIONS[key]})


def option_problem(key: str, value: str) -> str | None:
    """Why `value` cannot be the scheduler option `key` (the task schema's `$defs/options`), or
    None; a key the schema does not define (a third-party plugin's) is recorded as it is."""
    if key not in _OPTIONS:
        return None
    problems = _option_validator(key).problems(value)
    return problems[0].message if problems else None


def refuse(path: str, message: str, status: int = 400) -> ApiError:
    """A 400 whose one detail carries the JSON path of the mistake."""
    return ApiError(status, f"{path}: {message}", [{"path": path, "message": message}])


def ram_mib(ram_gb: float) -> int:
    """Decimal gigabytes as whole MiB, rounded up.

    >>> ram_mib(1), ram_mib(0.5), ram_mib(0.000001)
    (954, 477, 1)
    """
    return max(1, math.ceil(ram_gb * 1e9 / 1048576))


def owner(caller: Identity, tags: Mapping[str, str]) -> str:
    """Who a new TES task belongs to (see the module docstring)."""
    requested = tags.get("user")
    if requested is not None and not requested.strip():
        raise refuse("$.tags.user", "must name a user, not be empty")
    if requested is None and caller.user is None:
        return DEFAULT_USER
    return caller.submitter(requested)


class _Builder:
    """Turns one validated TES request into a Task and the files of its folder."""

    def __init__(self, app: web.Application, request: dict[str, Any], user: str) -> None:
        self.app, self.request, self.user = app, request, user
        self.tes_config: TesSettings = app[CONFIG].sections.tes
        self.staging_config: StagingSettings = app[CONFIG].sections.staging
        self.notes: list[str] = []
        self.private: list[str] = ["/tmp"]  # private paths to mount (covered later)
        self.folders: list[str] = ["/tmp"]  # private folders to create
        self.files: dict[str, str] = {}
        self.requested: str | None = None  # backend_parameters.scheduler
        self.scheduler_name = ""  # the instance routing chose
        self.staging: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}  # by the gateway

    def build(self) -> tuple[Task, dict[str, str], str]:
        resources = self.request.get("resources", {})
        cputime, gpus, passed = self._backend_parameters(resources)
        base = service.new_task(self.app, {
            "user": self.user, "cores": resources.get("cpu_cores"), "gpus": gpus,
            "memory": ram_mib(resources["ram_gb"]) if "ram_gb" in resources else None, "cputime": cputime})
        images = [executor["image"] for executor in self.request["executors"]]
        self.scheduler_name = service.route(self.app, base, self.requested, images)  # its runtime runs them
        tes_dir = f"{base.workdir}/tes"
        root = f"{tes_dir}/root"
        inputs = self._inputs(root)
        outputs = self._outputs(root)
        for index, volume in enumerate(self.request.get("volumes", [])):
            self._check_path(f"$.volumes[{index}]", volume)
            self.private.append(volume)
            self.folders.append(volume)
        targets = tes_steps.cover(self.private)
        task = dataclasses.replace(base, cmd=("/bin/bash", f"{tes_dir}/steps.sh"), backend_parameters=passed,
                                   name=self.request.get("name"), tags=dict(self.request.get("tags", {})),
                                   extra={"tes": {"request": self.request, "notes": self.notes,
                                                  **({"staging": self.staging} if any(self.staging.values()) else {})}})
        steps = [self._step(task, index, executor, root, targets)
                 for index, executor in enumerate(self.request["executors"])]
        self.files["tes/steps.sh"] = tes_steps.render(task.id, tes_dir, root, sorted(set(self.folders)),
                                                      inputs, steps, outputs, targets,
                                                      self.tes_config.host_writable, self.tes_config.host_readable)
        return task, self.files, self.scheduler_name

    # ---- resources ----

    def _backend_parameters(self, resources: Mapping[str, Any]) -> tuple[int | None, int, dict[str, str]]:
        """The CPU-time limit, the GPUs, and the scheduler options of `backend_parameters`: keys
        the site allows (`[tes] backend_parameters`), each value checked like the v1 `options`."""
        allowed = list(self.tes_config.backend_parameters)
        strict = resources.get("backend_parameters_strict", False)
        cputime, gpus, passed = None, 0, {}
        for key, value in resources.get("backend_parameters", {}).items():
            where = f"$.resources.backend_parameters.{key}"
            if key == "scheduler":
                self.requested = value
            elif key not in allowed:
                if strict:
                    raise refuse(where, f"not supported here (supported: {', '.join(allowed) or 'none'})")
                self.notes.append(f"backend parameter {key!r} ignored: not supported here")
            elif key == "cputime":
                if not re.fullmatch(CPUTIME_PATTERN, value):
                    raise refuse(where, "must be a whole number of CPU seconds >= 1")
                cputime = int(value)
            elif key == "gpus":
                if not re.fullmatch(GPUS_PATTERN, value):
                    raise refuse(where, "must be a whole number of GPUs, 0 to 1024")
                gpus = int(value)
            else:
                problem = option_problem(key, value)
                if problem:
                    raise refuse(where, problem)
                passed[key] = value
        return cputime, gpus, passed

    # ---- files ----

    def _check_path(self, where: str, path: str) -> None:
        parts = path.split("/")
        if path == "/" or ".." in parts or any(path == r or path.startswith(r + "/") for r in RESERVED):
            raise refuse(where, f"{path!r} cannot be a task's own path (not /, no '..', not under /proc, /dev or /sys)")

    def _scheme_command(self, where: str, url: str, direction: str, private: str) -> list[str]:
        """The admin's command (`[tes] url_schemes`) that gets or puts `url` from or to `private`."""
        schemes = self.tes_config.url_schemes
        template = schemes.get(urlsplit(url).scheme, {}).get(direction)
        if template is None:
            enabled = ["file", *sorted({*self.staged_schemes,
                                        *(name for name, commands in schemes.items() if direction in commands)})]
            if len(enabled) == 1:
                raise refuse(where, f"only file:// URLs are supported by this gateway, not {url!r}")
            raise refuse(where, f"{url!r}: this gateway supports these URL schemes here: {', '.join(enabled)}")
        return [str(part).replace("{url}", url).replace("{path}", private) for part in template]

    def _file_url(self, where: str, url: str, output: bool = False) -> str:
        """The local path of a file:// URL, within the site's roots: `[paths] roots`; for an output,
        without those, the task root when auth and run-as are off (`policy.confinement_roots`)."""
        path = local_path(url)
        if path is None:
            raise refuse(where, f"{url!r} is not a file:// URL of this machine (file:///absolute/path)")
        roots = confinement_roots(self.app[CONFIG]) if output else self.app[CONFIG].path_roots
        if roots is not None:
            allowed = user_roots(roots, self.user)
            if not path_within(path, allowed):
                raise refuse(where, f"{path!r} is outside the folders this site allows for {self.user} "
                                    f"({', '.join(allowed) or 'none'})")
        return path

    def _inputs(self, root: str) -> list[tes_steps.Transfer]:
        copies = []
        for index, item in enumerate(self.request.get("inputs", [])):
            where, path = f"$.inputs[{index}]", item["path"]
            self._check_path(f"{where}.path", path)
            self.private.append(path)
            self.folders.append(os.path.dirname(path))
            if "content" in item:
                self.files[f"tes/root{path}"] = item["content"]
                continue
            if "url" not in item:
                raise refuse(where, "needs a url or content")
            if self._staged(item["url"]):
                self._stage_input(where, index, item)
                continue
            if urlsplit(item["url"]).scheme != "file":
                command = self._scheme_command(f"{where}.url", item["url"], "get", root + path)
                copies.append(tes_steps.Transfer(f"inputs[{index}] ({path})", item["url"], path, command))
                continue
            source = self._file_url(f"{where}.url", item["url"])
            if not os.path.exists(source):
                raise refuse(f"{where}.url", f"{source!r} does not exist")
            actual = "DIRECTORY" if os.path.isdir(source) else "FILE"
            if item.get("type", actual) != actual:
                kind = "a folder" if actual == "DIRECTORY" else "a file"
                raise refuse(f"{where}.type", f"is {item['type']}, but {source!r} is {kind}")
            copies.append(tes_steps.Transfer(f"inputs[{index}] ({path})", source, path))
        return copies

    def _outputs(self, root: str) -> list[tes_steps.Transfer]:
        copies = []
        for index, item in enumerate(self.request.get("outputs", [])):
            where, path = f"$.outputs[{index}]", item["path"]
            self._check_path(f"{where}.path", path)
            if self._staged(item["url"]):
                self._stage_output(where, index, item)
                continue
            if staging_local.is_pattern(path):
                if urlsplit(item["url"]).scheme != "file":
                    raise refuse(f"{where}.path", "wildcard outputs work for file:// and the URL schemes the "
                                                  f"gateway stages ({', '.join(self.staged_schemes) or 'none here'})")
                folder = self._wildcard_folder(where, path, item.get("path_prefix"))
                self.private.append(folder)
                self.folders.append(folder)
                copies.append(tes_steps.Transfer(f"outputs[{index}] ({path})",
                                                 self._file_url(f"{where}.url", item["url"], output=True), path,
                                                 prefix=item["path_prefix"]))
                continue
            if urlsplit(item["url"]).scheme != "file":
                command: list[str] | None = self._scheme_command(f"{where}.url", item["url"], "put", root + path)
                destination = item["url"]
            else:
                command, destination = None, self._file_url(f"{where}.url", item["url"], output=True)
            if item.get("type") == "DIRECTORY":
                self.private.append(path)
                self.folders.append(path)
            else:
                if os.path.dirname(path) == "/":
                    raise refuse(f"{where}.path", "an output file must be in a folder below /")
                self.private.append(os.path.dirname(path))
                self.folders.append(os.path.dirname(path))
            copies.append(tes_steps.Transfer(f"outputs[{index}] ({path})", destination, path, command))
        return copies

    # ---- staged by the gateway (gateway/staging) ----

    @property
    def staged_schemes(self) -> list[str]:
        """The schemes the gateway stages itself: `[staging] schemes` that `[tes] url_schemes`
        (commands run on the node) does not take over."""
        return [name for name in self.staging_config.schemes if name not in self.tes_config.url_schemes]

    def _staged(self, url: str) -> bool:
        return urlsplit(url).scheme.lower() in self.staged_schemes

    def _check_url(self, where: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() == "s3":
            try:
                staging_s3.split(url)
            except ValueError as exc:
                raise refuse(where, f"{url!r}: {exc}") from None
        elif not parts.hostname:
            raise refuse(where, f"{url!r} names no server")

    def _stage_input(self, where: str, index: int, item: Mapping[str, Any]) -> None:
        url, path = item["url"], item["path"]
        self._check_url(f"{where}.url", url)
        directory = item.get("type") == "DIRECTORY"
        if directory and not url.lower().startswith("s3:"):
            raise refuse(f"{where}.type", f"a DIRECTORY input needs an s3:// or file:// URL (HTTP has no listing), "
                                          f"not {url!r}")
        if not directory and url.lower().startswith("s3:") and not staging_s3.split(url)[1]:
            raise refuse(f"{where}.url", f"{url!r} names a bucket, not an object (type DIRECTORY for all of it)")
        self.folders.append(path if directory else os.path.dirname(path))
        self.staging["inputs"].append({"where": f"inputs[{index}]", "url": url, "path": path, "directory": directory})

    def _stage_output(self, where: str, index: int, item: Mapping[str, Any]) -> None:
        url, path = item["url"], item["path"]
        self._check_url(f"{where}.url", url)
        if url.lower().startswith("http") and not self.staging_config.http.allow_put:
            raise refuse(f"{where}.url", f"{url!r}: this site does not send outputs over HTTP "
                                         "([staging.http] allow_put)")
        entry: dict[str, Any] = {"where": f"outputs[{index}]", "url": url, "path": path,
                                 "directory": item.get("type") == "DIRECTORY"}
        if staging_local.is_pattern(path):
            folder = self._wildcard_folder(where, path, item.get("path_prefix"))
            entry["path_prefix"] = item["path_prefix"]
        else:
            folder = path if entry["directory"] else os.path.dirname(path)
        if folder == "/":
            raise refuse(f"{where}.path", "an output must be in a folder below /")
        self.private.append(folder)
        self.folders.append(folder)
        self.staging["outputs"].append(entry)

    def _wildcard_folder(self, where: str, path: str, prefix: str | None) -> str:
        """The private folder a wildcard output's matches lie in, once its `path_prefix` is checked."""
        folder = staging_local.static_part(path)
        if prefix is None:
            raise refuse(f"{where}.path_prefix", "is required for a path with wildcards (* ? [)")
        if not path.startswith(prefix) or staging_local.is_pattern(prefix):
            raise refuse(f"{where}.path_prefix", f"{prefix!r} must be a beginning of the path before its "
                                                 f"wildcards ({folder!r})")
        if folder == "/":
            raise refuse(f"{where}.path", "an output must be in a folder below /")
        return folder

    # ---- executors ----

    def _step(self, task: Task, index: int, executor: dict[str, Any], root: str, targets: list[str]) -> tes_steps.Step:
        where = f"$.executors[{index}]"
        for name in ("workdir", "stdin", "stdout", "stderr"):
            if name in executor:
                self._check_path(f"{where}.{name}", executor[name])
        for name in ("stdout", "stderr"):
            if name in executor:
                if not any(executor[name].startswith(t + "/") for t in targets):
                    raise refuse(f"{where}.{name}", f"{executor[name]!r} must lie in /tmp, a volume, or an input's "
                                                    "or output's folder: the task's own, writable paths")
                self.folders.append(os.path.dirname(executor[name]))
        rule = self._rule(f"{where}.image", executor["image"])
        on_host = rule.run == "host"
        argv = tes_steps.wrapper_argv(executor["command"], executor.get("workdir", "/tmp" if on_host else None),
                                      executor.get("stdin"), executor.get("stdout"), executor.get("stderr"),
                                      executor.get("env", {}))
        common = {"ignore_error": executor.get("ignore_error", False),
                  "stdout": "stdout" not in executor, "stderr": "stderr" not in executor}
        if on_host:
            return tes_steps.Step(f"image {executor['image']!r} on the host", argv, True, **common)
        runtime = self.app[SCHEDULERS][self.scheduler_name].runtime
        if runtime is None:  # the config check makes sure some instance has one
            raise refuse(f"{where}.image", f"the scheduler instance this task goes to ({self.scheduler_name}) has no "
                                           "container runtime")
        image = str(rule.image)
        inner = dataclasses.replace(task, id=f"{task.id}-{index}", cmd=None, extra={},
                                    container=Container(image))
        try:
            runtime.admit(inner)
        except SchedulerError as exc:
            raise refuse(f"{where}.image",
                         f"the image {image!r} (for {executor['image']!r}) is refused: {exc}") from None
        inner = dataclasses.replace(inner,
                                    container=Container(image, volumes=tuple(Mount(root + t, t) for t in targets)))
        command = runtime.job_command(inner, argv)
        return tes_steps.Step(f"image {executor['image']!r} as {image!r}", command.argv, False,
                              on_stop=command.on_stop, after=command.after, **common)

    def _rule(self, where: str, image: str) -> ImageRule:
        rules = self.tes_config.images
        for rule in rules:
            if fnmatch.fnmatchcase(image, rule.match):
                return rule
        patterns = ", ".join(r.match for r in rules) or "none: this site runs no TES images"
        raise refuse(where, f"the image {image!r} is not allowed here (allowed: {patterns})")


def to_task(app: web.Application, request: dict[str, Any], caller: Identity) -> tuple[Task, dict[str, str], str]:
    """The Task for a validated TES request, the files (relative to its folder) it needs, and
    the scheduler instance it goes to."""
    stored = {k: v for k, v in request.items() if k not in OUTPUT_ONLY}
    return _Builder(app, stored, owner(caller, stored.get("tags", {}))).build()


def request_of(task: Task) -> dict[str, Any]:
    """The TES request of `task`; for a task submitted through the v1 API, one that describes it."""
    if "tes" in task.extra:
        return dict(task.extra["tes"]["request"])
    executor: dict[str, Any] = {"image": task.container.image if task.container else "",
                                "command": command_argv(task)}
    resources: dict[str, Any] = {}
    if task.cores:
        resources["cpu_cores"] = task.cores
    if task.memory:
        resources["ram_gb"] = round(task.memory * 1048576 / 1e9, 3)
    body: dict[str, Any] = {"executors": [executor], "resources": resources}
    if task.tags:
        body["tags"] = dict(task.tags)
    return body


def local_path(url: str) -> str | None:
    """The path of a file:// URL of this machine, else None."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        return None
    return os.path.normpath(unquote(parts.path))


def task_folder(task: Task) -> Path:
    return Path(task.workdir) / "tes"
