"""upparat-supervisor as a real process: command line, configuration errors,
directories, starting, restarting and stopping its three children.

As root the children run separated (broker and fetcher as the upparat user);
otherwise everything runs as the current user. Each test stops what it
started by PID.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import stat
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, Proc, child_pids, pid_alive, poll_for

IS_ROOT = os.geteuid() == 0
NAMES = {"broker", "fetcher", "installer"}
START_TIMEOUT = 20.0  # three fresh interpreters on a slow device


def write_config(world_tmp: Path, port: int, extra: dict[str, str] | None = None) -> Path:
    """A valid configuration; ``extra`` adds lines to a section: {"hooks": "install = /x"}."""
    path = world_tmp / "upparat.conf"
    text = textwrap.dedent(f"""\
        [service]
        log_level = INFO
        download_location = {world_tmp}/dl
        staging_location = {world_tmp}/staging

        [broker]
        host = 127.0.0.1
        port = {port}
        thing_name = supervisor-test

        [supervisor]
        runtime_dir = {world_tmp}/run
        """)
    for section, lines in (extra or {}).items():
        if f"[{section}]\n" in text:
            text = text.replace(f"[{section}]\n", f"[{section}]\n{lines}\n", 1)
        else:
            text += f"\n[{section}]\n{lines}\n"
    path.write_text(text)
    return path


def start_supervisor(world_tmp: Path, config: Path, *args: str) -> Proc:
    return Proc([PYTHON, "-m", "upparat.supervisor", "-c", config, *args], world_tmp / "supervisor.log",
                cwd=REPO)


def finished(proc: Proc, timeout: float = 15.0) -> int:
    """Wait (bounded) for a process that should exit by itself; its exit code."""
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.argv} still running after {timeout}s:\n{proc.log()}") from None


def all_three(proc: Proc) -> dict[str, int]:
    """The PIDs of broker, fetcher and installer once all three run."""
    def check():
        pids = child_pids(proc.pid)
        return pids if set(pids) == NAMES else not proc.alive()
    try:
        result = poll_for(check, START_TIMEOUT, what="broker, fetcher and installer")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- supervisor log ---\n{proc.log()}") from None
    if result is True:
        raise AssertionError(f"supervisor exited with {proc.popen.returncode}:\n{proc.log()}")
    return result


@pytest.fixture
def supervisor(world_tmp, mosquitto):
    proc = start_supervisor(world_tmp, write_config(world_tmp, mosquitto))
    try:
        yield proc
    finally:
        proc.stop()


# -- command line and configuration ----------------------------------------------


def test_missing_config_option_exits_2(world_tmp):
    proc = Proc([PYTHON, "-m", "upparat.supervisor"], world_tmp / "noargs.log", cwd=REPO)
    try:
        assert finished(proc) == 2
        assert "-c/--config-file" in proc.log()
    finally:
        proc.stop()


@pytest.mark.parametrize("extra, names", [
    ({"broker": "colour = red"}, "[broker] colour: unknown key"),
    ({}, "[broker] port: 70000 is out of range"),
    ({"hooks": "install = /nonexistent/upparat-install-hook"}, "[hooks] install: /nonexistent"),
    pytest.param({"supervisor": "user = upparat-no-such-user"},
                 "[supervisor] user: no such user 'upparat-no-such-user'. Fix: create it",
                 marks=pytest.mark.skipif(not IS_ROOT, reason="users are resolved only as root")),
], ids=["unknown-key", "bad-port", "missing-hook", "unknown-user"])
def test_bad_configuration_exits_2_naming_the_key(world_tmp, extra, names):
    config = write_config(world_tmp, 70000 if "port" in names else 1883, extra)
    proc = start_supervisor(world_tmp, config)
    try:
        assert finished(proc) == 2, proc.log()
        log = proc.log()
        assert names in log
        assert "Fix:" in log
        assert f"upparat-supervisor[{proc.pid}]" in log
        assert not child_pids(proc.pid)
    finally:
        proc.stop()


def test_symlink_in_place_of_a_directory_is_refused(world_tmp):
    (world_tmp / "run").mkdir()
    elsewhere = world_tmp / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (world_tmp / "run" / "fetcher").symlink_to(elsewhere)
    before = elsewhere.stat()
    proc = start_supervisor(world_tmp, write_config(world_tmp, 1883))
    try:
        assert finished(proc) == 2, proc.log()
        assert "[supervisor] runtime_dir" in proc.log()
        assert "is a symbolic link" in proc.log()
        after = elsewhere.stat()
        assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    finally:
        proc.stop()


@pytest.mark.skipif(not IS_ROOT, reason="the ownership check applies when started as root")
def test_config_writable_by_others_is_refused_as_root(world_tmp):
    config = write_config(world_tmp, 1883)
    config.chmod(0o666)
    proc = start_supervisor(world_tmp, config)
    try:
        assert finished(proc) == 2, proc.log()
        assert "writable by others" in proc.log()
    finally:
        proc.stop()


# -- directories -----------------------------------------------------------------------


def expected_dirs(world_tmp: Path) -> dict[Path, tuple[int, int, int]]:
    """The layout of upparat/ipc/settings.py."""
    if IS_ROOT:
        uid, gid = pwd.getpwnam("upparat").pw_uid, grp.getgrnam("upparat").gr_gid
        fuid, fgid = pwd.getpwnam("upparat-fetch").pw_uid, grp.getgrnam("upparat-fetch").gr_gid
        root_uid, root_gid = 0, 0
    else:
        uid, gid = os.getuid(), os.getgid()
        fuid, fgid = uid, gid
        root_uid, root_gid = uid, gid
    return {
        world_tmp / "run": (root_uid, root_gid, 0o755),
        world_tmp / "run" / "fetcher": (fuid, gid, 0o2750),
        world_tmp / "run" / "installer": (root_uid, gid, 0o750),
        world_tmp / "run" / "control": (root_uid, gid, 0o750),
        world_tmp / "dl" / "upparat": (fuid, fgid, 0o700),
        world_tmp / "staging": (root_uid, root_gid, 0o700),
    }


@pytest.mark.parametrize("preexisting", [False, True], ids=["fresh", "preexisting-0777"])
def test_directories_get_their_owners_and_modes(world_tmp, mosquitto, preexisting):
    expected = expected_dirs(world_tmp)
    if preexisting:
        for path in expected:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # owned by whoever runs the tests: root:root as root
    (world_tmp / "dl").mkdir(exist_ok=True)
    (world_tmp / "dl").chmod(0o1777)  # like /tmp: used, never chowned or chmodded
    proc = start_supervisor(world_tmp, write_config(world_tmp, mosquitto))
    try:
        poll_for(lambda: child_pids(proc.pid) or (not proc.alive() and proc.log()),
                 START_TIMEOUT, what="the first child")
        assert proc.alive(), proc.log()
        actual = {}
        for path in expected:
            st = path.lstat()
            assert stat.S_ISDIR(st.st_mode), path
            actual[path] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode) | (st.st_mode & stat.S_ISGID))
        assert actual == expected
        assert stat.S_IMODE((world_tmp / "dl").stat().st_mode) == 0o1777
    finally:
        proc.stop()


# -- children -----------------------------------------------------------------------------


def test_starts_three_children_and_sigterm_stops_them_all(supervisor):
    pids = all_three(supervisor)
    if not IS_ROOT:
        assert "privilege separation is OFF" in supervisor.log()
    os.kill(supervisor.pid, signal.SIGTERM)
    assert finished(supervisor) == 0, supervisor.log()
    for name, pid in pids.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) outlived the supervisor"


def test_each_child_killed_in_turn_is_restarted_and_the_supervisor_stays_up(supervisor):
    pids = all_three(supervisor)
    for victim in ("installer", "fetcher", "broker"):
        before = pids
        os.kill(before[victim], signal.SIGKILL)

        def replaced():
            now = child_pids(supervisor.pid)
            return now if set(now) == NAMES and now[victim] != before[victim] else None
        pids = poll_for(replaced, 10.0, what=f"a new {victim}")
        assert supervisor.alive(), supervisor.log()
        assert {n: p for n, p in pids.items() if n != victim} == {n: p for n, p in before.items() if n != victim}
        assert not pid_alive(before[victim])  # reaped, not a zombie
        assert f"{victim} (pid {before[victim]}) was killed by SIGKILL; restarting" in supervisor.log()
    os.kill(supervisor.pid, signal.SIGTERM)
    assert finished(supervisor) == 0, supervisor.log()
    assert not any(pid_alive(p) for p in pids.values())


def test_sighup_restarts_all_children(supervisor):
    before = all_three(supervisor)
    os.kill(supervisor.pid, signal.SIGHUP)

    def all_new():
        now = child_pids(supervisor.pid)
        return now if set(now) == NAMES and not set(now.values()) & set(before.values()) else None
    after = poll_for(all_new, START_TIMEOUT, what="three new children after SIGHUP")
    assert supervisor.alive()
    assert not any(pid_alive(p) for p in before.values())
    os.kill(supervisor.pid, signal.SIGTERM)
    assert finished(supervisor) == 0, supervisor.log()
    assert not any(pid_alive(p) for p in after.values())


def test_notifies_systemd_ready_after_start_and_stopping_on_stop(world_tmp, mosquitto):
    address = str(world_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(START_TIMEOUT)
        env = dict(os.environ, NOTIFY_SOCKET=address)
        proc = Proc([PYTHON, "-m", "upparat.supervisor", "-c", write_config(world_tmp, mosquitto)],
                    world_tmp / "supervisor.log", cwd=REPO, env=env)
        try:
            ready = sock.recv(4096).decode()
            assert ready.startswith("READY=1\n")
            assert child_pids(proc.pid)  # READY=1 comes after the children were started
            os.kill(proc.pid, signal.SIGTERM)
            assert sock.recv(4096).decode() == "STOPPING=1"
            assert finished(proc) == 0, proc.log()
        finally:
            proc.stop()


# -- the supervisor's loop with stand-in children (structural faults, stop timeout) --

STUB = """\
import json, os, signal, sys, time
envelope = json.loads(sys.stdin.read())
behaviour = sys.argv[0].rsplit("/", 1)[-1][:-3]
with open(os.path.join({outdir!r}, behaviour + ".pid"), "w") as fh:
    fh.write(str(os.getpid()))
