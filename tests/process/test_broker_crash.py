"""Crash consistency of the job lifecycle with the real processes (promise 8, docs/contracts.md): broker_proc is SIGKILLed in each phase of a job, the supervisor
starts a new one, and the job still ends SUCCEEDED with the install hook run
exactly once. Hooks can hold a phase open until the test lets them go (a
"gate" file), so each kill lands where it is meant to."""

import os
import signal

import pytest

from tests.support import child_pids, poll_for, running_sandbox
from upparat.devtools.sandbox import sha256_of

GATE = """
n=0
while [ ! -e "{base}/state/open-$HOOK" ]; do
  touch "{base}/state/at-$HOOK"; sleep 0.05; n=$((n+1)); [ $n -gt 1200 ] && exit 1
done
"""
HOOKS = {
    "download": "#!/bin/sh\nHOOK=download\n" + GATE + "exit 0\n",
    "install": "#!/bin/sh\nHOOK=install\necho run >> \"{base}/state/install-runs\"\n" + GATE
               + "cp \"$4\" \"{base}/installed/job.bin\"\necho \"$3\" > \"{base}/state/pending\"\n",
    "restart": "#!/bin/sh\nHOOK=restart\necho run >> \"{base}/state/restart-runs\"\n" + GATE
               + "mv \"{base}/state/pending\" \"{base}/state/version\"\n",
    # after the restart (no pending file left) the version check is gated too
    "version": "#!/bin/sh\nHOOK=version\nif [ -e \"{base}/state/restart-runs\" ]; then\n" + GATE
               + "fi\ncat \"{base}/state/version\"\n",
}
ALL_GATES = ("download", "install", "restart", "version")


def open_gates(box, *names):
    for name in names:
        box.path("state", f"open-{name}").touch()


def kill_broker(box):
    pid = child_pids(box.supervisor.pid)["broker"]
    os.kill(pid, signal.SIGKILL)
    poll_for(lambda: child_pids(box.supervisor.pid).get("broker") not in (None, pid), 30,
             what="a new broker_proc")


@pytest.fixture
def box(world_tmp):
    with running_sandbox(world_tmp / "box", hooks=HOOKS) as sandbox:
        yield sandbox


def phase_logged(box, line):
    return line in box.logs()


# (where to kill, how to get there, gates still closed at the kill)
POINTS = {
    "before_download": (lambda b: b.path("state", "at-download").exists(), ALL_GATES),
    "during_staging": (lambda b: phase_logged(b, "fetch -> stage"), ("install", "restart", "version")),
    "during_install_hook": (lambda b: b.path("state", "at-install").exists(), ("install", "restart", "version")),
    "right_after_install": (lambda b: phase_logged(b, "install -> reboot_report"), ("restart", "version")),
    "during_restart_hook": (lambda b: b.path("state", "at-restart").exists(), ("restart", "version")),
    "during_confirmation": (lambda b: b.path("state", "at-version").exists()
                            and b.path("state", "restart-runs").exists(), ("version",)),
}


def downloading(box):
    return box.files.bytes_sent > 100_000


POINTS["mid_download"] = (downloading, ("install", "restart", "version"))


@pytest.mark.parametrize("point", list(POINTS))
def test_broker_killed_in_each_phase_the_job_still_succeeds_with_one_install(box, point):
    reached, closed = POINTS[point]
    open_gates(box, *[g for g in ALL_GATES if g not in closed])
    if point == "mid_download":
        box.files.faults.rate = 400_000  # ~5 s for the file: time to kill the broker half-way
        box.files.faults.times = 1
    data = os.urandom(2_000_000)
    path = box.add_file("fw.bin", data)
    box.create_job("job-kill", box.document("fw.bin", "2.0.0"))
    poll_for(lambda: reached(box), 60, what=f"the job to reach {point}")
    kill_broker(box)
    open_gates(box, *closed)
    final = box.wait_for_job("job-kill", timeout=90)
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
        box.logs()[-5000:]
    assert box.path("state", "install-runs").read_text().count("run") == 1
    assert sha256_of(box.path("installed", "job.bin")) == sha256_of(path)
    # the job is done: its staged copy is gone (only the installer's own record stays)
    poll_for(lambda: not list(box.path("staging").glob("job-kill*")), 10, what="the staged copy to be deleted")


def test_twenty_cancels_during_install_then_a_job_succeeds_and_nothing_is_left(box):
    """Each job is force-cancelled while its install hook runs: the hook's group
    is killed, the staged copy deleted; the installer never fills up."""
    open_gates(box, "download", "restart", "version")
    box.add_file("fw.bin", os.urandom(200_000))
    for n in range(20):
        job_id = f"job-cancel-{n}"
        box.path("state", "at-install").unlink(missing_ok=True)
        box.create_job(job_id, box.document("fw.bin", "2.0.0"))
        poll_for(lambda: box.path("state", "at-install").exists(), 30, what=f"{job_id}'s install hook")
        box.emulator.cancel_job(job_id, force=True)
        poll_for(lambda: not list(box.path("staging").glob(f"{job_id}.*")), 30,
                 what=f"{job_id}'s staged copy to be deleted")
    open_gates(box, "install")
    final = run_one(box, "job-after-cancels")
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
        box.logs()[-4000:]
    poll_for(lambda: not [p for p in box.path("staging").iterdir() if p.name.startswith("job-")], 10,
             what="an empty staging directory")
    assert not list(box.path("dl", "upparat").glob("job-*"))


def run_one(box, job_id):
    box.create_job(job_id, box.document("fw.bin", "2.0.0"))
    return box.wait_for_job(job_id, timeout=90)
