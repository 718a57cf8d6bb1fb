"""Staging (upparat.installer_proc.staging): the installer takes the download
out of the fetcher's reach and verifies its own read; symlinks, hard links,
writers, swaps and growth are refused or harmless, and a lease break cannot
kill the installer."""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from upparat import verify
from upparat.installer_proc import staging
from upparat.ipc import handoff
from tests.installer_support import PAYLOAD, PAYLOAD_SHA, release
from tests.support import identities

ROOT = os.geteuid() == 0


class Area:
    """A download directory (the fetcher's) and a staging directory (root's)."""

    def __init__(self, download_dir: Path, staging_dir: Path):
        self.ids = identities()
        self.download_dir = download_dir
        self.staging_dir = staging_dir
        download_dir.mkdir(parents=True, exist_ok=True)
        staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.ids.separated:
            os.chown(download_dir, self.ids.fetcher_uid, self.ids.fetcher_gid)
        download_dir.chmod(0o700)
        self.dirfd = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.final = download_dir / handoff.final_name("job-1", 1)
        self.staged = staging_dir / handoff.staged_name("job-1", 1)
        staging.ignore_lease_breaks()

    def put(self, data: bytes = PAYLOAD, path: Path | None = None) -> Path:
        path = path or self.final
        path.write_bytes(data)
        self.give(path)
        return path

    def give(self, path: Path) -> None:
        if self.ids.separated:
            os.chown(path, self.ids.fetcher_uid, self.ids.fetcher_gid, follow_symlinks=False)

    def stage(self, rel=None, cancelled=lambda: False, max_size=2**40) -> staging.Staged:
        check = staging.Check(rel or release(), [], verify.Policy(allow_unsigned=True), max_size)
        return staging.stage(str(self.download_dir), self.dirfd, "job-1", 1, check,
                             fetcher_uid=self.ids.fetcher_uid if self.ids.separated else None, cancelled=cancelled)

    def fails(self, failure: str, text: str, **kwargs) -> staging.StageFailed:
        with pytest.raises(staging.StageFailed) as info:
            self.stage(**kwargs)
        assert info.value.failure == failure
        assert text in str(info.value)
        assert staging.staged_files(self.dirfd) == []  # nothing half-done
        return info.value

    def close(self):
        os.close(self.dirfd)


@pytest.fixture
def area(world_tmp):
    a = Area(world_tmp / "dl" / "upparat", world_tmp / "staging")
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def other_fs_area(world_tmp):
    """The download directory on another file system (tmpfs) than staging."""
    base = Path(tempfile.mkdtemp(prefix="upparat-test-", dir="/dev/shm"))
    base.chmod(0o755)
    a = Area(base / "upparat", world_tmp / "staging")
    if os.stat(a.download_dir).st_dev == os.stat(a.staging_dir).st_dev:
        pytest.fail("/dev/shm is expected to be another file system than /tmp")
    try:
        yield a
    finally:
        a.close()
        shutil.rmtree(base, ignore_errors=True)


def test_same_file_system_is_taken_over_in_place(area):
    area.put()
    ino = area.final.stat().st_ino
    result = area.stage()
    assert (result.sha256, result.size, result.how) == (PAYLOAD_SHA, len(PAYLOAD), "in place")
    st = area.staged.stat()
    assert st.st_ino == ino  # no second copy
    assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_uid == os.geteuid() and st.st_nlink == 1
    assert not area.final.exists()
    assert area.staged.read_bytes() == PAYLOAD


def test_the_bytes_are_on_disk_before_the_staged_name_exists(area, monkeypatch):
    """The fetcher does not fsync (upparat.ipc.handoff): the take-over does, in a
    thread while it hashes, and renames only then, so after a power cut the
    staged name never holds bytes that were lost."""
    area.put()
    ino = area.final.stat().st_ino
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_ino))

    def rename(*args, **kwargs):
        events.append(("rename", area.staged.exists()))
        return real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    assert area.stage().how == "in place"
    assert ("rename", False) in events
    assert events.index(("fsync", ino)) < events.index(("rename", False))


