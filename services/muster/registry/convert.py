"""Domain values to protos (used by the servicer for answers and by the store for event payloads)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from muster.api.registry.v1 import node_pb2
from muster.core import timestamps
from muster.registry.models import Cluster, Load, Node


def load_to_proto(load: Load) -> node_pb2.Load:
    """A Load message."""
    return node_pb2.Load(
        load1=load.load1,
        load5=load.load5,
        load15=load.load15,
        cpu_count=load.cpu_count,
        session_count=load.session_count,
    )


def node_fields(node: Node) -> dict[str, Any]:
    """A Node message's fields (``node_pb2.Node(**f)``, or ``response.nodes.add(**f)``, which
    builds it in place: a ListNodes page of 1,000 is not copied into its response)."""
    load = node.load
    return {
        "id": node.id,
        "address": node.address,
        "host": node.host,
        "ipv4": node.ipv4,
        "port": node.port,
        "state": node.state,
        "state_reason": node.state_reason,
        "mode": node.mode,
        "health": node.health,
        "labels": node.labels,
        "lease_id": node.lease_id,
        "load": {
            "load1": load.load1,
            "load5": load.load5,
            "load15": load.load15,
            "cpu_count": load.cpu_count,
            "session_count": load.session_count,
        },
        "state_message": node.state_message,
        "state_details": node.state_details,
        "create_time": timestamps.fields(node.create_time),
        "last_seen_time": timestamps.fields(node.last_seen_time),
        "lease_expire_time": timestamps.fields(node.lease_expire_time),
    }


def node_to_proto(node: Node) -> node_pb2.Node:
    """A Node message."""
    return node_pb2.Node(**node_fields(node))


def cluster_to_proto(
    cluster: Cluster,
    *,
    max_nodes: int,
    heartbeat_interval: timedelta,
    check_in_window: timedelta,
    lease_ttl: timedelta,
) -> node_pb2.Cluster:
    """A Cluster message with the server's timing."""
    msg = node_pb2.Cluster(
        uid=cluster.uid,
        epoch=cluster.epoch,
        max_nodes=max_nodes,
        node_count=cluster.node_count,
        online_count=cluster.online_count,
    )
    msg.create_time.FromDatetime(cluster.create_time)
    msg.heartbeat_interval.FromTimedelta(heartbeat_interval)
    msg.check_in_window.FromTimedelta(check_in_window)
    msg.lease_ttl.FromTimedelta(lease_ttl)
    return msg
