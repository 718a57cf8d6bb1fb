"""Running one of the device owner's hooks (DESIGN.md 4.5), in the background.

The command comes from the installer's own config, chosen by hook name; the
argv is a list (never a shell) in upparat 1.x order:

    version / download / ready:  <cmd> <elapsed_s> <retry> <meta>
    install:                     <cmd> <elapsed_s> <retry> <meta> <staged file>
    restart:                     <cmd> <elapsed_s> <retry> <meta> <force>

``elapsed_s`` is whole seconds since the first attempt, ``retry`` the 0-based
retry count. Each attempt runs with a clean environment, cwd ``/``, stdin
``/dev/null``, in its own session so that a timeout or a shutdown kills the
whole process group. Output is read with fixed bounds: the last non-empty
stdout line (the result, e.g. the installed version) and a limited number of
logged stderr lines.
"""

from __future__ import annotations

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

from upparat import codes
from upparat.ipc import installer_protocol as ip

log = logging.getLogger(__name__)

CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
HOOK_UMASK = 0o022
MAX_LINE_BYTES = 4096  # longer lines are cut; only MAX_OUTPUT characters are kept anyway
MAX_STDERR_LINES = 100  # logged per attempt; the rest is counted, not logged
KILL_GRACE_S = 3.0  # SIGTERM to the group, then SIGKILL after this long
DRAIN_S = 1.0  # after the hook exits, how long a leftover child may hold its pipes
READ_CHUNK = 64 * 1024
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def restart_force_arg(force: bool) -> str:
    """upparat 1.x passed ``str(arg) if arg else ""``: "True" or an empty string."""
    return "True" if force else ""


def hook_argv(command: Path, elapsed_s: int, retry: int, args: tuple[str, ...]) -> list[str]:
    return [str(command), str(elapsed_s), str(retry), *args]


def clean_line(raw: bytes) -> str:
    text = CONTROL_RE.sub("", raw.decode("utf-8", errors="replace").replace("\t", " ")).strip()
    return text[: ip.MAX_OUTPUT]


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


@dataclass(frozen=True)
class Attempt:
    exit_code: int | None  # None: could not start, killed, or stopped
    message: str  # why, when it did not exit normally
    stopped: bool = False


