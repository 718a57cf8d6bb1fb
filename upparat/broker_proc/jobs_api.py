"""The device side of the AWS IoT Jobs MQTT API, as pure functions.

Topics, the parsing of what AWS sends (untrusted: every payload is decoded
with limits by upparat.safejson, every field checked before use) and the
building of what we send (statusDetails within AWS's limits: at most 10
keys, values 1-1024 characters without control characters). The wire shapes
and their sources are summarised in docs/aws-iot-jobs.md.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

from upparat import safejson
from upparat.release import is_job_id

MAX_PAYLOAD = 256 * 1024  # job documents are <= 32 KiB; a describe answer a little more
MAX_DEPTH = 32  # the document is the operator's JSON; ours are shallow
MAX_ITEMS = 20000
MAX_DETAIL = 1024
MAX_DETAILS = 10

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"})
PENDING = frozenset({"QUEUED", "IN_PROGRESS"})
# Rejection codes (reference section 7): retried with backoff, or final.
RETRY_CODES = frozenset({"RequestThrottled", "InternalError"})


class BadPayload(ValueError):
    """An MQTT payload we cannot use; the text says why."""


@dataclass(frozen=True)
class Topics:
    thing: str

    @property
    def base(self) -> str:
        return f"$aws/things/{self.thing}/jobs"

    def subscriptions(self) -> list[str]:
        # Precise filters, no '#': we never receive our own requests (pitfall 21).
        b = self.base
        return [f"{b}/notify", f"{b}/notify-next", f"{b}/get/+", f"{b}/+/get/+", f"{b}/+/update/+"]

    def get_pending(self) -> str:
        return f"{self.base}/get"

    def describe(self, job_id: str) -> str:
        return f"{self.base}/{job_id}/get"

    def update(self, job_id: str) -> str:
        return f"{self.base}/{job_id}/update"

    def classify(self, topic: str) -> tuple[str, str | None, str | None]:
        """(kind, job_id, outcome) for an incoming topic; kind "" if not ours.

        kinds: notify, notify-next, get, describe, update. Parsed by level
        count, because job ids may look like verbs (pitfall 20).
        """
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return "", None, None
        parts = topic[len(prefix):].split("/")
        if len(parts) == 1 and parts[0] in ("notify", "notify-next"):
            return parts[0], None, None
        if len(parts) == 2 and parts[0] == "get" and parts[1] in ("accepted", "rejected"):
            return "get", None, parts[1]
        if (len(parts) == 3 and is_job_id(parts[0]) and parts[1] in ("get", "update")
                and parts[2] in ("accepted", "rejected")):
            return ("describe" if parts[1] == "get" else "update"), parts[0], parts[2]
        return "", None, None


def load_payload(payload: bytes) -> dict:
    """A payload as a JSON object, within limits; an empty payload is ``{}``."""
    if not payload:
        return {}
    try:
        body = safejson.loads(payload, max_bytes=MAX_PAYLOAD, max_depth=MAX_DEPTH,
                              max_string=MAX_PAYLOAD, max_items=MAX_ITEMS)
    except safejson.BadJson as exc:
        raise BadPayload(str(exc)) from None
    if not isinstance(body, dict):
        raise BadPayload("payload is not a JSON object")
    return body


def _count(value: object) -> int | None:
    """AWS numbers (versionNumber, executionNumber); the string form is tolerated (pitfall 14)."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


@dataclass(frozen=True)
class ExecutionState:
    """status, statusDetails and versionNumber (JobExecutionState, reference 3.2)."""

    status: str
    status_details: dict[str, str]
    version_number: int | None


def parse_state(raw: object) -> ExecutionState | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("status"), str):
        return None
    details = raw.get("statusDetails")
    details = details if isinstance(details, dict) else {}
    return ExecutionState(
        status=raw["status"],
        status_details={k: v for k, v in details.items() if isinstance(k, str) and isinstance(v, str)},
        version_number=_count(raw.get("versionNumber")),
    )


@dataclass(frozen=True)
class Execution:
    """The fields of a JobExecution we act on, checked."""

    job_id: str
    state: ExecutionState
    execution_number: int
    document: object  # validated by upparat.release.parse_document


def parse_execution(body: dict) -> Execution | None:
    """The ``execution`` of a describe/notify-next answer, or None if absent."""
    raw = body.get("execution")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadPayload("execution is not an object")
    job_id = raw.get("jobId")
    if not is_job_id(job_id):
        raise BadPayload("execution.jobId is missing or invalid")
    state = parse_state(raw)
    if state is None:
        raise BadPayload("execution.status is missing")
    number = _count(raw.get("executionNumber"))
    return Execution(job_id=job_id, state=state, execution_number=number if number is not None else 0,
                     document=raw.get("jobDocument"))


def pending_jobs(body: dict) -> tuple[list[tuple[str, int | None]], list[tuple[str, int | None]]]:
    """(in_progress, queued) as (job id, executionNumber) from get/accepted or notify, in order."""
    if "jobs" in body:  # notify
        jobs = body.get("jobs") or {}
        if not isinstance(jobs, dict):
            raise BadPayload("jobs is not an object")
        in_progress, queued = jobs.get("IN_PROGRESS") or [], jobs.get("QUEUED") or []
    else:  # get/accepted
        in_progress, queued = body.get("inProgressJobs") or [], body.get("queuedJobs") or []

    def ids(items) -> list[tuple[str, int | None]]:
        if not isinstance(items, list):
            raise BadPayload("job list is not an array")
        return [(item["jobId"], _count(item.get("executionNumber"))) for item in items
                if isinstance(item, dict) and is_job_id(item.get("jobId"))]

    return ids(in_progress), ids(queued)


@dataclass(frozen=True)
class Rejection:
    code: str
    message: str
    state: ExecutionState | None  # present for VersionMismatch and InvalidStateTransition


def parse_rejection(body: dict) -> Rejection:
    code = body.get("code")
    message = body.get("message")
    return Rejection(code=code if isinstance(code, str) else "", message=clean_detail(message)[:300]
                     if isinstance(message, str) else "", state=parse_state(body.get("executionState")))


def clean_detail(value: object) -> str:
    """A statusDetails value AWS accepts: 1-1024 chars, no control characters (\\p{C})."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") else c for c in str(value))
    text = " ".join(text.split())
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 1] + "…"
    return text or "none"


def status_details(state: str, **details: object) -> dict[str, str]:
    """``state`` first, then the other non-None details; at most MAX_DETAILS."""
    out = {"state": clean_detail(state)}
    for key, value in details.items():
        if value is not None and len(out) < MAX_DETAILS:
            out[key] = clean_detail(value)
    return out


def update_payload(status: str, details: dict[str, str], client_token: str,
                   expected_version: int | None, execution_number: int | None) -> bytes:
    body: dict = {"status": status, "statusDetails": details, "clientToken": client_token,
                  "includeJobExecutionState": True}
    if expected_version is not None:
        body["expectedVersion"] = expected_version
    if execution_number:
        body["executionNumber"] = execution_number
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def describe_payload(client_token: str, execution_number: int | None = None) -> bytes:
    body: dict = {"includeJobDocument": True, "clientToken": client_token}
    if execution_number:
        body["executionNumber"] = execution_number
    return json.dumps(body).encode("utf-8")
