"""One download: streamed, hashed while written, resumable, bounded, verified.

``Download.run()`` runs in the fetcher's download thread. It owns the
partial file's descriptor, the HTTP connection and the resume record, and
reports through its own fields (read by the socket loop with ``progress()``
and, once ``run`` returned, ``outcome``) and a ``notify`` callback that wakes
the socket loop: at once for a state change, at most once per
PROGRESS_PUSH_S for progress. It never deletes a file it did not finish:
the socket loop decides, once the thread has ended, what to keep (fetcher.py).

Every HTTP answer is untrusted (promise 7, docs/contracts.md): a 200 answer to a range
request restarts from zero instead of appending; a 206 is used only when its
Content-Range continues exactly where the partial file ends; a body shorter
than announced is resumed; a body longer than the release's size, or than
``[service] max_file_size`` when nothing announced a size, is stopped
(``file_too_large``); size and sha256 are checked before ``done``. No
exception caused by the peer leaves ``run``; our own bugs are logged with
their traceback and fail the download with a message.

A watch thread beside the download enforces time: the low-speed abort
(``[service] low_speed_limit``/``low_speed_time``, curl's semantics) and the
overall ``[service] download_timeout``. It stops a blocked read by shutting
the connection's socket down, which is also how a cancel stops at once.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
import urllib3

from upparat import verify
from upparat.config import ServiceConfig
from upparat.ipc import fetcher_protocol as fp, handoff
from upparat.release import Release

from . import resume
from .speed import BackgroundHash, LowSpeed, Pace, RateMeter

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024  # large reads; at most this much of the body is in memory at once
CHECKPOINT_S = 1.0  # fsync + resume record at most this often while streaming
CONTENT_RANGE_RE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")
UNSATISFIED_RANGE_RE = re.compile(r"bytes \*/(\d{1,19})")
S3_ERROR_RE = re.compile(r"<Code>([^<]{1,100})</Code>\s*<Message>([^<]{0,300})</Message>")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
TRANSIENT_STATUS = {408, 429}  # plus every 5xx
RESTARTABLE = ("download_failed", "url_expired")  # the partial file and record are kept for resuming

# Why a download stops before it ends by itself.
CANCEL = "cancel"
SHUTDOWN = "shutdown"
DEADLINE = "deadline"


def clean_message(text: str) -> str:
    """A message for a person: no control characters, at most fp.MAX_MESSAGE characters."""
    text = CONTROL_RE.sub(" ", text).strip()
    return text if len(text) <= fp.MAX_MESSAGE else text[: fp.MAX_MESSAGE - 3] + "..."


def describe_url(url: str) -> str:
    """Host and path only: a presigned URL's query is a credential."""
    return resume.url_identity(url)


def mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Limits:
    max_file_size: int
    download_timeout: float
    low_speed_limit: int
    low_speed_time: float
    rate_limit: int
    connect_timeout: float = 10.0
    no_progress_timeout: float = 60.0  # socket timeout when the low-speed abort is off
    max_failures_in_a_row: int = 5  # attempts that brought no new byte
    max_attempts: int = 30  # in total, progress or not
    backoff_s: float = 1.0  # doubles after each failure in a row
    backoff_max_s: float = 30.0

    @classmethod
    def from_config(cls, service: ServiceConfig) -> "Limits":
        return cls(max_file_size=service.max_file_size, download_timeout=service.download_timeout,
                   low_speed_limit=service.low_speed_limit, low_speed_time=service.low_speed_time,
                   rate_limit=service.download_rate_limit)

    @property
    def read_timeout(self) -> float:
        """The socket's own timeout: a backstop behind the watch thread, which
        normally aborts a stalled body first; it also bounds the wait for headers."""
        if self.low_speed_limit > 0:
            return self.low_speed_time + 5.0
        return self.no_progress_timeout

    @property
    def watch_tick(self) -> float:
        return max(0.05, min(0.5, self.low_speed_time / 8))


