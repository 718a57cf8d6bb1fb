"""The one vocabulary every process shares: ids, limits, hook names, and the
release an update job describes (docs/contracts.md: job document and signature
statement; explained in docs/contracts.md).

A ``Release`` is what the job document promises about the file and what the
hooks receive: version, meta, force, sha256, size, serial and the signature
over all of them. The broker parses it from MQTT (``parse_document``), the
fetcher checks the downloaded bytes against it, the installer re-verifies its
signed statement with its own keys before a hook sees any of its values, and
the operator tool signs it. Patterns are used with ``fullmatch`` only: ``$``
would accept a trailing newline.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

JOB_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
THING_NAME_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
HOOK_NAMES = ("version", "download", "ready", "install", "restart")

MAX_VERSION = 128
MAX_META = 4096
MAX_URL = 8192
MAX_SIGNATURE = 1024  # base64; an Ed25519 signature is 88 characters, ECDSA P-256 DER at most 96
MAX_INT = 2**63  # size and serial are 0 <= n < 2**63
PLACEHOLDER = "${aws:iot:s3-presigned-url:"
STATEMENT_HEADER = "upparat-signature-v2"


class BadDocument(ValueError):
    """A job document that cannot be run; the text tells the operator what to fix."""


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256_RE.fullmatch(value) is not None


def is_count(value: object) -> bool:
    """A size or serial: an integer 0 <= n < 2**63 (JSON true is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_INT


def version_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_VERSION:
        return f"is longer than {MAX_VERSION} characters"
    if not value.isprintable():
        return "contains line breaks or other non-printable characters"
    return None


def meta_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > MAX_META:
        return f"is longer than {MAX_META} characters"
    if "\x00" in value:
        return "contains a NUL character (hooks receive it as an argument)"
    return None


def signature_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_SIGNATURE:
        return f"must be a base64 string of at most {MAX_SIGNATURE} characters"
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64"
    return None


@dataclass(frozen=True)
class Release:
    """What a job document promises about its file, and what the hooks get."""

    version: str
    meta: str = ""
    force: bool = False
    sha256: str | None = None
    size: int | None = None
    serial: int | None = None
    signature: str | None = None

    def problem(self) -> str | None:
        """Why these values are unusable, or None (each field's contract)."""
        for name, check in (("version", version_problem), ("meta", meta_problem)):
            reason = check(getattr(self, name))
            if reason:
                return f"{name} {reason}"
        if not isinstance(self.force, bool):
            return "force must be true or false"
        if self.sha256 is not None and not is_sha256(self.sha256):
            return "sha256 must be 64 lowercase hex characters"
        for name in ("size", "serial"):
            value = getattr(self, name)
            if value is not None and not is_count(value):
                return f"{name} must be a whole number from 0 to 2^63-1"
        if self.signature is not None:
            reason = signature_problem(self.signature)
            if reason:
                return f"signature {reason}"
            if self.sha256 is None or self.size is None:
                return "a signed release needs sha256 and size (they are part of what is signed)"
        return None

    def statement(self) -> bytes:
        """The exact bytes a release signature covers (signature statement v2)."""
        if self.sha256 is None or self.size is None:
            raise ValueError("a statement needs sha256 and size")
        if self.problem():
            raise ValueError(self.problem())
        import hashlib  # here: most processes that know releases never sign or verify one

        meta_sha256 = hashlib.sha256(self.meta.encode("utf-8")).hexdigest()
        lines = [
            STATEMENT_HEADER,
            f"version={self.version}",
            f"sha256={self.sha256}",
            f"size={self.size}",
            f"force={'true' if self.force else 'false'}",
            f"meta-sha256={meta_sha256}",
            f"serial={'' if self.serial is None else self.serial}",
        ]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    def same_content(self, other: "Release") -> bool:
        """Everything but the signature is equal (a re-delivered document)."""
        return (self.version, self.meta, self.force, self.sha256, self.size, self.serial) == (
            other.version, other.meta, other.force, other.sha256, other.size, other.serial)


def _force(value: object) -> bool:
    if isinstance(value, bool):
        return value
    # upparat 1.x documents carried the strings "true"/"false".
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise BadDocument('"force" must be true or false')


def parse_document(doc: object, require_sha256: bool = True) -> tuple[Release, str]:
    """Check a job document; return the release and the download URL.

    Raises BadDocument with a message that names the field and the fix.
    Unknown fields are ignored (operators may carry their own).
    """
    if not isinstance(doc, dict):
        raise BadDocument("the job document is not a JSON object")
    version = doc.get("version")
    reason = version_problem(version)
    if reason:
        raise BadDocument(f'"version" {reason}' if version is not None else '"version" is missing')
    url = doc.get("file")
    if not isinstance(url, str) or not url:
        raise BadDocument('"file" is missing or not a string')
    if PLACEHOLDER in url:
        raise BadDocument('"file" still holds the presigned-URL placeholder: create the job with a '
                          "presignedUrlConfig (role that may read the object)")
    if len(url) > MAX_URL or not url.startswith(("https://", "http://")) or not url.isprintable():
        raise BadDocument(f'"file" is not an http(s) URL of at most {MAX_URL} characters')
    meta = doc.get("meta")
    meta = "" if meta is None else meta  # absent (or null, which AWS may drop) is empty
    reason = meta_problem(meta)
    if reason:
        raise BadDocument(f'"meta" {reason}')
    force = _force(doc.get("force", False))
    sha256 = doc.get("sha256")
    if sha256 is not None and not is_sha256(sha256):
        raise BadDocument('"sha256" must be 64 lowercase hex characters')
    if sha256 is None and require_sha256:
        raise BadDocument('the job document has no "sha256": add the file\'s sha256 (upparat-jobs sign does), '
                          "or, on the device, set [verification] require_sha256 = false together with "
                          "allow_unsigned = true")
    release_fields = {}
    for name in ("size", "serial"):
        value = doc.get(name)
        if value is not None and not is_count(value):
            raise BadDocument(f'"{name}" must be a whole number from 0 to 2^63-1')
        release_fields[name] = value
    signature = doc.get("signature")
    if signature is not None:
        reason = signature_problem(signature)
        if reason:
            raise BadDocument(f'"signature" {reason}')
        if sha256 is None or release_fields["size"] is None:
            raise BadDocument('a "signature" needs "sha256" and "size" in the job document (they are signed)')
    release = Release(version=version, meta=meta, force=force, sha256=sha256, signature=signature,
                      **release_fields)
    return release, url
