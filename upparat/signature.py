"""Release signatures (signature statement v2, docs/contracts.md): loading
public keys, verifying a release's statement, and signing one (operator tools,
demo and tests; devices only verify).

``cryptography`` is imported here and only here, when a key is loaded or a
signature made: a process without configured keys never loads it.
"""

from __future__ import annotations

import base64
import binascii

from upparat.release import Release


class UnusableKey(ValueError):
    """A configured public key cannot be used; the text says why."""


def load_public_key(pem: bytes):
    """An Ed25519 or ECDSA P-256 public key from a PEM public key or X.509 certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        if b"CERTIFICATE" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise UnusableKey(f"not a PEM public key or certificate ({exc})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UnusableKey("only Ed25519 and ECDSA P-256 keys are accepted")


def load_public_keys(pems: list[str]) -> list:
    return [load_public_key(pem.encode("utf-8")) for pem in pems]


class LazyKeys:
    """Release keys from PEM text, loaded — and ``cryptography`` imported — at
    their first use, not when the process starts. Behaves like the list of
    keys for ``verifies`` and the verification policy."""

    def __init__(self, pems):
        self._pems = tuple(pems)
        self._keys: list | None = None

    def __bool__(self) -> bool:
        return bool(self._pems)

    def __len__(self) -> int:
        return len(self._pems)

    def __iter__(self):
        if self._keys is None:
            self._keys = load_public_keys(list(self._pems))
        return iter(self._keys)


def verifies(keys: list, release: Release) -> bool:
    """True when any one of ``keys`` verifies the release's signature (key rotation)."""
    if release.signature is None or not keys:
        return False
    try:
        raw = base64.b64decode(release.signature, validate=True)
        statement = release.statement()
    except (binascii.Error, ValueError):
        return False
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    for key in keys:
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(raw, statement)
            else:
                key.verify(raw, statement, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            continue
    return False


def sign(private_key, release: Release) -> str:
    """The base64 signature of ``release``'s statement with an Ed25519 or P-256 private key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    statement = release.statement()
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        raw = private_key.sign(statement)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, ec.SECP256R1):
        raw = private_key.sign(statement, ec.ECDSA(hashes.SHA256()))
    else:
        raise UnusableKey("only Ed25519 and ECDSA P-256 keys can sign")
    return base64.b64encode(raw).decode("ascii")
