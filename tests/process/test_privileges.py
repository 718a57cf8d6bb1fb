"""Promise 4 (docs/contracts.md): the unprivileged children have uid and gid
other than 0, no capabilities and no_new_privs, read from /proc/<pid>/status
of the children the supervisor started; broker and fetcher are two different
users, each with its own primary group and no other. The installer stays root.

Only meaningful when the tests run as root: started as another user, the
supervisor runs everything as that user and there is nothing to drop.
"""

from __future__ import annotations

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


USERS = {"broker": "upparat", "fetcher": "upparat-fetch"}


def test_all_three_children_were_found(running):
    assert sorted(running[0]) == ["broker", "fetcher", "installer"]


@pytest.mark.parametrize("name", ["broker", "fetcher"])
def test_unprivileged_child_runs_as_its_own_user_with_its_own_group_only(running, name):
    status = running[0][name]
    account = pwd.getpwnam(USERS[name])
    assert ids(status["Uid"]) == [account.pw_uid] * 4  # real, effective, saved, filesystem
    assert ids(status["Gid"]) == [account.pw_gid] * 4
    assert account.pw_uid != 0 and account.pw_gid != 0
    assert ids(status["Groups"]) in ([], [account.pw_gid])


def test_broker_and_fetcher_are_different_users_in_different_groups(running):
    broker, fetcher = running[0]["broker"], running[0]["fetcher"]
    assert ids(broker["Uid"])[0] != ids(fetcher["Uid"])[0]
    assert ids(broker["Gid"])[0] != ids(fetcher["Gid"])[0]
    assert ids(broker["Gid"])[0] not in ids(fetcher["Groups"])


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

    pids = child_pids(supervisor.pid)
    assert len(pids) == 3
    for name, pid in pids.items():
        with open(f"/proc/{pid}/environ", "rb") as fh:
            keys = {item.split(b"=", 1)[0].decode() for item in fh.read().split(b"\0") if item}
        allowed = {"PATH", "LANG", "PYTHONUNBUFFERED", "PYTHONPATH"}
        if name == "fetcher":  # the service's proxy and CA settings, for downloads only
            from upparat.supervisor import FETCHER_ENV
            allowed |= set(FETCHER_ENV)
        assert keys <= allowed, name
