"""Staging: the installer takes the downloaded file out of the fetcher's
reach and verifies its own read of it (promise 2, docs/contracts.md; the handoff is
described in upparat.ipc.handoff; docs/security.md, "Staging").

The path is never taken from a message: it is ``handoff.final_name(job_id,
execution)`` opened relative to the download directory, without following
links and without blocking (a FIFO, or a lease the fetcher holds, cannot stall
root). Only a regular file with one link, owned by the fetcher's uid and no
larger than the release says, is accepted.

Same mount as the staging directory (rename works only within one mount;
a bind mount has the same file system but is another mount): taken over in
place, no copy.

1. A read lease (``F_SETLEASE F_RDLCK``, CAP_LEASE: the file is still the
   fetcher's) is refused by the kernel while any descriptor or shared
   mapping open for writing exists: granted, it proves that the fetcher kept
   no way to change the bytes. Held to the end: an open for writing or a
   truncate starts breaking it.
2. The hash from our own descriptor while another thread fsyncs it (the
   fetcher does not), the lease still intact; then size and sha256 against
   the release, and the release itself again with the installer's own keys
   and policy. A file that fails is left as it was, the fetcher's.
3. ``fchown`` root:root and ``fchmod`` 0400: from now on no other user can
   open it for writing (and, with protected_hardlinks, cannot link it).
4. Rename into the 0700 staging directory, and check that the name now
   leads to the inode we hold (the fetcher could have swapped the name);
   fsync the new owner and both directories. The staged name thus never
   holds bytes that are not on disk.
5. ``F_GETLEASE`` still ``F_RDLCK``: nobody even tried to open it for
   writing meanwhile (that would have started breaking the lease).

Across mounts: one pass that reads, hashes and writes the same buffer
into a 0600 temporary file in the staging directory (so the hash is the hash
of exactly the bytes staged, whatever the source does meanwhile), after a
free-space check; then mode 0400 and rename.

Either way, the staged file is root's, read-only, in a directory only root
can enter: nothing can change it between verification and the end of the
install hook.

A lease break sends SIGIO to the lease holder, which would terminate the
process by default: ``ignore_lease_breaks`` must run in the main thread
before any lease is taken.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import stat
import threading
from dataclasses import dataclass
from typing import Callable

from upparat import verify
from upparat.ipc import handoff
from upparat.release import Release

from .record import STATE_FILE, TEMP_PREFIX as STATE_TEMP_PREFIX

log = logging.getLogger(__name__)

COPY_TEMP_PREFIX = ".stage-"  # job ids hold no dots: never a staged file's name
CHUNK = 1024 * 1024
SPACE_MARGIN = 16 * 1024 * 1024  # left free after a copy, for the state file and the hooks
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

VERIFICATION_FAILED = "verification_failed"
FILE_MISSING = "file_missing"
FILE_TOO_LARGE = "file_too_large"
NO_SPACE = "insufficient_disk_space"


class StageFailed(Exception):
    """The file cannot be staged; ``failure`` is a job status state."""

    def __init__(self, failure: str, message: str):
        super().__init__(message)
        self.failure = failure


class Cancelled(Exception):
    """Staging was stopped (discard, installer stop)."""


@dataclass(frozen=True)
class Staged:
    sha256: str
    size: int
    how: str  # "in place", "copied", "re-verified"


@dataclass(frozen=True)
class Check:
    """What the staged bytes must satisfy, from the installer's own record and config."""

    release: Release
    keys: list
    policy: verify.Policy
    max_size: int  # the release's size, or [service] max_file_size when it has none


