"""The deployment files in deploy/, validated offline, and the image's entry points run outside a container.

- Kubernetes: the kustomize base and the Istio and Linkerd overlays are rendered here, in Python (the
  resources a kustomization lists, then its patches: strategic merge or JSON 6902, only what the
  overlays use; anything else in a kustomization fails the test). Where `kubectl` is installed its
  `kubectl kustomize` output must equal ours. Every built-in kind is validated by
  `kubernetes-validate --strict` (a "Couldn't find schema" warning is a failure, and the number of
  resources that passed is counted); every mesh resource, and the CloudNativePG Cluster and Pooler of
  deploy/k8s/examples/cloudnative-pg.yaml, is validated with `jsonschema` against the
  openAPIV3Schema of its real CRD (tests/deploy_schemas/, see the README there), made strict the way
  the API server treats it: unknown fields are errors, `nullable` allows null, and the CEL rules on
  the fields we set are evaluated. Then the shape: gRPC probes on each service's health name,
  resources, a non-root read-only security context, Services, PodDisruptionBudgets, NetworkPolicies,
  secrets by reference only, retries only on idempotent methods (derived from the protos' methods).
- Each server's environment (compose and Kubernetes) is loaded with the real settings loader: no
  unknown MUSTER_* variable, the addresses wired as intended, authentication the server accepts. Each
  agent's command line and environment go through the real `muster agent` command.
- Compose: check-jsonschema's built-in compose schema, and every service, host and volume it names.
- The Dockerfile: a non-root USER, ENTRYPOINT ["muster"], and its build stage replayed outside a
  container (a wheel built from exactly the files it copies) when hatchling is installed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from muster.api.balancer.v1 import balancer_service_pb2
from muster.api.keys.v1 import keys_service_pb2
from muster.api.locks.v1 import locks_service_pb2
from muster.api.registry.v1 import registry_service_pb2

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = ROOT / "tests" / "deploy_schemas"
RENDERS = {"base": K8S / "base", "istio": K8S / "overlays" / "istio", "linkerd": K8S / "overlays" / "linkerd"}
EXAMPLE = K8S / "examples" / "application-with-agent.yaml"
CNPG_EXAMPLE = K8S / "examples" / "cloudnative-pg.yaml"
NAMESPACE = "muster"
GRPC_PORT = 7400
GRACE_PERIOD_SECONDS = 10  # MUSTER_GRACE_PERIOD's default: pods must be given longer to stop

DESCRIPTORS = {
    "registry": registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    "keys": keys_service_pb2.DESCRIPTOR.services_by_name["KeysService"],
    "balancer": balancer_service_pb2.DESCRIPTOR.services_by_name["BalancerService"],
    "locks": locks_service_pb2.DESCRIPTOR.services_by_name["LocksService"],
}
HEALTH_NAMES = {svc: d.full_name for svc, d in DESCRIPTORS.items()}
# Reads and idempotent calls: the only methods a mesh may retry.
IDEMPOTENT = {
    "registry": {"GetNode", "ListNodes", "GetCluster", "GetNodeStatus", "ListNodeLoads", "Heartbeat"},
    "keys": {"VerifyKeys", "FetchKeys", "GetKeyStatus"},
    "balancer": {"ListSessions", "RouteSession", "GetStatus", "CountSessions"},
    "locks": {"ListLocks", "ValidateFence", "ListJobs"},
}
SECRETS = {"muster-database", "muster-tokens", "muster-master-key"}
SECRET_ENV = {
    "MUSTER_DATABASE_URL",
    "MUSTER_DATABASE_DIRECT_URL",
    "MUSTER_DATABASE_PASSWORD",
    "MUSTER_NODE_TOKEN",
    "MUSTER_ADMIN_TOKEN",
    "MUSTER_TOKEN",
    "MUSTER_MASTER_KEY",
}
MESH_KINDS = {"PeerAuthentication", "DestinationRule", "VirtualService", "ServiceProfile"}
CNPG_KINDS = {"Cluster", "Pooler"}  # CloudNativePG (postgresql.cnpg.io), in the example only
CRD_KINDS = MESH_KINDS | CNPG_KINDS  # validated against their stored CRDs, not by kubernetes-validate
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io"}
# Expected renders: (kinds and counts) — a resource that silently disappears fails here.
EXPECTED_KINDS = {
    "base": {
        "Namespace": 1,
        "ConfigMap": 1,
        "ServiceAccount": 5,
        "Deployment": 4,
        "Service": 4,
        "PodDisruptionBudget": 4,
        "Job": 1,
        "NetworkPolicy": 3,
    },
}
EXPECTED_KINDS["istio"] = {**EXPECTED_KINDS["base"], "PeerAuthentication": 1, "DestinationRule": 4, "VirtualService": 4}
EXPECTED_KINDS["linkerd"] = {**EXPECTED_KINDS["base"], "NetworkPolicy": 4, "ServiceProfile": 4}


def method_path(svc: str, method: str) -> str:
    """The gRPC path of a method: /muster.api.<svc>.v1.<Service>/<Method>."""
    return f"/{DESCRIPTORS[svc].full_name}/{method}"


def methods(svc: str) -> Iterator[tuple[str, bool]]:
    """Every method of a service with whether it streams (either way)."""
    for m in DESCRIPTORS[svc].methods:
        yield m.name, bool(m.client_streaming or m.server_streaming)


# --- rendering kustomize in Python -----------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}
PATCH_KEYS = {"path", "patch", "target"}
TARGET_KEYS = {"group", "version", "kind", "name", "namespace", "labelSelector"}
# Strategic merge: lists merged by key (the rest are replaced), as Kubernetes' patchMergeKey says.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def load_docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file, empty ones skipped."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def group_of(doc: dict[str, Any]) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def identity(doc: dict[str, Any]) -> tuple[str, str, str, str]:
    return (group_of(doc), doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """A strategic-merge patch: maps merge, null deletes, keyed lists merge by key, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        assert not any(k.startswith("$") for k in patch), f"directive {patch} is not implemented by this renderer"
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            found = next((i for i, b in enumerate(out_list) if b.get(merge_key) == item.get(merge_key)), None)
            if found is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[found] = strategic_merge(out_list[found], item)
        return out_list
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON 6902 patch (add, remove, replace, test)."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            index: Any = int(last) if isinstance(node, list) else last
            assert index in range(len(node)) if isinstance(node, list) else index in node, op
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif kind == "test":
            assert (node[int(last)] if isinstance(node, list) else node[last]) == op["value"], op
        else:
            raise AssertionError(f"JSON 6902 op {kind!r} is not implemented by this renderer")
    return out


