"""The AWS side of IoT Jobs as pure state: no MQTT, no threads, no clock of its own.

Contract: ``JobStore`` holds job executions per (thing, job) and answers device requests
(``handle(topic, payload)``) and controller actions (``create_job``, ``cancel_job``,
``delete_execution``). Every call returns the list of ``Publication`` s that AWS would send
in reply: ``/accepted`` or ``/rejected`` answers and ``notify`` / ``notify-next`` events, in
that order. It never publishes anything itself, is not thread-safe (``JobsEmulator``
serialises calls with one lock), and never trusts a request: every field is checked before
it is used and a bad request gets a ``/rejected`` answer, never an exception.

The wire shapes follow docs/aws-iot-jobs.md. Choices where
the reference says UNCONFIRMED (option = constructor keyword of ``JobStore``/``JobsEmulator``):

| Question | Choice here | Option |
|---|---|---|
| replies without a subscription (pitfall 1) | impossible for an external client: devices must subscribe to the reply topics | - |
| QoS of replies and notifications | 1, never retained | ``reply_qos`` (JobsEmulator) |
| ``thingName`` inside JobExecution | omitted (no live capture shows it) | ``include_thing_name`` |
| statusDetails on update / start-next | REPLACE the stored map (always send the full map) | ``merge_status_details`` |
| ``statusDetails: {}`` on the wire | the key is omitted when the map is empty | - |
| null-valued keys in delivered documents | kept | ``strip_nulls`` |
| device sets a non-device status (QUEUED, CANCELED, ...) | ``InvalidRequest`` | - |
| update of a terminal execution (incl. force-canceled) | ``InvalidStateTransition`` + executionState | - |
| QUEUED -> SUCCEEDED/FAILED/REJECTED directly | allowed | - |
| cancel / delete bump ``versionNumber`` | no | - |
| describe of a terminal execution | accepted (no ``TerminalStateReached``) | - |
| start-next on an IN_PROGRESS head | returned as is: no version bump, statusDetails ignored | - |
| validation order | JSON -> fields (``InvalidRequest``) -> existence (``ResourceNotFound``) -> ``expectedVersion`` (``VersionMismatch``) -> transition (``InvalidStateTransition``) | - |
| valid JSON that is not an object, non-string ``clientToken`` | ``InvalidRequest`` | - |
| unknown request fields | ignored | - |
| order inside get/accepted lists and ``notify`` | by queuedAt (then creation order); at most 10 pending listed | ``max_listed`` |
| ``notify`` / ``notify-next`` after a deletion | sent like for any other change of the pending set / head | - |
| step / in-progress timers (``stepTimeoutInMinutes``) | validated (1-10080, -1 on update) but no timer runs: nothing ever becomes TIMED_OUT | - |
| job IDs ``get``, ``start-next``, ``notify``, ``notify-next`` | refused by ``create_job`` (pitfall 20) | - |
| executions per (job, thing) | exactly one (``executionNumber`` 1); no retry configs | - |
| ``history`` in snapshots | every accepted device change: start-next that started the execution and every update | - |
| job status (controller view, ``job``) | CANCELED once canceled; COMPLETED when every execution is terminal; else IN_PROGRESS | - |
"""

from __future__ import annotations

import copy
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

log = logging.getLogger("upparat.devtools.jobs_emulator")

JOB_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
THING_NAME_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
DETAIL_KEY_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
PRESIGN_RE = re.compile(r"\$\{aws:iot:s3-presigned-url:([^}]*)\}")
# Verbs that share the job-id level of the topic (pitfall 20): refuse them as job IDs.
RESERVED_JOB_IDS = frozenset({"get", "start-next", "notify", "notify-next"})
NEXT = "$next"

PENDING = ("IN_PROGRESS", "QUEUED")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"})
ALL_STATUSES = frozenset(PENDING) | TERMINAL
DEVICE_STATUSES = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"})

MAX_DETAILS = 10
MAX_DETAIL_VALUE = 1024
MAX_DOCUMENT_BYTES = 32768
MAX_STEP_TIMEOUT = 10080

# Unicode categories of \p{C} (control, format, surrogate, private use, unassigned):
# AWS's statusDetails value pattern is [^\p{C}]+.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


class Publication(NamedTuple):
    topic: str
    payload: dict