def ignore_lease_breaks() -> None:
    """SIGIO (a lease break) must not terminate the installer. Main thread only."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def _require_sigio_ignored() -> None:
    if signal.getsignal(signal.SIGIO) in (signal.SIG_DFL, None):
        # Our own inconsistency: taking a lease now could get root killed by a writer.
        raise RuntimeError("SIGIO is not ignored: call ignore_lease_breaks() before staging")


def _lease(fd: int, what: str) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise StageFailed(VERIFICATION_FAILED, f"{what} is still open for writing by some process (the "
                              "download process must close it before it reports done); not staged") from None
        raise


def _lease_intact(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK


def _unlease(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def check_bytes(check: Check, sha256: str, size: int) -> None:
    problem = verify.bytes_failure(check.release, sha256, size)
    if problem:
        raise StageFailed(VERIFICATION_FAILED, problem)
    failure = verify.release_failure(check.release, check.keys, check.policy)
    if failure is not None:
        raise StageFailed(failure.state, failure.message)


def _check_size(check: Check, size: int, where: str) -> None:
    release_size = check.release.size
    if release_size is not None and size != release_size:
        raise StageFailed(VERIFICATION_FAILED, f"{where} has {size} bytes, the job document says {release_size}")
    if size > check.max_size:
        raise StageFailed(FILE_TOO_LARGE, f"{where} has {size} bytes, more than [service] max_file_size "
                          f"({check.max_size})")


def _open_download(src_dirfd: int, name: str, where: str, fetcher_uid: int | None) -> tuple[int, os.stat_result]:
    try:
        before = os.stat(name, dir_fd=src_dirfd, follow_symlinks=False)
    except FileNotFoundError:
        raise StageFailed(FILE_MISSING, f"{where} does not exist (the download is not finished)") from None
    if stat.S_ISLNK(before.st_mode):
        raise StageFailed(VERIFICATION_FAILED, f"{where} is a symbolic link; only a regular file is staged")
    if not stat.S_ISREG(before.st_mode):
        raise StageFailed(VERIFICATION_FAILED, f"{where} is not a regular file")
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=src_dirfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StageFailed(VERIFICATION_FAILED, f"{where} is a symbolic link; only a regular file is staged") \
                from None
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise StageFailed(VERIFICATION_FAILED, f"{where} is locked by a lease of another process") from None
        if exc.errno == errno.ENOENT:
            raise StageFailed(FILE_MISSING, f"{where} does not exist") from None
        raise
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise StageFailed(VERIFICATION_FAILED, f"{where} was replaced while it was opened")
        if not stat.S_ISREG(st.st_mode):
            raise StageFailed(VERIFICATION_FAILED, f"{where} is not a regular file")
        if st.st_nlink != 1:
            raise StageFailed(VERIFICATION_FAILED, f"{where} has {st.st_nlink} hard links; expected 1")
        if fetcher_uid is not None and st.st_uid != fetcher_uid:
            raise StageFailed(VERIFICATION_FAILED, f"{where} is owned by uid {st.st_uid}, not by the download "
                              f"process (uid {fetcher_uid})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def stage(src_dir: str, staging_dirfd: int, job_id: str, execution: int, check: Check, *,
          fetcher_uid: int | None, cancelled: Callable[[], bool]) -> Staged:
    """Take over (or copy) and verify the job's download; the result is
    ``<staging>/<handoff.staged_name>``. Raises StageFailed or Cancelled;
    on any failure nothing is left in the staging directory."""
    _require_sigio_ignored()
    name = handoff.final_name(job_id, execution)
    staged = handoff.staged_name(job_id, execution)
    if _exists(staging_dirfd, staged):
        # Moved here by an earlier stage that was cut off (the installer
        # stopped): only root could touch it since; verify it again.
        log.info("job %s.%d: the staged file of an interrupted stage is there; verifying it again", job_id,
                 execution)
        return reverify(staging_dirfd, staged, check, cancelled)
    where = os.path.join(src_dir, name)
    try:
        src_dirfd = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StageFailed(FILE_MISSING, f"download directory {src_dir}: {exc.strerror}") from None
    try:
        fd, st = _open_download(src_dirfd, name, where, fetcher_uid)
        try:
            _check_size(check, st.st_size, where)
            if cancelled():
                raise Cancelled()
            if _same_mount(fd, st, staging_dirfd):
                try:
                    return _take_over(src_dirfd, name, fd, staging_dirfd, staged, where, check, cancelled)
                except CrossDevice:
                    pass  # e.g. a bind mount that /proc did not tell apart: copy after all
            return _copy(fd, st.st_size, staging_dirfd, staged, where, check, cancelled)
        finally:
            os.close(fd)
    finally:
        os.close(src_dirfd)


class CrossDevice(Exception):
    """rename() said EXDEV: the two directories are on different mounts."""


def _mount_id(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _same_mount(fd: int, st: os.stat_result, staging_dirfd: int) -> bool:
    """rename() works only within one mount: one file system is not enough (a
    bind mount, e.g. systemd's PrivateTmp= with BindPaths=, has the same st_dev)."""
    if st.st_dev != os.fstat(staging_dirfd).st_dev:
        return False
    mine, theirs = _mount_id(fd), _mount_id(staging_dirfd)
    return mine is None or theirs is None or mine == theirs


def _take_over(src_dirfd: int, name: str, fd: int, staging_dirfd: int, staged: str, where: str, check: Check,
               cancelled: Callable[[], bool]) -> Staged:
    # Held from before the hash until the file is in the staging directory:
    # granted, it proves that no writer exists; intact at the end, that none
    # appeared (opening for writing, or truncating, starts breaking it).
    _lease(fd, where)
    moved = False
    try:
        if cancelled():
            raise Cancelled()
        sha256, size = _hash_and_sync(fd)
        if not _lease_intact(fd):
            raise StageFailed(VERIFICATION_FAILED, f"a process tried to open {where} for writing while it was "
                              "verified; not staged")
        check_bytes(check, sha256, size)
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)  # also clears any set-id bit
        os.fchmod(fd, 0o400)
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise StageFailed(VERIFICATION_FAILED, f"{where} was replaced or deleted while it was taken over; "
                              "not staged")
        if st.st_nlink != 1:  # linked before the chown; protected_hardlinks stops it after
            raise StageFailed(VERIFICATION_FAILED, f"{where} got a second hard link; not staged")
        try:
            os.rename(name, staged, src_dir_fd=src_dirfd, dst_dir_fd=staging_dirfd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise CrossDevice() from None
            raise
        moved = True
        now = os.stat(staged, dir_fd=staging_dirfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise StageFailed(VERIFICATION_FAILED, f"{where} was replaced while it was taken over; not staged")
        os.fsync(fd)  # the new owner and mode (the bytes are on disk already)
        os.fsync(staging_dirfd)
        os.fsync(src_dirfd)
        if not _lease_intact(fd):
            raise StageFailed(VERIFICATION_FAILED, f"a process tried to open {where} for writing while it was "
                              "taken over; not staged")
        _unlease(fd)
    except BaseException:
        _try_unlease(fd)
        if moved:
            _unlink(staging_dirfd, staged)
        raise
    return Staged(sha256, size, "in place")


def _hash_and_sync(fd: int) -> tuple[str, int]:
    """Our own read's sha256 and size, while another thread writes the bytes to
    disk: the fetcher does not fsync the finished file (upparat.ipc.handoff),
    so the staged name never exists before its bytes are durable. Both calls
    release the GIL; the write-back costs no time next to the hash."""
    failed: list[OSError] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=sync, name="stage-fsync", daemon=True)
    thread.start()
    try:
        result = verify.hash_fd(fd)
    finally:
        thread.join()
    if failed:
        raise failed[0]
    return result


def _copy(fd: int, size: int, staging_dirfd: int, staged: str, where: str, check: Check,
          cancelled: Callable[[], bool]) -> Staged:
    vfs = os.fstatvfs(staging_dirfd)
    free = vfs.f_bavail * vfs.f_frsize
    if size + SPACE_MARGIN > free:
        raise StageFailed(NO_SPACE, f"staging a copy of {where} needs {size + SPACE_MARGIN} bytes, the staging "
                          f"directory has {free} bytes free")
    temp = COPY_TEMP_PREFIX + secrets.token_hex(8)
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                  dir_fd=staging_dirfd)
    done = False
    try:
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        copied = 0
        limit = check.max_size if check.release.size is None else check.release.size
        while True:
            if cancelled():
                raise Cancelled()
            n = os.readv(fd, [buffer])
            if n <= 0:
                break
            copied += n
            if copied > limit:
                _check_size(check, copied, where)  # raises: it grew past what is allowed
            chunk = view[:n]
            digest.update(chunk)  # the hash of exactly the bytes written
            while chunk:
                chunk = chunk[os.write(out, chunk):]
        check_bytes(check, digest.hexdigest(), copied)
        os.fchmod(out, 0o400)
        os.fsync(out)
        os.rename(temp, staged, src_dir_fd=staging_dirfd, dst_dir_fd=staging_dirfd)
        os.fsync(staging_dirfd)
        done = True
        return Staged(digest.hexdigest(), copied, "copied")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StageFailed(NO_SPACE, f"the staging directory filled up while copying {where}") from None
        raise
    finally:
        os.close(out)
        if not done:
            _unlink(staging_dirfd, temp)


