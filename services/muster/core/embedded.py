"""A real PostgreSQL server run from the binaries bundled in the ``pgserver`` wheel.

The class drives ``initdb`` and ``postgres`` directly (never ``pg_ctl`` and never
pgserver's Python API, which runs ``useradd`` and changes the modes of parent
directories up to ``/``). ``postgres`` is a direct child of the calling process, in
its own process group, so that callers (and tests) can signal it, kill it and start
it again quickly.

PostgreSQL refuses to run as root. When the calling process is root, every binary is
run as the system user ``muster-pg`` (created on demand), the data directory belongs
to that user, and the bundled binaries are copied once into a world-readable cache
when the virtualenv that holds them is not readable by other users.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ["EmbeddedPostgres"]

_ROLE = "muster"
_DATABASE = "muster"
_HOST = "127.0.0.1"
_SYSTEM_USER = "muster-pg"
_CACHE_ROOT = Path("/var/cache/muster")
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_INIT_TIMEOUT = 300.0
_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.02
_PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()

# Servers started by this process and not stopped yet: stopped at interpreter exit.
_LIVE: set[EmbeddedPostgres] = set()


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged user the PostgreSQL binaries run as when the caller is root."""

    uid: int
    gid: int


class EmbeddedPostgres:
    """A PostgreSQL 16 server owned by this process, for development and tests.

    The data directory is created and initialised on the first start and reused by
    later ones, so data persists between runs. The role ``muster`` is a superuser with
    a random password kept in ``<data_dir>.password`` next to the data directory; the
    database ``muster`` exists after the first start. The server only listens on
    127.0.0.1.

    Example:
        >>> with EmbeddedPostgres(Path("/srv/muster/pg")) as pg:  # doctest: +SKIP
        ...     connect(pg.url)
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        fsync: bool = True,
        log_file: Path | None = None,
    ) -> None:
        """Describes a server; nothing runs before :meth:`start`.

        Args:
            data_dir: The PostgreSQL data directory. Created and initialised on the first
                start when it is missing or empty; reused when it holds a cluster.
            port: TCP port on 127.0.0.1. ``None`` picks a free port at each start
                (a restart keeps the port).
            fsync: ``False`` runs with ``fsync=off`` and ``full_page_writes=off``: faster,
                but a machine crash can corrupt the cluster. For tests only.
            log_file: Where the server's output goes (appended). Defaults to
                ``<data_dir>.log`` next to the data directory.
        """
        self._data_dir = Path(os.path.abspath(data_dir))
        self._requested_port = port
        self._port: int | None = port
        self._fsync = fsync
        default_log = self._data_dir.parent / f"{self._data_dir.name}.log"
        self._log_file = Path(os.path.abspath(log_file)) if log_file is not None else default_log
        self._password_file = self._data_dir.parent / f"{self._data_dir.name}.password"
        self._password: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._temp_socket_dir: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> None:
        """Initialises the cluster if needed, starts the server and waits until it is ready.

        Does nothing when the server is already running. A server that is exiting
        (just killed, or shutting down after a signal sent from outside) is waited for,
        then started again.

        Args:
            timeout: Seconds to wait for the server to accept connections (a first
                ``initdb`` is not counted).

        Raises:
            RuntimeError: The cluster could not be initialised, or the server exited or
                did not accept connections in time (the message ends with the tail of
                the server log).
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if not self._exiting(proc.pid):
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._forget_dead_child()
        self._start(self._requested_port, timeout)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stops the server and waits for it to exit. Idempotent.

        Args:
            mode: ``"smart"`` (SIGTERM: waits for clients to disconnect), ``"fast"``
                (SIGINT: disconnects clients, then a shutdown checkpoint) or
                ``"immediate"`` (SIGQUIT: no checkpoint; the next start runs recovery).
            timeout: Seconds to wait before the server is killed with SIGKILL.

        Raises:
            ValueError: ``mode`` is not one of the three above.
        """
        try:
            sig = _STOP_SIGNALS[mode]
        except KeyError:
            raise ValueError(f"mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}") from None
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Backends are only left over when the postmaster itself was killed.
            self._kill_leftovers()
            self._proc = None
        _LIVE.discard(self)
        if self._temp_socket_dir is not None:
            shutil.rmtree(self._temp_socket_dir, ignore_errors=True)
            self._temp_socket_dir = None

    def restart(self, mode: str = "fast") -> None:
        """Stops the server and starts it again on the same port.

        Args:
            mode: The stop mode; see :meth:`stop`.

        Raises:
            RuntimeError: The server did not come back; see :meth:`start`.
        """
        port = self._port
        self.stop(mode)
        self._start(port, 60.0)

    def __enter__(self) -> EmbeddedPostgres:
        """Starts the server.

        Returns:
            This object.
        """
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops the server."""
        self.stop()

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """The DSN of the ``muster`` database as the ``muster`` role.

        Raises:
            RuntimeError: The server was never started (no port or password yet).
        """
        return self.admin_url(_DATABASE)

    def admin_url(self, database: str = "postgres") -> str:
        """The DSN of another database of the cluster, as the superuser ``muster``.

        Args:
            database: The database name.

        Returns:
            ``postgresql://muster:<password>@127.0.0.1:<port>/<database>``.

        Raises:
            RuntimeError: The server was never started (no port or password yet).
        """
        if self._port is None:
            raise RuntimeError("the port is not known before the first start()")
        password = self._read_password()
        if password is None:
            raise RuntimeError(f"no password file at {self._password_file}; call start() first")
        return f"postgresql://{_ROLE}:{quote(password, safe='')}@{_HOST}:{self._port}/{quote(database, safe='')}"

    @property
    def pid(self) -> int | None:
        """The PID of the postmaster, or ``None`` when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the postmaster started by this object is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ internals

    def _start(self, port: int | None, timeout: float) -> None:
        install = _install_dir()
        run_as = _run_as()
        if run_as is not None:
            self._prepare_parent_for(run_as)
        else:
            self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        password, new_password = self._ensure_password()
        created = self._ensure_cluster(install, run_as, password)
        self._fix_data_dir(run_as)
        self._kill_leftovers()
        if new_password and not created:
            # An existing cluster whose password file was lost: give it the new password.
            self._single_user(install, run_as, self._data_dir, f"ALTER ROLE {_ROLE} PASSWORD '{password}'")
        self._prepare_log(run_as)

        pick_port = port is None
        deadline = time.monotonic() + timeout
        while True:
            if port is None:
                port = _free_port()
            socket_dir = self._socket_dir(port, run_as)
            log_offset = _size(self._log_file)
            proc = self._spawn(install, run_as, port, socket_dir)
            self._proc, self._port = proc, port
            failure = self._wait_ready(install, run_as, proc, port, deadline)
            if failure is None:
                _LIVE.add(self)
                return
            self.stop("immediate", timeout=5.0)
            log = _read_from(self._log_file, log_offset)
            retry = time.monotonic() < deadline and (
                (pick_port and "Address already in use" in log)
                # Backends of a killed postmaster that have not noticed yet.
                or "pre-existing shared memory block" in log
            )
            if not retry:
                raise RuntimeError(
                    f"PostgreSQL in {self._data_dir} {failure}; last lines of {self._log_file}:\n"
                    + _tail(log or _read_from(self._log_file, 0))
                )
            if pick_port:
                port = None
            time.sleep(0.1)

    def _spawn(self, install: Path, run_as: _RunAs | None, port: int, socket_dir: Path) -> subprocess.Popen[bytes]:
        args = [
            str(install / "bin" / "postgres"),
            "-D", str(self._data_dir),
            "-p", str(port),
            "-c", f"listen_addresses={_HOST}",
            "-c", f"unix_socket_directories={socket_dir}",
            "-c", "max_connections=300",
            "-c", "shared_buffers=128MB",
        ]  # fmt: skip
        if not self._fsync:
            args += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        with open(self._log_file, "ab") as log:
            return subprocess.Popen(
                _argv(run_as, args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                env=_child_env(),
                # Its own process group: a Ctrl-C meant for the caller does not reach it.
                process_group=0,
            )

    def _wait_ready(
        self,
        install: Path,
        run_as: _RunAs | None,
        proc: subprocess.Popen[bytes],
        port: int,
        deadline: float,
    ) -> str | None:
        """Polls until the server accepts connections; returns why it failed, or None."""
        pid_file = self._data_dir / "postmaster.pid"
        pg_isready = [
            str(install / "bin" / "pg_isready"),
            "-q", "-h", _HOST, "-p", str(port), "-U", _ROLE, "-d", _DATABASE, "-t", "5",
        ]  # fmt: skip
        while True:
            code = proc.poll()
            if code is not None:
                return f"exited with code {code}"
            if _postmaster_ready(pid_file, proc.pid) and _accepts_tcp(port):
                ready = subprocess.run(
                    _argv(run_as, pg_isready),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=self._data_dir.parent,
                    env=_child_env(),
                    check=False,
                )
                if ready.returncode == 0 and proc.poll() is None:
                    return None
            if time.monotonic() >= deadline:
                return "did not accept connections in time"
            time.sleep(_POLL_INTERVAL)

    def _exiting(self, pid: int) -> bool:
        """Whether the live postmaster ``pid`` is about to exit.

        ``os.kill(pid, SIGKILL)`` returns before the process is gone: the pending
        signal or the kernel's PF_EXITING flag says it is on its way out. Once the
        postmaster has handled a shutdown signal, postmaster.pid says "stopping".
        """
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True
        fields = stat_line[stat_line.rfind(")") + 2 :].split()
        if fields[0] in ("Z", "X", "x") or int(fields[6]) & _PF_EXITING:
            return True
        fatal = sum(1 << (sig - 1) for sig in (signal.SIGKILL, *_STOP_SIGNALS.values()))
        for line in status.splitlines():
            if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & fatal:
                return True
        try:
            lines = (self._data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return True
        return len(lines) >= 8 and lines[7].strip() == "stopping"

    def _forget_dead_child(self) -> None:
        if self._proc is not None:
            self.stop("immediate", timeout=5.0)

    def _read_password(self) -> str | None:
        if self._password is None:
            try:
                self._password = self._password_file.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                return None
        return self._password

    def _ensure_password(self) -> tuple[str, bool]:
        """Returns the stored password and whether it was just created (0600 file)."""
        password = self._read_password()
        if password is not None:
            if not password:
                raise RuntimeError(f"the password file {self._password_file} is empty")
            return password, False
        password = secrets.token_urlsafe(24)
        fd, tmp = tempfile.mkstemp(prefix=f".{self._password_file.name}.", dir=self._password_file.parent)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, password.encode() + b"\n")
            os.fsync(fd)
            os.close(fd)
            fd = -1
            try:
                os.link(tmp, self._password_file)
            except FileExistsError:
                pass  # Another process won; use its password.
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
        self._password = None
        stored = self._read_password()
        if not stored:
            raise RuntimeError(f"the password file {self._password_file} is empty")
        return stored, stored == password

    def _ensure_cluster(self, install: Path, run_as: _RunAs | None, password: str) -> bool:
        """Runs initdb and creates the ``muster`` database unless the cluster exists.

        The cluster is built in a temporary sibling directory and renamed into place,
        so an interrupted first start leaves no half-initialised data directory.

        Returns:
            Whether a new cluster was created.
        """
        data = self._data_dir
        if (data / "PG_VERSION").is_file():
            return False
        if data.exists() and any(data.iterdir()):
            raise RuntimeError(f"{data} is neither empty nor a PostgreSQL data directory")
        build = Path(tempfile.mkdtemp(prefix=f".{data.name}.initdb-", dir=data.parent))
        pw_fd, pw_file = tempfile.mkstemp(prefix=f".{data.name}.pw-", dir=data.parent)
        try:
            os.write(pw_fd, password.encode() + b"\n")
            os.close(pw_fd)
            pw_fd = -1
            if run_as is not None:
                os.chown(build, run_as.uid, run_as.gid)
                os.chown(pw_file, run_as.uid, run_as.gid)
            initdb = [
                str(install / "bin" / "initdb"),
                "-D", str(build),
                f"--username={_ROLE}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pw_file}",
                "--encoding=UTF8",
                "--locale=C",
            ]  # fmt: skip
            if not self._fsync:
                initdb.append("--no-sync")
            self._run_logged(initdb, run_as, "initdb")
        finally:
            if pw_fd >= 0:
                os.close(pw_fd)
            os.unlink(pw_file)
        try:
            self._single_user(install, run_as, build, f"CREATE DATABASE {_DATABASE}")
            if data.exists():
                data.rmdir()
            os.rename(build, data)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        return True

    def _single_user(self, install: Path, run_as: _RunAs | None, data: Path, statement: str) -> None:
        """Runs one SQL statement in single-user mode (the server must not be running)."""
        args = [str(install / "bin" / "postgres"), "--single", "-D", str(data)]
        if not self._fsync:
            args += ["-c", "fsync=off"]
        what = statement.split(" PASSWORD ", 1)[0]
        out = self._run_logged([*args, "postgres"], run_as, what, stdin=f"{statement};\n")
        # Single-user mode exits with 0 after an ERROR.
        if "ERROR:" in out or "FATAL:" in out:
            raise RuntimeError(f"{what} failed in {data}:\n{_tail(out)}")

    def _run_logged(self, args: list[str], run_as: _RunAs | None, what: str, stdin: str = "") -> str:
        """Runs a setup command, appends its output to the log, and raises if it fails."""
        try:
            done = subprocess.run(
                _argv(run_as, args),
                input=stdin.encode(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir.parent,
                env=_child_env(),
                timeout=_INIT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{what} for {self._data_dir} timed out after {_INIT_TIMEOUT:.0f} s") from exc
        out: str = bytes(done.stdout).decode(errors="replace")
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_file, "a", encoding="utf-8") as log:
            log.write(f"--- {what} ---\n{out}")
        if done.returncode != 0:
            raise RuntimeError(f"{what} for {self._data_dir} failed with code {done.returncode}:\n{_tail(out)}")
        return out

    def _prepare_parent_for(self, run_as: _RunAs) -> None:
        """Makes sure the data directory's parent can be traversed by the server's user."""
        parent = self._data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        for ancestor in parent.parents:
            if not _traversable_by(ancestor, run_as):
                raise RuntimeError(
                    f"{ancestor} cannot be traversed by the user {_SYSTEM_USER} that runs PostgreSQL "
                    f"(mode {stat.filemode(ancestor.stat().st_mode)}): run `chmod o+x {ancestor}` "
                    f"or put the data directory {self._data_dir} elsewhere"
                )
        if not _traversable_by(parent, run_as):
            os.chmod(parent, stat.S_IMODE(parent.stat().st_mode) | stat.S_IXOTH)

    def _fix_data_dir(self, run_as: _RunAs | None) -> None:
        """Gives the data directory the owner and mode PostgreSQL insists on."""
        data = self._data_dir
        st = data.stat()
        if run_as is not None and st.st_uid != run_as.uid:
            for root, dirs, files in os.walk(data):
                for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                    os.lchown(name, run_as.uid, run_as.gid)
        if stat.S_IMODE(st.st_mode) & 0o027:
            os.chmod(data, 0o700)

    def _kill_leftovers(self, timeout: float = 10.0) -> None:
        """SIGKILLs the processes a killed postmaster left behind on this data directory.

        A backend busy in a query does not notice at once that its postmaster died, and
        keeps the shared memory that stops a new postmaster from starting. Children
        call setsid(), so they are found by their working directory (the data directory)
        instead of by process group. Nothing is done while postmaster.pid names a live
        process: those processes belong to a running server.
        """
        try:
            pid = int((self._data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _alive(pid):
            return
        deadline = time.monotonic() + timeout
        while leftovers := _postgres_processes_in(self._data_dir):
            for leftover in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"postgres processes {leftovers} of {self._data_dir} survive SIGKILL")
            time.sleep(_POLL_INTERVAL)

    def _prepare_log(self, run_as: _RunAs | None) -> None:
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_file.touch()
        if run_as is not None:
            os.chown(self._log_file, run_as.uid, run_as.gid)

    def _socket_dir(self, port: int, run_as: _RunAs | None) -> Path:
        """A short directory for the Unix socket: ``<data_dir>/sock``, else a temp dir."""
        candidate = self._data_dir / "sock"
        if not _socket_dir_usable(candidate, port):
            if self._temp_socket_dir is None:
                base = tempfile.gettempdir()
                if not _socket_dir_usable(Path(base) / "muster-pg-xxxxxxxx", port):
                    base = "/tmp"
                self._temp_socket_dir = Path(tempfile.mkdtemp(prefix="muster-pg-", dir=base))
            candidate = self._temp_socket_dir
        candidate.mkdir(mode=0o700, exist_ok=True)
        if run_as is not None:
            os.chown(candidate, run_as.uid, run_as.gid)
        return candidate


# ---------------------------------------------------------------------- helpers


def _socket_dir_usable(directory: Path, port: int) -> bool:
    text = str(directory)
    return len(f"{text}/.s.PGSQL.{port}".encode()) <= _MAX_SOCKET_PATH and not any(c in text for c in ",\"' \t\n")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _postmaster_ready(pid_file: Path, pid: int) -> bool:
    """Whether postmaster.pid names ``pid`` and says the server accepts connections."""
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _postgres_processes_in(directory: Path) -> list[int]:
    """Live (non-zombie) processes named ``postgres`` whose working directory is ``directory``."""
    wanted = os.path.realpath(directory)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            data = Path(entry.path, "stat").read_text()
            if data[data.find("(") + 1 : data.rfind(")")] != "postgres":
                continue
            if data[data.rfind(")") + 2 :].split()[0] == "Z":
                continue
            if os.readlink(os.path.join(entry.path, "cwd")) == wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    """The environment of the binaries: no PG* or locale variables, and LC_ALL=C."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "LC_")) and key not in ("LANG", "LANGUAGE")
    }
    env["LC_ALL"] = "C"
    return env