@dataclass(frozen=True)
class Outcome:
    state: str  # fp.DONE, fp.FAILED, or fp.CANCELLED (stopped by cancel or shutdown)
    failure: str | None
    message: str


class Failed(Exception):
    def __init__(self, failure: str, message: str):
        super().__init__(message)
        self.failure = failure
        self.message = message


class Transient(Exception):
    """This attempt failed; another attempt may resume where the partial file ends."""


class Stopped(Exception):
    """Cancelled or shut down: stop now; the socket loop decides about the files."""


class Restart(Exception):
    """Ask again from zero (the partial file was truncated)."""


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int | None
    rate: int
    message: str


class Download:
    def __init__(self, job_id: str, execution: int, url: str, release: Release, download_dir: Path,
                 state_dir: Path, limits: Limits, notify: Callable[[], None] = lambda: None,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.monotonic,
                 staging_dir: Path | None = None):
        self.job_id = job_id
        self.execution = execution
        self.release = release
        self.download_dir = Path(download_dir)
        self.state_dir = Path(state_dir)
        self.staging_dir = Path(staging_dir) if staging_dir is not None else None
        self.part = self.download_dir / handoff.part_name(job_id, execution)
        self.final = self.download_dir / handoff.final_name(job_id, execution)
        self.limits = limits
        self._notify = notify
        self._session = session
        self._clock = clock
        self.outcome: Outcome | None = None

        self._lock = threading.Lock()  # guards what the socket loop and the watch thread touch
        self._url = url
        self._stop_reason: str | None = None
        self._stalled: str | None = None  # why the watch thread cut the current attempt
        self._sock: socket.socket | None = None  # the current body's connection
        self._wake = threading.Event()  # ends a backoff wait early
        self._done_watching = threading.Event()
        self._streaming = False
        self._message = "download starting"

        self._fd = -1
        self._hash: BackgroundHash | None = None  # made by run(); its thread ends with it
        self._offset = 0  # bytes in the partial file, all given to the hash
        self._received = 0  # body bytes this process received (for the low-speed window and rate)
        self._total: int | None = release.size
        self._etag: str | None = None
        self._synced = 0  # offset of the last checkpoint
        self._last_checkpoint = 0.0
        self._started = clock()
        self._low_speed = LowSpeed(limits.low_speed_limit, limits.low_speed_time)
        self._meter = RateMeter()
        self._pace = Pace(limits.rate_limit)

    # -- what the socket loop sees ----------------------------------------------
    @property
    def url(self) -> str:
        with self._lock:
            return self._url

    def use_url(self, url: str) -> None:
        """A refreshed presigned URL: used from the next attempt on."""
        with self._lock:
            self._url = url

    def progress(self) -> Progress:
        with self._lock:
            return Progress(self._offset, self._total, self._meter.rate() if self._streaming else 0, self._message)

    def stop(self, reason: str) -> None:
        """Stop as soon as possible (CANCEL or SHUTDOWN); a blocked read ends at once."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        self._wake.set()
        self._cut_connection()

    # -- the thread ---------------------------------------------------------------
    def run(self) -> None:
        watch = threading.Thread(target=self._watch, name=f"watch-{self.job_id}", daemon=True)
        watch.start()
        self._hash = BackgroundHash()
        try:
            self.outcome = self._run()
        except Exception as exc:  # our own bug: in the log with its traceback, and on the job
            log.exception("job %s: unexpected error in the download", self.job_id)
            self.outcome = Outcome(fp.FAILED, "download_failed",
                                   clean_message(f"internal error in the fetcher: {type(exc).__name__}: {exc}"))
        finally:
            self._close_fd()
            self._hash.close()
            self._done_watching.set()
            watch.join()
            if self._session is not None:
                self._session.close()
        self._notify()

    def _run(self) -> Outcome:
        try:
            found = self._already_done()
            if found is not None:
                return found
            self._open_part()
            self._download()
            return self._publish()
        except Stopped:
            if self._stop_reason == SHUTDOWN:
                self._checkpoint(quiet=True)
                log.info("job %s: stopping; %d bytes kept for resuming", self.job_id, self._synced)
            return Outcome(fp.CANCELLED, None, "download stopped")
        except Failed as exc:
            if exc.failure in RESTARTABLE:
                self._checkpoint(quiet=True)
            log.warning("job %s: %s: %s", self.job_id, exc.failure, exc.message)
            return Outcome(fp.FAILED, exc.failure, clean_message(exc.message))

    def _set_message(self, message: str) -> None:
        with self._lock:
            self._message = clean_message(message)

    def _check_stop(self) -> None:
        reason = self._stop_reason
        if reason == DEADLINE:
            raise Failed("download_failed", self._deadline_message())
        if reason is not None:
            raise Stopped()

    def _deadline_message(self) -> str:
        total = f" of {self._total}" if self._total is not None else ""
        return (f"the download did not finish within [service] download_timeout = {self.limits.download_timeout:g}"
                f" s ({self._offset}{total} bytes; the partial file is kept for resuming)")

    # -- the watch thread -----------------------------------------------------------
    def _watch(self) -> None:
        deadline = self._started + self.limits.download_timeout
        last_notified = (self._clock(), -1)
        while not self._done_watching.wait(self.limits.watch_tick):
            now = self._clock()
            received = self._received
            with self._lock:
                self._meter.add(now, received)
                stalled = self._streaming and self._low_speed.stalled(now, received)
            if now >= deadline and self._stop_reason is None:
                with self._lock:
                    self._stop_reason = DEADLINE
                self._wake.set()
                self._cut_connection()
            elif stalled:
                why = (f"the transfer stalled: less than {self.limits.low_speed_limit} bytes/s for "
                       f"{self.limits.low_speed_time:g} s ([service] low_speed_limit, low_speed_time)")
                with self._lock:
                    self._stalled = why
                    self._streaming = False
                self._cut_connection()
            if now - last_notified[0] >= fp.PROGRESS_PUSH_S and self._offset != last_notified[1]:
                last_notified = (now, self._offset)
                self._notify()

    def _cut_connection(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                # The base class's shutdown: for TLS too, only the socket is shut (another thread reads it).
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    # -- files --------------------------------------------------------------------
    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _disk_failure(self, exc: OSError, doing: str) -> Failed:
        where = self.download_dir
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = disk_free(where)
            return Failed("insufficient_disk_space",
                          f"the disk of {where} filled up while {doing} ({self._offset} bytes written"
                          + (f", {mib(free)} free now" if free is not None else "") + "); free space there")
        if exc.errno == errno.EROFS:
            return Failed("download_failed", f"cannot write the download: {where} is on a read-only file system "
                                             f"(while {doing})")
        return Failed("download_failed", f"cannot write the download in {where} while {doing}: "
                                         f"{exc.strerror or exc}")

    def _already_done(self) -> Outcome | None:
        """A verified file from before a restart: verified again, not downloaded again."""
        try:
            fd = os.open(self.final, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._disk_failure(exc, f"opening {self.final.name}") from None
        try:
            sha256, size = verify.hash_fd(fd)
        except OSError as exc:
            raise self._disk_failure(exc, f"reading {self.final.name}") from None
        finally:
            os.close(fd)
        reason = verify.bytes_failure(self.release, sha256, size) if self.release.sha256 else "no sha256 to check"
        if reason is not None:
            log.info("job %s: an earlier finished file does not match (%s); downloading again", self.job_id, reason)
            try:
                os.unlink(self.final)
            except OSError as exc:
                raise self._disk_failure(exc, f"deleting {self.final.name}") from None
            return None
        with self._lock:
            self._offset, self._total = size, size
        resume.remove_record(self.state_dir, self.job_id, self.execution)
        return Outcome(fp.DONE, None, f"downloaded and verified ({size} bytes, found from an earlier run)")

    def _open_part(self) -> None:
        try:
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            length = os.fstat(self._fd).st_size
        except OSError as exc:
            raise self._disk_failure(exc, "creating the partial file") from None
        record = resume.load(self.state_dir, self.job_id, self.execution)
        if record is not None and not record.matches(self.job_id, self.execution, self.url, self.release):
            log.info("job %s: the resume record is for another URL or release; starting over", self.job_id)
            record = None
        if record is not None and record.etag is None and self.release.sha256 is None:
            log.info("job %s: nothing could tell a changed object (no ETag, no sha256); starting over", self.job_id)
            record = None
        if record is not None and length < record.offset:
            log.warning("job %s: the partial file is shorter than its record says; starting over", self.job_id)
            record = None
        if record is None or record.offset == 0:
            self._truncate(0)
            return
        # Only the checkpointed bytes are trusted: after a power loss, what follows may be garbage.
        self._truncate(record.offset)
        self._set_message(f"checking the {record.offset} bytes downloaded earlier")
        digest = hashlib.sha256()
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        done = 0
        while done < record.offset:
            self._check_stop()
            try:
                n = os.preadv(self._fd, [view[: min(READ_SIZE, record.offset - done)]], done)
            except OSError as exc:
                raise self._disk_failure(exc, "reading the partial file") from None
            if n <= 0:
                break
            digest.update(view[:n])
            done += n
        if done != record.offset or digest.hexdigest() != record.prefix_sha256:
            log.warning("job %s: the partial file does not match its record; starting over", self.job_id)
            self._truncate(0)
            return
        self._hash.reset(digest)
        with self._lock:
            self._offset = self._synced = done
            self._etag = record.etag
            if self._total is None:
                self._total = record.total
        log.info("job %s: resuming after %d bytes", self.job_id, done)

    def _truncate(self, offset: int) -> None:
        try:
            os.ftruncate(self._fd, offset)
        except OSError as exc:
            raise self._disk_failure(exc, "truncating the partial file") from None
        if offset == 0:
            self._hash.reset()
            with self._lock:
                self._offset = self._synced = 0
                self._etag = None
                self._total = self.release.size

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        offset = self._offset
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise self._disk_failure(exc, "writing") from None

    def _checkpoint(self, quiet: bool = False) -> None:
        """fsync the partial file, then record how far it is good. Not a
        reason to fail the download when only the record cannot be written."""
        if self._fd < 0 or self._offset == self._synced:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if quiet:
                log.warning("job %s: cannot fsync the partial file: %s", self.job_id, exc.strerror)
                return
            raise self._disk_failure(exc, "syncing the partial file") from None
        record = resume.Record(
            job_id=self.job_id, execution=self.execution, url=resume.url_identity(self.url), etag=self._etag,
            version=self.release.version, sha256=self.release.sha256, size=self.release.size,
            offset=self._offset, prefix_sha256=self._hash.copy().hexdigest(), total=self._total)
        try:
            resume.save(self.state_dir, record)
        except OSError as exc:
            log.warning("job %s: cannot write the resume record in %s (%s); a restart starts this download over",
                        self.job_id, self.state_dir, exc.strerror)
        self._synced = self._offset
        self._last_checkpoint = self._clock()

    # -- disk space -----------------------------------------------------------------
    def _check_space(self, total: int) -> None:
        """Before the first byte of a body is written: room for the rest of it?"""
        needed = total - self._offset
        free = disk_free(self.download_dir)
        if free is not None and free < needed:
            raise Failed("insufficient_disk_space",
                         f"the download needs {needed} more bytes ({mib(needed)}) in {self.download_dir}, "
                         f"but only {free} bytes ({mib(free)}) are free there")
        staging_free = self._staging_free_elsewhere()
        if staging_free is not None and staging_free < total:
            raise Failed("insufficient_disk_space",
                         f"the installer will need {total} bytes ({mib(total)}) in {self.staging_dir}, another file "
                         f"system than the downloads (so it copies), but only {staging_free} bytes "
                         f"({mib(staging_free)}) are free there")

    def _staging_free_elsewhere(self) -> int | None:
        """Free bytes (for root) of the staging file system when it is not the
        download's: the installer then copies instead of taking the file over.
        None when it is the same, or cannot be seen from here (only metadata is read)."""
        if self.staging_dir is None:
            return None
        try:
            if os.stat(self.staging_dir).st_dev == os.stat(self.download_dir).st_dev:
                return None
            st = os.statvfs(self.staging_dir)
        except OSError:
            return None
        return st.f_bfree * st.f_frsize

    # -- HTTP -------------------------------------------------------------------------
    def _download(self) -> None:
        size = self.release.size
        if size is not None:
            self._check_space(size)
            if self._offset == size:
                return  # a complete partial file from before a restart: verified by _publish
        failures_in_a_row = 0
        attempts = 0
        restarts = 0
        session = self._session = self._session or new_session()
        while True:
            self._check_stop()
            attempts += 1
            before = self._offset
            try:
                self._attempt(session)
                return
            except _Complete:
                return
            except Restart as exc:
                restarts += 1
                if restarts > 3:
                    raise Failed("download_failed", f"gave up: {exc}") from None
                log.info("job %s: %s; asking again from zero", self.job_id, exc)
                continue
            except Transient as exc:
                reason = str(exc)
            finally:
                with self._lock:
                    self._sock = None
                    self._streaming = False
                    self._stalled = None
            self._check_stop()
            self._checkpoint(quiet=True)
            failures_in_a_row = 0 if self._offset > before else failures_in_a_row + 1
            if failures_in_a_row >= self.limits.max_failures_in_a_row or attempts >= self.limits.max_attempts:
                raise Failed("download_failed", f"gave up after {attempts} attempts: {reason} "
                                                f"({self._offset} bytes kept for resuming)")
            delay = min(self.limits.backoff_s * 2 ** max(failures_in_a_row - 1, 0), self.limits.backoff_max_s)
            log.warning("job %s: attempt %d failed (%s); again in %.1fs, from byte %d", self.job_id, attempts,
                        reason, delay, self._offset)
            self._set_message(f"retrying: {reason}")
            self._wake.wait(delay)

    def _attempt(self, session: requests.Session) -> None:
        """One HTTP request. Returns when the body is complete; raises
        Transient, Restart, Failed or Stopped."""
        offset = self._offset
        url = self.url
        headers = {"Accept-Encoding": "identity"}  # byte ranges and hashes are of the file's own bytes
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            if self._etag is not None:
                headers["If-Range"] = self._etag  # a changed object comes whole (200), never appended
        # Until the headers are in there is no socket to cut: the timeouts alone
        # bound that wait, so they end at the deadline too.
        left = max(0.1, self._started + self.limits.download_timeout - self._clock())
        timeout = (min(self.limits.connect_timeout, left), min(self.limits.read_timeout, left))
        try:
            response = session.get(url, headers=headers, stream=True, timeout=timeout)
        except requests.RequestException as exc:
            self._check_stop()
            raise Transient(f"cannot reach {describe_url(url)}: {type(exc).__name__}") from None
        with response:
            self._check_stop()
            expected = self._check_answer(response, offset)
            self._read_body(response, expected)

    def _check_answer(self, response: requests.Response, offset: int) -> int | None:
        """Decide what a response's body is; returns its announced length (None: unknown)."""
        status = response.status_code
        size = self.release.size
        if status == 403:
            raise Failed("url_expired", f"the server refused the download URL (HTTP 403{s3_error(response)}); "
                                        f"it has probably expired: ask for a fresh URL")
        if status == 416:
            self._range_not_satisfiable(response, offset)
        if status >= 500 or status in TRANSIENT_STATUS:
            raise Transient(f"HTTP {status}{s3_error(response)}")
        if status >= 400:
            raise Failed("download_failed", f"the server answered HTTP {status}{s3_error(response)} for "
                                            f"{describe_url(response.url or self.url)}")
        if status not in (200, 206):
            raise Failed("download_failed", f"unexpected HTTP {status} from {describe_url(self.url)}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise Failed("download_failed", f"the server compressed the file (Content-Encoding {encoding[:40]}) "
                                            "although asked for its own bytes")
        etag = resume.strong_etag(response.headers.get("ETag"))
        length = content_length(response)
        if status == 206:
            if offset == 0:
                raise Restart("a 206 answer to a request without Range")
            if etag is not None and self._etag is not None and etag != self._etag:
                self._truncate(0)
                raise Restart("the object's ETag changed, and the server sent only part of it")
            total = self._partial_content(response, offset, length)
            etag = etag or self._etag
        else:
            if offset > 0:
                log.info("job %s: HTTP 200 to a request from byte %d (%s); starting again from zero",
                         self.job_id, offset, "the object changed" if self._etag and etag != self._etag
                         else "the server ignored the range")
                self._truncate(0)
                offset = 0
            total = length
        self._etag = etag
        if total is not None:
            if size is not None and total > size:
                raise Failed("file_too_large", f"the server has {total} bytes, the job document says {size}")
            if size is not None and total < size:
                raise Failed("verification_failed", f"the server has {total} bytes, the job document says {size}")
            if size is None and total > self.limits.max_file_size:
                raise Failed("file_too_large", f"the server announces {total} bytes, more than [service] "
                                               f"max_file_size ({self.limits.max_file_size})")
            with self._lock:
                self._total = total
            self._check_space(total)
        return None if length is None else length

    def _partial_content(self, response: requests.Response, offset: int, length: int | None) -> int | None:
        """The object's size from a 206 that continues exactly at ``offset``."""
        header = response.headers.get("Content-Range", "").strip()
        match = CONTENT_RANGE_RE.fullmatch(header)
        if not match:
            raise Transient(f"a 206 answer without a usable Content-Range ({header[:80]!r})")
        first, last = int(match.group(1)), int(match.group(2))
        total = None if match.group(3) == "*" else int(match.group(3))
        if first != offset or last < first or (total is not None and last != total - 1):
            self._truncate(0)
            raise Restart(f"the server sent bytes {first}-{last} when asked for {offset}- ")
        if length is not None and length != last - first + 1:
            raise Transient(f"Content-Length {length} does not match Content-Range {header[:80]}")
        return total

    def _range_not_satisfiable(self, response: requests.Response, offset: int) -> None:
        """416: complete only if the server's size is where the partial file
        ends, and then only if size and hash match (_publish checks)."""
        match = UNSATISFIED_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
        total = int(match.group(1)) if match else None
        if offset > 0 and total == offset and (self.release.size is None or self.release.size == total):
            sha256 = self._hash.copy().hexdigest()
            if verify.bytes_failure(self.release, sha256, offset) is None and self.release.sha256 is not None:
                with self._lock:
                    self._total = total
                raise _Complete()
        self._truncate(0)
        raise Restart(f"HTTP 416 for a request from byte {offset} (the server has "
                      f"{'an unknown number of' if total is None else total} bytes)")

    def _read_body(self, response: requests.Response, expected: int | None) -> None:
        raw = response.raw
        limit = self.release.size if self.release.size is not None else self.limits.max_file_size
        read_size = self._pace.read_size(READ_SIZE)
        received = 0
        now = self._clock()
        connection = getattr(raw, "connection", None)
        with self._lock:
            self._sock = getattr(connection, "sock", None)
            self._streaming = True
            self._low_speed.start(now, self._received)
            self._message = "downloading"
        self._pace.start(now, self._received)
        self._last_checkpoint = now
        self._notify()  # bytes_total may be known now
        while True:
            try:
                chunk = raw.read1(read_size, decode_content=False)
            except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                    OSError) as exc:
                raise self._lost(f"the connection broke after {received} bytes of this answer "
                                 f"({type(exc).__name__})") from None
            if not chunk:
                break
            if self._stop_reason is not None:  # also when the socket could not be cut
                self._check_stop()
            n = len(chunk)
            if self._offset + n > limit:
                self._check_stop()
                if self.release.size is not None:
                    raise Failed("file_too_large", f"the server sent more than the {limit} bytes the job "
                                                   "document says")
                raise Failed("file_too_large", f"the server sent more than [service] max_file_size ({limit} bytes) "
                                               "and announced no size")
            self._write(chunk)
            self._hash.update(chunk)
            received += n
            with self._lock:
                self._offset += n
            self._received += n
            now = self._clock()
            if self._pace.rate:
                delay = self._pace.delay(now, self._received)
                if delay > 0 and self._wake.wait(delay):
                    self._check_stop()
            if now - self._last_checkpoint >= CHECKPOINT_S:
                self._checkpoint()
        self._check_stop()
        if self._stalled:
            raise Transient(self._stalled)
        if expected is not None and received < expected:
            raise Transient(f"the body ended after {received} of {expected} bytes")
        if expected is None and self.release.size is not None and self._offset < self.release.size:
            raise Transient(f"the body ended after {self._offset} of {self.release.size} bytes")

    def _lost(self, what: str) -> Exception:
        self._check_stop()
        if self._stalled:
            return Transient(self._stalled)
        return Transient(what)

    # -- the end ----------------------------------------------------------------------
    def _publish(self) -> Outcome:
        """Verify, then hand over under the final name (upparat.ipc.handoff)."""
        self._check_stop()
        sha256, size = self._hash.hexdigest(), self._offset
        reason = verify.bytes_failure(self.release, sha256, size)
        if reason is not None:
            raise Failed("verification_failed", f"the downloaded file does not match: {reason}")
        # No fsync here: the installer writes the bytes to disk while it hashes
        # them (upparat.ipc.handoff). After a power cut, a finished file is
        # verified again before it is reported (_already_done).
        self._close_fd()  # the installer proves that no writer remains
        self._check_stop()
        try:
            os.rename(self.part, self.final)
            resume.fsync_dir(self.download_dir)
        except OSError as exc:
            raise self._disk_failure(exc, "renaming the finished file") from None
        problem = resume.remove_record(self.state_dir, self.job_id, self.execution)
        if problem:
            log.warning("job %s: %s", self.job_id, problem)
        with self._lock:
            self._total = size
        log.info("job %s: downloaded and verified %d bytes", self.job_id, size)
        return Outcome(fp.DONE, None, f"downloaded and verified ({size} bytes)")


class _Complete(Exception):
    """A 416 proved the partial file complete."""


def new_session() -> requests.Session:
    session = requests.Session()  # proxies from HTTP(S)_PROXY / NO_PROXY: requests' trust_env
    session.max_redirects = 5
    return session


def disk_free(directory: Path) -> int | None:
    """Bytes an unprivileged user may still write there, or None if unknown."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None or not value.strip().isdigit() or len(value.strip()) > 19:
        return None
    return int(value.strip())


def s3_error(response: requests.Response) -> str:
    """`` Code: Message`` from an S3 XML error body, if there is one (bounded read)."""
    try:
        body = response.raw.read(4096, decode_content=False) or b""
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
        return ""
    match = S3_ERROR_RE.search(body.decode("utf-8", "replace"))
    return f" {match.group(1)}: {match.group(2)}" if match else ""
