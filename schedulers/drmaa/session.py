"""The process's one DRMAA session, and the one thread every DRMAA call runs in.

DRMAA v1 allows one session per process, its calls block, and drmaa-python shares one error
buffer between calls. So every call goes through `DrmaaSession.call`, which hands it to a single
worker thread with a timeout. Scheduler instances share the session (the gateway has one; the
contract tests make one per test): the first `start()` loads libdrmaa (the `drmaa` package is
imported only then, so a gateway without it still starts with other schedulers) and opens the
session; it stays open when an instance closes (a new session would not know the jobs of the old
one) and is exited when the interpreter exits. The worker is a daemon thread, so a DRMAA call
that hangs cannot keep the process from exiting; libdrmaa's own exit gets a few seconds (it hangs
after a qmaster restart). The methods below `call` run in the worker thread; `counts` says how
many of each DRMAA call about jobs (jobStatus, wait, control, runJob) the session has made.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..base import SchedulerError, SchedulerUnavailable
from . import mapping

log = logging.getLogger(__name__)

_TLS_HINT = ("Grid Engine's libdrmaa needs more static TLS than glibc leaves for dlopen: start the gateway with "
             "GLIBC_TUNABLES=glibc.rtld.optional_static_tls=16384 in its environment (it cannot be set later)")
#: How many reaped JobInfos to keep (DRMAA forgets a job once wait() has reaped it).
KEEP_INFOS = 10000
#: Seconds libdrmaa may take to exit when the interpreter exits.
EXIT_TIMEOUT = 5.0


class DrmaaSession:
    """The DRMAA session and its worker thread."""

    def __init__(self) -> None:
        self.lib: Any = None          # the drmaa package, once libdrmaa is loaded
        self.library: str | None = None
        self.session: Any = None
        self.contact = ""
        self.lock = threading.Lock()  # guards `infos`
        self.infos: OrderedDict[str, Any] = OrderedDict()  # JobInfo of jobs reaped by wait()
        self.counts: Counter[str] = Counter()  # DRMAA calls about jobs, by name
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="drmaa", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue `fn(*args)` for the worker thread."""
        future: Future[Any] = Future()
        self._calls.put((fn, args, future))
        return future

    async def call(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the worker thread; SchedulerUnavailable after `timeout` seconds (a call
        that has not started by then is dropped; one that has cannot be interrupted)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.submit(fn, *args)), timeout)
        except TimeoutError:
            raise SchedulerUnavailable(f"the DRM did not answer within {timeout:g} s") from None

    def _serve(self) -> None:
        while True:
            fn, args, future = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def _exit_at_shutdown(self) -> None:
        try:
            self.submit(self.exit).result(EXIT_TIMEOUT)
        except Exception as exc:  # TimeoutError: libdrmaa hangs; the process exits all the same
            log.warning("the DRMAA session did not exit cleanly: %s", str(exc) or f"no answer in {EXIT_TIMEOUT:g} s")

    # ---- these run in the worker thread ----

    def load(self, library: str) -> None:
        """Import `drmaa`, which loads libdrmaa from DRMAA_LIBRARY_PATH (once per process)."""
        if self.lib is not None:
            if library != self.library:
                raise SchedulerError(f"this process already uses libdrmaa {self.library}; it cannot load {library} too")
            return
        try:
            import drmaa  # reads DRMAA_LIBRARY_PATH and loads libdrmaa
        except OSError as exc:
            hint = f"; {_TLS_HINT}" if "static TLS" in str(exc) else ""
            raise SchedulerError(f"cannot load libdrmaa {library}: {exc}{hint}") from None
        except (ImportError, RuntimeError) as exc:
            raise SchedulerError(f"cannot use DRMAA: {exc} (the Python package `drmaa` and the site's libdrmaa "
                                 "are needed)") from None
        self.lib, self.library = drmaa, library

    def open(self) -> str:
        """Open the session if it is not open yet; answer what the DRM calls itself."""
        if self.session is None:
            session = self.lib.Session()
            session.initialize(self.contact or None)
            self.session = session
            atexit.register(self._exit_at_shutdown)
        return f"{self.session.drmsInfo} (DRMAA {self.session.version}, {self.session.drmaaImplementation})"

    def run_job(self, fields: Mapping[str, Any], id_file: Path, abandoned: threading.Event) -> str:
        """Submit a job with the template attributes `fields`; record its id in `id_file` at once
        (so `find` recovers it after a crash), and terminate it if the caller has given up."""
        self.open()
        template = self.session.createJobTemplate()
        try:
            for name, value in fields.items():
                setattr(template, name, value)
            self.counts["runJob"] += 1
            job_id = str(self.session.runJob(template))
        finally:
            self.session.deleteJobTemplate(template)
        try:
            id_file.write_text(job_id + "\n")
        except OSError as exc:
            log.error("job %s: cannot record its id in %s: %s", job_id, id_file, exc)
        if abandoned.is_set():  # the caller gave up waiting: nobody will track this job
            log.warning("job %s was submitted after its caller timed out: terminating it", job_id)
            self.terminate(job_id)
        return job_id

    def probe(self, job_ids: Sequence[str]) -> dict[str, tuple[str, Any]]:
        """Per job: (DRMAA state, None) while active; ("ended", JobInfo or None) once done or
        failed; ("gone", None) when the session does not know it; ("error", message)."""
        errors = self.lib.errors

        def status(job_id: str) -> tuple[str, Any]:
            try:
                self.counts["jobStatus"] += 1
                state = self.session.jobStatus(job_id)
            except (errors.InvalidJobException, errors.DrmCommunicationException, errors.TryLaterException):
                raise
            except errors.DrmaaException as exc:
                return ("error", str(exc))
            return ("ended", self._reap(job_id)) if state in mapping.ENDED_STATES else (state, None)

        return self._each(job_ids, status)

    def reap(self, job_ids: Sequence[str]) -> dict[str, tuple[str, Any]]:
        """For jobs the DRM no longer lists, without asking their state: per job ("ended", JobInfo
        or None) if this session has seen it end; ("lagging", None) if the session still has it
        as active (its news of the end is on its way); ("gone", None) if it never knew the job
        (submitted before a restart, or already reaped and forgotten)."""
        def ended(job_id: str) -> tuple[str, Any]:
            try:
                return ("ended", self._wait(job_id))
            except self.lib.errors.ExitTimeoutException:
                return ("lagging", None)

        return self._each(job_ids, ended)

    def _each(self, job_ids: Sequence[str], ask: Callable[[str], tuple[str, Any]]) -> dict[str, tuple[str, Any]]:
        """Per job: ("ended", its JobInfo) if this session keeps it, else what `ask` answers;
        ("gone", None) when the session does not know the job."""
        self.open()
        answers = {}
        for job_id in job_ids:
            with self.lock:
                info = self.infos.get(job_id)
            if info is not None:
                answers[job_id] = ("ended", info)
                continue
            try:
                answers[job_id] = ask(job_id)
            except self.lib.errors.InvalidJobException:
                answers[job_id] = ("gone", None)
        return answers

    def _reap(self, job_id: str) -> Any:
        errors = self.lib.errors
        try:
            return self._wait(job_id)
        except (errors.DrmCommunicationException, errors.TryLaterException):
            raise
        except Exception:  # InvalidJob, ExitTimeout
            return None

    def _wait(self, job_id: str) -> Any:
        """wait() for an ended job without waiting; keep its JobInfo. None when the DRM has no usage
        record (drmaa-python's bare Exception for error code 24)."""
        errors = self.lib.errors
        self.counts["wait"] += 1
        try:
            info = self.session.wait(job_id, self.lib.Session.TIMEOUT_NO_WAIT)
        except (errors.DrmCommunicationException, errors.TryLaterException, errors.ExitTimeoutException,
                errors.InvalidJobException):
            raise
        except Exception:  # drmaa-python's bare Exception for code 24 (no usage), and other odd ends
            return None
        with self.lock:
            self.infos[job_id] = info
            while len(self.infos) > KEEP_INFOS:
                self.infos.popitem(last=False)
        return info

    def terminate(self, job_id: str) -> bool:
        """Tell the DRM to end the job; False if it does not know the job (it has ended)."""
        self.open()
        self.counts["control"] += 1
        try:
            self.session.control(job_id, self.lib.JobControlAction.TERMINATE)
        except self.lib.errors.InvalidJobException:
            return False
        return True

    def forget(self, job_id: str) -> None:
        """Drop what is kept about a job (its task was deleted)."""
        with self.lock:
            self.infos.pop(job_id, None)

    def exit(self) -> None:
        """End the session (at interpreter exit; jobs keep running)."""
        session, self.session = self.session, None
        if session is not None:
            session.exit()


_shared: DrmaaSession | None = None


def shared() -> DrmaaSession:
    """The process's session (created, not yet opened, on first use)."""
    global _shared
    if _shared is None:
        _shared = DrmaaSession()
    return _shared