def _argv(run_as: _RunAs | None, args: list[str]) -> list[str]:
    """The command, run as ``run_as`` through setpriv when given.

    Not Popen's ``user=``/``group=``: with those CPython cannot vfork and falls back to fork(),
    which runs gRPC's atfork handlers in a process with live gRPC threads and crashes the child
    before exec. setpriv changes the ids after exec instead, and drops root's extra groups.
    """
    if run_as is None:
        return args
    return ["setpriv", f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--clear-groups", "--", *args]


def _traversable_by(path: Path, run_as: _RunAs) -> bool:
    st = path.stat()
    if st.st_uid == run_as.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    return bool(st.st_mode & stat.S_IXOTH)


@functools.cache
def _run_as() -> _RunAs | None:
    """``None`` for an ordinary user; for root, the ``muster-pg`` user (created if missing)."""
    if os.geteuid() != 0:
        return None
    last_error = ""
    for _ in range(50):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(_SYSTEM_USER)
            return _RunAs(entry.pw_uid, entry.pw_gid)
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SYSTEM_USER],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        # 0: created; 9: a concurrent process created it; others (e.g. 10, /etc/passwd is
        # locked by a concurrent useradd): look again, then retry.
        if done.returncode not in (0, 9):
            time.sleep(0.1)
        last_error = done.stderr.decode(errors="replace").strip()
    raise RuntimeError(f"could not create the system user {_SYSTEM_USER}: {last_error}")


