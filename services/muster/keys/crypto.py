"""Key generation, fingerprints, sealing under the master key, and encrypt-password.

Everything here uses ``cryptography``; nothing is hand-made. No function logs, and no error
message carries key bytes: errors name fingerprints, lengths and master key ids only.

- A **fingerprint** is the first 16 hex digits of a SHA-256: over the secure cookie key's bytes,
  and over the launcher public key's DER SubjectPublicKeyInfo (so a private key and its public
  key have the same fingerprint). The rule is the contract's (:mod:`muster.api.rules`), which the
  client uses too; it is re-exported here.
- **Sealing**: AES-256-GCM under the master key with a fresh 96-bit nonce; the associated data
  binds the ciphertext to the master key id, the key version and the column, so a sealed value
  cannot be moved to another row or column unnoticed.
- **encrypt-password**: HKDF-SHA256 over the cookie key (info ``muster encrypt-password v1``)
  gives an AES-256-GCM key; the ciphertext is ``muster:v1:<cookie fingerprint>:<base64 nonce+ct>``
  (also the contract's rule, :mod:`muster.api.rules`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from muster.api.rules import COOKIE_KEY_BYTES as COOKIE_KEY_BYTES
from muster.api.rules import GENERATE_HINT as GENERATE_HINT
from muster.api.rules import MIN_COOKIE_KEY_BYTES as MIN_COOKIE_KEY_BYTES
from muster.api.rules import PASSWORD_INFO as PASSWORD_INFO
from muster.api.rules import PASSWORD_PREFIX as PASSWORD_PREFIX
from muster.api.rules import cookie_fingerprint as cookie_fingerprint
from muster.api.rules import cookie_key_candidates
from muster.api.rules import decrypt_password as decrypt_password
from muster.api.rules import encrypt_password as encrypt_password
from muster.api.rules import fingerprint_bytes as fingerprint_bytes
from muster.api.rules import is_encrypted_password as is_encrypted_password
from muster.api.rules import public_key_fingerprint as public_key_fingerprint

MAX_COOKIE_KEY_BYTES = 4096
MAX_PEM_CHARS = 64 * 1024
MASTER_KEY_BYTES = 32
RSA_BITS = 2048
NONCE_BYTES = 12
MASTER_KEY_FILE = "master.key"
MASTER_KEY_HINT = "set MUSTER_MASTER_KEY or master_key_file; `muster up` creates one"


class MasterKeyError(RuntimeError):
    """The master key is missing or malformed: the keys service cannot start."""


class LauncherKeyError(ValueError):
    """A launcher key is not a readable PEM private key (the message never carries the PEM)."""


class SealError(ValueError):
    """A sealed value does not open under this master key (wrong key, or tampered)."""


def master_key_id(master_key: bytes) -> str:
    """The id recorded beside each sealed value: the first 8 hex digits of SHA-256 of the master key."""
    return hashlib.sha256(master_key).hexdigest()[:8]


# -- key material ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LauncherKeyPair:
    """A launcher key pair as PEM text, with its fingerprint (the repr hides the private key)."""

    private_pem: str
    public_pem: str
    fingerprint: str

    def __repr__(self) -> str:
        return f"LauncherKeyPair(fingerprint={self.fingerprint!r})"


def generate_cookie_key() -> bytes:
    """32 random bytes from the operating system's CSPRNG."""
    return secrets.token_bytes(COOKIE_KEY_BYTES)


