"""The real upparat-supervisor program supervising stand-in children.

The stand-ins ("stubs") are tiny modules that start exactly like the real
children (``launch.start_child``: parent-death signal, privilege drop and
checks, the settings envelope, the status pipe) and then behave as a test
needs: beat, crash, hang, report busy or progress, raise. The supervisor runs
as its own process, with its constants shortened by a small wrapper, so that
real signals (SIGSTOP, SIGHUP, SIGTERM, SIGKILL) hit real processes. Every
process is stopped by PID; every wait polls an observable condition until a
deadline.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.process.test_supervisor import write_config
from tests.support import PYTHON, REPO, Proc, pid_alive, poll_for

IS_ROOT = os.geteuid() == 0

# Shortened for the tests; production values are in upparat/supervisor.py.
HEARTBEAT_TIMEOUT = 2.0
BACKOFF = dict(backoff_initial=0.2, backoff_factor=2.0, backoff_max=1.6)
STOP_TIMEOUT = 3.0

STUB = '''\
import json, logging, os, sys, time
from upparat import launch

OUT = {outdir!r}
BEHAVIOUR = {behaviour!r}
ROLE = {role!r}

ctx = launch.start_child(ROLE, unprivileged=ROLE != "installer")
me = os.getpid()
with open(os.path.join(OUT, f"{{ROLE}}.{{me}}.start"), "w") as fh:
    json.dump({{"sentry_imported": "sentry_sdk" in sys.modules, "uid": os.getuid()}}, fh)
log = logging.getLogger("upparat." + ROLE)

if BEHAVIOUR == "crash":
    sys.exit(1)
if BEHAVIOUR == "usage":
    print("upparat-" + ROLE + ": configuration error: [verification] public_keys: stub says unusable",
          file=sys.stderr)
    sys.exit(2)
if BEHAVIOUR == "raise":
    time.sleep(0.2)
    raise RuntimeError("stub exploded in " + ROLE)
if BEHAVIOUR == "garbage":
    fd = ctx.heartbeat._fd
    while True:  # a compromised child: never a valid line
        os.write(fd, b"{{not json\\n")
        os.write(fd, b"x" * 5000 + b"\\n")
        time.sleep(0.2)
if BEHAVIOUR == "logerror":
    log.error("stub installer error for sentry")
relay = None
if ctx.problems_fd is not None:  # the broker relays the root processes' errors, as the real one does
    from upparat.broker_proc.problems import ProblemRelay
    relay = ProblemRelay(ctx.problems_fd, ctx.config.broker.thing_name, ctx.problems_rest)

done = 0
while not ctx.stop.is_set():
    if BEHAVIOUR == "busy":
        busy = os.path.exists(os.path.join(OUT, "busy"))
        ctx.heartbeat.beat(busy=busy, job_id="job-1", execution=1, phase="install" if busy else "idle")
    elif BEHAVIOUR == "progress":
        done += 4096
        ctx.heartbeat.beat(job_id="job-1", execution=1, phase="download", bytes_done=done,
                           bytes_total=10**9, rate=20480)
    elif BEHAVIOUR == "job":
        ctx.heartbeat.beat(job_id="job-1", execution=1, phase="download", subscribed=True)
    else:
        ctx.heartbeat.beat(subscribed=True)
    if relay is not None and relay.open:
        relay.read_ready()
    ctx.stop.wait(0.2)
sys.exit(0)
'''

WRAPPER = '''\
import sys
from upparat import supervisor as sv
from upparat.supervision import Policy

sv.CHILDREN = tuple(sv.ChildSpec(role, "stubkids." + module, runs_as, receives)
                    for role, module, runs_as, receives in {specs!r})
sv.POLICY = Policy(running_after=2.0, heartbeat_timeout={heartbeat!r}, first_beat_within=15.0, **{backoff!r})
sv.STOP_TIMEOUT = {stop!r}
sys.exit(sv.main(sys.argv[1:]))
'''

RUNS_AS = {"installer": "root", "fetcher": "fetcher user", "broker": "broker user"}
RECEIVES = {"installer": ("public_keys",), "fetcher": ("public_keys",), "broker": ("tls", "problems")}


class Rig:
    """A supervisor process with stub children, and what they left behind."""

    def __init__(self, base: Path, behaviours: dict[str, str], config_extra: dict | None = None,
                 env: dict | None = None, args: tuple = ()):
        self.base = base
        self.out = base / "out"
        self.out.mkdir(mode=0o777, exist_ok=True)
        self.out.chmod(0o777)  # the unprivileged stubs write here too
        pkg = base / "stubkids"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text("")
        specs = []
        for role, behaviour in behaviours.items():
            module = f"{role}_{behaviour}"
            (pkg / f"{module}.py").write_text(STUB.format(outdir=str(self.out), behaviour=behaviour, role=role))
            specs.append((role, module, RUNS_AS[role], RECEIVES[role]))
        wrapper = base / "run_supervisor.py"
        wrapper.write_text(WRAPPER.format(specs=specs, heartbeat=HEARTBEAT_TIMEOUT, backoff=BACKOFF,
                                          stop=STOP_TIMEOUT))
        base.chmod(0o755)
        self.config = write_config(base, 1883, config_extra)
        environ = dict(os.environ, PYTHONPATH=f"{base}:{REPO}")
        environ.update(env or {})
        self.proc = Proc([PYTHON, wrapper, "-c", self.config, *args], base / "supervisor.log", cwd=REPO,
                         env=environ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.proc.log()

    def children(self) -> dict[str, int]:
        """Live (non-zombie) children by role, from their command lines."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as fh:
                pids = [int(p) for p in fh.read().split()]
        except FileNotFoundError:
            return {}
        found = {}
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if not pid_alive(pid):
                continue
            for arg in argv:
                match = re.fullmatch(rb"stubkids\.(\w+?)_\w+", arg)
                if match:
                    found[match.group(1).decode()] = pid
        return found

    def wait_children(self, names, timeout: float = 20.0) -> dict[str, int]:
        def check():
            if not self.proc.alive():
                raise AssertionError(f"supervisor exited with {self.proc.popen.returncode}:\n{self.log()}")
            pids = self.children()
            return pids if set(names) <= set(pids) else None
        try:
            return poll_for(check, timeout, what=f"children {sorted(names)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- supervisor log ---\n{self.log()}") from None

    def ctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
        argv = [str(Path(PYTHON).parent / "upparatctl"), "-c", str(self.config), *args]
        kwargs = {}
        if user:
            kwargs = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/", **kwargs)

    def snapshot(self) -> dict:
        result = self.ctl("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def finished(self, timeout: float) -> int:
        try:
            return self.proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout}s:\n{self.log()}") from None

    def stop(self) -> None:
        pids = self.children()
        self.proc.stop()
        for pid in pids.values():  # never leave one behind, whatever the test did
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def rig(world_tmp):
    rigs = []

    def make(behaviours, **kwargs):
        r = Rig(world_tmp, behaviours, **kwargs)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.stop()


