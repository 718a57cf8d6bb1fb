"""What ``upparat-jobs`` asks for, computed before anything is sent (pure: no network).

The release and its document use the shared vocabulary (``upparat.release``),
so a document made here is exactly what ``parse_document`` on the device
accepts and what the installer's statement check covers. The CreateJob
request is built here once and either sent or, with ``--dry-run``, printed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from upparat import release as vocabulary
from upparat.release import Release
from upparat.verify import hash_fd

OBJECT_PREFIX = "upparat/"  # S3 keys are OBJECT_PREFIX + <sha256> + "/" + <file name>
MAX_TARGETS = 100  # AWS: "The total number of targets associated with a job must not exceed 100"
MAX_PER_MINUTE = 1000  # jobExecutionsRolloutConfig.maximumPerMinute
MAX_TIMEOUT_MINUTES = 10080  # timeoutConfig.inProgressTimeoutInMinutes: 1 minute to 7 days
PRESIGNED_URL_SECONDS = 3600  # the longest AWS allows; the device asks again when one expires
MAX_DOCUMENT_BYTES = 32768
MAX_JOB_PREFIX = 40  # leaves room for "<version>-<date>-<time>-<random>" in 64 characters
DEFAULT_JOB_PREFIX = "upparat-"
DEFAULT_ABORT_MIN_EXECUTED = 10

JOB_PREFIX_RE = re.compile(r"[a-zA-Z0-9_-]{0,%d}" % MAX_JOB_PREFIX)
THING_GROUP_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Verbs that share the job-id level of the device topics (jobs reference, pitfall 20).
RESERVED_JOB_IDS = frozenset({"get", "start-next", "notify", "notify-next"})
_NOT_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")
_NOT_KEY_CHARS = re.compile(r"[^a-zA-Z0-9._-]+")


class UsageError(Exception):
    """The command line or a local input is unusable (exit 2); the text says what to fix."""


class ServiceError(Exception):
    """AWS or the jobs emulator refused or could not be reached (exit 1); one line."""


# ---------------------------------------------------------------------- the file and its release

@dataclass(frozen=True)
class LocalFile:
    path: Path
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def hash_file(path: str | Path) -> LocalFile:
    """sha256 and size of a regular file, read once (the installer's own hashing)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file")
        sha256, size = hash_fd(fd)
    finally:
        os.close(fd)
    return LocalFile(path, sha256, size)


def release_for(file: LocalFile, version: str, meta: str | None = None, force: bool = False,
                serial: int | None = None) -> Release:
    release = Release(version=version, meta=meta or "", force=force, sha256=file.sha256,
                      size=file.size, serial=serial)
    problem = release.problem()
    if problem:  # "<field> <reason>": name the option that set the field
        field = problem.split(" ", 1)[0]
        raise UsageError(f"--{problem}" if field in ("version", "meta", "serial") else problem)
    return release


def document_fields(release: Release) -> dict:
    """The job document's fields about the file (what ``upparat-jobs sign`` prints)."""
    fields: dict = {"version": release.version, "sha256": release.sha256, "size": release.size,
                    "meta": release.meta, "force": release.force}
    if release.serial is not None:
        fields["serial"] = release.serial
    if release.signature is not None:
        fields["signature"] = release.signature
    return fields


def job_document(release: Release, object_url: str) -> dict:
    """docs/contracts.md, Job document: the file is a presigned-URL placeholder that AWS fills on every delivery."""
    document = {"version": release.version, "file": f"{vocabulary.PLACEHOLDER}{object_url}}}"}
    document.update((k, v) for k, v in document_fields(release).items() if k != "version")
    size = len(json.dumps(document, separators=(",", ":")).encode("utf-8"))
    if size > MAX_DOCUMENT_BYTES:
        raise UsageError(f"the job document would be {size} bytes; AWS allows {MAX_DOCUMENT_BYTES}: "
                         "shorten --meta")
    return document


# ---------------------------------------------------------------------- names and ids

def object_prefix(sha256: str) -> str:
    return f"{OBJECT_PREFIX}{sha256}/"


def object_key(file: LocalFile) -> str:
    """Derived from the content, so one upload serves every job of the same bytes."""
    name = _NOT_KEY_CHARS.sub("_", file.name).strip("._") or "file"
    return f"{object_prefix(file.sha256)}{name[:200]}"


def s3_object_url(bucket: str, key: str, region: str) -> str:
    """The path-style object URL of the AWS presigned-URL docs (the placeholder's argument)."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://s3.{region}.{suffix}/{bucket}/{key}"


def check_bucket(bucket: str) -> None:
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise UsageError(f"--bucket {bucket!r} is not an S3 bucket name (3-63 characters: a-z 0-9 . -)")


def check_job_prefix(prefix: str) -> None:
    if not JOB_PREFIX_RE.fullmatch(prefix):
        raise UsageError(f"--job-prefix {prefix!r} must be at most {MAX_JOB_PREFIX} characters of "
                         "a-z A-Z 0-9 _ -")


def check_job_id(job_id: str, prefix: str | None = None) -> None:
    if not vocabulary.is_job_id(job_id):
        raise UsageError(f"job id {job_id!r} must be 1-64 characters of a-z A-Z 0-9 _ - (AWS job id)")
    if job_id in RESERVED_JOB_IDS:
        raise UsageError(f"job id {job_id!r} is also a jobs topic verb and confuses devices; choose another")
    if prefix and not job_id.startswith(prefix):
        raise UsageError(f"job id {job_id!r} does not start with --job-prefix {prefix!r}: devices with "
                         f"[service] job_prefix = {prefix} would ignore it")


def new_job_id(prefix: str, version: str, now: float | None = None, token: str | None = None) -> str:
    """``<prefix><version>-<UTC date>-<UTC time>-<random>``, at most 64 characters."""
    check_job_prefix(prefix)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    tail = f"-{stamp}-{token or secrets.token_hex(3)}"
    room = 64 - len(prefix) - len(tail)
    middle = _NOT_ID_CHARS.sub("_", version).strip("_")[:room] or "release"
    return f"{prefix}{middle[:room]}{tail}"


def check_role_arn(role_arn: str) -> None:
    if not ROLE_ARN_RE.fullmatch(role_arn):
        raise UsageError(f"--role-arn {role_arn!r} is not an IAM role ARN "
                         "(arn:aws:iam::<account>:role/<name>)")


def thing_names(values: Iterable[str], stdin) -> list[str]:
    """``--thing`` values in order, ``-`` replaced by stdin's names (one a line; blank lines and
    ``#`` comments skipped); duplicates dropped; each checked against the AWS pattern."""
    names: list[str] = []
    read_stdin = False
    for value in values:
        if value == "-":
            if read_stdin:
                raise UsageError("--thing - may be given only once (it reads stdin)")
            read_stdin = True
            before = len(names)
            for number, line in enumerate(stdin, 1):
                name = line.strip()
                if not name or name.startswith("#"):
                    continue
                if not vocabulary.THING_NAME_RE.fullmatch(name):
                    raise UsageError(f"stdin line {number}: {name[:80]!r} is not a thing name "
                                     "(1-128 characters of a-z A-Z 0-9 : _ -)")
                names.append(name)
            if len(names) == before:
                raise UsageError("--thing - read no thing names from stdin")
            continue
        if not vocabulary.THING_NAME_RE.fullmatch(value):
            raise UsageError(f"--thing {value[:80]!r} is not a thing name (1-128 characters of a-z A-Z 0-9 : _ -)")
        names.append(value)
    return list(dict.fromkeys(names))


def group_names(values: Iterable[str]) -> list[str]:
    for value in values:
        if not THING_GROUP_RE.fullmatch(value):
            raise UsageError(f"--thing-group {value[:80]!r} is not a thing group name "
                             "(1-128 characters of a-z A-Z 0-9 : _ -)")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------- the CreateJob request

@dataclass(frozen=True)
class Rollout:
    """The job's fleet settings, checked against the CreateJob limits."""

    max_per_minute: int | None = None
    abort_failed_percent: float | None = None
    abort_min_executed: int = DEFAULT_ABORT_MIN_EXECUTED
    in_progress_timeout: int | None = None
    continuous: bool = False

    def problem(self) -> str | None:
        if self.max_per_minute is not None and not 1 <= self.max_per_minute <= MAX_PER_MINUTE:
            return f"--max-per-minute must be 1-{MAX_PER_MINUTE}"
        if self.abort_failed_percent is not None:
            if not 0 < self.abort_failed_percent <= 100:
                return "--abort-failed-percent must be more than 0 and at most 100"
            if round(self.abort_failed_percent, 2) != self.abort_failed_percent:
                return "--abort-failed-percent takes at most two decimals (AWS)"
        if self.abort_min_executed < 1:
            return "--abort-min-executed must be at least 1"
        if self.in_progress_timeout is not None and not 1 <= self.in_progress_timeout <= MAX_TIMEOUT_MINUTES:
            return f"--in-progress-timeout must be 1-{MAX_TIMEOUT_MINUTES} minutes"
        return None


def create_job_request(job_id: str, document: dict, targets: list[str], role_arn: str, rollout: Rollout,
                       description: str, things_only: bool = False) -> dict:
    """The CreateJob parameters (boto3 spelling). ``things_only``: no group among the targets, so
    the abort minimum is capped at their number (else the abort could never trigger)."""
    if not targets:
        raise UsageError("no targets: give --thing NAME, --thing - (names on stdin) or --thing-group NAME")
    if len(targets) > MAX_TARGETS:
        raise UsageError(f"{len(targets)} targets; AWS allows at most {MAX_TARGETS} per job: put the things "
                         "into a thing group (aws iot add-thing-to-thing-group) and use --thing-group")
    request: dict = {
        "jobId": job_id,
        "targets": list(targets),
        "document": json.dumps(document, separators=(",", ":")),
        "description": description,
        "presignedUrlConfig": {"roleArn": role_arn, "expiresInSec": PRESIGNED_URL_SECONDS},
        "targetSelection": "CONTINUOUS" if rollout.continuous else "SNAPSHOT",
    }
    if rollout.max_per_minute is not None:
        request["jobExecutionsRolloutConfig"] = {"maximumPerMinute": rollout.max_per_minute}
    if rollout.abort_failed_percent is not None:
        minimum = rollout.abort_min_executed
        if things_only:
            minimum = min(minimum, len(targets))
        request["abortConfig"] = {"criteriaList": [{
            "failureType": "ALL",  # FAILED, REJECTED and TIMED_OUT executions all count
            "action": "CANCEL",
            "thresholdPercentage": float(rollout.abort_failed_percent),
            "minNumberOfExecutedThings": minimum,
        }]}
    if rollout.in_progress_timeout is not None:
        request["timeoutConfig"] = {"inProgressTimeoutInMinutes": rollout.in_progress_timeout}
    return request


def describe(release: Release, file: LocalFile) -> str:
    """The job's description: what a person sees in the console's job list."""
    text = f"upparat {release.version}: {file.name} ({file.size} bytes, sha256 {file.sha256[:16]})"
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:2028]
