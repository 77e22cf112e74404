"""Domain values to protos (used by the servicer for answers and by the store for event payloads)."""

from __future__ import annotations

from datetime import timedelta

from muster.api.registry.v1 import node_pb2
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


def node_to_proto(node: Node) -> node_pb2.Node:
    """A Node message."""
    msg = node_pb2.Node(
        id=node.id,
        address=node.address,
        host=node.host,
        ipv4=node.ipv4,
        port=node.port,
        state=int(node.state),
        state_reason=node.state_reason,
        mode=int(node.mode),
        health=int(node.health),
        labels=node.labels,
        lease_id=node.lease_id,
        load=load_to_proto(node.load),
        state_message=node.state_message,
        state_details=node.state_details,
    )
    msg.create_time.FromDatetime(node.create_time)
    msg.last_seen_time.FromDatetime(node.last_seen_time)
    msg.lease_expire_time.FromDatetime(node.lease_expire_time)
    return msg


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
