"""A self-pipe that wakes a child's main loop at once: threads call it when
they have news, and it is the loop's signal wake-up fd, so SIGTERM ends the
wait immediately instead of at the next timeout. Register ``read_fd`` in the
loop's poller and ``drain()`` it when it is readable."""

from __future__ import annotations

import os
import signal


class Wakeup:
    def __init__(self):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_signal_fd: int | None = None

    def __call__(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except BlockingIOError:
            pass  # already pending: the loop wakes anyway

    def catch_signals(self) -> None:
        """Signals (whose handlers only set flags) wake the loop too."""
        self._old_signal_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._old_signal_fd is not None:
            signal.set_wakeup_fd(self._old_signal_fd)
            self._old_signal_fd = None
        os.close(self.read_fd)
        os.close(self.write_fd)
