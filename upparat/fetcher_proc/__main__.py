"""``python -m upparat.fetcher_proc (-c CONFIG | --from-supervisor) [-v]``:
the socket loop. The contract is in the package docstring."""

from __future__ import annotations

import logging
import os
import sys

import zmq

from upparat import codes, launch, verify
from upparat.ipc import fetcher_protocol, wire

from .fetcher import Fetcher

log = logging.getLogger("upparat.fetcher_proc")

POLL_MS = 200  # how quickly SIGTERM is noticed


def own_dir(path, mode: int) -> str | None:
    """Create ``path`` if missing (the supervisor normally has; its parent must
    exist). Returns why it must not be used, or None: a directory that another
    user owns or may write to (a pre-created /tmp/upparat) is refused."""
    try:
        if not path.is_dir():
            path.mkdir(mode=mode, parents=False)
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}; create it owned by uid {os.getuid()}"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this process (uid {os.getuid()}); chown it"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users; chmod go-w it"
    return None


def main() -> int:
    ctx = launch.start_child("fetcher", unprivileged=True)
    cfg = ctx.config
    try:
        keys = [verify.load_public_key(pem.encode("utf-8")) for pem in ctx.public_keys_pem]
    except verify.UnusableKey as exc:
        log.error("[verification] public_keys: %s; fix: list Ed25519 or ECDSA P-256 PEM files", exc)
        return codes.EXIT_USAGE
    socket_dir = cfg.supervisor.runtime_dir / "fetcher"
    for path, mode in ((socket_dir, 0o700), (cfg.service.download_dir, 0o750)):
        problem = own_dir(path, mode)
        if problem:
            log.error("%s", problem)
            return codes.EXIT_FAILURE

    fetcher = Fetcher(cfg.service.download_dir, keys, cfg.verification)
    zctx = zmq.Context()
    sock = wire.make_socket(zctx, zmq.REP)
    try:
        endpoint = launch.fetcher_endpoint(cfg)
        sock.bind(endpoint)
        log.info("listening on %s; downloads go to %s", endpoint, cfg.service.download_dir)
        while not ctx.stop.is_set():
            if sock.poll(POLL_MS, zmq.POLLIN):
                wire.serve_one(sock, fetcher_protocol.REQUESTS, fetcher.handle, "fetcher")
    except zmq.ZMQError as exc:
        log.error("socket error: %s", exc)
        return codes.EXIT_FAILURE
    finally:
        fetcher.shutdown()
        sock.close(linger=0)
        zctx.term()
    log.info("stopped")
    return codes.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
