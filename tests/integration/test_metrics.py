"""Metrics and logs: after a scripted run the Prometheus scrape shows every expected series with
non-zero values; JSON logs carry the structured fields and, inside a traced RPC, the trace id."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import urllib.request
from datetime import timedelta

from harness import ServerProcess

from muster.client import Cluster, NodeMode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """Every sample of the scrape: ``name{labels}`` -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _total(samples: dict[str, float], name: str, **labels: str) -> float:
    pattern = re.compile(re.escape(name) + r"(\{.*\})?$")
    return sum(
        v for k, v in samples.items() if pattern.match(k) and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())
    )


async def test_the_scrape_shows_every_series_after_a_scripted_run(database_url: str) -> None:
    port = _free_port()
    env = {
        "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "MUSTER_METRICS_LISTEN": f"127.0.0.1:{port}",
        "MUSTER_HEARTBEAT_INTERVAL": "200ms",
        "MUSTER_CHECK_IN_WINDOW": "5s",
        "MUSTER_LEASE_TTL": "30s",
    }
    server = ServerProcess(database_url, ["registry,keys,balancer,locks"], env=env).start()
    try:
        async with Cluster.connect(server.address) as c:
            leases = [await c.join_node(f"m{i}.test", 8787) for i in range(2)]
            # A listing waits for the replica's node view to hold the joins (read-your-writes): the
            # gap of a heartbeat is measured from the node's previous one as the view knows it.
            await c.list_nodes()
            for _ in range(3):
                for lease in leases:
                    await c.heartbeat(lease)
                await asyncio.sleep(0.1)
            async with c.watch(0) as stream:
                await anext(aiter(stream))
                await c.set_node_mode(leases[0].node_id, NodeMode.DRAINING)
                await asyncio.wait_for(anext(aiter(stream)), 10)
                for _ in range(50):
                    status = await c.status()
                    if sum(n.state == "ONLINE" for n in status.nodes) == 2:
                        break
                    await asyncio.sleep(0.1)
                await c.place_session("ana")
                lock = await c.acquire("metrics-test", ttl=timedelta(seconds=5))
                await c.release(lock)
                samples = _scrape(port)
    finally:
        server.stop()
    expected = {
        ("muster_rpc_duration_milliseconds_count", ("rpc_method", "JoinNode")): 2,
        ("muster_rpc_duration_milliseconds_count", ("rpc_method", "PlaceSession")): 1,
        ("muster_heartbeats_total", None): 6,
        ("muster_heartbeat_gap_seconds_count", None): 6,
        ("muster_heartbeat_commit_milliseconds_count", None): 6,
        ("muster_watch_messages_total", None): 1,
        ("muster_watch_lag_events_count", None): 1,
        ("muster_lock_wait_milliseconds_count", None): 1,
        ("muster_lock_hold_milliseconds_count", None): 1,
        ("muster_placements_total", ("strategy", "sessions")): 1,
        ("muster_db_pool_connections", None): 1,
        ("muster_watch_streams", None): 1,
        ("muster_events_head_revision", None): 3,
    }
    for (name, label), at_least in expected.items():
        value = _total(samples, name, **({label[0]: label[1]} if label else {}))
        assert value >= at_least, (name, label, value, sorted(k for k in samples if k.startswith(name[:20])))
    # The nodes' sessions, by state (what list-nodes counts): both series are there.
    assert {k.split('state="')[1].split('"')[0] for k in samples if k.startswith("muster_node_sessions")} == {
        "placed",
        "started",
    }, sorted(k for k in samples if k.startswith("muster_node"))


async def test_json_logs_carry_the_fields_and_the_trace_id(database_url: str, tmp_path) -> None:  # noqa: ANN001
    log = tmp_path / "server.log"
    env = {
        "MUSTER_LOG_FORMAT": "json",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: spans are made, not kept
    }
    server = ServerProcess(database_url, ["registry"], env=env, log_path=log).start()
    try:
        async with Cluster.connect(server.address) as c:
            lease = await c.join_node("json.test", 8787)
    finally:
        server.stop()
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    joined = next(r for r in records if r.get("event") == "node_joined")
    assert joined["node"] == lease.node_id
    assert re.fullmatch(r"[0-9a-f]{32}", joined["trace_id"]) and re.fullmatch(r"[0-9a-f]{16}", joined["span_id"])
