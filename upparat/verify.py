"""File verification shared by the fetcher (first check) and the installer
(the check that counts): size, sha256 and the detached signature of
DESIGN.md 4.4 over ``upparat-signature-v1`` / version / sha256 / size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

CHUNK = 1024 * 1024


class UnusableKey(Exception):
    """A configured public key cannot be used."""


@dataclass(frozen=True)
class Expected:
    """What the job document promises about the file."""

    version: str
    sha256: str | None
    size: int | None
    signature: str | None


def signed_bytes(version: str, sha256: str, size: int) -> bytes:
    if "\n" in version or "\r" in version:
        raise ValueError("version contains a line break")
    return f"upparat-signature-v1\nversion={version}\nsha256={sha256}\nsize={size}\n".encode("utf-8")


def load_public_key(pem: bytes):
    """An Ed25519 or ECDSA P-256 public key from a PEM public key or certificate."""
    try:
        if b"CERTIFICATE" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise UnusableKey(f"not a PEM public key or certificate ({exc})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UnusableKey("only Ed25519 and ECDSA P-256 keys are accepted")


def signature_ok(keys, version: str, sha256: str, size: int, signature_b64: str) -> bool:
    """True when any one of ``keys`` verifies the signature (key rotation)."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    message = signed_bytes(version, sha256, size)
    for key in keys:
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            else:
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            continue
    return False


def sign(private_key, version: str, sha256: str, size: int) -> str:
    """Sign for a job document (used by the demo and the tests; devices only verify)."""
    message = signed_bytes(version, sha256, size)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        raw = private_key.sign(message)
    else:
        raw = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(raw).decode("ascii")


def hash_fd(fd: int) -> tuple[str, int]:
    """sha256 hex and byte count of an open file, read from its start."""
    digest = hashlib.sha256()
    size = 0
    offset = 0
    while True:
        chunk = os.pread(fd, CHUNK, offset)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
        offset += len(chunk)
    return digest.hexdigest(), size


def check(expected: Expected, sha256: str, size: int, keys, require_signature: bool) -> str | None:
    """None when the file matches; otherwise a reason a person can act on."""
    if expected.size is not None and size != expected.size:
        return f"size is {size} bytes, the job document says {expected.size}"
    if expected.sha256 is not None and sha256 != expected.sha256:
        return f"sha256 is {sha256}, the job document says {expected.sha256}"
    if expected.signature is None:
        if require_signature:
            return "the job document has no signature and [verification] require_signature is on"
        return None
    if not keys:
        if require_signature:
            return "no public keys configured to check the signature"
        return None
    if not signature_ok(keys, expected.version, sha256, size, expected.signature):
        return "signature does not verify with any configured public key"
    return None
