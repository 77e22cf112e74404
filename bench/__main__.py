"""Muster benchmarks: ``python -m bench [WORKLOAD ...] [--quick] [--against etcd]``.

Each workload starts its own control plane (embedded PostgreSQL + registry processes), drives it
from client processes for a bounded time, and prints one line per figure:

    <workload> <value> <unit> (runs N: min..max) p50 X ms p99 Y ms

At the end it writes a PNG of every figure's latencies (``--plot``, default bench-latency.png) and,
with ``--json PATH``, the figures as JSON for comparing runs. With ``--against etcd``, each comparable
workload is followed by its etcd peer, and the run ends with one line per compared figure:

    <workload> muster X etcd Y ratio Z

See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

from bench import heartbeats, scale, workloads

# Registered here (bench.heartbeats imports bench.workloads for its helpers), after `heartbeats`.
_order = list(workloads.ALL.items())
_order.insert(1 + [n for n, _ in _order].index("heartbeats"), ("heartbeats-absorbed", heartbeats.heartbeats_absorbed))
workloads.ALL.clear()
workloads.ALL.update(_order)
workloads.ALL["scale"] = scale.scale


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"machine {os.cpu_count()} cores, {cpu}, {mem:.0f} GiB, Python {platform.python_version()}"


def _positive(kind: type) -> object:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def _write_json(path: str, machine: str, argv: list[str]) -> None:
    doc = {
        "machine": machine,
        "argv": argv,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "figures": [
            {"name": f.name, "value": f.value, "unit": f.unit, "runs": f.runs, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms}
            for f in workloads.FIGURES
        ],
    }
    with open(path, "w") as out:
        json.dump(doc, out, indent=2)
        out.write("\n")
    print(f"figures written to {path}", flush=True)


def _write_plot(path: str, machine: str) -> None:
    try:
        from bench import plot
    except ImportError as e:  # pragma: no cover - matplotlib is in the dev extra
        print(f"no plot: {e} (pip install -e '.[dev]')", file=sys.stderr, flush=True)
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        written = plot.write(workloads.FIGURES, path, f"python -m bench {' '.join(sys.argv[1:])}  ({stamp})\n{machine}")
    except ImportError as e:  # pragma: no cover
        print(f"no plot: {e} (pip install -e '.[dev]')", file=sys.stderr, flush=True)
        return
    if written is None:
        print("no plot: no figure recorded latencies", file=sys.stderr, flush=True)
    else:
        print(f"latency plot written to {written}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "workloads",
        nargs="*",
        choices=[[], *workloads.ALL],
        metavar="WORKLOAD",
        help=f"any of: {', '.join(workloads.ALL)} (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one run of one second each unless --runs/--seconds say otherwise (CI)"
    )
    parser.add_argument("--runs", type=_positive(int), help="runs per figure (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=_positive(float), help="length of a timed run (default 5; --quick: 1)")
    parser.add_argument(
        "--concurrency",
        type=_positive(int),
        help="concurrent clients, or watchers for fanout (default: each workload's own: 64; "
        "locks 1, 16, 64; locks-contended 16, 64; fanout 1, 100, 1000)",
    )
    parser.add_argument(
        "--replicas",
        type=_positive(int),
        help="server replicas, client processes spread over them (default: each workload's own: 1; "
        "changes and grpc-floor 2; upserts and log ignore it)",
    )
    parser.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        help="server processes per replica on one port (muster serve --workers; default 1)",
    )
    parser.add_argument("--no-fsync", action="store_true", help="turn fsync off in the embedded database")
    parser.add_argument(
        "--plot", default="bench-latency.png", metavar="PATH", help="latency PNG to write (default %(default)s)"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (to compare runs)")
    parser.add_argument(
        "--against",
        choices=["etcd"],
        help="after each comparable workload (locks, locks-contended, fanout, heartbeats-absorbed, changes) "
        "run the same shape of work against a private etcd 3.4, and print muster/etcd ratios at the end",
    )
    args = parser.parse_args()
    if args.against == "etcd":
        from bench import etcd

        why = etcd.missing()
        if why is not None:
            print(f"--against etcd: {why}", file=sys.stderr, flush=True)
            return 1
    opts = workloads.Options(
        runs=args.runs or (1 if args.quick else 3),
        seconds=args.seconds or (1.0 if args.quick else 5.0),
        concurrency=args.concurrency or 64,
        fsync=not args.no_fsync,
        quick=args.quick,
        concurrency_given=args.concurrency is not None,
        replicas=args.replicas,
        workers=args.workers,
    )
    machine = _machine()
    print(machine, flush=True)
    if args.against == "etcd":
        print(f"against {etcd.version()}", flush=True)
    try:
        for name in args.workloads or workloads.ALL:
            print(f"# {name}: {workloads.ALL[name].__doc__.splitlines()[0]}", file=sys.stderr, flush=True)
            first = len(workloads.FIGURES)
            workloads.ALL[name](opts)
            if args.against == "etcd" and name in etcd.PEERS:
                peer = etcd.PEERS[name]
                print(f"# {name} against etcd: {peer.__doc__.splitlines()[0]}", file=sys.stderr, flush=True)
                peer(opts, workloads.FIGURES[first:])
    finally:  # what was measured is kept even when a workload fails
        if args.against == "etcd":
            etcd.print_comparison()
        if args.json:
            _write_json(args.json, machine, sys.argv[1:])
        if not args.no_plot:
            _write_plot(args.plot, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
