"""The installer's allow-list: every request it acts on, and when (OpenSSH
monitor.c style). A request not in ALLOW, or whose checks do not all pass
now, is refused whole with the first failing reason; nothing is half-done.

The broker's ``run_hook()`` is answered by ``answer_run_hook()``, its
``stage()`` by ``answer_stage()``, and so on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from upparat.config import HooksConfig
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import Message, Ping, Pong, ProtocolError

from .hooks import HookRun, restart_force_arg
from .staging import MAX_JOBS, StagingArea

log = logging.getLogger(__name__)

MAX_RUNS = 32  # finished hook runs remembered for query_hook
MAX_STAGE_REPLIES = 16  # stage answers remembered for a retried request


# ----- when a request is permitted: each returns None or the reason to refuse
def always(installer: "Installer", message) -> str | None:
    return None


def idle(installer: "Installer", message) -> str | None:
    current = installer.current
    if current is not None and current.running:
        return f"busy: the {current.hook} hook of job {current.job_id} is running"
    return None


def configured(installer: "Installer", message: ip.RunHook) -> str | None:
    if installer.hooks.command(message.hook) is None:
        return f"hook {message.hook} is not configured"
    return None


def staged_not_installed(installer: "Installer", message: ip.RunHook) -> str | None:
    job = installer.staging.job(message.job_id)
    if job is None:
        return f"install refused: job {message.job_id} has not been staged and verified by the installer"
    if job.installed:
        return f"install refused: the install of job {message.job_id} has already completed"
    if not installer.staging.staged_file_intact(message.job_id):
        return f"install refused: the staged file of job {message.job_id} is gone or changed; stage it again"
    return None


def installed(installer: "Installer", message: ip.RunHook) -> str | None:
    job = installer.staging.job(message.job_id)
    if job is None or not job.installed:
        return f"restart refused: the install hook of job {message.job_id} has not finished with exit 0"
    return None


def not_installed(installer: "Installer", message: ip.Stage) -> str | None:
    job = installer.staging.job(message.job_id)
    if job is not None and job.installed:
        return f"stage refused: job {message.job_id} is already installed; discard it first"
    return None


def room_to_stage(installer: "Installer", message: ip.Stage) -> str | None:
    if installer.staging.job(message.job_id) is None and installer.staging.job_count() >= MAX_JOBS:
        return f"stage refused: {MAX_JOBS} jobs are staged already; discard finished jobs first"
    return None


# ----- the answers ----------------------------------------------------------
class Installer:
    """The installer's state: the hook runs and the staging area."""

    def __init__(self, hooks: HooksConfig, staging: StagingArea):
        self.hooks = hooks
        self.staging = staging
        self.current: HookRun | None = None
        self._runs: dict[tuple[str, str], HookRun] = {}  # latest run per (job_id, hook)
        self._stage_replies: dict[str, ip.StageStatus] = {}  # latest answer per job_id

    def dispatch(self, message: Message) -> Message:
        """Answer one decoded request, or raise ProtocolError to refuse it."""
        repeated = self._repeated(message)
        if repeated is not None:
            log.info("%s of job %s seq %d repeated: answered, not run again",
                     message.TYPE, message.job_id, message.seq)
            return repeated
        rule = ALLOW.get((message.TYPE, message.hook if isinstance(message, ip.RunHook) else None))
        if rule is None:
            raise ProtocolError(f"{message.TYPE} is not in the installer's allow-list")
        for check in rule.when:
            reason = check(self, message)
            if reason is not None:
                raise ProtocolError(reason)
        try:
            return rule.answer(self, message)
        except OSError as exc:  # the device's trouble (disk full, I/O error), not the peer's
            log.exception("%s failed", message.TYPE)
            raise ProtocolError(f"installer error: {message.TYPE} failed: {exc}") from None

    def _repeated(self, message: Message) -> Message | None:
        # zguide: a retried request is answered, not re-executed.
        if isinstance(message, ip.RunHook):
            run = self._runs.get((message.job_id, message.hook))
            if run is not None and run.seq == message.seq:
                return run.status()
        if isinstance(message, ip.Stage):
            reply = self._stage_replies.get(message.job_id)
            if reply is not None and reply.seq == message.seq:
                return reply
        return None

    def answer_ping(self, message: Ping) -> Pong:
        current = self.current
        busy = current.job_id if current is not None and current.running else None
        return Pong(seq=message.seq, pid=os.getpid(), busy_job_id=busy)

    def answer_query_hook(self, message: ip.QueryHook) -> ip.HookStatus:
        run = self._runs.get((message.job_id, message.hook))
        if run is not None and run.seq == message.seq:
            return run.status()
        return ip.HookStatus(job_id=message.job_id, seq=message.seq, hook=message.hook, state=ip.UNKNOWN,
                             exit_code=None, attempt=0, output="",
                             message=f"no {message.hook} hook run of job {message.job_id} with seq {message.seq}")

    def answer_run_hook(self, message: ip.RunHook) -> ip.HookStatus:
        # The command and the file come from the installer's own config and directory.
        command = self.hooks.command(message.hook)
        args: tuple[str, ...] = (message.meta,)
        on_done = None
        if message.hook == "install":
            args += (str(self.staging.staged_path(message.job_id)),)
            on_done = self.staging.mark_installed
        elif message.hook == "restart":
            args += (restart_force_arg(message.force),)
        run = HookRun(message.job_id, message.seq, message.hook, command, args,
                      retry_interval=self.hooks.retry_interval, max_retries=self.hooks.max_retries,
                      timeout=self.hooks.timeout, on_done=on_done)
        self._remember(run)
        self.current = run
        run.start()
        return run.status()

    def answer_stage(self, message: ip.Stage) -> ip.StageStatus:
        reply = self.staging.stage(message)
        self._stage_replies.pop(message.job_id, None)
        self._stage_replies[message.job_id] = reply
        while len(self._stage_replies) > MAX_STAGE_REPLIES:
            del self._stage_replies[next(iter(self._stage_replies))]
        return reply

    def answer_discard(self, message: ip.Discard) -> ip.Discarded:
        self.staging.discard(message.job_id)
        self._stage_replies.pop(message.job_id, None)
        for key in [key for key in self._runs if key[0] == message.job_id]:
            del self._runs[key]
        log.info("job %s discarded", message.job_id)
        return ip.Discarded(job_id=message.job_id, seq=message.seq)

    def _remember(self, run: HookRun) -> None:
        key = (run.job_id, run.hook)
        self._runs.pop(key, None)
        self._runs[key] = run
        for old in list(self._runs):
            if len(self._runs) <= MAX_RUNS:
                break
            if not self._runs[old].running:
                del self._runs[old]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a running hook (its group gets SIGTERM, then SIGKILL) and wait for it."""
        current = self.current
        if current is not None and current.running:
            log.info("stopping the %s hook of job %s", current.hook, current.job_id)
            current.stop()
            current.join(timeout)


@dataclass(frozen=True)
class Rule:
    answer: Callable
    when: tuple[Callable, ...]


# The allow-list. Key: (request type, hook name for run_hook).
ALLOW: dict[tuple[str, str | None], Rule] = {
    ("ping", None):            Rule(Installer.answer_ping,       (always,)),
    ("query_hook", None):      Rule(Installer.answer_query_hook, (always,)),
    ("run_hook", "version"):   Rule(Installer.answer_run_hook,   (configured, idle)),
    ("run_hook", "download"):  Rule(Installer.answer_run_hook,   (configured, idle)),
    ("run_hook", "ready"):     Rule(Installer.answer_run_hook,   (configured, idle)),
    ("run_hook", "install"):   Rule(Installer.answer_run_hook,   (configured, idle, staged_not_installed)),
    ("run_hook", "restart"):   Rule(Installer.answer_run_hook,   (configured, idle, installed)),
    ("stage", None):           Rule(Installer.answer_stage,      (idle, not_installed, room_to_stage)),
    ("discard", None):         Rule(Installer.answer_discard,    (idle,)),
}
