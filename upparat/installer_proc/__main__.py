"""``python -m upparat.installer_proc``: start-up and the REP loop."""

from __future__ import annotations

import grp
import logging
import os
import sys
from pathlib import Path

import zmq

from upparat import codes, launch, verify
from upparat.config import Config
from upparat.ipc import installer_protocol, wire

from .allow import Installer
from .dirs import SetupError, check_ancestors, ensure_dir
from .staging import StagingArea

log = logging.getLogger("upparat.installer_proc")

POLL_MS = 200  # how often the loop looks at the stop flag


def socket_group(cfg: Config) -> int | None:
    """The gid that may connect (the unprivileged broker's group); None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(cfg.supervisor.group).gr_gid
    except KeyError:
        log.warning("group %r ([supervisor] group) does not exist: only root can reach the installer socket",
                    cfg.supervisor.group)
        return 0


def prepare_socket_dir(cfg: Config, gid: int | None) -> Path:
    runtime = cfg.supervisor.runtime_dir
    if not runtime.exists():  # started on its own; the supervisor normally creates it
        check_ancestors(runtime)
        runtime.mkdir(mode=0o755, parents=True, exist_ok=True)
        runtime.chmod(0o755)
    directory = runtime / "installer"
    # 0750 as the supervisor makes it; without a group (not root) the socket itself stays 0600.
    os.close(ensure_dir(directory, 0o750, gid))
    return directory


def open_socket_file(path: Path, gid: int | None) -> None:
    """bind() made it under umask 077; let the broker's group connect."""
    if gid is None:
        return
    os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, 0o660)


def load_keys(ctx: launch.ChildContext) -> list:
    return [verify.load_public_key(pem.encode("utf-8")) for pem in ctx.public_keys_pem]


def main() -> int:
    ctx = launch.start_child("installer", unprivileged=False)
    cfg = ctx.config
    try:
        keys = load_keys(ctx)
    except verify.UnusableKey as exc:
        log.error("[verification] public_keys: %s", exc)
        return codes.EXIT_USAGE
    try:
        gid = socket_group(cfg)
        socket_dir = prepare_socket_dir(cfg, gid)
        staging = StagingArea(cfg, keys)
    except (SetupError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return codes.EXIT_FAILURE

    installer = Installer(cfg.hooks, staging)
    endpoint = launch.installer_endpoint(cfg)
    socket_path = socket_dir / "installer.sock"
    context = zmq.Context()
    sock = wire.make_socket(context, zmq.REP)
    try:
        try:
            socket_path.unlink()  # a stale socket of an earlier run; the directory is ours
        except FileNotFoundError:
            pass
        os.umask(0o077)  # the socket file is born 0600; open_socket_file widens it to the group
        sock.bind(endpoint)
        open_socket_file(socket_path, gid)
        log.info("listening on %s; staging in %s", endpoint, staging.path)
        while not ctx.stop.is_set():
            if sock.poll(POLL_MS, zmq.POLLIN):
                wire.serve_one(sock, installer_protocol.REQUESTS, installer.dispatch, "installer")
    finally:
        installer.stop()
        sock.close(linger=0)
        context.term()
        staging.close()
        try:
            socket_path.unlink()
        except OSError:
            pass
    log.info("stopped")
    return codes.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
