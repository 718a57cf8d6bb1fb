"""The systemd units under a real systemd (PID 1 of a Debian bookworm
machine, see machine.py), and their exposure scores.

Installed as docs/systemd.md tells an admin: a venv in /opt/upparat, the two
users, a root-only /etc/upparat/upparat.conf of the seed's style (no
[supervisor] section, no download_location), the units in
/etc/systemd/system. Mosquitto, the jobs emulator and the file server run on
the host's 127.0.0.1 (the machine shares the host's network).

The tests run in file order on one machine: per-process mode, switch to
supervisor mode, switch back, failures, stop.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, poll_for
from tests.systemd import machine as machine_mod
from upparat.devtools.sandbox import THING as SANDBOX_THING

UNITS = ("upparat.service", "upparat-broker.service", "upparat-fetcher.service", "upparat-installer.service")
PER_PROCESS = ("upparat-installer.service", "upparat-fetcher.service", "upparat-broker.service")
EXPOSURE_LIMITS = {"upparat-broker.service": 2.0, "upparat-fetcher.service": 2.0,
                   "upparat-installer.service": 5.0, "upparat.service": 5.0}
JOB_TIMEOUT = 90.0


def exposure(unit_path: Path, cwd: Path, runner=None) -> float:
    argv = ["systemd-analyze", "security", "--offline=true", "--no-pager", unit_path.name]
    result = (runner(*argv, "--root=/") if runner else
              subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=60))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", sorted(EXPOSURE_LIMITS))
def test_exposure_score_is_within_its_target(unit):
    score = exposure(REPO / "systemd" / unit, REPO / "systemd")
    assert score <= EXPOSURE_LIMITS[unit], f"{unit}: {score} > {EXPOSURE_LIMITS[unit]}"


# -- the machine ----------------------------------------------------------------------


def build_wheels(target: Path) -> None:
    """Upparat and its dependencies as wheels (dependencies cached between runs)."""
    cache = machine_mod.CACHE / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(target), str(REPO)],
                   check=True, timeout=600, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(cache), "--find-links", str(cache),
                    f"{REPO}[sentry]"], check=True, timeout=900, capture_output=True)
    for wheel in cache.glob("*.whl"):
        if not wheel.name.startswith("upparat-"):
            shutil.copy2(wheel, target)


HOOKS = {
    "version": "#!/bin/sh\ncat /var/lib/upparat-demo/version\n",
    "download": "#!/bin/sh\nexit 0\n",
    "install": "#!/bin/sh\nset -e\ncp \"$4\" /var/lib/upparat-demo/installed\necho \"$3\" > /var/lib/upparat-demo/pending\n",
    "restart": "#!/bin/sh\nmv /var/lib/upparat-demo/pending /var/lib/upparat-demo/version\n",
    "ready": "#!/bin/sh\nexit 0\n",
}

INSTALL = r"""
python3 -m venv /opt/upparat
/opt/upparat/bin/pip install -q --no-index --find-links /root/install/wheels 'upparat[sentry]'
useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin upparat
useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin upparat-fetch
install -d -m 0755 /etc/upparat /etc/upparat/keys /usr/lib/upparat/hooks /var/lib/upparat-demo
install -m 0644 /root/install/release.pub /etc/upparat/keys/release.pub
install -m 0600 -o root -g root /root/install/upparat.conf /etc/upparat/upparat.conf
for h in version download install restart ready; do install -m 0755 /root/install/hooks/$h /usr/lib/upparat/hooks/$h; done
echo 1.0.0 > /var/lib/upparat-demo/version
cp /root/install/systemd/* /etc/systemd/system/
systemctl daemon-reload
"""


# UPPARAT_SYSTEMD_STUB_CHILDREN=1: replace the three children in the machine by
# stand-ins that start like them (launch.start_child) and only beat, to check
# the units' mechanics while the real children are being rewritten. The job
# tests then fail, everything else must pass.
STUB_CHILD = """import sys
from upparat import codes, launch, signature
ROLE = {role!r}
ctx = launch.start_child(ROLE, unprivileged=ROLE != "installer")
if ROLE == "installer":
    try:
        signature.load_public_keys(list(ctx.public_keys_pem))
    except signature.UnusableKey as exc:
        print("upparat-installer: configuration error: [verification] public_keys:", exc, file=sys.stderr)
        sys.exit(codes.EXIT_USAGE)
while not ctx.stop.is_set():
    ctx.heartbeat.beat(subscribed=True)
    ctx.stop.wait(0.5)
"""
STUB_INSTALL = r"""
site=$(/opt/upparat/bin/python -c 'import upparat, os; print(os.path.dirname(upparat.__file__))')
for role in broker fetcher installer; do cp /root/install/stub_$role.py $site/${role}_proc/__main__.py; done
"""


def seed_config(mqtt_port: int) -> str:
    hooks = "\n".join(f"{name} = /usr/lib/upparat/hooks/{name}" for name in HOOKS)
    return (f"[service]\nlog_level = DEBUG\n\n[broker]\nhost = 127.0.0.1\nport = {mqtt_port}\n"
            f"thing_name = {SANDBOX_THING}\n\n[hooks]\n{hooks}\nretry_interval = 1\nmax_retries = 3\n\n"
            "[verification]\npublic_keys = /etc/upparat/keys/release.pub\n")


class Setup:
    def __init__(self, machine, sandbox, key):
        self.machine = machine
        self.sandbox = sandbox
        self.key = key
        self.jobs = 0

    def systemctl(self, *args, check=True):
        return self.machine.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def active(self, unit: str) -> str:
        return self.systemctl("is-active", unit, check=False).stdout.strip()

    def signed_job(self) -> dict:
        from upparat import signature
        from upparat.release import Release

        self.jobs += 1
        version = f"2.0.{self.jobs}"
        name = f"fw-{self.jobs}.bin"
        data = os.urandom(200_000)
        self.sandbox.add_file(name, data)
        release = Release(version=version, meta=version, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        doc = self.sandbox.document(name, version, signature=signature.sign(self.key, release))
        job_id = f"job-systemd-{self.jobs}"
        self.sandbox.create_job(job_id, doc)
        final = self.sandbox.wait_for_job(job_id, timeout=JOB_TIMEOUT)
        return final

    def journal(self, *args) -> str:
        return self.machine.run("journalctl", "--no-pager", "-o", "cat", *args, check=False).stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    try:
        base = machine_mod.base_rootfs()
        machine_mod.cgroup2_root()
    except machine_mod.Unavailable as exc:
        pytest.skip(f"no test machine: {exc}")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from upparat.devtools.sandbox import Sandbox

    key = ed25519.Ed25519PrivateKey.generate()
    sandbox = Sandbox(tmp_path_factory.mktemp("rig"))
    sandbox.start(supervisor=False)
    machine = machine_mod.Machine(base)
    try:
        install = machine.upper / "root" / "install"
        (install / "hooks").mkdir(parents=True)
        build_wheels(install / "wheels")
        for name, body in HOOKS.items():
            (install / "hooks" / name).write_text(body)
        (install / "release.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (install / "upparat.conf").write_text(seed_config(sandbox.mqtt_port))
        shutil.copytree(REPO / "systemd", install / "systemd")
        stubs = os.environ.get("UPPARAT_SYSTEMD_STUB_CHILDREN") == "1"
        for role in ("broker", "fetcher", "installer"):
            (install / f"stub_{role}.py").write_text(STUB_CHILD.format(role=role))
        machine.boot()
        machine.sh(INSTALL + (STUB_INSTALL if stubs else ""), timeout=600)
        yield Setup(machine, sandbox, key)
    finally:
        if os.environ.get("UPPARAT_TEST_LOGS") and machine.pid:
            print(machine.run("journalctl", "--no-pager", check=False).stdout[-20000:])
        machine.poweroff()
        sandbox.stop()


def wait_state(setup, unit: str, states: tuple[str, ...], timeout: float = 60.0) -> str:
    try:
        return poll_for(lambda: (s := setup.active(unit)) in states and s, timeout,
                        what=f"{unit} {'/'.join(states)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{setup.systemctl('status', unit, check=False).stdout}\n"
                             f"{setup.journal('-n', '60')}") from None


# -- verify, documentation, exposure inside --------------------------------------------------


def test_units_verify_clean_and_their_documentation_exists(setup):
    units = [f"/etc/systemd/system/{u}" for u in UNITS + ("upparat.target",)]
    result = setup.machine.run("systemd-analyze", "verify", "--man=no", *units, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for unit in UNITS + ("upparat.target",):
        docs = setup.show(unit, "Documentation")["Documentation"].split()
        assert docs, unit
        for doc in docs:
            assert doc.startswith("file:")
            setup.machine.run("test", "-f", doc[len("file:"):])
    for unit, limit in EXPOSURE_LIMITS.items():
        assert exposure(Path(unit), Path("/"), runner=lambda *a: setup.machine.run(*a[:-1], check=False)) <= limit


# -- per-process mode -------------------------------------------------------------------------


def test_per_process_mode_runs_as_two_users_in_their_sandboxes(setup):
    setup.systemctl("start", "upparat.target")
    for unit in PER_PROCESS:
        wait_state(setup, unit, ("active",))
    expected = {"upparat-broker.service": ("upparat", "upparat"),
                "upparat-fetcher.service": ("upparat-fetch", "upparat-fetch"),
                "upparat-installer.service": ("", "")}
    for unit, (user, group) in expected.items():
        props = setup.show(unit, "User", "Group", "PrivateTmp", "NoNewPrivileges", "ProtectSystem",
                           "RestrictAddressFamilies", "IPAddressDeny", "SyslogIdentifier", "MainPID")
        assert (props["User"], props["Group"]) == (user, group), props
        assert props["PrivateTmp"] == "yes" and props["NoNewPrivileges"] == "yes"
        assert props["SyslogIdentifier"] == unit.removesuffix(".service")
        if unit == "upparat-installer.service":
            assert set(props["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_NETLINK"} and props["IPAddressDeny"]
        else:
            assert props["ProtectSystem"] == "strict"
    # The default layout, made by the units' prepare step as the supervisor would.
    stat = setup.machine.run("stat", "-c", "%n %U:%G %a", "/run/upparat/installer", "/run/upparat/fetcher",
                             "/var/lib/upparat/staging", "/var/lib/upparat/broker", "/var/lib/upparat/fetcher",
                             "/tmp/upparat").stdout.split("\n")
    assert stat[:6] == ["/run/upparat/installer root:upparat 750", "/run/upparat/fetcher upparat-fetch:upparat 2750",
                        "/var/lib/upparat/staging root:root 700", "/var/lib/upparat/broker upparat:upparat 700",
                        "/var/lib/upparat/fetcher upparat-fetch:upparat-fetch 700",
                        "/tmp/upparat upparat-fetch:upparat-fetch 700"], stat
    assert "configuration checked" in setup.journal("-t", "upparat-installer")


def test_per_process_mode_completes_a_signed_update(setup):
    """Needs the integrated children (protocol v2)."""
    setup.systemctl("start", "upparat.target")
    final = setup.signed_job()
    assert final["status"] == "SUCCEEDED", (final, setup.journal("-n", "80"))
    for ident in ("upparat-broker", "upparat-fetcher", "upparat-installer"):
        assert setup.journal("-t", ident).strip(), f"journalctl -t {ident} finds nothing"


# -- switching modes without stopping first ------------------------------------------------------


def test_starting_supervisor_mode_stops_per_process_mode_first(setup):
    setup.systemctl("start", "upparat.target")
    setup.systemctl("start", "--no-block", "upparat.service")
    wait_state(setup, "upparat.service", ("active",), timeout=120)
    for unit in PER_PROCESS + ("upparat.target",):
        assert setup.active(unit) == "inactive", unit
    props = setup.show("upparat.service", "User", "NoNewPrivileges", "PrivateTmp", "Type", "NotifyAccess",
                       "WatchdogUSec", "RestartPreventExitStatus", "MainPID")
    assert props["User"] == "" and props["Type"] == "notify" and props["PrivateTmp"] == "yes"
    assert props["RestartPreventExitStatus"] == "2 3"
    status = setup.systemctl("status", "upparat.service").stdout
    assert "Status:" in status
    # Each child's lines are found by its own identifier, and name their process.
    broker_lines = setup.journal("-t", "upparat-broker", "_SYSTEMD_UNIT=upparat.service")
    assert "upparat-broker[" in broker_lines


def test_supervisor_mode_completes_a_signed_update(setup):
    """Needs the integrated children (protocol v2)."""
    setup.systemctl("start", "upparat.service")
    final = setup.signed_job()
    assert final["status"] == "SUCCEEDED", (final, setup.journal("-u", "upparat", "-n", "80"))
    assert setup.machine.run("/opt/upparat/bin/upparatctl", "status").returncode == 0


def test_starting_per_process_mode_stops_supervisor_mode_first(setup):
    setup.systemctl("start", "--no-block", "upparat.service")
    wait_state(setup, "upparat.service", ("active",), timeout=120)
    setup.systemctl("start", "upparat.target")
    for unit in PER_PROCESS:
        wait_state(setup, unit, ("active",))
    assert setup.active("upparat.service") == "inactive"


def test_per_process_mode_after_the_switch_completes_a_signed_update(setup):
    """Needs the integrated children (protocol v2)."""
    setup.systemctl("start", "upparat.target")
    final = setup.signed_job()
    assert final["status"] == "SUCCEEDED", (final, setup.journal("-n", "80"))


# -- failures and stop ----------------------------------------------------------------------------


def test_stop_of_the_target_returns_when_every_process_is_gone(setup):
    setup.systemctl("start", "upparat.target")
    for unit in PER_PROCESS:
        wait_state(setup, unit, ("active",))
    setup.systemctl("stop", "upparat.target")
    for unit in PER_PROCESS:
        assert setup.active(unit) == "inactive", unit
    left = setup.machine.run("pgrep", "-f", "upparat", check=False).stdout.split()
    assert not left, setup.machine.run("ps", "-ef", check=False).stdout


def break_public_key(setup) -> None:
    setup.machine.sh("cp /etc/upparat/keys/release.pub /root/release.pub.good; "
                     "printf -- '-----BEGIN PUBLIC KEY-----\\nbm90IGEga2V5\\n-----END PUBLIC KEY-----\\n' "
                     "> /etc/upparat/keys/release.pub")


def restore_public_key(setup) -> None:
    setup.machine.sh("cp /root/release.pub.good /etc/upparat/keys/release.pub")


def test_a_child_that_finds_the_configuration_unusable_is_a_failed_unit(setup):
    break_public_key(setup)
    try:
        setup.systemctl("start", "--no-block", "upparat.target")
        wait_state(setup, "upparat-installer.service", ("failed",))
        props = setup.show("upparat-installer.service", "ExecMainStatus", "NRestarts", "Result")
        assert props["ExecMainStatus"] == "2" and props["NRestarts"] == "0", props
        wait_state(setup, "upparat.target", ("inactive",))
        for unit in ("upparat-broker.service", "upparat-fetcher.service"):
            wait_state(setup, unit, ("inactive", "failed"))
        setup.systemctl("reset-failed")
        # Supervisor mode: exit 2, not restarted.
        setup.systemctl("start", "--no-block", "upparat.service")
        wait_state(setup, "upparat.service", ("failed",), timeout=60)
        props = setup.show("upparat.service", "ExecMainStatus", "NRestarts")
        assert props["ExecMainStatus"] == "2" and props["NRestarts"] == "0", props
        assert "public_keys" in setup.journal("-u", "upparat", "-n", "50")
    finally:
        restore_public_key(setup)
        setup.systemctl("reset-failed", check=False)


def test_a_crash_looping_unit_reaches_its_start_limit_and_fails(setup):
    # A fetcher that cannot start (its interpreter gone) exits 1 every time.
    setup.machine.sh("mkdir -p /etc/systemd/system/upparat-fetcher.service.d; printf '[Service]\\n"
                     "ExecStart=\\nExecStart=/bin/false\\n' > /etc/systemd/system/upparat-fetcher.service.d/x.conf; "
                     "systemctl daemon-reload")
    try:
        setup.systemctl("start", "--no-block", "upparat.target")
        wait_state(setup, "upparat-fetcher.service", ("failed",), timeout=60)
        assert "Start request repeated too quickly" in setup.journal("-u", "upparat-fetcher", "-n", "30")
        wait_state(setup, "upparat.target", ("inactive",))
    finally:
        setup.machine.sh("rm -rf /etc/systemd/system/upparat-fetcher.service.d; systemctl daemon-reload; "
                         "systemctl stop upparat.target; systemctl reset-failed")