class RequestError(Exception):
    """A device request AWS would answer on ``/rejected``."""

    def __init__(self, code: str, message: str, execution_state: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.execution_state = execution_state


@dataclass
class Execution:
    job_id: str
    thing: str
    seq: int  # creation order: breaks ties between equal queuedAt seconds
    queued_at: int
    last_updated_at: int
    status: str = "QUEUED"
    status_details: dict[str, str] = field(default_factory=dict)
    version_number: int = 1
    execution_number: int = 1
    started_at: int | None = None
    history: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        """JobExecutionState (reference §3.2): statusDetails only when non-empty."""
        out: dict[str, Any] = {"status": self.status}
        if self.status_details:
            out["statusDetails"] = dict(self.status_details)
        out["versionNumber"] = self.version_number
        return out

    def summary(self) -> dict:
        """JobExecutionSummary (reference §3.3): no status, startedAt only once started."""
        out: dict[str, Any] = {"jobId": self.job_id, "queuedAt": self.queued_at}
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        out["lastUpdatedAt"] = self.last_updated_at
        out["versionNumber"] = self.version_number
        out["executionNumber"] = self.execution_number
        return out

    def snapshot(self) -> dict:
        return {
            "jobId": self.job_id,
            "status": self.status,
            "statusDetails": dict(self.status_details),
            "versionNumber": self.version_number,
            "executionNumber": self.execution_number,
            "queuedAt": self.queued_at,
            "startedAt": self.started_at,
            "lastUpdatedAt": self.last_updated_at,
            "history": copy.deepcopy(self.history),
        }


def parse_request_topic(topic: str) -> tuple[str, str, str | None] | None:
    """``(thing, operation, job_id)`` for a device request topic, else None.

    Parsed by level count (pitfall 20) so that replies and notifications, ours or anyone's,
    are never mistaken for requests: ``jobs/<verb>`` and ``jobs/<job>/<verb>`` only.
    """
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
        return None
    thing, rest = parts[2], parts[4:]
    if not thing:
        return None
    if len(rest) == 1 and rest[0] in ("get", "start-next"):
        return thing, rest[0], None
    if len(rest) == 2 and rest[0] not in ("get", "start-next") and rest[1] in ("get", "update"):
        return thing, "describe" if rest[1] == "get" else "update", rest[0]
    return None


class JobStore:
    def __init__(self, *, presign: Callable[[str], str] | None = None,
                 clock: Callable[[], float], include_thing_name: bool = False,
                 merge_status_details: bool = False, strip_nulls: bool = False,
                 max_listed: int = 10):
        self._presign = presign
        self._clock = clock
        self._include_thing_name = include_thing_name
        self._merge_status_details = merge_status_details
        self._strip_nulls = strip_nulls
        self._max_listed = max_listed
        self._documents: dict[str, str] = {}  # job id -> document as JSON text (immutable)
        self._executions: dict[tuple[str, str], Execution] = {}  # (thing, job id)
        self._canceled: set[str] = set()  # job ids
        self._seq = 0

    # ------------------------------------------------------------------ controller side

    def create_job(self, job_id: str, document: dict, things: list[str]) -> list[Publication]:
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"job id must match [a-zA-Z0-9_-]{{1,64}}: {job_id!r}")
        if job_id in RESERVED_JOB_IDS:
            raise ValueError(f"job id {job_id!r} collides with a jobs topic verb; choose another")
        if job_id in self._documents:
            raise ValueError(f"job {job_id!r} already exists")
        if not isinstance(document, dict):
            raise ValueError("job document must be a JSON object (dict)")
        try:
            text = json.dumps(document, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job document is not JSON-serialisable: {exc}") from None
        if len(text.encode()) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"job document exceeds {MAX_DOCUMENT_BYTES} bytes")
        if isinstance(things, str) or not things:
            raise ValueError("things must be a non-empty list of thing names")
        things = list(things)
        for thing in things:
            if not isinstance(thing, str) or not THING_NAME_RE.fullmatch(thing):
                raise ValueError(f"thing name must match [a-zA-Z0-9:_-]{{1,128}}: {thing!r}")
        if len(set(things)) != len(things):
            raise ValueError("things contains duplicates")
        self._documents[job_id] = text
        now = self._now()
        out: list[Publication] = []
        for thing in things:
            before = self._pending_view(thing)
            self._seq += 1
            self._executions[(thing, job_id)] = Execution(
                job_id=job_id, thing=thing, seq=self._seq, queued_at=now, last_updated_at=now)
            out += self._notifications(thing, before)
        return out

    def cancel_job(self, job_id: str, force: bool = False) -> list[Publication]:
        """QUEUED executions -> CANCELED; IN_PROGRESS ones too only with ``force``."""
        if job_id not in self._documents:
            raise KeyError(f"no job {job_id!r}")
        self._canceled.add(job_id)
        out: list[Publication] = []
        for ex in self._sorted(e for e in self._executions.values() if e.job_id == job_id):
            if ex.status == "QUEUED" or (force and ex.status == "IN_PROGRESS"):
                before = self._pending_view(ex.thing)
                ex.status = "CANCELED"
                ex.last_updated_at = self._now()
                out += self._notifications(ex.thing, before)
        return out

    def delete_execution(self, job_id: str, thing: str, force: bool = False) -> list[Publication]:
        ex = self._executions.get((thing, job_id))
        if ex is None:
            raise KeyError(f"no execution of job {job_id!r} on thing {thing!r}")
        if ex.status == "IN_PROGRESS" and not force:
            raise ValueError("execution is IN_PROGRESS: deleting it needs force=True")
        before = self._pending_view(thing)
        del self._executions[(thing, job_id)]
        return self._notifications(thing, before)

    def execution(self, job_id: str, thing: str) -> dict | None:
        ex = self._executions.get((thing, job_id))
        return ex.snapshot() if ex else None

    def job(self, job_id: str) -> dict | None:
        """The controller's view of a job (AWS DescribeJob plus its executions): its status,
        the document as created (placeholders unsigned) and a snapshot of every execution."""
        if job_id not in self._documents:
            return None
        executions = self._sorted(e for e in self._executions.values() if e.job_id == job_id)
        if job_id in self._canceled:
            status = "CANCELED"
        elif executions and all(e.status in TERMINAL for e in executions):
            status = "COMPLETED"
        else:
            status = "IN_PROGRESS"
        return {"jobId": job_id, "status": status, "document": json.loads(self._documents[job_id]),
                "executions": [{"thing": e.thing, **e.snapshot()} for e in executions]}

    # ------------------------------------------------------------------ device side

    def handle(self, topic: str, payload: bytes) -> list[Publication]:
        """Answer one device request; an empty list for topics that are not requests."""
        parsed = parse_request_topic(topic)
        if parsed is None:
            return []
        thing, operation, job_id = parsed
        request: dict = {}
        try:
            request = _parse_payload(payload)
            token = request.get("clientToken")
            if token is not None and not isinstance(token, str):
                raise RequestError("InvalidRequest", "clientToken must be a string")
            answer, events = self._answers[operation](self, thing, job_id, request)
        except RequestError as err:
            payload_out: dict[str, Any] = {"code": err.code, "message": err.message}
            if err.execution_state is not None:
                payload_out["executionState"] = err.execution_state
            return [self._reply(topic + "/rejected", request, payload_out)]
        except Exception:  # noqa: BLE001 - a bug here must not kill the MQTT thread
            log.exception("jobs emulator failed on %s", topic)
            return [self._reply(topic + "/rejected", request,
                                {"code": "InternalError", "message": "emulator error (see its log)"})]
        return [self._reply(topic + "/accepted", request, answer)] + events

    def _answer_get(self, thing, _job_id, request):
        pending = self._listed(thing)
        return ({"inProgressJobs": [e.summary() for e in pending if e.status == "IN_PROGRESS"],
                 "queuedJobs": [e.summary() for e in pending if e.status == "QUEUED"]}, [])

    def _answer_start_next(self, thing, _job_id, request):
        details = _status_details(request)
        _step_timeout(request, allow_clear=False)
        before = self._pending_view(thing)
        head = self._head(thing)
        if head is None:
            return {}, []
        if head.status == "QUEUED":
            new_details = self._new_details(head, details)
            now = self._now()
            head.status = "IN_PROGRESS"
            head.started_at = head.last_updated_at = now
            head.version_number += 1
            head.status_details = new_details
            self._record(head)
        return {"execution": self._delivery(head, with_document=True)}, self._notifications(thing, before)

    def _answer_describe(self, thing, job_id, request):
        execution_number = _optional_int(request, "executionNumber", minimum=1)
        include_document = _optional_bool(request, "includeJobDocument", default=True)
        if job_id == NEXT:
            ex = self._head(thing)  # read-only: $next never starts anything
            if ex is None:
                return {}, []
        else:
            ex = self._existing(thing, job_id, execution_number)
        return {"execution": self._delivery(ex, with_document=include_document)}, []

    def _answer_update(self, thing, job_id, request):
        status = request.get("status")
        if status is None:
            raise RequestError("InvalidRequest", "Value null at 'status' failed to satisfy "
                                                 "constraint: Member must not be null")
        if not isinstance(status, str) or status not in ALL_STATUSES:
            raise RequestError("InvalidRequest", f"status {status!r} is not a job execution status")
        if status not in DEVICE_STATUSES:
            raise RequestError("InvalidRequest", f"a device may not set status {status}; "
                                                 f"allowed: {', '.join(sorted(DEVICE_STATUSES))}")
        details = _status_details(request)
        expected = _expected_version(request)
        execution_number = _optional_int(request, "executionNumber", minimum=1)
        include_state = _optional_bool(request, "includeJobExecutionState", default=False)
        include_document = _optional_bool(request, "includeJobDocument", default=False)
        _step_timeout(request, allow_clear=True)

        ex = self._existing(thing, job_id, execution_number)
        if expected is not None and expected != ex.version_number:
            raise RequestError("VersionMismatch",
                               f"expectedVersion {expected} does not match the current version "
                               f"{ex.version_number}", ex.state())
        if ex.status in TERMINAL:
            raise RequestError("InvalidStateTransition",
                               f"cannot update a job execution in status {ex.status} to {status}",
                               ex.state())

        new_details = self._new_details(ex, details)

        before = self._pending_view(thing)
        now = self._now()
        ex.status = status
        ex.version_number += 1
        ex.last_updated_at = now
        if status == "IN_PROGRESS" and ex.started_at is None:
            ex.started_at = now
        ex.status_details = new_details
        self._record(ex)
        answer: dict[str, Any] = {}
        if include_state:
            answer["executionState"] = ex.state()
        if include_document:
            answer["jobDocument"] = self._document(ex.job_id)
        return answer, self._notifications(thing, before)

    # one literal table: request operation (from parse_request_topic) -> handler
    _answers = {
        "get": _answer_get,
        "start-next": _answer_start_next,
        "describe": _answer_describe,
        "update": _answer_update,
    }

    # ------------------------------------------------------------------ helpers

    def _now(self) -> int:
        return int(self._clock())  # integer seconds (pitfall 6)

    def _reply(self, topic: str, request: dict, body: dict) -> Publication:
        payload: dict[str, Any] = {"timestamp": self._now()}
        token = request.get("clientToken")
        if isinstance(token, str):  # echoed only when given (and echoable)
            payload["clientToken"] = token
        payload.update(body)
        return Publication(topic, payload)

    def _existing(self, thing: str, job_id: str, execution_number: int | None) -> Execution:
        ex = self._executions.get((thing, job_id))
        if ex is None or (execution_number is not None and execution_number != ex.execution_number):
            raise RequestError("ResourceNotFound",
                               f"job execution {job_id} on thing {thing} not found")
        return ex

    def _new_details(self, ex: Execution, details: dict[str, str] | None) -> dict[str, str]:
        """The map to store: unchanged when omitted, else replaced (or merged, if configured)."""
        if details is None:
            return dict(ex.status_details)
        if not self._merge_status_details:
            return dict(details)
        merged = {**ex.status_details, **details}
        if len(merged) > MAX_DETAILS:
            raise RequestError("InvalidRequest", f"statusDetails would exceed {MAX_DETAILS} pairs")
        return merged

    @staticmethod
    def _record(ex: Execution) -> None:
        ex.history.append({"status": ex.status, "statusDetails": dict(ex.status_details),
                           "versionNumber": ex.version_number})

    @staticmethod
    def _sorted(executions) -> list[Execution]:
        return sorted(executions, key=lambda e: (e.queued_at, e.seq))

    def _pending(self, thing: str) -> list[Execution]:
        """IN_PROGRESS first, then QUEUED; each by queuedAt (reference §13)."""
        mine = [e for e in self._executions.values() if e.thing == thing]
        return [e for status in PENDING for e in self._sorted(x for x in mine if x.status == status)]

    def _listed(self, thing: str) -> list[Execution]:
        return self._pending(thing)[: self._max_listed]

    def _head(self, thing: str) -> Execution | None:
        pending = self._pending(thing)
        return pending[0] if pending else None

    def _pending_view(self, thing: str):
        """What notifications are derived from: the pending set and the head's identity."""
        pending = self._pending(thing)
        head = (pending[0].job_id, pending[0].execution_number) if pending else None
        return frozenset((e.job_id, e.execution_number) for e in pending), head

    def _notifications(self, thing: str, before) -> list[Publication]:
        """notify when the pending set changed, notify-next when the head changed (pitfalls 8-10)."""
        pending_before, head_before = before
        pending_after, head_after = self._pending_view(thing)
        out: list[Publication] = []
        if pending_after != pending_before:
            jobs: dict[str, list] = {}
            for ex in self._listed(thing):
                jobs.setdefault(ex.status, []).append(ex.summary())
            out.append(Publication(f"$aws/things/{thing}/jobs/notify",
                                   {"timestamp": self._now(), "jobs": jobs}))
        if head_after != head_before:
            payload: dict[str, Any] = {"timestamp": self._now()}
            head = self._head(thing)
            if head is not None:
                payload["execution"] = self._delivery(head, with_document=True)
            out.append(Publication(f"$aws/things/{thing}/jobs/notify-next", payload))
        return out

    def _delivery(self, ex: Execution, *, with_document: bool) -> dict:
        """JobExecution (reference §3.1) as delivered to the device."""
        out: dict[str, Any] = {"jobId": ex.job_id}
        if self._include_thing_name:
            out["thingName"] = ex.thing
        out["status"] = ex.status
        if ex.status_details:
            out["statusDetails"] = dict(ex.status_details)
        out["queuedAt"] = ex.queued_at
        if ex.started_at is not None:
            out["startedAt"] = ex.started_at
        out["lastUpdatedAt"] = ex.last_updated_at
        out["versionNumber"] = ex.version_number
        out["executionNumber"] = ex.execution_number
        if with_document:
            out["jobDocument"] = self._document(ex.job_id)
        return out

    def _document(self, job_id: str) -> dict:
        """A fresh copy per delivery, with presigned URLs signed anew each time (pitfall 13)."""
        return self._substitute(json.loads(self._documents[job_id]))

    def _substitute(self, value):
        if isinstance(value, dict):
            return {k: self._substitute(v) for k, v in value.items()
                    if not (self._strip_nulls and v is None)}
        if isinstance(value, list):
            return [self._substitute(v) for v in value]
        if isinstance(value, str) and self._presign is not None:
            return PRESIGN_RE.sub(lambda m: self._presign(m.group(1)), value)
        return value