def _labels_match(labels: dict[str, str], selector: str) -> bool:
    for term in selector.split(","):
        key, sep, value = term.strip().partition("=")
        assert sep and "!" not in key, f"only key=value label selectors are implemented: {selector!r}"
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def _targets(docs: list[dict[str, Any]], target: dict[str, Any] | None, body: Any) -> list[int]:
    if target is None:
        assert isinstance(body, dict), "a JSON 6902 patch needs a target"
        meta = body["metadata"]
        return [
            i
            for i, d in enumerate(docs)
            if d["apiVersion"] == body["apiVersion"]
            and d["kind"] == body["kind"]
            and d["metadata"]["name"] == meta["name"]
            and d["metadata"].get("namespace", "") == meta.get("namespace", "")
        ]
    assert set(target) <= TARGET_KEYS, f"target fields {set(target) - TARGET_KEYS} are not implemented"
    found = []
    for i, d in enumerate(docs):
        meta = d["metadata"]
        if "kind" in target and d["kind"] != target["kind"]:
            continue
        if "group" in target and group_of(d) != target["group"]:
            continue
        if "version" in target and d["apiVersion"].split("/")[-1] != target["version"]:
            continue
        if "name" in target and not re.fullmatch(target["name"], meta["name"]):
            continue
        if "namespace" in target and meta.get("namespace", "") != target["namespace"]:
            continue
        if "labelSelector" in target and not _labels_match(meta.get("labels") or {}, target["labelSelector"]):
            continue
        found.append(i)
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize <directory>` produces, for the features our kustomizations use."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization" and k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: this renderer does not implement {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    for patch in k.get("patches", []):
        assert set(patch) <= PATCH_KEYS, f"patch fields {set(patch) - PATCH_KEYS} are not implemented"
        body = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch else patch["patch"])
        targets = _targets(docs, patch.get("target"), body)
        assert targets, f"{directory}: patch {patch} matches no resource"
        for i in targets:
            if isinstance(body, list):
                docs[i] = json6902(docs[i], body)
            else:
                smp = copy.deepcopy(body)
                if patch.get("target") is not None:
                    # Applied to every target: the patch's own name and namespace do not count.
                    smp.get("metadata", {}).pop("name", None)
                    smp.get("metadata", {}).pop("namespace", None)
                assert (smp["apiVersion"], smp["kind"]) == (docs[i]["apiVersion"], docs[i]["kind"]), patch
                docs[i] = strategic_merge(docs[i], smp)
    ids = [identity(d) for d in docs]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate resources"
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in RENDERS.items()}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        value, op = labels.get(expr["key"]), expr["operator"]
        ok = {
            "In": value in expr.get("values", []),
            "NotIn": value not in expr.get("values", []),
            "Exists": expr["key"] in labels,
            "DoesNotExist": expr["key"] not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_renderer_applies_patches_and_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    base = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "n"}, "data": {"x": "1"}}
    assert json6902(base, [{"op": "add", "path": "/data/y", "value": "2"}])["data"] == {"x": "1", "y": "2"}
    pod = {"spec": {"containers": [{"name": "c", "env": [{"name": "A", "value": "1"}]}]}}
    patch = {"spec": {"containers": [{"name": "c", "env": [{"name": "B", "value": "2"}]}]}}
    env = strategic_merge(pod, patch)["spec"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert strategic_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": None}}) == {"a": {"b": 1}}
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\nnamePrefix: x-\n"
    )
    with pytest.raises(AssertionError, match="does not implement"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n"
        "patches:\n  - patch: '[{op: add, path: /data/z, value: \"3\"}]'\n    target: {kind: ConfigMap, name: nope}\n"
    )
    with pytest.raises(AssertionError, match="matches no resource"):
        render(tmp_path)


def test_renders_hold_the_expected_resources(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        counts: dict[str, int] = {}
        for d in docs:
            counts[d["kind"]] = counts.get(d["kind"], 0) + 1
        assert counts == EXPECTED_KINDS[name], name
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == NAMESPACE, identity(d)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: our render is not compared")
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_render_equals_kubectl_kustomize(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(RENDERS[name])], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    theirs = {identity(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {identity(d): d for d in rendered[name]}
    assert sorted(theirs) == sorted(ours)
    for key, doc in ours.items():
        assert theirs[key] == doc, key


# --- built-in kinds: kubernetes-validate --strict -------------------------------------------------


def kubernetes_versions() -> list[str]:
    from kubernetes_validate import utils

    # Native sidecars (the agent example) and gRPC probes need 1.29+; also the newest schemas known.
    return ["1.30.0", utils.latest_version()]


def kubernetes_validate(docs: list[dict[str, Any]], directory: Path) -> tuple[int, list[str]]:
    """Runs `kubernetes-validate --strict` on the documents; returns how many passed and every other line."""
    path = directory / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in kubernetes_versions():
        cmd += ["-k", version]
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    passed = [line for line in lines if line.startswith("INFO ") and " passed for resource " in line]
    others = [line for line in lines if line not in passed]
    if out.returncode != 0 and not others:
        others.append(f"exit status {out.returncode}")
    return len(passed), others


def builtin(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    for d in core:
        assert group_of(d) in BUILTIN_GROUPS, f"{identity(d)} is neither a built-in kind nor one of a stored CRD"
    return core


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_builtin_kinds_validate_strictly(name: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    core = builtin(rendered[name])
    passed, others = kubernetes_validate(core, tmp_path)
    assert others == []
    assert passed == len(core) * len(kubernetes_versions()) and len(core) >= sum(EXPECTED_KINDS["base"].values())


def test_agent_example_validates_strictly(tmp_path: Path) -> None:
    docs = load_docs(EXAMPLE)
    passed, others = kubernetes_validate(builtin(docs), tmp_path)
    assert others == [] and passed == len(docs) * len(kubernetes_versions()) and len(docs) == 1


def test_kubernetes_validate_failures_are_seen(tmp_path: Path) -> None:
    """The wrapper reports an unknown field, and an unknown kind (which the tool only warns about)."""
    docs = load_docs(K8S / "base" / "registry.yaml")
    bad = copy.deepcopy(docs[0])
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    passed, others = kubernetes_validate([bad], tmp_path)
    assert passed == 0 and any(line.startswith("ERROR") for line in others)
    mesh = load_docs(K8S / "overlays" / "istio" / "peer-authentication.yaml")
    passed, others = kubernetes_validate(mesh, tmp_path)
    assert passed == 0 and any("Couldn't find schema" in line for line in others)


# --- mesh resources: their real CRDs' openAPIV3Schema ------------------------------------------------

CHECKSUMS = SCHEMAS / "SHA256SUMS"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_seconds(text: str) -> float:
    """A Go duration (`10s`, `1m30s`, `500ms`) in seconds."""
    parts = _DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _squash(rule: str) -> str:
    return " ".join(rule.split())


# The CEL rules (x-kubernetes-validations) on fields our resources set, evaluated here. A rule on a
# set field that is not in this table fails the test, so none is skipped silently.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    _squash("duration(self) >= duration('1ms')"): lambda v: duration_seconds(v) >= 1e-3,
    _squash(
        "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels))"
        " ? self.selector.matchLabels : {}).size() > 0) : true"
    ): lambda v: "portLevelMtls" not in v or bool((v.get("selector") or {}).get("matchLabels")),
    # CloudNativePG's Cluster: spec, spec.postgresql.synchronous and its `number`. In CEL an absent
    # field in `self.dataDurability != 'preferred'` is an error that `|| true` absorbs, as here.
    _squash("!(has(self.imageCatalogRef) && has(self.imageName))"): lambda v: (
        not ("imageCatalogRef" in v and "imageName" in v)
    ),
    _squash("self > 0"): lambda v: v > 0,
    # The Cluster's bootstrap.initdb and the Pooler's pgbouncer.
    **{
        f"!has(self.{field}) || self.localeProvider == '{provider}'": (
            lambda v, field=field, provider=provider: field not in v or v.get("localeProvider") == provider
        )
        for field, provider in (("builtinLocale", "builtin"), ("icuLocale", "icu"), ("icuRules", "icu"))
    },
    _squash("!(has(self.image) && has(self.imageCatalogRef))"): lambda v: not ("image" in v and "imageCatalogRef" in v),
    _squash(
        "self.dataDurability!='preferred' || ((!has(self.standbyNamesPre) || self.standbyNamesPre.size()==0)"
        " && (!has(self.standbyNamesPost) || self.standbyNamesPost.size()==0))"
    ): lambda v: (
        v.get("dataDurability") != "preferred" or (not v.get("standbyNamesPre") and not v.get("standbyNamesPost"))
    ),
}


_CRDS: dict[tuple[str, str], dict[str, Any]] = {}


def load_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """The stored CRDs by (group, kind); Helm template lines (only in Linkerd's metadata) are dropped.
    Parsed once (CloudNativePG's are 1.1 MB); callers must not modify them."""
    if not _CRDS:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        for path in sorted(SCHEMAS.glob("*/*.yaml")):
            text = "\n".join(line for line in path.read_text().splitlines() if "{{" not in line)
            doc = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader, C or Python
            assert doc["kind"] == "CustomResourceDefinition", path
            _CRDS[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return _CRDS


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema as JSON Schema the way the API server applies it: fields a structural
    schema does not declare are errors (kubectl's default strict field validation), unless the
    node preserves unknown fields; `nullable` admits null."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("oneOf", "anyOf", "allOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(crds: dict[tuple[str, str], dict[str, Any]], doc: dict[str, Any]) -> dict[str, Any]:
    """The schema a mesh resource is validated against: its CRD version's, with the object's own fields."""
    group, version = doc["apiVersion"].split("/")
    crd = crds[(group, doc["kind"])]
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions and versions[version]["served"], f"{doc['apiVersion']} is not served by its CRD"
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    dns_subdomain = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    schema["properties"] = {
        "apiVersion": {"const": doc["apiVersion"]},
        "kind": {"const": doc["kind"]},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": dns_subdomain, "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": string_map,
                "annotations": string_map,
            },
            "additionalProperties": False,
        },
        **schema["properties"],
    }
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    return schema


def cel_problems(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if re.search(r"\boldSelf\b", rule["rule"]):
            continue  # a transition rule (`self == oldSelf`: immutable): the API server checks it on update only
        check = CEL_RULES.get(_squash(rule["rule"]))
        if check is None:
            problems.append(f"{path or '/'}: CEL rule not evaluated by this test: {rule['rule']!r}")
        elif not check(value):
            problems.append(f"{path or '/'}: {rule['message']}")
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                problems += cel_problems(sub, v, f"{path}/{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            problems += cel_problems(schema["items"], v, f"{path}/{i}")
    return problems


def crd_problems(crds: dict[tuple[str, str], dict[str, Any]], doc: dict[str, Any]) -> list[str]:
    schema = crd_schema(crds, doc)
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + cel_problems(schema, doc)


def test_stored_crds_are_the_ones_described(tmp_path: Path) -> None:
    """The CRDs under tests/deploy_schemas/ are byte for byte the ones its README names."""
    listed = {}
    for line in CHECKSUMS.read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    stored = {str(p.relative_to(SCHEMAS)): p for p in SCHEMAS.glob("*/*.yaml")}
    assert sorted(stored) == sorted(listed)
    for name, path in stored.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[name], name
    assert sorted(load_crds()) == sorted(
        [
            ("networking.istio.io", "DestinationRule"),
            ("networking.istio.io", "VirtualService"),
            ("security.istio.io", "PeerAuthentication"),
            ("linkerd.io", "ServiceProfile"),
            ("postgresql.cnpg.io", "Cluster"),
            ("postgresql.cnpg.io", "Pooler"),
        ]
    )


@pytest.mark.parametrize(("name", "expected"), [("istio", 9), ("linkerd", 4), ("base", 0)])
def test_mesh_resources_validate_against_their_crds(
    name: str, expected: int, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    crds = load_crds()
    mesh = [d for d in rendered[name] if d["kind"] in MESH_KINDS]
    assert len(mesh) == expected
    problems = {identity(d): crd_problems(crds, d) for d in mesh}
    assert {k: v for k, v in problems.items() if v} == {}


def test_mesh_validation_rejects_what_the_api_server_would(rendered: dict[str, list[dict[str, Any]]]) -> None:
    crds = load_crds()
    docs = {d["kind"]: d for d in rendered["istio"] + rendered["linkerd"] if d["kind"] in MESH_KINDS}
    cases: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
        ("VirtualService", lambda d: d["spec"]["http"][0]["retries"].update(attempt=3), "Additional properties"),
        ("VirtualService", lambda d: d["spec"]["http"][0].update(timeout="0s"), "valid duration"),
        ("VirtualService", lambda d: d["spec"]["http"][0]["match"][0]["uri"].update(exact="/x"), "valid under"),
        ("PeerAuthentication", lambda d: d["spec"]["mtls"].update(mode="STRICTER"), "is not one of"),
        ("DestinationRule", lambda d: d["spec"].pop("host"), "'host' is a required property"),
        ("ServiceProfile", lambda d: d["spec"]["routes"][0].pop("condition"), "'condition' is a required"),
        ("ServiceProfile", lambda d: d["spec"]["routes"][0].update(isRetryable="yes"), "is not of type"),
    ]
    for kind, spoil, message in cases:
        doc = copy.deepcopy(docs[kind])
        assert crd_problems(crds, doc) == []
        spoil(doc)
        problems = crd_problems(crds, doc)
        assert any(message in p for p in problems), (kind, message, problems)


# --- CloudNativePG: the example's Cluster and Pooler against their real CRDs -----------------------


def cnpg_example() -> dict[str, list[dict[str, Any]]]:
    docs = load_docs(CNPG_EXAMPLE)
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def test_cloudnative_pg_example_validates_against_its_crds() -> None:
    crds = load_crds()
    docs = load_docs(CNPG_EXAMPLE)
    cnpg = [d for d in docs if d["kind"] in CNPG_KINDS]
    assert sorted(d["kind"] for d in cnpg) == ["Cluster", "Pooler"]
    for d in cnpg:
        assert d["apiVersion"] == "postgresql.cnpg.io/v1", identity(d)
    problems = {identity(d): crd_problems(crds, d) for d in cnpg}
    assert {k: v for k, v in problems.items() if v} == {}


def test_cloudnative_pg_example_builtin_kinds_validate_strictly(tmp_path: Path) -> None:
    core = builtin(load_docs(CNPG_EXAMPLE))
    passed, others = kubernetes_validate(core, tmp_path)
    assert (
        others == [] and passed == len(core) * len(kubernetes_versions()) and [d["kind"] for d in core] == ["Namespace"]
    )


def test_cnpg_validation_rejects_what_the_api_server_would() -> None:
    crds = load_crds()
    docs = {kind: found[0] for kind, found in cnpg_example().items()}

    def sync(d: dict[str, Any]) -> dict[str, Any]:
        return d["spec"]["postgresql"]["synchronous"]

    cases: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
        ("Cluster", lambda d: d["spec"].update(instance=3), "Additional properties"),
        ("Cluster", lambda d: d["spec"].pop("instances"), "'instances' is a required property"),
        ("Cluster", lambda d: sync(d).update(number=0), "The number of synchronous replicas should be greater"),
        ("Cluster", lambda d: sync(d).pop("method"), "'method' is a required property"),
        ("Cluster", lambda d: sync(d).update(method="all"), "is not one of"),
        (
            "Cluster",
            lambda d: sync(d).update(dataDurability="preferred", standbyNamesPre=["x"]),
            "dataDurability set to 'preferred' requires empty",
        ),
        ("Cluster", lambda d: d["spec"].update(imageCatalogRef={}, imageName="pg:17"), "mutually exclusive"),
        ("Cluster", lambda d: d["spec"]["postgresql"]["parameters"].update(max_connections=300), "is not of type"),
        ("Cluster", lambda d: d["spec"]["bootstrap"]["initdb"].update(databases=["muster"]), "Additional properties"),
        ("Cluster", lambda d: d["spec"]["bootstrap"]["initdb"].update(icuLocale="en"), "icuLocale is only available"),
        ("Pooler", lambda d: d["spec"]["pgbouncer"].update(poolMode="statement"), "is not one of"),
        (
            "Pooler",
            lambda d: d["spec"]["pgbouncer"].update(image="pgbouncer:1", imageCatalogRef={}),
            "mutually exclusive",
        ),
        ("Pooler", lambda d: d["spec"].update(type="primary"), "is not one of"),
        ("Pooler", lambda d: d["spec"].pop("cluster"), "'cluster' is a required property"),
        ("Pooler", lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required"),
    ]
    for kind, spoil, message in cases:
        doc = copy.deepcopy(docs[kind])
        assert crd_problems(crds, doc) == []
        spoil(doc)
        problems = crd_problems(crds, doc)
        assert any(message in p for p in problems), (kind, message, problems)


_EXAMPLE_KEY = re.compile(r"^#\s+(url|direct-url|pooled)\s+(\S+)", re.MULTILINE)


def test_cloudnative_pg_example_is_wired(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    """Three instances with synchronous replication, the Pooler in transaction mode in front of the
    primary, and the Secret the example's comments describe loads into settings that send the pool to
    the Pooler and LISTEN and migrations to the -rw Service."""
    from muster.core.config import database_direct_dsn, database_dsn

    found = cnpg_example()
    [cluster], [pooler] = found["Cluster"], found["Pooler"]
    spec = cluster["spec"]
    namespace = cluster["metadata"]["namespace"]
    assert spec["instances"] >= 3 and spec["affinity"]["enablePodAntiAffinity"] is True
    synchronous = spec["postgresql"]["synchronous"]
    assert synchronous["number"] >= 1 and synchronous["dataDurability"] == "required"
    assert synchronous["number"] < spec["instances"], "a standby more than those a commit waits for"
    assert spec["postgresql"]["parameters"].get("synchronous_commit", "on") in ("on", "remote_apply")
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] == initdb["owner"] == "muster" and initdb["secret"]["name"]
    assert any("idle_in_transaction_session_timeout" in q for q in initdb["postInitApplicationSQL"])
    for what in ("cpu", "memory"):
        assert quantity(spec["resources"]["requests"][what]) > 0
    assert (
        pooler["metadata"]["namespace"] == namespace
        and pooler["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    )
    assert pooler["spec"]["type"] == "rw" and pooler["spec"]["pgbouncer"]["poolMode"] == "transaction"
    assert pooler["spec"]["instances"] >= 2
    [bouncer] = pooler["spec"]["template"]["spec"]["containers"]
    assert bouncer["name"] == "pgbouncer" and quantity(bouncer["resources"]["requests"]["memory"]) > 0

    keys = dict(_EXAMPLE_KEY.findall(CNPG_EXAMPLE.read_text()))
    assert sorted(keys) == ["direct-url", "pooled", "url"], keys
    password = secrets.token_hex(24)
    env = {
        "MUSTER_DATABASE_URL": keys["url"].replace("PASSWORD", password),
        "MUSTER_DATABASE_DIRECT_URL": keys["direct-url"].replace("PASSWORD", password),
        "MUSTER_DATABASE_POOLED": keys["pooled"],
    }
    settings = load_server_settings(env, monkeypatch, caplog)
    assert settings.database_pooled is True
    pooled, direct = database_dsn(settings), database_direct_dsn(settings)
    assert f"@{pooler['metadata']['name']}.{namespace}.svc:5432/muster" in pooled
    assert f"@{cluster['metadata']['name']}-rw.{namespace}.svc:5432/muster?" in direct
    assert "target_session_attrs=read-write" in direct and password in direct
    readme = (DEPLOY / "README.md").read_text()
    for key in ("url", "direct-url"):
        assert f'--from-literal={key}="{keys[key].replace("PASSWORD", "$PASSWORD")}"' in readme, key
    # The base hands these keys of the Secret muster-database to every service and the migration Job.
    for path in sorted((K8S / "base").glob("*.yaml")):
        for d in load_docs(path):
            if d["kind"] in ("Deployment", "Job"):
                env_refs = {
                    e["name"]: e["valueFrom"]["secretKeyRef"]
                    for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
                    if "secretKeyRef" in (e.get("valueFrom") or {})
                }
                assert env_refs["MUSTER_DATABASE_URL"] == {"name": "muster-database", "key": "url"}
                for name, key in (("MUSTER_DATABASE_DIRECT_URL", "direct-url"), ("MUSTER_DATABASE_POOLED", "pooled")):
                    assert env_refs[name] == {"name": "muster-database", "key": key, "optional": True}, path


# --- the shape of the workloads ---------------------------------------------------------------------

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?$")
_FACTORS = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3}


def quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def check_container_security(pod: dict[str, Any], container: dict[str, Any]) -> None:
    pod_sc, sc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    assert pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is True, container["name"]
    assert (sc.get("runAsUser") or pod_sc.get("runAsUser") or 0) > 0, container["name"]
    assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", container["name"]
    assert sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged") in (None, False)
    assert sc.get("capabilities") == {"drop": ["ALL"]}, container["name"]
    resources = container.get("resources") or {}
    for what in ("cpu", "memory"):
        request, limit = resources["requests"][what], resources["limits"][what]
        assert 0 < quantity(request) <= quantity(limit), (container["name"], what)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def check_secrets_by_reference(container: dict[str, Any]) -> set[str]:
    """Secret-bearing variables come from Secrets by name; returns the Secrets named."""
    names = set()
    for name, e in env_of(container).items():
        if name in SECRET_ENV:
            assert "value" not in e, f"{name} has a literal value"
            names.add(e["valueFrom"]["secretKeyRef"]["name"])
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            names.add(ref["name"])
    return names


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_deployments_probe_grpc_health_and_run_unprivileged(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[name]
    assert not by_kind(docs, "Secret"), "secrets are referenced by name, never included"
    deployments = by_kind(docs, "Deployment")
    assert sorted(component(d) for d in deployments) == sorted(DESCRIPTORS)
    referenced: set[str] = set()
    for dep in deployments:
        svc = component(dep)
        pod = dep["spec"]["template"]["spec"]
        assert dep["spec"]["replicas"] >= 2
        assert selects(dep["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        assert pod["terminationGracePeriodSeconds"] > GRACE_PERIOD_SECONDS
        assert pod.get("automountServiceAccountToken") is False
        [container] = pod["containers"]
        assert container["args"] == ["serve", svc]
        assert not container["image"].endswith(":latest") and ":" in container["image"]
        assert {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": GRPC_PORT, "service": HEALTH_NAMES[svc]}, (svc, probe)
        check_container_security(pod, container)
        referenced |= check_secrets_by_reference(container)
        env = env_of(container)
        assert {"MUSTER_DATABASE_URL", "MUSTER_NODE_TOKEN", "MUSTER_ADMIN_TOKEN"} <= set(env)
        assert ("MUSTER_MASTER_KEY" in env) == (svc == "keys")
    job = by_kind(docs, "Job")[0]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["migrate"] and pod["restartPolicy"] == "Never"
    check_container_security(pod, container)
    referenced |= check_secrets_by_reference(container)
    assert referenced == SECRETS


def test_services_disruption_budgets_and_network_policies(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        policies = by_kind(docs, "NetworkPolicy")
        deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
        assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, name
        for dep in by_kind(docs, "Deployment"):
            labels = dep["spec"]["template"]["metadata"]["labels"]
            [service] = [s for s in by_kind(docs, "Service") if selects({"matchLabels": s["spec"]["selector"]}, labels)]
            assert service["metadata"]["name"] == f"muster-{component(dep)}"
            assert service["spec"]["ports"] == [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
            ]
            [pdb] = [p for p in by_kind(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
            assert 1 <= pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
            ingress_ports = {
                port["port"]
                for p in policies
                if selects(p["spec"]["podSelector"], labels)
                for rule in p["spec"].get("ingress") or []
                for port in rule.get("ports") or []
            }
            assert GRPC_PORT in ingress_ports, (name, component(dep))
            egress_ports = {
                port["port"]
                for p in policies
                if selects(p["spec"]["podSelector"], labels)
                for rule in p["spec"].get("egress") or []
                for port in rule.get("ports") or []
            }
            # DNS, PostgreSQL, the other services, the OTLP collector.
            assert {53, 5432, GRPC_PORT, 4317} <= egress_ports, (name, component(dep))


# --- environments: the real settings loader and the real agent command --------------------------------


def fake_secret(name: str) -> str:
    if name == "MUSTER_MASTER_KEY":
        import base64

        return base64.b64encode(os.urandom(32)).decode()
    if name == "MUSTER_DATABASE_URL":
        return "postgresql://muster:pw@db.example:5432/muster"
    if name == "MUSTER_DATABASE_DIRECT_URL":
        return "postgresql://muster:pw@db-direct.example:5432/muster?target_session_attrs=read-write"
    if name == "MUSTER_DATABASE_POOLED":
        return "true"
    return secrets.token_urlsafe(32)


def load_server_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: Any) -> Any:
    """The settings a server process would load from this environment; fails on unknown variables
    and on authentication settings the server would refuse."""
    from muster.core import auth, config

    for key in list(os.environ):
        if key.startswith(("MUSTER_", "OTEL_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=config.__name__):
        settings = config.load_settings()
    assert [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "unknown_env"] == []
    auth.load_security(settings)
    return settings


def pod_env(container: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom, then env with $(VAR) expansion;
    Secrets get fake values, field references sample ones."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(configmaps[source["configMapRef"]["name"]])
    fields = {"metadata.name": "pod-0", "metadata.namespace": NAMESPACE, "status.podIP": "10.1.2.3"}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = fake_secret(e["name"])
        else:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_kubernetes_server_environments_load(
    name: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from muster.core.config import database_direct_dsn
    from muster.keys.component import master_key_from_settings

    docs = rendered[name]
    configmaps = {c["metadata"]["name"]: c["data"] for c in by_kind(docs, "ConfigMap")}
    services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    for dep in by_kind(docs, "Deployment"):
        svc = component(dep)
        env = pod_env(dep["spec"]["template"]["spec"]["containers"][0], configmaps)
        settings = load_server_settings(env, monkeypatch, caplog)
        assert settings.listen == f"0.0.0.0:{GRPC_PORT}"
        # The Secret's optional `pooled` and `direct-url` keys (here present) reach the settings.
        assert settings.database_pooled is True and "@db-direct.example:5432/" in database_direct_dsn(settings)
        assert env["OTEL_SERVICE_NAME"] == f"muster-{svc}" and env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert "$(" not in env["OTEL_RESOURCE_ATTRIBUTES"]
        wanted = {"registry": {"keys_address"}, "balancer": {"keys_address", "registry_address"}}.get(svc, set())
        for field in ("keys_address", "registry_address"):
            value = getattr(settings, field)
            assert (value is not None) == (field in wanted), (svc, field)
            if value is not None:
                host, _, port = value.rpartition(":")
                assert host.split(".")[0] in services and host.split(".")[1] == NAMESPACE and port == str(GRPC_PORT)
        if svc == "keys":
            master_key_from_settings(settings)


# --- Istio and Linkerd: retries and timeouts on the right methods -----------------------------------


def test_idempotent_methods_exist_and_are_unary() -> None:
    for svc, names in IDEMPOTENT.items():
        kinds = dict(methods(svc))
        for m in names:
            assert m in kinds and not kinds[m], (svc, m)


def istio_route(vs: dict[str, Any], path: str) -> dict[str, Any]:
    """The first HTTP route of a VirtualService a request for `path` takes."""
    for route in vs["spec"]["http"]:
        matches = route.get("match") or [{}]
        for m in matches:
            assert set(m) <= {"uri"}, f"match fields {set(m)} are not understood by this test"
            uri = m.get("uri")
            if uri is None:
                return route
            if ("prefix" in uri and path.startswith(uri["prefix"])) or uri.get("exact") == path:
                return route
            if "regex" in uri and re.fullmatch(uri["regex"], path):
                return route
    raise AssertionError(f"no route for {path}")


def test_istio_retries_only_idempotent_methods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["istio"]
    namespace = by_kind(docs, "Namespace")[0]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    [pa] = by_kind(docs, "PeerAuthentication")
    assert pa["spec"] == {"mtls": {"mode": "STRICT"}} and pa["metadata"]["namespace"] == NAMESPACE
    job = by_kind(docs, "Job")[0]
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    rules = {d["spec"]["host"]: d for d in by_kind(docs, "DestinationRule")}
    virtual = {d["spec"]["hosts"][0]: d for d in by_kind(docs, "VirtualService")}
    for svc in DESCRIPTORS:
        host = f"muster-{svc}.{NAMESPACE}.svc.cluster.local"
        assert rules[host]["spec"]["trafficPolicy"]["tls"] == {"mode": "ISTIO_MUTUAL"}
        vs = virtual[host]
        assert vs["spec"]["hosts"] == [host]
        for route in vs["spec"]["http"]:
            assert route["route"] == [{"destination": {"host": host, "port": {"number": GRPC_PORT}}}]
        for method, streaming in methods(svc):
            route = istio_route(vs, method_path(svc, method))
            retries = route.get("retries")
            # Istio retries every route by default: a route without `retries` would retry too.
            assert retries is not None, (svc, method)
            if method in IDEMPOTENT[svc]:
                assert retries["attempts"] >= 1 and retries["retryOn"], (svc, method)
                per_try, total = duration_seconds(retries["perTryTimeout"]), duration_seconds(route["timeout"])
                assert 0 < per_try <= total, (svc, method)
            else:
                assert retries == {"attempts": 0}, (svc, method)
                if streaming:
                    assert "timeout" not in route, f"a route timeout would cut the stream {svc}/{method}"
                else:
                    assert duration_seconds(route["timeout"]) > 0, (svc, method)
    egress = next(p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "muster-egress")
    assert any(
        rule["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "istio-system"}
        for rule in egress["spec"]["egress"]
        if rule.get("to") and "namespaceSelector" in rule["to"][0]
    )


def test_linkerd_profiles_retry_only_idempotent_methods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["linkerd"]
    namespace = by_kind(docs, "Namespace")[0]
    assert namespace["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
    for dep in by_kind(docs, "Deployment"):
        assert dep["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
    job = by_kind(docs, "Job")[0]
    assert job["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"] == "disabled"
    profiles = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceProfile")}
    for svc in DESCRIPTORS:
        profile = profiles[f"muster-{svc}.{NAMESPACE}.svc.cluster.local"]
        assert profile["spec"]["retryBudget"]["retryRatio"] > 0
        for method, streaming in methods(svc):
            path = method_path(svc, method)
            routes = [
                r
                for r in profile["spec"]["routes"]
                if re.fullmatch(r["condition"]["pathRegex"], path) and r["condition"].get("method", "POST") == "POST"
            ]
            if streaming:
                assert routes == [], f"a route's timeout would cut the stream {svc}/{method}"
                continue
            assert len(routes) == 1, (svc, method)
            route = routes[0]
            assert bool(route.get("isRetryable")) == (method in IDEMPOTENT[svc]), (svc, method)
            assert duration_seconds(route["timeout"]) > 0


# --- compose ------------------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def compose_env() -> dict[str, str]:
    """What deploy/.env holds (deploy/README.md says how to create it)."""
    return {
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "MUSTER_NODE_TOKEN": secrets.token_urlsafe(32),
        "MUSTER_ADMIN_TOKEN": secrets.token_urlsafe(32),
        "MUSTER_MASTER_KEY": fake_secret("MUSTER_MASTER_KEY"),
    }


def interpolate(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: interpolate(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, values) for v in node]
    if isinstance(node, str):
        return _INTERPOLATION.sub(lambda m: values[m.group(1)], node)
    return node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = COMPOSE.read_text()
    return interpolate(yaml.safe_load(raw), compose_env())


def compose_muster_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_validates_against_the_compose_spec() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and "ok -- validation done" in out.stdout, out.stdout + out.stderr


def test_compose_names_only_what_it_defines(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    interpolated = set(_INTERPOLATION.findall(COMPOSE.read_text()))
    assert interpolated == set(compose_env()), "deploy/.env and deploy/README.md must name every variable"
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, (name, dep)
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert source in volumes or source.startswith((".", "/")), (name, source)
        env = svc.get("environment") or {}
        for key, value in env.items():
            if key.endswith("_ADDRESS"):
                for address in str(value).split(","):
                    assert address.rpartition(":")[0] in services, (name, key, value)
            if key == "OTEL_EXPORTER_OTLP_ENDPOINT":
                assert re.fullmatch(r"http://(\w+):4317", value) and value[7:-5] in services, (name, value)
            if key == "MUSTER_DATABASE_URL":
                assert re.match(r"postgresql://\w+@(\w+):5432/", value).group(1) in services
    assert "jaeger" in services["jaeger"]["image"] and "postgres" in services["postgres"]["image"]
    serving = {}
    for name, svc in services.items():
        if svc.get("image", "").startswith("muster:"):
            args = compose_muster_args(svc)
            if args[0] == "serve":
                assert args[1] in DESCRIPTORS and args[1] not in serving, (name, args)
                serving[args[1]] = name
    assert sorted(serving) == sorted(DESCRIPTORS), "each service in its own container"
    assert compose_muster_args(services["migrate"]) == ["migrate"] and services["migrate"]["restart"] == "no"
    for name in serving.values():
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    agents = [n for n, s in services.items() if s.get("image", "").startswith("muster:") and s["command"][0] == "agent"]
    assert len(agents) == 2


def test_compose_server_environments_load(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from muster.core.config import database_dsn
    from muster.keys.component import master_key_from_settings

    for svc in compose["services"].values():
        if not svc.get("image", "").startswith("muster:") or compose_muster_args(svc)[0] != "serve":
            continue
        role = compose_muster_args(svc)[1]
        settings = load_server_settings(dict(svc["environment"]), monkeypatch, caplog)
        assert settings.listen == f"0.0.0.0:{GRPC_PORT}"
        assert "@postgres:5432/" in database_dsn(settings)
        assert settings.keys_address == (f"keys:{GRPC_PORT}" if role in ("registry", "balancer") else None)
        assert settings.registry_address == (f"registry:{GRPC_PORT}" if role == "balancer" else None)
        assert svc["environment"]["OTEL_SERVICE_NAME"] == f"muster-{role}"
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and test[4] == HEALTH_NAMES[role]
        if role == "keys":
            master_key_from_settings(settings)


def test_compose_health_check_reports_serving_and_not_serving(compose: dict[str, Any]) -> None:
    """The compose health check, run against a real grpc.health.v1 server for each state."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    servicer = health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for svc, full_name in HEALTH_NAMES.items():
            test = compose["services"][svc]["healthcheck"]["test"]
            script = test[3].replace(f"127.0.0.1:{GRPC_PORT}", f"127.0.0.1:{port}")
            assert script != test[3]
            for status, code in ((serving, 0), (not_serving, 1)):
                servicer.set(full_name, status)
                out = subprocess.run(
                    [sys.executable, "-c", script, test[4]], capture_output=True, text=True, timeout=60, check=False
                )
                assert out.returncode == code, (svc, status, out.stderr)
    finally:
        server.stop(None)


# --- the agents: command lines and environments through the real `muster agent` ---------------------


def agent_config(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The AgentConfig `muster agent` would run with, and the per-service addresses its client reads."""
    from typer.testing import CliRunner

    from muster.cli import agent as agent_cli
    from muster.cli.main import app
    from muster.client._config import default_service_addresses

    for key in list(os.environ):
        if key.startswith("MUSTER_"):
            monkeypatch.delenv(key)
    seen = {}

    def capture(config: Any) -> int:
        seen["config"], seen["addresses"] = config, default_service_addresses()
        return 0

    monkeypatch.setattr(agent_cli, "_run", capture)
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return seen["config"], seen["addresses"]


def test_compose_agents_are_wired(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    wired = []
    for name, svc in compose["services"].items():
        if not svc.get("image", "").startswith("muster:") or svc["command"][0] != "agent":
            continue
        wired.append(name)
        env = {k: str(v) for k, v in svc["environment"].items()}
        config, addresses = agent_config(compose_muster_args(svc), env, monkeypatch)
        assert config.host_name == svc["hostname"] == name and config.port == 8787 and config.labels
        assert {k: v[0].rpartition(":")[0] for k, v in addresses.items()} == {s: s for s in DESCRIPTORS}
        assert env["MUSTER_NODE_TOKEN"] and "MUSTER_ADMIN_TOKEN" not in env
    assert len(wired) == 2


def test_kubernetes_agent_example_is_wired(monkeypatch: pytest.MonkeyPatch) -> None:
    [dep] = load_docs(EXAMPLE)
    pod = dep["spec"]["template"]["spec"]
    [agent] = pod["initContainers"]
    assert agent["restartPolicy"] == "Always", "a native sidecar: up before the application, down after it"
    check_container_security(pod, agent)
    assert check_secrets_by_reference(agent) == {"muster-node-token"}
    for container in pod["containers"]:
        check_container_security(pod, container)
    env = pod_env(agent, {})
    config, addresses = agent_config(agent["args"], env, monkeypatch)
    assert config.listen_address == "10.1.2.3" and config.port == 8787 and config.labels == {"zone": "a"}
    assert config.delete_node_on_exit and config.key_paths is not None
    assert str(config.state_dir) == "/run/muster"
    mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts") or []}
    assert "/run/muster" in mounts, "the application shares the agent's socket directory"
    assert {k: v[0] for k, v in addresses.items()} == {
        s: f"muster-{s}.{NAMESPACE}.svc:{GRPC_PORT}" for s in DESCRIPTORS
    }


# --- the image ----------------------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_dockerfile_runs_muster_as_an_unprivileged_user() -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    final = instructions[stages[-1] :]
    assert all(args.split()[0] == "python:3.11-slim" for word, args in instructions if word == "FROM")
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, user
    assert [json.loads(args) for word, args in final if word == "ENTRYPOINT"] == [["muster"]]
    installs = [args for word, args in instructions if word == "RUN" and "pip " in args]
    assert any("'.[server]'" in a for a in installs) and any("'muster[server]'" in a for a in installs)
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["muster"] == "muster.cli.main:main"


def dockerfile_copies() -> list[str]:
    sources = []
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    return sources


def test_dockerfile_build_context_holds_what_it_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in dockerfile_copies():
        assert (ROOT / source).exists() and source.rstrip("/") in allowed, source


@pytest.mark.skipif(
    importlib.util.find_spec("hatchling") is None,
    reason="hatchling is not installed: the image's build stage cannot be replayed offline",
)
def test_dockerfile_build_stage_builds_the_muster_wheel(tmp_path: Path) -> None:
    """The build stage, outside a container: a wheel from exactly the files the Dockerfile copies."""
    src = tmp_path / "src"
    src.mkdir()
    for source in dockerfile_copies():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, src / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / source)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), src],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [wheel] = tmp_path.glob("muster-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "muster = muster.cli.main:main" in entry_points
    for module in ("muster/cli/main.py", "muster/core/server.py", "muster/api/registry/v1/registry_service_pb2.py"):
        assert module in names, module


# --- the entry points, outside a container -------------------------------------------------------------


def muster_command() -> list[str]:
    path = Path(sys.executable).parent / "muster"
    assert path.exists(), f"the `muster` entry point is not installed beside {sys.executable}"
    return [str(path)]


@pytest.mark.parametrize("args", [[], ["serve"], ["migrate"], ["agent"]], ids=["muster", "serve", "migrate", "agent"])
def test_entry_points_run(args: list[str]) -> None:
    out = subprocess.run([*muster_command(), *args, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "Usage" in out.stdout, out.stdout + out.stderr


def deployed_command_lines(rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]) -> list[list[str]]:
    lines = []
    for docs in rendered.values():
        for d in by_kind(docs, "Deployment") + by_kind(docs, "Job"):
            lines += [c["args"] for c in d["spec"]["template"]["spec"]["containers"]]
    [example] = load_docs(EXAMPLE)
    lines += [c["args"] for c in example["spec"]["template"]["spec"]["initContainers"]]
    for svc in compose["services"].values():
        if svc.get("image", "").startswith("muster:"):
            lines.append(compose_muster_args(svc))
    unique = []
    for line in lines:
        if line not in unique:
            unique.append(line)
    return unique


def test_deployed_command_lines_are_accepted(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    """Every command line the deployment files give the image parses (an unknown option exits 2)."""
    from muster.cli.main import SERVICES

    lines = deployed_command_lines(rendered, compose)
    assert len(lines) >= 8
    for args in lines:
        if args[:1] == ["serve"]:
            assert all(s in SERVICES for s in args[1].split(",")), args
        help_args = args if args[-1:] == ["--help"] else [*args, "--help"]
        out = subprocess.run([*muster_command(), *help_args], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, (args, out.stdout + out.stderr)


def test_readme_names_every_secret_and_variable() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in SECRETS | {"muster-node-token"}:
        assert re.search(rf"create secret generic {name}\b", readme), name
    for variable in compose_env():
        assert f"{variable}=" in readme, variable
    for overlay in ("deploy/k8s/base", "deploy/k8s/overlays/istio", "deploy/k8s/overlays/linkerd"):
        assert f"kubectl apply -k {overlay}" in readme, overlay
    assert "kubectl apply -f deploy/k8s/examples/cloudnative-pg.yaml" in readme
    assert "create secret generic muster-pg-owner" in readme and "--from-literal=direct-url=" in readme


def test_readme_failover_section_names_what_the_servers_emit() -> None:
    """The log lines and metrics deploy/README.md's "PostgreSQL with failover" describes are the
    servers' own (a renamed message or series fails here)."""
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("## PostgreSQL with failover", 1)[1].split("\n## ", 1)[0]
    core = ROOT / "services" / "muster" / "core"
    source = {name: (core / f"{name}.py").read_text() for name in ("server", "events", "clock", "metrics")}
    logged = {
        "server": ["database unreachable", "database reachable again", "the database is a standby now; reconnecting"],
        "events": ["the database is on a new timeline (a failover or a restore): revisions from"],
        "clock": ["no replica reached the database for", "crediting"],
    }
    for lines in logged.values():
        for line in lines:
            assert line in section, line
    assert '"reachable again" if ok else "unreachable"' in source["server"] and '"database %s"' in source["server"]
    assert "the database is a standby now; reconnecting" in source["server"]
    assert '"the database is on a new timeline (a failover or a restore): revisions from %d on; "' in source["events"]
    assert '"no replica reached the database for %.1fs; crediting %.1fs to leases"' in source["clock"]
    for event in ("db_health", "db_standby", "bus_new_epoch", "outage_credited"):
        assert f"`{event}`" in section and f'"event": "{event}"' in "".join(source.values()), event
    named = set(re.findall(r"`(muster_[a-z_]+?)(?:_count)?[`{]", section))
    assert len(named) >= 5
    for metric in named:
        assert f"``{metric}``" in source["metrics"], metric
    epoch_sql = (core / "sql" / "0003_epochs.sql").read_text()
    assert "muster: timeline % (a failover or a restore): epoch opened at revision %" in epoch_sql
    assert "muster: timeline 2 (a failover or a restore): epoch opened at revision 2199023255552" in section
    assert 2 << 40 == 2199023255552 and "2 199 023 255 552" in section
