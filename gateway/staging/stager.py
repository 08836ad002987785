"""The staging phases of TES tasks: inputs in before the job is submitted, outputs out before the
final state. What a task stages is planned when it is accepted (`gateway.tes.request`) and kept
with it in `Task.extra["tes"]["staging"]`: `{"inputs": [...], "outputs": [...]}`, each item
`{"where", "url", "path", "directory"}` (outputs also `"path_prefix"` for a wildcard `path`).

- Inputs: a task with staged inputs is recorded, then INITIALIZING; the poller holds it back
  (`Poller.held`) until its inputs are in the task's folder, then it is handed to the scheduler
  (`Poller.hand_over`). A task still without a job that a poller takes on (after a restart, or
  adopted by the lease holder from a replica that died, see `gateway.replicas`) gets its inputs
  fetched again before it is submitted (`Poller.restage`): only the one replica that claimed it does.
- Outputs: when the job of a task with staged outputs ends (COMPLETE or EXECUTOR_ERROR), the
  poller lets the stager take that final change (`Poller.defer_final`): the task stays RUNNING
  ("sending outputs"), the outputs are sent, then the final change is applied. After a restart
  (or on the replica that takes the lease over), the scheduler's answer about the ended job starts
  the sending again.
- A transfer that fails is SYSTEM_ERROR, with the URL and the reason in `system_logs` (written to
  the task's `tes/staging.log`, the gateway's own file beside the steps script's `tes/system.log`).
  After an EXECUTOR_ERROR, outputs are sent as far as they exist (as the steps script does for
  file://), and the state stays.
  An output missing after a successful job fails the task (EXECUTOR_ERROR), as for file://.
- A task canceled while it is staged stops its transfers (an unfinished multipart upload is
  aborted).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from aiohttp import web

from schedulers.base import Task, TaskState

from .. import service
from ..keys import ACTIVE, CONFIG, POLLERS
from ..model import now, rfc3339
from ..poller import Poller
from ..store import Change, Record
from . import local
from .http import Http
from .runner import Budget, Runner, StagingError
from .s3 import S3

log = logging.getLogger(__name__)
#: The file in the task's `tes/` folder that lists the outputs sent (for the TaskLog's `outputs`).
SENT = "outputs.json"
STAGE_OUT_AFTER = (TaskState.COMPLETE, TaskState.EXECUTOR_ERROR)


class Scheme(Protocol):
    async def fetch(self, url: str, target: Path, budget: Budget) -> int: ...
    async def send(self, source: Path, size: int, url: str) -> None: ...
    async def close(self) -> None: ...


def plan_of(task: Task) -> Mapping[str, list[dict[str, Any]]]:
    """What `task` stages (empty for a task without staging)."""
    plan: Mapping[str, list[dict[str, Any]]] = task.extra.get("tes", {}).get("staging", {})
    return plan


def root_of(task: Task) -> Path:
    return Path(task.workdir) / "tes" / "root"


#: The gateway's notes about a task's staging (read back into its `system_logs`).
NOTES = "staging.log"


def note(task: Task, line: str) -> None:
    """A line for the task's `system_logs`, appended to a file of the gateway's in the task's
    folder (never through a link the job left there)."""
    try:
        fd = os.open(Path(task.workdir) / "tes" / NOTES,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as out:
            out.write(f"{rfc3339(now())} {line}\n")
    except OSError as exc:
        log.warning("task %s: cannot write its system log: %s", task.id, exc)


def _write_own(path: Path, text: str) -> None:
    """Write a file of the gateway's into a folder the job may write to: a fresh file renamed into
    place, so that a link the job left there is replaced, never followed."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class Stager:
    """The gateway's staging of TES tasks; one per application, wired to each instance's poller
    (`attach`)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        settings = app[CONFIG].sections.staging
        self.settings = settings
        self.runner = Runner(settings)
        http = Http(settings)
        self._http, self._s3 = http, S3(settings)
        self.schemes: dict[str, Scheme] = {"http": http, "https": http, "s3": self._s3}
        self._jobs: dict[str, asyncio.Task[None]] = {}  # staging running now, by task id
        self._holding: set[str] = set()  # tasks whose inputs are being staged: not for the scheduler yet

    def attach(self, poller: Poller) -> None:
        """Hook into a scheduler instance's poller, before its scheduler starts."""
        poller.held = self.holds
        poller.defer_final = self.defer_final
        poller.restage = self.restage
        poller.listeners.append(self._seen)

    def _poller(self, record: Record) -> Poller:
        pollers: dict[str, Poller] = self.app[POLLERS]
        return pollers[record.scheduler]

    # ---- the poller's hooks ----

    def holds(self, record: Record) -> bool:
        return record.id in self._holding

    def defer_final(self, record: Record, change: Change) -> bool:
        """Take over the final change of a task whose outputs are to be sent first."""
        if change.state not in STAGE_OUT_AFTER or not plan_of(record.task).get("outputs"):
            return False
        if record.id not in self._jobs:
            self._start(record.id, self._stage_out(record, change))
        return True

    def restage(self, record: Record) -> bool:
        """A task without a job that the poller takes on (its own after a restart, or one adopted
        from another replica): one with inputs to stage is submitted only after they are fetched
        again (what an interrupted fetch left is never trusted)."""
        if record.native_id is not None or record.state.terminal or not self.needs_inputs(record.task):
            return False
        if record.id not in self._holding:
            again = " again" if record.state == TaskState.INITIALIZING else ""  # else handed over before staging
            log.info("task %s: fetching its inputs%s", record.id, again,
                     extra={"task_id": record.id, "user": record.task.user})
            if not again:
                self._poller(record).apply([Change(record.id, TaskState.INITIALIZING, "fetching inputs")])
            self._begin(record)
        return True

    def _seen(self, record: Record) -> None:
        """A task that ended otherwise (canceled) stops its staging."""
        job = self._jobs.get(record.id)
        if job is not None and record.state.terminal and job is not asyncio.current_task():  # not its own end
            job.cancel()

    # ---- start-up and shutdown ----

    async def close(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)
        await self._http.close()
        await self._s3.close()

    # ---- inputs ----

    def needs_inputs(self, task: Task) -> bool:
        return bool(plan_of(task).get("inputs"))

    def begin(self, record: Record) -> None:
        """A newly recorded task with staged inputs: active, INITIALIZING, its inputs on their way."""
        self.app[ACTIVE].put(record)
        self._poller(record).apply([Change(record.id, TaskState.INITIALIZING, "fetching inputs")])
        self._begin(record)

    def _begin(self, record: Record) -> None:
        self._holding.add(record.id)
        self._start(record.id, self._stage_in(record))

    def _start(self, task_id: str, work: Any) -> None:
        job = asyncio.create_task(work, name=f"staging-{task_id}")
        self._jobs[task_id] = job
        job.add_done_callback(lambda _: self._jobs.pop(task_id, None))

    async def _stage_in(self, record: Record) -> None:
        task, poller = record.task, self._poller(record)
        budget = Budget(self.settings.max_bytes)
        failed: StagingError | None = None
        try:
            for item in plan_of(task)["inputs"]:
                await self._fetch(task, item, budget)
        except StagingError as exc:
            failed = exc
        finally:
            self._holding.discard(task.id)  # also when the task was canceled meanwhile
            await asyncio.to_thread(self._give_to_job, poller, task)  # a chown per file: off the event loop
        if failed is not None:
            poller.apply([Change(task.id, TaskState.SYSTEM_ERROR, f"staging inputs failed: {failed.reason}",
                                 finished=now())], deferrable=False)
            return
        current = self.app[ACTIVE].get(task.id)
        if current is None or current.state.terminal:
            return
        log.info("task %s: %d byte(s) of inputs staged", task.id, budget.used,
                 extra={"task_id": task.id, "user": task.user})
        await poller.hand_over(current)

    async def _fetch(self, task: Task, item: Mapping[str, Any], budget: Budget) -> None:
        where, url, root = item["where"], item["url"], root_of(task)
        scheme = self.schemes[url.split(":", 1)[0].lower()]
        try:
            if item["directory"]:
                listing = await self.runner.run(f"{task.id} {where}", budget,
                                                lambda _: self._s3.listing(url))
                if not listing:
                    raise StagingError("no objects under this prefix")
                for relative, object_url in listing:
                    if relative.startswith("/") or ".." in relative.split("/"):
                        raise StagingError(f"the object name {relative!r} cannot be a path below {item['path']}")
                    target = local.private(root, item["path"]) / relative
                    await self.runner.run(f"{task.id} {where}", budget,
                                          lambda b, u=object_url, t=target: scheme.fetch(u, t, b))  # type: ignore[misc]
            else:
                target = local.private(root, item["path"])
                await self.runner.run(f"{task.id} {where}", budget, lambda b: scheme.fetch(url, target, b))
        except StagingError as exc:
            line = f"{where}: fetching {url} failed: {exc.reason}"
            note(task, line)
            raise StagingError(line) from None

    def _give_to_job(self, poller: Poller, task: Task) -> None:
        account = poller.scheduler.job_account(task)
        if account is not None and root_of(task).exists():
            try:
                service.give_to(account, root_of(task))
            except OSError as exc:
                log.error("task %s: cannot give its inputs to %s: %s", task.id, account, exc)

    # ---- outputs ----

    async def _stage_out(self, record: Record, ended: Change) -> None:
        task, poller = record.task, self._poller(record)
        poller.apply([Change(task.id, TaskState.RUNNING, f"{ended.description}; sending outputs".lstrip("; "),
                             ended.exit_code, started=ended.started)], deferrable=False)
        required = ended.state == TaskState.COMPLETE
        budget, sent, failed, missing = Budget(self.settings.max_bytes), [], [], []
        for item in plan_of(task)["outputs"]:
            try:
                sent += await self._send(task, item, budget, required)
            except FileNotFoundError:
                missing.append(item["where"])
            except StagingError as exc:
                failed.append(exc.reason)
        try:
            _write_own(Path(task.workdir) / "tes" / SENT, json.dumps(sent))
        except OSError as exc:
            log.error("task %s: cannot record the outputs sent: %s", task.id, exc)
        # the task ends now, once its outputs are out (its executors' own times are in their logs)
        final = Change(task.id, ended.state, ended.description, ended.exit_code, ended.started, now())
        if required and failed:
            final = Change(task.id, TaskState.SYSTEM_ERROR, f"staging outputs failed: {failed[0]}",
                           ended.exit_code, ended.started, now())
        elif required and missing:
            final = Change(task.id, TaskState.EXECUTOR_ERROR, f"output missing: {', '.join(missing)}",
                           ended.exit_code, ended.started, now())
        current = self.app[ACTIVE].get(task.id)
        if current is not None and not current.state.terminal:
            poller.apply([final], deferrable=False)

    async def _send(self, task: Task, item: Mapping[str, Any], budget: Budget, required: bool) -> list[dict[str, str]]:
        """Send one output (a file, a folder's files or a wildcard's matches); answers the TES
        OutputFileLog entries. FileNotFoundError: a required output is not there."""
        where, url, path, root = item["where"], item["url"], item["path"], root_of(task)
        scheme = self.schemes[url.split(":", 1)[0].lower()]
        try:
            if local.is_pattern(path):
                prefix = item.get("path_prefix", "")
                files = [(f"{url.rstrip('/')}/{quote(found[len(prefix):].lstrip('/'))}", found, source, size)
                         for found, source, size in local.matches(root, path)]
            elif item["directory"]:
                folder = local.private(root, path)
                if not folder.exists() and not folder.is_symlink():
                    return _absent(task, where, path, required)
                files = [(f"{url.rstrip('/')}/{quote(relative)}", f"{path.rstrip('/')}/{relative}", source, size)
                         for relative, source, size in local.files_below(root, folder)]
            else:
                source = local.private(root, path)
                size = local.regular_file(root, source)
                if size is None:
                    return _absent(task, where, path, required)
                files = [(url, path, source, size)]
            for target, _, source, size in files:
                budget.check(size)
                await self.runner.run(f"{task.id} {where}", budget,
                                      lambda _, s=source, n=size, t=target: scheme.send(s, n, t))  # type: ignore[misc]
                budget.take(size)
        except StagingError as exc:
            line = f"{where}: sending {path} to {url} failed: {exc.reason}"
            note(task, line)
            raise StagingError(line) from None
        return [{"url": target, "path": private, "size_bytes": str(size)} for target, private, _, size in files]


def _absent(task: Task, where: str, path: str, required: bool) -> list[dict[str, str]]:
    if not required:
        return []
    note(task, f"{where}: {path} does not exist")
    raise FileNotFoundError(path)
