"""The installer's record (upparat.installer_proc.record): atomic, read back
field by field, corrupt means a clean start (never a crash), and what a
crash or power loss left behind is turned into what is true now."""

from __future__ import annotations

import json
import os

import pytest

from upparat.installer_proc import hooks, record
from upparat.installer_proc.record import Closed, JobRecord, State, StateFile
from upparat.ipc import installer_protocol as ip
from tests.installer_support import Rig, release
from tests.support import poll_for


@pytest.fixture
def state_file(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield StateFile(fd, str(tmp_path)), tmp_path
    finally:
        os.close(fd)


def a_state(**job_fields) -> State:
    job = JobRecord(job_id="job-1", execution=3, release=release(serial=4), phase=ip.OPENED)
    for name, value in job_fields.items():
        setattr(job, name, value)
    return State(boot_id="boot-a", highest_serial=9, job=job, history=[Closed("old", 1)])


def test_round_trip(state_file):
    sf, path = state_file
    state = a_state(hook=ip.HookRun("version", 2, ip.DONE, 0, 0, "1.0", "exit code 0"))
    sf.save(state)
    assert sf.load() == state
    assert sorted(os.listdir(path)) == ["state.json"]  # no temporary left


@pytest.mark.parametrize("content", [
    b"", b"\xff\xfe", b"[" * 60000, b'{"v": 1}', b"1" * 5000,
    json.dumps({"v": 1, "boot_id": "b", "highest_serial": 3, "history": [], "job": {"job_id": "../x"}}).encode(),
    json.dumps({"v": 1, "boot_id": "b", "highest_serial": 3, "history": [{"job_id": "a", "execution": True}],
                "job": None}).encode(),
])
def test_a_corrupt_record_gives_a_clean_start_and_keeps_a_readable_serial(state_file, content, caplog):
    sf, path = state_file
    (path / "state.json").write_bytes(content)
    state = sf.load()
    assert state.job is None and state.history == []
    assert "starting with a clean record" in caplog.text
    if b'"highest_serial": 3' in content:
        assert state.highest_serial == 3


def test_a_record_with_a_bad_phase_is_corrupt(state_file):
    sf, path = state_file
    sf.save(a_state())
    body = json.loads((path / "state.json").read_text())
    body["job"]["phase"] = "pwned"
    (path / "state.json").write_text(json.dumps(body))
    assert sf.load().job is None


def test_a_symlinked_record_is_not_followed(state_file, tmp_path_factory):
    sf, path = state_file
    elsewhere = tmp_path_factory.mktemp("x") / "state.json"
    elsewhere.write_bytes(record.encode(a_state()))
    (path / "state.json").symlink_to(elsewhere)
    assert sf.load().job is None


def no_kill(job):
    raise AssertionError("nothing to kill")


@pytest.mark.parametrize("before, after, begun", [
    (ip.INSTALLING, ip.INSTALL_INTERRUPTED, "install_begun"),
    (ip.STAGING, ip.OPENED, "stage_begun"),
])
def test_recover_an_interrupted_step_may_run_again(before, after, begun):
    state = a_state(phase=before, **{begun: True})
    state.job.hook = ip.HookRun("install", 0, ip.RUNNING, None, 0, "", "")
    record.recover(state, "boot-b", no_kill)
    assert state.job.phase == after and getattr(state.job, begun) is False
    assert "the device restarted" in state.job.message
    assert state.job.hook is None and state.boot_id == "boot-b"


def test_recover_restarting_after_a_reboot_is_restarted_and_not_run_again():
    state = a_state(phase=ip.RESTARTING, restart_begun=True)
    record.recover(state, "boot-b", no_kill)
    assert (state.job.phase, state.job.restart_begun) == (ip.RESTARTED, True)


def test_recover_restarting_in_the_same_boot_is_restart_interrupted_and_may_run_again():
    state = a_state(phase=ip.RESTARTING, restart_begun=True)
    record.recover(state, state.boot_id, no_kill)
    assert (state.job.phase, state.job.restart_begun) == (ip.RESTART_INTERRUPTED, False)


def test_recover_forgets_a_running_read_only_hook():
    state = a_state(hook=ip.HookRun("version", 1, ip.RUNNING, None, 0, "", ""))
    record.recover(state, "boot-b", no_kill)
    assert state.job.phase == ip.OPENED and state.job.hook is None


def test_recover_kills_leftovers_only_in_the_same_boot():
    killed = []
    state = a_state(phase=ip.INSTALLING, hook_pgid=1234, hook_token="f" * 32)
    record.recover(state, "boot-a", killed.append)
    assert len(killed) == 1 and state.job.hook_pgid is None and state.job.hook_token is None
    state = a_state(phase=ip.INSTALLING, hook_pgid=1234, hook_token="f" * 32)
    record.recover(state, "boot-b", no_kill)  # another boot: that group id means nothing now


def test_an_installer_restart_mid_install_reports_install_interrupted_and_verifies_again(world_tmp):
    rig = Rig(world_tmp, hooks={"install": "sleep 300"})
    rig.download()
    rig.open(release())
    rig.stage()
    rig.settle()
    rig.hook("install")
    token = rig.installer.state.job.hook_token
    poll_for(lambda: hooks._members(None, token), 10, what="the install hook to run")
    # The installer "dies": a new one starts over the same directory while the hook still runs.
    rig.installer.stopping = True
    old = rig.installer
    rig.start()
    try:
        state = rig.query()
        assert state.phase == ip.INSTALL_INTERRUPTED
        old.worker.join(10)  # its hook was killed by the new installer's start-up, found by its marker
        assert not old.worker.alive() and hooks._members(None, token) == []
        # The staged file is hashed again before the install hook runs: tampering is caught.
        staged = rig.layout.staging_dir / "job-1.1"
        staged.chmod(0o600)
        staged.write_bytes(b"x" * staged.stat().st_size)
        rig.hook("install")
        state = rig.settle()
        assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    finally:
        rig.close()


def test_a_discard_cut_off_by_a_crash_is_completed_at_start_up(world_tmp):
    rig = Rig(world_tmp)
    try:
        rig.download()
        rig.open(release())
        rig.stage()
        rig.settle()
        job = rig.installer.state.job
        job.discarding = True
        rig.installer._save()
        rig.start()
        assert rig.query().phase == ip.DISCARDED
        assert rig.staged_files() == []
    finally:
        rig.close()
