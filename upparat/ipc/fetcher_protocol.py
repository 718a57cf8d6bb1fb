"""The broker_proc <-> fetcher_proc boundary: the only messages it carries.

The broker asks, the fetcher answers at once and then pushes (seq 0) every
change of a download's state: progress at most once per PROGRESS_PUSH_S,
and ``done``/``failed``/``cancelled`` the moment they happen. A download is
keyed by ``(job_id, execution)``: a repeated ``fetch`` for a download already
known is answered with its status, not started again, unless it failed with a
restartable failure (``url_expired``, ``download_failed``) or a new URL is
given for the same release (a refreshed presigned URL): then it resumes.

The fetcher writes the file under the names of upparat.ipc.handoff; the path
never crosses this boundary. It checks the bytes against the ``Release``
(size, sha256, and the signature when keys are configured) before it reports
``done``; the installer checks again, with its own read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from upparat.ipc.installer_protocol import check_ids
from upparat.ipc.wire import Catalogue, Message, Ping, ProtocolError, Refused, check_text
from upparat.release import MAX_URL, Release

PROGRESS_PUSH_S = 1.0
MAX_MESSAGE = 1024

# FetchStatus.state values
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
UNKNOWN = "unknown"  # no such download (e.g. the fetcher restarted): fetch again, it resumes
STATES = (RUNNING, DONE, FAILED, CANCELLED, UNKNOWN)
# FetchStatus.failure values: job statusDetails.state names (docs/contracts.md,
# Job status), plus url_expired (HTTP 403: the broker asks AWS for a fresh
# presigned URL and fetches again; the partial file is kept for resuming).
FAILURES = ("download_failed", "verification_failed", "file_too_large", "insufficient_disk_space",
            "invalid_job_document", "url_expired")


@dataclass(frozen=True)
class Fetch(Message):
    TYPE: ClassVar[str] = "fetch"
    seq: int
    job_id: str
    execution: int
    url: str
    release: Release

    def check(self) -> None:
        check_ids(self.job_id, self.execution)
        check_text("url", self.url, MAX_URL)
        if not self.url.startswith(("https://", "http://")) or not self.url.isprintable():
            raise ProtocolError("url must be an http:// or https:// URL without control characters")
        problem = self.release.problem()
        if problem:
            raise ProtocolError(f"release: {problem}")


@dataclass(frozen=True)
class QueryFetch(Message):
    TYPE: ClassVar[str] = "query_fetch"
    seq: int
    job_id: str
    execution: int

    def check(self) -> None:
        check_ids(self.job_id, self.execution)


@dataclass(frozen=True)
class CancelFetch(Message):
    """Stop a download and delete its files (job cancelled, finished, or staged)."""

    TYPE: ClassVar[str] = "cancel_fetch"
    seq: int
    job_id: str
    execution: int

    def check(self) -> None:
        check_ids(self.job_id, self.execution)


@dataclass(frozen=True)
class FetchStatus(Message):
    TYPE: ClassVar[str] = "fetch_status"
    seq: int
    job_id: str
    execution: int
    state: str
    bytes_done: int
    bytes_total: int | None
    rate: int  # bytes per second over the last seconds; 0 when not running
    failure: str | None
    message: str

    def check(self) -> None:
        check_ids(self.job_id, self.execution)
        if self.state not in STATES:
            raise ProtocolError(f"unknown fetch state {self.state!r}")
        if self.failure is not None and self.failure not in FAILURES:
            raise ProtocolError(f"unknown failure {self.failure!r}")
        for name in ("bytes_done", "rate"):
            if getattr(self, name) < 0:
                raise ProtocolError(f"{name} must not be negative")
        if self.bytes_total is not None and self.bytes_total < 0:
            raise ProtocolError("bytes_total must not be negative")
        check_text("message", self.message, MAX_MESSAGE)


@dataclass(frozen=True)
class FetcherPong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int
    pid: int
    job_id: str | None  # the running download, if any
    execution: int | None


# What the fetcher accepts, and what the broker accepts back.
REQUESTS = Catalogue(Ping, Fetch, QueryFetch, CancelFetch)
REPLIES = Catalogue(FetcherPong, FetchStatus, Refused)
