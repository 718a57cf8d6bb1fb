"""Error records of the root processes, sent to Sentry by the broker.

With ``[service] sentry`` set, the supervisor writes the installer's and its
own error records (``upparat.ipc.status.Problem`` lines, ``role`` set) to
the broker's stdin. The broker is unprivileged and on the network anyway, so
no root process ever loads sentry-sdk or any network code. Lines are
decoded with the status codec's limits; at most MAX_PER_MINUTE events are
sent, so a crash loop cannot flood the Sentry project.
"""

from __future__ import annotations

import logging
import os
import time

from upparat.ipc import status

log = logging.getLogger("upparat.broker.problems")
MAX_PER_MINUTE = 60


class ProblemRelay:
    def __init__(self, fd: int, thing_name: str, rest: bytes = b"", clock=time.monotonic):
        self.fd = fd
        self._thing = thing_name
        self._lines = status.LineBuffer()
        self._sent: list[float] = []
        self._clock = clock
        self.open = True
        if rest:
            self._handle(rest)

    def read_ready(self) -> None:
        """Read what the supervisor wrote; EOF means it closed the stream."""
        while self.open:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("cannot read error records from the supervisor: %s", exc)
                self.open = False
                return
            if not data:
                self.open = False
                return
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        for item in self._lines.feed(data):
            try:
                if isinstance(item, status.StatusError):
                    raise item
                problem = status.decode(item)
            except status.StatusError as exc:
                log.warning("refused an error record from the supervisor: %s", exc)
                continue
            if isinstance(problem, status.Problem):
                self._capture(problem)

    def _capture(self, problem: status.Problem) -> None:
        now = self._clock()
        self._sent = [t for t in self._sent if now - t < 60]
        if len(self._sent) >= MAX_PER_MINUTE:
            return
        self._sent.append(now)
        try:
            import sentry_sdk  # already imported by launch.init_sentry: sentry is configured
        except ImportError:
            return
        role = problem.role or "unknown"
        event = {
            "level": "fatal" if problem.level == "CRITICAL" else "error",
            "logger": problem.logger,
            "message": problem.message,
            "tags": {"role": role, "thing_name": self._thing},
            "server_name": f"upparat-{role}",
        }
        if problem.traceback:
            event["extra"] = {"traceback": problem.traceback}
        with sentry_sdk.new_scope() as scope:
            # This process's own tags (role broker) must not cover the root process's.
            scope.set_tag("role", role)
            scope.set_tag("thing_name", self._thing)
            sentry_sdk.capture_event(event)
