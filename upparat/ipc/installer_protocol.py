"""The broker_proc -> installer_proc boundary: the only messages it carries.

The installer is root and treats every request as possibly hostile. A job
execution is identified by ``(job_id, execution)``; the broker first opens it
with the job's ``Release`` (version, meta, force, sha256, size, serial,
signature). The installer verifies that release itself, with its own keys
and policy, records it in root-only state, and from then on uses *its own
record* for every hook argument and every file check: later requests carry
only ids and a step, never values. It never takes a command or a path from a
message: ``hook`` is a name it looks up in its own config, the install file
is the one it staged itself.

Requests (broker calls in upparat.broker_proc.peers, answered by the
installer's ``answer_<type>``):

    ping        -> pong                     liveness; which job is open, its phase
    open_job    -> job_state | refused      verify the release, open the job
    query_job   -> job_state                the installer's record (the authority
                                            on what was staged, run and finished)
    stage       -> job_state (staging)      take over and verify the downloaded file
    run_hook    -> job_state (hook running) run one hook of the open job
    discard     -> job_state (discarded)    stop its hook, delete its files, forget it

Every request is idempotent per ``(job_id, execution, step)``: a repeated
``open_job``, ``stage`` or ``run_hook`` (same hook and ``round``) is answered
with the current state, never done twice. ``round`` numbers repeated runs of
the read-only hooks (``version`` after a restart is asked again until it
matches); ``install`` and ``restart`` have round 0 only.

The installer pushes an unsolicited ``job_state`` (seq 0) to the broker
whenever a job's state changes (staging finished, a hook exited), so the
broker never polls. Job phases, and which hook each permits, are in
``PHASES`` below; the installer's literal allow-list enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from upparat.ipc.wire import Catalogue, Message, Ping, ProtocolError, Refused, check_text
from upparat.release import HOOK_NAMES, Release, is_job_id

MAX_OUTPUT = 1024
MAX_EXECUTION = 2**63

# The installer's phases of one job execution, in order.
NONE = "none"  # no record of this job execution
OPENED = "opened"  # release verified and recorded; version/download hooks allowed
STAGING = "staging"  # taking over and verifying the downloaded file
STAGED = "staged"  # verified file in the root-only staging directory; install allowed
INSTALLING = "installing"  # install hook running
INSTALL_INTERRUPTED = "install_interrupted"  # the installer stopped while install ran; install allowed again
INSTALLED = "installed"  # install exited 0; restart allowed
RESTARTING = "restarting"  # restart hook running
RESTART_INTERRUPTED = "restart_interrupted"  # the installer died (same boot) while restart ran; restart allowed again
RESTARTED = "restarted"  # restart exited 0, or the device rebooted or the installer was stopped while it ran
FAILED = "failed"  # release, file or a hook failed (``failure`` says which); only discard is allowed
DISCARDED = "discarded"  # stopped, files deleted; remembered so late requests are refused
PHASES = (NONE, OPENED, STAGING, STAGED, INSTALLING, INSTALL_INTERRUPTED, INSTALLED, RESTARTING,
          RESTART_INTERRUPTED, RESTARTED, FAILED, DISCARDED)

# Job-status failure states (docs/contracts.md, Job status) the installer may report.
FAILURES = ("invalid_job_document", "verification_failed", "rollback_refused", "insufficient_disk_space",
            "file_too_large", "file_missing", "version_hook_failed", "download_hook_failed",
            "installation_hook_failed", "restart_hook_failed", "ready_hook_failed")

# HookRun.state values
RUNNING = "running"
DONE = "done"  # exit 0
HOOK_FAILED = "failed"  # other exit code, could not start, killed at [hooks] timeout or on discard
GAVE_UP = "gave_up"  # exit 3 more than [hooks] max_retries times
HOOK_STATES = (RUNNING, DONE, HOOK_FAILED, GAVE_UP)


def check_ids(job_id: str, execution: int) -> None:
    if not is_job_id(job_id):
        raise ProtocolError("job_id must be 1-64 characters from a-z A-Z 0-9 _ -")
    if not 0 <= execution < MAX_EXECUTION:
        raise ProtocolError("execution must be 0 <= execution < 2^63")


@dataclass(frozen=True)
class OpenJob(Message):
    TYPE: ClassVar[str] = "open_job"
    seq: int
    job_id: str
    execution: int
    release: Release

    def check(self) -> None:
        check_ids(self.job_id, self.execution)
        problem = self.release.problem()
        if problem:
            raise ProtocolError(f"release: {problem}")


@dataclass(frozen=True)
class QueryJob(Message):
    TYPE: ClassVar[str] = "query_job"
    seq: int
    job_id: str
    execution: int

    def check(self) -> None:
        check_ids(self.job_id, self.execution)


@dataclass(frozen=True)
class Stage(Message):
    """Take over ``<download_dir>/<handoff name>`` and verify it (see upparat.ipc.handoff)."""

    TYPE: ClassVar[str] = "stage"
    seq: int
    job_id: str
    execution: int

    def check(self) -> None:
        check_ids(self.job_id, self.execution)


@dataclass(frozen=True)
class RunHook(Message):
    TYPE: ClassVar[str] = "run_hook"
    seq: int
    job_id: str
    execution: int
    hook: str
    round: int

    def check(self) -> None:
        check_ids(self.job_id, self.execution)
        if self.hook not in HOOK_NAMES:
            raise ProtocolError(f"hook must be one of {', '.join(HOOK_NAMES)}")
        if not 0 <= self.round < 2**31:
            raise ProtocolError("round must be 0 <= round < 2^31")
        if self.hook in ("install", "restart") and self.round != 0:
            raise ProtocolError(f"the {self.hook} hook runs once per job: round must be 0")


@dataclass(frozen=True)
class Discard(Message):
    """Stop the job's hook (its process group), delete its files, forget it."""

    TYPE: ClassVar[str] = "discard"
    seq: int
    job_id: str
    execution: int

    def check(self) -> None:
        check_ids(self.job_id, self.execution)


