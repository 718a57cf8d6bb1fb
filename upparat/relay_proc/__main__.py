"""python -m upparat.relay_proc --from-supervisor --status-fd N (see __init__)."""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
import time

from upparat import codes, launch
from upparat.ipc import status

log = logging.getLogger("upparat.relay")
MAX_PER_MINUTE = 60  # a crash loop must not flood the Sentry project


def _start(argv: list[str] | None) -> tuple[status.RelayHello, bytes, launch.Heartbeat, threading.Event]:
    try:
        launch.set_parent_death_signal()
        launch.set_no_new_privs()
        launch.set_not_dumpable()
    except OSError as exc:
        print(f"upparat-relay: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_UNSAFE)
    problem = launch.privilege_problem()
    if problem:
        print(f"upparat-relay: refusing to run: this process {problem}", file=sys.stderr)
        sys.exit(codes.EXIT_UNSAFE)
    parser = argparse.ArgumentParser(prog="python -m upparat.relay_proc")
    parser.add_argument("--from-supervisor", action="store_true", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        line, rest = _read_line(sys.stdin.fileno(), timeout=10.0)
        hello = status.RelayHello.decode(line)
    except status.StatusError as exc:
        print(f"upparat-relay: cannot read settings: {exc}", file=sys.stderr)
        sys.exit(codes.EXIT_USAGE)
    stop = threading.Event()
    heartbeat = launch.Heartbeat(args.status_fd, on_orphaned=stop.set)
    heartbeat.beat()
    if heartbeat.orphaned:
        sys.exit(codes.EXIT_FAILURE)
    launch.setup_logging("relay", logging.DEBUG if hello.verbose else logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return hello, rest, heartbeat, stop


def _read_line(fd: int, timeout: float) -> tuple[bytes, bytes]:
    """The first line, and what came after it."""
    data = b""
    while b"\n" not in data and len(data) < status.MAX_LINE:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            break
        chunk = os.read(fd, status.MAX_LINE)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


def main(argv: list[str] | None = None) -> int:
    hello, rest, heartbeat, stop = _start(argv)
    import sentry_sdk  # only here: this process exists because sentry is configured

    sentry_sdk.init(hello.dsn, server_name="upparat-relay", default_integrations=False,
                    auto_enabling_integrations=False)
    sentry_sdk.set_tag("thing_name", hello.thing_name)
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    lines = status.LineBuffer()
    sent: list[float] = []
    log.info("reporting errors of the root processes to Sentry")
    data = rest
    while not stop.is_set():
        heartbeat.beat(phase="idle")
        if not data:
            try:
                ready, _, _ = select.select([fd], [], [], status.BEAT_EVERY)
            except InterruptedError:
                continue
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                break  # the supervisor closed our stdin: it stops
        items, data = lines.feed(data), b""
        for item in items:
            try:
                if isinstance(item, status.StatusError):
                    raise item
                problem = status.decode(item)
            except status.StatusError as exc:
                log.warning("refused a line from the supervisor: %s", exc)
                continue
            if not isinstance(problem, status.Problem):
                continue
            now = time.monotonic()
            sent = [t for t in sent if now - t < 60]
            if len(sent) >= MAX_PER_MINUTE:
                continue
            sent.append(now)
            _capture(sentry_sdk, problem, hello)
    sentry_sdk.flush(timeout=5)
    return codes.EXIT_OK


def _capture(sentry_sdk, problem: status.Problem, hello: status.RelayHello) -> None:
    event = {
        "level": "fatal" if problem.level == "CRITICAL" else "error",
        "logger": problem.logger,
        "message": problem.message,
        "tags": {"role": problem.role or "unknown", "thing_name": hello.thing_name},
        "server_name": f"upparat-{problem.role or 'unknown'}",
    }
    if problem.traceback:
        event["extra"] = {"traceback": problem.traceback}
    sentry_sdk.capture_event(event)


if __name__ == "__main__":
    sys.exit(main())
