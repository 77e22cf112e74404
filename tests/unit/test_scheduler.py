"""Scheduler slots: cron expressions and intervals, computed without floating-point drift."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from muster.client._scheduler import Job, Scheduler


async def _noop(firing) -> None:  # noqa: ANN001
    pass


def test_interval_slots_are_aligned_and_strictly_after() -> None:
    job = Job("j", _noop, every=timedelta(milliseconds=400))
    t = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
    slots = [job.next_after(t)]
    for _ in range(1000):
        slots.append(job.next_after(slots[-1]))
    assert slots[0] == t + timedelta(milliseconds=400)
    assert all(b - a == timedelta(milliseconds=400) for a, b in zip(slots, slots[1:], strict=False))


def test_cron_slots() -> None:
    job = Job("j", _noop, cron="*/5 * * * *")
    t = datetime(2026, 11, 22, 12, 3, 10, tzinfo=UTC)
    assert job.next_after(t) == datetime(2026, 11, 22, 12, 5, tzinfo=UTC)
    assert job.next_after(datetime(2026, 11, 22, 12, 5, tzinfo=UTC)) == datetime(2026, 11, 22, 12, 10, tzinfo=UTC)


def test_a_job_needs_exactly_one_schedule_and_a_valid_cron() -> None:
    s = Scheduler(cluster=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        s.job()
    with pytest.raises(ValueError):
        s.job("*/5 * * * *", every=timedelta(seconds=1))
    with pytest.raises(ValueError, match="not a cron expression"):
        s.job("every tuesday")
