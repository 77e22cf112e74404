"""Key crypto without I/O beyond temp files: fingerprints, sealing, the master key, encrypt-password, key files."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from muster.client import keyfiles
from muster.keys import crypto


def test_client_and_server_fingerprints_agree() -> None:
    key = os.urandom(32)
    pair = crypto.generate_launcher_pair()
    assert keyfiles.cookie_fingerprint(key) == crypto.cookie_fingerprint(key)
    assert len(crypto.cookie_fingerprint(key)) == 16
    # The same key pair fingerprints the same through its private and its public PEM, on both sides.
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(pair.public_pem.encode())
    assert keyfiles.public_key_fingerprint(public) == pair.fingerprint
    assert crypto.load_launcher_pair(pair.private_pem, pair.public_pem).fingerprint == pair.fingerprint
    assert "PRIVATE" not in repr(pair)


def test_encrypt_password_round_trips_across_client_and_server_and_refuses_a_wrong_key(tmp_path: Path) -> None:
    key, other = os.urandom(32), os.urandom(32)
    text = keyfiles.encrypt_password("s3cret pässword", key)
    fp = crypto.cookie_fingerprint(key)
    assert text.startswith(f"muster:v1:{fp}:")
    assert crypto.decrypt_password(text, [other, key]) == "s3cret pässword"
    server_made = crypto.encrypt_password("another", key)
    path = tmp_path / "secure-cookie-key"
    keyfiles.write_key_file(path, key)
    assert keyfiles.decrypt_password(server_made, path) == "another"
    assert crypto.decrypt_password_with_files(text, path) == "s3cret pässword"
    with pytest.raises(ValueError, match="no secure cookie key with fingerprint"):
        crypto.decrypt_password(text, [other])
    # A key that claims the fingerprint but is not the key: tampered data does not decrypt.
    tampered = text[:-6] + ("A" if text[-6] != "A" else "B") + text[-5:]
    with pytest.raises(ValueError):
        crypto.decrypt_password(tampered, [key])


def test_a_retiring_version_in_the_d_directory_still_decrypts(tmp_path: Path) -> None:
    paths = keyfiles.KeyPaths.in_dir(tmp_path)
    old, new = os.urandom(32), os.urandom(32)
    pair = crypto.generate_launcher_pair()
    keyfiles.install_keys(
        paths, version=1, secure_cookie_key=old, launcher_private_pem=pair.private_pem,
        launcher_public_pem=pair.public_pem, promote=True,
    )  # fmt: skip
    text = keyfiles.encrypt_password("pw", old)
    keyfiles.install_keys(
        paths, version=2, secure_cookie_key=new, launcher_private_pem=pair.private_pem,
        launcher_public_pem=pair.public_pem, promote=False,
    )  # fmt: skip
    assert paths.secure_cookie_key.read_bytes() == old  # pending: beside the file, not over it
    keyfiles.promote_version(paths, 2)
    assert paths.secure_cookie_key.read_bytes() == new
    assert stat.S_IMODE(paths.secure_cookie_key.stat().st_mode) == 0o600
    assert keyfiles.decrypt_password(text, paths.secure_cookie_key) == "pw"
    keyfiles.retire_version(paths, 1)
    with pytest.raises(ValueError, match="no secure cookie key"):
        keyfiles.decrypt_password(text, paths.secure_cookie_key)


def test_sealed_values_open_only_under_the_same_master_key_and_context() -> None:
    master = crypto.MasterKey(os.urandom(32))
    secret = os.urandom(32)
    sealed = master.seal(secret, "v1/cookie")
    assert secret not in sealed
    assert master.open(sealed, "v1/cookie") == secret
    with pytest.raises(crypto.SealError):
        master.open(sealed, "v2/cookie")
    with pytest.raises(crypto.SealError):
        crypto.MasterKey(os.urandom(32)).open(sealed, "v1/cookie")
    assert "MasterKey(id=" in repr(master) and len(master.id) == 8


def test_master_key_comes_from_env_or_file_and_is_required(tmp_path: Path) -> None:
    raw = os.urandom(32)
    assert crypto.load_master_key(key_b64=base64.b64encode(raw).decode(), key_file=None).id == crypto.master_key_id(raw)
    with pytest.raises(crypto.MasterKeyError, match="set MUSTER_MASTER_KEY or master_key_file"):
        crypto.load_master_key(key_b64=None, key_file=None)
    with pytest.raises(crypto.MasterKeyError, match="32"):
        crypto.load_master_key(key_b64=base64.b64encode(b"short").decode(), key_file=None)
    path = crypto.ensure_master_key(tmp_path / "data")
    assert path == tmp_path / "data" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    first = path.read_bytes()
    assert crypto.ensure_master_key(tmp_path / "data").read_bytes() == first  # never replaced
    assert crypto.load_master_key(key_b64=None, key_file=path).id == crypto.master_key_id(first)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["master.key"]  # no temp file left


def test_garbage_and_weak_launcher_keys_are_refused_without_echoing_them() -> None:
    with pytest.raises(crypto.LauncherKeyError) as bad:
        crypto.load_launcher_pair("-----BEGIN PRIVATE KEY-----\ngarbage-key-text\n-----END PRIVATE KEY-----\n")
    assert "garbage-key-text" not in str(bad.value)
    other = crypto.generate_launcher_pair()
    mine = crypto.generate_launcher_pair()
    with pytest.raises(crypto.LauncherKeyError, match="does not belong"):
        crypto.load_launcher_pair(mine.private_pem, other.public_pem)


def test_key_files_are_checked_for_permissions_length_and_pem(tmp_path: Path) -> None:
    paths = keyfiles.generate_keys(tmp_path)
    local = keyfiles.check(paths)
    assert local.ok and local.cookie_fingerprint and local.launcher_fingerprint
    assert "cookie_key" not in repr(local) or local.cookie_key.hex() not in repr(local)
    os.chmod(paths.secure_cookie_key, 0o644)
    (problem,) = keyfiles.check(paths).problems
    assert problem.reason == keyfiles.INVALID_KEY_PERMISSIONS and problem.mode == 0o644
    assert "chmod 600" in problem.message
    os.chmod(paths.secure_cookie_key, 0o600)
    keyfiles.write_key_file(paths.secure_cookie_key, b"8 bytes!")
    (problem,) = keyfiles.check(paths).problems
    assert problem.reason == keyfiles.INVALID_SECURE_COOKIE_KEY and "head -c 32 /dev/urandom" in problem.message
    keyfiles.write_key_file(paths.secure_cookie_key, os.urandom(32))
    keyfiles.write_key_file(paths.launcher_key, b"not a pem")
    (problem,) = keyfiles.check(paths).problems
    assert problem.reason == keyfiles.ERROR_READING_LAUNCHER_KEY
    assert keyfiles.check(keyfiles.KeyPaths.in_dir(tmp_path / "none")).empty