if behaviour == "unsafe":
    time.sleep(0.3)
    sys.exit(3)
if behaviour == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(1)
"""


def run_with_stubs(world_tmp, monkeypatch, behaviours, stop_after=None, stop_timeout=10.0):
    """Run a Supervisor in this process with stand-in child modules; returns
    (exit code, {behaviour: pid})."""
    from upparat import supervisor as sv

    pkg = world_tmp / "stubkids"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for behaviour in behaviours:
        (pkg / f"{behaviour}.py").write_text(STUB.format(outdir=str(world_tmp)))
    os.chmod(world_tmp, 0o755)
    monkeypatch.setenv("PYTHONPATH", str(world_tmp))
    settings = sv.load_settings(str(write_config(world_tmp, 1883)), None)
    specs = tuple(sv.ChildSpec(b, f"stubkids.{b}", sv.ROOT, ()) for b in behaviours)
    sup = sv.Supervisor(settings, verbose=True, thing_name=None, specs=specs, stop_timeout=stop_timeout)
    pidfiles = {b: world_tmp / f"{b}.pid" for b in behaviours}
    stopper = None
    if stop_after:
        def send_sigterm_when_up():  # a real SIGTERM to this process, handled by the supervisor's queue
            poll_for(lambda: all(p.exists() and p.read_text() for p in pidfiles.values()), 10,
                     what="stub children")
            if sup._wake_w >= 0 and sup.exit_code is None:
                os.kill(os.getpid(), signal.SIGTERM)
        stopper = threading.Thread(target=send_sigterm_when_up, daemon=True)
        stopper.start()
    try:
        code = sup.run()
    finally:
        for child in sup.children:  # never leave a stub behind, whatever happened
            if child.popen and child.popen.poll() is None:
                child.popen.kill()
                child.popen.wait(5)
        if stopper:
            stopper.join(15)
    return code, {b: int(p.read_text()) for b, p in pidfiles.items() if p.exists()}


def test_a_child_exiting_unsafe_stops_everything_and_exits_1(world_tmp, monkeypatch, caplog):
    code, pids = run_with_stubs(world_tmp, monkeypatch, ["idle", "unsafe"])
    assert code == 1
    assert "unsafe (pid" in caplog.text and "structural fault" in caplog.text
    assert set(pids) == {"idle", "unsafe"}
    assert not pid_alive(pids["idle"])


def test_a_child_ignoring_sigterm_is_killed_after_the_stop_timeout(world_tmp, monkeypatch, caplog):
    code, pids = run_with_stubs(world_tmp, monkeypatch, ["stubborn", "idle"], stop_after=True,
                                stop_timeout=1.0)
    assert code == 0
    assert "stubborn (pid %d) did not stop within 1 s; killing it" % pids["stubborn"] in caplog.text
    assert not pid_alive(pids["stubborn"]) and not pid_alive(pids["idle"])


def test_a_child_that_finds_the_configuration_unusable_makes_the_supervisor_exit_2(world_tmp):
    """A public key file that is not a key: the installer exits EXIT_USAGE;
    the supervisor must exit 2 (systemd's RestartPreventExitStatus=2), not 1."""
    key = world_tmp / "not-a-key.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    config = write_config(world_tmp, 1883, {"verification": f"public_keys = {key}"})
    proc = start_supervisor(world_tmp, config)
    try:
        assert finished(proc) == 2, proc.log()
        assert "public_keys" in proc.log()
    finally:
        proc.stop()
