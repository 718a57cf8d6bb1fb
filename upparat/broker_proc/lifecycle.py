"""One job lifecycle, driven by MQTT events and a periodic tick.

Single-threaded: the MQTT network thread only enqueues; ``Agent.handle_*``
and ``Agent.tick`` run in the main loop. The agent never runs commands or
touches files: it asks the fetcher (download + verify) and the installer
(hooks) over their protocols and reports every step to AWS IoT Jobs.

Phases of a run (DESIGN.md 4.5):
  describe -> version -> download_hook -> fetch -> stage -> install
  -> restart -> confirm_version -> ready -> finishing
A job found IN_PROGRESS with state reboot_start starts at confirm_version.
Every phase is bounded: hooks by the installer's [hooks] timeout and
retries, downloads by the fetcher's attempts, IPC by PEER_SILENCE_LIMIT,
status updates by resending until AWS accepts or rejects them.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

from upparat.broker_proc import jobs_api
from upparat.broker_proc.jobs_api import BadDocument, BadPayload, JobDocument, Topics
from upparat.config import Config
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import IpcTimeout, ProtocolError, Refused

log = logging.getLogger("upparat.broker")

RESEND_AFTER = 15.0  # s without update/accepted before an update is sent again
PENDING_RETRY = 10.0  # s without get/accepted before asking again
PENDING_POLL = 300.0  # s between safety polls for pending jobs while idle
PROGRESS_EVERY = 10.0  # s between progress reports
PEER_SILENCE_LIMIT = 300.0  # s a peer may not answer before the job fails
REBOOT_REPORT_WAIT = 120.0  # s to wait for reboot_start to be accepted before restarting anyway
BUSY_RETRY = 2.0  # s between attempts while the installer runs another hook
MAX_URL_REFRESH = 3
MAX_RELAUNCH = 3
STAGE_TIMEOUT = 900.0

IN_PROGRESS, SUCCEEDED, FAILED = "IN_PROGRESS", "SUCCEEDED", "FAILED"
FAILED_STATE = {
    "version": "version_hook_failed",
    "download": "download_hook_failed",
    "install": "installation_hook_failed",
    "restart": "restart_hook_failed",
    "ready": "ready_hook_failed",
}


@dataclass
class Outgoing:
    job_id: str
    status: str
    state: str
    topic: str
    payload: bytes
    sent_at: float


@dataclass
class Run:
    """Everything about the job being worked on; replaced, never reset."""

    job_id: str
    phase: str = "describe"
    doc: JobDocument | None = None
    after_reboot: bool = False
    hook_seq: int | None = None
    hook_relaunches: int = 0
    fetch_seq: int | None = None
    url_refreshes: int = 0
    restart_done_at: float | None = None
    reboot_token: str | None = None
    reboot_reported_at: float | None = None
    last_progress_at: float = 0.0
    last_progress: str = ""
    peer_silent_since: float | None = None
    describe_sent_at: float = 0.0
    busy_since: float | None = None
    busy_tried_at: float = 0.0
    checks: list[str] = field(default_factory=list)


class Agent:
    def __init__(self, config: Config, publish, fetcher, installer, clock=time.monotonic):
        self.cfg = config
        self.topics = Topics(config.broker.thing_name)
        self._publish = publish
        self.fetcher = fetcher
        self.installer = installer
        self.clock = clock
        self.connected = False
        self.run: Run | None = None
        self.outbox: dict[str, Outgoing] = {}
        self.pending_asked_at: float | None = None
        self.last_pending_at = 0.0
        # Seqs must not repeat across restarts of this process (the peers
        # answer a repeated (job, seq) from memory).
        self._seq = itertools.count(int(time.time() * 1000) % 2**40)

    # ----- helpers -------------------------------------------------------
    def next_seq(self) -> int:
        return next(self._seq)

    def publish(self, topic: str, payload: bytes) -> None:
        if self.connected:
            self._publish(topic, payload)

    def ask_pending(self) -> None:
        self.pending_asked_at = self.clock()
        self.publish(self.topics.get_pending(), b'{"clientToken":"pending"}')

    def describe(self, job_id: str) -> None:
        if self.run is not None:
            self.run.describe_sent_at = self.clock()
        self.publish(self.topics.describe(job_id), b'{"includeJobDocument":true}')

    def report(self, status: str, state: str, **details) -> str:
        run = self.run
        token = uuid.uuid4().hex[:32]
        payload = jobs_api.update_payload(status, state, token, **details)
        out = Outgoing(run.job_id, status, state, self.topics.update(run.job_id), payload, self.clock())
        self.outbox[token] = out
        log.info("job %s: %s %s %s", run.job_id, status, state, details.get("message") or "")
        self.publish(out.topic, out.payload)
        return token

    def call(self, peer, message):
        """One IPC request; None when the peer is silent (it may be restarting)."""
        run = self.run
        try:
            reply = peer.request(message)
        except IpcTimeout as exc:
            log.warning("%s", exc)
            if run is not None and run.peer_silent_since is None:
                run.peer_silent_since = self.clock()
            return None
        except ProtocolError as exc:
            log.error("unusable reply to %s: %s", message.TYPE, exc)
            return None
        if run is not None:
            run.peer_silent_since = None
        return reply

    def prefix_ok(self, job_id: str) -> bool:
        return job_id.startswith(self.cfg.service.job_prefix)

    # ----- MQTT events ---------------------------------------------------
    def handle_connected(self) -> None:
        self.connected = True
        for out in self.outbox.values():
            out.sent_at = self.clock()
            self.publish(out.topic, out.payload)
        if self.run is None:
            self.ask_pending()
        elif self.run.phase == "describe":
            self.describe(self.run.job_id)

    def handle_disconnected(self) -> None:
        self.connected = False

    def handle_message(self, topic: str, payload: bytes) -> None:
        kind, job_id, outcome = self.topics.classify(topic)
        if not kind:
            return
        try:
            body = jobs_api.load_payload(payload)
            if kind == "get" and outcome == "accepted":
                self.on_pending(body)
            elif kind == "get":
                log.error("GetPendingJobExecutions rejected: %s", body.get("code"))
                self.pending_asked_at = None
            elif kind in ("notify", "notify-next"):
                self.on_notify(kind, body)
            elif kind == "describe":
                self.on_describe(job_id, outcome, body)
            elif kind == "update":
                self.on_update_reply(job_id, outcome, body)
        except BadPayload as exc:
            log.warning("ignoring message on %s: %s", topic, exc)

    def on_pending(self, body: dict) -> None:
        self.pending_asked_at = None
        self.last_pending_at = self.clock()
        if self.run is not None or self.final_update_open():
            return
        in_progress, queued = jobs_api.pending_job_ids(body)
        candidates = [j for j in in_progress + queued if self.prefix_ok(j)]
        if not candidates:
            log.debug("no pending job for this device")
            return
        self.run = Run(job_id=candidates[0])
        log.info("job %s: picked (in progress %s, queued %s)", candidates[0], in_progress, queued)
        self.describe(candidates[0])

    def on_notify(self, kind: str, body: dict) -> None:
        run = self.run
        if run is None:
            if not self.final_update_open():
                self.ask_pending()
            return
        if kind == "notify":
            in_progress, queued = jobs_api.pending_job_ids(body)
            still_there = run.job_id in in_progress + queued
        else:
            execution = jobs_api.parse_execution(body)
            still_there = execution is not None and execution.job_id == run.job_id
        if not still_there and run.phase not in ("describe", "finishing"):
            # Possibly cancelled or removed; ask AWS rather than trust one notification.
            log.info("job %s: no longer listed by %s; checking", run.job_id, kind)
            self.describe(run.job_id)

    def on_describe(self, job_id: str, outcome: str, body: dict) -> None:
        run = self.run
        if run is None or job_id != run.job_id:
            return
        if outcome == "rejected":
            log.warning("job %s: describe rejected (%s)", job_id, body.get("code"))
            if body.get("code") in ("ResourceNotFound", "TerminalStateReached"):
                self.abandon("the job execution is gone")
            return
        execution = jobs_api.parse_execution(body)
        if execution is None or execution.job_id != job_id:
            self.abandon("the job execution is gone")
            return
        if execution.status in jobs_api.TERMINAL:
            self.abandon(f"the job execution is {execution.status}")
            return
        if run.phase == "describe":
            self.begin(execution)
        elif run.phase == "fetch" and run.fetch_seq is None:
            self.refresh_url(execution)

    def on_update_reply(self, job_id: str, outcome: str, body: dict) -> None:
        token = body.get("clientToken")
        out = self.outbox.pop(token, None) if isinstance(token, str) else None
        if out is None:
            return
        terminal = out.status in (SUCCEEDED, FAILED)
        if outcome == "rejected":
            code = body.get("code")
            state = body.get("executionState") if isinstance(body.get("executionState"), dict) else {}
            if terminal and state.get("status") == out.status:
                log.info("job %s: final status was already stored", job_id)
            else:
                log.error("job %s: update %s/%s rejected: %s %s", job_id, out.status, out.state, code,
                          body.get("message"))
                if code in ("InvalidStateTransition", "ResourceNotFound", "TerminalStateReached"):
                    self.abandon(f"AWS refused the update ({code})")
                    return
        if self.run is not None and self.run.job_id == job_id:
            if terminal:
                log.info("job %s: finished %s (%s)", job_id, out.status, out.state)
                self.run = None
                self.ask_pending()

    def final_update_open(self) -> bool:
        return any(o.status in (SUCCEEDED, FAILED) for o in self.outbox.values())

    # ----- the run -------------------------------------------------------
    def begin(self, execution: jobs_api.Execution) -> None:
        run = self.run
        try:
            run.doc = jobs_api.parse_document(
                execution.document,
                self.cfg.verification.require_sha256,
                self.cfg.verification.require_signature,
            )
        except BadDocument as exc:
            self.finish(FAILED, "invalid_job_document", message=str(exc))
            return
        state = execution.status_details.get("state")
        if execution.status == IN_PROGRESS and state == "reboot_start":
            log.info("job %s: resuming after restart: confirming the installation", run.job_id)
            run.after_reboot = True
            self.enter("confirm_version")
        elif run.doc.force:
            self.enter("fetch")
        else:
            self.enter("version")

    def enter(self, phase: str) -> None:
        run = self.run
        run.phase = phase
        run.hook_seq = None
        run.hook_relaunches = 0
        run.busy_since = None
        hooks = self.cfg.hooks
        if phase == "version" and hooks.version is None:
            return self.enter("download_hook")
        if phase == "download_hook" and hooks.download is None:
            return self.enter("fetch")
        if phase == "fetch":
            self.report(IN_PROGRESS, "download_start", version=run.doc.version)
            run.last_progress_at = self.clock()  # first progress report one interval later
            return self.start_fetch()
        if phase == "stage":
            return self.stage()
        if phase == "install":
            if hooks.install is None:
                return self.finish(SUCCEEDED, "no_installation_hook_provided")
            self.report(IN_PROGRESS, "installation_start", version=run.doc.version)
            run.last_progress_at = self.clock()
        if phase == "restart":
            if hooks.restart is None:
                return self.finish(SUCCEEDED, "no_restart_hook_provided")
            # Only restart once AWS holds reboot_start: it is how we know, after
            # a reboot, that the installation ran (pitfalls: rustot PR #93).
            run.reboot_token = self.report(IN_PROGRESS, "reboot_start", version=run.doc.version)
            run.reboot_reported_at = self.clock()
        if phase == "confirm_version" and hooks.version is None:
            if hooks.ready is None:
                return self.finish(SUCCEEDED, "complete_no_version_check")
            return self.enter("ready")
        if phase == "ready" and hooks.ready is None:
            return self.finish(SUCCEEDED, "complete_no_ready_check")
        self.tick()

    def tick(self) -> None:
        now = self.clock()
        for out in self.outbox.values():
            if now - out.sent_at > RESEND_AFTER:
                out.sent_at = now
                self.publish(out.topic, out.payload)
        run = self.run
        if run is None:
            if self.connected and not self.final_update_open():
                asked = self.pending_asked_at
                if (asked is not None and now - asked > PENDING_RETRY) or (
                    asked is None and now - self.last_pending_at > PENDING_POLL
                ):
                    self.ask_pending()
            return
        if run.peer_silent_since is not None and now - run.peer_silent_since > PEER_SILENCE_LIMIT:
            run.peer_silent_since = None
            state = "download_failed" if run.phase == "fetch" else FAILED_STATE.get(self.hook_of(run.phase), "failed")
            return self.finish(FAILED, state, message=f"a helper process did not answer for {int(PEER_SILENCE_LIMIT)} s")
        if run.phase == "describe":
            if now - run.describe_sent_at > PENDING_RETRY:
                self.describe(run.job_id)
        elif run.phase == "fetch":
            self.poll_fetch()
        elif run.phase == "restart" and run.hook_seq is None:
            accepted = run.reboot_token not in self.outbox
            if accepted or now - run.reboot_reported_at > REBOOT_REPORT_WAIT:
                if not accepted:
                    log.warning("job %s: reboot_start not yet accepted by AWS; restarting anyway", run.job_id)
                self.poll_hook("restart")
        elif run.phase == "restart":
            self.poll_hook("restart")
        elif run.phase in ("version", "download_hook", "install", "confirm_version", "ready"):
            self.poll_hook(self.hook_of(run.phase))

    @staticmethod
    def hook_of(phase: str) -> str:
        return {"download_hook": "download", "confirm_version": "version"}.get(phase, phase)

    # ----- hooks (via the installer) -------------------------------------
    def poll_hook(self, hook: str) -> None:
        run = self.run
        if run.phase == "confirm_version" and run.restart_done_at is not None and run.hook_seq is None:
            # Re-asking the version after a soft restart: wait between tries.
            if self.clock() - run.restart_done_at < run_interval(self.cfg) * len(run.checks):
                return
        if run.hook_seq is None and run.busy_since is not None and self.clock() - run.busy_tried_at < BUSY_RETRY:
            return
        if run.hook_seq is None:
            run.busy_tried_at = self.clock()
            seq = self.next_seq()
            reply = self.call(self.installer, ip.RunHook(
                job_id=run.job_id, seq=seq, hook=hook, meta=run.doc.meta, force=run.doc.force))
            if reply is None:
                return
            run.hook_seq = seq
        else:
            reply = self.call(self.installer, ip.QueryHook(job_id=run.job_id, seq=run.hook_seq, hook=hook))
            if reply is None:
                return
        if isinstance(reply, Refused):
            if reply.reason.startswith("busy") and self.wait_while_busy(run):
                run.hook_seq = None  # not started: ask again on a later tick
                return  # e.g. an install started before this process restarted is still running
            return self.finish(FAILED, FAILED_STATE[hook], message=f"the installer refused the {hook} hook: {reply.reason}")
        if not isinstance(reply, ip.HookStatus):
            log.error("unexpected reply %s to a hook request", reply.TYPE)
            return
        if reply.state == ip.RUNNING:
            if hook == "install" and reply.output and reply.output != run.last_progress:
                self.progress("installation_progress", reply.output)
            return
        if reply.state == ip.UNKNOWN:
            # The installer restarted and lost the run: run it again, a few times.
            run.hook_relaunches += 1
            run.hook_seq = None
            if run.hook_relaunches > MAX_RELAUNCH:
                self.finish(FAILED, FAILED_STATE[hook], message="the installer lost the hook run repeatedly")
            return
        if reply.state == ip.DONE:
            return self.hook_done(hook, reply.output)
        if reply.state == ip.GAVE_UP:
            message = f"{hook} hook asked to retry (exit 3) too often: gave up after {reply.attempt} retries"
        else:
            message = f"{hook} hook failed: {reply.message or f'exit code {reply.exit_code}'}"
            if reply.output:
                message += f"; last output: {reply.output}"
        self.finish(FAILED, FAILED_STATE[hook], message=message)

    def wait_while_busy(self, run: Run) -> bool:
        """True while it is reasonable to wait for the installer's current hook."""
        now = self.clock()
        if run.busy_since is None:
            run.busy_since = now
            log.info("job %s: the installer is busy with another hook run; waiting", run.job_id)
        # A hook run is bounded by the installer's timeout and retries.
        hooks = self.cfg.hooks
        limit = hooks.timeout * (hooks.max_retries + 1) + hooks.retry_interval * hooks.max_retries + 60
        return now - run.busy_since < limit

    def hook_done(self, hook: str, output: str) -> None:
        run = self.run
        version = run.doc.version
        if run.phase == "version":
            if output == version:
                return self.finish(SUCCEEDED, "version_already_installed", message=f"version {version} is installed")
            log.info("job %s: installed version %r, installing %r", run.job_id, output, version)
            return self.enter("download_hook")
        if run.phase == "download_hook":
            return self.enter("fetch")
        if run.phase == "install":
            return self.enter("restart")
        if run.phase == "restart":
            if self.cfg.hooks.version is None and self.cfg.hooks.ready is None:
                return self.finish(SUCCEEDED, "complete_soft_restart")
            run.restart_done_at = self.clock()
            return self.enter("confirm_version")
        if run.phase == "confirm_version":
            if output == version:
                return self.enter("ready")
            run.checks.append(output)
            window = self.cfg.hooks.version_confirm_window
            if run.restart_done_at is not None and self.clock() - run.restart_done_at < window:
                log.info("job %s: version is %r, expected %r; asking again (a reboot may be on its way)",
                         run.job_id, output, version)
                run.hook_seq = None
                return
            return self.finish(FAILED, "version_mismatch", message=f"expected version {version!r}, the version hook says {output!r}")
        if run.phase == "ready":
            return self.finish(SUCCEEDED, "complete_ready")

    # ----- download (via the fetcher) and staging (via the installer) ----
    def start_fetch(self) -> None:
        run, doc = self.run, self.run.doc
        seq = self.next_seq()
        reply = self.call(self.fetcher, fp.Fetch(
            job_id=run.job_id, seq=seq, url=doc.file, version=doc.version,
            sha256=doc.sha256, size=doc.size, signature=doc.signature))
        if reply is None:
            return  # poll_fetch retries
        if isinstance(reply, Refused):
            return self.finish(FAILED, "download_failed", message=f"the fetcher refused the download: {reply.reason}")
        run.fetch_seq = seq
        self.fetch_status(reply)

    def poll_fetch(self) -> None:
        run = self.run
        if run.fetch_seq is None:
            if run.url_refreshes == 0 or self.clock() - run.describe_sent_at > PENDING_RETRY:
                if run.url_refreshes:
                    self.describe(run.job_id)
                else:
                    self.start_fetch()
            return
        reply = self.call(self.fetcher, fp.QueryFetch(job_id=run.job_id, seq=run.fetch_seq))
        if reply is not None:
            self.fetch_status(reply)

    def fetch_status(self, reply) -> None:
        run = self.run
        if not isinstance(reply, fp.FetchStatus):
            log.error("unexpected reply %s to a fetch request", reply.TYPE)
            return
        if reply.state == fp.RUNNING:
            if reply.bytes_total:
                percent = str(int(100 * reply.bytes_done / reply.bytes_total))
                if percent != run.last_progress:
                    self.progress("download_progress", percent)
            return
        if reply.state == fp.DONE:
            return self.enter("stage")
        if reply.state == fp.UNKNOWN:
            run.fetch_seq = None  # the fetcher restarted: ask again (it resumes)
            return
        if reply.failure == "url_expired" and run.url_refreshes < MAX_URL_REFRESH:
            run.url_refreshes += 1
            run.fetch_seq = None
            log.info("job %s: download URL refused (%s); asking AWS for a fresh one", run.job_id, reply.message)
            self.describe(run.job_id)
            return
        state = reply.failure if reply.failure in fp.FAILURES and reply.failure != "url_expired" else "download_failed"
        self.finish(FAILED, state, message=reply.message or "download failed")

    def refresh_url(self, execution: jobs_api.Execution) -> None:
        run = self.run
        try:
            doc = jobs_api.parse_document(
                execution.document, self.cfg.verification.require_sha256, self.cfg.verification.require_signature)
        except BadDocument as exc:
            return self.finish(FAILED, "invalid_job_document", message=str(exc))
        if (doc.version, doc.sha256, doc.size, doc.signature) != (
                run.doc.version, run.doc.sha256, run.doc.size, run.doc.signature):
            return self.finish(FAILED, "invalid_job_document", message="the job document changed during the download")
        run.doc = doc
        self.start_fetch()

    def stage(self) -> None:
        run, doc = self.run, self.run.doc
        message = ip.Stage(job_id=run.job_id, seq=self.next_seq(), version=doc.version,
                           sha256=doc.sha256, size=doc.size, signature=doc.signature)
        reply = self.call(self.installer.with_timeout(STAGE_TIMEOUT), message)
        if reply is None:
            return self.finish(FAILED, "verification_failed", message="the installer did not finish staging the file")
        if isinstance(reply, Refused):
            return self.finish(FAILED, "verification_failed", message=f"the installer refused to stage: {reply.reason}")
        if not isinstance(reply, ip.StageStatus):
            return self.finish(FAILED, "verification_failed", message=f"unexpected reply {reply.TYPE}")
        if reply.state != ip.STAGED:
            state = "insufficient_disk_space" if reply.failure == "insufficient_disk_space" else "verification_failed"
            return self.finish(FAILED, state, message=reply.message)
        self.enter("install")

    # ----- endings -------------------------------------------------------
    def progress(self, state: str, value: str) -> None:
        run = self.run
        now = self.clock()
        if now - run.last_progress_at < PROGRESS_EVERY:
            return
        run.last_progress_at = now
        run.last_progress = value
        if state == "download_progress":
            self.report(IN_PROGRESS, state, progress=value, version=run.doc.version)
        else:
            self.report(IN_PROGRESS, state, message=value, version=run.doc.version)

    def finish(self, status: str, state: str, message: str | None = None) -> None:
        run = self.run
        version = run.doc.version if run.doc else None
        self.report(status, state, message=message, version=version)
        run.phase = "finishing"
        self.cleanup(run.job_id)

    def cleanup(self, job_id: str) -> None:
        self.call(self.fetcher, fp.CancelFetch(job_id=job_id, seq=self.next_seq()))
        self.call(self.installer, ip.Discard(job_id=job_id, seq=self.next_seq()))

    def abandon(self, why: str) -> None:
        run = self.run
        if run is None:
            return
        log.warning("job %s: stopping work: %s", run.job_id, why)
        for token in [t for t, o in self.outbox.items() if o.job_id == run.job_id]:
            del self.outbox[token]
        if run.phase != "describe":
            self.cleanup(run.job_id)
        self.run = None
        self.ask_pending()


def run_interval(cfg: Config) -> float:
    """Pause between version checks after a soft restart."""
    return max(1.0, min(10.0, cfg.hooks.version_confirm_window / 10))