ALL_BEAT = {"installer": "beat", "fetcher": "beat", "broker": "beat"}


# -- restarts and heartbeats ---------------------------------------------------------


def test_crash_loop_backs_off_with_growing_delays_up_to_the_cap(rig):
    r = rig({"installer": "beat", "fetcher": "crash", "broker": "beat"})
    pattern = re.compile(r"fetcher \(pid \d+\) exited with code 1 \(EXIT_FAILURE\); restarting in ([\d.]+) s")

    def delays():
        found = [float(d) for d in pattern.findall(r.log())]
        return found if len(found) >= 6 else None
    try:
        found = poll_for(delays, 30, what="six fetcher restarts")
    except AssertionError:
        raise AssertionError(r.log()[-3000:]) from None
    # Logged after the exit is reaped, so a few ms of the delay may already be gone.
    expected = [0.2, 0.4, 0.8, 1.6, 1.6, 1.6]
    assert found[:6] == pytest.approx(expected, abs=0.11), found
    states = {c["name"]: c for c in r.snapshot()["children"]}
    assert states["fetcher"]["state"] in ("BACKOFF", "STARTING")
    assert states["fetcher"]["restarts"] >= 5  # six exits: five restarts done, the sixth pending
    assert states["installer"]["state"] == "RUNNING" and states["installer"]["restarts"] == 0


