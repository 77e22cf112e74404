"""Muster benchmarks: ``python -m bench [WORKLOAD ...] [--quick]``.

Each workload starts its own control plane (embedded PostgreSQL + registry processes), drives it
from client processes for a bounded time, and prints one line per figure:

    <workload> <value> <unit> (runs N: min..max) p50 X ms p99 Y ms
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from bench import workloads


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"machine {os.cpu_count()} cores, {cpu}, {mem:.0f} GiB, Python {platform.python_version()}"


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
    parser.add_argument("--quick", action="store_true", help="one short run each (CI): no speed claims")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a timed run (default 5)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--no-fsync", action="store_true", help="turn fsync off in the embedded database")
    args = parser.parse_args()
    opts = workloads.Options(
        runs=1 if args.quick else args.runs,
        seconds=1.0 if args.quick else args.seconds,
        concurrency=args.concurrency,
        fsync=not args.no_fsync,
        quick=args.quick,
    )
    print(_machine(), flush=True)
    for name in args.workloads or workloads.ALL:
        print(f"# {name}: {workloads.ALL[name].__doc__.splitlines()[0]}", file=sys.stderr, flush=True)
        workloads.ALL[name](opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
