"""One job's download: resumable, streaming, hashed while written, verified.

``Download(job, ...).run()`` runs in the fetcher's background thread and
reports through the Job it was given (progress, then one terminal state).
Every HTTP answer is checked before its body is used (DESIGN promise 7).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from upparat import verify
from upparat.ipc import fetcher_protocol as fp

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_MESSAGE = 1024
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
S3_ERROR_RE = re.compile(r"<Code>([^<]{1,100})</Code>\s*<Message>([^<]{0,300})</Message>")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
TRANSIENT_STATUS = {408, 429}  # plus every 5xx


def clean_message(text: str) -> str:
    """A message for a person in FetchStatus: no control characters, <= 1024 chars."""
    text = CONTROL_RE.sub(" ", text).strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def describe_url(url: str) -> str:
    """Host and path only: a presigned URL's query is a credential."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class Limits:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_failures_in_a_row: int = 5  # attempts that brought no new byte
    max_attempts: int = 30  # in total, progress or not
    backoff_s: float = 1.0  # doubles after each failure in a row
    backoff_max_s: float = 30.0


class Job:
    """What the fetcher knows about one job; shared by the socket loop and
    the download thread, so every field is read and written under ``lock``."""

    def __init__(self, request: fp.Fetch):
        self.job_id = request.job_id
        self.url = request.url
        self.expected = verify.Expected(request.version, request.sha256, request.size, request.signature)
        self.lock = threading.Lock()
        self.cancel = threading.Event()  # CancelFetch: stop and delete the files
        self.state = fp.RUNNING
        self.failure: str | None = None
        self.message = "download starting"
        self.bytes_done = 0
        self.bytes_total: int | None = request.size

    def status(self, seq: int) -> fp.FetchStatus:
        with self.lock:
            return fp.FetchStatus(job_id=self.job_id, seq=seq, state=self.state, bytes_done=self.bytes_done,
                                  bytes_total=self.bytes_total, failure=self.failure, message=self.message)

    def progress(self, bytes_done: int, bytes_total: int | None = None, message: str | None = None) -> None:
        with self.lock:
            self.bytes_done = bytes_done
            if bytes_total is not None:
                self.bytes_total = bytes_total
            if message is not None:
                self.message = clean_message(message)

    def finish(self, state: str, failure: str | None, message: str) -> None:
        """Set the terminal state once; a later finish (e.g. the thread
        noticing a cancel that the socket loop already recorded) is ignored."""
        with self.lock:
            if self.state != fp.RUNNING:
                return
            self.state, self.failure, self.message = state, failure, clean_message(message)
        log.info("job %s: %s%s: %s", self.job_id, state, f" ({failure})" if failure else "", self.message)

    def cancelled(self, message: str) -> None:
        """Cancelled, from any state; the download thread's own finish() is then ignored."""
        with self.lock:
            self.state, self.failure, self.message = fp.CANCELLED, None, clean_message(message)
        log.info("job %s: cancelled", self.job_id)

    @property
    def running(self) -> bool:
        with self.lock:
            return self.state == fp.RUNNING


class Failed(Exception):
    def __init__(self, failure: str, message: str, keep_part: bool = False):
        super().__init__(message)
        self.failure = failure
        self.message = message
        self.keep_part = keep_part


class Stopped(Exception):
    """Cancelled (delete the files) or shutting down (keep the .part)."""


class Transient(Exception):
    """Worth another attempt, resuming where the .part ends."""


