"""The broker_proc -> installer_proc boundary: the only messages it carries.

The installer is root and treats every request as possibly hostile. It never
takes a command or a path from a message: ``hook`` is a *name* it looks up in
its own config, and the file for ``install`` is the one it staged itself, in
its own root-only directory, for that job_id (see installer_proc for the
allow-list of what is permitted when).

Hooks run in the installer's background; ``run_hook`` answers at once with
the hook's status and the broker polls with ``query_hook``. A ``run_hook``
repeated with the same (job_id, hook, seq) is answered, not run again.
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

HOOKS = ("version", "download", "install", "restart", "ready")
MAX_META = 4096
MAX_VERSION = 256
MAX_SIGNATURE = 2048
MAX_OUTPUT = 1024

# HookStatus.state values
RUNNING = "running"
DONE = "done"  # exit 0
FAILED = "failed"  # other exit code, could not start, or killed at [hooks] timeout
GAVE_UP = "gave_up"  # exit 3 more than [hooks] max_retries times
UNKNOWN = "unknown"  # no such run
HOOK_STATES = (RUNNING, DONE, FAILED, GAVE_UP, UNKNOWN)
# StageStatus.state values
STAGED = "staged"
STAGE_FAILED = "failed"
STAGE_STATES = (STAGED, STAGE_FAILED)
STAGE_FAILURES = ("verification_failed", "insufficient_disk_space", "file_missing")


def _check_hook_name(hook: str) -> None:
    if hook not in HOOKS:
        raise ProtocolError(f"hook must be one of {', '.join(HOOKS)}")


@dataclass(frozen=True)
class RunHook(Message):
    TYPE: ClassVar[str] = "run_hook"
    job_id: str
    seq: int
    hook: str
    meta: str
    force: bool

    def check(self) -> None:
        check_job_id(self.job_id)
        _check_hook_name(self.hook)
        check_text("meta", self.meta, MAX_META)
        if "\x00" in self.meta:
            raise ProtocolError("meta must not contain NUL")


@dataclass(frozen=True)
class QueryHook(Message):
    TYPE: ClassVar[str] = "query_hook"
    job_id: str
    seq: int
    hook: str

    def check(self) -> None:
        check_job_id(self.job_id)
        _check_hook_name(self.hook)


@dataclass(frozen=True)
class Stage(Message):
    """Copy <download_dir>/<job_id> into staging and verify it there."""

    TYPE: ClassVar[str] = "stage"
    job_id: str
    seq: int
    version: str
    sha256: str | None
    size: int | None
    signature: str | None

    def check(self) -> None:
        check_job_id(self.job_id)
        if not self.version or len(self.version) > MAX_VERSION or "\n" in self.version or "\r" in self.version:
            raise ProtocolError("version must be 1-256 characters without line breaks")
        if self.sha256 is not None and not SHA256_RE.match(self.sha256):
            raise ProtocolError("sha256 must be 64 lowercase hex characters")
        if self.size is not None and self.size < 0:
            raise ProtocolError("size must not be negative")
        check_text("signature", self.signature, MAX_SIGNATURE)


@dataclass(frozen=True)
class Discard(Message):
    """Forget a job: delete its staged file and its hook results."""

    TYPE: ClassVar[str] = "discard"
    job_id: str
    seq: int

    def check(self) -> None:
        check_job_id(self.job_id)


@dataclass(frozen=True)
class HookStatus(Message):
    TYPE: ClassVar[str] = "hook_status"
    job_id: str
    seq: int
    hook: str
    state: str
    exit_code: int | None
    attempt: int
    output: str  # last non-empty stdout line, control characters removed
    message: str

    def check(self) -> None:
        check_job_id(self.job_id)
        _check_hook_name(self.hook)
        if self.state not in HOOK_STATES:
            raise ProtocolError(f"unknown hook state {self.state!r}")
        check_text("output", self.output, MAX_OUTPUT)
        check_text("message", self.message, MAX_OUTPUT)


@dataclass(frozen=True)
class StageStatus(Message):
    TYPE: ClassVar[str] = "stage_status"
    job_id: str
    seq: int
    state: str
    failure: str | None
    message: str

    def check(self) -> None:
        check_job_id(self.job_id)
        if self.state not in STAGE_STATES:
            raise ProtocolError(f"unknown stage state {self.state!r}")
        if self.failure is not None and self.failure not in STAGE_FAILURES:
            raise ProtocolError(f"unknown stage failure {self.failure!r}")
        check_text("message", self.message, MAX_OUTPUT)


@dataclass(frozen=True)
class Discarded(Message):
    TYPE: ClassVar[str] = "discarded"
    job_id: str
    seq: int


REQUESTS = Catalogue(Ping, RunHook, QueryHook, Stage, Discard)
REPLIES = Catalogue(Pong, HookStatus, StageStatus, Discarded, Refused)
