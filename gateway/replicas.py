"""Several gateways (replicas) on one PostgreSQL store, behind one address.

Any replica answers any request; what differs is who talks to a scheduler on its own initiative:

- **The lease.** For each scheduler instance, exactly one replica at a time holds a session-level
  advisory lock named after the instance (on a connection of its own) and is the only one whose
  poller polls, reconciles and recovers. Every replica tries to take the lock once per poll
  interval, so when the holder dies (its session ends with it) another holds it within one or
  two intervals; a holder whose connection breaks stops polling at once.
- **Changes reach everyone.** Every store write NOTIFYs (`gateway.pgstore`); each replica LISTENs,
  reads the records the others changed and puts them in its active set through
  `Poller.observed` (which calls the poller's listeners too, without writing the store again).
  So answers, per-user limits and event streams are the same whichever replica a client hits.
- **Who submits.** A replica submits the task it accepted itself (e.g. sbatch) — unless its
  scheduler reports its own changes (local children, a DRMAA session), which only the lease
  holder can see: then it records the task and hands it to the holder (`to_leader`). The holder
  adopts tasks without a job whose submit lock is free (`PgStore.claim`): handed over, or left
  by a replica that died between its store write and its submit; its recovery finds a job by the
  task's id (`Scheduler.find`) before submitting, so no job is submitted twice.
- **Staging.** The replica that records a TES task with inputs to fetch (gateway/staging) holds its
  submit lock while it fetches them, then submits it (or hands it over as above). A task whose
  replica died while fetching is adopted like any task without a job, and its adopter fetches the
  inputs again before it submits it (`Poller.restage`); no replica fetches again at its own start.
  Outputs being sent when the lease holder died are sent again by the next holder, whose first
  status query sees the ended job (`Poller.defer_final`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import psycopg

from .pgstore import CHANNEL, PgStore
from .poller import Poller
from .store import Record

log = logging.getLogger(__name__)


class Replication:
    """This replica's part: the leases of its schedulers' pollers and the notifications it hears."""

    def __init__(self, store: PgStore, pollers: Mapping[str, Poller]) -> None:
        self.store = store
        self.pollers = dict(pollers)
        self._tasks: list[asyncio.Task[None]] = []
        self._claimed: dict[str, float] = {}  # task id: when this replica claimed it
        for poller in self.pollers.values():
            poller.leading = False
            poller.to_leader = self._hand_over_for(poller)

    async def start(self) -> None:
        """Listen first (no change is missed from here on), try each lease once (a holder
        reconciles before the gateway serves), then keep trying and listening in the background."""
        listening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._listen(listening), name="replicas-listen"))
        await asyncio.wait_for(asyncio.shield(listening), 30)
        for name, poller in self.pollers.items():
            lease = Lease(self.store, name)
            await self._round(poller, lease)
            self._tasks.append(asyncio.create_task(self._lead(poller, lease), name=f"lease-{name}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- the lease ----

    async def _lead(self, poller: Poller, lease: Lease) -> None:
        try:
            while True:
                await asyncio.sleep(poller.interval)
                try:
                    await self._round(poller, lease)
                except Exception:  # the lease task must outlive any one bad round
                    log.exception("replica %s: lease round of scheduler %s failed", self.store.origin, lease.name)
        finally:
            await lease.close()

    async def _round(self, poller: Poller, lease: Lease) -> None:
        """One try: take the lease (and reconcile), or keep it (and adopt orphaned tasks)."""
        held = await lease.hold()
        if held and not poller.leading:
            log.info("replica %s: holds the lease of scheduler %s, polls it from now on", self.store.origin, lease.name)
            await self._refresh(poller)  # if a step fails, the next round takes over again from the start
            await self._adopt(poller)
            await poller.catch_up()
            poller.leading = True
        elif held:
            await self._adopt(poller)
        elif poller.leading:
            log.warning("replica %s: lost the lease of scheduler %s, stops polling it", self.store.origin, lease.name)
            poller.leading = False

    async def _adopt(self, poller: Poller) -> None:
        """Claim the tasks without a job whose replica let go of them; recover each once its grace
        has passed (`grace`)."""
        wait = grace(poller)

        async def claim(task_ids: list[str]) -> list[str]:
            fresh = [t for t in task_ids if t not in self._claimed]
            if fresh:
                for task_id in await asyncio.wrap_future(self.store.claim(fresh)):
                    self._claimed[task_id] = time.monotonic()
            ready = [t for t in task_ids if t in self._claimed and time.monotonic() - self._claimed[t] >= wait]
            for task_id in ready:
                del self._claimed[task_id]
            return ready
        try:
            await poller.adopt(claim)
        except Exception as exc:  # the next round tries again
            log.warning("replica %s: could not adopt orphaned tasks: %s", self.store.origin, exc)

    async def _refresh(self, poller: Poller) -> None:
        """A new holder reads the scheduler's active tasks again (off the event loop), in case a
        notification was lost while it listened on a broken connection."""
        for record in await self.store.active_async(poller.scheduler.name):
            poller.observed(record)

    def _hand_over_for(self, poller: Poller) -> Callable[[Record], bool]:
        def hand_over(record: Record) -> bool:
            if not poller.scheduler.reports_changes or poller.leading:
                return False
            self.store.release(record.id)
            poller.active.put(record)
            return True
        return hand_over

    # ---- notifications ----

    async def _listen(self, listening: asyncio.Future[None]) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.store.dsn, autocommit=True) as db:
                    await db.execute(f"LISTEN {CHANNEL}")
                    if not listening.done():
                        listening.set_result(None)
                    else:  # back after a break: what changed meanwhile
                        for poller in self.pollers.values():
                            await self._refresh(poller)
                    async for note in db.notifies():  # one at a time, in the order they were sent
                        await self._heard(note.payload)
            except Exception as exc:  # psycopg's, or StoreUnavailable: listen again in a second
                log.warning("replica %s: listening for changes failed, again in 1 s: %s", self.store.origin, exc)
            await asyncio.sleep(1.0)

    async def _heard(self, payload: str) -> None:
        """Another replica's change: the records it names, read off the event loop, into the pollers."""
        origin, kind, *task_ids = payload.split(" ")
        if origin == self.store.origin or not task_ids:
            return
        if kind == "delete":
            for task_id in task_ids:
                for poller in self.pollers.values():
                    poller.withdrawn(task_id)
            return
        try:
            records = await self.store.get_many(task_ids)
        except Exception as exc:
            log.warning("replica %s: could not read changed tasks: %s", self.store.origin, exc)
            return
        for record in records:
            owner = self.pollers.get(record.scheduler)
            if owner is not None:
                if kind == "add":  # read after later changes, maybe: its stream still tells QUEUED first
                    owner.observed(record.as_added())
                owner.observed(record)


