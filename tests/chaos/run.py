"""The chaos run: a real cluster, a workload, a seeded nemesis, then the checkers.

    python -m tests.chaos --seconds 60 --seed 42     # or: python tests/chaos/run.py …
    python -m tests.chaos --check /tmp/muster-chaos-XXXX   # check a kept run again

Prints the seed first, then every fault as it is injected and healed, then each checker's verdict.
Exits 0 when every checker passes, 1 on a violation, 2 when the cluster could not be set up or the run
broke off (the harness failed, not a guarantee).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python tests/chaos/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.chaos"  # noqa: A001
    import tests.chaos  # noqa: F401 - puts tests/ on sys.path

from muster.client._watch import NODE_EVENT_KINDS

from . import checkers
from .cluster import LEASE_TTL, ChaosCluster, SetupError
from .history import Run, snapshot
from .nemesis import JOB_TTL, KINDS, LOCK_TTL, FaultLog, Nemesis, weights

LOCK_NAME = "chaos-hot"
JOB = "chaos-tick"
NODE_KINDS = list(NODE_EVENT_KINDS)  # what a ClusterView follows: the filtered watcher's filter
SKEWS = [("+3d", 3 * 86400), ("-7h", -7 * 3600), ("+400d", 400 * 86400), ("-30d", -30 * 86400)]


def duration(text: str) -> float:
    """Seconds from ``60``, ``90s``, ``10m`` or ``1h``."""
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (write 60, 90s, 10m or 1h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seconds", type=duration, default=60.0, help="how long faults are injected: 60, 90s, 10m, 1h (default 60)"
    )
    p.add_argument("--seed", type=int, default=None, help="the nemesis's seed (default: random, printed)")
    p.add_argument("--agents", type=int, default=4, help="node agents (default 4)")
    p.add_argument("--workdir", type=Path, default=None, help="where the run lives (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the run's directory even when every check passes")
    p.add_argument("--settle", type=float, default=30.0, help="at most this long to settle after the faults")
    p.add_argument("--log-level", default="INFO", help="the servers' MUSTER_LOG_LEVEL (default INFO)")
    p.add_argument("--check", type=Path, default=None, metavar="DIR", help="only run the checkers on a kept run")
    p.add_argument("--quiet", action="store_true", help="no line per fault")
    p.add_argument(
        "--faults",
        default="",
        metavar="KIND=N,…",
        help="fault weights over the defaults ("
        + ", ".join(f"{k}={w}" for k, w in KINDS.items())
        + "); failover=0 runs on the embedded PostgreSQL, without Debian's server",
    )
    args = p.parse_args(argv)
    try:
        args.weights = weights(args.faults)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.check is not None:
        return report(Run.load(args.check), args.check, keep=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(
        f"chaos: seed {seed}, {args.seconds:g}s of faults "
        f"(replay: python -m tests.chaos --seconds {args.seconds:g} --seed {seed})",
        flush=True,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="muster-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    # The failover fault needs a primary and a standby; without it the embedded PostgreSQL will do.
    replicated = args.weights.get("failover", 0) > 0
    cluster = ChaosCluster(workdir, log_level=args.log_level, replicated=replicated)
    t0 = time.monotonic()
    faults = FaultLog(workdir / "history" / "nemesis.jsonl", t0, quiet=args.quiet)
    setup_ok = broke = False
    try:
        params = setup(cluster, args, seed, faults)
        setup_ok = True
        nemesis = Nemesis(cluster, seed, faults, args.weights)
        nemesis.run(params["until"])
        remaining = params["until"] - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        finish(cluster, params, faults, args.settle)
    except SystemExit:
        raise
    except SetupError as exc:
        cluster.stop()
        print(f"chaos: the cluster could not be set up: {exc}", flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - report, stop everything, keep the directory
        import traceback

        traceback.print_exc()
        print(f"chaos: the run broke: {type(exc).__name__}: {exc}", flush=True)
        broke = True
        if not setup_ok:
            cluster.stop()
            print(f"chaos: the cluster could not be set up; its logs are in {workdir}/logs", flush=True)
            return 2
    finally:
        cluster.stop()
        print(f"chaos: stopped every process ({time.monotonic() - t0:.1f}s in all)", flush=True)
    code = report(Run.load(workdir), workdir, keep=args.keep or broke)
    if broke:
        print("chaos: the verdicts above judge a run that broke off: see the error before them", flush=True)
        return 2
    return code


def setup(cluster: ChaosCluster, args: argparse.Namespace, seed: int, faults: FaultLog) -> dict[str, Any]:
    db = "a primary and a synchronous standby (Debian's PostgreSQL)" if cluster.replicated else "PostgreSQL"
    faults.say(f"starting {db}, the proxy, 2 replicas and {args.agents} agents in {cluster.workdir}")
    cluster.start_database()
    cluster.start_proxy()
    for r in cluster.replicas:
        cluster.start_replica(r)
    cluster.add_agents(args.agents)
    cluster.start_agents()
    cluster.capture_keys()
    rng = random.Random(f"{seed}-setup")
    until = time.monotonic() + args.seconds
    params: dict[str, Any] = {
        "seed": seed,
        "seconds": args.seconds,
        "until": until,
        "weights": args.weights,
        "database": "replicated-synchronous" if cluster.replicated else "embedded",
        "clock": {"wall": time.time(), "mono": time.monotonic()},
        "lock_name": LOCK_NAME,
        "job": JOB,
        "job_ttl": JOB_TTL,
        "job_every": 1.0,
        "job_misfire": 10.0,
        "lease_ttl": LEASE_TTL,
        "master_key": cluster.master_key,
        "require_faketime": os.environ.get("MUSTER_REQUIRE_FAKETIME") == "1",
        "agents": [{"name": a.name, "host": a.host, "keys_dir": str(a.keys_dir)} for a in cluster.agents],
        "clients": [],
        "pids": {"proxy": cluster.proxy.pid if cluster.proxy else 0},
    }
    # The skewed clock: one watcher and one lock worker run with their wall clock far off.
    offset, seconds = rng.choice(SKEWS)
    # MUSTER_CHAOS_FAKETIME names the binary (empty: behave as if it were not installed).
    faketime = os.environ.get("MUSTER_CHAOS_FAKETIME", shutil.which("faketime") or "")
    skewed = bool(faketime)
    params["skew"] = {
        "offset": offset,
        "seconds": seconds,
        "clients": ["w-skew", "l-skew"] if skewed else [],
        "skipped": not skewed,
    }
    if skewed:
        faults.record(kind="clock_skew", target="w-skew,l-skew", start=time.monotonic(), end=until, offset=offset)
        faults.say(f"clock_skew w-skew,l-skew: wall clock {offset} (libfaketime, monotonic clock untouched)")
    else:
        faults.record(kind="clock_skew_skipped", target="w-skew,l-skew", start=0, end=0)
        faults.say("clock_skew SKIPPED: faketime is not installed (apt-get install faketime)")
    base = {"seed": seed, "until": until, "stop_file": str(cluster.stop_file), "database_url": cluster.database_url}

    def start(role: str, name: str, skew: str = "", **cfg: Any) -> None:
        cluster.start_client(role, name, {**base, **cfg}, skew=skew if skewed else "", faketime=faketime)
        params["clients"].append({"name": name, "role": role, "skew": skew if skewed else "", **cfg})

    start("watch", "w-raw", mode="raw")
    start("watch", "w-client", mode="client")
    start("watch", "w-nodes", mode="client", kinds=NODE_KINDS)
    start("watch", "w-skew", skew=offset, mode="client")
    for name, tasks, skew in (("l0", 3, ""), ("l1", 3, ""), ("l-skew", 2, offset)):
        start("lock", name, skew=skew, lock=LOCK_NAME, tasks=tasks, ttl=LOCK_TTL, wait=3.0)
    for name in ("j0", "j1"):
        start("jobs", name, job=JOB, every=1.0, ttl=JOB_TTL, misfire=10.0, work=0.2)
    start("place", "p0")
    # Operator actions: per two minutes of run, drain a node, rotate the keys, undrain it.
    arng = random.Random(f"{seed}-admin")
    now, span = time.monotonic(), args.seconds
    cycles = max(1, int(span // 120))
    schedule, drained = [], []
    for i in range(cycles):
        at, length = now + i * span / cycles, span / cycles
        host = arng.choice(cluster.agents).host
        drained.append(host)
        schedule += [
            [at + 0.25 * length, "drain", host],
            [at + 0.45 * length, "rotate", ""],
            [at + 0.8 * length, "undrain", host],
        ]
    start("admin", "adm", schedule=schedule)
    params["drained"] = drained
    params["slots"] = {
        name: dict(zip([r.name for r in cluster.replicas], addrs, strict=True))
        for name, addrs in cluster.slot_addresses.items()
    }
    save_params(cluster.workdir, params)
    faults.say(f"workload running: {', '.join(c.name for c in cluster.clients)}; faults until +{span:g}s")
    return params


def save_params(workdir: Path, params: dict[str, Any]) -> None:
    (workdir / "run.json").write_text(json.dumps(params, indent=1))


def finish(cluster: ChaosCluster, params: dict[str, Any], faults: FaultLog, settle: float) -> None:
    done = cluster.heal()
    faults.say("faults over; healed: " + (", ".join(done) or "nothing was left"))
    writers = [c.name for c in cluster.clients if c.role != "watch"]
    codes = cluster.wait_clients(writers, 20.0)
    stuck = [n for n, code in codes.items() if code is None]
    if stuck:
        faults.say(f"killed clients that did not finish: {stuck}")
    params["exit_codes"] = codes
    cluster.capture_keys()
    waited, pending = settle_cluster(cluster, settle)
    faults.say(f"settled in {waited:.1f}s" + (f"; still not settled: {pending}" if pending else ""))
    cluster.capture_keys()
    params["settle"] = {"seconds": waited, "pending": pending}
    params["replica_health"] = probe_replicas(cluster)
    for a in cluster.agents:
        if not a.running:
            cluster.agent_exits.append(cluster.exit_of(a))
    params["agent_exits"] = cluster.agent_exits
    params["agent_refusals"] = cluster.agent_refusals
    # The final picture: a consistent snapshot, the watchers stopped at its revision, another snapshot.
    first = consistent_snapshot(cluster.database_url)
    cluster.stop_file.write_text(str(first["head_revision"]))
    watch_codes = cluster.wait_clients([c.name for c in cluster.clients if c.role == "watch"], 25.0)
    params["exit_codes"].update(watch_codes)
    final = consistent_snapshot(cluster.database_url)
    final["views"] = [{k: s[k] for k in ("head_revision", "nodes", "consistent")} for s in (first, final)]
    (cluster.workdir / "final.json").write_text(json.dumps(final, default=str))
    params["proxy_stats"] = cluster.proxy.stats() if cluster.proxy else {}
    save_params(cluster.workdir, params)
    faults.say(f"final revision {final['head_revision']} (watchers asked to stop at {first['head_revision']})")


def probe_replicas(cluster: ChaosCluster) -> dict[str, str]:
    """Each replica's health after the settle, asked directly (not through a proxy): SERVING, another
    status, or NO ANSWER (a replica whose event loop is stuck answers nothing). For a replica that
    does not answer, its Python stacks go to logs/<replica>.stacks when py-spy is installed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out: dict[str, str] = {}
    for r in cluster.replicas:
        if r.server is None or not r.up:
            out[r.name] = "NOT RUNNING"
            continue
        try:
            with grpc.insecure_channel(r.server.address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            out[r.name] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            out[r.name] = f"NO ANSWER ({exc.code().name})"
            spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
            if spy and r.server.pid:
                import subprocess

                dump = subprocess.run([spy, "dump", "--pid", str(r.server.pid)], capture_output=True, text=True)
                (cluster.logs / f"{r.name}.stacks").write_text(dump.stdout + dump.stderr)
    return out


def consistent_snapshot(url: str, tries: int = 20) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for _ in range(tries):
        snap = snapshot(url)
        if snap["consistent"]:
            return snap
        time.sleep(0.2)
    return snap


def settle_cluster(cluster: ChaosCluster, timeout: float) -> tuple[float, list[str]]:
    """Waits (bounded) until the cluster is quiet: every agent ONLINE and healthy, no rotation pending,
    every agent's files on the ACTIVE keys, no session on a dead node, every event numbered."""
    from muster.client import keyfiles

    from .history import snapshot as snap_of

    start = time.monotonic()
    hosts = {a.host for a in cluster.agents}
    pending: list[str] = ["nothing checked yet"]
    while time.monotonic() - start < timeout:
        pending = cluster.mend_refused()
        try:
            s = snap_of(cluster.database_url, ("unnumbered", "nodes", "sessions", "key_versions", "holds", "head"))
        except Exception as exc:  # noqa: BLE001 - the database may still be coming back
            pending = [f"database: {type(exc).__name__}"]
            time.sleep(0.5)
            continue
        nodes = {n["host"]: n for n in s["nodes"]}
        bad = [h for h in hosts if h not in nodes or nodes[h]["state"] != 2 or nodes[h]["health"] != 1]
        if bad:
            pending.append(f"agents not ONLINE and healthy: {sorted(bad)}")
        if any(k["state"] == 1 for k in s["key_versions"]):
            pending.append("a key version is still PENDING")
        active = next((k for k in s["key_versions"] if k["state"] == 2), None)
        if active is not None:
            stale = [
                a.name
                for a in cluster.agents
                if keyfiles.check(keyfiles.KeyPaths.in_dir(a.keys_dir)).cookie_fingerprint
                != active["cookie_fingerprint"]
            ]
            if stale:
                pending.append(f"agents' key files not on version {active['version']}: {stale}")
        online = {n["id"] for n in s["nodes"] if n["state"] == 2}
        stranded = [x["id"] for x in s["sessions"] if x["node_id"] not in online]
        if stranded:
            pending.append(f"{len(stranded)} sessions on nodes not ONLINE")
        if s["unnumbered"][0]["n"]:
            pending.append("events not numbered yet")
        if s["holds"]:
            pending.append(f"{len(s['holds'])} lock holds left")
        if not pending:
            break
        time.sleep(0.3)
    return time.monotonic() - start, pending


def report(run: Run, workdir: Path, *, keep: bool) -> int:
    verdicts = checkers.run_all(run)
    print("", flush=True)
    for v in verdicts:
        print(v.report(), flush=True)
    failed = [v for v in verdicts if not v.ok]
    seed = run.params.get("seed")
    if failed:
        print(
            f"\nchaos: FAIL: {len(failed)} of {len(verdicts)} checkers found violations "
            f"({', '.join(v.name for v in failed)}); seed {seed}; the run is kept in {workdir}",
            flush=True,
        )
        return 1
    print(f"\nchaos: PASS: {len(verdicts)} checkers, seed {seed}", flush=True)
    if keep:
        print(f"chaos: the run is kept in {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
