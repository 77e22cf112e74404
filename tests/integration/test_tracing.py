"""Tracing end to end: an agent's join is one trace — agent → registry → keys → PostgreSQL — received
over OTLP by a real receiver built on the official OTLP service definitions (what Jaeger's OTLP port
speaks), with every span correctly parented."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import grpc
from agents import AgentProcess
from harness import ServerProcess, wait_for
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from muster.client import keyfiles


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span as (service, name, trace id, span id, parent id, attributes)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []

    async def Export(self, request, context):  # noqa: ANN001, ANN201, N802
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        {
                            "service": service,
                            "name": s.name,
                            "trace": s.trace_id.hex(),
                            "id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "attrs": {a.key: a.value for a in s.attributes},
                        }
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_an_agents_join_is_one_trace_through_registry_keys_and_postgres(
    database_url: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    master = {"MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    keys = ServerProcess(database_url, ["keys"], env={**master, **otel, "OTEL_SERVICE_NAME": "muster-keys"}).start()
    registry = ServerProcess(
        database_url,
        ["registry"],
        env={**otel, "OTEL_SERVICE_NAME": "muster-registry", "MUSTER_KEYS_ADDRESS": keys.address},
    ).start()
    keyfiles.generate_keys(tmp_path / "keys")  # the agent holds keys, so the registry has them checked
    agent = AgentProcess(
        [registry.address],
        args=["--keys-dir", str(tmp_path / "keys")],
        env={**otel, "OTEL_SERVICE_NAME": "muster-agent", "MUSTER_KEYS_ADDRESS": keys.address},
    )
    try:
        agent.start()
        await agent.line(r"^muster agent: keys ", 30)
        agent.stop()  # flushes its spans

        def joined_trace() -> list[dict] | None:
            roots = [s for s in receiver.spans if s["name"] == "muster.agent.join"]
            for root in roots:
                spans = [s for s in receiver.spans if s["trace"] == root["trace"]]
                if {"muster-agent", "muster-registry", "muster-keys"} <= {s["service"] for s in spans}:
                    return spans
            return None

        await wait_for(lambda: joined_trace() is not None, timeout=20, what="the join's trace")
        await asyncio.sleep(0.5)  # the last SQL spans of the batch
        spans = joined_trace()
        assert spans is not None
    finally:
        agent.stop()
        registry.stop()
        keys.stop()
        await server.stop(None)

    by_id = {s["id"]: s for s in spans}

    def parent(span: dict) -> dict | None:
        return by_id.get(span["parent"])

    root = next(s for s in spans if s["name"] == "muster.agent.join")
    assert root["parent"] == "" and root["service"] == "muster-agent"
    client = next(s for s in spans if s["service"] == "muster-agent" and s["name"] == "JoinNode")
    assert parent(client) is root
    join = next(s for s in spans if s["name"] == "muster.api.registry.v1.RegistryService/JoinNode")
    assert join["service"] == "muster-registry" and parent(join) is client
    assert join["attrs"]["muster.node_id"].int_value == agent.node_id
    verify = next(s for s in spans if s["name"] == "muster.api.keys.v1.KeysService/VerifyKeys")
    assert verify["service"] == "muster-keys" and parent(verify) is join
    sql = [s for s in spans if "db.system" in s["attrs"]]
    assert any(parent(s) is join for s in sql), "the registry's SQL is under its JoinNode span"
    assert any(parent(s) is verify for s in sql), "the keys service's SQL is under its VerifyKeys span"
    # No span carries a key or a token (the attributes are method names, ids and SQL text).
    for s in receiver.spans:
        for value in s["attrs"].values():
            assert "BEGIN RSA PRIVATE KEY" not in str(value) and "Bearer" not in str(value)
