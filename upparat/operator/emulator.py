"""upparat-jobs against the local jobs emulator (``upparat-jobs --emulator URL``).

Speaks the emulator's HTTP control API (``upparat.devtools.jobs_emulator_http``)
with the same requests the AWS side makes, so a developer tries hooks with the
commands they will use against AWS. Started with ``--files DIR``, the emulator
is also the S3 of this mode: the file is uploaded to it and devices get
presigned URLs to its file server.

Differences from AWS, said on stderr when they matter: things are names, not
registry entries (nothing to resolve, no thing groups); the presigned-URL role,
rollout, abort and timeout settings are accepted and ignored.
"""

from __future__ import annotations

import datetime
import json
import urllib.parse

import requests

from upparat.operator.plan import LocalFile, ServiceError, UsageError, object_prefix
from upparat.release import Release

TIMEOUT = (5.0, 60.0)  # connect, read
UPLOAD_TIMEOUT = (5.0, 600.0)
# The emulator's file server takes the bucket and key from the URL's path; the host is
# only what AWS would see (region-less form of the AWS presigned-URL docs).
S3_HOST = "https://s3.amazonaws.com"


class _Reading:
    """A file body with a length (so requests sends Content-Length) that counts progress."""

    def __init__(self, fh, size: int, progress):
        self._fh = fh
        self._size = size
        self._progress = progress

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n if n and n > 0 else 1024 * 1024)
        self._progress.add(len(data))
        return data


class Emulator:
    name = "the jobs emulator"

    def __init__(self, url: str):
        split = urllib.parse.urlsplit(url)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise UsageError(f"--emulator {url!r} is not an http URL (e.g. http://127.0.0.1:8081, "
                             "the control address upparat-jobs-emulator prints)")
        self._url = url.rstrip("/")
        self._http = requests.Session()

    def _call(self, method: str, path: str, what: str, timeout=TIMEOUT, **kwargs) -> requests.Response:
        try:
            return self._http.request(method, self._url + path, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServiceError(f"{what}: cannot reach the jobs emulator at {self._url} ({type(exc).__name__}); "
                               "is upparat-jobs-emulator running?") from None

    @staticmethod
    def _refused(answer: requests.Response, what: str) -> ServiceError:
        try:
            reason = answer.json().get("error") or answer.text
        except ValueError:
            reason = answer.text
        return ServiceError(f"{what}: the jobs emulator answered {answer.status_code}: {reason[:300]}")

    @staticmethod
    def _quote(text: str) -> str:
        return urllib.parse.quote(text, safe="/")

    # ------------------------------------------------------------------ the file

    def object_url(self, bucket: str, key: str) -> str:
        return f"{S3_HOST}/{bucket}/{key}"

    def find_object(self, bucket: str, file: LocalFile) -> str | None:
        what = f"list files/{bucket}"
        answer = self._call("GET", f"/files/{self._quote(bucket)}", what,
                            params={"prefix": object_prefix(file.sha256)})
        if answer.status_code != 200:
            raise self._refused(answer, what)
        for entry in answer.json().get("objects", []):
            if entry.get("size") == file.size and entry.get("sha256") == file.sha256:
                return entry["key"]
        return None

    def upload_request(self, bucket: str, key: str, file: LocalFile, release: Release) -> dict:
        return {"method": "PUT", "url": f"{self._url}/files/{self._quote(bucket)}/{self._quote(key)}",
                "headers": {"X-Upparat-Sha256": file.sha256, "Content-Length": str(file.size)},
                "body": f"<{file.path}: {file.size} bytes>"}

    def upload(self, bucket: str, key: str, file: LocalFile, release: Release, progress) -> None:
        what = f"upload to the jobs emulator files/{bucket}/{key}"
        try:
            with open(file.path, "rb") as fh:
                answer = self._call("PUT", f"/files/{self._quote(bucket)}/{self._quote(key)}", what,
                                    timeout=UPLOAD_TIMEOUT, data=_Reading(fh, file.size, progress),
                                    headers={"X-Upparat-Sha256": file.sha256,
                                             "Content-Type": "application/octet-stream"})
        except OSError as exc:
            raise UsageError(f"cannot read {file.path}: {exc.strerror}") from None
        if answer.status_code != 201:
            raise self._refused(answer, what)

    # ------------------------------------------------------------------ the job

    def check_job_free(self, job_id: str) -> None:
        answer = self._call("GET", f"/jobs/{self._quote(job_id)}", f"look up job {job_id}")
        if answer.status_code == 200:
            raise ServiceError(f"job {job_id} already exists (status {answer.json().get('status')}): "
                               "choose another --job-id")
        if answer.status_code != 404:
            raise self._refused(answer, f"look up job {job_id}")

    def resolve_targets(self, things: list[str], groups: list[str]) -> list[str]:
        if groups:
            raise UsageError("the jobs emulator has no thing groups: name the things with --thing")
        return list(things)

    def job_request(self, create_job: dict, things: list[str]) -> dict:
        return {"method": "POST", "url": f"{self._url}/jobs",
                "body": {"jobId": create_job["jobId"], "document": json.loads(create_job["document"]),
                         "things": things}}

    def ignored(self, create_job: dict) -> list[str]:
        """The CreateJob settings this backend does not act on."""
        # (the presigned-URL role is always there and always unused: the emulator presigns itself)
        names = {"jobExecutionsRolloutConfig": "rollout rate",
                 "abortConfig": "abort rule", "timeoutConfig": "in-progress timeout"}
        return [text for key, text in names.items() if key in create_job]

    def create_job(self, request: dict) -> None:
        what = f"create job {request['body']['jobId']}"
        answer = self._call("POST", "/jobs", what, json=request["body"])
        if answer.status_code != 201:
            raise self._refused(answer, what)

    def cancel_job(self, job_id: str, force: bool) -> None:
        what = f"cancel job {job_id}"
        answer = self._call("POST", f"/jobs/{self._quote(job_id)}/cancel", what, json={"force": force})
        if answer.status_code == 404:
            raise ServiceError(f"no job {job_id} in the jobs emulator")
        if answer.status_code != 200:
            raise self._refused(answer, what)

    def job_status(self, job_id: str, executions: bool = True) -> dict:
        what = f"status of job {job_id}"
        answer = self._call("GET", f"/jobs/{self._quote(job_id)}", what)
        if answer.status_code == 404:
            raise ServiceError(f"no job {job_id} in the jobs emulator")
        if answer.status_code != 200:
            raise self._refused(answer, what)
        job = answer.json()
        return {"jobId": job["jobId"], "status": job["status"],
                "targets": [e["thing"] for e in job.get("executions", [])],
                "executions": [{"thing": e["thing"], "status": e["status"],
                                "statusDetails": e.get("statusDetails") or {},
                                "lastUpdatedAt": _iso(e.get("lastUpdatedAt"))} for e in job.get("executions", [])]}


def _iso(seconds) -> str | None:
    if not isinstance(seconds, (int, float)):
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()
