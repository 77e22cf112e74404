"""A node's local key files: reading, checking, fingerprinting, writing, and encrypt-password.

The files are the reference products' three: the secure cookie key (its bytes are the key, taken
exactly as stored), the launcher private key (PEM) and the launcher public key (PEM). A key file
must not be readable by group or others. Received keys are written atomically: a temporary file in
the same directory with mode 0600, fsync, rename over the target, fsync of the directory.

During a rotation a PENDING version is written beside each file as ``<file>.d/<version>``; the file
itself is replaced (from that copy) only when the version is promoted, and the copy of a retired
version is removed. :func:`decrypt_password` looks in the file and in ``<file>.d/``, so a password
encrypted under a RETIRING version stays readable.

Fingerprints (the first 16 hex digits of a SHA-256: over the cookie key's bytes, and over the
launcher public key's DER SubjectPublicKeyInfo — the values the keys service compares), the
``<file>.d/`` layout and encrypt-password are rules of the contract, written once in
:mod:`muster.api.rules` and re-exported here. Nothing here logs, and no error message carries key bytes.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from muster.api import rules
from muster.api.rules import COOKIE_KEY_BYTES as COOKIE_KEY_BYTES
from muster.api.rules import GENERATE_HINT as GENERATE_HINT
from muster.api.rules import MIN_COOKIE_KEY_BYTES as MIN_COOKIE_KEY_BYTES
from muster.api.rules import PASSWORD_INFO as PASSWORD_INFO
from muster.api.rules import PASSWORD_PREFIX as PASSWORD_PREFIX
from muster.api.rules import cookie_fingerprint as cookie_fingerprint
from muster.api.rules import cookie_key_candidates as cookie_key_candidates
from muster.api.rules import encrypt_password as encrypt_password
from muster.api.rules import fingerprint_bytes as fingerprint_bytes
from muster.api.rules import public_key_fingerprint as public_key_fingerprint
from muster.api.rules import version_dir

# ``cryptography`` is imported inside the functions that need it, so that importing the client
# (which a base install does) never requires it; reading a cookie key and its fingerprint do not.

COOKIE_FILE = "secure-cookie-key"
LAUNCHER_FILE = "launcher.pem"
LAUNCHER_PUB_FILE = "launcher.pub"

# Local problems, named like the node statuses (and ErrorReason values) they lead to.
INVALID_KEY_PERMISSIONS = "INVALID_KEY_PERMISSIONS"
INVALID_SECURE_COOKIE_KEY = "INVALID_SECURE_COOKIE_KEY"
ERROR_READING_LAUNCHER_KEY = "ERROR_READING_LAUNCHER_KEY"
INVALID_LAUNCHER_KEY = "INVALID_LAUNCHER_KEY"


@dataclass(frozen=True, slots=True)
class KeyPaths:
    """Where a node keeps its key files (the agent's ``--secure-cookie-key-file`` and friends)."""

    secure_cookie_key: Path
    launcher_key: Path
    launcher_pub: Path

    @classmethod
    def in_dir(cls, directory: Path) -> KeyPaths:
        """The standard names in one directory: secure-cookie-key, launcher.pem, launcher.pub."""
        d = Path(directory)
        return cls(d / COOKIE_FILE, d / LAUNCHER_FILE, d / LAUNCHER_PUB_FILE)

    def all(self) -> tuple[Path, Path, Path]:
        """The three paths."""
        return self.secure_cookie_key, self.launcher_key, self.launcher_pub


@dataclass(frozen=True, slots=True)
class KeyFileProblem:
    """Why local key files cannot be used: ``reason`` is the node status it leads to."""

    reason: str
    path: Path
    message: str
    mode: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class LocalKeys:
    """What :func:`check` found: fingerprints of the keys present, and any problems.

    The key bytes are kept (for an upload) but hidden from ``repr``.
    """

    cookie_fingerprint: str = ""
    launcher_fingerprint: str = ""
    cookie_key: bytes = field(default=b"", repr=False)
    launcher_private_pem: str = field(default="", repr=False)
    launcher_public_pem: str = ""
    problems: tuple[KeyFileProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """No problems."""
        return not self.problems

    @property
    def empty(self) -> bool:
        """No key file present."""
        return not self.cookie_fingerprint and not self.launcher_fingerprint


def _mode_problem(path: Path) -> KeyFileProblem | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return KeyFileProblem(
            INVALID_KEY_PERMISSIONS,
            path,
            f"key file {path} has mode {mode:04o}; it must not be readable by group or others: chmod 600 {path}",
            mode,
        )
    return None


def read_cookie_key(path: Path) -> tuple[bytes, KeyFileProblem | None]:
    """A cookie key file's bytes (b"" when it does not exist) and its problem, if any."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b"", None
    except OSError as exc:
        return b"", KeyFileProblem(INVALID_SECURE_COOKIE_KEY, path, f"cannot read {path}: {exc.strerror}")
    problem = _mode_problem(path)
    if problem is None and len(data) < MIN_COOKIE_KEY_BYTES:
        problem = KeyFileProblem(
            INVALID_SECURE_COOKIE_KEY,
            path,
            f"secure cookie key {path} is {len(data)} bytes; it needs at least {MIN_COOKIE_KEY_BYTES} bytes of "
            f"random data: {GENERATE_HINT}",
        )
    return data, problem


def read_launcher_pair(
    private_path: Path, public_path: Path | None = None
) -> tuple[str, str, str, KeyFileProblem | None]:
    """The launcher private key PEM, public key PEM and fingerprint ("" when absent), and any problem."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    private_path = Path(private_path)
    try:
        pem = private_path.read_bytes()
    except FileNotFoundError:
        return "", "", "", None
    except OSError as exc:
        return (
            "",
            "",
            "",
            KeyFileProblem(ERROR_READING_LAUNCHER_KEY, private_path, f"cannot read {private_path}: {exc.strerror}"),
        )
    problem = _mode_problem(private_path)
    if problem is not None:
        return "", "", "", problem
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError("unsupported key type")
    except Exception:  # noqa: BLE001 - any parse failure is the same problem; the text never carries the PEM
        return (
            "",
            "",
            "",
            KeyFileProblem(
                ERROR_READING_LAUNCHER_KEY,
                private_path,
                f"launcher key {private_path} is not a readable PEM private key (RSA or Ed25519, unencrypted); "
                "regenerate the pair with `muster keys generate`",
            ),
        )
    public = key.public_key()
    fp = public_key_fingerprint(public)
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    if public_path is not None and Path(public_path).exists():
        try:
            given = serialization.load_pem_public_key(Path(public_path).read_bytes())
            given_fp = public_key_fingerprint(given)
        except Exception:  # noqa: BLE001 - any parse failure is the same problem
            given_fp = ""
        if given_fp != fp:
            return (
                "",
                "",
                fp,
                KeyFileProblem(
                    INVALID_LAUNCHER_KEY,
                    Path(public_path),
                    f"launcher public key {public_path} (fingerprint {given_fp or 'unreadable'}) does not belong to "
                    f"{private_path} (fingerprint {fp}); remove both so that the node receives the cluster's",
                ),
            )
    return pem.decode("ascii", "replace"), public_pem, fp, None


def check(paths: KeyPaths) -> LocalKeys:
    """Reads and checks a node's key files: permissions, cookie key length, launcher PEM, pair match.

    Missing files are not problems (the node then receives the cluster's keys).
    """
    cookie, p1 = read_cookie_key(paths.secure_cookie_key)
    private_pem, public_pem, lfp, p2 = read_launcher_pair(paths.launcher_key, paths.launcher_pub)
    problems = tuple(p for p in (p1, p2) if p is not None)
    return LocalKeys(
        cookie_fingerprint=cookie_fingerprint(cookie) if cookie and p1 is None else "",
        launcher_fingerprint=lfp if p2 is None else "",
        cookie_key=cookie if p1 is None else b"",
        launcher_private_pem=private_pem,
        launcher_public_pem=public_pem,
        problems=problems,
    )


# -- writing -------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_file(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically with mode 0600 (temp file, fsync, rename, fsync the directory)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = ""
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            os.unlink(tmp)
    _fsync_dir(path.parent)


def version_path(path: Path, version: int) -> Path:
    """Where a version of a key file is kept during a rotation: ``<file>.d/<version>``."""
    return version_dir(path) / str(version)


def install_keys(
    paths: KeyPaths,
    *,
    version: int,
    secure_cookie_key: bytes,
    launcher_private_pem: str,
    launcher_public_pem: str,
    promote: bool,
) -> None:
    """Writes a version's keys as ``<file>.d/<version>``, and over the files themselves when ``promote``.

    A node without key files installs the ACTIVE version with ``promote=True``; a PENDING version is
    installed with ``promote=False`` and promoted later with :func:`promote_version`.
    """
    contents = (secure_cookie_key, launcher_private_pem.encode("ascii"), launcher_public_pem.encode("ascii"))
    for path, data in zip(paths.all(), contents, strict=True):
        vp = version_path(path, version)
        vp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_key_file(vp, data)
        if promote:
            write_key_file(path, data)


def promote_version(paths: KeyPaths, version: int) -> None:
    """Replaces each key file with its ``<file>.d/<version>`` copy (written by :func:`install_keys`).

    Raises:
        FileNotFoundError: the version was never installed here.
    """
    contents = [version_path(p, version).read_bytes() for p in paths.all()]
    for path, data in zip(paths.all(), contents, strict=True):
        write_key_file(path, data)


def retire_version(paths: KeyPaths, version: int) -> None:
    """Removes the ``<file>.d/<version>`` copies of a retired version (missing ones are fine)."""
    for path in paths.all():
        vp = version_path(path, version)
        vp.unlink(missing_ok=True)
        if vp.parent.exists():
            _fsync_dir(vp.parent)


def held_versions(paths: KeyPaths) -> list[int]:
    """The versions whose copies are kept beside the key files (``<file>.d/<version>``), ascending."""
    found: set[int] = set()
    for path in paths.all():
        d = version_dir(path)
        if d.is_dir():
            found.update(int(e.name) for e in d.iterdir() if e.name.isdigit())
    return sorted(found)


def generate_keys(directory: Path, *, overwrite: bool = False) -> KeyPaths:
    """Writes a fresh cookie key (32 random bytes) and RSA-2048 launcher pair in ``directory``, mode 0600.

    Raises:
        FileExistsError: a key file exists there and ``overwrite`` is not set.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    paths = KeyPaths.in_dir(directory)
    if not overwrite:
        for p in paths.all():
            if p.exists():
                raise FileExistsError(f"{p} exists; remove it first (or pass --force)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_key_file(paths.secure_cookie_key, secrets.token_bytes(COOKIE_KEY_BYTES))
    write_key_file(paths.launcher_key, private_pem)
    write_key_file(paths.launcher_pub, public_pem)
    return paths


# -- encrypt-password ------------------------------------------------------------------------------


def decrypt_password(ciphertext: str, *key_files: Path) -> str:
    """Decrypts what :func:`encrypt_password` made, with the key file (or a version copy) it names.

    Raises:
        ValueError: not such a ciphertext, no available key has its fingerprint, or it does not decrypt.
    """
    return rules.decrypt_password(ciphertext, (key for f in key_files for key in cookie_key_candidates(f)))