def _bundled_install() -> tuple[Path, Path]:
    """The ``pginstall`` directory of the pgserver wheel and its ``pgserver.libs``.

    pgserver is located without importing it (its import has side effects).
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed (pip install 'muster[server]')")
    package = Path(next(iter(spec.submodule_search_locations)))
    # The client binaries find libpq through RPATH $ORIGIN/../../../pgserver.libs.
    return package / "pginstall", package.parent / "pgserver.libs"


@functools.cache
def _install_dir() -> Path:
    """The ``pginstall`` directory to run binaries from (a world-readable copy for root)."""
    pginstall, libs = _bundled_install()
    if not (pginstall / "bin" / "postgres").is_file():
        raise RuntimeError(f"no PostgreSQL binaries in {pginstall / 'bin'}")
    if os.geteuid() != 0 or _readable_by_others(pginstall, libs):
        return pginstall
    return _cached_copy(pginstall, libs)


def _readable_by_others(pginstall: Path, libs: Path) -> bool:
    """Whether users other than the owner can reach and run every bundled file."""
    for ancestor in pginstall.parent.parents:
        if not ancestor.stat().st_mode & stat.S_IXOTH:
            return False
    if not pginstall.parent.stat().st_mode & stat.S_IXOTH:
        return False
    for top in (pginstall, libs):
        if not top.is_dir():
            continue
        for root, _dirs, files in os.walk(top):
            mode = os.stat(root).st_mode
            if mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
                return False
            for name in files:
                mode = os.stat(os.path.join(root, name)).st_mode
                if not mode & stat.S_IROTH or (mode & stat.S_IXUSR and not mode & stat.S_IXOTH):
                    return False
    return True


def _pg_version(pginstall: Path) -> str:
    with contextlib.suppress(OSError):
        for line in (pginstall / "include" / "pg_config.h").read_text().splitlines():
            if line.startswith("#define PG_VERSION "):
                return line.split('"')[1]
    return "unknown"


def _cached_copy(pginstall: Path, libs: Path) -> Path:
    """Copies the binaries once into /var/cache/muster, atomically, world-readable.

    The copy keeps the wheel's layout (``pgserver/pginstall`` next to ``pgserver.libs``)
    because the binaries find libpq relative to themselves.
    """
    digest = hashlib.sha256(str(pginstall).encode()).hexdigest()[:12]
    final = _CACHE_ROOT / f"pginstall-{_pg_version(pginstall)}-{digest}"
    target = final / "pgserver" / "pginstall"
    if (target / "bin" / "postgres").is_file():
        return target
    _CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(_CACHE_ROOT, 0o755)
    for ancestor in _CACHE_ROOT.parents:
        if not ancestor.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{ancestor} is not traversable by other users; run `chmod o+x {ancestor}`")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=_CACHE_ROOT))
    try:
        shutil.copytree(pginstall, tmp / "pgserver" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, tmp / "pgserver.libs", symlinks=True)
        for root, _dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    executable = os.stat(path).st_mode & stat.S_IXUSR
                    os.chmod(path, 0o755 if executable else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            # A concurrent process renamed its copy first.
            if not (target / "bin" / "postgres").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@atexit.register
def _stop_all() -> None:
    """Stops the servers this process started and did not stop."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop("fast", timeout=10.0)
