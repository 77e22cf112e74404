"""The bench's etcd comparison: its ratio lines, and what `--against etcd` does without etcd."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import etcd  # noqa: E402
from bench.workloads import Figure  # noqa: E402


def _figure(name: str, value: float, p50: float = 1.0, p99: float = 2.0) -> Figure:
    return Figure(name, value, "cycles/s", [value], p50, p99, [p50 / 1000])


def test_comparison_lines_give_muster_etcd_and_the_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd, "PAIRS", [])
    muster = _figure("lock-cycles contended c=16 replicas=1", 150, p99=300.0)
    peer = _figure("etcd lock-cycles contended c=16", 300, p99=100.0)
    etcd._pair("lock-cycles contended c=16", muster, peer, "rate")
    etcd._pair("lock-cycles contended c=16", muster, peer, "p99")
    etcd._pair("fanout watchers=1000", None, peer, "p99")  # not measured on one side: no line

    rate, p99 = etcd.comparison_lines()

    assert rate.startswith("lock-cycles contended c=16 muster 150 etcd 300 ratio 0.50 ")
    assert "above 1: muster faster" in rate
    assert p99.startswith("lock-cycles contended c=16 p99 muster 300.00 ms etcd 100.00 ms ratio 3.00 ")
    assert "below 1: muster faster" in p99


def test_against_etcd_without_etcd_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import __main__ as bench_main

    monkeypatch.setattr(etcd, "binary", lambda: None)
    monkeypatch.setattr(sys, "argv", ["bench", "locks", "--against", "etcd", "--no-plot"])

    assert bench_main.main() == 1
    err = capsys.readouterr().err
    assert "apt-get install -y -qq etcd-server" in err
