"""What may be installed: the verification policy of the installer (the
check that counts, with its own keys, on its own read of the bytes) and of the
fetcher (the first check of the bytes, while it downloads).

Three questions, asked separately:
- ``release_failure`` (installer, when a job is opened, before anything is
  downloaded): may this release be installed at all? Its signed statement
  must verify with a configured key, unless the configuration opts in to
  unsigned updates (``[verification] allow_unsigned``); a document that
  carries a signature must verify in any case.
- ``document_failure`` (fetcher): can the bytes be checked (sha256 present
  when it is required)? The fetcher holds no keys: the signature is the
  installer's to check, and it is checked before the download starts.
- ``bytes_failure`` (both): are these the bytes the release promises?
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from upparat import signature
from upparat.release import Release

CHUNK = 1024 * 1024

VERIFICATION_FAILED = "verification_failed"
INVALID_JOB_DOCUMENT = "invalid_job_document"

NO_KEYS = ("this device has no [verification] public_keys, so it cannot check the job's signature, and "
           "unsigned updates are refused by default. Fix: sign the release (upparat-jobs sign) and set "
           "[verification] public_keys, or accept unsigned updates with [verification] allow_unsigned = true "
           "(then whoever controls the job document chooses what root installs)")


@dataclass(frozen=True)
class Policy:
    allow_unsigned: bool = False
    require_sha256: bool = True


@dataclass(frozen=True)
class Failure:
    state: str  # a job statusDetails.state (verification_failed, invalid_job_document)
    message: str


def document_failure(release: Release, policy: Policy) -> Failure | None:
    """None when the release's bytes can be checked (the fetcher's question); else why not."""
    problem = release.problem()
    if problem:
        return Failure(INVALID_JOB_DOCUMENT, problem)
    if release.sha256 is None and policy.require_sha256:
        return Failure(INVALID_JOB_DOCUMENT, "the job document has no sha256 and [verification] require_sha256 "
                                             "is on (it can only be turned off with allow_unsigned = true)")
    return None


def release_failure(release: Release, keys: list, policy: Policy) -> Failure | None:
    """None when the release may be installed (by its statement); else why not.
    The installer's question, with its own keys."""
    failure = document_failure(release, policy)
    if failure is not None:
        return failure
    if release.signature is not None:
        if not keys:
            return Failure(VERIFICATION_FAILED, "the job is signed but this device has no [verification] "
                                                "public_keys to check the signature; configure the release key")
        if not signature.verifies(keys, release):
            return Failure(VERIFICATION_FAILED, "the signature does not verify with any configured public key "
                                                "(statement v2 over version, sha256, size, force, meta, serial)")
        return None
    if policy.allow_unsigned:
        return None
    if not keys:
        return Failure(VERIFICATION_FAILED, NO_KEYS)
    return Failure(VERIFICATION_FAILED, "the job document has no signature; this device requires signed "
                                        "updates (sign it with upparat-jobs sign, or set [verification] "
                                        "allow_unsigned = true)")


def is_signed(release: Release, keys: list) -> bool:
    """The release carries a signature that one of ``keys`` verifies."""
    return release.signature is not None and signature.verifies(keys, release)


def bytes_failure(release: Release, sha256: str, size: int) -> str | None:
    """None when the bytes match the release; else a reason a person can act on."""
    if release.size is not None and size != release.size:
        return f"size is {size} bytes, the job document says {release.size}"
    if release.sha256 is not None and sha256 != release.sha256:
        return f"sha256 is {sha256}, the job document says {release.sha256}"
    return None


def hash_fd(fd: int, chunk: int = CHUNK) -> tuple[str, int]:
    """sha256 hex and byte count of an open file, read from its start."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    while True:
        n = os.preadv(fd, [buffer], size)
        if n <= 0:
            break
        digest.update(view[:n])
        size += n
    return digest.hexdigest(), size
