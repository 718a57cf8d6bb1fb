"""The device side of the AWS IoT Jobs MQTT API, as pure functions.

Topics, the parsing of what AWS sends (untrusted: every field is checked
before use) and the building of what we send (statusDetails kept inside
AWS's limits: at most 10 keys, values 1-1024 characters, no control
characters). See shared/reference/aws-iot-jobs.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from dataclasses import dataclass

JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
PLACEHOLDER = "${aws:iot:s3-presigned-url:"
MAX_PAYLOAD = 256 * 1024  # job documents are <= 32 KiB; replies a little more
MAX_VERSION = 256
MAX_META = 4096
MAX_DETAIL = 1024
MAX_DETAILS = 10

TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}


class BadPayload(Exception):
    """An MQTT payload we cannot use; the text says why."""


class BadDocument(Exception):
    """A job document that cannot be run; the text is for the operator."""


@dataclass(frozen=True)
class Topics:
    thing: str

    @property
    def base(self) -> str:
        return f"$aws/things/{self.thing}/jobs"

    def subscriptions(self) -> list[str]:
        # Precise filters: no '#', so we never receive our own requests (pitfall 21).
        b = self.base
        return [
            f"{b}/notify",
            f"{b}/notify-next",
            f"{b}/get/+",
            f"{b}/start-next/+",
            f"{b}/+/get/+",
            f"{b}/+/update/+",
        ]

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
        if len(parts) == 3 and parts[1] in ("get", "update") and parts[2] in ("accepted", "rejected"):
            return ("describe" if parts[1] == "get" else "update"), parts[0], parts[2]
        return "", None, None


def load_payload(payload: bytes) -> dict:
    if len(payload) > MAX_PAYLOAD:
        raise BadPayload(f"payload of {len(payload)} bytes is too large")
    if not payload:
        return {}
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadPayload(f"payload is not UTF-8 JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadPayload("payload is not a JSON object")
    return body


@dataclass(frozen=True)
class Execution:
    """The fields of a JobExecution we act on, checked."""

    job_id: str
    status: str
    status_details: dict[str, str]
    execution_number: int | None
    version_number: int | None
    document: object  # validated separately by parse_document


def parse_execution(body: dict) -> Execution | None:
    """The ``execution`` of a describe/notify-next answer, or None if absent."""
    raw = body.get("execution")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadPayload("execution is not an object")
    job_id = raw.get("jobId")
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise BadPayload("execution.jobId is missing or invalid")
    status = raw.get("status")
    if not isinstance(status, str):
        raise BadPayload("execution.status is missing")
    details = raw.get("statusDetails") or {}
    if not isinstance(details, dict):
        details = {}
    details = {k: v for k, v in details.items() if isinstance(k, str) and isinstance(v, str)}
    number = raw.get("executionNumber")
    version = raw.get("versionNumber")
    return Execution(
        job_id=job_id,
        status=status,
        status_details=details,
        execution_number=number if isinstance(number, int) and not isinstance(number, bool) else None,
        version_number=version if isinstance(version, int) and not isinstance(version, bool) else None,
        document=raw.get("jobDocument"),
    )


def pending_job_ids(body: dict) -> tuple[list[str], list[str]]:
    """(in_progress, queued) job ids from get/accepted or notify, in order."""
    if "jobs" in body:  # notify
        jobs = body.get("jobs") or {}
        if not isinstance(jobs, dict):
            raise BadPayload("jobs is not an object")
        in_progress, queued = jobs.get("IN_PROGRESS") or [], jobs.get("QUEUED") or []
    else:  # get/accepted
        in_progress, queued = body.get("inProgressJobs") or [], body.get("queuedJobs") or []

    def ids(items) -> list[str]:
        if not isinstance(items, list):
            raise BadPayload("job list is not an array")
        out = []
        for item in items:
            job_id = item.get("jobId") if isinstance(item, dict) else None
            if isinstance(job_id, str) and JOB_ID_RE.match(job_id):
                out.append(job_id)
        return out

    return ids(in_progress), ids(queued)


@dataclass(frozen=True)
class JobDocument:
    version: str
    file: str
    meta: str
    force: bool
    sha256: str | None
    size: int | None
    signature: str | None


def parse_document(doc: object, require_sha256: bool, require_signature: bool) -> JobDocument:
    """Check a job document (DESIGN.md 4.3). Raises BadDocument with a fix."""
    if not isinstance(doc, dict):
        raise BadDocument("the job document is not a JSON object")
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise BadDocument('"version" is missing or not a non-empty string')
    if len(version) > MAX_VERSION or any(unicodedata.category(c) == "Cc" for c in version):
        raise BadDocument('"version" is longer than 256 characters or contains control characters/line breaks')
    file = doc.get("file")
    if not isinstance(file, str) or not file:
        raise BadDocument('"file" is missing or not a string')
    if PLACEHOLDER in file:
        raise BadDocument('"file" still holds the presigned-URL placeholder: create the job with a presignedUrlConfig')
    if not file.startswith(("https://", "http://")) or len(file) > 8192:
        raise BadDocument('"file" is not an http(s) URL')
    meta = doc.get("meta", "")
    if meta is None:
        meta = ""
    if not isinstance(meta, str):
        raise BadDocument('"meta" must be a string')
    if len(meta) > MAX_META or "\x00" in meta:
        raise BadDocument('"meta" is longer than 4096 characters or contains NUL')
    force = doc.get("force", False)
    if not isinstance(force, bool):
        raise BadDocument('"force" must be true or false')
    sha256 = doc.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
            raise BadDocument('"sha256" must be 64 hex characters')
        sha256 = sha256.lower()
    elif require_sha256:
        raise BadDocument(
            'the job document has no "sha256": add the file\'s sha256, or allow unchecked files on the device '
            "with [verification] require_sha256 = false"
        )
    size = doc.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadDocument('"size" must be a non-negative whole number of bytes')
    signature = doc.get("signature")
    if signature is not None:
        if not isinstance(signature, str) or len(signature) > 2048:
            raise BadDocument('"signature" must be a base64 string')
        try:
            base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise BadDocument('"signature" is not valid base64') from None
        if sha256 is None or size is None:
            raise BadDocument('a "signature" needs "sha256" and "size" in the job document (they are what is signed)')
    elif require_signature:
        raise BadDocument('the job document has no "signature" but this device requires signed updates')
    return JobDocument(version, file, meta, force, sha256, size, signature)


def clean_detail(value: object) -> str:
    """A statusDetails value AWS accepts: 1-1024 chars, no control characters."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") else c for c in str(value))
    text = " ".join(text.split())
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 1] + "…"
    return text or "none"


def update_payload(status: str, state: str, client_token: str, **details: object) -> bytes:
    status_details = {"state": clean_detail(state)}
    for key, value in details.items():
        if value is None or len(status_details) >= MAX_DETAILS:
            continue
        status_details[key] = clean_detail(value)
    body = {"status": status, "statusDetails": status_details, "clientToken": client_token}
    return json.dumps(body).encode("utf-8")