def test_a_stopped_child_is_killed_and_restarted_within_the_heartbeat_bound(rig):
    r = rig(ALL_BEAT)
    before = r.wait_children(["installer", "fetcher", "broker"])
    poll_for(lambda: r.snapshot()["supervisor"]["ready"], 10, what="all children beating")
    os.kill(before["fetcher"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    # bound: heartbeat timeout + one loop turn (MAX_POLL 1 s) + backoff + interpreter start
    bound = HEARTBEAT_TIMEOUT + 1.0 + BACKOFF["backoff_initial"] + 5.0

    def replaced():
        now = r.children()
        return now if now.get("fetcher") not in (None, before["fetcher"]) else None
    after = poll_for(replaced, bound, what="a new fetcher after SIGSTOP")
    assert time.monotonic() - stopped_at >= HEARTBEAT_TIMEOUT
    assert not pid_alive(before["fetcher"])
    assert f"fetcher (pid {before['fetcher']}) sent no heartbeat for" in r.log()
    assert "after it stopped beating" in r.log()
    assert after["installer"] == before["installer"] and after["broker"] == before["broker"]


def test_garbage_on_the_status_pipe_is_refused_and_is_no_heartbeat(rig):
    r = rig({"installer": "beat", "fetcher": "garbage", "broker": "beat"})
    first = r.wait_children(["fetcher"])["fetcher"]

    def replaced():
        now = r.children().get("fetcher")
        return now if now not in (None, first) else None
    poll_for(replaced, HEARTBEAT_TIMEOUT + 10, what="the garbage-writing fetcher replaced")
    log = r.log()
    assert f"fetcher (pid {first}): status line refused (not JSON" in log
    assert "status line refused (line longer than 4095 bytes)" in log
    assert f"fetcher (pid {first}) sent no heartbeat for" in log
    assert r.proc.alive()


# -- structural faults, stop, kill -------------------------------------------------------


def test_a_child_reporting_an_unusable_configuration_makes_the_supervisor_exit_2(rig):
    r = rig({"installer": "beat", "fetcher": "beat", "broker": "usage"})
    assert r.finished(20) == 2, r.log()
    assert "EXIT_USAGE" in r.log() and "stub says unusable" in r.log()
    assert not r.children()


def test_sigterm_stops_every_child_within_the_bound_and_exits_0(rig):
    r = rig({"installer": "beat", "fetcher": "progress", "broker": "job"})
    pids = r.wait_children(["installer", "fetcher", "broker"])
    started = time.monotonic()
    os.kill(r.pid, signal.SIGTERM)
    assert r.finished(STOP_TIMEOUT + 5 + 2) == 0, r.log()
    assert time.monotonic() - started < STOP_TIMEOUT + 5
    for name, pid in pids.items():
        assert not pid_alive(pid), f"{name} outlived the supervisor"


def test_kill_9_of_the_supervisor_leaves_no_child_behind(rig):
    r = rig(ALL_BEAT)
    pids = r.wait_children(["installer", "fetcher", "broker"])
    os.kill(r.pid, signal.SIGKILL)
    r.proc.popen.wait(5)
    poll_for(lambda: not any(pid_alive(p) for p in pids.values()), 5,
             what="every child gone after SIGKILL of the supervisor")


def test_sighup_while_the_installer_is_busy_waits_for_it_then_restarts_the_children(rig):
    r = rig({"installer": "busy", "fetcher": "beat", "broker": "job"})
    busy = r.out / "busy"
    busy.write_text("a hook runs")
    before = r.wait_children(["installer", "fetcher", "broker"])
    poll_for(lambda: (r.snapshot()["job"] or {}).get("busy"), 10, what="the installer reporting busy")
    os.kill(r.pid, signal.SIGHUP)
    poll_for(lambda: "reload deferred: the installer is busy" in r.log(), 10, what="the deferral")
    snap = r.snapshot()
    assert snap["supervisor"]["reload_pending"] is True
    assert r.children() == before, "a child was restarted while the installer was busy"
    assert "stopping installer" not in r.log()
    busy.unlink()  # the hook ends

    def all_new():
        now = r.children()
        return now if set(now) == set(before) and not set(now.values()) & set(before.values()) else None
    poll_for(all_new, 20, what="three new children after the hook ended")
    assert r.log().index("reload deferred") < r.log().index("stopping installer")
    assert r.snapshot()["supervisor"]["reload_pending"] is False


def test_sighup_with_a_broken_configuration_keeps_the_children(rig):
    r = rig(ALL_BEAT)
    before = r.wait_children(["installer", "fetcher", "broker"])
    r.config.write_text(r.config.read_text() + "\n[broker]\ncolour = red\n")
    os.kill(r.pid, signal.SIGHUP)
    poll_for(lambda: "keeping the running configuration" in r.log(), 10, what="the refusal")
    assert r.children() == before and r.proc.alive()


# -- systemd notifications -----------------------------------------------------------------


def test_ready_after_every_child_beat_then_status_and_watchdog(world_tmp, rig):
    address = str(world_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        r = rig({"installer": "beat", "fetcher": "progress", "broker": "job"},
                env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
        messages = []

        def seen(prefix):
            while not any(m.startswith(prefix) for m in messages):
                messages.extend(sock.recv(4096).decode().split("\n"))
            return True
        seen("READY=1")
        assert set(r.children()) == {"installer", "fetcher", "broker"}
        seen("STATUS=job job-1 (execution 1): download")
        watchdogs = messages.count("WATCHDOG=1")
        deadline = time.monotonic() + 5
        while messages.count("WATCHDOG=1") < watchdogs + 3 and time.monotonic() < deadline:
            messages.extend(sock.recv(4096).decode().split("\n"))
        assert messages.count("WATCHDOG=1") >= watchdogs + 3
        status = [m for m in messages if m.startswith("STATUS=job")][-1]
        assert re.search(r"KiB of 953\.7 MiB at 20\.0 KiB/s", status), status
        os.kill(r.pid, signal.SIGTERM)
        seen("STOPPING=1")
        assert r.finished(15) == 0


# -- upparatctl status ---------------------------------------------------------------------------


def test_upparatctl_status_json_shape_and_growing_progress(rig):
    r = rig({"installer": "beat", "fetcher": "progress", "broker": "job"})
    pids = r.wait_children(["installer", "fetcher", "broker"])
    first = poll_for(lambda: (s := r.snapshot())["job"] and s["job"]["bytes_done"]
                     and all(c["last_beat_age"] is not None for c in s["children"]) and s, 10,
                     what="progress in the status, every child having beaten")
    assert first["v"] == 1
    assert set(first["supervisor"]) == {"pid", "uptime", "separated", "ready", "reload_pending", "config"}
    assert first["supervisor"]["pid"] == r.pid
    assert first["supervisor"]["separated"] is IS_ROOT
    assert [c["name"] for c in first["children"]] == ["installer", "fetcher", "broker"]
    for child in first["children"]:
        assert set(child) == {"name", "state", "pid", "uptime", "restarts", "last_beat_age", "status"}
        assert child["pid"] == pids[child["name"]]
        assert child["state"] in ("STARTING", "RUNNING") and child["restarts"] == 0
        assert child["uptime"] >= 0 and 0 <= child["last_beat_age"] < HEARTBEAT_TIMEOUT
    assert set(first["job"]) == {"job_id", "execution", "phase", "busy", "bytes_done", "bytes_total", "rate"}
    assert first["job"]["job_id"] == "job-1" and first["job"]["phase"] == "download"
    assert first["job"]["bytes_total"] == 10**9 and first["job"]["rate"] == 20480
    second = poll_for(lambda: (s := r.snapshot())["job"]["bytes_done"] > first["job"]["bytes_done"] and s, 10,
                      what="a growing byte count")
    assert second["job"]["job_id"] == first["job"]["job_id"]
    table = r.ctl("status")
    assert table.returncode == 0, table.stderr
    assert re.search(r"^fetcher\s+(STARTING|RUNNING)\s+%d\s" % pids["fetcher"], table.stdout, re.M), table.stdout
    assert "job job-1 (execution 1): download" in table.stdout and "KiB/s" in table.stdout


@pytest.mark.skipif(not IS_ROOT, reason="needs the two users made by scripts/bootstrap, as root")
def test_the_control_socket_is_reachable_by_root_and_the_broker_group_only(rig):
    r = rig(ALL_BEAT)
    r.wait_children(["installer", "fetcher", "broker"])
    sock_path = r.base / "run" / "control" / "control.sock"
    poll_for(sock_path.exists, 10, what="the control socket")
    st, dir_st = sock_path.stat(), sock_path.parent.stat()
    broker_gid = pwd.getpwnam("upparat").pw_gid
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, broker_gid, 0o660)
    assert (dir_st.st_uid, dir_st.st_gid, dir_st.st_mode & 0o777) == (0, broker_gid, 0o750)
    # A user outside the group: EACCES from connect(2) itself.
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             f"try:\n    s.connect({str(sock_path)!r})\nexcept OSError as e:\n    sys.exit(e.errno)\n")
    outsider = pwd.getpwnam("upparat-fetch")
    result = subprocess.run([PYTHON, "-c", probe], user=outsider.pw_uid, group=outsider.pw_gid,
                            extra_groups=[], timeout=30, cwd="/")
    assert result.returncode == 13  # EACCES
    refused = r.ctl("status", user="upparat-fetch")
    assert refused.returncode == 1 and "permission denied" in refused.stderr
    member = r.ctl("status", "--json", user="upparat")
    assert member.returncode == 0, member.stderr
    assert json.loads(member.stdout)["supervisor"]["pid"] == r.pid


def test_upparatctl_without_a_supervisor_says_so_and_exits_1(world_tmp):
    config = write_config(world_tmp, 1883)
    result = subprocess.run([str(Path(PYTHON).parent / "upparatctl"), "-c", str(config), "status"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "is not running" in result.stderr
    bad = subprocess.run([str(Path(PYTHON).parent / "upparatctl"), "status", "--bogus"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2


# -- Sentry -------------------------------------------------------------------------------------------


class SentryEndpoint:
    """A local HTTP server that takes Sentry envelopes (POST /api/<id>/envelope/)."""

    def __init__(self):
        self.bodies: list[bytes] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                outer.bodies.append(data)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict]:
        """The event items of every envelope received."""
        found = []
        for body in self.bodies:
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2]):
                try:
                    if json.loads(header).get("type") == "event":
                        found.append(json.loads(payload))
                except ValueError:
                    continue
        return found

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sentry_endpoint():
    endpoint = SentryEndpoint()
    yield endpoint
    endpoint.close()


def test_an_exception_raised_in_an_unprivileged_child_reaches_sentry_tagged(rig, sentry_endpoint):
    r = rig({"installer": "beat", "fetcher": "raise", "broker": "beat"},
            config_extra={"service": f"sentry = {sentry_endpoint.dsn}"})

    def exploded():
        return [e for e in sentry_endpoint.events()
                if "stub exploded in fetcher" in json.dumps(e.get("exception", {}))]
    events = poll_for(exploded, 30, what="the fetcher's exception at the Sentry endpoint")
    event = events[0]
    assert event["tags"]["role"] == "fetcher"
    assert event["tags"]["thing_name"] == "supervisor-test"
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    starts = [json.loads(p.read_text()) for p in r.out.glob("fetcher.*.start")]
    assert starts and all(s["sentry_imported"] for s in starts)


def test_an_error_of_the_root_installer_reaches_sentry_through_the_broker(rig, sentry_endpoint):
    r = rig({"installer": "logerror", "fetcher": "beat", "broker": "beat"},
            config_extra={"service": f"sentry = {sentry_endpoint.dsn}"})
    pids = r.wait_children(["installer", "fetcher", "broker"])
    assert len(r.children()) == 3  # four processes, no relay of its own

    def reported():
        return [e for e in sentry_endpoint.events() if e.get("message") == "stub installer error for sentry"
                or (e.get("logentry") or {}).get("message") == "stub installer error for sentry"]
    try:
        event = poll_for(reported, 30, what="the installer's error at the Sentry endpoint")[0]
    except AssertionError:
        raise AssertionError(r.log()[-5000:]) from None
    assert event["tags"]["role"] == "installer" and event["tags"]["thing_name"] == "supervisor-test"
    installer_start = json.loads(next(r.out.glob("installer.*.start")).read_text())
    assert installer_start["sentry_imported"] is False  # root never loads sentry-sdk
    if IS_ROOT:  # sent by the broker, as the broker's user
        uid_line = next(l for l in Path(f"/proc/{pids['broker']}/status").read_text().splitlines()
                        if l.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(pwd.getpwnam("upparat").pw_uid)}


def test_without_sentry_no_process_imports_sentry_sdk(rig):
    r = rig(ALL_BEAT)
    r.wait_children(["installer", "fetcher", "broker"])
    poll_for(lambda: len(list(r.out.glob("*.start"))) >= 3, 10, what="three start records")
    assert sorted(r.children()) == ["broker", "fetcher", "installer"]
    for path in r.out.glob("*.start"):
        assert json.loads(path.read_text())["sentry_imported"] is False, path.name
    probe = subprocess.run([PYTHON, "-c", "import sys, upparat.supervisor, upparat.launch, upparat.ctl; "
                            "print('sentry_sdk' in sys.modules)"], capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "False"
