"""Prometheus metrics: `GET /metrics` in the Prometheus text format (prometheus-client).

What is measured, and where:

- tasks: `jobproxy_tasks{scheduler,state}` counts the active tasks by state, from the active set
  in memory at scrape time; `jobproxy_tasks_stored` is the store's count (kept in memory, no
  scan); `jobproxy_tasks_finished_total{scheduler,state}` counts tasks reaching a final state,
  from the poller (the one place where states change). `scheduler` is the instance's name.
- routing: `jobproxy_routed_total{scheduler,rule}`, each routing decision of a submit: the instance
  chosen and the `[[routes]]` rule that chose it (1 for the first; `none` without rules), counted
  when chosen (a task refused afterwards, e.g. over a quota, counts too).
- submits: `jobproxy_submits_total{api,status}`, every answer to a submit (v1 and TES) by status.
- HTTP: `jobproxy_http_request_duration_seconds{method,route}` and
  `jobproxy_http_responses_total{method,route,status}`, by route template (`/v1/jobproxy/state/{id}`),
  never by task id.
- scheduler calls: `jobproxy_scheduler_call_duration_seconds{scheduler,call}` (submit, status,
  cancel, find, release) and `jobproxy_scheduler_call_failures_total{scheduler,call,error}`.
- `jobproxy_poll_round_duration_seconds{scheduler}`, `jobproxy_store_transaction_duration_seconds`
  (each group commit, fsync included) and `jobproxy_event_loop_lag_seconds` (how late a timer on
  the event loop fires), plus the process' own CPU, memory and file descriptors.

With `[metrics] token_sha256`, a scrape must send `Authorization: Bearer <token>`; `enabled =
false` leaves the route out (404).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from schedulers.base import ACTIVE as ACTIVE_STATES
from schedulers.base import Scheduler, TaskState

from .auth import CHALLENGE
from .keys import ACTIVE, CONFIG, POLLERS, ROUTER, SCHEDULERS, STORE
from .responses import ApiError

#: The calls of the plugin contract that are timed.
CALLS = ("submit", "status", "cancel", "find", "release")
#: Submit routes (POST) and the API each belongs to.
SUBMITS = {"/v1/jobproxy/submit": "v1", "/ga4gh/tes/v1/tasks": "tes", "/v1/tasks": "tes"}
#: Buckets in seconds, from a fast local call to a slow batch system.
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED = "(unmatched)"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Metrics:
    """The gateway's metrics, in a registry of its own (one per application)."""

    def __init__(self, lag_interval: float = 0.5) -> None:
        self.lag_interval = lag_interval
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_seconds = Histogram("jobproxy_http_request_duration_seconds", "HTTP request latency by route",
                                      ["method", "route"], buckets=LATENCY, registry=r)
        self.http_responses = Counter("jobproxy_http_responses", "HTTP answers by route and status code",
                                      ["method", "route", "status"], registry=r)
        self.submits = Counter("jobproxy_submits", "Task submissions answered, by API and status code",
                               ["api", "status"], registry=r)
        self.call_seconds = Histogram("jobproxy_scheduler_call_duration_seconds", "Scheduler plugin calls by kind",
                                      ["scheduler", "call"], buckets=LATENCY, registry=r)
        self.call_failures = Counter("jobproxy_scheduler_call_failures", "Scheduler plugin calls that raised",
                                     ["scheduler", "call", "error"], registry=r)
        self.finished = Counter("jobproxy_tasks_finished", "Tasks that reached a final state, by state",
                                ["scheduler", "state"], registry=r)
        self.routed = Counter("jobproxy_routed", "Tasks routed, by scheduler instance and the rule that chose it",
                              ["scheduler", "rule"], registry=r)
        self.poll_rounds = Histogram("jobproxy_poll_round_duration_seconds", "Duration of each poller round",
                                     ["scheduler"], buckets=LATENCY, registry=r)
        self.store_transactions = Histogram("jobproxy_store_transaction_duration_seconds",
                                            "Duration of each store transaction (group commit, fsync included)",
                                            buckets=LATENCY, registry=r)
        self.loop_lag = Histogram("jobproxy_event_loop_lag_seconds", "How late a timer on the event loop fires",
                                  buckets=LAG, registry=r)
        self.loop_lag_last = Gauge("jobproxy_event_loop_lag_last_seconds", "The event-loop lag last measured",
                                   registry=r)
        ProcessCollector(registry=r)
        #: The labelled series of each (method, route, status) answered so far: a lookup of the
        #: labels of a metric costs more than the observation itself.
        self._http: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per set of labels (routing's and the final
        states' counters are counted for each task)."""
        key = (metric, labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = metric.labels(*labels)
        return found

    def answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP answer and its latency (and, for a submit route, the submit)."""
        series = self._http.get((method, route, status))
        if series is None:
            api = SUBMITS.get(route) if method == "POST" else None
            series = self._http[(method, route, status)] = (
                self.http_seconds.labels(method, route), self.http_responses.labels(method, route, str(status)),
                self.submits.labels(api, str(status)) if api is not None else None)
        series[0].observe(seconds)
        series[1].inc()
        if series[2] is not None:
            series[2].inc()

    def instrument(self, scheduler: Scheduler) -> None:
        """Time every contract call of `scheduler` and count its failures (wrapping the instance's
        methods, so plugins need nothing)."""
        for call in CALLS:
            setattr(scheduler, call, self._timed(getattr(scheduler, call), scheduler.name, call))

    def _timed(self, method: F, scheduler: str, call: str) -> F:
        histogram = self.call_seconds.labels(scheduler, call)

        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            except Exception as exc:
                self.call_failures.labels(scheduler, call, type(exc).__name__).inc()
                raise
            finally:
                histogram.observe(time.perf_counter() - started)

        return timed  # type: ignore[return-value]

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


class _Tasks:
    """The task gauges, computed at scrape time from memory: the active set and the store's count."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        if STORE not in self.app:  # not started yet
            return
        tasks = GaugeMetricFamily("jobproxy_tasks", "Active tasks by scheduler and state",
                                  labels=["scheduler", "state"])
        for name in self.app[SCHEDULERS]:
            counts = Tally(record.state for record in self.app[ACTIVE].of(name))
            for state in sorted(ACTIVE_STATES, key=lambda s: s.value):
                tasks.add_metric([name, state.value], counts[state])
        yield tasks
        yield GaugeMetricFamily("jobproxy_tasks_stored", "Tasks the store holds", value=self.app[STORE].count())


def setup(app: web.Application) -> None:
    """Give `app` its metrics: each scheduler instance's calls timed, routing counted, `/metrics`
    served (unless disabled), and, once the application has started (call this after adding its
    lifecycle), the store, the pollers and the event loop observed."""
    metrics = app[METRICS] = Metrics()
    metrics.registry.register(_Tasks(app))
    for scheduler in app[SCHEDULERS].values():
        metrics.instrument(scheduler)
    app[ROUTER].on_choice = lambda choice: metrics.series(metrics.routed, choice.scheduler, choice.label).inc()
    if app[CONFIG].sections.metrics.enabled:
        app.router.add_get("/metrics", scrape)
    app.cleanup_ctx.append(_observe)


async def _observe(app: web.Application) -> AsyncIterator[None]:
    metrics = app[METRICS]
    app[STORE].on_commit = metrics.store_transactions.observe

    def finished(scheduler: str, state: TaskState) -> None:
        metrics.series(metrics.finished, scheduler, state.value).inc()

    for poller in app[POLLERS].values():
        poller.on_round = metrics.poll_rounds.labels(poller.scheduler.name).observe
        poller.on_final = finished
    watcher = asyncio.create_task(watch_loop(metrics), name="event-loop-lag")
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def watch_loop(metrics: Metrics) -> None:
    """Measure, forever, how much later than asked a sleep of `lag_interval` wakes up."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(metrics.lag_interval)
        lag = max(0.0, loop.time() - before - metrics.lag_interval)
        metrics.loop_lag.observe(lag)
        metrics.loop_lag_last.set(lag)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


@web.middleware
async def middleware(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Time each request and count its answer, by route template; count submits by status."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # a redirect or the like, passed on by the error middleware
        status = exc.status
        raise
    finally:
        request.app[METRICS].answered(request.method, _route(request), status, time.perf_counter() - started)


async def scrape(request: web.Request) -> web.Response:
    """`GET /metrics`: the text format; with a scrape token configured, only for its bearer."""
    expected = request.app[CONFIG].sections.metrics.token_sha256
    if expected is not None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected.lower()):
            raise ApiError(401, "the metrics need the scrape token: send 'Authorization: Bearer <token>'",
                           headers=CHALLENGE)
    # on the event loop: the task gauges read the active set, which only the loop's thread changes
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
