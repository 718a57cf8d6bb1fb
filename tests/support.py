"""Helpers for the process-level tests: free ports, polling with a deadline,
a real Mosquitto, and processes that are always stopped by PID."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from upparat.devtools.sandbox import Child, free_port, mosquitto_binary, port_open  # noqa: F401

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


# One implementation of these, shared with the demo's sandbox.
Proc = Child


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