# ---------------------------------------------------------------------- request field checks

def _parse_payload(payload: bytes) -> dict:
    if not payload:
        return {}  # an empty payload is a valid request (pitfall 15)
    try:
        request = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RequestError("InvalidJson", "payload is not valid UTF-8 JSON") from None
    if not isinstance(request, dict):
        raise RequestError("InvalidRequest", "payload must be a JSON object")
    return request


def _optional_bool(request: dict, key: str, *, default: bool) -> bool:
    value = request.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError("InvalidRequest", f"{key} must be a boolean")
    return value


def _optional_int(request: dict, key: str, *, minimum: int) -> int | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError("InvalidRequest", f"{key} must be an integer >= {minimum}")
    return value


def _expected_version(request: dict) -> int | None:
    """An integer, or a string of digits: coreJobs sends it as a string (pitfall 14)."""
    value = request.get("expectedVersion")
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise RequestError("InvalidRequest", "expectedVersion must be a non-negative integer")


def _step_timeout(request: dict, *, allow_clear: bool) -> None:
    value = request.get("stepTimeoutInMinutes")
    if value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        1 <= value <= MAX_STEP_TIMEOUT or (allow_clear and value == -1))
    if not ok:
        raise RequestError("InvalidRequest", f"stepTimeoutInMinutes must be 1-{MAX_STEP_TIMEOUT}"
                                             + (" or -1" if allow_clear else ""))


def _status_details(request: dict) -> dict[str, str] | None:
    """AWS limits (pitfall 17): <=10 pairs, keys [a-zA-Z0-9:_-]{1,128}, values 1-1024 chars
    with no control/format characters."""
    details = request.get("statusDetails")
    if details is None:
        return None
    if not isinstance(details, dict):
        raise RequestError("InvalidRequest", "statusDetails must be an object of strings")
    if len(details) > MAX_DETAILS:
        raise RequestError("InvalidRequest", f"statusDetails has {len(details)} pairs; "
                                             f"at most {MAX_DETAILS} are allowed")
    for key, value in details.items():
        if not DETAIL_KEY_RE.fullmatch(key):
            raise RequestError("InvalidRequest", f"statusDetails key {key!r} must match "
                                                 "[a-zA-Z0-9:_-]{1,128}")
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_DETAIL_VALUE:
            raise RequestError("InvalidRequest", f"statusDetails[{key!r}] must be a string of "
                                                 f"1-{MAX_DETAIL_VALUE} characters")
        if any(_is_control(ch) for ch in value):
            raise RequestError("InvalidRequest", f"statusDetails[{key!r}] contains a control "
                                                 "character")
    return dict(details)


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in _CONTROL_CATEGORIES
