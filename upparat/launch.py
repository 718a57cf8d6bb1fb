"""How a child process starts: the contract between the supervisor and the
three children, and the first things every child does.

The supervisor runs ``python -m upparat.<name>_proc --from-supervisor`` and
writes one JSON envelope to the child's stdin: the config text it has
already validated as root, the command-line overrides, and the contents of
the few root-readable files the child needs (TLS material for the broker,
public keys for the fetcher), so an unprivileged child never needs to read a
root-only file. ``python -m upparat.<name>_proc -c CONFIG`` is the same child
started on its own (one systemd unit per process).

An unprivileged child sets ``no_new_privs`` and checks that it holds no uid
0, no gid 0 and no capabilities before it does anything else; if not, it
exits with EXIT_UNSAFE.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from upparat import codes, config as config_mod
from upparat.ipc import status
from upparat.ipc.settings import (
    MAX_ENVELOPE,
    STANDALONE_TMPDIR,
    ChildSettings,
    Identities,
    Layout,
    resolve_identities,
    resolve_layout,
)

PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
PR_SET_PDEATHSIG = 1


class Heartbeat:
    """Tells the supervisor that this child's main loop is alive, with a short
    status (``upparat.ipc.status``). Every child calls ``beat()`` from its
    main loop, at least every ``status.BEAT_EVERY`` s (also while a hook or a
    download runs); a child whose beats stop is killed and restarted by the
    supervisor. Rate-limited here, so calling it on every loop iteration is
    cheap: a beat whose status changed in more than the progress counters is
    sent at once, others at most every ``min_interval`` s. Never blocks: a
    full pipe drops the beat. Without a supervisor it does nothing.
    """

    def __init__(self, fd: int | None = None, min_interval: float = 0.5, on_orphaned=None,
                 clock=time.monotonic):
        self._fd = fd
        self.min_interval = min_interval
        self._on_orphaned = on_orphaned  # called once when the supervisor is gone
        self._clock = clock
        self._lock = threading.Lock()
        self._last_sent = float("-inf")
        self._last_key: status.Status | None = None
        self.dropped = 0  # beats lost to a full pipe
        self.orphaned = False  # the supervisor closed its end: it is gone
        if fd is not None:
            os.set_blocking(fd, False)

    def beat(self, **fields) -> None:
        """``fields``: the whole current status, e.g. busy=True (a hook or
        staging runs), job_id, execution, phase, bytes_done, bytes_total,
        rate, subscribed; see ``status.Status``. A wrong field or type raises."""
        current = status.Status(**fields)
        if self._fd is None:
            return
        now = self._clock()
        key = current.without_progress()
        with self._lock:
            if key == self._last_key and now - self._last_sent < self.min_interval:
                return
            if self._write(status.encode_beat(current)):
                self._last_sent, self._last_key = now, key

    def problem(self, problem: status.Problem) -> None:
        """An error record for Sentry, passed on by the supervisor (root children)."""
        if self._fd is not None:
            with self._lock:
                self._write(status.encode_problem(problem))

    def _write(self, line: bytes) -> bool:
        try:
            os.write(self._fd, line)  # at most PIPE_BUF bytes: all or nothing
            return True
        except BlockingIOError:
            self.dropped += 1
        except BrokenPipeError:  # the supervisor is gone: nobody watches us any more
            self._fd = None
            self.orphaned = True
            if self._on_orphaned:
                self._on_orphaned()
        return False


class ProblemHandler(logging.Handler):
    """Root children: error records go to the supervisor (and on to the
    unprivileged broker, which sends it to Sentry) instead of a network library loaded as root."""

    def __init__(self, heartbeat: Heartbeat):
        super().__init__(logging.ERROR)
        self.heartbeat = heartbeat

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tb = None
            if record.exc_info:
                tb = "".join(traceback.format_exception(*record.exc_info))
            self.heartbeat.problem(status.Problem.fitted(record.levelname, record.name, record.getMessage(), tb))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@dataclass
class ChildContext:
    name: str
    config: config_mod.Config
    layout: Layout
    ids: Identities
    verbose: bool
    tls: dict[str, str] = field(default_factory=dict)  # cafile/certfile/keyfile PEM text
    public_keys_pem: tuple[str, ...] = ()
    # Started on its own (``-c CONFIG``, one systemd unit per process) rather
    # than by the supervisor: such a child applies the supervisor's own checks
    # to ``config_path`` and prepares its own directories.
    standalone: bool = False
    config_path: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    # broker with [service] sentry, started by the supervisor: its stdin stays
    # open and carries the root processes' error records (upparat.ipc.status).
    problems_fd: int | None = None
    problems_rest: bytes = b""


def _prctl(option: int, value: int, what: str) -> None:
    import ctypes  # here: the supervisor imports this module and never calls prctl

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({what}) failed")


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def set_not_dumpable() -> None:
    """No core dumps and no /proc/PID/mem or ptrace access by the same uid."""
    _prctl(PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")


def proc_status() -> dict[str, str]:
    status = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return status


def privilege_problem() -> str | None:
    """Why this process is not safely unprivileged, or None."""
    if 0 in os.getresuid():
        return "runs with uid 0"
    if 0 in os.getresgid():
        return "runs with gid 0"
    if 0 in os.getgroups():
        return "holds supplementary group 0"
    status = proc_status()
    for key in ("CapEff", "CapPrm", "CapAmb"):
        if int(status.get(key, "0"), 16) != 0:
            return f"holds capabilities ({key} {status[key]})"
    if status.get("NoNewPrivs") != "1":
        return "no_new_privs is not set"
    return None


def stderr_is_journal() -> bool:
    """Our stderr is a journald stream (systemd.exec(5) JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<priority>`` in front, so journald files each line at its level;
    journald adds the time itself."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        # Every line of a multi-line record (a traceback) gets the prefix.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def setup_logging(name: str, level: int) -> None:
    """Every line names its process (``upparat-broker[pid]``), also in the
    journal of upparat.service, where all four share one unit."""
    fmt = f"upparat-{name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(fmt))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s " + fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def init_sentry(cfg: config_mod.Config, name: str) -> None:
    """Unprivileged processes only: unhandled exceptions and error log
    records go to Sentry, tagged with role and thing name. Without
    ``[service] sentry`` sentry-sdk is never imported."""
    if not cfg.service.sentry:
        return
    try:
        import sentry_sdk
    except ImportError:
        logging.getLogger(__name__).warning("[service] sentry is set but sentry-sdk is not installed "
                                            "(pip install 'upparat[sentry]')")
        return
    sentry_sdk.init(cfg.service.sentry, server_name=f"upparat-{name}", auto_enabling_integrations=False,
                    default_integrations=True)
    sentry_sdk.set_tag("role", name)
    sentry_sdk.set_tag("thing_name", cfg.broker.thing_name)


def forward_problems(heartbeat: Heartbeat) -> None:
    """Root processes: error records and unhandled exceptions go over the
    status pipe to the supervisor, which hands them to the unprivileged
    broker for Sentry; no network library is loaded as root."""
    logging.getLogger().addHandler(ProblemHandler(heartbeat))
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        heartbeat.problem(status.Problem.fitted("CRITICAL", "unhandled", f"{kind.__name__}: {value}", text))
        previous(kind, value, tb)

    def thread_excepthook(args):
        if args.exc_type is not SystemExit:
            excepthook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def set_parent_death_signal() -> None:
    """SIGKILL when the supervisor dies, whatever the way: no child is left
    behind. Set here, after the uid change of the spawn (a change of
    credentials clears it); the first beat then finds out whether the
    supervisor died before this point."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")


def read_envelope(fd: int, timeout: float = 30.0) -> tuple[bytes, bytes]:
    """The settings line from the supervisor, and whatever came after it
    (read with os.read: a buffered reader would swallow what follows)."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data and len(data) <= MAX_ENVELOPE:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise ValueError("no settings from the supervisor in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    line, newline, rest = data.partition(b"\n")
    if not newline and len(data) > MAX_ENVELOPE:
        raise ValueError(f"settings longer than {MAX_ENVELOPE} bytes")
    return line, rest


def standalone_settings(name: str, config_path: str, verbose: bool, thing_name: str | None) -> ChildSettings:
    """What the supervisor would have sent, computed the same way (per-process
    systemd units): the same functions, fixed inputs, never this process's
    uid or environment for a path."""
    if config_path == "-":
        # Per-process units: systemd opens the root-only file as root and hands
        # it over as stdin (StandardInput=file:...), so it stays 0600.
        text = sys.stdin.read(MAX_ENVELOPE + 1)
        cfg = config_mod.parse(text, "<stdin>", check_files=True)
    else:
        cfg, text = config_mod.load(config_path)
    if thing_name:
        cfg = cfg.replace_thing_name(thing_name)
    layout = resolve_layout(cfg, STANDALONE_TMPDIR)
    uid = os.getuid()
    try:
        ids = resolve_identities(cfg, True, 0, 0, "root")
    except config_mod.ConfigError:
        if uid == 0:
            raise
        ids = None
    if ids is None or (uid != 0 and uid not in (ids.broker_uid, ids.fetcher_uid)):
        # A development run by hand, as a user that is neither of the configured ones.
        import pwd
        try:
            me = pwd.getpwuid(uid).pw_name
        except KeyError:
            me = str(uid)
        ids = resolve_identities(cfg, False, uid, os.getgid(), me)
    tls = {}
    keys: tuple[str, ...] = ()
    if name == "broker":
        # Per-process units hand root-only TLS files over as systemd credentials
        # (LoadCredential=cafile:..., certfile, keyfile); they win over the paths.
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        for key in ("cafile", "certfile", "keyfile"):
            if creds and os.path.isfile(os.path.join(creds, key)):
                tls[key] = Path(creds, key).read_text()
            elif getattr(cfg.broker, key):
                tls[key] = Path(getattr(cfg.broker, key)).read_text()
    if name == "installer":  # only the installer checks signatures
        keys = tuple(p.read_text() for p in cfg.verification.public_keys)
    return ChildSettings(role=name, config_text=text, config_path=config_path, verbose=verbose,
                         thing_name=thing_name, layout=layout, ids=ids, tls=tls, public_keys_pem=keys)


def start_child(name: str, unprivileged: bool, argv: list[str] | None = None) -> ChildContext:
    """Everything a child does before its own work; exits on any problem."""
    try:
        set_parent_death_signal()  # first, before anything else
    except OSError as exc:
        print(f"upparat-{name}: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_FAILURE)
    if unprivileged:
        try:
            set_no_new_privs()
            set_not_dumpable()
        except OSError as exc:
            print(f"upparat-{name}: {exc}", file=sys.stderr)
            sys.exit(codes.EXIT_UNSAFE)
        problem = privilege_problem()
        if problem:
            print(f"upparat-{name}: refusing to run: this process {problem}; "
                  "it must be started by upparat-supervisor (as root it drops privileges) "
                  "or as an unprivileged user", file=sys.stderr)
            sys.exit(codes.EXIT_UNSAFE)

    parser = argparse.ArgumentParser(prog=f"python -m upparat.{name}_proc")
    parser.add_argument("--from-supervisor", action="store_true", help="read settings from stdin")
    parser.add_argument("-c", "--config-file")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-t", "--thing-name")
    parser.add_argument("--status-fd", type=int, help="pipe to the supervisor (upparat.ipc.status)")
    args = parser.parse_args(argv)

    try:
        if args.from_supervisor:
            line, stdin_rest = read_envelope(0)
            settings = ChildSettings.decode(line)
            if settings.role != name:
                raise ValueError(f"settings are for {settings.role}, not {name}")
            cfg = config_mod.parse(settings.config_text, settings.config_path, check_files=False)
            if settings.thing_name:
                cfg = cfg.replace_thing_name(settings.thing_name)
        elif args.config_file:
            settings = standalone_settings(name, args.config_file, args.verbose, args.thing_name)
            cfg = config_mod.parse(settings.config_text, settings.config_path, check_files=False)
            if settings.thing_name:
                cfg = cfg.replace_thing_name(settings.thing_name)
        else:
            parser.error("give -c CONFIG or --from-supervisor")
    except config_mod.ConfigError as exc:
        print(f"upparat-{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_USAGE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"upparat-{name}: cannot read settings: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_USAGE)

    stop = threading.Event()
    heartbeat = Heartbeat(args.status_fd, on_orphaned=stop.set)
    heartbeat.beat()
    if heartbeat.orphaned:
        # The supervisor died before our parent-death signal was set.
        print(f"upparat-{name}: the supervisor is gone; exiting", file=sys.stderr)
        sys.exit(codes.EXIT_FAILURE)

    setup_logging(name, logging.DEBUG if settings.verbose else cfg.service.log_level)
    if cfg.service.sentry:
        if unprivileged:
            init_sentry(cfg, name)
        elif args.status_fd is not None:
            forward_problems(heartbeat)
    ctx = ChildContext(name=name, config=cfg, layout=settings.layout, ids=settings.ids, verbose=settings.verbose,
                       tls=dict(settings.tls), public_keys_pem=tuple(settings.public_keys_pem),
                       standalone=not args.from_supervisor, config_path=settings.config_path,
                       stop=stop, heartbeat=heartbeat)
    if args.from_supervisor and name == "broker" and cfg.service.sentry:
        os.set_blocking(0, False)
        ctx.problems_fd, ctx.problems_rest = 0, stdin_rest


    def _stop(signum, _frame):  # only sets a flag; the main loop acts
        ctx.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logging.getLogger(__name__).info(
        "started as uid %d gid %d%s", os.getuid(), os.getgid(), " (unprivileged)" if unprivileged else "")
    return ctx