def test_a_file_that_fails_verification_stays_the_fetchers_and_nothing_is_staged(area):
    area.put(bytes(len(PAYLOAD)))  # the right size, zeros: what a lost write-back leaves
    before = area.final.stat()
    area.fails("verification_failed", "sha256", rel=release(PAYLOAD))
    after = area.final.stat()  # not taken over: the fetcher may delete it (the job ends) or download again
    assert (after.st_ino, after.st_uid, after.st_mode) == (before.st_ino, before.st_uid, before.st_mode)


def test_another_file_system_is_copied_and_hashed_in_one_pass(other_fs_area):
    area = other_fs_area
    area.put()
    result = area.stage()
    assert (result.sha256, result.how) == (PAYLOAD_SHA, "copied")
    st = area.staged.stat()
    assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_uid == os.geteuid()
    assert area.staged.read_bytes() == PAYLOAD
    assert area.final.exists()  # the fetcher deletes its own copy when told


@pytest.mark.skipif(not ROOT, reason="makes a bind mount")
def test_a_bind_mount_of_the_same_file_system_is_copied_not_renamed(world_tmp):
    """Same st_dev, another mount: rename() would fail with EXDEV (systemd's
    PrivateTmp= with BindPaths= does this to the download directory)."""
    real = world_tmp / "real-dl"
    bound = world_tmp / "dl"
    real.mkdir()
    bound.mkdir()
    subprocess.run(["mount", "--bind", str(real), str(bound)], check=True)
    try:
        a = Area(bound / "upparat", world_tmp / "staging")
        try:
            assert os.stat(a.download_dir).st_dev == os.stat(a.staging_dir).st_dev
            a.put()
            result = a.stage()
            assert (result.how, result.sha256) == ("copied", PAYLOAD_SHA)
            assert a.staged.read_bytes() == PAYLOAD
            assert stat.S_IMODE(a.staged.stat().st_mode) == 0o400
        finally:
            a.close()
    finally:
        subprocess.run(["umount", str(bound)], check=True)


def test_exdev_on_rename_falls_back_to_a_copy(area, monkeypatch):
    """If /proc cannot tell the mounts apart, rename's EXDEV still leads to a copy."""
    import errno as errno_mod
    area.put()
    monkeypatch.setattr(staging, "_mount_id", lambda fd: None)
    real_rename = os.rename

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        if src_dir_fd != dst_dir_fd:
            raise OSError(errno_mod.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "rename", rename)
    result = area.stage()
    assert (result.how, result.sha256) == ("copied", PAYLOAD_SHA)
    assert area.staged.read_bytes() == PAYLOAD


def test_a_copy_that_the_source_changes_during_is_refused(other_fs_area):
    area = other_fs_area
    area.put()

    def append_once(calls=[]):  # noqa: B006 - a counter across calls
        calls.append(1)
        if len(calls) == 2:  # while copying: the bytes hashed are the bytes written
            with open(area.final, "ab") as fh:
                fh.write(b"more")
        return False

    area.fails("verification_failed", "sha256 is", rel=release(size=None), cancelled=append_once)


def test_a_symlink_is_refused_and_its_target_untouched(area, world_tmp):
    target = world_tmp / "root-file"
    target.write_bytes(PAYLOAD)
    area.final.symlink_to(target)
    area.give(area.final)
    area.fails("verification_failed", "symbolic link")
    st = target.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644


def test_a_hard_link_is_refused(area):
    area.put()
    os.link(area.final, area.download_dir / "second-name")
    area.fails("verification_failed", "2 hard links")


def test_a_file_the_fetcher_does_not_own_is_refused(area):
    if not area.ids.separated:
        pytest.skip("one user for all in a development run")
    area.final.write_bytes(PAYLOAD)  # root's
    area.fails("verification_failed", "is owned by uid 0")


def test_a_writable_descriptor_held_open_is_refused(area):
    area.put()
    writer = os.open(area.final, os.O_WRONLY)
    try:
        area.fails("verification_failed", "still open for writing")
        os.write(writer, b"X")  # whatever the writer does now, nothing of it was staged
    finally:
        os.close(writer)


