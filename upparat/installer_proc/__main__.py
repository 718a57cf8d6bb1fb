"""``python -m upparat.installer_proc``: start-up checks and the main loop."""

from __future__ import annotations

import functools
import logging
import os
import sys

import zmq

from upparat import codes, launch, signature, trust, verify
from upparat.wakeup import Wakeup
from upparat.ipc import installer_protocol, wire
from upparat.ipc.settings import Identities, Layout
from upparat.release import HOOK_NAMES

from . import allow, staging
from .dirs import SetupError, ensure_dir
from .installer import Installer, Settings

log = logging.getLogger("upparat.installer_proc")

POLL_MS = 100  # the loop looks at the stop flag, the memory guard and the heartbeat at least this often:
# a peer streaming an endless multi-frame message at ~1 GB/s gets ~100 MiB past the guard per period


class StartError(Exception):
    """The installer cannot start; ``code`` is its exit code, the text names the fix."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def load_keys(pems: tuple[str, ...]) -> signature.LazyKeys:
    """The installer's own keys, checked now, loaded at the first verification.

    An unusable key must stop the installer at start (exit 2), but loading
    keys imports ``cryptography`` (several MiB that an idle device would
    carry for nothing): a short-lived child process loads them and reports,
    and this process imports ``cryptography`` when the first job is opened.
    """
    keys = signature.LazyKeys(pems)
    if not pems:
        return keys
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: check, report, exit without running any of the parent's cleanup
        os.close(read_fd)
        code = 0
        try:
            signature.load_public_keys(list(pems))
        except signature.UnusableKey as exc:
            os.write(write_fd, str(exc).encode("utf-8", "replace")[:2000])
            code = codes.EXIT_USAGE
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, repr(exc).encode("utf-8", "replace")[:2000])
            code = codes.EXIT_FAILURE
        os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    os.close(read_fd)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    message = b"".join(chunks).decode("utf-8", "replace")
    if code == codes.EXIT_USAGE:
        raise StartError(codes.EXIT_USAGE, f"[verification] public_keys: {message}. Fix: give Ed25519 or ECDSA "
                         "P-256 public keys (PEM) or certificates")
    if code != 0:
        raise StartError(codes.EXIT_FAILURE, f"cannot check [verification] public_keys: {message or code}")
    return keys


def check_hooks(hooks, as_root: bool) -> None:
    """Every configured hook must be something only root can change (checked
    again before every run)."""
    for name in HOOK_NAMES:
        path = hooks.command(name)
        if path is None:
            continue
        problem = trust.executable_problem(path, as_root=as_root)
        if problem:
            raise StartError(codes.EXIT_USAGE, f"[hooks] {name}: {problem}. Fix: make {path} an executable file "
                             "that only root can change (the file and every directory and symlink on its path "
                             "owned by root and not writable by others), or remove the key")


def check_config_file(path: str) -> None:
    """Standalone (one systemd unit per process): the supervisor's own check."""
    problem = trust.root_controlled(os.path.abspath(path))
    if problem:
        raise StartError(codes.EXIT_USAGE, f"{problem}, and {path} names the commands root runs. Fix: make "
                         f"{path} and every directory above it owned by root and not writable by others "
                         f"(chown root:root {path}; chmod go-w {path})")


def prepare_own_directories(layout: Layout, ids: Identities) -> None:
    """Standalone: what the supervisor would have created for the installer."""
    socket_gid = ids.broker_gid if ids.separated else None
    os.close(ensure_dir(layout.runtime_dir, 0o755))
    os.close(ensure_dir(layout.installer_socket.parent, 0o750, socket_gid))


def socket_opener(ids: Identities):
    def on_bound(path: str) -> None:
        """Only the broker's group may connect (the directory lets only it in, too)."""
        if ids.separated:
            os.chown(path, 0, ids.broker_gid, follow_symlinks=False)
            os.chmod(path, 0o660)
    return on_bound


def build(ctx: launch.ChildContext, wake) -> tuple[Installer, int]:
    """Everything before the first request; raises StartError."""
    cfg = ctx.config
    as_root = os.geteuid() == 0
    if ctx.standalone and as_root and ctx.config_path != "-":
        # "-c -": systemd opened the root-only file as root and handed it over on stdin.
        check_config_file(ctx.config_path)
    keys = load_keys(ctx.public_keys_pem)
    check_hooks(cfg.hooks, as_root)
    try:
        if ctx.standalone:
            prepare_own_directories(ctx.layout, ctx.ids)
        staging_dirfd = ensure_dir(ctx.layout.staging_dir, 0o700)
    except (SetupError, OSError) as exc:
        raise StartError(codes.EXIT_USAGE, f"[service] staging_location / [supervisor] runtime_dir: {exc}") \
            from None
    settings = Settings(
        hooks=cfg.hooks, staging_dir=ctx.layout.staging_dir, download_dir=ctx.layout.download_dir,
        fetcher_uid=ctx.ids.fetcher_uid if ctx.ids.separated else None, keys=keys,
        policy=verify.Policy(allow_unsigned=cfg.verification.allow_unsigned,
                             require_sha256=cfg.verification.require_sha256),
        max_file_size=cfg.service.max_file_size, as_root=as_root)
    installer = Installer(settings, staging_dirfd, wake)
    try:
        installer.recover()
    except OSError as exc:  # e.g. a read-only or full staging file system
        raise StartError(codes.EXIT_FAILURE, f"cannot record the installer's state in {ctx.layout.staging_dir}: "
                         f"{exc}") from None
    return installer, staging_dirfd


def serve(ctx: launch.ChildContext, installer: Installer, server: wire.Server, waker: Wakeup) -> None:
    """The main loop: requests, thread outcomes, memory guard, heartbeat."""
    installer.push = lambda message: server.push(server.last_peer, message)
    while not ctx.stop.is_set():
        sock = server.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(waker.read_fd, zmq.POLLIN)
        events = dict(poller.poll(POLL_MS))
        if waker.read_fd in events:
            waker.drain()
        installer.apply_events()
        if sock in events:
            server.serve_ready()
        else:
            # libzmq buffers a multi-frame message until its last frame: an
            # endless one never makes the socket readable, so look anyway.
            server.guard_memory()
        ctx.heartbeat.beat(**installer.status())


def main() -> int:
    ctx = launch.start_child("installer", unprivileged=False)
    staging.ignore_lease_breaks()  # before any lease: a lease break must not kill root
    waker = Wakeup()
    waker.catch_signals()  # SIGTERM wakes the loop at once
    try:
        installer, staging_dirfd = build(ctx, waker)
    except StartError as exc:
        log.error("cannot start: %s", exc)
        return exc.code
    context = zmq.Context()
    server = wire.Server(context, ctx.layout.installer_socket, installer_protocol.REQUESTS,
                         functools.partial(allow.dispatch, installer), "installer",
                         on_bound=socket_opener(ctx.ids))
    try:
        server.bind()
        log.info("listening on %s; staging in %s", server.endpoint, ctx.layout.staging_dir)
        serve(ctx, installer, server, waker)
    finally:
        installer.stop()
        server.close()
        context.term()
        os.close(staging_dirfd)
    log.info("stopped")
    return codes.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