class Download:
    def __init__(self, job: Job, directory: Path, keys: list, require_signature: bool,
                 shutdown: threading.Event, limits: Limits = Limits(), session: requests.Session | None = None):
        self.job = job
        self.directory = Path(directory)
        self.part = self.directory / f"{job.job_id}.part"
        self.final = self.directory / job.job_id
        self.keys = keys
        self.require_signature = require_signature
        self.shutdown = shutdown
        self.limits = limits
        self.session = session or requests.Session()
        self.session.max_redirects = 5
        self._fd = -1
        self._hash = hashlib.sha256()
        self._offset = 0

    # -- the whole job -----------------------------------------------------
    def run(self) -> None:
        job = self.job
        try:
            if self._already_done():
                return
            self._open_part()
            self._download()
            self._verify_and_publish()
        except Stopped:
            if job.cancel.is_set():
                self._delete(self.part, self.final)
                job.finish(fp.CANCELLED, None, "download cancelled")
            else:
                log.info("job %s: stopping; %d bytes kept for resuming", job.job_id, self._offset)
        except Failed as exc:
            if not exc.keep_part:
                self._delete(self.part)
            job.finish(fp.FAILED, exc.failure, exc.message)
        except Exception as exc:  # our own bug: report it on the job, then let it show in the log
            log.exception("job %s: unexpected error", job.job_id)
            job.finish(fp.FAILED, "download_failed", f"internal error in the fetcher: {type(exc).__name__}: {exc}")
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self.session.close()

    def _check_stop(self) -> None:
        if self.job.cancel.is_set() or self.shutdown.is_set():
            raise Stopped()

    def _delete(self, *paths: Path) -> None:
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("job %s: cannot delete %s: %s", self.job.job_id, path, exc)

    # -- a finished file from before a restart -----------------------------
    def _already_done(self) -> bool:
        try:
            fd = os.open(self.final, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise Failed("download_failed", f"cannot open {self.final.name} in the download directory: {exc}")
        try:
            sha256, size = verify.hash_fd(fd)
        finally:
            os.close(fd)
        reason = verify.check(self.job.expected, sha256, size, self.keys, self.require_signature)
        if reason is not None:
            log.info("job %s: discarding an earlier file that does not match: %s", self.job.job_id, reason)
            self._delete(self.final)
            return False
        self.job.progress(size, size)
        self.job.finish(fp.DONE, None, f"downloaded and verified ({size} bytes, found from an earlier run)")
        return True

    # -- the .part file ----------------------------------------------------
    def _open_part(self) -> None:
        try:
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise Failed("download_failed", f"cannot write to the download directory: {exc}")
        existing = os.fstat(self._fd).st_size
        size = self.job.expected.size
        if existing and size is not None and existing > size:
            log.info("job %s: .part is larger than the job's size; starting again", self.job.job_id)
            existing = 0
        self._restart_from_zero() if not existing else self._rehash(existing)

    def _rehash(self, length: int) -> None:
        """Hash the bytes an earlier attempt wrote, so resuming hashes the whole file."""
        offset = 0
        while offset < length:
            self._check_stop()
            chunk = os.pread(self._fd, min(CHUNK, length - offset), offset)
            if not chunk:
                break
            self._hash.update(chunk)
            offset += len(chunk)
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._offset = offset
        self.job.progress(offset)
        log.info("job %s: resuming after %d bytes", self.job.job_id, offset)

    def _restart_from_zero(self) -> None:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self._offset = 0
        self.job.progress(0)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Failed("insufficient_disk_space",
                             f"the disk filled up after {self._offset} bytes; free space in the download directory")
            raise Failed("download_failed", f"cannot write the download: {exc}")
        self._hash.update(data)
        self._offset += len(data)

    def _check_disk_space(self, remaining: int) -> None:
        stat = os.statvfs(self.directory)
        free = stat.f_bavail * stat.f_frsize
        if free < remaining:
            raise Failed("insufficient_disk_space",
                         f"{remaining} more bytes are needed but only {free} are free in the download directory")

    # -- HTTP --------------------------------------------------------------
    def _download(self) -> None:
        failures_in_a_row = 0
        attempts = 0
        restarted_after_416 = False
        size = self.job.expected.size
        while True:
            self._check_stop()
            if size is not None:
                self._check_disk_space(size - self._offset)
            attempts += 1
            before = self._offset
            try:
                outcome = self._attempt(restarted_after_416)
            except Transient as exc:
                reason = str(exc)
                failures_in_a_row = 0 if self._offset > before else failures_in_a_row + 1
                if failures_in_a_row >= self.limits.max_failures_in_a_row or attempts >= self.limits.max_attempts:
                    raise Failed("download_failed", f"gave up after {attempts} attempts: {reason}", keep_part=True)
                delay = min(self.limits.backoff_s * 2 ** max(failures_in_a_row - 1, 0), self.limits.backoff_max_s)
                log.warning("job %s: attempt %d failed (%s); again in %.1fs, resuming after %d bytes",
                            self.job.job_id, attempts, reason, delay, self._offset)
                self.job.progress(self._offset, message=f"retrying: {reason}")
                if self.job.cancel.wait(delay) or self.shutdown.is_set():
                    raise Stopped()
                continue
            if outcome == "restart":
                restarted_after_416 = True
                continue
            return

    def _attempt(self, restarted_after_416: bool) -> str | None:
        """One HTTP request. Returns None when the body is complete, "restart"
        to ask again from zero; raises Transient, Failed or Stopped."""
        offset = self._offset
        size = self.job.expected.size
        headers = {"Accept-Encoding": "identity"}  # byte ranges must mean file bytes
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = self.session.get(self.job.url, headers=headers, stream=True,
                                        timeout=(self.limits.connect_timeout_s, self.limits.read_timeout_s))
        except requests.RequestException as exc:
            raise Transient(f"cannot reach {describe_url(self.job.url)}: {type(exc).__name__}") from None
        with response:
            status = response.status_code
            if status == 403:
                raise Failed("url_expired",
                             f"the server refused the download URL (HTTP 403{self._s3_error(response)}); "
                             f"it has probably expired: ask for a fresh URL ({offset} bytes kept for resuming)",
                             keep_part=True)
            if status == 416:
                if size is not None and offset == size:
                    return None  # we already have every byte: verify
                if restarted_after_416:
                    raise Failed("download_failed", "the server answered 416 (range not satisfiable) "
                                 "even when asked from the start")
                log.info("job %s: 416 for a resume at %d; starting again from zero", self.job.job_id, offset)
                self._restart_from_zero()
                return "restart"
            if status >= 500 or status in TRANSIENT_STATUS:
                raise Transient(f"HTTP {status}{self._s3_error(response)}")
            if status >= 400:
                raise Failed("download_failed",
                             f"the server answered HTTP {status}{self._s3_error(response)} for "
                             f"{describe_url(self.job.url)}", keep_part=True)
            if status == 206:
                expected_length = self._accept_partial(response, offset)
                if expected_length is None:  # a range we did not ask for: start again
                    self._restart_from_zero()
                    raise Transient("the server sent a different byte range than asked for")
            elif status == 200:
                if offset > 0:
                    log.info("job %s: the server ignored the range request; starting again from zero",
                             self.job.job_id)
                    self._restart_from_zero()
                expected_length = self._content_length(response)
                if expected_length is not None:
                    total = expected_length
                    if size is not None and total > size:
                        raise Failed("file_too_large",
                                     f"the server announces {total} bytes, the job document says {size}")
                    self.job.progress(0, total if size is None else None)
            else:
                raise Failed("download_failed", f"unexpected HTTP {status} from {describe_url(self.job.url)}")

            if expected_length is not None:
                self._check_disk_space(expected_length)
            self._read_body(response, expected_length)
        return None

    def _accept_partial(self, response, offset: int) -> int | None:
        """Length of a 206 body that continues exactly at ``offset``; None if it does not."""
        match = CONTENT_RANGE_RE.match(response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset or int(match.group(2)) < offset:
            log.warning("job %s: 206 with Content-Range %r does not start at %d", self.job.job_id,
                        response.headers.get("Content-Range"), offset)
            return None
        length = int(match.group(2)) - offset + 1
        size = self.job.expected.size
        if match.group(3) != "*":
            total = int(match.group(3))
            if int(match.group(2)) != total - 1:  # we asked for everything up to the end
                return None
            if size is not None and total > size:
                raise Failed("file_too_large", f"the server has {total} bytes, the job document says {size}")
            if size is None:
                self.job.progress(offset, total)
        content_length = self._content_length(response)
        if content_length is not None and content_length != length:
            return None
        return length

    @staticmethod
    def _content_length(response) -> int | None:
        value = response.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    def _read_body(self, response, expected_length: int | None) -> None:
        size = self.job.expected.size
        received = 0
        try:
            for chunk in response.raw.stream(CHUNK, decode_content=False):
                self._check_stop()
                if size is not None and self._offset + len(chunk) > size:
                    raise Failed("file_too_large",
                                 f"the server sent more than the {size} bytes the job document says")
                self._write(chunk)
                received += len(chunk)
                self.job.progress(self._offset)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise Transient(f"connection lost after {self._offset} bytes ({type(exc).__name__})") from None
        if expected_length is not None and received < expected_length:
            raise Transient(f"the body ended after {received} of {expected_length} bytes")

    @staticmethod
    def _s3_error(response) -> str:
        """`` Code: Message`` from an S3 XML error body, if there is one."""
        try:
            body = response.raw.read(4096, decode_content=False) or b""
        except (urllib3.exceptions.HTTPError, OSError):
            return ""
        match = S3_ERROR_RE.search(body.decode("utf-8", "replace"))
        return f" {match.group(1)}: {match.group(2)}" if match else ""

    # -- the end -----------------------------------------------------------
    def _verify_and_publish(self) -> None:
        job = self.job
        self._check_stop()
        sha256, size = self._hash.hexdigest(), self._offset
        if job.expected.size is not None and size != job.expected.size:
            raise Failed("verification_failed", f"size is {size} bytes, the job document says {job.expected.size}")
        reason = verify.check(job.expected, sha256, size, self.keys, self.require_signature)
        if reason is not None:
            raise Failed("verification_failed", f"the downloaded file does not match: {reason}")
        os.fchmod(self._fd, 0o640)
        os.fsync(self._fd)
        with job.lock:  # a CancelFetch either comes before the rename or deletes the result
            if job.cancel.is_set():
                raise Stopped()
            os.rename(self.part, self.final)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        job.progress(size, size)
        job.finish(fp.DONE, None, f"downloaded and verified ({size} bytes)")
