"""upparat-supervisor: starts, watches and restarts the three children.

Contract. Runs as root and parses no network input: only its command line,
its configuration file (which must be root's own when privileges are
separated: the installer runs the hooks that file names), and the bounded,
schema-checked status lines its children write to it (``upparat.ipc.status``,
treated as hostile-peer input). It creates the runtime, download and staging
directories with the owners in ``upparat.ipc.settings``, reads the few
root-only files the children need, and starts each child as a fresh
interpreter by module name (``python -m upparat.<name>_proc --from-supervisor
--status-fd N``, see launch.py), the unprivileged ones with the uid and gid of
``[supervisor] user`` / ``fetcher_user`` and no supplementary groups. Setting
the uids from root clears every capability; the child then sets
no_new_privs and refuses to run (EXIT_UNSAFE) if anything is left.

Supervision (supervision.py has the state machine): a child that exits is
restarted with capped exponential backoff; one whose heartbeats stop (it is
stopped or deadlocked) is killed after ``Policy.heartbeat_timeout`` s (before
its first beat: ``first_beat_within`` s) and restarted the same way. So a hung
child runs again at the latest heartbeat_timeout + MAX_POLL + KILL_WAIT + the
current backoff delay after its last beat (11 s + backoff with the defaults).
A child that exits with EXIT_USAGE (it finds the configuration unusable) or
EXIT_UNSAFE is a structural fault that no restart can fix: the supervisor
stops everything and exits 2 or 1. Each child sets PR_SET_PDEATHSIG first
thing, so killing the supervisor (even with SIGKILL) kills every child.

Signals: handlers only enqueue; the main loop acts through ``handle_<signal>``.
SIGTERM/SIGINT stop (each child gets SIGTERM, then SIGKILL after
STOP_TIMEOUT s; exit 0); SIGHUP re-reads the configuration and restarts the
children, but never while the installer reports ``busy`` (a hook or staging
runs): the reload waits for that to end; SIGCHLD reaps.

systemd: ``READY=1`` once every child has sent its first heartbeat,
``STATUS=`` with the current job's phase and progress, ``WATCHDOG=1`` every
half ``WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``. Under journald each
child's output goes to a journal stream of its own, tagged ``upparat-<name>``.

``upparatctl status`` reads what the supervisor knows over the control
socket ``<runtime_dir>/control/control.sock`` (root and the broker's group).
The supervisor reads nothing from that socket: it sends one JSON document and
closes.

Exit codes (codes.py): 0 clean stop, 2 bad command line or configuration
(also when a child reports it), 1 anything else.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pwd
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from upparat import codes, config as config_mod, launch, safejson, trust
from upparat.ipc import status as status_ipc
from upparat.ipc.settings import (
    STANDALONE_TMPDIR,
    ChildSettings,
    Identities,
    Layout,
    resolve_identities,
    resolve_layout,
)
from upparat.supervision import ChildMachine, Policy, State

log = logging.getLogger("upparat.supervisor")

ROOT = "root"
BROKER_USER = "broker user"  # [supervisor] user
FETCHER_USER = "fetcher user"  # [supervisor] fetcher_user
TLS = "tls"  # [broker] cafile, certfile, keyfile as PEM text
PUBLIC_KEYS = "public_keys"  # [verification] public_keys as PEM text
PROBLEMS = "problems"  # with [service] sentry: the root processes' error records, on stdin


@dataclass(frozen=True)
class ChildSpec:
    name: str
    module: str
    runs_as: str
    receives: tuple[str, ...]  # root-only file contents passed in the envelope


# The children, in start order (Postfix master.cf style). The installer
# comes first so that its socket exists when the others connect; it reads
# the public keys to re-verify every release itself.
#
#         name         module                    runs as        receives
CHILDREN = (
    ChildSpec("installer", "upparat.installer_proc", ROOT, (PUBLIC_KEYS,)),
    ChildSpec("fetcher", "upparat.fetcher_proc", FETCHER_USER, ()),
    ChildSpec("broker", "upparat.broker_proc", BROKER_USER, (TLS, PROBLEMS)),
)

POLICY = Policy(running_after=5.0, backoff_initial=0.5, backoff_factor=2.0, backoff_max=30.0,
                heartbeat_timeout=10.0, first_beat_within=30.0)
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed child to be reaped
ENVELOPE_TIMEOUT = 10.0  # a child that does not read its settings by then is killed
MAX_POLL = 1.0  # the main loop also looks at its children at least this often
STATUS_READ = 65536  # bytes read from one child's status pipe per loop turn: no child starves the loop
CONTROL_BACKLOG = 8
CONTROL_ACCEPTS = 16  # connections answered per loop turn
STATUS_NOTIFY_EVERY = 1.0  # seconds: STATUS= to systemd at most this often
FETCHER_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
               "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOURNAL_STDOUT = "/run/systemd/journal/stdout"


FETCHER_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
               "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- identity, files, directories (run once per (re)load, before any child) --


def system_temp_dir() -> str:
    """Where ``tempfile.gettempdir()`` would look, without importing tempfile
    (it loads shutil, bz2 and lzma into a process that lives for months)."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value and os.path.isabs(value) and os.path.isdir(value):
            return os.path.normpath(value)
    for candidate in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(candidate):
            return candidate
    return "/tmp"


