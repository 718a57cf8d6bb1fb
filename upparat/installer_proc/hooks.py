"""Running one of the device owner's hooks (docs/contracts.md, Hooks) in a thread of its own.

The command comes from the installer's own config, chosen by hook name, and
is checked again right before every attempt (``trust.executable_problem``:
a link re-pointed since start-up fails the run and nothing is executed). The
argv is a list, never a shell, in upparat 1.x order; every value in it comes
from the installer's own record of the job:

    version / download / ready:  <cmd> <elapsed_s> <retry> <meta>
    install:                     <cmd> <elapsed_s> <retry> <meta> <staged file>
    restart:                     <cmd> <elapsed_s> <retry> <meta> <force: "True" or "">

``elapsed_s`` is whole seconds since the first attempt, ``retry`` the 0-based
retry count. Exit 0 is done, exit 3 is "retry after [hooks] retry_interval"
(at most ``max_retries`` times), anything else failed; every attempt is
killed at ``[hooks] timeout``.

Each attempt runs with a fixed environment (PATH, LANG and the run's marker
``UPPARAT_HOOK_RUN=<token>``), stdin ``/dev/null``, cwd ``/``, in a session
and process group of its own, and with ``PR_SET_PDEATHSIG(SIGKILL)``: if the
installer dies, the hook dies with it. The death signal fires when the
*thread* that spawned the hook exits, so that thread lives until the run
ends. A hook's own children do not inherit the death signal; they are killed
with the group on discard, timeout and installer stop, and at the next
start-up by their marker (see ``kill_marked``).

Output is read with fixed bounds: the last non-empty stdout line (for
``version`` the installed version) and a limited number of logged stderr lines.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from upparat import codes, trust
from upparat.ipc import installer_protocol as ip

log = logging.getLogger(__name__)

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MARKER = "UPPARAT_HOOK_RUN"
HOOK_UMASK = 0o022
MAX_LINE_BYTES = 4096  # longer lines are cut; only MAX_OUTPUT characters are kept anyway
MAX_STDERR_LINES = 100  # logged per attempt; the rest is counted, not logged
KILL_GRACE_S = 3.0  # SIGTERM to the group, then SIGKILL after this long
GONE_WAIT_S = 5.0  # after SIGKILL, how long to wait for the group to be gone
DRAIN_S = 1.0  # after the hook exits, how long a leftover child may hold its pipes
READ_CHUNK = 64 * 1024
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int

FAILURE_OF_HOOK = {
    "version": "version_hook_failed",
    "download": "download_hook_failed",
    "install": "installation_hook_failed",
    "restart": "restart_hook_failed",
    "ready": "ready_hook_failed",
}


def restart_force_arg(force: bool) -> str:
    """upparat 1.x passed ``str(arg) if arg else ""``: "True" or an empty string."""
    return "True" if force else ""


def hook_argv(command: Path, elapsed_s: int, retry: int, args: tuple[str, ...]) -> list[str]:
    return [str(command), str(elapsed_s), str(retry), *args]


def hook_env(token: str) -> dict[str, str]:
    return {"PATH": PATH, "LANG": "C.UTF-8", MARKER: token}


def clean_line(raw: bytes) -> str:
    text = CONTROL_RE.sub("", raw.decode("utf-8", errors="replace").replace("\t", " ")).strip()
    return text[: ip.MAX_OUTPUT]


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: system calls through
    functions resolved beforehand, nothing that takes a lock."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the installer died before the line above: do not run orphaned
        os._exit(127)


class LineReader:
    """Splits a byte stream into lines with a bounded buffer."""

    def __init__(self, on_line):
        self._on_line = on_line
        self._buf = bytearray()
        self._skipping = False  # inside a line that was already cut at MAX_LINE_BYTES

    def feed(self, data: bytes) -> None:
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1:]
            self._skipping = False
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        for line in lines:
            self._on_line(line)
        if len(self._buf) > MAX_LINE_BYTES:
            self._on_line(bytes(self._buf[:MAX_LINE_BYTES]))
            self._buf = bytearray()
            self._skipping = True

    def finish(self) -> None:
        if self._buf:
            self._on_line(bytes(self._buf))
            self._buf = bytearray()


# ----- processes by group and by marker -------------------------------------
def _members(pgid: int | None, token: str | None) -> list[int]:
    """Live (not zombie) processes in group ``pgid`` or carrying the marker ``token``."""
    found = []
    needle = f"{MARKER}={token}".encode() if token else None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if state in (b"Z", b"X"):
                continue
            if pgid is not None and pgrp == pgid:
                found.append(pid)
                continue
            if needle is not None:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if needle in fh.read(256 * 1024).split(b"\0"):
                        found.append(pid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread
    return found


def _marked(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{MARKER}={token}".encode() in fh.read(256 * 1024).split(b"\0")
    except OSError:
        return False


def kill_marked(pgid: int | None, token: str, deadline_s: float = GONE_WAIT_S) -> int:
    """SIGKILL what a previous life of the installer left running: members of
    ``pgid`` that still carry the marker (a reused group id is left alone),
    and any other process carrying it. Returns how many were killed."""
    killed = 0
    deadline = time.monotonic() + deadline_s
    while True:
        pids = [pid for pid in _members(pgid, token) if _marked(pid, token)]
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        if time.monotonic() >= deadline:
            log.error("hook processes %s did not die after SIGKILL", pids)
            return killed
        time.sleep(0.05)


def stop_group(pgid: int, token: str, wait: Callable[[float], bool]) -> None:
    """SIGTERM the hook's group, SIGKILL what is left (and anything carrying its
    marker), and return once nothing of it is alive (bounded). ``wait(t)``
    waits for the leader to exit; True if it did."""
    _killpg(pgid, signal.SIGTERM)
    if wait(KILL_GRACE_S) and not _members(pgid, None):
        return
    deadline = time.monotonic() + GONE_WAIT_S
    while True:
        _killpg(pgid, signal.SIGKILL)
        for pid in _members(None, token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait(0.05)
        if not _members(pgid, token):
            return
        if time.monotonic() >= deadline:
            log.error("hook process group %d did not die after SIGKILL", pgid)
            return


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# ----- one run: attempts, retries, outcome ----------------------------------
@dataclass(frozen=True)
class Outcome:
    state: str  # ip.DONE, ip.HOOK_FAILED, ip.GAVE_UP
    exit_code: int | None
    message: str
    output: str
    attempt: int
    failure: str | None  # the job status failure when not done (e.g. verification_failed before install)
    stopped: bool = False  # stopped by the installer (discard, shutdown): not the hook's fault


@dataclass(frozen=True)
class Limits:
    timeout: int
    retry_interval: int
    max_retries: int


class HookRunner:
    """One run_hook: its thread spawns every attempt and reports twice:
    ``on_spawned(pgid)`` after each spawn, ``on_done(outcome)`` at the end."""

    def __init__(self, hook: str, round_: int, command: Path, args: tuple[str, ...], token: str, limits: Limits,
                 *, as_root: bool, on_spawned: Callable[[int], None], on_done: Callable[[Outcome], None],
                 before: Callable[[], tuple[str, str] | None] | None = None):
        self.hook = hook
        self.round = round_
        self.token = token
        self._command = command
        self._args = args
        self._limits = limits
        self._as_root = as_root
        self._on_spawned = on_spawned
        self._on_done = on_done
        self._before = before  # e.g. re-verify the staged file: (failure, message) or None
        self._stop = threading.Event()
        self._stop_reason = ""
        self._lock = threading.Lock()
        self._attempt = 0
        self._output = ""
        self._message = "starting"
        self._thread = threading.Thread(target=self._run, name=f"hook-{hook}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def live(self) -> ip.HookRun:
        """The run as it is now, for a query while it runs."""
        with self._lock:
            return ip.HookRun(hook=self.hook, round=self.round, state=ip.RUNNING, exit_code=None,
                              attempt=self._attempt, output=self._output, message=self._message[: ip.MAX_OUTPUT])

    def stop(self, reason: str) -> None:
        """Kill the current attempt's whole group; the run ends with ``stopped``."""
        self._stop_reason = reason
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _set(self, **values) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self, f"_{name}", value)

    def _run(self) -> None:
        try:
            outcome = self._attempts()
        except Exception as exc:  # our own bug: report it as this run's failure, keep root up
            log.exception("%s hook: internal error", self.hook)
            outcome = Outcome(ip.HOOK_FAILED, None, f"installer internal error: {exc}"[: ip.MAX_OUTPUT],
                              self._output, self._attempt, FAILURE_OF_HOOK[self.hook])
        log.info("%s hook: %s (%s)", self.hook, outcome.state, outcome.message)
        self._on_done(outcome)

    def _outcome(self, state: str, exit_code: int | None, message: str, failure: str | None = None,
                 stopped: bool = False) -> Outcome:
        if state != ip.DONE and failure is None:
            failure = FAILURE_OF_HOOK[self.hook]
        return Outcome(state, exit_code, message[: ip.MAX_OUTPUT], self._output, self._attempt, failure, stopped)

    def _attempts(self) -> Outcome:
        if self._before is not None:
            self._set(message="checking the staged file")
            problem = self._before()
            if problem is not None:
                failure, message = problem
                return self._outcome(ip.HOOK_FAILED, None, message, failure=failure)
        first = time.monotonic()
        retry = 0
        while True:
            if self._stop.is_set():
                return self._outcome(ip.HOOK_FAILED, None, f"stopped: {self._stop_reason}", stopped=True)
            # Check here, too: a link re-pointed since start-up must not make root run another program.
            problem = trust.executable_problem(self._command, as_root=self._as_root)
            if problem:
                return self._outcome(ip.HOOK_FAILED, None, f"refused to run the {self.hook} hook: {problem}")
            argv = hook_argv(self._command, int(time.monotonic() - first), retry, self._args)
            self._set(attempt=retry, message=f"running (retry {retry})")
            log.info("%s hook: running %s", self.hook, _short(argv))
            exit_code, message, stopped = self._run_once(argv)
            if stopped:
                return self._outcome(ip.HOOK_FAILED, None, message, stopped=True)
            if exit_code is None:
                return self._outcome(ip.HOOK_FAILED, None, message)
            if exit_code == codes.HOOK_DONE:
                return self._outcome(ip.DONE, 0, "exit code 0")
            if exit_code != codes.HOOK_RETRY:
                return self._outcome(ip.HOOK_FAILED, exit_code, f"exit code {exit_code}{message}")
            if retry >= self._limits.max_retries:
                return self._outcome(ip.GAVE_UP, exit_code, f"asked to retry (exit 3) {retry + 1} times; gave up "
                                     f"after [hooks] max_retries = {self._limits.max_retries}")
            self._set(message=f"exit 3: retrying in {self._limits.retry_interval} s")
            if self._stop.wait(self._limits.retry_interval):
                return self._outcome(ip.HOOK_FAILED, None, f"stopped: {self._stop_reason}", stopped=True)
            retry += 1

    def _run_once(self, argv: list[str]) -> tuple[int | None, str, bool]:
        """(exit code or None, message, stopped)."""
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                env=hook_env(self.token), close_fds=True, start_new_session=True, umask=HOOK_UMASK,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        except OSError as exc:
            return None, f"cannot run {argv[0]}: {exc.strerror or exc}", False
        except subprocess.SubprocessError as exc:
            return None, f"cannot run {argv[0]}: {exc}", False
        self._on_spawned(proc.pid)  # the leader's pid is the group id (own session)
        stderr_lines = 0
        last_stderr = ""

        def on_stdout(raw: bytes) -> None:
            line = clean_line(raw)
            if line:
                self._set(output=line)

        def on_stderr(raw: bytes) -> None:
            nonlocal stderr_lines, last_stderr
            line = clean_line(raw)
            if not line:
                return
            last_stderr = line
            stderr_lines += 1
            if stderr_lines <= MAX_STDERR_LINES:
                log.info("%s hook (stderr): %s", self.hook, line)

        readers = {proc.stdout: LineReader(on_stdout), proc.stderr: LineReader(on_stderr)}
        try:
            exit_code, message, stopped = self._wait(proc, readers)
        finally:
            for stream, reader in readers.items():
                reader.finish()
                stream.close()
        if stderr_lines > MAX_STDERR_LINES:
            log.info("%s hook: %d more stderr lines not logged", self.hook, stderr_lines - MAX_STDERR_LINES)
        if exit_code is not None and exit_code not in (codes.HOOK_DONE, codes.HOOK_RETRY) and last_stderr:
            message = f": {last_stderr}"
        return exit_code, message, stopped

    def _kill(self, proc: subprocess.Popen) -> None:
        def wait(seconds: float) -> bool:
            try:
                proc.wait(seconds)
                return True
            except subprocess.TimeoutExpired:
                return False

        stop_group(proc.pid, self.token, wait)

    def _wait(self, proc: subprocess.Popen, readers: dict) -> tuple[int | None, str, bool]:
        deadline = time.monotonic() + self._limits.timeout
        exited_at = None
        with selectors.DefaultSelector() as selector:
            for stream in readers:
                os.set_blocking(stream.fileno(), False)
                selector.register(stream, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if self._stop.is_set():
                    self._kill(proc)
                    return None, f"stopped: {self._stop_reason}", True
                if now >= deadline:
                    self._kill(proc)
                    return None, f"killed after {self._limits.timeout} s ([hooks] timeout)", False
                if proc.poll() is not None:
                    exited_at = exited_at or now
                    # A child the hook left behind may keep the pipes open: do not wait for it.
                    if not selector.get_map() or now - exited_at >= DRAIN_S:
                        return proc.returncode, "", False
                if not selector.get_map():
                    self._stop.wait(0.05)
                    continue
                for key, _ in selector.select(timeout=0.1):
                    try:
                        data = os.read(key.fd, READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if data:
                        readers[key.fileobj].feed(data)
                    else:
                        selector.unregister(key.fileobj)


def _short(argv: list[str]) -> str:
    text = " ".join(repr(a) for a in argv)
    return text if len(text) <= 300 else text[:300] + "..."
