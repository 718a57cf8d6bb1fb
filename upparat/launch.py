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
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from upparat import codes, config as config_mod

PR_SET_NO_NEW_PRIVS = 38
MAX_ENVELOPE = 4 * 1024 * 1024


@dataclass
class ChildContext:
    name: str
    config: config_mod.Config
    verbose: bool
    files: dict[str, str] = field(default_factory=dict)  # cafile/certfile/keyfile PEM text
    public_keys_pem: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def fetcher_endpoint(cfg: config_mod.Config) -> str:
    return f"ipc://{cfg.supervisor.runtime_dir / 'fetcher' / 'fetcher.sock'}"


def installer_endpoint(cfg: config_mod.Config) -> str:
    return f"ipc://{cfg.supervisor.runtime_dir / 'installer' / 'installer.sock'}"


def set_no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


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


def encode_envelope(cfg_text: str, config_path: str, tmpdir: str, verbose: bool, thing_name: str | None,
                    files: dict[str, str], public_keys_pem: list[str]) -> bytes:
    return json.dumps({
        "config_text": cfg_text,
        "config_path": config_path,
        "tmpdir": tmpdir,
        "verbose": verbose,
        "thing_name": thing_name,
        "files": files,
        "public_keys_pem": public_keys_pem,
    }).encode("utf-8")


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


def start_child(name: str, unprivileged: bool, argv: list[str] | None = None) -> ChildContext:
    """Everything a child does before its own work; exits on any problem."""
    if unprivileged:
        try:
            set_no_new_privs()
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

    files: dict[str, str] = {}
    public_keys_pem: list[str] = []
    try:
        if args.from_supervisor:
            raw = sys.stdin.buffer.read(MAX_ENVELOPE)
            env = json.loads(raw)
            cfg = config_mod.parse(env["config_text"], env["config_path"], check_files=False, tmpdir=env["tmpdir"])
            verbose = bool(env["verbose"])
            thing_name = env["thing_name"]
            files = dict(env["files"])
            public_keys_pem = list(env["public_keys_pem"])
        elif args.config_file:
            cfg, _ = config_mod.load(args.config_file)
            verbose, thing_name = args.verbose, args.thing_name
            files = {k: Path(p).read_text() for k in ("cafile", "certfile", "keyfile")
                     if (p := getattr(cfg.broker, k))}
            public_keys_pem = [p.read_text() for p in cfg.verification.public_keys]
        else:
            parser.error("give -c CONFIG or --from-supervisor")
        if thing_name:
            cfg = cfg.replace_thing_name(thing_name)
    except config_mod.ConfigError as exc:
        print(f"upparat-{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_USAGE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"upparat-{name}: cannot read settings: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_USAGE)

    setup_logging(name, logging.DEBUG if verbose else cfg.service.log_level)
    init_sentry(cfg, name)
    ctx = ChildContext(name=name, config=cfg, verbose=verbose, files=files, public_keys_pem=public_keys_pem)

    def _stop(signum, _frame):  # only sets a flag; the main loop acts
        ctx.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logging.getLogger(__name__).info(
        "started as uid %d gid %d%s", os.getuid(), os.getgid(), " (unprivileged)" if unprivileged else "")
    return ctx