def grace(poller: Poller) -> float:
    """Seconds between claiming a task and recovering it. A replica killed during its submit call
    may have left the submit on its way (an sbatch child is killed with it, see
    schedulers/commands.py, but its request may have reached slurmctld): wait until it must have
    ended, its scheduler's command timeout and a second, so that `Scheduler.find` sees its job. A
    scheduler that reports its own changes is submitted to only by the lease holder: no wait."""
    if poller.scheduler.reports_changes:
        return 0.0
    timeout = getattr(poller.scheduler, "timeout", None)
    return (float(timeout) if isinstance(timeout, int | float) else 30.0) + 1.0


class Lease:
    """The advisory lock that makes one replica the poller of scheduler instance `name`."""

    def __init__(self, store: PgStore, name: str) -> None:
        self.store = store
        self.name = name
        self._db: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._held = False

    async def hold(self) -> bool:
        """Whether this replica holds the lease now (taking it if it is free)."""
        try:
            if self._db is None or self._db.closed or self._db.broken:
                self._held = False
                self._db = await psycopg.AsyncConnection.connect(self.store.dsn, autocommit=True)
            if self._held:
                await self._db.execute("SELECT 1")  # the lock lasts as long as this session
            else:
                cursor = await self._db.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                                (f"jobproxy lease {self.name}",))
                row = await cursor.fetchone()
                self._held = bool(row and row[0])
        except (psycopg.Error, OSError) as exc:
            if self._held:
                log.warning("lease of scheduler %s: the database connection broke: %s", self.name, exc)
            self._held = False
            await self.close()
        return self._held

    async def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._db.close()
            self._db = None
        self._held = False

