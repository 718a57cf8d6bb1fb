"""Disk trouble end to end, with the real four processes, Mosquitto, the
jobs emulator and the file server (issue 11): the download directory is on
a small tmpfs that is full, fills up during the download, turns read-only,
or the directory is deleted while the service runs. Each time the job ends
FAILED with a state and a message a person can act on, no process crashes
or restarts (no crash loop), nothing partial is left, and once the trouble
is fixed the next job succeeds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.support import child_pids, poll_for
from upparat.devtools.sandbox import Sandbox, sha256_of

AS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not AS_ROOT, reason="mounting a tmpfs needs root")
KiB, MiB = 1024, 1024 * 1024


class DiskBox:
    """A sandbox whose download location is a tmpfs of its own."""

    def __init__(self, base, size: str):
        self.box = Sandbox(base / "box")
        self.mount = self.box.path("dl")
        self.mounted = False
        self.size = size

    def start(self):
        box = self.box
        box.start(supervisor=False)  # prepares the tree, Mosquitto, emulator, file server
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                               str(self.mount)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounted = True
        box.start_supervisor()
        self.children = poll_for(lambda: (c := child_pids(box.supervisor.pid)) and len(c) == 3 and c, 30,
                                 what="three children")
        self.wait_fetcher_listening(1)
        return self

    def wait_fetcher_listening(self, times: int):
        """Until the fetcher has started ``times`` times in all (past its start-up checks)."""
        poll_for(lambda: self.box.logs().count("downloads go to") >= times, 30, what="the fetcher to listen")

    def box_fetcher_uid(self) -> int:
        import pwd

        return pwd.getpwnam("upparat-fetch").pw_uid

    def remount(self, mode: str):
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.mount)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def stop(self):
        self.box.stop()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)

    # -- checks --
    def job(self, job_id, name, size, version, timeout=60.0):
        data = os.urandom(size)
        self.box.add_file(name, data)
        self.box.create_job(job_id, self.box.document(name, version))
        return self.box.wait_for_job(job_id, timeout=timeout)

    def downloads(self):
        try:
            return sorted(os.listdir(self.box.path("dl", "upparat")))
        except FileNotFoundError:
            return []

    def assert_no_restart(self):
        """The same three processes as at the start: nothing crashed or was restarted."""
        supervisor = "\n".join(line for line in self.box.logs().splitlines() if "upparat-supervisor" in line)
        assert child_pids(self.box.supervisor.pid) == self.children, supervisor[-3000:] + self.box.logs()[-3000:]
        assert self.box.supervisor.alive()

    def assert_clean_after(self, job_id):
        poll_for(lambda: f"job {job_id}: done" in self.box.logs(), 20, what=f"job {job_id} to be cleaned up")
        assert self.downloads() == []
        assert sorted(os.listdir(self.box.path("state-dirs", "fetcher"))) == []
        assert not [n for n in os.listdir(self.box.path("staging")) if n != "state.json"]

    def assert_next_job_succeeds(self, job_id, version):
        final = self.job(job_id, f"{job_id}.bin", 300 * KiB, version)
        assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
            self.box.logs()[-3000:]
        published = sha256_of(self.box.path("files", f"{job_id}.bin"))
        assert published in [sha256_of(p) for p in self.box.path("installed").iterdir()]
        self.assert_clean_after(job_id)


@pytest.fixture
def disk(world_tmp):
    boxes = []

    def make(size: str) -> DiskBox:
        box = DiskBox(world_tmp, size)
        boxes.append(box)
        return box.start()

    yield make
    for box in boxes:
        box.stop()


def test_a_full_download_disk_fails_with_insufficient_disk_space_then_the_next_job_succeeds(disk):
    d = disk("4m")
    filler = d.mount / "filler"
    filler.write_bytes(b"\0" * (3 * MiB + 512 * KiB))
    final = d.job("job-full", "full.bin", 1 * MiB, "2.0.0")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "insufficient_disk_space")
    message = final["statusDetails"]["message"]
    assert str(MiB) in message and "free" in message, message
    assert d.box.files.requests == []  # refused before any byte was asked for
    d.assert_clean_after("job-full")
    d.assert_no_restart()
    filler.unlink()  # fixed: space freed
    d.assert_next_job_succeeds("job-after-full", "2.0.1")
    d.assert_no_restart()


def test_a_disk_that_fills_up_during_the_download_fails_leaving_nothing_partial(disk):
    d = disk("4m")
    d.box.files.faults.rate = 1 * MiB  # about 2.5 s: time to fill the disk meanwhile
    d.box.add_file("fill.bin", os.urandom(2 * MiB + 512 * KiB))
    d.box.create_job("job-fills", d.box.document("fill.bin", "2.0.0"))
    poll_for(lambda: d.box.files.bytes_sent > 256 * KiB, 30, what="the download to be under way")
    filler = d.mount / "filler"
    with open(filler, "wb") as fh:  # take what is left
        try:
            while True:
                fh.write(b"\0" * (64 * KiB))
                fh.flush()
        except OSError:
            pass
    final = d.box.wait_for_job("job-fills", timeout=60)
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "insufficient_disk_space"), final
    assert "filled up" in final["statusDetails"]["message"]
    d.assert_clean_after("job-fills")
    d.assert_no_restart()
    d.box.files.faults.rate = None
    filler.unlink()
    d.assert_next_job_succeeds("job-after-fill", "2.0.1")
    d.assert_no_restart()


def test_a_read_only_download_disk_is_a_clear_failure_then_the_next_job_succeeds(disk):
    d = disk("8m")
    d.remount("ro")
    final = d.job("job-ro", "ro.bin", 300 * KiB, "2.0.0")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "download_failed")
    message = final["statusDetails"]["message"]
    assert "read-only file system" in message.lower() and "dl/upparat" in message, message
    d.assert_no_restart()
    d.remount("rw")  # fixed
    d.assert_next_job_succeeds("job-after-ro", "2.0.1")
    d.assert_no_restart()


def test_the_download_directory_deleted_while_running_fails_clearly_and_a_reload_recreates_it(disk):
    d = disk("8m")
    shutil.rmtree(d.box.path("dl", "upparat"))  # while idle
    final = d.job("job-gone", "gone.bin", 300 * KiB, "2.0.0")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "download_failed")
    message = final["statusDetails"]["message"]
    assert "dl/upparat" in message and "No such file or directory" in message, message
    d.assert_no_restart()
    # ... and deleted in the middle of a download
    shutil.rmtree(d.box.path("dl", "upparat"), ignore_errors=True)
    os.kill(d.box.supervisor.pid, signal.SIGHUP)  # the fix: reload (systemctl reload upparat) recreates it
    poll_for(lambda: d.box.path("dl", "upparat").is_dir() and len(child_pids(d.box.supervisor.pid)) == 3
             and set(child_pids(d.box.supervisor.pid).values()).isdisjoint(d.children.values()), 30,
             what="the reload to recreate the directory and restart the children")
    d.children = child_pids(d.box.supervisor.pid)
    d.box.files.faults.rate = 512 * KiB
    d.box.add_file("mid.bin", os.urandom(1 * MiB))
    d.box.create_job("job-mid", d.box.document("mid.bin", "2.0.1"))
    poll_for(lambda: d.box.files.bytes_sent > 128 * KiB, 30, what="the download to be under way")
    shutil.rmtree(d.box.path("dl", "upparat"))
    final = d.box.wait_for_job("job-mid", timeout=60)
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "download_failed"), final
    assert "dl/upparat" in final["statusDetails"]["message"], final
    d.assert_no_restart()
    mid = sha256_of(d.box.path("files", "mid.bin"))
    assert mid not in [sha256_of(p) for p in d.box.path("installed").iterdir()]
    os.kill(d.box.supervisor.pid, signal.SIGHUP)
    poll_for(lambda: d.box.path("dl", "upparat").is_dir() and len(child_pids(d.box.supervisor.pid)) == 3
             and set(child_pids(d.box.supervisor.pid).values()).isdisjoint(d.children.values()), 30,
             what="the reload to recreate the directory")
    d.children = child_pids(d.box.supervisor.pid)
    d.box.files.faults.rate = None
    d.assert_next_job_succeeds("job-after-gone", "2.0.2")
    d.assert_no_restart()


def test_download_directory_deleted_then_a_fetcher_restart_is_no_crash_loop(disk):
    """Regression: a fetcher that starts while its download directory is missing
    exits (it cannot create it: the parent is root's), and the supervisor used to
    restart it into the same failure forever while the job waited 120 s for an
    answer. The supervisor now creates the directories again before a restart."""
    d = disk("8m")
    download_dir = d.box.path("dl", "upparat")
    shutil.rmtree(download_dir)
    old = d.children["fetcher"]
    os.kill(old, signal.SIGKILL)  # any restart of the fetcher: a crash, the OOM killer, a hang
    d.wait_fetcher_listening(2)
    st = download_dir.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o700, d.box_fetcher_uid())
    fetcher = child_pids(d.box.supervisor.pid)["fetcher"]
    assert fetcher != old
    d.children["fetcher"] = fetcher
    d.assert_next_job_succeeds("job-after-restart", "2.0.0")
    d.assert_no_restart()
    assert d.box.logs().count("cannot start:") == 0
