"""The fan-out's pieces without a server: pre-encoded messages, chunking, the write watchdog, waits."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from muster.api.events.v1 import event_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.core.events import EventBus, StoredEvent
from muster.core.watch import Streams, WatchFilter, encode_events, response_bytes

ALL = WatchFilter(frozenset(), frozenset())


def _event(revision: int, kind: str = "muster.api.registry.v1.NodeModeChanged", node: int = 1, pad: int = 0):
    ev = event_pb2.Event(revision=revision, kind=kind, node_id=node)
    ev.time.FromSeconds(1_700_000_000 + revision % 1_000_000)
    ev.payload.type_url = "type.googleapis.com/" + kind
    ev.payload.value = b"x" * pad
    return StoredEvent(revision, node, kind, ev)


def test_an_encoded_batch_is_byte_for_byte_what_protobuf_serializes() -> None:
    events = [_event(r, node=r % 3 + 1) for r in (1, 127, 128, 300, 2**40)]
    messages = Streams().encode(0, events, ALL)
    assert len(messages) == 1
    through, data = messages[0]
    expected = pb.WatchEventsResponse(through_revision=2**40, events=pb.EventBatch(events=[e.proto for e in events]))
    assert through == 2**40
    assert data == expected.SerializeToString()
    frames = [b"\x0a" + bytes([len(e.proto.SerializeToString())]) + e.proto.SerializeToString() for e in events[:1]]
    assert pb.WatchEventsResponse.FromString(encode_events(5, frames)).events.events[0] == events[0].proto


def test_a_filtered_batch_holds_only_matches_and_still_reaches_the_last_revision() -> None:
    events = [_event(r, node=r) for r in range(11, 21)]
    flt = WatchFilter(frozenset(), frozenset({12, 15}))
    ((through, data),) = Streams().encode(10, events, flt)
    msg = pb.WatchEventsResponse.FromString(data)
    assert [e.revision for e in msg.events.events] == [12, 15]
    assert through == msg.through_revision == 20
    assert Streams().encode(10, events, WatchFilter(frozenset({"no.Such"}), frozenset())) == ()


def test_large_batches_are_cut_into_messages_of_at_most_a_megabyte() -> None:
    events = [_event(r, pad=300_000) for r in range(1, 11)] + [_event(11, pad=1_500_000), _event(12)]
    messages = Streams().encode(0, events, ALL)
    seen, throughs = [], []
    for through, data in messages:
        msg = pb.WatchEventsResponse.FromString(data)
        assert len(msg.events.events) == 1 or len(data) <= 1024 * 1024 + 64
        assert msg.through_revision == through == msg.events.events[-1].revision
        seen += [e.revision for e in msg.events.events]
        throughs.append(through)
    assert seen == list(range(1, 13))
    assert throughs == sorted(throughs) and len(messages) >= 5


def test_streams_with_the_same_resume_point_and_filter_share_one_encoding() -> None:
    streams = Streams()
    events = [_event(r) for r in range(5, 9)]
    first = streams.encode(4, events, ALL)
    assert streams.cached(4, 8, ALL) is first
    assert streams.encode(4, events, WatchFilter(frozenset(), frozenset())) is first  # equal filters
    assert streams.cached(5, 8, ALL) is None and streams.cached(4, 7, ALL) is None
    assert streams.cached(4, 8, WatchFilter(frozenset(), frozenset({1}))) is None


def test_the_response_serializer_passes_bytes_through() -> None:
    msg = pb.WatchEventsResponse(through_revision=3)
    assert response_bytes(msg.SerializeToString()) == response_bytes(msg) == msg.SerializeToString()


async def test_the_watchdog_cuts_only_the_write_still_pending_at_its_deadline() -> None:
    streams = Streams()
    stuck: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcome: dict[str, str] = {}

    async def writer(name: str, write: asyncio.Future[None] | float) -> None:
        task = asyncio.current_task()
        assert task is not None
        streams.watchdog.arm(task, 0.2)
        try:
            if isinstance(write, float):
                await asyncio.sleep(write)
            else:
                await write
            outcome[name] = "written"
        except asyncio.CancelledError:
            outcome[name] = "cut" if streams.watchdog.was_cut(task) and task.uncancel() == 0 else "cancelled"
        finally:
            streams.watchdog.disarm(task)

    started = time.monotonic()
    await asyncio.gather(writer("stuck", stuck), writer("quick", 0.01), writer("quick2", 0.05))
    assert outcome == {"stuck": "cut", "quick": "written", "quick2": "written"}
    assert 0.15 < time.monotonic() - started < 1.0


async def test_waits_end_on_a_wake_up_or_at_their_own_timeout() -> None:
    bus = EventBus(None, "", poll_interval=timedelta(seconds=1))  # type: ignore[arg-type]  # no I/O here
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}

    async def waiter(name: str, timeout: float) -> None:
        await bus.wait(0, timeout)
        ended[name] = loop.time() - started

    started = loop.time()
    tasks = [asyncio.create_task(waiter(f"w{i}", 10.0)) for i in range(100)]
    tasks += [asyncio.create_task(waiter("short", 0.05)), asyncio.create_task(waiter("shorter", 0.02))]
    cancelled = asyncio.create_task(waiter("cancelled", 0.03))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0.2)
    assert set(ended) == {"short", "shorter"}
    assert ended["shorter"] < ended["short"] < 0.2
    bus._wake_all()
    await asyncio.gather(*tasks)
    assert len(ended) == 102 and max(ended.values()) < 1
    assert not bus._waiters and not bus._deadlines
    with pytest.raises(asyncio.CancelledError):
        await cancelled
