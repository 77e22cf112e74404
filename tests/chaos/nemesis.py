"""The nemesis: faults drawn from a seeded RNG, injected one at a time, each healed before the next.

The seed fixes the sequence of faults (kind, target, duration, mode, the pauses between them); the
interleaving with the workload is up to the machine, so a replay repeats the faults, not the exact
history. Every fault is printed and recorded (``history/nemesis.jsonl``) with its monotonic start
and end, which the checkers use to tell faults from violations.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cluster import LEASE_TTL, ChaosCluster

LOCK_TTL = 1.0  # the lock workers' lease
JOB_TTL = 2.0  # the schedulers' claim ttl

# kind -> weight
KINDS: dict[str, int] = {
    "kill_replica": 3,
    "pause_replica": 2,
    "pause_agent": 2,
    "kill_agent": 2,
    "pause_lock_holder": 2,
    "pause_scheduler": 1,
    "pg_restart": 2,
    "partition": 3,
    "failover": 2,
}
# Kinds injected at least once per run: when none of the first ENSURE_BY faults drew one, the next
# fault is it (decided by the fault's index, not the clock, so a seed still fixes the sequence).
ENSURE = ("failover",)
ENSURE_BY = 1
# Seconds a fault takes beyond its drawn duration (the failover's base backup of the new standby):
# the last fault must fit before the end of the run.
EXTRA = {"failover": 3.0}


def weights(spec: str | None, *, base: dict[str, int] | None = None) -> dict[str, int]:
    """The fault weights: ``base`` (KINDS) with ``kind=N,kind=N`` applied (``failover=0`` turns it off)."""
    out = dict(base or KINDS)
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        kind, _, n = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS or not n.strip().isdigit():
            raise ValueError(f"not a fault weight: {part!r} (kind=N, kinds: {', '.join(KINDS)})")
        out[kind] = int(n)
    if not any(out.values()):
        raise ValueError("every fault weight is 0")
    return out


class FaultLog:
    """Prints each fault and appends it to a JSON-lines file."""

    def __init__(self, path: Path, t0: float, quiet: bool = False) -> None:
        self.path = path
        self.t0 = t0
        self.quiet = quiet
        self.faults: list[dict[str, Any]] = []

    def record(self, **rec: Any) -> dict[str, Any]:
        self.faults.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:7.2f}s] {text}", flush=True)


class Nemesis:
    """Injects faults into ``cluster`` until ``until`` (monotonic)."""

    def __init__(self, cluster: ChaosCluster, seed: int, log: FaultLog, kinds: dict[str, int] | None = None) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.log = log
        kinds = {k: w for k, w in (kinds or KINDS).items() if w > 0}
        if kinds.get("failover") and not cluster.replicated:
            raise ValueError("the failover fault needs a replicated pair: ChaosCluster(replicated=True)")
        self.kinds = kinds

    def run(self, until: float, *, warmup: float = 1.0) -> None:
        time.sleep(warmup)
        drawn: set[str] = set()
        n = 0
        while True:
            gap = self.rng.uniform(0.3, 2.0)
            kind = self.rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
            missing = [k for k in ENSURE if k in self.kinds and k not in drawn]
            if n >= ENSURE_BY and missing:
                kind = missing[0]
            drawn.add(kind)
            n += 1
            plan = self._plan(kind)
            if time.monotonic() + gap + plan["duration"] + EXTRA.get(kind, 0.0) > until:
                break
            self.cluster.capture_keys()
            time.sleep(gap)
            self._inject(kind, plan)

    # -- planning: every random draw happens here, in the same order for a seed -------------------

    def _plan(self, kind: str) -> dict[str, Any]:
        r, c = self.rng, self.cluster
        if kind in ("kill_replica", "pause_replica"):
            return {"target": r.randrange(len(c.replicas)), "duration": r.uniform(0.5, 3.5)}
        if kind == "pause_agent":
            return {"target": r.randrange(len(c.agents)), "duration": r.uniform(1.3, 2.0) * LEASE_TTL}
        if kind == "kill_agent":
            return {"target": r.randrange(len(c.agents)), "duration": r.uniform(1.2, 2.0) * LEASE_TTL}
        if kind == "pause_lock_holder":
            return {"target": r.random(), "duration": r.uniform(1.5, 3.0) * LOCK_TTL}
        if kind == "pause_scheduler":
            return {"target": r.random(), "duration": r.uniform(1.3, 2.0) * JOB_TTL}
        if kind == "pg_restart":
            return {"mode": r.choice(["fast", "immediate"]), "duration": r.uniform(0.3, 3.0)}
        if kind == "failover":
            # duration: from the primary's death to the promotion (the time a failover manager takes to
            # notice and act), below and above the outage threshold and the lease ttl.
            return {"duration": r.uniform(0.2, 3.5)}
        if kind == "partition":
            return {
                "target": r.random(),
                "replica": r.randrange(len(c.replicas)),
                "mode": r.choice(["reset", "blackhole"]),
                "duration": r.uniform(1.0, 5.0),
            }
        raise ValueError(kind)

    # -- injection -------------------------------------------------------------------------------

    def _inject(self, kind: str, plan: dict[str, Any]) -> None:
        getattr(self, "_" + kind)(plan)

    def _window(
        self,
        kind: str,
        target: str,
        plan: dict[str, Any],
        act: Callable[[], Any],
        undo: Callable[[], Any],
        **detail: Any,
    ) -> None:
        start = time.monotonic()
        act()
        self.log.say(f"{kind} {target} for {plan['duration']:.2f}s {_fmt(detail)}".rstrip())
        time.sleep(max(0.0, start + plan["duration"] - time.monotonic()))
        healed = time.monotonic()
        extra = undo() or {}
        end = time.monotonic()
        self.log.record(kind=kind, target=target, start=start, end=end, healed=healed, **detail, **extra)
        self.log.say(f"  healed {kind} {target} (took {end - healed:.2f}s) {_fmt(extra)}".rstrip())

    def _kill_replica(self, plan: dict[str, Any]) -> None:
        rep = self.cluster.replicas[plan["target"]]
        pid = rep.server.pid if rep.server else 0

        def restart() -> dict[str, Any]:
            self.cluster.start_replica(rep)
            return {"new_pid": rep.server.pid if rep.server else 0}

        self._window("kill_replica", rep.name, plan, lambda: self.cluster.kill_replica(rep), restart, pid=pid)

    def _pause_replica(self, plan: dict[str, Any]) -> None:
        rep = self.cluster.replicas[plan["target"]]
        assert rep.server is not None
        server = rep.server

        def stop() -> None:
            server.signal(signal.SIGSTOP)
            rep.paused = True

        def cont() -> None:
            server.signal(signal.SIGCONT)
            rep.paused = False

        self._window("pause_replica", rep.name, plan, stop, cont, pid=server.pid)

    def _pause_agent(self, plan: dict[str, Any]) -> None:
        agent = self.cluster.agents[plan["target"]]
        proc = agent.proc
        if proc is None or not proc.running():
            self.log.say(f"pause_agent {agent.name}: not running, skipped")
            return

        def stop() -> None:
            proc.signal(signal.SIGSTOP)
            agent.paused = True

        def cont() -> None:
            proc.signal(signal.SIGCONT)
            agent.paused = False

        self._window("pause_agent", agent.name, plan, stop, cont, pid=proc.pid, node=agent.node_id)

    def _kill_agent(self, plan: dict[str, Any]) -> None:
        agent = self.cluster.agents[plan["target"]]
        proc = agent.proc
        if proc is None or not proc.running():
            self.log.say(f"kill_agent {agent.name}: not running, skipped")
            return

        def restart() -> dict[str, Any]:
            agent.start(wait=False)
            return {"new_pid": agent.proc.pid if agent.proc else 0}

        self._window("kill_agent", agent.name, plan, proc.kill, restart, pid=proc.pid, node=agent.node_id)

    def _pause_client(self, kind: str, role: str, plan: dict[str, Any]) -> None:
        clients = [c for c in self.cluster.clients if c.role == role and c.running]
        if not clients:
            self.log.say(f"{kind}: no {role} client running, skipped")
            return
        client = clients[int(plan["target"] * len(clients))]

        def stop() -> None:
            client.signal(signal.SIGSTOP)
            client.paused = True

        def cont() -> None:
            client.signal(signal.SIGCONT)
            client.paused = False

        self._window(kind, client.name, plan, stop, cont, pid=client.proc.pid)

    def _pause_lock_holder(self, plan: dict[str, Any]) -> None:
        self._pause_client("pause_lock_holder", "lock", plan)

    def _pause_scheduler(self, plan: dict[str, Any]) -> None:
        self._pause_client("pause_scheduler", "jobs", plan)

    def _pg_restart(self, plan: dict[str, Any]) -> None:
        c = self.cluster
        # On the replicated pair, "the database" is the current primary; its standby stays up.
        self._window(
            "pg_restart",
            c.database_name,
            plan,
            lambda: c.stop_database(plan["mode"]),
            c.start_database_again,
            mode=plan["mode"],
        )

    def _failover(self, plan: dict[str, Any]) -> None:
        """The primary dies (an immediate stop), the standby is promoted ``duration`` later (a new
        timeline: Muster opens a new epoch), then the dead primary is rebuilt as the new standby
        (a fresh base backup, synchronous again) so that a later failover can happen too.

        Recorded: ``start`` (the kill), ``healed`` (the promotion asked), ``promoted`` (the new primary
        writable), ``rebuilt`` / ``end`` (the standby streaming again), the new timeline."""
        c = self.cluster
        old = c.database_name
        assert c.pair is not None
        new = f"pg-{c.pair.standby.data.name}"

        def promote_and_rebuild() -> dict[str, Any]:
            t = time.monotonic()
            info = c.promote_standby()
            promoted = time.monotonic()
            self.log.say(f"  promoted {info['new_primary']} (timeline {info['timeline']}) in {promoted - t:.2f}s")
            c.rebuild_standby()
            rebuilt = time.monotonic()
            return {
                **info,
                "promoted": promoted,
                "rebuilt": rebuilt,
                "promote_s": round(promoted - t, 3),
                "rebuild_s": round(rebuilt - promoted, 3),
                "standby": old,
            }

        self._window("failover", old, plan, c.kill_primary, promote_and_rebuild, mode="immediate", to=new)

    def _partition(self, plan: dict[str, Any]) -> None:
        c = self.cluster
        names = sorted(c.slots)
        client = names[int(plan["target"] * len(names))]
        proxy = c.slots[client][plan["replica"]]
        replica = c.replicas[plan["replica"]].name
        assert c.proxy is not None
        proxies = c.proxy
        self._window(
            "partition",
            f"{client}<->{replica}",
            plan,
            lambda: proxies.cut(proxy, plan["mode"]),
            lambda: proxies.heal(proxy),
            client=client,
            replica=replica,
            mode=plan["mode"],
        )


def _fmt(detail: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in detail.items())
