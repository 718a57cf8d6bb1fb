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
import ctypes
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from upparat import codes, config as config_mod
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


class Heartbeat:
    """Tells the supervisor that this child's main loop is alive, with a short
    status (``upparat.ipc.status``). Every child calls ``beat()`` from its
    main loop, at least every few seconds; a child whose beats stop is
    killed and restarted by the supervisor. Rate-limited here, so calling it
    on every loop iteration is cheap. Without a supervisor it does nothing.
    """

    def __init__(self, fd: int | None = None):
        self._fd = fd

    def beat(self, **status) -> None:
        """``status``: e.g. busy=True (a hook or staging runs), job_id, phase,
        bytes_done, bytes_total, rate. Only plain str/int/bool/None values."""


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


def _prctl(option: int, value: int, what: str) -> None:
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


def setup_logging(name: str, level: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format=f"%(asctime)s upparat-{name}[%(process)d] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def init_sentry(cfg: config_mod.Config, name: str) -> None:
    if not cfg.service.sentry:
        return
    try:
        import sentry_sdk
    except ImportError:
        logging.getLogger(__name__).warning("[service] sentry is set but sentry-sdk is not installed")
        return
    sentry_sdk.init(cfg.service.sentry, server_name=f"upparat-{name}")


def standalone_settings(name: str, config_path: str, verbose: bool, thing_name: str | None) -> ChildSettings:
    """What the supervisor would have sent, computed the same way (per-process
    systemd units): the same functions, fixed inputs, never this process's
    uid or environment for a path."""
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
        tls = {k: Path(p).read_text() for k in ("cafile", "certfile", "keyfile") if (p := getattr(cfg.broker, k))}
    if name in ("fetcher", "installer"):
        keys = tuple(p.read_text() for p in cfg.verification.public_keys)
    return ChildSettings(role=name, config_text=text, config_path=config_path, verbose=verbose,
                         thing_name=thing_name, layout=layout, ids=ids, tls=tls, public_keys_pem=keys)


def start_child(name: str, unprivileged: bool, argv: list[str] | None = None) -> ChildContext:
    """Everything a child does before its own work; exits on any problem."""
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
    args = parser.parse_args(argv)

    try:
        if args.from_supervisor:
            settings = ChildSettings.decode(sys.stdin.buffer.read(MAX_ENVELOPE + 1))
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

    setup_logging(name, logging.DEBUG if settings.verbose else cfg.service.log_level)
    if unprivileged:
        init_sentry(cfg, name)
    ctx = ChildContext(name=name, config=cfg, layout=settings.layout, ids=settings.ids, verbose=settings.verbose,
                       tls=dict(settings.tls), public_keys_pem=tuple(settings.public_keys_pem),
                       standalone=not args.from_supervisor, config_path=settings.config_path)

    def _stop(signum, _frame):  # only sets a flag; the main loop acts
        ctx.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logging.getLogger(__name__).info(
        "started as uid %d gid %d%s", os.getuid(), os.getgid(), " (unprivileged)" if unprivileged else "")
    return ctx
