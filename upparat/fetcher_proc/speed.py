"""The pieces of a download's speed: the clock-driven ones, pure so that
tests drive the clock (the low-speed detector, the rate meter, the pace of
a rate limit), and the hash that runs beside the stream."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import deque


class LowSpeed:
    """curl's low-speed abort (CURLOPT_LOW_SPEED_LIMIT/_TIME): a transfer is
    stalled when fewer than ``limit * seconds`` bytes arrived during the last
    ``seconds``. ``limit`` 0 turns it off. Fed with samples of the running
    byte count; a transfer is judged only once it has lasted a whole window.
    """

    def __init__(self, limit: int, seconds: float):
        self.limit = limit
        self.seconds = seconds
        self._samples: deque[tuple[float, int]] = deque()

    def start(self, now: float, received: int) -> None:
        """A new transfer (an attempt's body) begins."""
        self._samples = deque([(now, received)])

    def stalled(self, now: float, received: int) -> bool:
        if self.limit <= 0 or not self._samples:
            return False
        self._samples.append((now, received))
        window_start = now - self.seconds
        # Keep the newest sample at or before the window's start: the count there is the baseline.
        while len(self._samples) >= 2 and self._samples[1][0] <= window_start:
            self._samples.popleft()
        since, baseline = self._samples[0]
        if since > window_start:
            return False
        return received - baseline < self.limit * self.seconds


class RateMeter:
    """Bytes per second over the last ``window`` seconds."""

    def __init__(self, window: float = 3.0):
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> int:
        if len(self._samples) < 2:
            return 0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return int((b1 - b0) / (t1 - t0)) if t1 > t0 and b1 >= b0 else 0

    def clear(self) -> None:
        self._samples.clear()


class Pace:
    """A rate limit: how long to wait so that ``sent`` bytes since ``start``
    stay at or below ``rate`` bytes per second (0: no limit)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._start = 0.0
        self._base = 0

    def start(self, now: float, sent: int) -> None:
        self._start, self._base = now, sent

    def delay(self, now: float, sent: int) -> float:
        if self.rate <= 0:
            return 0.0
        return max(0.0, self._start + (sent - self._base) / self.rate - now)

    def read_size(self, largest: int) -> int:
        """Reads of about a tenth of a second's worth keep a limited rate smooth."""
        if self.rate <= 0:
            return largest
        return max(4096, min(largest, self.rate // 10))


class BackgroundHash:
    """sha256 of a stream, computed by a thread of its own: hashlib releases
    the GIL, so hashing one chunk overlaps with receiving and writing the
    next (about a fifth faster over a fast link, bench/fetch_speed.py
    --approaches). At most ``depth`` chunks wait, so memory stays bounded.
    ``copy()`` and ``reset()`` first wait until every chunk given is hashed.
    """

    def __init__(self, depth: int = 4):
        self._digest = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                if self._error is None:
                    self._digest.update(chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the stream's thread by sync()
                self._error = exc
            finally:
                self._queue.task_done()

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def sync(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise self._error

    def copy(self):
        self.sync()
        return self._digest.copy()

    def hexdigest(self) -> str:
        return self.copy().hexdigest()

    def reset(self, digest=None) -> None:
        """Start again from ``digest`` (a hashlib sha256 object) or from nothing."""
        self.sync()
        self._digest = digest if digest is not None else hashlib.sha256()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
