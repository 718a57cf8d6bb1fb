"""The child -> supervisor boundary: heartbeats with a short status, and the
error records of root processes on their way to Sentry.

Transport: one pipe per child, made by the supervisor. The child inherits the
write end (``--status-fd N``, passed with ``pass_fds``); the supervisor keeps
the read end. One JSON object per line, at most ``MAX_LINE`` bytes with the
newline. ``MAX_LINE`` is ``PIPE_BUF``: a write of at most that many bytes to a
pipe is atomic, so a non-blocking write puts the whole line in the pipe or
nothing (EAGAIN). A line is never torn, and a child whose supervisor does not
read is never blocked: it drops the beat.

The supervisor parses no network input, but a child may be compromised: these
lines are hostile-peer input. They are decoded with ``safejson`` limits and
checked field by field; a bad line is refused whole with one reason, and an
overlong one is skipped up to the next newline.

    {"v":1,"type":"beat","status":{"busy":false,"job_id":"j-1","execution":2,
     "phase":"download","bytes_done":1024,"bytes_total":4096,"rate":512}}
    {"v":1,"type":"problem","level":"ERROR","logger":"upparat.installer",
     "message":"...","traceback":"Traceback ..."}

A child beats at least every ``BEAT_EVERY`` seconds (``launch.Heartbeat``);
the supervisor kills one that stays silent for its heartbeat timeout.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import select
from dataclasses import dataclass

from upparat import safejson
from upparat.release import is_count, is_job_id

VERSION = 1
MAX_LINE = select.PIPE_BUF  # 4096 on Linux: writes up to this size are atomic
BEAT_EVERY = 1.0  # seconds: how often a child's main loop beats at least
PHASE_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
LOGGER_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
PROBLEM_LEVELS = ("ERROR", "CRITICAL")
MAX_MESSAGE = 2048
MAX_TRACEBACK = 3072
ROLE_RE = re.compile(r"[a-z]{1,16}")


class Kind(enum.Enum):
    BEAT = "beat"
    PROBLEM = "problem"


class StatusError(ValueError):
    """A status line that is refused; the text says exactly why."""


@dataclass(frozen=True)
class Status:
    """What a child says about itself with each beat. None means "not known
    or not applicable"; each beat carries the whole current status.

    busy: a hook or staging runs (the installer): a reload waits for it.
    job_id, execution: the job execution the child works on.
    phase: a short lowercase word, e.g. ``download``, ``install``, ``idle``.
    bytes_done, bytes_total, rate: download progress, rate in bytes/s.
    subscribed: the broker's MQTT subscriptions are in place.
    """

    busy: bool | None = None
    job_id: str | None = None
    execution: int | None = None
    phase: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    rate: int | None = None
    subscribed: bool | None = None

    def __post_init__(self):
        problem = status_problem(dataclasses.asdict(self))
        if problem:  # the child's own inconsistency: fail where it happens
            raise ValueError(f"Status: {problem}")

    def fields(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def without_progress(self) -> "Status":
        """The status with the fields that change on every chunk left out."""
        return dataclasses.replace(self, bytes_done=None, rate=None)


STATUS_FIELDS = tuple(f.name for f in dataclasses.fields(Status))
_BOOLS = ("busy", "subscribed")
_COUNTS = ("execution", "bytes_done", "bytes_total", "rate")


def status_problem(body: dict) -> str | None:
    """Why ``body`` (field -> value) is not a Status, or None."""
    for key, value in body.items():
        if key not in STATUS_FIELDS:
            return f"unknown status field {key!r}"
        if value is None:
            continue
        if key in _BOOLS and not isinstance(value, bool):
            return f"{key} is not a boolean"
        if key in _COUNTS and not is_count(value):
            return f"{key} is not a count (0 <= n < 2**63)"
        if key == "job_id" and not is_job_id(value):
            return "job_id is not a job id"
        if key == "phase" and not (isinstance(value, str) and PHASE_RE.fullmatch(value)):
            return "phase is not a short lowercase word"
    return None


@dataclass(frozen=True)
class Problem:
    """An error log record or unhandled exception of a root process, which
    the supervisor passes to the unprivileged Sentry relay (never sends it
    itself). ``role`` is set by the supervisor, whatever the child claims."""

    level: str
    logger: str
    message: str
    traceback: str | None = None
    role: str | None = None

    @classmethod
    def fitted(cls, level: str, logger: str, message: str, traceback: str | None = None) -> "Problem":
        """A Problem cut to the limits (a log record may be of any length):
        the start of the message, the end of the traceback (the innermost frames)."""
        level = level if level in PROBLEM_LEVELS else "ERROR"
        logger = logger if LOGGER_RE.fullmatch(logger or "") else "unknown"
        message = _printable(message)[:MAX_MESSAGE]
        if traceback is not None:
            traceback = _printable(traceback, keep_newlines=True)[-MAX_TRACEBACK:]
        problem = cls(level, logger, message, traceback)
        # Multi-byte characters may still make the line too long: shrink until it fits.
        while len(encode_problem(problem)) > MAX_LINE:
            if len(problem.message.encode()) > MAX_LINE // 4 or not problem.traceback:
                problem = dataclasses.replace(problem, message=problem.message[: len(problem.message) * 3 // 4])
            else:
                cut = problem.traceback[len(problem.traceback) // 4 + 1:]
                problem = dataclasses.replace(problem, traceback=cut or None)
        return problem


def _printable(text: str, keep_newlines: bool = False) -> str:
    text = str(text).encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else " " for c in text)


def encode_beat(status: Status) -> bytes:
    return safejson.dumps({"v": VERSION, "type": Kind.BEAT.value, "status": status.fields()}) + b"\n"


def encode_problem(problem: Problem) -> bytes:
    body = {"v": VERSION, "type": Kind.PROBLEM.value, "level": problem.level, "logger": problem.logger,
            "message": problem.message}
    if problem.traceback is not None:
        body["traceback"] = problem.traceback
    if problem.role is not None:
        body["role"] = problem.role
    return safejson.dumps(body) + b"\n"


def decode(line: bytes) -> Status | Problem:
    """One line (without its newline) -> Status or Problem; raises StatusError."""
    if len(line) >= MAX_LINE:
        raise StatusError(f"line of {len(line)} bytes exceeds {MAX_LINE - 1}")
    try:
        body = safejson.loads(line, max_bytes=MAX_LINE, max_depth=2, max_string=MAX_TRACEBACK, max_items=64)
    except safejson.BadJson as exc:
        raise StatusError(str(exc)) from None
    if not isinstance(body, dict):
        raise StatusError("not a JSON object")
    if body.get("v") != VERSION:
        raise StatusError(f"version is not {VERSION}")
    kind = body.get("type")
    if kind == Kind.BEAT.value:
        _only(body, {"v", "type", "status"})
        fields = body.get("status")
        if not isinstance(fields, dict):
            raise StatusError("status is not an object")
        problem = status_problem(fields)
        if problem:
            raise StatusError(problem)
        return Status(**fields)
    if kind == Kind.PROBLEM.value:
        _only(body, {"v", "type", "level", "logger", "message", "traceback", "role"})
        level, logger, message = body.get("level"), body.get("logger"), body.get("message")
        traceback, role = body.get("traceback"), body.get("role")
        if level not in PROBLEM_LEVELS:
            raise StatusError("level is not ERROR or CRITICAL")
        if not isinstance(logger, str) or not LOGGER_RE.fullmatch(logger):
            raise StatusError("logger is not a logger name")
        if not isinstance(message, str) or len(message) > MAX_MESSAGE or not message.isprintable():
            raise StatusError(f"message is not printable text of at most {MAX_MESSAGE} characters")
        if traceback is not None and (not isinstance(traceback, str) or len(traceback) > MAX_TRACEBACK
                                      or not traceback.replace("\n", "").isprintable()):
            raise StatusError(f"traceback is not text of at most {MAX_TRACEBACK} characters")
        if role is not None and not (isinstance(role, str) and ROLE_RE.fullmatch(role)):
            raise StatusError("role is not a process name")
        return Problem(level, logger, message, traceback, role)
    raise StatusError("type is not beat or problem")


def _only(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise StatusError(f"unknown field {extra[0]!r}")


class LineBuffer:
    """Splits what the supervisor reads from one pipe into lines.

    ``feed`` returns complete lines (without the newline) and, for a line
    longer than ``MAX_LINE``, one StatusError; the rest of that line is
    skipped up to the next newline, so one bad line never eats the next.
    """

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | StatusError]:
        out: list[bytes | StatusError] = []
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) >= self.max_line:
                    if not self._skipping:
                        out.append(StatusError(f"line longer than {self.max_line - 1} bytes"))
                    self._skipping = True
                    self._buf.clear()
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) >= self.max_line:
                out.append(StatusError(f"line longer than {self.max_line - 1} bytes"))
                continue
            out.append(line)


# -- supervisor -> Sentry relay --------------------------------------------------
#
# With [service] sentry set, the supervisor starts an unprivileged relay
# (upparat.relay_proc) and writes to its stdin one hello line, then the
# Problem lines of the root processes (with ``role`` set). The input comes
# from root, but it is decoded the same way.


@dataclass(frozen=True)
class RelayHello:
    dsn: str
    thing_name: str
    verbose: bool = False

    def encode(self) -> bytes:
        return safejson.dumps({"v": VERSION, "type": "hello", "dsn": self.dsn, "thing_name": self.thing_name,
                               "verbose": self.verbose}) + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "RelayHello":
        try:
            body = safejson.loads(line, max_bytes=MAX_LINE, max_depth=1, max_string=2048, max_items=16)
        except safejson.BadJson as exc:
            raise StatusError(str(exc)) from None
        if not isinstance(body, dict) or body.get("v") != VERSION or body.get("type") != "hello":
            raise StatusError(f"not a version {VERSION} hello")
        _only(body, {"v", "type", "dsn", "thing_name", "verbose"})
        dsn, thing, verbose = body.get("dsn"), body.get("thing_name"), body.get("verbose")
        if not isinstance(dsn, str) or not dsn or not isinstance(thing, str) or not isinstance(verbose, bool):
            raise StatusError("hello needs dsn, thing_name and verbose")
        return cls(dsn, thing, verbose)