def current_identities(cfg: config_mod.Config) -> Identities:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return resolve_identities(cfg, os.geteuid() == 0, uid, os.getgid(), name)


def check_config_owner(path: str) -> None:
    """As root, the config names the commands root runs: only root may change it."""
    problem = trust.root_controlled(os.path.abspath(path))
    if problem:
        raise config_mod.ConfigError(
            "file", None, f"{problem}, and {path} names the commands root runs",
            f"make {path} and every directory above it owned by root and not writable by others "
            f"(chown root:root {path}; chmod go-w {path})")


@dataclass(frozen=True)
class RootFiles:
    """Contents of root-only files, read by the supervisor for its children."""

    tls: dict[str, str] = field(default_factory=dict)
    public_keys: tuple[str, ...] = ()


def read_root_files(cfg: config_mod.Config) -> RootFiles:
    tls = {}
    for key in ("cafile", "certfile", "keyfile"):
        path = getattr(cfg.broker, key)
        if path is not None:
            tls[key] = _read_text("broker", key, path)
    keys = tuple(_read_text("verification", "public_keys", p) for p in cfg.verification.public_keys)
    return RootFiles(tls=tls, public_keys=keys)


def _read_text(section: str, key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise config_mod.ConfigError(section, key, f"cannot read {path} ({exc})",
                                     "give a readable PEM file") from None


def prepare_dir(path: Path, uid: int, gid: int, mode: int, section: str, key: str) -> None:
    """Create ``path`` (parents too) and give it exactly this owner and mode.

    Works on a directory descriptor opened with O_NOFOLLOW, so a symlink put
    in its place is refused rather than followed, and what we chown is what
    we checked.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise config_mod.ConfigError(section, key, f"cannot create {path.parent} ({exc.strerror})",
                                     "choose a directory this user may create, or run as root") from None
    try:
        try:
            os.mkdir(path.name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise config_mod.ConfigError(section, key, f"cannot create {path} ({exc.strerror})",
                                         "choose a directory this user may create, or run as root") from None
        st = os.lstat(path.name, dir_fd=parent_fd)
        if stat.S_ISLNK(st.st_mode):
            raise config_mod.ConfigError(section, key, f"{path} is a symbolic link",
                                         "remove the link; Upparat creates this directory itself")
        if not stat.S_ISDIR(st.st_mode):
            raise config_mod.ConfigError(section, key, f"{path} exists and is not a directory",
                                         "remove it or choose another path")
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)
        except OSError as exc:  # replaced between lstat and open
            raise config_mod.ConfigError(section, key, f"cannot open {path} ({exc})",
                                         "remove it; Upparat creates this directory itself") from None
        try:
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        except OSError as exc:
            raise config_mod.ConfigError(section, key, f"cannot set owner and mode of {path} ({exc.strerror})",
                                         "run as root, or choose a directory of this user") from None
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)


def prepare_directories(layout: Layout, ids: Identities) -> None:
    """Create every directory with its owner and mode (see upparat.ipc.settings)."""
    root_uid, root_gid = (0, 0) if ids.separated else (ids.broker_uid, ids.broker_gid)
    rt = ("supervisor", "runtime_dir")
    prepare_dir(layout.runtime_dir, root_uid, root_gid, 0o755, *rt)
    prepare_dir(layout.runtime_dir / "installer", root_uid, ids.broker_gid, 0o750, *rt)
    # setgid: the fetcher's socket is born with the broker's group.
    prepare_dir(layout.runtime_dir / "fetcher", ids.fetcher_uid, ids.broker_gid, 0o2750, *rt)
    prepare_dir(layout.runtime_dir / "control", root_uid, ids.broker_gid, 0o750, *rt)

    location = layout.download_dir.parent  # may be /tmp: create, never chown
    try:
        location.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise config_mod.ConfigError("service", "download_location", f"cannot create {location} ({exc})",
                                     "give an existing directory or one that can be created") from None
    if not location.is_dir():
        raise config_mod.ConfigError("service", "download_location", f"{location} is not a directory",
                                     "give a directory path")
    prepare_dir(layout.download_dir, ids.fetcher_uid, ids.fetcher_gid, 0o700, "service", "download_location")
    prepare_dir(layout.staging_dir, root_uid, root_gid, 0o700, "service", "staging_location")
    state = ("service", "state_location")
    prepare_dir(layout.broker_state_dir.parent, root_uid, root_gid, 0o755, *state)
    prepare_dir(layout.broker_state_dir, ids.broker_uid, ids.broker_gid, 0o700, *state)
    prepare_dir(layout.fetcher_state_dir, ids.fetcher_uid, ids.fetcher_gid, 0o700, *state)


# -- systemd: readiness, status, watchdog, journal streams -------------------------


def sd_notify(message: str) -> bool:
    """Send one sd_notify(3) datagram if systemd asked for it (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", message.replace("\n", " "), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC (sd_watchdog_enabled(3)), when it is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def open_journal_stream(identifier: str) -> socket.socket | None:
    """A journald stream connection tagged ``identifier`` (what systemd-cat
    does), so that ``journalctl -t upparat-broker`` finds the broker's lines in
    upparat.service too. None when journald cannot be reached."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(JOURNAL_STDOUT)
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix, forward to syslog, kmsg, console
        sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    except OSError as exc:
        log.warning("cannot open a journal stream for %s (%s); it logs to our stderr", identifier, exc)
        return None
    return sock


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


# -- the control socket (upparatctl status) -----------------------------------------


def open_control_socket(path: Path, ids: Identities) -> socket.socket:
    """Listen on ``path`` (root:broker-group 0660, in a 0750 directory of the
    same owners, made by prepare_directories): only root and the broker's
    group may connect. Raises OSError."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a supervisor that was killed
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        old = os.umask(0o177)  # no window in which the socket is more open than 0600
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chown(path, -1, ids.broker_gid)
        os.chmod(path, 0o660)
        sock.listen(CONTROL_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


# -- the supervisor ----------------------------------------------------------------


@dataclass
class Settings:
    """Everything one configuration (re)load produced."""

    cfg: config_mod.Config
    text: str
    path: str
    layout: Layout
    ids: Identities
    files: RootFiles


def load_settings(path: str, thing_name: str | None, tmpdir: str | None = None) -> Settings:
    """Read and check everything; raises ConfigError. Creates the directories.

    ``tmpdir``: STANDALONE_TMPDIR for the per-process units (what their
    children compute); the supervisor looks up the system temp dir."""
    cfg, text = config_mod.load(path)
    if thing_name:
        cfg = cfg.replace_thing_name(thing_name)
    ids = current_identities(cfg)
    if ids.separated:
        check_config_owner(path)
    layout = resolve_layout(cfg, tmpdir or system_temp_dir())  # the one place the temp dir is looked up
    files = read_root_files(cfg)
    prepare_directories(layout, ids)
    return Settings(cfg, text, path, layout, ids, files)


class Child:
    """One supervised child: its spec, its state machine, its process, and
    what it last said about itself on its status pipe."""

    def __init__(self, spec: ChildSpec, policy: Policy):
        self.spec = spec
        self.machine = ChildMachine(spec.name, policy)
        self.popen: subprocess.Popen | None = None
        self.status_fd: int | None = None  # read end of its status pipe
        self.lines = status_ipc.LineBuffer()
        self.status: status_ipc.Status | None = None
        self.refused = 0  # status lines refused from this process
        self.killed_hung = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def close_status(self) -> None:
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None
        self.lines = status_ipc.LineBuffer()


class SentryForwarder(logging.Handler):
    """The supervisor's own error records, for Sentry (through the broker)."""

    def __init__(self, supervisor: "Supervisor"):
        super().__init__(logging.ERROR)
        self.supervisor = supervisor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tb = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else None
            problem = status_ipc.Problem.fitted(record.levelname, record.name, record.getMessage(), tb)
            self.supervisor.forward_problem("supervisor", problem)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)  # handled in this order

    def __init__(self, settings: Settings, verbose: bool, thing_name: str | None,
                 policy: Policy | None = None, specs: tuple[ChildSpec, ...] | None = None,
                 stop_timeout: float | None = None, clock=time.monotonic):
        # Defaults are looked up now, not at import, so that tests can shorten them.
        policy = policy or POLICY
        specs = specs if specs is not None else CHILDREN
        self.settings = settings
        self.verbose = verbose
        self.thing_name = thing_name
        self.clock = clock
        self.stop_timeout = STOP_TIMEOUT if stop_timeout is None else stop_timeout
        self.children = [Child(spec, policy) for spec in specs]
        self.exit_code: int | None = None
        self.reload_requested = False
        self._reload_deferred_logged = False
        self.started_at = clock()
        self.ready = False
        self._pending: collections.deque[int] = collections.deque()
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, object] = {}
        self.control: socket.socket | None = None
        self.control_path: Path | None = None
        self._last_status_text = ""
        self._status_sent_at = float("-inf")
        self._watchdog = watchdog_interval()
        self._watchdog_at = clock()
        self._journal = launch.stderr_is_journal()
        self.problems_fd: int | None = None  # the broker's stdin, while Sentry is on

    # ---- signals: handlers only enqueue ----

    def _enqueue(self, signum, _frame) -> None:
        self._pending.append(signum)

    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._enqueue)

    def restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def dispatch_signals(self) -> None:
        pending = set()
        while self._pending:
            pending.add(self._pending.popleft())
        for signum in self.SIGNALS:
            if signum in pending:
                getattr(self, f"handle_{signal.Signals(signum).name.lower()}")()

    def handle_sigterm(self) -> None:
        log.info("SIGTERM: stopping")
        self.exit_code = codes.EXIT_OK

    def handle_sigint(self) -> None:
        log.info("SIGINT: stopping")
        self.exit_code = codes.EXIT_OK

    def handle_sighup(self) -> None:
        try:  # check the new configuration now, so that an error shows at once
            load_settings(self.settings.path, self.thing_name)
        except config_mod.ConfigError as exc:
            log.error("SIGHUP: configuration error, keeping the running configuration: %s", exc)
            return
        log.info("SIGHUP: will re-read %s and restart the children", self.settings.path)
        self.reload_requested = True
        self._reload_deferred_logged = False

    def handle_sigchld(self) -> None:
        self.reap()

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal, a status line or a control connection arrives,
        or ``timeout`` s passed, and handle the lines and connections.

        A signal that came after the last dispatch has left a byte in the
        wakeup pipe, so select returns at once: no signal is slept through.
        """
        readers = [self._wake_r] + [c.status_fd for c in self.children if c.status_fd is not None]
        if self.control is not None:
            readers.append(self.control.fileno())
        try:
            ready, _, _ = select.select(readers, [], [], max(0.0, timeout))
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for child in self.children:
            if child.status_fd is not None and child.status_fd in ready:
                self.read_status(child)
        if self.control is not None and self.control.fileno() in ready:
            self.answer_control()

    # ---- the status channel ----

    def read_status(self, child: Child) -> None:
        """Read what is there (bounded), decode each line, act on it."""
        try:
            data = os.read(child.status_fd, STATUS_READ)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: cannot read its status pipe (%s)", child.spec.name, exc)
            data = b""
        if not data:  # EOF: the process closed it or is gone; its exit is reaped as usual
            child.close_status()
            return
        now = self.clock()
        for item in child.lines.feed(data):
            try:
                if isinstance(item, status_ipc.StatusError):
                    raise item
                message = status_ipc.decode(item)
            except status_ipc.StatusError as exc:
                child.refused += 1
                if child.refused <= 3 or child.refused % 100 == 0:  # garbage is logged, not a flood
                    log.warning("%s (pid %s): status line refused (%s); %d refused so far",
                                child.spec.name, child.pid, exc, child.refused)
                continue
            if isinstance(message, status_ipc.Status):
                child.machine.beat(now)
                child.status = message
            else:
                self.forward_problem(child.spec.name, message)

    def forward_problem(self, role: str, problem: status_ipc.Problem) -> None:
        """Pass an error record to the broker for Sentry, never blocking: a
        full pipe drops it (it is in the journal anyway)."""
        if self.problems_fd is None:
            return
        problem = status_ipc.Problem(problem.level, problem.logger, problem.message, problem.traceback, role)
        line = status_ipc.encode_problem(problem)
        if len(line) > status_ipc.MAX_LINE:
            return
        try:
            os.write(self.problems_fd, line)
        except BlockingIOError:
            pass
        except OSError:
            self._close_problems()

    def _close_problems(self) -> None:
        if self.problems_fd is not None:
            try:
                os.close(self.problems_fd)
            except OSError:
                pass
            self.problems_fd = None

    def check_heartbeats(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.popen is not None and not child.killed_hung and child.machine.hung(now):
                since = child.machine.last_beat
                if since is None:
                    log.error("%s (pid %d) sent no heartbeat within %.0f s of its start (hung?); killing it",
                              child.spec.name, child.pid, child.machine.policy.first_beat_within)
                else:
                    log.error("%s (pid %d) sent no heartbeat for %.0f s (stopped or deadlocked); killing it",
                              child.spec.name, child.pid, now - since)
                child.killed_hung = True
                self._kill(child)

    # ---- what we know: for systemd and upparatctl ----

    def child_by_name(self, name: str) -> Child | None:
        return next((c for c in self.children if c.spec.name == name), None)

    def _status_of(self, name: str) -> status_ipc.Status | None:
        child = self.child_by_name(name)
        return child.status if child and child.popen is not None else None

    def installer_busy(self) -> bool:
        status = self._status_of("installer")
        return bool(status and status.busy)

    def job_view(self) -> dict | None:
        """The current job as the children report it: the broker's job and
        phase, the fetcher's progress for it, the installer's busy flag."""
        broker, fetcher, installer = (self._status_of(n) for n in ("broker", "fetcher", "installer"))
        source = next((s for s in (broker, installer, fetcher) if s and s.job_id), None)
        if source is None:
            return None
        view = {"job_id": source.job_id, "execution": source.execution, "phase": source.phase,
                "busy": bool(installer and installer.busy and installer.job_id in (None, source.job_id)),
                "bytes_done": None, "bytes_total": None, "rate": None}
        if fetcher and fetcher.job_id == source.job_id:
            view.update(bytes_done=fetcher.bytes_done, bytes_total=fetcher.bytes_total, rate=fetcher.rate)
            if view["phase"] is None:
                view["phase"] = fetcher.phase
        return view

    def snapshot(self) -> dict:
        """What ``upparatctl status --json`` shows (version 1)."""
        now = self.clock()
        children = []
        for child in self.children:
            m = child.machine
            alive = child.popen is not None
            children.append({
                "name": child.spec.name,
                "state": m.state.value,
                "pid": child.pid,
                "uptime": round(now - m.started_at, 1) if alive and m.started_at is not None else None,
                "restarts": m.restarts,
                "last_beat_age": round(now - m.last_beat, 1) if alive and m.last_beat is not None else None,
                "status": child.status.fields() if alive and child.status else {},
            })
        return {
            "v": 1,
            "supervisor": {"pid": os.getpid(), "uptime": round(now - self.started_at, 1),
                           "separated": self.settings.ids.separated, "ready": self.ready,
                           "reload_pending": self.reload_requested, "config": self.settings.path},
            "children": children,
            "job": self.job_view(),
        }

    def status_text(self) -> str:
        """One line for systemctl status (STATUS=)."""
        waiting = [c.spec.name for c in self.children if c.machine.state is not State.RUNNING
                   or c.machine.last_beat is None]
        job = self.job_view()
        if job:
            text = f"job {job['job_id']}"
            if job["execution"] is not None:
                text += f" (execution {job['execution']})"
            text += f": {job['phase'] or 'in progress'}"
            if job["bytes_done"] is not None:
                text += f", {human_bytes(job['bytes_done'])}"
                if job["bytes_total"]:
                    text += f" of {human_bytes(job['bytes_total'])}"
                if job["rate"]:
                    text += f" at {human_bytes(job['rate'])}/s"
        else:
            broker = self._status_of("broker")
            text = "idle" if broker and broker.subscribed else "connecting"
        if waiting:
            text += "; not running yet: " + ", ".join(
                f"{name} ({self.child_by_name(name).machine.state.value})" for name in waiting)
        if self.reload_requested:
            text += "; reload waits for the installer"
        return text

    def notify_systemd(self) -> None:
        now = self.clock()
        if not self.ready and all(c.machine.last_beat is not None for c in self.children):
            self.ready = True
            log.info("all children run: %s", ", ".join(f"{c.spec.name} (pid {c.pid})" for c in self.children))
            sd_notify("READY=1\nSTATUS=" + self.status_text())
            self._last_status_text, self._status_sent_at = self.status_text(), now
        elif self.ready and now - self._status_sent_at >= STATUS_NOTIFY_EVERY:
            text = self.status_text()
            if text != self._last_status_text:
                sd_notify("STATUS=" + text)
                self._last_status_text, self._status_sent_at = text, now
        if self._watchdog and now >= self._watchdog_at:
            sd_notify("WATCHDOG=1")  # the loop turns: every child is watched
            self._watchdog_at = now + self._watchdog

    # ---- the control socket ----

    def open_control(self) -> None:
        path = self.settings.layout.control_socket
        if self.control is not None and self.control_path == path:
            return
        self.close_control()
        try:
            self.control = open_control_socket(path, self.settings.ids)
            self.control_path = path
        except OSError as exc:  # upparatctl will not work; supervision does
            log.error("cannot listen on %s (%s); upparatctl status will not answer", path, exc)

    def close_control(self) -> None:
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.control_path)
            except OSError:
                pass
        self.control = self.control_path = None

    def answer_control(self) -> None:
        """Send the snapshot to each waiting client and close. Nothing is
        read from a client, and nothing here waits: a send that does not
        fit at once (the snapshot is a few KiB) is cut off."""
        for _ in range(CONTROL_ACCEPTS):
            try:
                conn, _ = self.control.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket: %s", exc)
                return
            with conn:
                try:
                    conn.setblocking(False)
                    conn.send(safejson.dumps(self.snapshot()) + b"\n")
                except OSError:
                    pass

    # ---- children ----

    def child_env(self, spec: ChildSpec | None = None) -> dict[str, str]:
        env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if spec is not None and spec.runs_as == FETCHER_USER:
            # The downloader honours the service's proxy and CA settings (and nothing else of ours).
            env.update({k: os.environ[k] for k in FETCHER_ENV if k in os.environ})
        return env

    def envelope(self, spec: ChildSpec) -> bytes:
        s = self.settings
        return ChildSettings(
            role=spec.name, config_text=s.text, config_path=s.path, verbose=self.verbose,
            thing_name=self.thing_name, layout=s.layout, ids=s.ids,
            tls=dict(s.files.tls) if TLS in spec.receives else {},
            public_keys_pem=s.files.public_keys if PUBLIC_KEYS in spec.receives else (),
        ).encode()

    def drop_to(self, spec: ChildSpec) -> tuple[str, int, int] | None:
        """(user, uid, gid) the child runs as, or None to keep ours."""
        ids = self.settings.ids
        if not ids.separated or spec.runs_as == ROOT:
            return None
        if spec.runs_as == BROKER_USER:
            return ids.broker_user, ids.broker_uid, ids.broker_gid
        return ids.fetcher_user, ids.fetcher_uid, ids.fetcher_gid

    def spawn(self, child: Child) -> None:
        spec = child.spec
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        argv = [child_interpreter(), "-m", spec.module, "--from-supervisor", "--status-fd", str(write_fd)]
        target = self.drop_to(spec)
        # extra_groups=[]: user= alone keeps root's supplementary groups.
        drop = {"user": target[1], "group": target[2], "extra_groups": []} if target else {}
        env = self.child_env(spec)
        stream = open_journal_stream(f"upparat-{spec.name}") if self._journal else None
        output = {}
        if stream is not None:
            st = os.fstat(stream.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            output = {"stdout": stream.fileno(), "stderr": stream.fileno()}
        now = self.clock()
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.PIPE, cwd="/", close_fds=True, pass_fds=(write_fd,),
                                     env=env, **output, **drop)
        except (PermissionError, FileNotFoundError) as exc:
            os.close(read_fd)
            who = f"user {target[0]}" if target else "this user"
            log.error("cannot start %s: %s. Fix: the interpreter %s (%s) and the upparat package must be "
                      "readable and executable by %s, also every directory above them (a Python "
                      "installed under /root, mode 0700, is not)",
                      spec.name, exc, argv[0], os.path.realpath(argv[0]), who)
            child.machine.spawned(now)
            child.machine.exited(now, codes.EXIT_UNSAFE)
            self.exit_code = codes.EXIT_FAILURE
            return
        except OSError as exc:  # e.g. EAGAIN from fork: may pass, so back off
            os.close(read_fd)
            log.error("cannot start %s: %s", spec.name, exc)
            child.machine.spawned(now)
            self._after_exit(child, child.machine.exited(now, None), None)
            return
        finally:
            os.close(write_fd)  # the child has its copy; EOF on ours means it is gone
            if stream is not None:
                stream.close()
        os.set_blocking(read_fd, False)
        child.close_status()
        child.popen = popen
        child.status_fd = read_fd
        child.status = None
        child.killed_hung = False
        child.machine.spawned(now)
        log.info("started %s (pid %d, %s%s)", spec.name, popen.pid, spec.module,
                 f", user {target[0]} uid {target[1]} gid {target[2]}" if target else f", uid {os.getuid()}")
        # One line of settings; with Sentry on, the broker reads error records after it.
        keep_open = PROBLEMS in spec.receives and bool(self.settings.cfg.service.sentry)
        if not self._write_envelope(child, self.envelope(spec) + b"\n", close=not keep_open):
            self._kill(child)
        elif keep_open:
            self._close_problems()
            self.problems_fd = os.dup(popen.stdin.fileno())
            os.set_inheritable(self.problems_fd, False)
            popen.stdin.close()

    def _write_envelope(self, child: Child, data: bytes, close: bool = True) -> bool:
        """Write the settings to the child's stdin (and close it), bounded in time."""
        stdin = child.popen.stdin
        fd = stdin.fileno()
        os.set_blocking(fd, False)
        deadline = self.clock() + ENVELOPE_TIMEOUT
        view = memoryview(data)
        try:
            while view:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    log.error("%s (pid %d) did not read its settings within %.0f s; killing it",
                              child.spec.name, child.pid, ENVELOPE_TIMEOUT)
                    return False
                select.select([], [fd], [], remaining)
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue
            return True
        except BrokenPipeError:
            log.error("%s (pid %d) exited before reading its settings", child.spec.name, child.pid)
            return True  # its exit status, reaped as usual, says why
        finally:
            if close:
                try:
                    stdin.close()
                except OSError:
                    pass

    def _kill(self, child: Child) -> None:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.popen is None:
                continue
            returncode = child.popen.poll()
            if returncode is None:
                continue
            pid = child.popen.pid
            if child.status_fd is not None:
                self.read_status(child)  # its last words: a problem record before it died
            child.close_status()
            child.popen = None
            child.status = None
            if PROBLEMS in child.spec.receives:
                self._close_problems()
            self._after_exit(child, child.machine.exited(now, returncode), returncode, pid)

    def _after_exit(self, child: Child, state: State, returncode: int | None, pid: int | None = None) -> None:
        name = child.spec.name
        how = describe_exit(returncode)
        if child.killed_hung:
            how += " after it stopped beating"
        pid_text = f" (pid {pid})" if pid else ""
        if state is State.STOPPED:
            log.info("%s%s stopped: %s", name, pid_text, how)
        elif state is State.FATAL:
            log.error("%s%s %s: a structural fault that restarting cannot fix (see its messages above); "
                      "stopping all children", name, pid_text, how)
            # A child that finds the configuration unusable is a configuration error: exit 2.
            self.exit_code = codes.EXIT_USAGE if returncode == codes.EXIT_USAGE else codes.EXIT_FAILURE
        elif state is State.BACKOFF:
            delay = child.machine.restart_at - self.clock()
            level = logging.WARNING if child.machine.delay < child.machine.policy.backoff_max else logging.ERROR
            log.log(level, "%s%s %s; restarting in %.1f s", name, pid_text, how, max(0.0, delay))

    def start_due(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.machine.tick(now) and self.exit_code is None:
                self.restore_directories()
                self.spawn(child)

    def restore_directories(self) -> None:
        """Before a restart: create again what was deleted while we ran (e.g. the
        download directory); a child that finds its directory missing exits, and
        without this it would be restarted into the same failure forever."""
        try:
            prepare_directories(self.settings.layout, self.settings.ids)
        except config_mod.ConfigError as exc:
            log.error("cannot restore the directories before a restart: %s", exc)

    def start_all(self) -> None:
        for child in self.children:
            child.machine.reset()
            if self.exit_code is None:
                self.spawn(child)

    def stop_all(self) -> None:
        """SIGTERM every child, wait up to stop_timeout s, SIGKILL the rest, reap all."""
        timeout = self.stop_timeout
        for child in reversed(self.children):
            child.machine.stop_requested()
            if child.popen is not None:
                log.info("stopping %s (pid %d)", child.spec.name, child.pid)
                try:
                    child.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self._close_problems()
        deadline = self.clock() + timeout
        while any(c.popen for c in self.children) and self.clock() < deadline:
            self.reap()
            if any(c.popen for c in self.children):
                self._wait(min(0.1, deadline - self.clock()))
        for child in self.children:
            if child.popen is not None:
                log.warning("%s (pid %d) did not stop within %.0f s; killing it",
                            child.spec.name, child.pid, timeout)
                self._kill(child)
                try:
                    child.popen.wait(KILL_WAIT)
                except subprocess.TimeoutExpired:  # e.g. stuck in uninterruptible I/O
                    log.error("%s (pid %d) survived SIGKILL for %.0f s; giving up on it",
                              child.spec.name, child.pid, KILL_WAIT)
                    child.popen = None
                    child.close_status()
                    child.machine.exited(self.clock(), None)
        self.reap()

    def reload(self) -> None:
        """Apply a requested reload, unless the installer is busy: a hook
        or staging is never interrupted; the reload waits for it."""
        if self.installer_busy():
            if not self._reload_deferred_logged:
                job = self.job_view() or {}
                log.info("reload deferred: the installer is busy (job %s, %s); applying it when it is done",
                         job.get("job_id"), job.get("phase"))
                self._reload_deferred_logged = True
            return
        self.reload_requested = False
        try:
            settings = load_settings(self.settings.path, self.thing_name)
        except config_mod.ConfigError as exc:
            log.error("configuration error, keeping the running configuration: %s", exc)
            return
        log.info("reloading: restarting the children with the new configuration")
        self.stop_all()
        self.settings = settings
        logging.getLogger().setLevel(logging.DEBUG if self.verbose else settings.cfg.service.log_level)
        self.open_control()
        self.ready = False  # READY again once all children beat; systemd needs no second READY=1
        self.start_all()

    def next_timeout(self) -> float:
        now = self.clock()
        deadlines = [d for c in self.children if (d := c.machine.next_deadline()) is not None]
        if self._watchdog:
            deadlines.append(self._watchdog_at)
        return min([MAX_POLL] + [d - now for d in deadlines])

    def run(self) -> int:
        """Start the children and supervise them until stopped; returns the exit code."""
        self.install_signals()
        problems = None
        if self.settings.cfg.service.sentry:
            problems = SentryForwarder(self)
            logging.getLogger().addHandler(problems)
        try:
            self.open_control()
            self.start_all()
            while self.exit_code is None:
                self.dispatch_signals()
                self.reap()  # also without SIGCHLD, as a safety net
                if self.exit_code is not None:
                    break
                if self.reload_requested:
                    self.reload()
                self.check_heartbeats()
                self.start_due()
                self.notify_systemd()
                self._wait(self.next_timeout())
        finally:
            sd_notify("STOPPING=1")
            self.stop_all()
            self.close_control()
            self.restore_signals()
            if problems:
                logging.getLogger().removeHandler(problems)
        fatal = [c.spec.name for c in self.children if c.machine.state is State.FATAL]
        if fatal:
            log.error("stopped because of a structural fault in: %s", ", ".join(fatal))
        else:
            log.info("stopped")
        return self.exit_code


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "could not be started"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    meaning = {
        codes.EXIT_OK: "EXIT_OK",
        codes.EXIT_FAILURE: "EXIT_FAILURE",
        codes.EXIT_USAGE: "EXIT_USAGE, bad command line or configuration",
        codes.EXIT_UNSAFE: "EXIT_UNSAFE, its privileges were not dropped",
    }.get(returncode)
    return f"exited with code {returncode}" + (f" ({meaning})" if meaning else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="upparat-supervisor",
        description="Secure update agent: starts and supervises the broker, fetcher and installer processes.")
    parser.add_argument("-c", "--config-file", required=True, metavar="CONFIG", help="INI configuration file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log level DEBUG")
    parser.add_argument("-t", "--thing-name", help="AWS IoT thing name (overrides [broker] thing_name)")
    parser.add_argument("--prepare-directories", action="store_true",
                        help="per-process systemd units (ExecStartPre=+): check the configuration, create "
                             "every directory as the standalone children expect it, and exit")
    return parser.parse_args(argv)



def child_interpreter() -> str:
    """Our interpreter, with the directories above it resolved.

    A virtualenv reached through a symlinked directory (``.venv`` ->
    ``/opt/...``) may sit below a directory the unprivileged user cannot
    enter; the resolved directory is reachable. The file itself stays
    unresolved, because a venv is recognised by the path of its ``python``.
    """
    directory, name = os.path.split(sys.executable)
    return os.path.join(os.path.realpath(directory), name)

def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on a bad command line, 0 for --help
        return exc.code if isinstance(exc.code, int) else codes.EXIT_USAGE
    launch.setup_logging("supervisor", logging.DEBUG if args.verbose else logging.INFO)
    os.umask(0o022)
    try:
        settings = load_settings(args.config_file, args.thing_name,
                                 STANDALONE_TMPDIR if args.prepare_directories else None)
        if args.prepare_directories:
            log.info("configuration checked; directories ready under %s", settings.layout.runtime_dir)
            return codes.EXIT_OK
    except config_mod.ConfigError as exc:
        print(f"upparat-supervisor[{os.getpid()}]: configuration error: {exc}", file=sys.stderr)
        return codes.EXIT_USAGE
    except Exception:  # noqa: BLE001 - anything else is exit 1, with the reason
        log.exception("cannot start")
        return codes.EXIT_FAILURE
    if not args.verbose:
        logging.getLogger().setLevel(settings.cfg.service.log_level)
    ids = settings.ids
    if ids.separated:
        log.info("children run as root (installer), %s uid %d gid %d (broker) and %s uid %d gid %d (fetcher)",
                 ids.broker_user, ids.broker_uid, ids.broker_gid, ids.fetcher_user, ids.fetcher_uid, ids.fetcher_gid)
    else:
        log.warning("privilege separation is OFF: not started as root, so every child runs as %s "
                    "(uid %d). Start upparat-supervisor as root to run the broker and fetcher "
                    "unprivileged and the installer as root.", ids.broker_user, ids.broker_uid)
    try:
        return Supervisor(settings, args.verbose, args.thing_name).run()
    except Exception:  # noqa: BLE001
        log.exception("supervisor failed")
        return codes.EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
