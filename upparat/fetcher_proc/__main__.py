"""``python -m upparat.fetcher_proc (--from-supervisor | -c CONFIG) [-v]``:
start-up checks and the socket loop. The contract is in the package docstring."""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from pathlib import Path

import zmq

from upparat import codes, launch, verify
from upparat.wakeup import Wakeup
from upparat.ipc import fetcher_protocol as fp, wire

from .download import Limits
from .fetcher import Fetcher

log = logging.getLogger("upparat.fetcher_proc")

HEARTBEAT_S = 1.0  # the loop wakes at least this often, to beat and to push progress


def dir_problem(path: Path) -> str | None:
    """Why this process must not use a directory the supervisor prepared, or None."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path} is missing ({exc.strerror}); upparat-supervisor creates it before starting the fetcher"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this process (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def open_to_broker_group(path: str) -> None:
    """The socket directory is setgid with the broker's group: 0660 lets
    exactly that group connect (bind made it 0600)."""
    os.chmod(path, 0o660)




def main() -> int:
    ctx = launch.start_child("fetcher", unprivileged=True)
    # urllib3's DEBUG lines carry whole URLs, and a presigned URL's query is a credential.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger().level))
    layout = ctx.layout
    for path in (layout.fetcher_socket.parent, layout.download_dir, layout.fetcher_state_dir):
        problem = dir_problem(path)
        if problem:
            log.error("cannot start: %s", problem)
            return codes.EXIT_FAILURE

    cfg = ctx.config
    wakeup = Wakeup()
    policy = verify.Policy(allow_unsigned=cfg.verification.allow_unsigned,
                           require_sha256=cfg.verification.require_sha256)
    limits = Limits.from_config(cfg.service)
    if 0 < limits.rate_limit < limits.low_speed_limit:
        log.warning("[service] download_rate_limit (%d bytes/s) is below low_speed_limit (%d bytes/s): every "
                    "download will be taken for stalled; lower low_speed_limit", limits.rate_limit,
                    limits.low_speed_limit)
    fetcher = Fetcher(layout.download_dir, layout.fetcher_state_dir, policy, limits, notify=wakeup,
                      staging_dir=layout.staging_dir)
    zctx = zmq.Context()
    server = wire.Server(zctx, layout.fetcher_socket, fp.REQUESTS, fetcher.handle, "fetcher",
                         on_bound=open_to_broker_group)
    wakeup.catch_signals()  # SIGTERM ends the poll at once
    try:
        server.bind()
        log.info("listening on %s; downloads go to %s", server.endpoint, layout.download_dir)
        serve(ctx, server, fetcher, wakeup)
    except zmq.ZMQError as exc:
        log.error("socket error: %s", exc)
        return codes.EXIT_FAILURE
    finally:
        fetcher.shutdown()
        server.close()
        zctx.term()
        wakeup.close()
    log.info("stopped")
    return codes.EXIT_OK


def serve(ctx: launch.ChildContext, server: wire.Server, fetcher: Fetcher, wakeup: Wakeup) -> None:
    poller = zmq.Poller()
    poller.register(wakeup.read_fd, zmq.POLLIN)
    sock = server.sock
    poller.register(sock, zmq.POLLIN)
    while not ctx.stop.is_set():
        events = dict(poller.poll(HEARTBEAT_S * 1000))
        if wakeup.read_fd in events:
            wakeup.drain()
        if sock in events:
            server.serve_ready()
        # Every iteration: a never-finished multi-frame message never makes the socket readable.
        server.guard_memory()
        if server.sock is not sock:  # the memory guard re-bound the socket
            poller.unregister(sock)
            sock = server.sock
            poller.register(sock, zmq.POLLIN)
        for peer, message in fetcher.outgoing(time.monotonic()):
            server.push(peer if peer is not None else server.last_peer, message)
        beat(ctx, fetcher)


def beat(ctx: launch.ChildContext, fetcher: Fetcher) -> None:
    running = fetcher.running
    if running is None:
        ctx.heartbeat.beat()
        return
    status = running.status(0)
    ctx.heartbeat.beat(job_id=status.job_id, execution=status.execution, bytes_done=status.bytes_done,
                       bytes_total=status.bytes_total, rate=status.rate)


if __name__ == "__main__":
    sys.exit(main())
