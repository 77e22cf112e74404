"""The database stops, crashes and restarts: services recover by themselves and lose nothing.

These tests start a PostgreSQL of their own, even when MUSTER_TEST_DATABASE_URL is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ROOT, Recorder, comparable, registry, servers, wait_for

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb

pytestmark = pytest.mark.timeout(180)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _heartbeat_forever(address: str, node: node_pb2.Node, stop: asyncio.Event, failures: list) -> None:
    """An agent that keeps trying through an outage (every 200 ms, the configured interval)."""
    async with registry(address) as stub:
        while not stop.is_set():
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(node_id=node.id, lease_id=node.lease_id), timeout=1)
            except grpc.aio.AioRpcError as err:
                failures.append(err.code())
            await asyncio.sleep(0.2)


async def test_an_outage_longer_than_the_lease_expires_no_node_that_kept_heartbeating(own_pg) -> None:
    with servers(own_pg.url, 2) as (a, b):
        async with registry(a.address) as stub:
            nodes = [(await stub.JoinNode(pb.JoinNodeRequest(host=f"o{i}", port=1))).node for i in range(6)]
            silent = (await stub.JoinNode(pb.JoinNodeRequest(host="silent", port=1))).node
            stop, failures = asyncio.Event(), []
            beaters = [
                asyncio.create_task(_heartbeat_forever([a, b][i % 2].address, n, stop, failures))
                for i, n in enumerate(nodes)
            ]
            await asyncio.sleep(0.5)
            own_pg.stop("fast")
            await asyncio.sleep(4.0)  # lease_ttl is 1.5 s
            own_pg.start()
            try:
                await wait_for(lambda: _all_online(stub, nodes), timeout=20, what="heartbeats to succeed again")
                await asyncio.sleep(3.0)  # two more lease periods with heartbeats flowing
                listed = {n.id: n for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
            finally:
                stop.set()
                await asyncio.gather(*beaters)
        assert failures, "the heartbeats never saw the outage"
        for n in nodes:
            assert listed[n.id].state == node_pb2.Node.STATE_ONLINE, listed[n.id]
        # The credit is for the outage, not a free pass: a node that stopped heartbeating still expires.
        assert listed[silent.id].state == node_pb2.Node.STATE_OFFLINE
        con = await asyncpg.connect(own_pg.url)
        try:
            kinds = [r["kind"] for r in await con.fetch("SELECT kind FROM core.events ORDER BY revision")]
            expired = await con.fetchval(
                "SELECT count(*) FROM registry.nodes WHERE state_reason = 'LEASE_EXPIRED' AND host <> 'silent'"
            )
            credited = await con.fetchval("SELECT max(credited) FROM core.outages")
        finally:
            await con.close()
        assert "muster.api.events.v1.OutageCredited" in kinds
        assert expired == 0
        assert credited.total_seconds() >= 3.5


async def _all_online(stub, nodes) -> bool:
    listed = {n.id: n for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
    return all(listed[n.id].state == node_pb2.Node.STATE_ONLINE for n in nodes)


async def _health_log(address: str, stop: asyncio.Event, seen: list) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                r = await stub.Check(
                    health_pb2.HealthCheckRequest(service="muster.api.registry.v1.RegistryService"), timeout=1
                )
                if not seen or seen[-1] != r.status:
                    seen.append(r.status)
            await asyncio.sleep(0.05)


async def _writer(address: str, name: str, stop: asyncio.Event, log: dict) -> None:
    """Joins one node and flips its mode; records what was acknowledged and what was attempted."""
    async with registry(address) as stub:
        node = None
        i = 0
        while not stop.is_set():
            try:
                if node is None:
                    node = (await stub.JoinNode(pb.JoinNodeRequest(host=name, port=1), timeout=2)).node
                    log[name] = {"id": node.id, "acked": None, "after_ack": []}
                mode = [node_pb2.Node.MODE_DRAINING, node_pb2.Node.MODE_ACTIVE][i % 2]
                log[name]["after_ack"].append(mode)
                await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=node.id, mode=mode), timeout=2)
                log[name]["acked"], log[name]["after_ack"] = mode, []
                i += 1
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)


async def test_a_database_restart_under_load_recovers_by_itself_and_loses_no_acknowledged_write(own_pg) -> None:
    # A slow fallback poll, so that prompt delivery after the restart proves LISTEN came back.
    with servers(own_pg.url, 2, env={"MUSTER_POLL_INTERVAL": "30s"}) as (a, b):
        stop, watch_stop, health_seen, log = asyncio.Event(), asyncio.Event(), [], {}
        watcher = Recorder([b.address])
        tasks = [
            asyncio.create_task(_health_log(a.address, watch_stop, health_seen)),
            asyncio.create_task(watcher.run(watch_stop)),
        ]
        tasks += [asyncio.create_task(_writer(a.address, f"w{i}", stop, log)) for i in range(8)]
        await asyncio.sleep(1.5)
        own_pg.stop("immediate")  # a crash, not a clean stop
        await asyncio.sleep(2.0)
        own_pg.start()
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*tasks[2:])
        async with registry(a.address) as stub:
            # A change on A after the restart reaches the watcher on B without the (30 s) poll.
            target = log["w0"]["id"]
            started = time.monotonic()
            done = await stub.SetNodeMode(
                pb.SetNodeModeRequest(
                    node_id=target,
                    mode=node_pb2.Node.MODE_DRAINING
                    if log["w0"]["acked"] != node_pb2.Node.MODE_DRAINING
                    else node_pb2.Node.MODE_ACTIVE,
                    wait_for_revision=True,
                )
            )
            await wait_for(lambda: watcher.through >= done.revision, timeout=10, what="delivery after restart")
            delivery = time.monotonic() - started
            listed = {n.address: n for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
        watch_stop.set()
        await asyncio.gather(*tasks[:2])

    assert health_seen[:3] == [SERVING, NOT_SERVING, SERVING], health_seen
    assert delivery < 3, f"delivery after the restart took {delivery:.1f}s: LISTEN did not come back"
    assert len(log) == 8
    for name, entry in log.items():
        node = listed[f"{name}:1"]
        assert node.id == entry["id"]
        if name == "w0":
            continue
        allowed = {entry["acked"], *entry["after_ack"]} - {None}
        assert node.mode in allowed or (entry["acked"] is None and node.mode == node_pb2.Node.MODE_ACTIVE), (
            name,
            node.mode,
            entry,
        )
    assert watcher.revisions == sorted(set(watcher.revisions))
    assert watcher.revisions[-1] - watcher.revisions[0] + 1 == len(watcher.revisions) or watcher.resyncs
    assert {k: comparable(v) for k, v in watcher.state.items()} == {v.id: comparable(v) for v in listed.values()}


async def test_ten_migrate_processes_at_once_migrate_an_empty_database_exactly_once(pg_url: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    admin = await asyncpg.connect(urlunsplit(urlsplit(pg_url)._replace(path="/postgres")))
    name = f"muster_migrate_{os.getpid()}"
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(pg_url)._replace(path="/" + name))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env["MUSTER_DATABASE_URL"] = url
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "muster.cli.main",
                "migrate",
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(10)
        ]
        outs = [(o.decode(), e.decode()) for o, e in await asyncio.gather(*(p.communicate() for p in procs))]
        assert [p.returncode for p in procs] == [0] * 10, [o[1][-500:] for o in outs]
        appliers = [o for o, _ in outs if "applied core 0001_events" in o]
        assert len(appliers) == 1, outs
        assert sum("database is up to date" in o for o, _ in outs) == 9
        con = await asyncpg.connect(url)
        try:
            rows = await con.fetch(
                "SELECT component, version, count(*) OVER (PARTITION BY component, version) AS n FROM core.migrations"
            )
            assert {(r["component"], r["version"]) for r in rows} == {
                ("core", 1),
                ("core", 2),
                ("core", 3),
                ("registry", 1),
                ("registry", 2),
                ("registry", 3),
                ("registry", 4),
                ("locks", 1),
                ("locks", 2),
                ("locks", 3),
                ("locks", 4),
                ("keys", 1),
                ("balancer", 1),
                ("balancer", 2),
            }
            assert all(r["n"] == 1 for r in rows)
        finally:
            await con.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
