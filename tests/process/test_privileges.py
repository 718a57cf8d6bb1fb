"""Promise 4 (DESIGN.md section 3): the unprivileged children have uid and gid
other than 0, no capabilities and no_new_privs, read from /proc/<pid>/status
of the children the supervisor started. The installer stays root.

Only meaningful when the tests run as root: started as another user, the
supervisor runs everything as that user and there is nothing to drop.
"""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from tests.process.test_supervisor import all_three, start_supervisor, write_config
from tests.support import poll_for, proc_status

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="privilege separation happens only when upparat-supervisor starts as root; run the tests as root")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One supervisor with its three children for all tests of this module."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.support import start_mosquitto

    world = Path(tempfile.mkdtemp(prefix="upparat-priv-", dir="/tmp"))
    world.chmod(0o755)
    mosquitto, port = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    supervisor = start_supervisor(world, write_config(world, port))
    try:
        pids = all_three(supervisor)
        # The child drops the last bits itself (no_new_privs) first thing
        # after exec: read its status once it says it started.
        for name, pid in pids.items():
            poll_for(lambda: f"upparat-{name}[{pid}] INFO upparat.launch: started as uid" in supervisor.log(),
                     15, what=f"{name} to start")
        yield {name: proc_status(pid) for name, pid in pids.items()}, supervisor
    finally:
        supervisor.stop()
        mosquitto.stop()
        shutil.rmtree(world, ignore_errors=True)


def ids(line: str) -> list[int]:
    return [int(x) for x in line.split()]


@pytest.mark.parametrize("name", ["broker", "fetcher"])
def test_unprivileged_child_has_no_root_ids(running, name):
    status = running[0][name]
    uid, gid = pwd.getpwnam("upparat").pw_uid, grp.getgrnam("upparat").gr_gid
    assert ids(status["Uid"]) == [uid] * 4  # real, effective, saved, filesystem
    assert ids(status["Gid"]) == [gid] * 4
    assert 0 not in ids(status["Groups"])
    assert ids(status["Groups"]) in ([], [gid])


@pytest.mark.parametrize("name", ["broker", "fetcher"])
def test_unprivileged_child_has_no_capabilities_and_no_new_privs(running, name):
    status = running[0][name]
    for key in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
        assert status[key] == "0000000000000000", key
    assert status["NoNewPrivs"] == "1"


def test_installer_stays_root(running):
    status = running[0]["installer"]
    assert ids(status["Uid"])[0] == 0
    assert ids(status["Uid"])[1] == 0


def test_children_get_a_minimal_environment(running):
    _, supervisor = running
    from tests.support import child_pids

    for name, pid in child_pids(supervisor.pid).items():
        with open(f"/proc/{pid}/environ", "rb") as fh:
            keys = {item.split(b"=", 1)[0].decode() for item in fh.read().split(b"\0") if item}
        assert keys <= {"PATH", "LANG", "PYTHONUNBUFFERED", "PYTHONPATH"}, name
