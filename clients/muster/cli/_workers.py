"""``--workers N``: N server processes sharing one port (SO_REUSEPORT), each a full replica.

The parent imports no gRPC: it picks the port (a free one for port 0, held with SO_REUSEPORT until
every worker listens), starts the workers as new interpreters (``subprocess``, never a fork of a
process that loaded gRPC), prints one ready line when all of them serve, and forwards SIGTERM and
SIGINT to them. Connections, not RPCs, are split between workers by the kernel; each worker has its
own pool, event bus (LISTEN connection) and background work, as any replica does.

A worker that dies is reported, the others are stopped gracefully and the parent exits 1: the
supervisor that started the parent (systemd, Kubernetes) restarts the replica as a whole, and a
crash loop shows as one instead of being hidden by restarts inside.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

WORKER_OF = "MUSTER_WORKER_OF"  # in a worker's environment: the parent's pid
_READY = re.compile(r"muster: serving .* on (\S+) \(database")


def is_worker() -> bool:
    """Whether this process was started by a ``--workers`` parent."""
    return bool(os.environ.get(WORKER_OF))


def parent_gone() -> bool:
    """Whether the parent that started this worker has exited (the worker then stops)."""
    return str(os.getppid()) != os.environ.get(WORKER_OF, "")


def die_with_parent() -> None:
    """Asks Linux to send this worker SIGTERM when its parent dies, even by SIGKILL (elsewhere a no-op;
    :func:`parent_gone` is the fallback the worker polls)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def _hold_port(host: str) -> socket.socket:
    """A socket bound to a free port of ``host`` with SO_REUSEPORT, so that workers can bind it too."""
    bare = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bare, 0))
    return sock


def run(
    argv: list[str],
    *,
    workers: int,
    listen: str,
    env: dict[str, str],
    announce: Callable[[str, list[int]], None],
    ready_timeout: float,
    grace: float,
) -> int:
    """Runs ``workers`` processes of ``muster <argv> --listen HOST:PORT`` until SIGTERM; returns the exit code.

    Args:
        argv: the worker's command line after ``muster`` (without ``--listen`` and ``--workers``).
        workers: how many processes.
        listen: host:port; port 0 picks a free port for all of them.
        env: extra environment of the workers.
        announce: called with the address and the workers' pids once every worker serves.
        ready_timeout: how long a worker may take to serve.
        grace: how long stopped workers may take to exit before they are killed.
    """
    host, port = _split(listen)
    holder = _hold_port(host) if port == 0 else None
    if holder is not None:
        port = holder.getsockname()[1]
    address = f"{host}:{port}"
    stopping = threading.Event()

    def on_signal(_sig: int, _frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    child_env = {**os.environ, **env, WORKER_OF: str(os.getpid()), "MUSTER_WORKERS": "1"}
    cmd = [sys.executable, "-m", "muster.cli.main", *argv, "--listen", address]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(workers):
            procs.append(subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE))
        code = _supervise(procs, ready_timeout, stopping, holder, lambda: announce(address, [p.pid for p in procs]))
    finally:
        if holder is not None:
            holder.close()
        stopped = _stop(procs, grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code or stopped


def _supervise(
    procs: list[subprocess.Popen[bytes]],
    ready_timeout: float,
    stopping: threading.Event,
    holder: socket.socket | None,
    announce: Callable[[], None],
) -> int:
    """Waits for every worker to serve, then until a signal (0) or a worker's death (1)."""
    if not _await_ready(procs, ready_timeout, stopping):
        return 0 if stopping.is_set() else 1
    if holder is not None:
        holder.close()  # every worker has bound the port: it is theirs now
    for p in procs:
        threading.Thread(target=_forward, args=(p,), daemon=True).start()
    announce()
    while not stopping.wait(0.2):
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            for p in dead:
                print(f"muster: worker {p.pid} exited with {p.returncode}; stopping the others", file=sys.stderr)
            return 1
    return 0


def _await_ready(procs: list[subprocess.Popen[bytes]], timeout: float, stopping: threading.Event) -> bool:
    """Reads each worker's output until it says it serves; False when one exits or time runs out."""
    pending = {p.stdout.fileno(): (p, b"") for p in procs if p.stdout is not None}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline and not stopping.is_set():
        ready, _, _ = select.select(list(pending), [], [], 0.2)
        for fd in ready:
            p, buf = pending[fd]
            chunk = os.read(fd, 4096)
            buf += chunk
            if _READY.search(buf.decode(errors="replace")):
                del pending[fd]
                continue
            pending[fd] = (p, buf)
            if not chunk:
                print(f"muster: worker {p.pid} exited before serving", file=sys.stderr)
                return False
        for p, _ in list(pending.values()):
            if p.poll() is not None:
                print(f"muster: worker {p.pid} exited with {p.returncode} before serving", file=sys.stderr)
                return False
    if pending and not stopping.is_set():
        print(f"muster: {len(pending)} worker(s) did not serve within {timeout:.0f}s", file=sys.stderr)
    return not pending


def _forward(p: subprocess.Popen[bytes]) -> None:
    """Copies a worker's later output to ours (and keeps its pipe from filling)."""
    assert p.stdout is not None
    for line in p.stdout:
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen[bytes]], grace: float) -> int:
    """SIGTERM to every worker still running, then wait (SIGKILL after ``grace``); the worst exit code."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    worst = 0
    for p in procs:
        try:
            rc = p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        if rc not in (0, -signal.SIGTERM):
            worst = 1
    return worst
