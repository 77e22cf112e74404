"""The registry's domain errors."""

from __future__ import annotations

from muster.core.errors import AbortedError, FailedPreconditionError, NotFoundError
from muster.registry.models import Refusal

DOMAIN = "muster.registry"


class NodeNotFoundError(NotFoundError):
    """No node has this id."""

    reason = "NODE_NOT_FOUND"

    def __init__(self, node_id: int) -> None:
        super().__init__(
            f"node {node_id} does not exist; `muster list-nodes` shows the nodes", domain=DOMAIN, node=node_id
        )


class StaleLeaseError(FailedPreconditionError):
    """The lease id is not the node's current incarnation."""

    reason = "STALE_LEASE"

    def __init__(self, node_id: int, lease_id: int) -> None:
        super().__init__(
            f"lease {lease_id} of node {node_id} was replaced by a newer join; join again",
            domain=DOMAIN,
            node=node_id,
            lease=lease_id,
        )


class LeaseExpiredError(FailedPreconditionError):
    """The node is no longer ONLINE (its lease expired, or it left): it must join again."""

    reason = "LEASE_EXPIRED"

    def __init__(self, node_id: int, state: str, state_reason: str) -> None:
        super().__init__(
            f"node {node_id} is {state} ({state_reason}); join again",
            domain=DOMAIN,
            node=node_id,
            state=state,
            state_reason=state_reason,
        )


class NodeLimitReachedError(FailedPreconditionError):
    """The cluster's node limit is reached."""

    reason = "NODE_LIMIT_REACHED"

    def __init__(self, node_id: int, max_nodes: int) -> None:
        super().__init__(
            f"the cluster allows {max_nodes} nodes and has them; delete a node or raise max_nodes",
            domain=DOMAIN,
            node=node_id,
            max_nodes=max_nodes,
        )


class NodeKeysRefusedError(FailedPreconditionError):
    """A joining node's keys differ from the cluster's, or its key files cannot be used.

    The reason is the node's state (INVALID_SECURE_COOKIE_KEY, INVALID_LAUNCHER_KEY,
    INVALID_KEY_PERMISSIONS, ERROR_READING_LAUNCHER_KEY); the metadata names the fingerprints, the
    file and mode found, and the command that fixes it.
    """

    def __init__(self, node_id: int, refusal: Refusal) -> None:
        self.reason = refusal.state.name
        details = {k: v for k, v in refusal.details.items() if k not in ("node", "domain")}
        super().__init__(refusal.message, domain=DOMAIN, node=node_id, **details)


class NodeHasSessionsError(FailedPreconditionError):
    """Deleting an ONLINE node with sessions needs force."""

    reason = "NODE_HAS_SESSIONS"

    def __init__(self, node_id: int, sessions: int) -> None:
        super().__init__(
            f"node {node_id} is ONLINE with {sessions} session{'' if sessions == 1 else 's'}; "
            f"drain it first (`muster offline {node_id}`: it keeps its sessions and gets no new ones), "
            "or delete with --force to move them to other nodes (ending those no node can take)",
            domain=DOMAIN,
            node=node_id,
            sessions=sessions,
        )


class NodeStateError(FailedPreconditionError):
    """The node's state does not allow the operation."""

    reason = "NODE_STATE"

    def __init__(self, node_id: int, state: str, what: str) -> None:
        super().__init__(f"node {node_id} is {state}: {what}", domain=DOMAIN, node=node_id, state=state)


class NodeDeletingError(AbortedError):
    """A join raced an operator's delete: the row is DELETING until the removal commits."""

    reason = "NODE_DELETING"

    def __init__(self, node_id: int) -> None:
        super().__init__(
            f"node {node_id} is being deleted; join again in a moment (it gets a new id)",
            domain=DOMAIN,
            node=node_id,
        )
