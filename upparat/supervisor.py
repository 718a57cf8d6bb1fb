"""upparat-supervisor: starts, watches and restarts the three children.

Contract. Runs as root and parses no network input: only its command line
and its configuration file, which must be root's own when privileges are
separated (the installer runs the hooks that file names). It creates the
runtime, download and staging directories with the owners below, reads the
few root-only files the children need, and starts each child as a fresh
interpreter by module name (``python -m upparat.<name>_proc
--from-supervisor``, see launch.py), the unprivileged ones with uid and gid
of ``[supervisor] user``/``group`` and no supplementary groups. Setting the
uids from root clears every capability; the child then sets no_new_privs and
refuses to run (EXIT_UNSAFE) if anything is left. A child that crashes is
restarted with exponential backoff (supervision.py); a child that exits with
EXIT_USAGE or EXIT_UNSAFE is a structural fault that no restart can fix, so
the supervisor stops everything and exits 1 naming it.

Started as another user (development), everything runs as that user and
the supervisor says loudly that privilege separation is off.

Signals: SIGTERM/SIGINT stop (each child gets SIGTERM, then SIGKILL after
STOP_TIMEOUT s; exit 0), SIGHUP re-reads the configuration and restarts the
children, SIGCHLD reaps. Handlers only enqueue; the main loop acts.
"""

from __future__ import annotations

import argparse
import collections
import grp
import logging
import os
import pwd
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from upparat import codes, config as config_mod, launch, trust
from upparat.ipc.settings import ChildSettings, Identities, Layout, resolve_identities, resolve_layout
from upparat.supervision import ChildMachine, Policy, State

log = logging.getLogger("upparat.supervisor")

ROOT = "root"
BROKER_USER = "broker user"  # [supervisor] user
FETCHER_USER = "fetcher user"  # [supervisor] fetcher_user
TLS = "tls"  # [broker] cafile, certfile, keyfile as PEM text
PUBLIC_KEYS = "public_keys"  # [verification] public_keys as PEM text


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
    ChildSpec("fetcher", "upparat.fetcher_proc", FETCHER_USER, (PUBLIC_KEYS,)),
    ChildSpec("broker", "upparat.broker_proc", BROKER_USER, (TLS,)),
)

POLICY = Policy(running_after=5.0, backoff_initial=0.5, backoff_factor=2.0, backoff_max=30.0)
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed child to be reaped
ENVELOPE_TIMEOUT = 10.0  # a child that does not read its settings by then is killed
MAX_POLL = 1.0  # the main loop also looks at its children at least this often
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- identity, files, directories (run once per (re)load, before any child) --


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


# -- systemd readiness -----------------------------------------------------------


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


def load_settings(path: str, thing_name: str | None) -> Settings:
    """Read and check everything; raises ConfigError. Creates the directories."""
    cfg, text = config_mod.load(path)
    if thing_name:
        cfg = cfg.replace_thing_name(thing_name)
    ids = current_identities(cfg)
    if ids.separated:
        check_config_owner(path)
    layout = resolve_layout(cfg, tempfile.gettempdir())  # the one place the temp dir is looked up
    files = read_root_files(cfg)
    prepare_directories(layout, ids)
    return Settings(cfg, text, path, layout, ids, files)


class Child:
    """One supervised child: its spec, its state machine, its process."""

    def __init__(self, spec: ChildSpec, policy: Policy):
        self.spec = spec
        self.machine = ChildMachine(spec.name, policy)
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)  # handled in this order

    def __init__(self, settings: Settings, verbose: bool, thing_name: str | None,
                 policy: Policy = POLICY, specs: tuple[ChildSpec, ...] = CHILDREN,
                 stop_timeout: float = STOP_TIMEOUT, clock=time.monotonic):
        self.settings = settings
        self.verbose = verbose
        self.thing_name = thing_name
        self.clock = clock
        self.stop_timeout = stop_timeout
        self.children = [Child(spec, policy) for spec in specs]
        self.exit_code: int | None = None
        self.reload_requested = False
        self._pending: collections.deque[int] = collections.deque()
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, object] = {}

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
        log.info("SIGHUP: re-reading %s and restarting the children", self.settings.path)
        self.reload_requested = True

    def handle_sigchld(self) -> None:
        self.reap()

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` s passed.

        A signal that came after the last dispatch has left a byte in the
        wakeup pipe, so select returns at once: no signal is slept through.
        """
        select.select([self._wake_r], [], [], max(0.0, timeout))
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # ---- children ----

    def child_env(self) -> dict[str, str]:
        env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
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
        argv = [child_interpreter(), "-m", spec.module, "--from-supervisor"]
        target = self.drop_to(spec)
        # extra_groups=[]: user= alone keeps root's supplementary groups.
        drop = {"user": target[1], "group": target[2], "extra_groups": []} if target else {}
        now = self.clock()
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.PIPE, cwd="/", close_fds=True,
                                     env=self.child_env(), **drop)
        except (PermissionError, FileNotFoundError) as exc:
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
            log.error("cannot start %s: %s", spec.name, exc)
            child.machine.spawned(now)
            self._after_exit(child, child.machine.exited(now, None), None)
            return
        child.popen = popen
        child.machine.spawned(now)
        log.info("started %s (pid %d, %s%s)", spec.name, popen.pid, spec.module,
                 f", user {target[0]} uid {target[1]} gid {target[2]}" if target else f", uid {os.getuid()}")
        if not self._write_envelope(child, self.envelope(spec)):
            self._kill(child)

    def _write_envelope(self, child: Child, data: bytes) -> bool:
        """Write the settings to the child's stdin and close it, bounded in time."""
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
            child.popen = None
            self._after_exit(child, child.machine.exited(now, returncode), returncode, pid)

    def _after_exit(self, child: Child, state: State, returncode: int | None, pid: int | None = None) -> None:
        name = child.spec.name
        how = describe_exit(returncode)
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
                self.spawn(child)

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
                    child.machine.exited(self.clock(), None)
        self.reap()

    def reload(self) -> None:
        self.reload_requested = False
        try:
            settings = load_settings(self.settings.path, self.thing_name)
        except config_mod.ConfigError as exc:
            log.error("configuration error, keeping the running configuration: %s", exc)
            return
        self.stop_all()
        self.settings = settings
        logging.getLogger().setLevel(logging.DEBUG if self.verbose else settings.cfg.service.log_level)
        self.start_all()

    def next_timeout(self) -> float:
        now = self.clock()
        deadlines = [d for c in self.children if (d := c.machine.next_deadline()) is not None]
        return min([MAX_POLL] + [d - now for d in deadlines])

    def run(self) -> int:
        """Start the children and supervise them until stopped; returns the exit code."""
        self.install_signals()
        try:
            self.start_all()
            if self.exit_code is None:
                sd_notify("READY=1\nSTATUS=supervising " + ", ".join(c.spec.name for c in self.children))
            while self.exit_code is None:
                self.dispatch_signals()
                self.reap()  # also without SIGCHLD, as a safety net
                if self.exit_code is not None:
                    break
                if self.reload_requested:
                    self.reload()
                self.start_due()
                self._wait(self.next_timeout())
        finally:
            sd_notify("STOPPING=1")
            self.stop_all()
            self.restore_signals()
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
        settings = load_settings(args.config_file, args.thing_name)
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
