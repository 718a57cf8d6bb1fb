"""Staging: the installer's own copy of a job's file, verified where it lies.

``stage`` copies ``<download_dir>/<job_id>`` (the path is built here from the
checked job_id, never taken from a message) into the root-only staging
directory, hashes *the copy* and checks it against the job's expectations with
the installer's own verification policy and keys. Only then is it renamed to
``<staging>/<job_id>``: the one file the install hook is ever given. The
staging directory is 0700 and the file 0600, so nothing but root can change it
between verification and the end of the install hook.

Per job it records, in ``<staging>/state.json``, that the file was staged and
verified and whether its install hook finished with exit 0, so that a restart
of the installer between install and restart still permits ``restart`` and
does not permit ``install`` again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from upparat import verify
from upparat.config import Config
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import JOB_ID_RE, SHA256_RE

from .dirs import ensure_dir

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
TEMP_PREFIXES = (".stage-", ".state-")  # cannot collide with a job_id (no dots)
MAX_JOBS = 8  # staged jobs kept at once; the broker discards finished ones
SPACE_MARGIN = 1024 * 1024  # bytes left free after staging
COPY_CHUNK = 1024 * 1024


@dataclass
class StagedJob:
    version: str
    sha256: str
    size: int
    installed: bool = False


class StageFailed(Exception):
    def __init__(self, failure: str, message: str):
        super().__init__(message)
        self.failure = failure


class StagingArea:
    """The root-only staging directory and the per-job record it holds."""

    def __init__(self, cfg: Config, keys: list):
        self.path = cfg.service.staging_location
        self.download_dir = cfg.service.download_dir
        self._policy = cfg.verification
        self._keys = keys
        self._lock = threading.Lock()  # jobs are updated by hook threads too
        self._dirfd = ensure_dir(self.path, 0o700)
        self._remove_temporaries()
        self._jobs: dict[str, StagedJob] = self._load()

    def close(self) -> None:
        os.close(self._dirfd)

    # ----- the record ----------------------------------------------------
    def job(self, job_id: str) -> StagedJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def job_count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def staged_path(self, job_id: str) -> Path:
        return self.path / job_id

    def staged_file_intact(self, job_id: str) -> bool:
        """The staged file is still the regular 0600 file of the recorded size."""
        return self._intact(job_id, self.job(job_id))

    def _intact(self, job_id: str, job: StagedJob | None) -> bool:
        try:
            st = os.stat(job_id, dir_fd=self._dirfd, follow_symlinks=False)
        except OSError:
            return False
        return (job is not None and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == job.size)

    def mark_installed(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.installed = True
            try:
                self._persist()
            except OSError:
                job.installed = False  # not recorded: not permitted to restart
                raise

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._unlink(job_id)
            self._persist()

    # ----- staging -------------------------------------------------------
    def stage(self, message: ip.Stage) -> ip.StageStatus:
        job_id = message.job_id
        try:
            self.discard(job_id)  # a new attempt replaces the old copy, whatever happens
            job = self._stage(message)
            self._record(job_id, job)
        except OSError as exc:  # e.g. the state record cannot be written
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            failure = StageFailed("insufficient_disk_space" if full else "verification_failed",
                                  f"staging in {self.path} failed: {exc.strerror}")
            return self._failed(message, failure)
        except StageFailed as exc:
            return self._failed(message, exc)
        signature = "signature verified" if message.signature is not None and self._keys else "no signature checked"
        text = f"staged {job.size} bytes, sha256 {job.sha256}, {signature}"
        log.info("job %s: %s", job_id, text)
        return ip.StageStatus(job_id=job_id, seq=message.seq, state=ip.STAGED, failure=None, message=text)

    def _failed(self, message: ip.Stage, exc: StageFailed) -> ip.StageStatus:
        log.warning("stage of job %s failed (%s): %s", message.job_id, exc.failure, exc)
        return ip.StageStatus(job_id=message.job_id, seq=message.seq, state=ip.STAGE_FAILED,
                              failure=exc.failure, message=str(exc)[: ip.MAX_OUTPUT])

    def _record(self, job_id: str, job: StagedJob) -> None:
        with self._lock:
            self._jobs[job_id] = job
            try:
                self._persist()
            except OSError:
                del self._jobs[job_id]
                self._unlink(job_id)
                raise

    def _stage(self, message: ip.Stage) -> StagedJob:
        expected = verify.Expected(message.version, message.sha256, message.size, message.signature)
        # The installer's own policy counts, whatever the other side already checked.
        if expected.sha256 is None and self._policy.require_sha256:
            raise StageFailed("verification_failed", "the job document has no sha256 and [verification] "
                              "require_sha256 is on (set it to false to allow such jobs)")
        if expected.signature is None and self._policy.require_signature:
            raise StageFailed("verification_failed",
                              "the job document has no signature and [verification] require_signature is on")
        source = self._open_source(message.job_id)
        try:
            st = os.fstat(source)
            where = self.download_dir / message.job_id
            if not stat.S_ISREG(st.st_mode):
                raise StageFailed("file_missing", f"{where} is not a regular file")
            if st.st_nlink != 1:
                raise StageFailed("verification_failed", f"{where} has {st.st_nlink} hard links; expected 1")
            if expected.size is not None and st.st_size != expected.size:
                raise StageFailed("verification_failed",
                                  f"size is {st.st_size} bytes, the job document says {expected.size}")
            vfs = os.fstatvfs(self._dirfd)
            free = vfs.f_bavail * vfs.f_frsize
            if st.st_size + SPACE_MARGIN > free:
                raise StageFailed("insufficient_disk_space",
                                  f"staging needs {st.st_size} bytes but {self.path} has {free} bytes free")
            return self._copy_and_verify(message.job_id, source, st.st_size, expected)
        finally:
            os.close(source)

    def _open_source(self, job_id: str) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            dirfd = os.open(self.download_dir, flags | os.O_DIRECTORY)
        except OSError as exc:
            raise StageFailed("file_missing", f"download directory {self.download_dir}: {exc.strerror}") from None
        try:
            return os.open(job_id, flags | os.O_NONBLOCK, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StageFailed("file_missing", f"{self.download_dir / job_id} is a symlink; "
                                  "only a regular file is staged") from None
            raise StageFailed("file_missing", f"{self.download_dir / job_id}: {exc.strerror}") from None
        finally:
            os.close(dirfd)

    def _copy_and_verify(self, job_id: str, source: int, size: int, expected: verify.Expected) -> StagedJob:
        temp = f".stage-{job_id}-{secrets.token_hex(4)}"
        target = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._dirfd)
        keep = False
        try:
            _copy(source, target, size)
            os.fsync(target)
            sha256, copied = verify.hash_fd(target)  # the copy is what counts, not the source
            problem = verify.check(expected, sha256, copied, self._keys, self._policy.require_signature)
            if problem:
                raise StageFailed("verification_failed", problem)
            os.rename(temp, job_id, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
            os.fsync(self._dirfd)
            keep = True
            return StagedJob(version=expected.version, sha256=sha256, size=copied)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StageFailed("insufficient_disk_space", f"{self.path} is full: {exc.strerror}") from None
            raise StageFailed("verification_failed", f"cannot copy the file to {self.path}: {exc.strerror}") from None
        finally:
            os.close(target)
            if not keep:
                self._unlink(temp)

    # ----- the directory and the state file ------------------------------
    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._dirfd)
        except FileNotFoundError:
            pass

    def _remove_temporaries(self) -> None:
        for name in os.listdir(self._dirfd):
            if name.startswith(TEMP_PREFIXES):
                self._unlink(name)

    def _load(self) -> dict[str, StagedJob]:
        try:
            fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("cannot open %s (%s); starting with no staged jobs", self.path / STATE_FILE, exc.strerror)
            return {}
        try:
            with os.fdopen(fd, "rb") as fh:
                jobs = _parse_state(fh.read(1024 * 1024))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("%s is corrupt (%s); starting with no staged jobs", self.path / STATE_FILE, exc)
            return {}
        for job_id, job in list(jobs.items()):
            if not job.installed and not self._intact(job_id, job):
                log.warning("staged file of job %s is gone or changed; forgetting the job", job_id)
                del jobs[job_id]
        return jobs

    def _persist(self) -> None:
        """Write the record atomically (temp file, fsync, rename). Caller holds the lock."""
        data = json.dumps({"v": STATE_VERSION, "jobs": {k: asdict(v) for k, v in self._jobs.items()}}).encode()
        temp = f".state-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._dirfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, STATE_FILE, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
            os.fsync(self._dirfd)
        except BaseException:
            self._unlink(temp)
            raise


def _parse_state(data: bytes) -> dict[str, StagedJob]:
    body = json.loads(data.decode("utf-8"))
    if not isinstance(body, dict) or body.get("v") != STATE_VERSION or not isinstance(body.get("jobs"), dict):
        raise ValueError("not a version 1 state record")
    jobs = {}
    for job_id, item in body["jobs"].items():
        if not JOB_ID_RE.match(job_id) or not isinstance(item, dict) or set(item) != {
                "version", "sha256", "size", "installed"}:
            raise ValueError(f"bad entry {job_id!r}")
        job = StagedJob(**item)
        if (not isinstance(job.version, str) or not isinstance(job.sha256, str) or not SHA256_RE.match(job.sha256)
                or type(job.size) is not int or job.size < 0 or type(job.installed) is not bool):
            raise ValueError(f"bad entry {job_id!r}")
        jobs[job_id] = job
    return jobs


def _copy(source: int, target: int, size: int) -> None:
    """Copy at most ``size`` bytes (what fstat said); a source still growing is refused."""
    copied = 0
    while True:
        chunk = os.read(source, COPY_CHUNK)
        if not chunk:
            return
        copied += len(chunk)
        if copied > size:
            raise StageFailed("verification_failed", "the file grew while it was being copied")
        view = memoryview(chunk)
        while view:
            written = os.write(target, view)
            view = view[written:]
