"""Helpers for the process-level tests: free ports, polling with a deadline,
a real Mosquitto, and processes that are always stopped by PID."""

from __future__ import annotations

import contextlib
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


# -- one child on its own, as the supervisor would start it --------------------

def identities(am_root: bool | None = None):
    """The two unprivileged users as root (created by scripts/bootstrap), else this user for all."""
    import pwd

    from upparat import config
    from upparat.ipc.settings import resolve_identities

    am_root = os.geteuid() == 0 if am_root is None else am_root
    cfg = config.parse("", check_files=False)
    me = pwd.getpwuid(os.getuid()).pw_name
    return resolve_identities(cfg, am_root, os.getuid(), os.getgid(), me)


def layout_under(base: Path):
    """Every directory under ``base`` (which the unprivileged users can traverse)."""
    from upparat.ipc.settings import Layout

    return Layout(runtime_dir=base / "run", download_dir=base / "dl" / "upparat", staging_dir=base / "staging",
                  broker_state_dir=base / "state" / "broker", fetcher_state_dir=base / "state" / "fetcher")


def start_child_process(role: str, config_text: str, layout, ids, log_path: Path, *, tls=None,
                        public_keys_pem=(), verbose: bool = True) -> Proc:
    """``python -m upparat.<role>_proc --from-supervisor`` with its settings
    envelope on stdin, dropped to its user as the supervisor does (as root).
    Creates the directories first, with the supervisor's own function."""

    from upparat.ipc.settings import ChildSettings
    from upparat.supervisor import child_interpreter, prepare_directories

    prepare_directories(layout, ids)
    settings = ChildSettings(role=role, config_text=config_text, config_path="<test>", verbose=verbose,
                             thing_name=None, layout=layout, ids=ids, tls=dict(tls or {}),
                             public_keys_pem=tuple(public_keys_pem))
    drop = {}
    if ids.separated and role != "installer":
        uid, gid = (ids.broker_uid, ids.broker_gid) if role == "broker" else (ids.fetcher_uid, ids.fetcher_gid)
        drop = {"user": uid, "group": gid, "extra_groups": []}
    proc = Proc([child_interpreter(), "-m", f"upparat.{role}_proc", "--from-supervisor"], log_path,
                stdin_data=settings.encode(), cwd="/", **drop)
    return proc


@contextlib.contextmanager
def running_sandbox(path: Path, **kwargs):
    """A started Sandbox (upparat/devtools/sandbox.py) whose supervisor runs its
    three children; stopped, by PID, on the way out."""
    from upparat.devtools.sandbox import Sandbox

    box = Sandbox(path, **kwargs)
    try:
        box.start()
        poll_for(lambda: len(child_pids(box.supervisor.pid)) == 3, 30, what="three children")
        yield box
    finally:
        box.stop()