class HookRun:
    """One run_hook request: attempts, retries, and the status the broker polls.

    ``on_done`` runs in the hook's thread after exit 0 and *before* the run is
    seen as done, so that what it records (e.g. "installed") is in place when
    the broker learns the result.
    """

    def __init__(self, job_id: str, seq: int, hook: str, command: Path, args: tuple[str, ...], *,
                 retry_interval: int, max_retries: int, timeout: int, on_done=None):
        self.job_id = job_id
        self.seq = seq
        self.hook = hook
        self._command = command
        self._args = args
        self._retry_interval = retry_interval
        self._max_retries = max_retries
        self._timeout = timeout
        self._on_done = on_done
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = ip.RUNNING
        self._exit_code: int | None = None
        self._attempt = 0
        self._output = ""
        self._message = "starting"
        self._last_stderr = ""
        self._thread = threading.Thread(target=self._run, name=f"hook-{hook}-{job_id}", daemon=True)

    # ----- what the installer's main loop sees ---------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state == ip.RUNNING

    def status(self) -> ip.HookStatus:
        with self._lock:
            return ip.HookStatus(job_id=self.job_id, seq=self.seq, hook=self.hook, state=self._state,
                                 exit_code=self._exit_code, attempt=self._attempt, output=self._output,
                                 message=self._message[: ip.MAX_OUTPUT])

    def stop(self) -> None:
        """Ask the run to end: the current attempt's group gets SIGTERM, then SIGKILL."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ----- the hook's thread ---------------------------------------------
    def _set(self, **fields) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, f"_{name}", value)

    def _run(self) -> None:
        try:
            state, message, exit_code = self._attempts()
            if state == ip.DONE and self._on_done is not None:
                self._on_done(self.job_id)
        except Exception as exc:  # our own bug: report it, keep the installer up
            log.exception("%s hook of job %s: internal error", self.hook, self.job_id)
            state, message, exit_code = ip.FAILED, f"installer internal error: {exc}", None
        self._set(state=state, message=message, exit_code=exit_code)
        log.info("%s hook of job %s: %s (%s)", self.hook, self.job_id, state, message)

    def _attempts(self) -> tuple[str, str, int | None]:
        first = time.monotonic()
        retry = 0
        while True:
            argv = hook_argv(self._command, int(time.monotonic() - first), retry, self._args)
            self._set(attempt=retry, message=f"running (retry {retry})")
            log.info("%s hook of job %s: running %s", self.hook, self.job_id, _short(argv))
            attempt = self._run_once(argv)
            if attempt.stopped:
                return ip.FAILED, attempt.message, None
            if attempt.exit_code is None:
                return ip.FAILED, attempt.message, None
            if attempt.exit_code == codes.HOOK_DONE:
                return ip.DONE, "exit code 0", 0
            if attempt.exit_code != codes.HOOK_RETRY:
                detail = f": {self._last_stderr}" if self._last_stderr else ""
                return ip.FAILED, f"exit code {attempt.exit_code}{detail}", attempt.exit_code
            if retry >= self._max_retries:
                return (ip.GAVE_UP, f"asked to retry (exit 3) {retry + 1} times; gave up after "
                        f"[hooks] max_retries = {self._max_retries}", codes.HOOK_RETRY)
            self._set(message=f"exit 3: retrying in {self._retry_interval} s")
            if self._stop.wait(self._retry_interval):
                return ip.FAILED, "stopped while waiting to retry: the installer is shutting down", None
            retry += 1

    def _run_once(self, argv: list[str]) -> Attempt:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd="/", env=dict(CLEAN_ENV), close_fds=True, start_new_session=True, umask=HOOK_UMASK)
        except OSError as exc:
            return Attempt(None, f"cannot run {argv[0]}: {exc.strerror or exc}")
        stderr_lines = 0

        def on_stdout(raw: bytes) -> None:
            line = clean_line(raw)
            if line:
                self._set(output=line)

        def on_stderr(raw: bytes) -> None:
            nonlocal stderr_lines
            line = clean_line(raw)
            if not line:
                return
            self._last_stderr = line
            stderr_lines += 1
            if stderr_lines <= MAX_STDERR_LINES:
                log.info("%s hook of job %s (stderr): %s", self.hook, self.job_id, line)

        readers = {proc.stdout: LineReader(on_stdout), proc.stderr: LineReader(on_stderr)}
        self._last_stderr = ""
        try:
            outcome = self._wait(proc, readers)
        finally:
            for stream, reader in readers.items():
                reader.finish()
                stream.close()
        if stderr_lines > MAX_STDERR_LINES:
            log.info("%s hook of job %s: %d more stderr lines not logged",
                     self.hook, self.job_id, stderr_lines - MAX_STDERR_LINES)
        return outcome

    def _wait(self, proc: subprocess.Popen, readers: dict) -> Attempt:
        deadline = time.monotonic() + self._timeout
        exited_at = None
        with selectors.DefaultSelector() as selector:
            for stream in readers:
                os.set_blocking(stream.fileno(), False)
                selector.register(stream, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if self._stop.is_set():
                    _terminate_group(proc)
                    return Attempt(None, "stopped: the installer is shutting down", stopped=True)
                if now >= deadline:
                    _terminate_group(proc)
                    return Attempt(None, f"killed after {self._timeout} s ([hooks] timeout)")
                if proc.poll() is not None:
                    exited_at = exited_at or now
                    # A child the hook left behind may keep the pipes open: do not wait for it.
                    if not selector.get_map() or now - exited_at >= DRAIN_S:
                        return Attempt(proc.returncode, "")
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


def _terminate_group(proc: subprocess.Popen) -> None:
    """SIGTERM the hook's whole process group, then SIGKILL what is left; reap."""
    _killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _killpg(proc.pid, signal.SIGKILL)  # also children that outlived the leader
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:  # stuck in the kernel; do not hang with it
        log.error("hook process %d did not die after SIGKILL", proc.pid)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _short(argv: list[str]) -> str:
    text = " ".join(repr(a) for a in argv)
    return text if len(text) <= 300 else text[:300] + "..."
