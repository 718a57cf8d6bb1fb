"""Status updates to AWS IoT Jobs: ordered, confirmed, persisted.

Per job execution, the updates the lifecycle reports go out one at a time,
in order: the next is sent only when AWS has accepted the previous one. A
newer update supersedes a queued (not yet sent) progress update; milestones
(``download_start``, ``installation_start``, ``reboot_start``, the final
status) are never dropped. Every update carries ``expectedVersion``, the
execution's versionNumber as we last learnt it, so a stray duplicate of an
older update (an MQTT redelivery after a reconnect) is refused by AWS with
``VersionMismatch`` instead of overwriting a newer state.

Replies are matched by clientToken. ``RequestThrottled``/``InternalError``
and silence are retried with exponential backoff; ``VersionMismatch``
re-reads the version from the executionState AWS returns (and counts the
update as stored when that state already equals it); a rejection saying
the execution is terminal or gone ends that job only (``on_gone``). The
whole outbox is written to the broker's state directory on every change
(temp file, fsync, rename), so a crash or a reboot loses no confirmed order
and no unconfirmed update.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from upparat import safejson
from upparat.broker_proc import jobs_api
from upparat.release import is_job_id

log = logging.getLogger("upparat.broker.outbox")

STATE_FILE = "outbox.json"
STATE_VERSION = 1
RESEND_AFTER = 10.0  # s without a reply before the in-flight update is sent again
BACKOFF_MAX = 120.0
MAX_DONE = 64  # finished executions remembered, so a late notify does not start them again
FINAL = ("SUCCEEDED", "FAILED", "REJECTED")
IN_PROGRESS_STATUS = "IN_PROGRESS"


@dataclass
class Update:
    token: str
    status: str
    details: dict[str, str]
    rank: int
    milestone: bool

    @property
    def state(self) -> str:
        return self.details.get("state", "")


@dataclass
class JobOutbox:
    job_id: str
    execution: int
    version: int | None = None
    rank: int = 0  # last rank given out
    accepted_rank: int = 0
    accepted_state: str = ""  # statusDetails.state of the last accepted update
    inflight: Update | None = None  # sent, not yet settled
    queue: list[Update] = field(default_factory=list)  # not yet sent, in order
    attempts: int = 0
    next_send_at: float = 0.0  # monotonic; not persisted

    def to_json(self) -> dict:
        body = asdict(self)
        body.pop("next_send_at")
        return body

    @classmethod
    def from_json(cls, body: dict) -> "JobOutbox":
        inflight = body.get("inflight")
        box = cls(job_id=body["job_id"], execution=body["execution"], version=body["version"], rank=body["rank"],
                  accepted_rank=body["accepted_rank"], accepted_state=body["accepted_state"],
                  inflight=Update(**inflight) if inflight else None,
                  queue=[Update(**u) for u in body["queue"]], attempts=0)
        if not is_job_id(box.job_id) or type(box.execution) is not int:
            raise ValueError("bad job id or execution")
        return box


class Outbox:
    def __init__(self, state_dir: Path | None, publish: Callable[[str, bytes], bool], topics: jobs_api.Topics,
                 clock, on_gone: Callable[[str, int, str], None], on_accepted: Callable[[str, int, Update], None]):
        self._dir = state_dir
        self._publish = publish
        self._topics = topics
        self._clock = clock
        self._on_gone = on_gone
        self._on_accepted = on_accepted
        self.jobs: dict[str, JobOutbox] = {}
        self.done: list[tuple[str, int]] = []
        self.connected = False
        self._load()

    # ----- what the lifecycle asks ----------------------------------------
    def report(self, job_id: str, execution: int, status: str, details: dict[str, str],
               milestone: bool = True) -> int:
        """Queue an update; returns its rank (to ask ``accepted`` later)."""
        box = self.jobs.get(job_id)
        if box is None or box.execution != execution:
            box = self.jobs[job_id] = JobOutbox(job_id, execution)
        box.rank += 1
        update = Update(secrets.token_hex(16), status, details, box.rank, milestone or status in FINAL)
        # A newer state supersedes queued progress; milestones stay, in order.
        box.queue = [u for u in box.queue if u.milestone]
        box.queue.append(update)
        log.info("job %s: %s %s%s", job_id, status, details.get("state"),
                 f": {details['message']}" if details.get("message") else "")
        self._save()
        self._send_next(box)
        return update.rank

    def last(self, job_id: str) -> Update | None:
        """The job's newest update: queued, in flight, or (state and rank only) accepted."""
        box = self.jobs.get(job_id)
        if box is None:
            return None
        if box.queue:
            return box.queue[-1]
        if box.inflight is not None:
            return box.inflight
        if box.accepted_rank:
            return Update("", IN_PROGRESS_STATUS, {"state": box.accepted_state}, box.accepted_rank, True)
        return None

    def accepted(self, job_id: str, rank: int) -> bool:
        box = self.jobs.get(job_id)
        return box is None or box.accepted_rank >= rank

    def has_final(self, job_id: str) -> bool:
        box = self.jobs.get(job_id)
        return box is not None and any(u.status in FINAL for u in ([box.inflight] if box.inflight else []) + box.queue)

    def is_done(self, job_id: str, execution: int | None = None) -> bool:
        return any(j == job_id and (execution is None or e == execution) for j, e in self.done)

    def busy(self) -> bool:
        """A final status is still on its way: the next job waits for it."""
        return any(self.has_final(job_id) for job_id in self.jobs)

    def set_version(self, job_id: str, execution: int, version: int | None) -> None:
        """The versionNumber from a describe answer (only while nothing is in flight)."""
        box = self.jobs.get(job_id)
        if box is None:
            box = self.jobs[job_id] = JobOutbox(job_id, execution)
        if box.inflight is None and version is not None:
            box.version = version

    def forget(self, job_id: str) -> None:
        """The job is gone (cancelled, removed): its updates can never be stored."""
        if self.jobs.pop(job_id, None) is not None:
            self._save()

    # ----- MQTT ------------------------------------------------------------
    def handle_connected(self) -> None:
        self.connected = True
        for box in self.jobs.values():
            box.next_send_at = 0.0
            box.attempts = 0
        self.resend_due()

    def handle_disconnected(self) -> None:
        self.connected = False

    def handle_reply(self, job_id: str, outcome: str, body: dict) -> bool:
        """An update/accepted or /rejected; True when it was one of ours."""
        box = self.jobs.get(job_id)
        token = body.get("clientToken")
        if box is None or box.inflight is None or token != box.inflight.token:
            return False  # a late reply for an update already settled
        update = box.inflight
        if outcome == "accepted":
            state = jobs_api.parse_state(body.get("executionState"))
            version = state.version_number if state and state.version_number is not None else None
            self._settle(box, version if version is not None else (box.version + 1 if box.version is not None
                                                                   else None))
            return True
        rejection = jobs_api.parse_rejection(body)
        code, state = rejection.code, rejection.state
        if code in jobs_api.RETRY_CODES:
            delay = self._backoff(box)
            log.warning("job %s: update %s rejected with %s; again in %.0f s", job_id, update.state, code, delay)
            box.next_send_at = self._clock() + delay
            return True
        if code == "VersionMismatch" and state is not None:
            if state.status == update.status and state.status_details == update.details:
                log.info("job %s: update %s was already stored", job_id, update.state)
                self._settle(box, state.version_number)
            else:
                log.info("job %s: execution is at version %s; sending %s again", job_id, state.version_number,
                         update.state)
                box.version = state.version_number
                box.next_send_at = 0.0
                self._send_next(box)
            return True
        if state is not None and state.status in jobs_api.TERMINAL:
            if state.status == update.status and update.status in FINAL:
                log.info("job %s: final status %s was already stored", job_id, update.status)
                self._settle(box, state.version_number)
                return True
        if code in ("InvalidStateTransition", "ResourceNotFound", "TerminalStateReached"):
            log.error("job %s: update %s rejected (%s %s): the execution is %s", job_id, update.state, code,
                      rejection.message, state.status if state else "gone")
            self.forget(job_id)
            self._on_gone(job_id, box.execution, f"AWS refused the update ({code})")
            return True
        # InvalidRequest and anything unknown: this update can never be stored; do not block the rest.
        log.error("job %s: update %s/%s rejected (%s %s); dropping it", job_id, update.status, update.state,
                  code or "no code", rejection.message)
        box.inflight = None
        self._save()
        self._send_next(box)
        return True

    # ----- time ------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [b.next_send_at for b in self.jobs.values() if (b.inflight or b.queue) and self.connected]
        return min(times) if times else None

    def resend_due(self) -> None:
        now = self._clock()
        for box in list(self.jobs.values()):
            if (box.inflight or box.queue) and now >= box.next_send_at:
                if box.inflight is not None:
                    box.attempts += 1
                self._send_next(box, resend=True)

    # ----- inside ----------------------------------------------------------
    def _backoff(self, box: JobOutbox) -> float:
        box.attempts += 1
        return min(RESEND_AFTER * 2 ** (box.attempts - 1), BACKOFF_MAX)

    def _settle(self, box: JobOutbox, version: int | None) -> None:
        update = box.inflight
        box.inflight = None
        box.attempts = 0
        box.version = version
        box.accepted_rank = update.rank
        box.accepted_state = update.state
        if update.status in FINAL:
            del self.jobs[box.job_id]
            self.done.append((box.job_id, box.execution))
            del self.done[:-MAX_DONE]
        self._save()
        self._on_accepted(box.job_id, box.execution, update)
        if box.job_id in self.jobs:
            self._send_next(box)

    def _send_next(self, box: JobOutbox, resend: bool = False) -> None:
        if box.inflight is None:
            if not box.queue:
                return
            box.inflight = box.queue.pop(0)
            box.attempts = 0
            self._save()
        elif not resend:
            return  # one at a time: the next goes out when this one is settled
        if not self.connected:
            return
        update = box.inflight
        payload = jobs_api.update_payload(update.status, update.details, update.token, box.version, box.execution)
        self._publish(self._topics.update(box.job_id), payload)
        box.next_send_at = self._clock() + min(RESEND_AFTER * 2 ** box.attempts, BACKOFF_MAX)

    def _save(self) -> None:
        if self._dir is None:
            return
        body = {"v": STATE_VERSION, "jobs": [b.to_json() for b in self.jobs.values()],
                "done": [list(d) for d in self.done]}
        data = safejson.dumps(body)
        temp = self._dir / f".{STATE_FILE}.{secrets.token_hex(4)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self._dir / STATE_FILE)
        except OSError as exc:
            # Losing persistence must not stop reporting; say so loudly.
            log.error("cannot save the status outbox in %s: %s", self._dir, exc)
            try:
                os.unlink(temp)
            except OSError:
                pass

    def _load(self) -> None:
        if self._dir is None:
            return
        path = self._dir / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot open %s (%s); starting with an empty outbox", path, exc.strerror)
            return
        try:
            with os.fdopen(fd, "rb") as fh:
                body = safejson.loads(fh.read(4 * 1024 * 1024), max_bytes=4 * 1024 * 1024, max_depth=8)
            if not isinstance(body, dict) or body.get("v") != STATE_VERSION:
                raise ValueError("not a version 1 outbox")
            jobs = [JobOutbox.from_json(b) for b in body["jobs"]]
            done = [(j, e) for j, e in body["done"] if is_job_id(j) and type(e) is int]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("%s is unusable (%s); starting with an empty outbox", path, exc)
            return
        self.jobs = {b.job_id: b for b in jobs}
        self.done = done[-MAX_DONE:]
        if self.jobs:
            log.info("outbox: %d job(s) with updates to send from before a restart", len(self.jobs))
