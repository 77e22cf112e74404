"""What the balancer calls outside itself: the custom strategy, and the diagnostics log of decisions."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from muster.balancer.models import Counts, Decision, NodeInfo

log = logging.getLogger(__name__)


class CustomStrategy:
    """The ``custom`` strategy: a Python entry point (``module:function``) called with the request
    and the candidates, or an executable given them as JSON on stdin; either answers a node id. A
    failure, a wrong answer or the timeout falls back to ``sessions``.

    The input: ``{"user", "kind", "labels", "candidates": [{"node_id", "address", "sessions",
    "load1", "cpu_count", "labels"}]}``; an executable prints the node id (or ``{"node_id": N}``).
    An entry point may be a coroutine function.
    """

    def __init__(self, spec: str, timeout: timedelta) -> None:
        self.spec = spec
        self.timeout = timeout.total_seconds()
        self._function: Callable[..., Any] | None = None
        if ":" in spec and not Path(spec).exists():
            module, _, name = spec.partition(":")
            self._function = getattr(importlib.import_module(module), name)

    async def choose(
        self, user: str, kind: str, labels: dict[str, str], candidates: list[NodeInfo], counts: dict[int, Counts]
    ) -> tuple[NodeInfo | None, str]:
        """The chosen candidate, or (None, why it fell back)."""
        doc = {
            "user": user,
            "kind": kind,
            "labels": labels,
            "candidates": [
                {
                    "node_id": n.id,
                    "address": n.address,
                    "sessions": counts.get(n.id, Counts()).sessions,
                    "load1": n.load1,
                    "cpu_count": n.cpu_count,
                    "labels": dict(n.labels),
                }
                for n in candidates
            ],
        }
        try:
            async with asyncio.timeout(self.timeout):
                answer = await (self._call(doc) if self._function is not None else self._run(doc))
        except TimeoutError:
            return None, f"custom strategy timed out after {self.timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - any failure of the operator's code falls back
            return None, f"custom strategy failed: {type(exc).__name__}: {str(exc)[:200]}"
        try:
            node_id = int(answer["node_id"] if isinstance(answer, dict) else answer)
        except (TypeError, ValueError, KeyError):
            return None, f"custom strategy answered {str(answer)[:100]!r}, not a node id"
        chosen = next((n for n in candidates if n.id == node_id), None)
        if chosen is None:
            return None, f"custom strategy chose node {node_id}, which is not a candidate"
        return chosen, ""

    async def _call(self, doc: dict[str, Any]) -> Any:
        assert self._function is not None
        result = self._function(doc)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def _run(self, doc: dict[str, Any]) -> Any:
        # subprocess.run in a thread, not the loop's subprocess support: uvloop spawns with fork(),
        # whose handlers gRPC hooks (the child's pipes were found closed under a serving process);
        # Python's subprocess spawns with vfork/exec. Its own timeout kills the child.
        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(  # noqa: S603 - the operator's configured command
                shlex.split(self.spec),
                input=json.dumps(doc).encode(),
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )

        try:
            done = await asyncio.to_thread(run)
        except subprocess.TimeoutExpired:
            raise TimeoutError from None
        if done.returncode != 0:
            raise RuntimeError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[-200:]}")
        text = done.stdout.decode().strip()
        return json.loads(text) if text.startswith("{") else text


class Diagnostics:
    """The ``balancer_diagnostics`` option: one JSON line per decision (``stderr`` or a file path)."""

    def __init__(self, target: str) -> None:
        self._own = target not in ("stderr", "-")
        self._out: TextIO = sys.stderr if not self._own else open(target, "a", buffering=1)  # noqa: SIM115
        if self._own:
            os.chmod(target, 0o640)

    def record(
        self, user: str, kind: str, labels: dict[str, str], decision: Decision, session_id: str, dry: bool
    ) -> None:
        """Writes one decision with its inputs."""
        line = {
            "time": time.time(),
            "user": user,
            "kind": kind,
            "labels": labels,
            "dry_run": dry,
            "strategy": decision.strategy,
            "fallback": decision.fallback,
            "winner": decision.winner.id,
            "session_id": session_id,
            "candidates": [
                {"node_id": s.node.id, "score": s.score, "sessions": s.counts.sessions, "load1": s.node.load1}
                for s in decision.scored
            ],
            "excluded": [{"node_id": n.id, "reason": r} for n, r in decision.excluded],
        }
        try:
            self._out.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.warning("cannot write placement diagnostics: %s", exc)

    def close(self) -> None:
        """Closes a file target."""
        if self._own:
            self._out.close()