@dataclass(frozen=True)
class HookRun:
    """The latest hook run of a job."""

    hook: str
    round: int
    state: str
    exit_code: int | None
    attempt: int  # 0-based retry count (exit 3)
    output: str  # last non-empty stdout line, control characters removed
    message: str  # why, for a person

    def check(self) -> None:
        if self.hook not in HOOK_NAMES:
            raise ProtocolError(f"unknown hook {self.hook!r}")
        if self.state not in HOOK_STATES:
            raise ProtocolError(f"unknown hook state {self.state!r}")
        check_text("output", self.output, MAX_OUTPUT)
        check_text("message", self.message, MAX_OUTPUT)


@dataclass(frozen=True)
class JobState(Message):
    """The installer's record of one job execution (a reply, or a push with seq 0)."""

    TYPE: ClassVar[str] = "job_state"
    seq: int
    job_id: str
    execution: int
    phase: str
    failure: str | None
    message: str
    hook: HookRun | None

    def check(self) -> None:
        check_ids(self.job_id, self.execution)
        if self.phase not in PHASES:
            raise ProtocolError(f"unknown phase {self.phase!r}")
        if self.failure is not None and self.failure not in FAILURES:
            raise ProtocolError(f"unknown failure {self.failure!r}")
        check_text("message", self.message, MAX_OUTPUT)
        if self.hook is not None:
            self.hook.check()


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int
    pid: int
    job_id: str | None  # the open job execution, if any
    execution: int | None
    phase: str | None

    def check(self) -> None:
        if self.job_id is not None:
            check_ids(self.job_id, self.execution if self.execution is not None else -1)
        if self.phase is not None and self.phase not in PHASES:
            raise ProtocolError(f"unknown phase {self.phase!r}")


REQUESTS = Catalogue(Ping, OpenJob, QueryJob, Stage, RunHook, Discard)
REPLIES = Catalogue(Pong, JobState, Refused)
