"""One job lifecycle: an explicit phase machine driven by events.

The broker's main loop feeds in what happened — an MQTT message, a reply or
push from the installer or fetcher, time passing — and the ``Agent`` decides
what to do next. Nothing here waits or polls: every request is answered by
an event, and every phase has a deadline (``on_time``) that counts garbage
answers as well as silence.

    DESCRIBE -> SYNC -> OPEN -> VERSION -> DOWNLOAD_HOOK -> FETCH -> STAGE -> INSTALL
      -> REBOOT_REPORT -> RESTART -> CONFIRM -> READY -> FINISH

``TRANSITIONS`` is the one literal table of what may follow what; every
transition is logged ``job J: FROM -> TO (why)``. SYNC asks the installer —
the authority on what was staged, run and finished — where the job really
is, so a restarted broker continues there (install done -> restart; install
running -> wait; staged -> install) instead of starting over. FINISH queues
the final status in the persisted outbox first, then discards the job's
files in the installer and the fetcher, retrying until both confirm.

A job that AWS cancels or removes is abandoned: its hook is stopped and its
files deleted, and nothing more is reported for it.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from upparat.broker_proc import jobs_api
from upparat.broker_proc.jobs_api import BadPayload, Topics
from upparat.broker_proc.outbox import FINAL, Outbox, Update
from upparat.broker_proc.peers import FetcherPeer, InstallerPeer
from upparat.config import Config
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import BUSY, MALFORMED, Message, Refused
from upparat.release import BadDocument, Release, parse_document

log = logging.getLogger("upparat.broker")

IN_PROGRESS, SUCCEEDED, FAILED = "IN_PROGRESS", "SUCCEEDED", "FAILED"

DESCRIBE_RETRY = 10.0  # s without a describe answer before asking again
DESCRIBE_LIMIT = 300.0  # s of unanswered describes before the job is left for later
PENDING_RETRY = 10.0  # s without get/accepted before asking again
PENDING_POLL = 300.0  # s between safety polls for pending jobs while idle
PEER_RETRY = 5.0  # s without an answer from a peer before the (idempotent) request is sent again
PEER_LIMIT = 120.0  # s a peer may stay silent (or answer garbage) before the job fails
HOOK_QUERY = 30.0  # s between safety queries while a hook runs (the installer pushes the result)
FETCH_QUERY = 10.0  # s between safety queries while downloading (the fetcher pushes progress)
BUSY_RETRY = 2.0  # s before asking again when a peer is busy with something else
STAGE_LIMIT = 900.0
GARBAGE_LIMIT = 20  # unusable answers in one phase before the job fails
PROGRESS_EVERY = 10.0  # s between progress reports to AWS
MAX_URL_REFRESH = 3
MAX_RESYNC = 3
CLEANUP_RETRY = 2.0
CLEANUP_RETRY_MAX = 60.0


class Phase(enum.Enum):
    DESCRIBE = "describe"  # asked AWS for the execution and its document
    SYNC = "sync"  # asking the installer what it knows of this job (and clearing another job it holds)
    OPEN = "open"  # the installer verifies the release with its own keys
    VERSION = "version"  # version hook: already installed?
    DOWNLOAD_HOOK = "download_hook"  # download hook: may we download now?
    FETCH = "fetch"  # the fetcher downloads and checks the file
    STAGE = "stage"  # the installer takes the file over and verifies it again
    INSTALL = "install"  # install hook
    REBOOT_REPORT = "reboot_report"  # waiting until AWS holds reboot_start
    RESTART = "restart"  # restart hook
    CONFIRM = "confirm"  # version hook after the restart
    READY = "ready"  # ready hook
    FINISH = "finish"  # final status queued; discarding the job's files


P = Phase
# What may follow what (FINISH is reachable from everywhere: a job can fail in any phase).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    P.DESCRIBE: frozenset({P.SYNC, P.FINISH}),
    P.SYNC: frozenset({P.OPEN, P.VERSION, P.FETCH, P.STAGE, P.INSTALL, P.REBOOT_REPORT, P.RESTART, P.CONFIRM,
                       P.FINISH}),
    P.OPEN: frozenset({P.SYNC, P.VERSION, P.DOWNLOAD_HOOK, P.FETCH, P.CONFIRM, P.FINISH}),
    P.VERSION: frozenset({P.SYNC, P.DOWNLOAD_HOOK, P.FETCH, P.FINISH}),
    P.DOWNLOAD_HOOK: frozenset({P.SYNC, P.FETCH, P.FINISH}),
    P.FETCH: frozenset({P.STAGE, P.FINISH}),
    P.STAGE: frozenset({P.SYNC, P.INSTALL, P.FINISH}),
    P.INSTALL: frozenset({P.SYNC, P.REBOOT_REPORT, P.FINISH}),
    P.REBOOT_REPORT: frozenset({P.RESTART, P.FINISH}),
    P.RESTART: frozenset({P.SYNC, P.CONFIRM, P.FINISH}),
    P.CONFIRM: frozenset({P.SYNC, P.READY, P.FINISH}),
    P.READY: frozenset({P.SYNC, P.FINISH}),
    P.FINISH: frozenset(),
}
HOOK_OF = {P.VERSION: "version", P.DOWNLOAD_HOOK: "download", P.INSTALL: "install", P.RESTART: "restart",
           P.CONFIRM: "version", P.READY: "ready"}
FAILED_STATE = {"version": "version_hook_failed", "download": "download_hook_failed",
                "install": "installation_hook_failed", "restart": "restart_hook_failed", "ready": "ready_hook_failed"}
# Where a job continues, by what the installer has recorded for it.
RESUME = {
    ip.OPENED: P.VERSION,
    ip.STAGING: P.STAGE,
    ip.STAGED: P.INSTALL,
    ip.INSTALLING: P.INSTALL,
    ip.INSTALL_INTERRUPTED: P.INSTALL,
    ip.INSTALLED: P.REBOOT_REPORT,
    ip.RESTARTING: P.RESTART,
    ip.RESTART_INTERRUPTED: P.RESTART,
    ip.RESTARTED: P.CONFIRM,
}


@dataclass
class Job:
    """Everything about the job execution being worked on; replaced, never reset."""

    job_id: str
    execution: int = 0
    phase: Phase = P.DESCRIBE
    release: Release | None = None
    url: str | None = None
    aws_state: str = ""  # statusDetails.state when we found the job (reboot_start: it restarted)
    entered_at: float = 0.0
    deadline: float | None = None
    retry_at: float | None = None
    last_heard: float = 0.0  # last usable answer from the peer this phase waits for
    garbage_at_entry: int = 0
    describe_token: str = ""
    hook_round: int = 0
    resyncs: int = 0
    url_refreshes: int = 0
    awaiting_url: bool = False  # FETCH: asked AWS for a fresh presigned URL
    restart_done_at: float | None = None
    confirm_checks: list[str] = field(default_factory=list)
    reboot_rank: int | None = None
    progress_at: float = 0.0
    progress_value: str = ""
    other_open: tuple[str, int] | None = None  # another job the installer still holds (SYNC)
    synced: bool = False  # the installer's Pong was seen in this SYNC
    final_rank: int | None = None  # FINISH: the final status's rank
    installer_clean: bool = False  # FINISH: the installer confirmed the discard
    fetcher_clean: bool = False  # FINISH: the fetcher confirmed the cancel
    cleanup_delay: float = CLEANUP_RETRY
    abandoned: bool = False  # cancelled or removed: nothing more is reported


class Agent:
    """The broker's decisions; all methods run in the main loop's thread."""

    def __init__(self, config: Config, publish, installer: InstallerPeer, fetcher: FetcherPeer,
                 state_dir: Path | None, clock=time.monotonic):
        self.cfg = config
        self.topics = Topics(config.broker.thing_name)
        self._publish = publish
        self.installer = installer
        self.fetcher = fetcher
        self.clock = clock
        self.connected = False
        self.job: Job | None = None
        self.outbox = Outbox(state_dir, self.publish, self.topics, clock, self._outbox_gone, self._outbox_accepted)
        self.pending_asked_at: float | None = None
        self.pending_poll_at = 0.0
        self.pending_token = ""

    # ----- helpers -------------------------------------------------------
    def publish(self, topic: str, payload: bytes) -> bool:
        if not self.connected:
            return False
        self._publish(topic, payload)
        return True

    def may_take(self, job_id: str, execution: int | None) -> bool:
        """A job this device handles (job_prefix) and has not finished already:
        a pending job is recognised by (job id, execution), never by its document."""
        if not job_id.startswith(self.cfg.service.job_prefix) or self.outbox.has_final(job_id):
            return False
        return not self.outbox.is_done(job_id, execution)

    def ask_pending(self) -> None:
        self.pending_asked_at = self.clock()
        self.pending_token = secrets.token_hex(8)
        self.publish(self.topics.get_pending(), ('{"clientToken":"%s"}' % self.pending_token).encode())

    def describe(self, job: Job) -> None:
        job.describe_token = secrets.token_hex(8)
        self.publish(self.topics.describe(job.job_id),
                     jobs_api.describe_payload(job.describe_token, job.execution or None))

    def report(self, status: str, state: str, milestone: bool = True, **details) -> int:
        job = self.job
        version = job.release.version if job.release else None
        return self.outbox.report(job.job_id, job.execution, status,
                                  jobs_api.status_details(state, version=version, **details), milestone)

    def report_once(self, state: str) -> int:
        """An IN_PROGRESS milestone, unless it is already the job's latest update (a resumed job)."""
        job = self.job
        last = self.outbox.last(job.job_id)
        if last is not None and last.state == state:
            return last.rank
        return self.report(IN_PROGRESS, state)

    def status(self) -> dict:
        """For the supervisor's heartbeat (upparatctl status)."""
        job = self.job
        if job is None:
            return {"job_id": None, "phase": "idle", "subscribed": self.connected}
        return {"job_id": job.job_id, "execution": job.execution, "phase": job.phase.value,
                "subscribed": self.connected}

    # ----- phases --------------------------------------------------------
    def enter(self, phase: Phase, why: str) -> None:
        job = self.job
        if phase is not P.FINISH and phase not in TRANSITIONS[job.phase]:
            # Our own inconsistency: crash loudly rather than run the job wrongly.
            raise RuntimeError(f"job {job.job_id}: no transition {job.phase.value} -> {phase.value} ({why})")
        log.info("job %s: %s -> %s (%s)", job.job_id, job.phase.value, phase.value, why)
        now = self.clock()
        job.phase = phase
        job.entered_at = now
        job.last_heard = now
        job.deadline = None
        job.retry_at = None
        job.garbage_at_entry = self.installer.client.garbage + self.fetcher.client.garbage
        getattr(self, f"_start_{phase.value}")()

    def _hook_limit(self) -> float:
        hooks = self.cfg.hooks
        return hooks.timeout * (hooks.max_retries + 1) + hooks.retry_interval * hooks.max_retries + 60

    def _wait(self, retry: float, limit: float | None) -> None:
        now = self.clock()
        self.job.retry_at = now + retry
        self.job.deadline = now + limit if limit is not None else None

    def _start_describe(self) -> None:
        self.describe(self.job)
        self._wait(DESCRIBE_RETRY, DESCRIBE_LIMIT)

    def _start_sync(self) -> None:
        job = self.job
        job.synced = False
        job.other_open = None
        self.installer.ping()
        self._wait(PEER_RETRY, PEER_LIMIT)

    def _start_open(self) -> None:
        job = self.job
        self.installer.open_job(job.job_id, job.execution, job.release)
        self._wait(PEER_RETRY, PEER_LIMIT)

    def _start_version(self) -> None:
        if self.cfg.hooks.version is None:
            return self.enter(P.DOWNLOAD_HOOK, "no version hook")
        self._run_hook()

    def _start_download_hook(self) -> None:
        if self.cfg.hooks.download is None:
            return self.enter(P.FETCH, "no download hook")
        self._run_hook()

    def _start_fetch(self) -> None:
        job = self.job
        self.report_once("download_start")
        job.progress_at = self.clock()  # the first progress report one interval later
        self.fetcher.fetch(job.job_id, job.execution, job.url, job.release)
        self._wait(FETCH_QUERY, self.cfg.service.download_timeout + 300)

    def _start_stage(self) -> None:
        job = self.job
        self.installer.stage(job.job_id, job.execution)
        self._wait(PEER_RETRY, STAGE_LIMIT)

    def _start_install(self) -> None:
        if self.cfg.hooks.install is None:
            return self.finish(SUCCEEDED, "no_installation_hook_provided")
        self.report_once("installation_start")
        self.job.progress_at = self.clock()
        self._run_hook()

    def _start_reboot_report(self) -> None:
        if self.cfg.hooks.restart is None:
            return self.finish(SUCCEEDED, "no_restart_hook_provided")
        # The restart hook runs only once AWS holds reboot_start: it is how we know,
        # after a reboot, that the installation ran (rustot PR #93). Until then the job
        # waits, however long the device is offline (the outbox retries with backoff).
        self.job.reboot_rank = self.report_once("reboot_start")
        self._check_reboot_accepted()

    def _start_restart(self) -> None:
        self._run_hook()

    def _start_confirm(self) -> None:
        job = self.job
        if job.restart_done_at is None:
            job.restart_done_at = self.clock()
        if self.cfg.hooks.version is None:
            if self.cfg.hooks.ready is None:
                return self.finish(SUCCEEDED, "complete_no_version_check")
            return self.enter(P.READY, "no version hook")
        self._run_hook()

    def _start_ready(self) -> None:
        if self.cfg.hooks.ready is None:
            return self.finish(SUCCEEDED, "complete_no_ready_check")
        self._run_hook()

    def _start_finish(self) -> None:
        self._cleanup()

    def _run_hook(self) -> None:
        job = self.job
        self.installer.run_hook(job.job_id, job.execution, HOOK_OF[job.phase], job.hook_round)
        self._wait(PEER_RETRY, self._hook_limit())

    # ----- endings ---------------------------------------------------------
    def finish(self, status: str, state: str, message: str | None = None) -> None:
        """Queue the final status (persisted first), then clean up."""
        job = self.job
        if job.phase is P.FINISH:
            return
        job.final_rank = self.report(status, state, message=message)
        self.enter(P.FINISH, f"{status} {state}")

    def abandon(self, why: str) -> None:
        """AWS cancelled or removed the job: stop, clean up, report nothing."""
        job = self.job
        if job is None or job.abandoned:
            return
        log.warning("job %s: stopping work: %s", job.job_id, why)
        job.abandoned = True
        self.outbox.forget(job.job_id)
        if job.phase is not P.FINISH:
            self.enter(P.FINISH, f"abandoned: {why}")
        self._maybe_done()

    def _cleanup(self) -> None:
        """Ask both peers to forget the job; repeated until both confirm."""
        job = self.job
        if not job.installer_clean:
            self.installer.discard(job.job_id, job.execution)
        if not job.fetcher_clean:
            self.fetcher.cancel_fetch(job.job_id, job.execution)
        job.retry_at = self.clock() + job.cleanup_delay
        job.cleanup_delay = min(job.cleanup_delay * 2, CLEANUP_RETRY_MAX)
        self._maybe_done()

    def _maybe_done(self) -> None:
        job = self.job
        if job is None or job.phase is not P.FINISH:
            return
        reported = job.abandoned or job.final_rank is None or self.outbox.accepted(job.job_id, job.final_rank)
        if job.installer_clean and job.fetcher_clean and reported:
            log.info("job %s: done", job.job_id)
            self.job = None
            self.ask_pending()

    # ----- MQTT events -----------------------------------------------------
    def handle_connected(self) -> None:
        self.connected = True
        self.outbox.handle_connected()
        if self.job is None:
            self.ask_pending()
        elif not self.job.abandoned:
            # Also learns of a cancellation that happened while we were offline.
            self.describe(self.job)

    def handle_disconnected(self) -> None:
        self.connected = False
        self.outbox.handle_disconnected()

    def handle_message(self, topic: str, payload: bytes) -> None:
        kind, job_id, outcome = self.topics.classify(topic)
        if not kind:
            return
        try:
            body = jobs_api.load_payload(payload)
        except BadPayload as exc:
            log.warning("ignoring message on %s: %s", topic, exc)
            job = self.job
            if kind == "describe" and outcome == "accepted" and job is not None and job.job_id == job_id \
                    and job.phase is P.DESCRIBE:
                # We asked for this document and it cannot be read: the job can be addressed.
                self.finish(FAILED, "invalid_job_document", message=f"the job document cannot be read: {exc}")
            return
        try:
            if kind == "get":
                self.on_pending(outcome, body)
            elif kind in ("notify", "notify-next"):
                self.on_notify(kind, body)
            elif kind == "describe":
                self.on_describe(job_id, outcome, body)
            elif kind == "update":
                self.outbox.handle_reply(job_id, outcome, body)
        except BadPayload as exc:
            log.warning("ignoring message on %s: %s", topic, exc)
        except (KeyError, TypeError, ValueError, AttributeError):
            # A payload shape our checks did not foresee: a bug to fix, but peer input
            # must never take the process down. Logged with the traceback, then dropped.
            log.exception("ignoring message on %s: unexpected shape (please report this)", topic)

    def on_pending(self, outcome: str, body: dict) -> None:
        if body.get("clientToken") != self.pending_token:
            return  # not the answer to our latest question
        self.pending_asked_at = None
        self.pending_poll_at = self.clock() + PENDING_POLL
        if outcome == "rejected":
            log.error("GetPendingJobExecutions rejected: %s", jobs_api.parse_rejection(body).code)
            return
        if self.job is not None or self.outbox.busy():
            return
        in_progress, queued = jobs_api.pending_jobs(body)
        for job_id, execution in in_progress + queued:
            if not self.may_take(job_id, execution):
                continue
            self.job = Job(job_id=job_id, execution=execution or 0)
            log.info("job %s: picked (in progress %s, queued %s); -> describe", job_id,
                     [j for j, _ in in_progress], [j for j, _ in queued])
            self.job.entered_at = self.job.last_heard = self.clock()
            self._start_describe()
            return
        log.debug("no pending job for this device")

    def on_notify(self, kind: str, body: dict) -> None:
        job = self.job
        if job is None:
            if self.outbox.busy():
                return
            # notify-next carries the head of the queue with its document (IN_PROGRESS
            # first, then the oldest QUEUED: what GetPending would pick), so the job can
            # start at once instead of after a GetPending and a describe round trip.
            execution = jobs_api.parse_execution(body) if kind == "notify-next" else None
            if execution is not None and execution.state.status in jobs_api.PENDING \
                    and self.may_take(execution.job_id, execution.execution_number):
                self.job = Job(job_id=execution.job_id, execution=execution.execution_number)
                log.info("job %s: announced by notify-next; -> describe", execution.job_id)
                self.job.entered_at = self.job.last_heard = self.clock()
                self.begin(execution)
                return
            self.ask_pending()
            return
        if kind == "notify":
            in_progress, queued = jobs_api.pending_jobs(body)
            still_there = job.job_id in [j for j, _ in in_progress + queued]
        else:
            execution = jobs_api.parse_execution(body)
            still_there = execution is not None and execution.job_id == job.job_id
        if not still_there and not job.abandoned:
            # Possibly cancelled or removed; ask AWS rather than trust one notification.
            log.info("job %s: not listed by %s; checking", job.job_id, kind)
            self.describe(job)

    def on_describe(self, job_id: str, outcome: str, body: dict) -> None:
        job = self.job
        if job is None or job_id != job.job_id or job.abandoned:
            return
        if outcome == "rejected":
            rejection = jobs_api.parse_rejection(body)
            log.warning("job %s: describe rejected (%s %s)", job_id, rejection.code, rejection.message)
            if rejection.code in ("ResourceNotFound", "TerminalStateReached"):
                self.abandon(f"the job execution is gone ({rejection.code})")
            return
        execution = jobs_api.parse_execution(body)
        if execution is None or execution.job_id != job_id:
            # AWS answers a describe of this job with its execution (a gone one is rejected,
            # ResourceNotFound): anything else is garbage, never a reason to stop the job.
            log.warning("job %s: ignoring a describe answer without this job's execution", job_id)
            return
        if execution.state.status in jobs_api.TERMINAL:
            if job.phase is P.FINISH and job.final_rank is not None:
                return  # our own final status, seen before its reply
            self.abandon(f"the job execution is {execution.state.status}")
            return
        if job.phase is P.DESCRIBE:
            self.begin(execution)
        elif job.phase is P.FETCH and job.awaiting_url:
            self.refresh_url(execution)

    # ----- the run -------------------------------------------------------
    def begin(self, execution: jobs_api.Execution) -> None:
        job = self.job
        job.execution = execution.execution_number
        job.aws_state = execution.state.status_details.get("state", "")
        self.outbox.set_version(job.job_id, job.execution, execution.state.version_number)
        try:
            job.release, job.url = parse_document(execution.document, self.cfg.verification.require_sha256)
        except BadDocument as exc:
            return self.finish(FAILED, "invalid_job_document", message=str(exc))
        self.enter(P.SYNC, f"document of version {job.release.version}")

    def refresh_url(self, execution: jobs_api.Execution) -> None:
        job = self.job
        try:
            release, url = parse_document(execution.document, self.cfg.verification.require_sha256)
        except BadDocument as exc:
            return self.finish(FAILED, "invalid_job_document", message=str(exc))
        if not release.same_content(job.release):
            return self.finish(FAILED, "invalid_job_document", message="the job document changed during the download")
        job.url = url
        job.awaiting_url = False
        self.fetcher.fetch(job.job_id, job.execution, url, job.release)
        self._wait(FETCH_QUERY, self.cfg.service.download_timeout + 300)

    # ----- installer -------------------------------------------------------
    def handle_installer(self, message: Message) -> None:
        job = self.job
        if isinstance(message, ip.Pong):
            return self.on_installer_pong(message)
        if job is None:
            return
        if isinstance(message, Refused):
            return self.on_installer_refused(message)
        if not isinstance(message, ip.JobState):
            return
        if job.phase is P.SYNC and job.other_open == (message.job_id, message.execution):
            if message.phase in (ip.DISCARDED, ip.NONE):
                log.info("job %s: the installer let go of job %s", job.job_id, message.job_id)
                job.other_open = None
                self.installer.query_job(job.job_id, job.execution)
            return
        if (message.job_id, message.execution) != (job.job_id, job.execution):
            return
        job.last_heard = self.clock()
        if job.phase is P.FINISH:
            if message.phase in (ip.DISCARDED, ip.NONE):
                job.installer_clean = True
                self._maybe_done()
            return
        if message.phase == ip.FAILED:
            hook = message.hook.hook if message.hook else None
            state = message.failure or (FAILED_STATE[hook] if hook else "verification_failed")
            return self.finish(FAILED, state, message=message.message)
        handler = {P.SYNC: self._installer_in_sync, P.OPEN: self._installer_in_open,
                   P.STAGE: self._installer_in_stage}.get(job.phase)
        if handler is not None:
            return handler(message)
        if job.phase in HOOK_OF:
            return self._installer_in_hook(message)

    def on_installer_pong(self, pong: ip.Pong) -> None:
        job = self.job
        if job is None or job.phase is not P.SYNC or job.synced:
            return
        job.synced = True
        job.last_heard = self.clock()
        if pong.job_id is not None and (pong.job_id, pong.execution) != (job.job_id, job.execution):
            log.info("job %s: the installer still holds job %s (%s); discarding it", job.job_id, pong.job_id,
                     pong.phase)
            job.other_open = (pong.job_id, pong.execution)
            self.installer.discard(pong.job_id, pong.execution)
        else:
            self.installer.query_job(job.job_id, job.execution)

    def _installer_in_sync(self, state: ip.JobState) -> None:
        job = self.job
        if state.phase == ip.NONE:
            if job.phase is not P.SYNC and P.OPEN not in TRANSITIONS[job.phase]:
                return self.enter(P.SYNC, f"the installer has no record of this job during {job.phase.value}")
            return self.enter(P.OPEN, "the installer has no record of this job")
        if state.phase == ip.DISCARDED:
            return self.finish(FAILED, "installation_hook_failed",
                               message="the installer had already finished with this job execution and the "
                                       "broker's record of its outcome is lost; create the job again")
        target = RESUME.get(state.phase)
        if target is P.VERSION and job.aws_state == "reboot_start":
            target = P.CONFIRM
        if target is P.VERSION and job.release.force:
            target = P.FETCH
        if job.phase is not P.SYNC and target not in TRANSITIONS[job.phase]:
            # An answer that does not fit this step (a stale one, or the installer's record
            # changed under us, e.g. deleted): agree on the job again from the start.
            return self.enter(P.SYNC, f"the installer reports {state.phase} during {job.phase.value}")
        if target is P.CONFIRM:
            job.restart_done_at = self.clock()
        self.enter(target, f"the installer reports {state.phase}")

    def _installer_in_open(self, state: ip.JobState) -> None:
        job = self.job
        if state.phase == ip.NONE:
            # The answer to a query sent before the open (a repeated one: after a retry,
            # or when the installer's connection was made again); the open's answer follows.
            return
        if state.phase != ip.OPENED:
            return self._installer_in_sync(state)
        if job.aws_state == "reboot_start":
            log.warning("job %s: AWS says reboot_start but the installer has no record of the installation",
                        job.job_id)
            return self.enter(P.CONFIRM, "restarted, per AWS")
        if job.release.force:
            return self.enter(P.FETCH, "release verified; force skips the version and download hooks")
        self.enter(P.VERSION, "release verified")

    def _installer_in_stage(self, state: ip.JobState) -> None:
        if state.phase == ip.STAGING:
            return
        if state.phase == ip.STAGED:
            job = self.job
            # The fetcher's copy is no longer needed (with one file system it was moved away).
            self.fetcher.cancel_fetch(job.job_id, job.execution)
            return self.enter(P.INSTALL, state.message or "staged and verified")
        if state.phase == ip.OPENED:  # the installer restarted during staging
            return self._start_stage()
        self._installer_in_sync(state)

    def _installer_in_hook(self, state: ip.JobState) -> None:
        job = self.job
        hook = HOOK_OF[job.phase]
        # The installer died while the hook ran (same boot): it runs again. A reboot or an
        # orderly stop of the installer during the restart hook counts as the restart.
        interrupted = {P.INSTALL: ip.INSTALL_INTERRUPTED, P.RESTART: ip.RESTART_INTERRUPTED}.get(job.phase)
        if state.phase == interrupted:
            log.warning("job %s: the %s hook was interrupted (the installer died); running it again",
                        job.job_id, HOOK_OF[job.phase])
            return self._run_hook()
        if job.phase is P.RESTART and state.phase == ip.RESTARTED:
            return self.hook_done("restart", "")
        run = state.hook
        if run is None or run.hook != hook or run.round != job.hook_round:
            return  # not (yet) our run
        if run.state == ip.RUNNING:
            if hook == "install" and run.output:
                self.progress("installation_progress", run.output)
            job.retry_at = self.clock() + HOOK_QUERY
            return
        if run.state == ip.DONE:
            return self.hook_done(hook, run.output)
        if run.state == ip.GAVE_UP:
            text = f"{hook} hook asked to retry (exit 3) too often: gave up after {run.attempt} retries"
        else:
            text = f"{hook} hook failed: {run.message or f'exit code {run.exit_code}'}"
            if run.output:
                text += f"; last output: {run.output}"
        self.finish(FAILED, FAILED_STATE[hook], message=text)

    def on_installer_refused(self, refused: Refused) -> None:
        job = self.job
        if refused.code == BUSY:
            log.info("job %s: the installer is busy (%s); asking again", job.job_id, refused.reason)
            job.retry_at = self.clock() + BUSY_RETRY
            return
        log.error("job %s: the installer refused a request in phase %s: %s (%s)", job.job_id, job.phase.value,
                  refused.reason, refused.code)
        if job.phase is P.FINISH or refused.code == MALFORMED:
            return  # counted as garbage by the phase deadline; cleanup retries anyway
        if job.phase in (P.OPEN, P.SYNC):
            return self.finish(FAILED, "verification_failed", message=f"the installer refused the job: {refused.reason}")
        # Out of phase: the installer's record moved on (e.g. it restarted). Ask where the job is.
        job.resyncs += 1
        if job.resyncs > MAX_RESYNC:
            state = FAILED_STATE.get(HOOK_OF.get(job.phase, ""), "verification_failed")
            return self.finish(FAILED, state, message=f"the installer refused: {refused.reason}")
        self.enter(P.SYNC, f"the installer refused: {refused.reason}")

    def hook_done(self, hook: str, output: str) -> None:
        job = self.job
        version = job.release.version
        if job.phase is P.VERSION:
            if output == version:
                return self.finish(SUCCEEDED, "version_already_installed", message=f"version {version} is installed")
            return self.enter(P.DOWNLOAD_HOOK, f"installed version {output!r}, job installs {version!r}")
        if job.phase is P.DOWNLOAD_HOOK:
            return self.enter(P.FETCH, "download allowed")
        if job.phase is P.INSTALL:
            return self.enter(P.REBOOT_REPORT, "install hook exited 0")
        if job.phase is P.RESTART:
            if self.cfg.hooks.version is None and self.cfg.hooks.ready is None:
                return self.finish(SUCCEEDED, "complete_soft_restart")
            job.restart_done_at = self.clock()
            return self.enter(P.CONFIRM, "restart hook exited 0")
        if job.phase is P.CONFIRM:
            if output == version:
                return self.enter(P.READY, f"version {version} confirmed")
            job.confirm_checks.append(output)
            window = self.cfg.hooks.version_confirm_window
            if self.clock() - job.restart_done_at < window:
                log.info("job %s: version is %r, expected %r; asking again (a reboot may be on its way)",
                         job.job_id, output, version)
                job.hook_round += 1
                job.retry_at = self.clock() + confirm_interval(self.cfg)
                job.deadline = job.restart_done_at + window + self._hook_limit()
                job.last_heard = self.clock()
                return
            return self.finish(FAILED, "version_mismatch",
                               message=f"expected version {version!r}, the version hook says {output!r}")
        if job.phase is P.READY:
            return self.finish(SUCCEEDED, "complete_ready")

    # ----- fetcher ---------------------------------------------------------
    def handle_fetcher(self, message: Message) -> None:
        job = self.job
        if job is None:
            return
        if isinstance(message, fp.FetcherPong):
            if job.phase is P.FETCH and message.job_id is not None and message.job_id != job.job_id:
                log.info("job %s: the fetcher still downloads job %s; cancelling it", job.job_id, message.job_id)
                self.fetcher.cancel_fetch(message.job_id, message.execution or 0)
            return
        if isinstance(message, Refused):
            if message.code == BUSY and job.phase is P.FETCH:
                job.retry_at = self.clock() + BUSY_RETRY
                self.fetcher.ping()  # which download holds it?
            elif message.code != BUSY:
                log.error("job %s: the fetcher refused: %s (%s)", job.job_id, message.reason, message.code)
                if job.phase is P.FETCH and message.code != MALFORMED:
                    self.finish(FAILED, "download_failed", message=f"the fetcher refused the download: {message.reason}")
            return
        if not isinstance(message, fp.FetchStatus) or (message.job_id, message.execution) != (job.job_id,
                                                                                                  job.execution):
            return
        if job.phase is P.FINISH:
            if message.state in (fp.CANCELLED, fp.UNKNOWN):
                job.fetcher_clean = True
                self._maybe_done()
            return
        if job.phase is not P.FETCH:
            return
        job.last_heard = self.clock()
        job.retry_at = self.clock() + FETCH_QUERY
        if message.state == fp.RUNNING:
            if message.bytes_total:
                self.progress("download_progress", str(int(100 * message.bytes_done / message.bytes_total)))
            return
        if message.state == fp.DONE:
            return self.enter(P.STAGE, message.message or "downloaded and verified")
        if message.state in (fp.UNKNOWN, fp.CANCELLED):
            # The fetcher restarted (or lost the download): ask again; it resumes.
            self.fetcher.fetch(job.job_id, job.execution, job.url, job.release)
            return
        if message.failure == "url_expired" and job.url_refreshes < MAX_URL_REFRESH:
            job.url_refreshes += 1
            job.awaiting_url = True  # the describe answer carries a fresh URL (see on_describe)
            job.retry_at = self.clock() + DESCRIBE_RETRY
            log.info("job %s: download URL refused (%s); asking AWS for a fresh one", job.job_id, message.message)
            self.describe(job)
            return
        state = message.failure if message.failure in fp.FAILURES and message.failure != "url_expired" \
            else "download_failed"
        self.finish(FAILED, state, message=message.message or "download failed")

    def progress(self, state: str, value: str) -> None:
        job = self.job
        now = self.clock()
        if now - job.progress_at < PROGRESS_EVERY or value == job.progress_value:
            return
        job.progress_at = now
        job.progress_value = value
        if state == "download_progress":
            self.report(IN_PROGRESS, state, milestone=False, progress=value)
        else:
            self.report(IN_PROGRESS, state, milestone=False, message=value)

    # ----- outbox ----------------------------------------------------------
    def _outbox_gone(self, job_id: str, execution: int, why: str) -> None:
        job = self.job
        if job is not None and job.job_id == job_id:  # never another job than the one it is about
            self.abandon(why)
        self._idle_check()

    def _idle_check(self) -> None:
        """Idle and no final status on its way any more (e.g. one left from before a
        restart was settled): look for the next job now, not at the next poll."""
        if self.job is None and self.connected and not self.outbox.busy():
            self.ask_pending()

    def _outbox_accepted(self, job_id: str, execution: int, update: Update) -> None:
        job = self.job
        if job is None or job.job_id != job_id:
            if update.status in FINAL:
                self._idle_check()
            return
        if job.phase is P.REBOOT_REPORT:
            self._check_reboot_accepted()
        if update.status in FINAL:
            log.info("job %s: finished %s (%s)", job_id, update.status, update.state)
            self._maybe_done()

    def _check_reboot_accepted(self) -> None:
        job = self.job
        if job.reboot_rank is not None and self.outbox.accepted(job.job_id, job.reboot_rank):
            self.enter(P.RESTART, "AWS holds reboot_start")

    # ----- time ------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [t for t in (self.outbox.next_deadline(), self._pending_deadline()) if t is not None]
        job = self.job
        if job is not None:
            times += [t for t in (job.retry_at, job.deadline) if t is not None]
        return min(times) if times else None

    def _pending_deadline(self) -> float | None:
        if not self.connected or self.job is not None:
            return None
        if self.pending_asked_at is not None:
            return self.pending_asked_at + PENDING_RETRY
        return self.pending_poll_at

    def on_time(self) -> None:
        now = self.clock()
        self.outbox.resend_due()
        deadline = self._pending_deadline()
        if deadline is not None and now >= deadline and not self.outbox.busy():
            self.ask_pending()
        job = self.job
        if job is None:
            return
        garbage = self.installer.client.garbage + self.fetcher.client.garbage - job.garbage_at_entry
        if job.phase is not P.FINISH and garbage > GARBAGE_LIMIT:
            return self.finish(FAILED, self._failure_state(), message=f"a helper process answered with {garbage} "
                                                                      "unusable messages")
        if job.deadline is not None and now >= job.deadline:
            return self.on_deadline()
        if job.phase not in (P.DESCRIBE, P.REBOOT_REPORT, P.FINISH) and now - job.last_heard > PEER_LIMIT:
            return self.finish(FAILED, self._failure_state(),
                               message=f"the {self._peer_name()} process did not answer for {int(PEER_LIMIT)} s")
        if job.retry_at is not None and now >= job.retry_at:
            self.on_retry()

    def handle_peer_connected(self, peer: str) -> None:
        """The connection to a peer was made (again: it restarted). If the job
        waits on that peer, its next (idempotent) request goes out now rather
        than at the next safety query: a restarted peer cannot speak first."""
        job = self.job
        if job is None or job.retry_at is None or job.phase in (P.DESCRIBE, P.REBOOT_REPORT, P.FINISH):
            return
        if (peer == "fetcher") != (job.phase is P.FETCH and not job.awaiting_url):
            return
        log.info("job %s: the %s process connected; asking it now", job.job_id, peer)
        job.retry_at = min(job.retry_at, self.clock())

    def _peer_name(self) -> str:
        return "download" if self.job.phase is P.FETCH else "installer"

    def _failure_state(self) -> str:
        job = self.job
        if job.phase is P.FETCH:
            return "download_failed"
        hook = HOOK_OF.get(job.phase)
        return FAILED_STATE[hook] if hook else "verification_failed"

    def on_deadline(self) -> None:
        job = self.job
        if job.phase is P.DESCRIBE:
            log.error("job %s: AWS did not describe it for %d s; leaving it for later", job.job_id,
                      int(DESCRIBE_LIMIT))
            self.job = None
            self.pending_poll_at = self.clock() + PENDING_POLL
            return
        what = {P.FETCH: "the download", P.STAGE: "staging"}.get(job.phase, f"the {job.phase.value} step")
        self.finish(FAILED, self._failure_state(),
                    message=f"{what} did not finish within {int(job.deadline - job.entered_at)} s")

    def on_retry(self) -> None:
        """No usable answer yet: send the phase's (idempotent) request again."""
        job = self.job
        job.retry_at = None
        phase = job.phase
        if phase is P.DESCRIBE:
            self.describe(job)
            job.retry_at = self.clock() + DESCRIBE_RETRY
        elif phase is P.SYNC:
            if job.other_open is not None:
                self.installer.discard(*job.other_open)
            elif job.synced:
                self.installer.query_job(job.job_id, job.execution)
            else:
                self.installer.ping()
            job.retry_at = self.clock() + PEER_RETRY
        elif phase is P.OPEN:
            self._start_open()
            job.deadline = job.entered_at + PEER_LIMIT
        elif phase is P.FETCH:
            if job.awaiting_url:
                self.describe(job)
                job.retry_at = self.clock() + DESCRIBE_RETRY
            else:
                self.fetcher.query_fetch(job.job_id, job.execution)
                job.retry_at = self.clock() + FETCH_QUERY
        elif phase is P.STAGE:
            self.installer.stage(job.job_id, job.execution)
            job.retry_at = self.clock() + PEER_RETRY
        elif phase in HOOK_OF:
            self.installer.run_hook(job.job_id, job.execution, HOOK_OF[phase], job.hook_round)
            job.retry_at = self.clock() + PEER_RETRY
        elif phase is P.FINISH:
            self._cleanup()


def confirm_interval(cfg: Config) -> float:
    """Pause between version checks after a restart."""
    return max(1.0, min(10.0, cfg.hooks.version_confirm_window / 10))
