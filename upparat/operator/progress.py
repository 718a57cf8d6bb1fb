"""An upload progress bar on a terminal; nothing at all when the stream is not one."""

from __future__ import annotations

import threading
import time


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """``add(n)`` is called with each chunk's byte count, maybe from several threads
    (boto3's transfer manager uploads parts in parallel)."""

    def __init__(self, stream, total: int, label: str, interval: float = 0.2):
        self._stream = stream
        self._total = max(total, 1)
        self._label = label
        self._interval = interval
        self._done = 0
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = time.monotonic()
            if self.enabled and (now - self._last_draw >= self._interval or self._done >= self._total):
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = min(self._done / self._total, 1.0)
        width = 30
        filled = int(fraction * width)
        rate = self._done / max(now - self._started, 1e-6)
        self._stream.write(f"\r{self._label} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}% "
                           f"{_size(self._done)} / {_size(self._total)}  {_size(rate)}/s ")
        self._stream.flush()

    def finish(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
