"""The Slurm scheduler over slurmrestd (`api = "rest"`): the same plugin, job script, limits and
state mapping as over Slurm's commands, with every command replaced by a request to Slurm's REST
API (openapi/v0.0.38), so the gateway needs no Slurm client, munge key or slurm.conf on its host.

- submit: `POST /job/submit` with the rendered job script and its `#SBATCH` lines as the job's
  properties (rest_parse.submission), as the job's Slurm user (`job_account`, else the `rest.user`)
  with that user's token; at most `submit_concurrency` requests at once.
- status: one `GET /jobs?update_time=T` per poll (given `rest.listing_timeout`, as `find`).
  Slurm answers 304 when no job changed since T, else its whole job table, from which the
  gateway's jobs are kept (by id *and* name, as over squeue); a full listing at least every
  `FULL_EVERY` seconds bounds what a clock skew could hide.
  A job Slurm no longer lists is resolved as over the CLI: exit-code file, `GET /job/{id}`.
- cancel: `DELETE /job/{id}`, after `GET /job/{id}` has shown it still carries the task's name.
- find: the job table, by name; else the job-id file the script wrote.
- tokens: schedulers/slurm/token.py (`X-SLURM-USER-NAME` / `X-SLURM-USER-TOKEN`).

Slurm's `errors[]` reach the user as the CLI's stderr does: a refusal is `TaskRefused` (400) with
Slurm's message; slurmrestd unreachable, or slurmctld behind it, is `SchedulerUnavailable` (503);
no answer within `command_timeout` is a `CommandTimeout` (503, and the job it may have left is
cancelled by name).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from ..base import (
    JobRef,
    JobStatus,
    Report,
    Scheduler,
    SchedulerConfigError,
    SchedulerError,
    SchedulerUnavailable,
    TaskRefused,
)
from ..commands import CommandTimeout
from ..task import Task
from .parse import SlurmJob, no_such_job, refused_path, unavailable
from .plugin import SlurmScheduler
from .rest_parse import NOT_MODIFIED, check_options, error_text, parse_jobs, submission
from .token import Tokens, own_user

log = logging.getLogger(__name__)

API = "/slurm/v0.0.38"
#: Seconds after which a status query asks for the whole job table again, whatever update_time says.
FULL_EVERY = 60.0
#: Seconds subtracted from the time of the last listing in update_time: slurmctld compares whole
#: seconds, and a job that changes within the second of a listing must not be missed.
SLACK = 2


class SlurmRestScheduler(SlurmScheduler):
    """Runs each task as a Slurm batch job, through slurmrestd."""

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path, **contract: Any) -> None:
        super().__init__(name, options, state_dir, **contract)
        rest = dict(self.options["rest"])
        if "url" not in rest:
            raise SchedulerConfigError('scheduler.options.rest.url: required with api = "rest" (slurmrestd\'s '
                                       'address, e.g. "http://slurm-head:6820")')
        self.url = str(rest["url"]).rstrip("/")
        try:
            check_options(self.extra)
        except ValueError as exc:
            raise SchedulerConfigError(f'scheduler.options.extra_directives: {exc}, so it cannot be used with '
                                       'api = "rest"') from None
        self.user = str(rest.get("user") or own_user())
        # sbatch hands every job the submitter's umask (SLURM_UMASK, applied by slurmstepd): so does this
        umask = os.umask(0o077)
        os.umask(umask)
        self.environment: dict[str, str] = {**rest["environment"], "SLURM_UMASK": f"{umask:04o}"}
        self.listing_timeout = float(rest["listing_timeout"])
        self.tokens = Tokens(command=rest["token_command"], file=rest.get("token_file"),
                             key_file=rest.get("jwt_key_file"), lifespan=int(rest["token_lifespan"]),
                             timeout=self.timeout)
        others = self.run_as_user or (self.account is not None and self.account != self.user)
        if others and self.tokens.file is not None and "{user}" not in self.tokens.file:
            raise SchedulerConfigError("scheduler.options.rest.token_file: jobs run as other Slurm users than "
                                       f"{self.user!r}, whose tokens one file cannot hold: put {{user}} in its path")
        self.session: aiohttp.ClientSession | None = None
        self._table: dict[str, SlurmJob] = {}
        self._unlisted_ids: set[str] = set()
        self._listed_at = 0.0
        self._full_at = 0.0

    async def start(self, report: Report) -> None:
        await Scheduler.start(self, report)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.session = aiohttp.ClientSession()
        try:  # as over the commands, a Slurm that cannot answer now does not stop the gateway
            answer = await self._request("GET", "/ping", what="ping")
        except SchedulerError as exc:
            log.warning("slurm scheduler %s: Slurm's REST API at %s does not answer now (%s); submissions get "
                        "503 until it does", self.name, self.url, exc)
            answer = {}
        pings = answer.get("pings") if isinstance(answer, dict) else None
        up = [p.get("hostname") for p in pings or [] if isinstance(p, dict) and p.get("ping") == "UP"]
        log.info("slurm scheduler %s: Slurm's REST API at %s (slurmctld %s), as %s, %s; partition %s", self.name,
                 self.url, ", ".join(map(str, up)) or "not answering", self.user, self.tokens.source,
                 self.partition or "(Slurm's default)")

    async def close(self) -> None:
        await super().close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ---- the contract ----

    async def submit(self, task: Task) -> str:
        script = self.job_script(task)
        account = self.job_account(task)
        try:
            body = submission(script, self.environment, user_environment=account is not None)
        except ValueError as exc:
            raise TaskRefused(f"the job script cannot be sent to Slurm's REST API: {exc}") from None
        try:
            async with self._submit_slots:
                answer = await self._request("POST", "/job/submit", body, user=account or self.user, what="submit",
                                             refusal="Slurm refused the task")
        except TaskRefused as refused:  # the part of the task refused, as over sbatch
            raise TaskRefused(str(refused), refused_path(task, str(refused))) from None
        except CommandTimeout:  # slurmctld may have taken the job all the same: it must not run unseen
            self._later(self._cancel_by_name(task.id))
            raise
        job_id = answer.get("job_id")
        if not isinstance(job_id, int):
            self._later(self._cancel_by_name(task.id))
            raise SchedulerUnavailable(f"Slurm gave an unexpected answer: no job id in {str(answer)[:200]}")
        if answer.get("job_submit_user_msg"):
            log.warning("task %s: Slurm said: %s", task.id, answer["job_submit_user_msg"])
        return str(job_id)

    async def status(self, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
        if not jobs:
            return {}
        wanted = {job.native_id for job in jobs}
        now = time.time()
        full = now - self._full_at >= FULL_EVERY or not wanted <= self._table.keys() | self._unlisted_ids
        path = "/jobs" if full else f"/jobs?update_time={int(self._listed_at) - SLACK}"
        answer = await self._request("GET", path, what="status", allow_not_modified=True, listing=True)
        if answer is not None:
            self._table = parse_jobs(answer, lambda job: job.job_id in wanted)
            self._unlisted_ids = wanted - self._table.keys()
            self._listed_at = now
            if full:
                self._full_at = now
        return await self._answers(jobs, self._table)

    async def cancel(self, job: JobRef) -> None:
        found = await self._scontrol(job.native_id)
        if found is None or found.name != job.task_id or found.state not in _CANCELLABLE:
            log.info("task %s: Slurm job %s has ended already", job.task_id, job.native_id)
            return
        try:
            await self._request("DELETE", f"/job/{job.native_id}", what="cancel")
        except SchedulerUnavailable:
            raise
        except SchedulerError as exc:
            if not ("already completing or completed" in str(exc).lower() or no_such_job(str(exc))):
                raise SchedulerError(f"Slurm could not cancel job {job.native_id}: {exc}") from None
        log.info("task %s: cancelled Slurm job %s", job.task_id, job.native_id)

    # ---- inside ----

    async def _named(self, name: str) -> list[str]:
        answer = await self._request("GET", "/jobs", what="find", listing=True)
        return list(parse_jobs(answer, lambda job: job.name == name))

    async def _scontrol(self, job_id: str) -> SlurmJob | None:
        """`GET /job/{id}`: what Slurm still knows of one job, None if it knows none by that id."""
        if not job_id.isdigit():
            return None
        try:
            answer = await self._request("GET", f"/job/{job_id}", what="job")
        except SchedulerUnavailable:
            raise
        except SchedulerError as exc:
            if no_such_job(str(exc)):
                return None
            raise
        return parse_jobs(answer).get(job_id)

    async def _cancel_by_name(self, task_id: str) -> None:
        """Cancel whatever job carries `task_id`, best effort, after a submit whose outcome is
        unknown; tried again while Slurm cannot answer, for up to `CANCEL_FOR` seconds."""
        deadline = time.monotonic() + self.CANCEL_FOR
        while True:
            try:
                for job_id in await self._named(task_id):
                    await self._request("DELETE", f"/job/{job_id}", what="cancel")
                log.warning("task %s: its submission failed; cancelled the Slurm job it may have left", task_id)
                return
            except SchedulerUnavailable as exc:
                problem = str(exc)
                if time.monotonic() + self.CANCEL_RETRY > deadline:
                    break
            except SchedulerError as exc:
                problem = str(exc)
                break
            await asyncio.sleep(self.CANCEL_RETRY)
        log.error("task %s: its submission failed, and the Slurm job it may have left could not be cancelled: %s",
                  task_id, problem)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *, user: str | None = None,
                       what: str, refusal: str | None = None, allow_not_modified: bool = False,
                       listing: bool = False) -> Any:
        """One request to slurmrestd as `user` (default: `rest.user`): its JSON answer (None for a
        304 when `allow_not_modified`). Slurm's `errors` raise TaskRefused with `refusal` as the
        prefix (if given), SchedulerUnavailable when they say Slurm cannot answer now, else
        SchedulerError; a request that gets no answer within `command_timeout` (`listing_timeout`
        for a `listing` of the whole job table) raises CommandTimeout."""
        if self.session is None:
            raise SchedulerUnavailable("the Slurm scheduler is not started")
        user = user or self.user
        seconds = self.listing_timeout if listing else self.timeout
        for attempt in (1, 2):
            token = await self.tokens.token(user)
            headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}
            try:
                async with self.session.request(method, self.url + API + path, json=body, headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=seconds)) as reply:
                    status = reply.status
                    text = await reply.text()
            except TimeoutError:
                raise CommandTimeout(f"Slurm did not answer within {seconds:g} s (slurmrestd)") from None
            except aiohttp.ClientError as exc:
                raise SchedulerUnavailable(f"Slurm cannot answer now: slurmrestd at {self.url} cannot be reached "
                                           f"({exc})") from None
            if status == NOT_MODIFIED and allow_not_modified:
                return None
            if status in (401, 403) and attempt == 1:
                self.tokens.forget(user)  # expired or revoked early: one more try with a new token
                continue
            break
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise SchedulerUnavailable(f"Slurm cannot answer now: slurmrestd answered {status} to {what} with "
                                       f"no JSON: {text.strip()[:200]!r}")
        errors = answer.get("errors") or []
        if status in (401, 403):
            raise SchedulerUnavailable(f"Slurm cannot answer now: slurmrestd refused the token of {user!r} "
                                       f"(authentication, HTTP {status})")
        if not errors and status < 400:
            return answer
        message = error_text(errors) if errors else f"HTTP {status}"
        if unavailable(message) or status >= 502:
            raise SchedulerUnavailable(f"Slurm cannot {'take the task' if refusal else 'answer'} now: {message}")
        if refusal is not None:
            raise TaskRefused(f"{refusal}: {message}")
        raise SchedulerError(f"slurmrestd ({what}): {message}")


#: Job states a DELETE can still end; the others have ended already.
_CANCELLABLE = frozenset({"PENDING", "RUNNING", "SUSPENDED", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