def generate_launcher_pair() -> LauncherKeyPair:
    """A fresh RSA-2048 launcher key pair (the reference products' launcher key type), PKCS#8 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return _pair(key)


def _pair(key: object) -> LauncherKeyPair:
    private_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    public = key.public_key()  # type: ignore[attr-defined]
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return LauncherKeyPair(private_pem, public_pem, public_key_fingerprint(public))


def load_launcher_pair(private_pem: str, public_pem: str = "") -> LauncherKeyPair:
    """Reads a launcher private key (RSA of at least 2048 bits, or Ed25519) and checks its public key.

    Args:
        private_pem: the private key, PEM (PKCS#8 or traditional), unencrypted.
        public_pem: the public key, PEM; optional. When given it must belong to the private key.

    Returns:
        The pair, normalized to PKCS#8 / SubjectPublicKeyInfo PEM.

    Raises:
        LauncherKeyError: not a PEM private key, encrypted, of an unsupported type, too weak, or the
            public key does not match. The message names the problem, never the key.
    """
    if len(private_pem) > MAX_PEM_CHARS:
        raise LauncherKeyError("is longer than 64 KiB; a launcher key is a PEM private key")
    try:
        key = serialization.load_pem_private_key(private_pem.encode("utf-8", "replace"), password=None)
    except TypeError:
        raise LauncherKeyError("is encrypted with a passphrase; the launcher key must be unencrypted") from None
    except (ValueError, UnicodeError, binascii.Error):
        raise LauncherKeyError(
            "is not a readable PEM private key; regenerate the pair with `muster keys generate`"
        ) from None
    except Exception:  # noqa: BLE001 - any parse failure (unsupported algorithm) is the same refusal
        raise LauncherKeyError("is not a supported PEM private key (use RSA 2048+ or Ed25519)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_BITS:
            raise LauncherKeyError(f"is an RSA key of {key.key_size} bits; use at least {RSA_BITS}")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise LauncherKeyError("is not an RSA or Ed25519 key; regenerate the pair with `muster keys generate`")
    pair = _pair(key)
    if public_pem:
        try:
            public = serialization.load_pem_public_key(public_pem.encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - any parse failure is the same refusal
            raise LauncherKeyError("the public key is not a readable PEM public key") from None
        if public_key_fingerprint(public) != pair.fingerprint:
            raise LauncherKeyError(
                f"the public key (fingerprint {public_key_fingerprint(public)}) does not belong to the "
                f"private key (fingerprint {pair.fingerprint})"
            )
    return pair


# -- the master key ------------------------------------------------------------------------------


class MasterKey:
    """The key that seals the cluster's keys at rest. Never stored in the database; ``repr`` shows its id.

    Args:
        key: exactly 32 bytes.
    """

    __slots__ = ("_aead", "id")

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"the master key must be {MASTER_KEY_BYTES} bytes, got {len(key)}; {MASTER_KEY_HINT}")
        self.id = master_key_id(key)
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"MasterKey(id={self.id!r})"

    def _aad(self, context: str, key_id: str) -> bytes:
        return f"muster keys|{key_id}|{context}".encode()

    def seal(self, plaintext: bytes, context: str) -> bytes:
        """``nonce || AES-GCM(plaintext)``, bound to this key's id and ``context`` (e.g. ``v3/cookie``)."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, self._aad(context, self.id))

    def open(self, sealed: bytes, context: str) -> bytes:
        """Opens what :meth:`seal` made under the same context. Raises SealError otherwise."""
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], self._aad(context, self.id))
        except (InvalidTag, ValueError):
            raise SealError(f"a stored key does not open under master key {self.id} ({context})") from None


def _decode_master_key(text: bytes, where: str) -> bytes:
    if len(text) == MASTER_KEY_BYTES:
        return text
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == MASTER_KEY_BYTES:
        return raw
    raise MasterKeyError(
        f"the master key in {where} must be {MASTER_KEY_BYTES} raw bytes or their base64; {MASTER_KEY_HINT}"
    )


def load_master_key(*, key_b64: str | None, key_file: Path | None) -> MasterKey:
    """The master key from ``MUSTER_MASTER_KEY`` (base64) or ``master_key_file`` (raw or base64).

    The environment wins when both are set.

    Raises:
        MasterKeyError: neither is set, the file cannot be read, or the key is not 32 bytes.
    """
    if key_b64:
        return MasterKey(_decode_master_key(key_b64.encode("ascii", "replace"), "MUSTER_MASTER_KEY"))
    if key_file is not None:
        try:
            data = Path(key_file).read_bytes()
        except OSError as exc:
            raise MasterKeyError(
                f"cannot read the master key file {key_file} ({exc.strerror}); {MASTER_KEY_HINT}"
            ) from None
        return MasterKey(_decode_master_key(data, str(key_file)))
    raise MasterKeyError(f"the keys service needs a master key: {MASTER_KEY_HINT}")


def master_key_file_mode(path: Path) -> int | None:
    """The permission bits of the master key file, or None if it cannot be stat'ed."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return None


def ensure_master_key(data_dir: Path) -> Path:
    """Creates ``<data_dir>/master.key`` (32 random bytes, mode 0600, written atomically) unless it exists.

    For ``muster up``: the file sits in the data directory, outside the database directory.

    Args:
        data_dir: the data directory (created 0700 if missing).

    Returns:
        The file's path (existing or new).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / MASTER_KEY_FILE
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(prefix=".master.key.", dir=data_dir)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(MASTER_KEY_BYTES))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)  # never replaces a key another process just made
        except FileExistsError:
            pass
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


# -- encrypt-password ----------------------------------------------------------------------------


def derive_key(cookie_key: bytes, purpose: str) -> bytes:
    """A 32-byte key for ``purpose`` derived from a cookie key (HKDF-SHA256, info ``muster derive v1 <purpose>``)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"muster derive v1 " + purpose.encode("ascii"))
    return hkdf.derive(cookie_key)


def decrypt_password_with_files(ciphertext: str, *key_files: Path) -> str:
    """Like :func:`decrypt_password`, reading each key file and its ``<file>.d/*`` versions.

    For servers: a database password in configuration may be such a ciphertext.

    Raises:
        ValueError: as :func:`decrypt_password`, or when no key file can be read.
    """
    keys = [key for f in key_files for key in cookie_key_candidates(f)]
    if not keys:
        raise ValueError("no secure cookie key file could be read to decrypt the password")
    return decrypt_password(ciphertext, keys)
