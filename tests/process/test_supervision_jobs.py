"""Supervision with the real children during a real job: a stopped
(SIGSTOP) child is killed and restarted and the job still ends; a reload
(SIGHUP) never interrupts a running hook; SIGTERM stops everything within
its bound. Real supervisor, Mosquitto, emulator and file server."""

import os
import signal
import time

import pytest

from tests.process.test_broker_crash import GATE, open_gates
from tests.support import child_pids, pid_alive, poll_for, running_sandbox
from upparat.supervisor import KILL_WAIT, MAX_POLL, POLICY, STOP_TIMEOUT

HOOKS = {
    "install": "#!/bin/sh\nHOOK=install\necho run >> \"{base}/state/install-runs\"\n" + GATE
               + "cp \"$4\" \"{base}/installed/job.bin\"\necho \"$3\" > \"{base}/state/pending\"\n",
}


@pytest.fixture
def box(world_tmp):
    with running_sandbox(world_tmp / "box", hooks=HOOKS) as sandbox:
        yield sandbox


def test_a_fetcher_stopped_mid_download_is_killed_and_restarted_and_the_job_ends(box):
    open_gates(box, "install")
    box.files.faults.rate = 300_000
    box.files.faults.times = 1
    box.add_file("fw.bin", os.urandom(2_000_000))
    box.create_job("job-stop", box.document("fw.bin", "2.0.0"))
    poll_for(lambda: box.files.bytes_sent > 200_000, 30, what="the download to be under way")
    pid = child_pids(box.supervisor.pid)["fetcher"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    bound = POLICY.heartbeat_timeout + MAX_POLL + KILL_WAIT + POLICY.backoff_initial + 5
    poll_for(lambda: child_pids(box.supervisor.pid).get("fetcher") not in (None, pid), bound,
             what="a new fetcher")
    assert time.monotonic() - stopped_at <= bound
    assert not pid_alive(pid)
    assert "sent no heartbeat" in box.logs()
    final = box.wait_for_job("job-stop", timeout=90)
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
        box.logs()[-4000:]


def test_a_reload_during_the_install_hook_waits_for_it_and_applies_to_the_next_job(box):
    box.add_file("fw.bin", os.urandom(100_000))
    box.create_job("job-hup", box.document("fw.bin", "2.0.0"))
    poll_for(lambda: box.path("state", "at-install").exists(), 30, what="the install hook")
    installer = child_pids(box.supervisor.pid)["installer"]
    box.job_prefix = "job-"  # the new configuration: only jobs starting with "job-"
    box.write_config()
    os.kill(box.supervisor.pid, signal.SIGHUP)
    poll_for(lambda: "reload deferred" in box.logs(), 15, what="the reload to be deferred")
    assert child_pids(box.supervisor.pid)["installer"] == installer  # the hook's process lives on
    open_gates(box, "install")
    final = box.wait_for_job("job-hup", timeout=60)
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
        box.logs()[-4000:]
    assert box.path("state", "install-runs").read_text().count("run") == 1
    poll_for(lambda: child_pids(box.supervisor.pid).get("installer") not in (None, installer), 30,
             what="the children restarted with the new configuration")
    box.create_job("other-job", box.document("fw.bin", "3.0.0"))  # not "job-": no longer ours
    box.create_job("job-next", box.document("fw.bin", "3.0.0"))
    assert box.wait_for_job("job-next", timeout=60)["status"] == "SUCCEEDED", box.logs()[-4000:]
    assert box.execution("other-job")["status"] == "QUEUED"


def test_sigterm_during_a_download_stops_everything_within_the_bound(box):
    box.files.faults.rate = 200_000
    box.add_file("fw.bin", os.urandom(3_000_000))
    box.create_job("job-term", box.document("fw.bin", "2.0.0"))
    poll_for(lambda: box.files.bytes_sent > 100_000, 30, what="the download to be under way")
    pids = child_pids(box.supervisor.pid)
    assert len(pids) == 3
    started = time.monotonic()
    os.kill(box.supervisor.pid, signal.SIGTERM)
    box.supervisor.popen.wait(STOP_TIMEOUT + KILL_WAIT + 5)
    assert box.supervisor.popen.returncode == 0
    assert time.monotonic() - started <= STOP_TIMEOUT + KILL_WAIT + 5
    assert not [pid for pid in pids.values() if pid_alive(pid)]


def test_an_installer_killed_during_the_install_hook_is_asked_again_as_soon_as_it_is_back(box):
    """A restarted installer cannot speak first (a ROUTER learns its peers from
    their messages): the broker sees its DEALER connect again and asks at once,
    instead of at its next safety query, 30 s later."""
    box.add_file("fw.bin", os.urandom(100_000))
    box.create_job("job-kill", box.document("fw.bin", "2.0.0"))
    poll_for(lambda: box.path("state", "at-install").exists(), 30, what="the install hook")
    pid = child_pids(box.supervisor.pid)["installer"]
    os.kill(pid, signal.SIGKILL)
    poll_for(lambda: child_pids(box.supervisor.pid).get("installer") not in (None, pid), 30,
             what="a new installer")
    open_gates(box, "install")
    final = box.wait_for_job("job-kill", timeout=90)
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
        box.logs()[-4000:]
    logs = box.logs()
    assert "job job-kill: the installer process connected; asking it now" in logs, logs[-4000:]
    assert "job job-kill.1: installing -> install_interrupted" in logs, logs[-4000:]
    # The interrupted hook ran again (the documented re-run), and only that once more.
    assert box.path("state", "install-runs").read_text().count("run") == 2
