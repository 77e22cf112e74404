"""The chaos run as a test: a short run with a fixed seed, failing when any checker finds a violation.

It owns its cluster (its own PostgreSQL — a primary and a synchronous standby of Debian's server,
which the nemesis restarts and fails over — never the shared test database) and runs as a separate
process, so nothing of it shares the test's event loop. About 45 s:
30 s of faults, plus setting up, settling and checking. ``MUSTER_CHAOS_SEED`` and
``MUSTER_CHAOS_SECONDS`` change the run; the longer runs are ``make chaos`` (see README.md here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = os.environ.get("MUSTER_CHAOS_SEED", "7")
SECONDS = float(os.environ.get("MUSTER_CHAOS_SECONDS", "30"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SECONDS + 110)]


def test_every_guarantee_holds_under_a_seeded_nemesis() -> None:
    cmd = [
        "setpriv",
        "--pdeathsig",
        "TERM",
        "--",
        sys.executable,
        "-m",
        "tests.chaos",
        "--seconds",
        f"{SECONDS:g}",
        "--seed",
        SEED,
        "--settle",
        "15",
    ]
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=SECONDS + 90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the run stops every process it started, then exits
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the chaos run (seed {SEED}) did not finish in time:\n{out[-6000:]}")
    print(out)
    at = out.find("chaos: stopped every process")
    verdicts = out[at:] if at >= 0 else out[-8000:]
    assert proc.returncode == 0, f"the chaos run with seed {SEED} found violations:\n{verdicts}"
