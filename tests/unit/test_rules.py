"""The contract's shared rules (muster.api.rules): written once, used by both sides. No I/O beyond temp files."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from harness import ROOT

from muster.api import rules
from muster.api.balancer.v1 import balancer_pb2
from muster.api.registry.v1 import node_pb2


def test_event_kinds_come_from_the_descriptors() -> None:
    assert rules.kind_of(node_pb2.NodeJoined) == "muster.api.registry.v1.NodeJoined"
    assert rules.kind_of(balancer_pb2.SessionMoved()) == "muster.api.balancer.v1.SessionMoved"
    # The lists the client follows, as they were typed by hand before.
    assert rules.NODE_EVENT_KINDS == tuple(
        "muster.api.registry.v1." + k
        for k in (
            "NodeJoined",
            "NodeStateChanged",
            "NodeModeChanged",
            "NodeSuspected",
            "NodeRecovered",
            "NodeDeleted",
            "ClusterReset",
        )
    )
    assert rules.KEY_EVENT_KINDS == tuple(
        "muster.api.keys.v1." + k
        for k in ("KeysDefined", "KeyVersionAdded", "KeyVersionPromoted", "KeyVersionRetired", "KeysReset")
    )
    assert rules.SESSION_MOVED_KINDS == ("muster.api.balancer.v1.SessionMoved",)
    assert rules.ROUTE_EVENT_KINDS == (
        "muster.api.registry.v1.NodeJoined",
        "muster.api.registry.v1.NodeStateChanged",
        "muster.api.registry.v1.NodeDeleted",
        "muster.api.registry.v1.ClusterReset",
        "muster.api.balancer.v1.SessionMoved",
    )


def test_every_event_payload_the_protos_declare_is_known_by_kind() -> None:
    # Each payload message is introduced by a comment that opens with "Event" in its .proto.
    declared = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M).group(1)  # type: ignore[union-attr]
        for name in re.findall(r"^// Event\b[^\n]*\n(?://[^\n]*\n)*message (\w+)", text, re.M):
            declared.add(f"{package}.{name}")
    assert declared and declared == set(rules.PAYLOAD_BY_KIND)
    for kind, cls in rules.PAYLOAD_BY_KIND.items():
        assert cls.DESCRIPTOR.full_name == kind


def test_route_names_round_trip() -> None:
    assert rules.route_of(42) == "n42"
    assert rules.node_of_route("n42") == 42
    for not_a_route in ("", "n", "x42", "n-1", "n4x", "n" + "9" * 20):
        assert rules.node_of_route(not_a_route) is None


def test_client_and_server_use_the_one_rule() -> None:
    from muster.balancer import models
    from muster.cli import routes
    from muster.client import _agent as agent
    from muster.client import _models, _watch, keyfiles
    from muster.core import config
    from muster.keys import crypto

    _ = config
    for name in ("cookie_fingerprint", "public_key_fingerprint", "fingerprint_bytes", "encrypt_password"):
        assert getattr(keyfiles, name) is getattr(rules, name) is getattr(crypto, name), name
    assert crypto.decrypt_password is rules.decrypt_password
    assert keyfiles.PASSWORD_PREFIX == crypto.PASSWORD_PREFIX == rules.PASSWORD_PREFIX
    assert keyfiles.MIN_COOKIE_KEY_BYTES == crypto.MIN_COOKIE_KEY_BYTES == rules.MIN_COOKIE_KEY_BYTES
    assert models.route_of is routes.route_of is rules.route_of
    assert models.node_of_route is routes.node_of_route is rules.node_of_route
    assert _watch.NODE_EVENT_KINDS is rules.NODE_EVENT_KINDS
    assert agent.KEY_EVENT_KINDS is rules.KEY_EVENT_KINDS and agent.SESSION_MOVED_KINDS is rules.SESSION_MOVED_KINDS
    assert routes.ROUTE_EVENT_KINDS is rules.ROUTE_EVENT_KINDS
    assert _models._REGISTRY_PAYLOADS == rules.PAYLOAD_BY_KIND


def test_a_password_sealed_on_one_side_opens_on_the_other(tmp_path: Path) -> None:
    from muster.client import keyfiles
    from muster.keys import crypto

    key = os.urandom(32)
    path = tmp_path / "secure-cookie-key"
    keyfiles.write_key_file(path, key)
    text = rules.encrypt_password("pw", key)
    assert keyfiles.decrypt_password(text, path) == "pw"
    assert crypto.decrypt_password_with_files(text, path) == "pw"
    assert rules.decrypt_password(text, rules.cookie_key_candidates(path)) == "pw"
    assert rules.is_encrypted_password(text) and not rules.is_encrypted_password("plain")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_server_module_imports_a_private_client_module() -> None:
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["muster", "client"] and len(parts) > 2 and parts[2].startswith("_"):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders


def test_the_rules_import_nothing_of_ours_outside_the_contract() -> None:
    ours = {n for n in _imports(ROOT / "protos" / "muster" / "api" / "rules.py") if n.startswith("muster")}
    assert ours and all(n.startswith("muster.api") for n in ours), ours
