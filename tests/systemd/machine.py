"""A Debian bookworm machine with systemd as PID 1, for the systemd tests.

The root file system is made once with debootstrap (minbase plus systemd,
systemd-sysv, dbus, python3, python3-venv, mosquitto, curl) from the Debian
mirror this machine is configured with, and cached outside the clone under
``$UPPARAT_TEST_CACHE`` (default /var/cache/upparat-test). Each boot gets an
overlay over it (changes are thrown away), mounted inside the machine's own
mount namespace, so nothing is left mounted on the host.

Booting (systemd-nspawn does not work on these machines): from a fresh
sub-cgroup of the host's cgroup2 hierarchy, ``unshare -C -m -p -f -u -i
--propagation private``; inside, the root file system bind-mounted onto itself
(without that every sandboxed unit fails with 226/NAMESPACE), proc, a private
/dev (the rootfs's /dev, a new devpts instance, a tmpfs /dev/shm), sysfs
read-only, tmpfs /run, cgroup2 on /sys/fs/cgroup, then ``exec chroot ROOT
/usr/bin/env -i container=other /lib/systemd/systemd --system``. The network
namespace is the host's, so the machine reaches test servers on 127.0.0.1.
``run()`` is ``nsenter -t PID -m -p -u -i -C -r -w``; ``poweroff()`` sends
SIGRTMIN+4 to that PID, waits, and removes the cgroups.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("UPPARAT_TEST_CACHE", "/var/cache/upparat-test"))
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "mosquitto", "curl")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class Unavailable(Exception):
    """This machine cannot make or boot the test machine; the text says why."""


def debian_mirror() -> str:
    """The first Debian mirror apt is configured with (deb822 or one-line)."""
    sources = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and SUITE in suites.group(1).split() and "security" not in uris.group(1):
                    return uris.group(1)
        elif path.suffix in ("", ".list"):
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and SUITE in parts[2:] and "security" not in parts[1]:
                    return parts[1]
    return DEFAULT_MIRROR


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    raise Unavailable("no cgroup2 hierarchy is mounted")


def base_rootfs() -> Path:
    """The cached root file system, made with debootstrap when missing."""
    if os.geteuid() != 0:
        raise Unavailable("debootstrap and booting systemd need root")
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    root = CACHE / f"rootfs-{SUITE}-{key}"
    if (root / ".complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs build it once
        if (root / ".complete").exists():
            return root
        if not shutil.which("debootstrap"):
            if shutil.which("apt-get"):
                subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], check=False,
                               env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
            if not shutil.which("debootstrap"):
                raise Unavailable("debootstrap is not installed and cannot be installed (apt-get install debootstrap)")
        tmp = Path(f"{root}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log = CACHE / "debootstrap.log"
        with open(log, "w") as fh:
            result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                                     SUITE, str(tmp), debian_mirror()], stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=1800)
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = log.read_text(errors="replace")[-2000:]
            raise Unavailable(f"debootstrap failed (exit {result.returncode}); see {log}:\n{tail}")
        (tmp / ".complete").write_text(" ".join(PACKAGES) + "\n")
        tmp.rename(root)
    return root


BOOT = r"""
set -e
mkdir -p "$WORK/merged"
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$WORK/upper,workdir=$WORK/ovl" "$WORK/merged"
ROOT="$WORK/merged"
mount --bind "$ROOT" "$ROOT"
mount -t proc proc "$ROOT/proc"
mount --bind "$ROOT/dev" "$ROOT/dev"
mkdir -p "$ROOT/dev/pts" "$ROOT/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$ROOT/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$ROOT/dev/shm"
mount -t sysfs -o ro sysfs "$ROOT/sys"
mount -t tmpfs -o mode=755 tmpfs "$ROOT/run"
mount -t cgroup2 cgroup2 "$ROOT/sys/fs/cgroup"
exec chroot "$ROOT" /usr/bin/env -i container=other /lib/systemd/systemd --system
"""


class Machine:
    """One boot of the test machine. Use as a context manager."""

    def __init__(self, base: Path, workdir: Path | None = None):
        self.base = base
        self.work = Path(workdir or tempfile.mkdtemp(prefix="upparat-machine-", dir="/var/tmp"))
        self.upper = self.work / "upper"  # files put here before boot appear in the machine
        for d in ("upper", "ovl"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        self.cgroup = cgroup2_root() / f"upparat-test-{os.getpid()}-{int(time.time() * 1000)}"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd, PID 1 inside
        self.console = self.work / "console.log"

    def __enter__(self) -> "Machine":
        self.boot()
        return self

    def __exit__(self, *exc) -> None:
        self.poweroff()

    def boot(self, timeout: float = 90.0) -> None:
        self.cgroup.mkdir()
        script = f'echo $$ > "{self.cgroup}/cgroup.procs" && exec unshare -C -m -p -f -u -i --propagation private ' \
                 f'/bin/sh -c "$BOOT"'
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BASE": str(self.base), "WORK": str(self.work),
               "BOOT": BOOT}
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdin=subprocess.DEVNULL,
                                         stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.pid is None:
            self.pid = self._systemd_pid()
            if self.proc.poll() is not None:
                raise Unavailable(f"the machine did not boot:\n{self.console.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("systemd did not start")
            time.sleep(0.1)
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the machine is {state!r} after {timeout} s:\n"
                                   + self.run("systemctl", "--failed", "--no-pager", check=False).stdout)
            time.sleep(0.2)

    def _systemd_pid(self) -> int | None:
        """unshare -f forks: systemd is the child of the process we started."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except FileNotFoundError:
                continue
        return None

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0, input: str | None = None
            ) -> subprocess.CompletedProcess:
        """A command inside the machine (all its namespaces, its root)."""
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-C", "-r", "-w",
               "/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG=C.UTF-8", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout)

    def path(self, inside: str) -> Path:
        """Where a file inside the machine is, seen from the host (while it runs)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def poweroff(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.pid and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: start poweroff.target
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of its namespace: takes everything with it
                self.proc.wait(10)
        elif self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        # Everything in the namespaces is gone; the cgroups systemd made remain: remove them bottom-up.
        for _ in range(50):
            leftovers = sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            try:
                for path in leftovers + [self.cgroup]:
                    path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(self.work, ignore_errors=True)
