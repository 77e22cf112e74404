"""A clustered scheduler: each firing of a job runs on exactly one node.

::

    scheduler = Scheduler(cluster)

    @scheduler.job("*/5 * * * *", recoverable=True)      # cron (croniter), or every=timedelta(...)
    async def cleanup(firing: Firing) -> None: ...

    await scheduler.run(stop)

Firing slots are computed on the database's clock (estimated from the lock service's answers), so
nodes with skewed clocks agree on them; ``ClaimFiring`` decides who runs each. A recoverable
firing whose claimer dies is claimed again (with a higher token) once the claim's ttl passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from muster.client import errors as E
from muster.client._locks import Firing
from muster.client._retry import backoff, wait_out

if TYPE_CHECKING:
    from muster.client._cluster import Cluster

log = logging.getLogger(__name__)

JobFunc = Callable[[Firing], Awaitable[None]]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A claim the control plane could not answer is tried again after 0.4 s, doubling up to 5 s.
_BACKOFF_INITIAL = timedelta(milliseconds=400)
_BACKOFF_MAX = timedelta(seconds=5)


@dataclass
class Job:
    """A scheduled job."""

    name: str
    func: JobFunc
    cron: str | None = None
    every: timedelta | None = None
    recoverable: bool = False
    ttl: timedelta = timedelta(minutes=5)
    misfire_threshold: timedelta = timedelta(minutes=1)

    def next_after(self, when: datetime) -> datetime:
        """The first slot strictly after ``when``."""
        if self.every is not None:
            step = self.every // timedelta(microseconds=1)  # integers: a float would land on the same slot
            k = (when - _EPOCH) // timedelta(microseconds=1) // step + 1
            return _EPOCH + timedelta(microseconds=k * step)
        from croniter import croniter

        assert self.cron is not None
        nxt = croniter(self.cron, when).get_next(datetime)
        return nxt if nxt.tzinfo else nxt.replace(tzinfo=UTC)


@dataclass
class Scheduler:
    """Runs jobs on this node when it wins their firings.

    Args:
        cluster: the connection.
        holder: the name claims carry (default host:pid).
        node_id: this node's id, if it is a node.
    """

    cluster: Cluster
    holder: str | None = None
    node_id: int = 0
    jobs: dict[str, Job] = field(default_factory=dict)
    ran: list[tuple[str, datetime, int]] = field(default_factory=list)
    _offset: float = 0.0
    _firing: set[asyncio.Task[None]] = field(default_factory=set)

    def job(
        self,
        cron: str | None = None,
        *,
        every: timedelta | None = None,
        name: str | None = None,
        recoverable: bool = False,
        ttl: timedelta = timedelta(minutes=5),
        misfire_threshold: timedelta = timedelta(minutes=1),
    ) -> Callable[[JobFunc], JobFunc]:
        """Registers a job: a cron expression (5 or 6 fields) or an interval.

        Args:
            ttl: the longest a run may take; after it another node may claim a recoverable firing.
            misfire_threshold: a firing claimed later than this after its time is skipped (0: never).
        """
        if (cron is None) == (every is None):
            raise ValueError("give either a cron expression or every=timedelta(...)")
        if cron is not None:
            from croniter import croniter

            if not croniter.is_valid(cron):
                raise ValueError(f"not a cron expression: {cron!r}")
        if every is not None and every <= timedelta(0):
            raise ValueError("every must be positive")

        def register(func: JobFunc) -> JobFunc:
            job_name = name or f"{func.__module__}.{func.__qualname__}"
            self.jobs[job_name] = Job(job_name, func, cron, every, recoverable, ttl, misfire_threshold)
            return func

        return register

    def db_now(self) -> datetime:
        """The database's time, estimated."""
        return datetime.now(UTC) + timedelta(seconds=self._offset)

    async def _sync_clock(self) -> None:
        before = time.time()
        _, server_time = await self.cluster.list_jobs(limit=1)
        after = time.time()
        if server_time is not None:
            self._offset = server_time.timestamp() - (before + after) / 2

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Runs every job until ``stop`` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        await self._sync_clock()
        tasks = [
            asyncio.create_task(self._loop(job, stop), name=f"muster-job-{job.name}") for job in self.jobs.values()
        ]
        tasks.append(asyncio.create_task(self._clock_loop(stop)))
        try:
            await stop.wait()
        finally:
            tasks += self._firing
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _clock_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(60)
            with contextlib.suppress(E.MusterError):
                await self._sync_clock()

    async def _loop(self, job: Job, stop: asyncio.Event) -> None:
        # Start with the latest slot already due (a restart or a dead claimer may have left it),
        # then every slot after it.
        now = self.db_now()
        slot = job.next_after(now - (job.every or timedelta(minutes=1)) - timedelta(seconds=1))
        if slot > now:
            slot = job.next_after(now - timedelta(microseconds=1))
        while not stop.is_set():
            delay = (slot - self.db_now()).total_seconds()
            await asyncio.sleep(max(0.0, delay))
            task = asyncio.create_task(self._fire(job, slot))
            self._firing.add(task)
            task.add_done_callback(self._firing.discard)
            slot = job.next_after(slot)

    async def _fire(self, job: Job, slot: datetime) -> None:
        request_id = uuid.uuid4().hex  # one per slot: a claim retried after a lost answer comes back
        unreachable = 0
        for _ in range(100):  # bounded: a recoverable firing is retried while its claimers keep dying
            try:
                firing = await self.cluster.claim_firing(
                    job.name,
                    slot,
                    ttl=job.ttl,
                    recoverable=job.recoverable,
                    misfire_threshold=job.misfire_threshold,
                    holder=self.holder,
                    node_id=self.node_id,
                    request_id=request_id,
                )
            except E.FiringClaimedError:
                if not job.recoverable:
                    return
                await asyncio.sleep(job.ttl.total_seconds() + 0.2)  # see whether its claimer finishes
                continue
            except (E.FiringDoneError, E.MisfiredError):
                return
            except E.MusterError as exc:
                if wait_out(exc):
                    # The control plane could not answer (a replica or the database is down): the slot
                    # is not lost — try again until it is claimed, done, or too late (misfired).
                    log.info("job %s at %s: claim not answered (%s); trying again", job.name, slot, exc.code.name)
                    wait = backoff(unreachable, initial=_BACKOFF_INITIAL, maximum=_BACKOFF_MAX, hint=exc.retry_after)
                    await asyncio.sleep(wait)
                    unreachable += 1
                    continue
                log.warning("job %s at %s: claim failed: %s", job.name, slot, exc)
                return
            failed = False
            try:
                async with asyncio.timeout(job.ttl.total_seconds()):
                    await job.func(firing)
                self.ran.append((job.name, slot, firing.token))
            except Exception:  # noqa: BLE001 - a job's failure is recorded, the scheduler goes on
                failed = True
                log.exception("job %s at %s failed", job.name, slot)
            with contextlib.suppress(E.MusterError):
                await self.cluster.complete_firing(firing, failed=failed)
            return
