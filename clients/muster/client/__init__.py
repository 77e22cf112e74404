"""muster.client: the thin client every application node embeds.

::

    async with Cluster.connect("127.0.0.1:7400") as cluster:
        lease = await cluster.join_node("app1.example.com", 8787)
        async with cluster.view() as view:          # snapshot first, then every change, exactly once
            print(view.nodes)

The base install carries nothing of the server. See also :class:`SyncCluster` for code that is not
asyncio, and :mod:`muster.client.errors` for the exceptions.
"""

from muster.client import errors
from muster.client._address import ResolvedAddress, resolve_node_address
from muster.client._agent import Agent, AgentConfig
from muster.client._balancer import Candidate, ClusterStatus, Excluded, NodeSessions, Placement, Session
from muster.client._cluster import Cluster, KeepAlive
from muster.client._config import ClientConfig
from muster.client._keys import KeyFingerprints
from muster.client._locks import Firing, HeldLock, LeaseState, LockLease, LockMode
from muster.client._models import Cluster as ClusterInfo
from muster.client._models import (
    Event,
    Health,
    Heartbeat,
    Lease,
    Load,
    Node,
    NodeList,
    NodeLoad,
    NodeMode,
    NodeState,
    NodeStatus,
    Progress,
    Resync,
)
from muster.client._scheduler import Scheduler
from muster.client._sync import SyncCluster, SyncClusterView, SyncWatch
from muster.client._watch import ClusterView, ConnectionState, NodeChange, Watch, apply_to_nodes
from muster.client.errors import AddressNotFoundError, LocalKeyFileError, LockLostError, MusterError

__all__ = [
    "AddressNotFoundError",
    "Firing",
    "HeldLock",
    "KeyFingerprints",
    "LeaseState",
    "LocalKeyFileError",
    "LockLease",
    "LockLostError",
    "LockMode",
    "Scheduler",
    "Candidate",
    "ClusterStatus",
    "Excluded",
    "NodeSessions",
    "Placement",
    "Session",
    "Agent",
    "AgentConfig",
    "ClientConfig",
    "Cluster",
    "ClusterInfo",
    "ClusterView",
    "ConnectionState",
    "Event",
    "Health",
    "Heartbeat",
    "KeepAlive",
    "Lease",
    "Load",
    "MusterError",
    "Node",
    "NodeChange",
    "NodeList",
    "NodeLoad",
    "NodeMode",
    "NodeState",
    "NodeStatus",
    "Progress",
    "ResolvedAddress",
    "Resync",
    "SyncCluster",
    "SyncClusterView",
    "SyncWatch",
    "Watch",
    "apply_to_nodes",
    "errors",
    "resolve_node_address",
]
