"""The broker_proc <-> fetcher_proc boundary: the only messages it carries.

The broker asks, the fetcher answers (REQ/REP, see wire.py). Downloads run in
the fetcher's background; the broker polls. A request is keyed by job_id: a
repeated ``fetch`` for a job already known is answered with its status, not
started again. The fetcher writes the verified file to
``<download_dir>/<job_id>``; the path never crosses the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from upparat.ipc.wire import (
    SHA256_RE,
    Catalogue,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Refused,
    check_job_id,
    check_text,
)

MAX_URL = 8192
MAX_VERSION = 256
MAX_SIGNATURE = 2048

# FetchStatus.state values
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
UNKNOWN = "unknown"
STATES = (RUNNING, DONE, FAILED, CANCELLED, UNKNOWN)
# FetchStatus.failure values: job statusDetails.state names (DESIGN.md 4.6),
# plus url_expired (HTTP 403: the broker asks AWS for a fresh presigned URL
# and fetches again; the partial file is kept for resuming).
FAILURES = ("download_failed", "verification_failed", "file_too_large", "insufficient_disk_space", "url_expired")


@dataclass(frozen=True)
class Fetch(Message):
    TYPE: ClassVar[str] = "fetch"
    job_id: str
    seq: int
    url: str
    version: str
    sha256: str | None
    size: int | None
    signature: str | None

    def check(self) -> None:
        check_job_id(self.job_id)
        check_text("url", self.url, MAX_URL)
        if not self.url.startswith(("https://", "http://")):
            raise ProtocolError("url must be http:// or https://")
        if not self.version or len(self.version) > MAX_VERSION or "\n" in self.version or "\r" in self.version:
            raise ProtocolError("version must be 1-256 characters without line breaks")
        if self.sha256 is not None and not SHA256_RE.match(self.sha256):
            raise ProtocolError("sha256 must be 64 lowercase hex characters")
        if self.size is not None and self.size < 0:
            raise ProtocolError("size must not be negative")
        check_text("signature", self.signature, MAX_SIGNATURE)


@dataclass(frozen=True)
class QueryFetch(Message):
    TYPE: ClassVar[str] = "query_fetch"
    job_id: str
    seq: int

    def check(self) -> None:
        check_job_id(self.job_id)


@dataclass(frozen=True)
class CancelFetch(Message):
    """Stop a download and delete its files (job cancelled or finished)."""

    TYPE: ClassVar[str] = "cancel_fetch"
    job_id: str
    seq: int

    def check(self) -> None:
        check_job_id(self.job_id)


@dataclass(frozen=True)
class FetchStatus(Message):
    TYPE: ClassVar[str] = "fetch_status"
    job_id: str
    seq: int
    state: str
    bytes_done: int
    bytes_total: int | None
    failure: str | None
    message: str

    def check(self) -> None:
        check_job_id(self.job_id)
        if self.state not in STATES:
            raise ProtocolError(f"unknown fetch state {self.state!r}")
        if self.failure is not None and self.failure not in FAILURES:
            raise ProtocolError(f"unknown failure {self.failure!r}")
        check_text("message", self.message, 1024)


# What the fetcher accepts, and what the broker accepts back.
REQUESTS = Catalogue(Ping, Fetch, QueryFetch, CancelFetch)
REPLIES = Catalogue(Pong, FetchStatus, Refused)
