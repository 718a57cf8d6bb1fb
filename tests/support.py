"""Helpers for the process-level tests: free ports, polling with a deadline,
a real Mosquitto, and processes that are always stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class Timeout(AssertionError):
    pass


def poll_for(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Call ``condition()`` until it returns a truthy value; return that value.

    Raises Timeout (an AssertionError) naming ``what`` after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except AssertionError:
            raise  # the condition says waiting is pointless
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout}s waiting for {what}"
                          + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Proc:
    """A started process that is stopped by PID: SIGTERM, wait, SIGKILL."""

    def __init__(self, argv, log_path: Path, **popen_kwargs):
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, **popen_kwargs)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("mosquitto not installed: run scripts/bootstrap")


def start_mosquitto(workdir: Path, port: int | None = None) -> tuple[Proc, int]:
    """A real Mosquitto on 127.0.0.1:<free port>, anonymous, no persistence."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        "max_inflight_messages 100\n"
    )
    argv = [mosquitto_binary(), "-c", str(conf)]
    if os.geteuid() == 0:
        # mosquitto drops to user "mosquitto" when started as root; keep it simple.
        conf.write_text(conf.read_text() + "user root\n")
    proc = Proc(argv, workdir / f"mosquitto-{port}.log")
    poll_for(lambda: port_open(port) or (not proc.alive() and _raise(proc)), 10, what=f"mosquitto on {port}")
    return proc, port


def _raise(proc: Proc):
    raise RuntimeError(f"process exited early: {proc.argv}\n{proc.log()}")


# -- supervised processes (appended for the supervisor tests) --

CHILD_NAMES = ("broker", "fetcher", "installer")


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]


def child_pids(supervisor_pid: int) -> dict[str, int]:
    """Map "broker"/"fetcher"/"installer" to the PIDs of the supervisor's
    live children, recognised by ``-m upparat.<name>_proc`` in their cmdline.

    Reads /proc/<pid>/task/<pid>/children; zombies (exited, not yet reaped)
    are left out. A child that is not running is absent from the result.
    """
    try:
        with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as fh:
            pids = [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return {}
    found: dict[str, int] = {}
    for pid in pids:
        try:
            argv = _cmdline(pid)
            if proc_status(pid).get("State", "").startswith("Z"):
                continue
        except (FileNotFoundError, ProcessLookupError):
            continue
        for name in CHILD_NAMES:
            if f"upparat.{name}_proc" in argv:
                found[name] = pid
    return found


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict, e.g. {"Uid": "999\\t999\\t999\\t999", "CapEff": "0000..."}."""
    status = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return status


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return not proc_status(pid).get("State", "").startswith("Z")
    except FileNotFoundError:
        return False