def reverify(staging_dirfd: int, staged: str, check: Check, cancelled: Callable[[], bool]) -> Staged:
    """Hash the staged file again (after an installer restart). On failure it is deleted."""
    try:
        fd = os.open(staged, OPEN_FLAGS, dir_fd=staging_dirfd)
    except FileNotFoundError:
        raise StageFailed(FILE_MISSING, "the staged file is gone; stage it again") from None
    except OSError as exc:
        _unlink(staging_dirfd, staged)
        raise StageFailed(VERIFICATION_FAILED, f"the staged file cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise StageFailed(VERIFICATION_FAILED, "the staged file is not a regular file of root with one link")
        if cancelled():
            raise Cancelled()
        sha256, size = verify.hash_fd(fd)
        check_bytes(check, sha256, size)
    except StageFailed:
        _unlink(staging_dirfd, staged)
        raise
    finally:
        os.close(fd)
    return Staged(sha256, size, "re-verified")


def quick_check(staging_dirfd: int, staged: str, size: int | None) -> None:
    """The staged file is still root's read-only regular file of the verified size."""
    try:
        st = os.stat(staged, dir_fd=staging_dirfd, follow_symlinks=False)
    except FileNotFoundError:
        raise StageFailed(FILE_MISSING, "the staged file is gone; stage it again") from None
    if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid()
            or stat.S_IMODE(st.st_mode) != 0o400 or st.st_size != size):
        raise StageFailed(VERIFICATION_FAILED, "the staged file changed since it was verified")


def _try_unlease(fd: int) -> None:
    try:
        _unlease(fd)
    except OSError:
        pass


def _exists(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass


def delete_staged(staging_dirfd: int, job_id: str, execution: int) -> None:
    _unlink(staging_dirfd, handoff.staged_name(job_id, execution))


def remove_strays(staging_dirfd: int, keep: set[str]) -> list[str]:
    """Delete every file in the staging directory but the state file and
    ``keep`` (the open job's staged file); returns what was removed."""
    removed = []
    for name in os.listdir(staging_dirfd):
        if name == STATE_FILE or name in keep:
            continue
        try:
            st = os.stat(name, dir_fd=staging_dirfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            log.warning("left the directory %r in the staging directory alone", name)
            continue
        _unlink(staging_dirfd, name)
        removed.append(name)
    return removed


def staged_files(staging_dirfd: int) -> list[str]:
    """Names in the staging directory other than the state file and its temporaries."""
    return sorted(n for n in os.listdir(staging_dirfd) if n != STATE_FILE and not n.startswith(STATE_TEMP_PREFIX))
