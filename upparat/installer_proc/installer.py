"""The installer's job: the one open job execution, its record, and the
answers to the broker's requests (``answer_<type>``, paired with the
broker's calls of the same name in upparat.broker_proc).

The answers assume what ``allow.dispatch`` has already established from the
allow-list: that the request is permitted in the job's phase, not a repeat,
and that nothing else runs. They persist the new phase *before* acting on
it (e.g. ``installing`` before the install hook is spawned), so that the
record is never behind what happened.

Only the main thread changes the record. Hook and staging threads report
through ``events`` and a wake-up callback; ``apply_events`` (main thread)
records their outcome and pushes the new ``job_state`` to the broker.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from upparat import signature, verify
from upparat.config import HooksConfig
from upparat.ipc import handoff
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import NOT_PERMITTED, Message, Ping, Refusal
from upparat.release import Release

from . import hooks, staging
from .record import JobRecord, State, StateFile, boot_id, recover

log = logging.getLogger(__name__)

JOIN_S = 9.0  # at stop: how long to wait for a hook's group to be killed (supervisor waits 10 s)


@dataclass(frozen=True)
class Settings:
    """What the installer acts on, all from its own configuration."""

    hooks: HooksConfig
    staging_dir: Path
    download_dir: Path
    fetcher_uid: int | None  # owner a downloaded file must have (None: development run, one user)
    keys: signature.LazyKeys  # loaded at the first verification
    policy: verify.Policy
    max_file_size: int
    as_root: bool


class StageWorker:
    """One ``stage``, in a thread of its own (hashing may take seconds)."""

    def __init__(self, run: Callable[[Callable[[], bool]], staging.Staged],
                 on_done: Callable[["StageWorker", object], None]):
        self._run_stage = run
        self._on_done = on_done
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stage", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, reason: str) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            result: object = self._run_stage(self._cancel.is_set)
        except (staging.StageFailed, staging.Cancelled) as exc:
            result = exc
        except OSError as exc:  # the device's trouble (I/O error), not a peer's
            log.exception("staging failed")
            result = staging.StageFailed(staging.VERIFICATION_FAILED, f"staging failed: {exc}")
        except Exception as exc:  # our own bug: this job fails, root stays up
            log.exception("staging: internal error")
            result = staging.StageFailed(staging.VERIFICATION_FAILED, f"installer internal error: {exc}")
        self._on_done(self, result)


def job_message(text: str) -> str:
    return text[: ip.MAX_OUTPUT]


class Installer:
    def __init__(self, settings: Settings, staging_dirfd: int, wake: Callable[[], None]):
        self.settings = settings
        self._dirfd = staging_dirfd
        self._file = StateFile(staging_dirfd, str(settings.staging_dir))
        self._wake = wake
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.worker: hooks.HookRunner | StageWorker | None = None
        self.verified_here = False  # the staged file was hashed by this process (no restart since)
        self.stopping = False
        self.push: Callable[[Message], None] = lambda message: None
        self.state: State = self._file.load()

    # ----- start-up ----------------------------------------------------------
    def recover(self) -> None:
        """Make the loaded record true for now; kill leftovers; delete strays."""
        def kill_leftovers(job: JobRecord) -> None:
            killed = hooks.kill_marked(job.hook_pgid, job.hook_token)
            if killed:
                log.warning("killed %d leftover process(es) of the %s hook of job %s", killed,
                            job.hook.hook if job.hook else "?", job.job_id)

        for note in recover(self.state, boot_id(), kill_leftovers):
            log.warning("job %s.%d: %s", self.state.job.job_id, self.state.job.execution, note)
        job = self.state.job
        if job is not None and job.discarding:
            log.info("job %s.%d: completing its discard", job.job_id, job.execution)
            self._finish_discard()
        job = self.state.job
        keep = set() if job is None else {handoff.staged_name(job.job_id, job.execution)}
        for name in staging.remove_strays(self._dirfd, keep):
            log.warning("removed %r from the staging directory (it belongs to no open job)", name)
        self._save()

    # ----- what the allow-list asks ----------------------------------------------
    def open_job(self, job_id: str, execution: int) -> JobRecord | None:
        job = self.state.job
        return job if job is not None and job.ids == (job_id, execution) else None

    def phase_of(self, job_id: str, execution: int) -> str:
        job = self.open_job(job_id, execution)
        if job is not None:
            return job.phase
        if self.state.closed(job_id, execution):
            return ip.DISCARDED
        return ip.NONE

    def busy(self) -> bool:
        return self.worker is not None

    def busy_reason(self) -> str:
        job = self.state.job
        what = "staging" if isinstance(self.worker, StageWorker) else f"the {self.worker.hook} hook"
        doing = "is being discarded; waiting for" if job is not None and job.discarding else "runs:"
        return f"busy: job {job.job_id} execution {job.execution} {doing} {what}"

    def job_state(self, seq: int, job_id: str, execution: int) -> ip.JobState:
        job = self.open_job(job_id, execution)
        if job is None:
            if self.state.closed(job_id, execution):
                return ip.JobState(seq=seq, job_id=job_id, execution=execution, phase=ip.DISCARDED, failure=None,
                                   message="discarded: its hook was stopped and its files deleted", hook=None)
            return ip.JobState(seq=seq, job_id=job_id, execution=execution, phase=ip.NONE, failure=None,
                               message="the installer has no record of this job execution", hook=None)
        hook = job.hook
        if isinstance(self.worker, hooks.HookRunner) and hook is not None and hook.state == ip.RUNNING:
            hook = self.worker.live()
        return ip.JobState(seq=seq, job_id=job_id, execution=execution, phase=job.phase, failure=job.failure,
                           message=job_message(job.message), hook=hook)

    def status(self) -> dict:
        """For the heartbeat."""
        job = self.state.job
        return {"busy": self.busy(), "job_id": job.job_id if job else None,
                "execution": job.execution if job else None, "phase": job.phase if job else "idle"}

    # ----- the answers --------------------------------------------------------------
    def answer_ping(self, message: Ping) -> ip.Pong:
        job = self.state.job
        return ip.Pong(seq=message.seq, pid=os.getpid(), job_id=job.job_id if job else None,
                    execution=job.execution if job else None, phase=job.phase if job else None)

    def answer_query_job(self, message: ip.QueryJob) -> ip.JobState:
        return self.job_state(message.seq, message.job_id, message.execution)

    def answer_open_job(self, message: ip.OpenJob) -> ip.JobState:
        release = message.release
        s = self.settings
        job = JobRecord(job_id=message.job_id, execution=message.execution, release=release, phase=ip.OPENED)
        failure = verify.release_failure(release, s.keys, s.policy)
        if failure is not None:
            job.phase, job.failure, job.message = ip.FAILED, failure.state, failure.message
        elif self._rollback(release) is not None:
            job.phase, job.failure, job.message = ip.FAILED, "rollback_refused", self._rollback(release)
        elif release.signature is not None:
            job.message = "release verified with a configured public key"
        else:
            job.message = "unsigned release accepted on its sha256 ([verification] allow_unsigned = true)"
        self._change(lambda state: setattr(state, "job", job))
        log.info("job %s.%d opened: %s, version %r: %s", job.job_id, job.execution, job.phase, release.version,
                 job.message)
        return self.job_state(message.seq, job.job_id, job.execution)

    def answer_stage(self, message: ip.Stage) -> ip.JobState:
        job = self.open_job(message.job_id, message.execution)
        s = self.settings

        def begin(state: State) -> None:
            job.phase, job.stage_begun, job.message = ip.STAGING, True, "taking over and verifying the download"

        self._change(begin)
        check = staging.Check(job.release, s.keys, s.policy,
                              job.release.size if job.release.size is not None else s.max_file_size)
        ids = job.ids

        def run(cancelled: Callable[[], bool]) -> staging.Staged:
            return staging.stage(str(s.download_dir), self._dirfd, *ids, check, fetcher_uid=s.fetcher_uid,
                                 cancelled=cancelled)

        self.worker = StageWorker(run, self._report_staged)
        self.worker.start()
        return self.job_state(message.seq, message.job_id, message.execution)

    def answer_run_hook(self, message: ip.RunHook) -> ip.JobState:
        job = self.open_job(message.job_id, message.execution)
        s = self.settings
        name = message.hook
        release = job.release
        # Every argument from the installer's own record and directory, never from the message.
        args: tuple[str, ...] = (release.meta,)
        before = None
        phase = job.phase
        if name == "install":
            args += (str(s.staging_dir / handoff.staged_name(job.job_id, job.execution)),)
            before = self._before_install(job)
            phase = ip.INSTALLING
        elif name == "restart":
            args += (hooks.restart_force_arg(release.force),)
            phase = ip.RESTARTING
        token = secrets.token_hex(16)

        def begin(state: State) -> None:
            job.phase = phase
            job.install_begun = job.install_begun or name == "install"
            job.restart_begun = job.restart_begun or name == "restart"
            job.hook = ip.HookRun(hook=name, round=message.round, state=ip.RUNNING, exit_code=None, attempt=0,
                                  output="", message="starting")
            job.hook_token, job.hook_pgid = token, None
            job.message = f"the {name} hook runs"

        self._change(begin)  # recorded before anything is spawned
        limits = hooks.Limits(s.hooks.timeout, s.hooks.retry_interval, s.hooks.max_retries)
        runner = hooks.HookRunner(name, message.round, s.hooks.command(name), args, token, limits,
                                  as_root=s.as_root, before=before,
                                  on_spawned=lambda pgid: self._report(("spawned", runner, pgid)),
                                  on_done=lambda outcome: self._report(("hook_done", runner, outcome)))
        self.worker = runner
        runner.start()
        log.info("job %s.%d: %s hook (round %d) started", job.job_id, job.execution, name, message.round)
        return self.job_state(message.seq, message.job_id, message.execution)

    def answer_discard(self, message: ip.Discard) -> ip.JobState:
        job = self.open_job(message.job_id, message.execution)
        if job is None:
            if not self.state.closed(message.job_id, message.execution):
                self._change(lambda state: state.close(message.job_id, message.execution))
            return self.job_state(message.seq, message.job_id, message.execution)
        if self.worker is not None:
            if not job.discarding:
                self._change(lambda state: setattr(job, "discarding", True))
                self.worker.stop("the job was discarded")
                log.info("job %s.%d: discarding; stopping what runs first", job.job_id, job.execution)
            state = self.job_state(message.seq, message.job_id, message.execution)
            return ip.JobState(seq=state.seq, job_id=state.job_id, execution=state.execution, phase=state.phase,
                               failure=state.failure, message=job_message(self.busy_reason()), hook=state.hook)
        self._finish_discard()
        return self.job_state(message.seq, message.job_id, message.execution)

    # ----- from the hook and staging threads --------------------------------------
    def _report(self, event: tuple) -> None:
        self.events.put(event)
        self._wake()

    def _report_staged(self, worker: StageWorker, result: object) -> None:
        self._report(("staged", worker, result))

    def apply_events(self) -> int:
        """Record what the threads reported (main thread). Returns how many."""
        count = 0
        while True:
            try:
                kind, worker, value = self.events.get_nowait()
            except queue.Empty:
                return count
            count += 1
            if worker is not self.worker:
                continue  # from a run that is no longer current
            if kind == "spawned":
                self._apply_spawned(value)
            else:
                self.worker = None
                if self.stopping:
                    continue  # left as recorded: the next start-up knows what that means
                if self.state.job is not None and self.state.job.discarding:
                    self._finish_discard(push=True)
                elif kind == "hook_done":
                    self._apply_hook_done(value)
                else:
                    self._apply_staged(value)

    def _apply_spawned(self, pgid: int) -> None:
        job = self.state.job
        job.hook_pgid = pgid
        self._save_quietly()

    def _apply_hook_done(self, outcome: hooks.Outcome) -> None:
        job = self.state.job
        name = job.hook.hook
        job.hook = ip.HookRun(hook=name, round=job.hook.round, state=outcome.state, exit_code=outcome.exit_code,
                              attempt=outcome.attempt, output=outcome.output, message=outcome.message)
        job.hook_pgid = job.hook_token = None
        if outcome.state == ip.DONE:
            job.message = f"the {name} hook exited 0"
            if name == "install":
                job.phase = ip.INSTALLED
                release = job.release
                if release.serial is not None and verify.is_signed(release, self.settings.keys):
                    highest = self.state.highest_serial
                    self.state.highest_serial = release.serial if highest is None else max(highest, release.serial)
            elif name == "restart":
                job.phase = ip.RESTARTED
        else:
            job.phase, job.failure, job.message = ip.FAILED, outcome.failure, f"{name} hook: {outcome.message}"
        log.info("job %s.%d: %s hook %s -> %s", job.job_id, job.execution, name, outcome.state, job.phase)
        self._save_quietly()
        self._push_state(job)

    def _apply_staged(self, result: object) -> None:
        job = self.state.job
        if isinstance(result, staging.Staged):
            job.phase, job.staged_sha256, job.staged_size = ip.STAGED, result.sha256, result.size
            job.message = f"staged {result.size} bytes ({result.how}), sha256 {result.sha256}"
            self.verified_here = True
        elif isinstance(result, staging.StageFailed):
            job.phase, job.failure, job.message = ip.FAILED, result.failure, str(result)
        else:  # Cancelled without a discard or a stop: cannot happen; stage again
            job.phase, job.stage_begun, job.message = ip.OPENED, False, "staging was stopped; stage again"
        log.info("job %s.%d: %s: %s", job.job_id, job.execution, job.phase, job.message)
        self._save_quietly()
        self._push_state(job)

    def _before_install(self, job: JobRecord) -> Callable[[], tuple[str, str] | None]:
        """Checked in the hook's thread right before the install hook runs."""
        s = self.settings
        check = staging.Check(job.release, s.keys, s.policy,
                              job.release.size if job.release.size is not None else s.max_file_size)
        name = handoff.staged_name(job.job_id, job.execution)
        recorded = (job.staged_sha256, job.staged_size)
        rehash = not self.verified_here
        rollback = self._rollback(job.release)

        def before() -> tuple[str, str] | None:
            if rollback is not None:
                return "rollback_refused", rollback
            failure = verify.release_failure(check.release, check.keys, check.policy)
            if failure is not None:
                return failure.state, failure.message
            try:
                if rehash:
                    staged = staging.reverify(self._dirfd, name, check, lambda: False)
                    if (staged.sha256, staged.size) != recorded:
                        return staging.VERIFICATION_FAILED, "the staged file differs from what was verified"
                else:
                    staging.quick_check(self._dirfd, name, recorded[1])
            except staging.StageFailed as exc:
                return exc.failure, str(exc)
            return None

        return before

    def _rollback(self, release: Release) -> str | None:
        highest = self.state.highest_serial
        if release.signature is None or release.serial is None or highest is None or release.serial >= highest:
            return None
        return (f"serial {release.serial} is lower than the highest serial installed on this device ({highest}): "
                "an older release is not installed again")

    # ----- discard and stop ----------------------------------------------------------
    def _finish_discard(self, push: bool = False) -> None:
        job = self.state.job

        def forget(state: State) -> None:
            state.close(job.job_id, job.execution)
            state.job = None

        staging.delete_staged(self._dirfd, job.job_id, job.execution)
        staging.remove_strays(self._dirfd, set())
        self.verified_here = False
        try:
            self._change(forget)
        except Refusal:
            forget(self.state)  # forgotten in memory; the next save records it
        log.info("job %s.%d discarded", job.job_id, job.execution)
        if push:
            self.push(self.job_state(0, job.job_id, job.execution))

    def stop(self) -> None:
        """Installer shutdown: stop what runs (a hook's whole group).

        An orderly stop while the restart hook runs is what a restart hook
        that restarts this service (or reboots) causes: it counts as the
        restart, recorded now, so that it is not run again. A crash leaves
        ``restarting`` behind, which ``recover`` turns into restart_interrupted.
        """
        self.stopping = True
        job = self.state.job
        if job is not None and job.phase == ip.RESTARTING:
            def restarted(state: State) -> None:
                job.phase = ip.RESTARTED
                job.message = "the installer was stopped while the restart hook ran: counted as restarted"
            try:
                self._change(restarted)
            except Refusal:
                pass  # not recorded: recover decides after the next start
        worker = self.worker
        if worker is not None:
            worker.stop("the installer is stopping")
            worker.join(JOIN_S)

    # ----- persistence ----------------------------------------------------------------
    def _change(self, mutate: Callable[[State], None]) -> None:
        """Apply ``mutate`` and persist it; if it cannot be persisted, undo it
        and refuse (nothing is done that the record would not show)."""
        before = copy.deepcopy(self.state)
        mutate(self.state)
        try:
            self._file.save(self.state)
        except OSError as exc:
            log.error("cannot write the installer's record: %s", exc)
            self.state = before
            raise Refusal(NOT_PERMITTED, f"the installer cannot record the job ({exc.strerror}); nothing was "
                          "done") from None

    def _save(self) -> None:
        self._file.save(self.state)

    def _save_quietly(self) -> None:
        try:
            self._file.save(self.state)
        except OSError as exc:  # the disk's trouble; kept in memory, written with the next change
            log.error("cannot write the installer's record: %s", exc)

    def _push_state(self, job: JobRecord) -> None:
        self.push(self.job_state(0, job.job_id, job.execution))
