"""Release signing keys: ``upparat-jobs keygen`` and loading a private key to sign with.

The private key is written once, mode 0600, never over an existing file. The
public key (``PREFIX.pub``) is what devices list in ``[verification] public_keys``.
Signing itself is ``upparat.signature.sign`` over ``Release.statement()``: the
same statement the root installer verifies.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import stat
import sys
from pathlib import Path

from upparat import signature
from upparat.operator.plan import UsageError
from upparat.release import Release

KEY_TYPES = ("ed25519", "p256")
PASSPHRASE_ENV = "UPPARAT_JOBS_KEY_PASSPHRASE"


def keygen(prefix: str | Path, key_type: str = "ed25519") -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (0600) and ``PREFIX.pub``; refuse if either exists."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if key_type not in KEY_TYPES:
        raise UsageError(f"--type must be one of {', '.join(KEY_TYPES)}")
    prefix = str(prefix)
    private_path, public_path = Path(prefix + ".key"), Path(prefix + ".pub")
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists: refusing to overwrite a key (choose another --out)")
    if not private_path.parent.is_dir():
        raise UsageError(f"directory {private_path.parent} does not exist")

    private = ed25519.Ed25519PrivateKey.generate() if key_type == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink()
        raise
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise UsageError(f"{path} already exists: refusing to overwrite a key (choose another --out)") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(path: str | Path, warn=None):
    """An Ed25519 or P-256 private key from a PEM file (PKCS8 or traditional, maybe encrypted:
    the passphrase comes from $UPPARAT_JOBS_KEY_PASSPHRASE or, on a terminal, a prompt)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    path = Path(path)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"cannot read key {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and warn is not None:
        warn(f"warning: signing key {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); chmod 600 {path}")
    password = None
    while True:
        try:
            key = serialization.load_pem_private_key(data, password=password)
            break
        except TypeError:  # encrypted and no passphrase given yet (or one given for a plain key)
            if password is not None:
                raise UsageError(f"key {path} is not encrypted; unset ${PASSPHRASE_ENV}") from None
            password = _passphrase(path)
        except ValueError as exc:
            hint = "wrong passphrase, or " if password is not None else ""
            raise UsageError(f"key {path}: {hint}not a PEM private key ({exc})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UsageError(f"key {path}: only Ed25519 and ECDSA P-256 keys can sign releases")


def _passphrase(path: Path) -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        if not sys.stdin.isatty():
            raise UsageError(f"key {path} is encrypted: set ${PASSPHRASE_ENV} or run on a terminal")
        value = getpass.getpass(f"passphrase for {path}: ")
    return value.encode("utf-8")


def sign_release(private_key, release: Release) -> Release:
    """The release with its signature over statement v2."""
    return dataclasses.replace(release, signature=signature.sign(private_key, release))