def test_a_writable_shared_mapping_is_refused(area):
    area.put()
    with open(area.final, "r+b") as fh:
        mapping = mmap.mmap(fh.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
    try:
        area.fails("verification_failed", "still open for writing")
    finally:
        mapping.close()


def test_a_fifo_is_refused_without_blocking(area):
    os.mkfifo(area.final)
    area.give(area.final)
    area.fails("verification_failed", "not a regular file")


def test_a_missing_file_is_file_missing(area):
    area.fails("file_missing", "does not exist")


def test_wrong_size_and_wrong_hash_are_refused(area):
    area.put(PAYLOAD + b"x")
    area.fails("verification_failed", "the job document says")
    area.put(b"y" * len(PAYLOAD))
    area.fails("verification_failed", "sha256 is")


def test_without_a_size_the_max_file_size_bounds_it(area):
    area.put()
    area.fails("file_too_large", "max_file_size", rel=release(size=None), max_size=100)


def test_a_name_swapped_during_the_take_over_is_refused(area):
    area.put()
    impostor = area.put(b"evil" * 100, area.download_dir / "impostor")

    def swap(calls=[]):  # noqa: B006
        calls.append(1)
        if len(calls) == 1:  # after the installer opened the file
            os.rename(impostor, area.final)
        return False

    area.fails("verification_failed", "replaced", cancelled=swap)


def test_a_writer_opening_during_verification_cannot_kill_the_installer_and_is_caught(area):
    """A lease break sends SIGIO to this process; it must be ignored, and the
    broken lease must fail the stage."""
    area.put(os.urandom(8 * 1024 * 1024), area.final)
    rel = release(area.final.read_bytes())
    opened, calls = [], []

    def writer_opens_now():  # asked before the take-over, then right before the hash, the lease held
        calls.append(1)
        if len(calls) == 2:
            # In another process: the open is refused (EWOULDBLOCK) but starts the lease break.
            code = ("import os, errno, sys\n"
                    "try:\n    os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)\n"
                    "except BlockingIOError:\n    sys.exit(0)\n"
                    "sys.exit(1)\n")
            opened.append(subprocess.run([sys.executable, "-c", code, str(area.final)]).returncode)
        return False

    area.fails("verification_failed", "tried to open", rel=rel, cancelled=writer_opens_now)
    assert not area.staged.exists()
    assert opened == [0]  # the writer met our lease, so SIGIO was sent to us, and we are still here


def test_staging_refuses_to_take_a_lease_while_sigio_would_kill(area, monkeypatch):
    import signal
    area.put()
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_DFL)
    with pytest.raises(RuntimeError, match="SIGIO"):
        area.stage()


def test_an_interrupted_stage_is_verified_again(area):
    area.put()
    area.stage()
    again = area.stage()  # the record said "staging" when the installer stopped
    assert (again.how, again.sha256) == ("re-verified", PAYLOAD_SHA)


def test_a_tampered_staged_file_is_caught_and_deleted_on_reverify(area):
    area.put()
    area.stage()
    area.staged.chmod(0o600)
    area.staged.write_bytes(b"changed by someone with root")
    check = staging.Check(release(), [], verify.Policy(allow_unsigned=True), 2**40)
    with pytest.raises(staging.StageFailed, match="size is 28 bytes"):
        staging.reverify(area.dirfd, area.staged.name, check, lambda: False)
    assert not area.staged.exists()


@pytest.mark.skipif(not ROOT, reason="mounts a small tmpfs")
def test_not_enough_space_for_a_copy_is_refused_before_copying(world_tmp):
    small = world_tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        a = Area(world_tmp / "dl" / "upparat", small / "staging")
        try:
            data = os.urandom(8 * 1024 * 1024)
            a.put(data)
            a.fails("insufficient_disk_space", "bytes free", rel=release(data))
            assert a.final.read_bytes() == data
        finally:
            a.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_strays_are_removed_but_the_state_file_and_the_open_job_kept(area):
    for name in ("state.json", "job-1.1", "old-job.3", ".stage-123", ".state-abc"):
        (area.staging_dir / name).write_bytes(b"x")
    removed = staging.remove_strays(area.dirfd, {"job-1.1"})
    assert sorted(removed) == [".stage-123", ".state-abc", "old-job.3"]
    assert sorted(os.listdir(area.staging_dir)) == ["job-1.1", "state.json"]


def test_sha256_of_the_payload_helper():
    assert hashlib.sha256(PAYLOAD).hexdigest() == PAYLOAD_SHA
