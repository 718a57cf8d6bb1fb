"""A small TCP proxy that misbehaves on purpose, for robustness tests.

``FaultProxy(upstream_port).start()`` listens on 127.0.0.1:<free port> and
forwards every connection to 127.0.0.1:<upstream_port>, one thread per
connection. While it runs, a test changes how the network behaves:

- ``delay(s)``: every chunk waits ``s`` seconds before it is forwarded (latency);
- ``slow(rate)``: each direction of each connection forwards at most
  ``rate`` bytes a second (``slow(None)`` lifts it);
- ``cut()``: every open connection is reset at once (RST on both sides);
  new connections are forwarded as usual (a NAT or Wi-Fi drop);
- ``blackhole()`` / ``lift()``: nothing moves any more, in either direction,
  on old and new connections alike (new ones are accepted by the kernel and
  wait), as when packets are dropped; ``lift()`` lets everything flow again,
  what was held included, as TCP retransmission would. ``lift(cut=True)``
  resets what was held instead (the peers' state timed out meanwhile);
- ``refuse(True)``: new connections are reset right after accept (the
  server is down); open ones are left alone.

``connections`` counts the accepted connections, ``forwarded`` the bytes
forwarded in each direction. ``stop()`` closes everything, by the proxy's own
sockets only. Development tool: never part of a device deployment.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

CHUNK = 64 * 1024
TICK = 0.02  # how often a connection's thread looks at the switches when nothing moves


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", host: str = "127.0.0.1",
                 port: int = 0, name: str = "proxy"):
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.name = name
        self._lock = threading.Lock()
        self._delay = 0.0
        self._rate: int | None = None
        self._blackholed = False
        self._refusing = False
        self._generation = 0  # bumped by cut(): connections of an older generation are reset
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._links: set[_Link] = set()
        self.connections = 0
        self.forwarded = {"up": 0, "down": 0}  # client -> upstream, upstream -> client

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "FaultProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(TICK * 5)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            links = list(self._links)
        for link in links:
            link.thread.join(5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- switches --------------------------------------------------------------
    def delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = max(0.0, float(seconds))

    def slow(self, rate: int | None) -> None:
        with self._lock:
            self._rate = None if rate is None else max(1, int(rate))

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        with self._lock:
            self._generation += 1
            return len(self._links)

    def blackhole(self) -> None:
        with self._lock:
            self._blackholed = True

    def lift(self, cut: bool = False) -> None:
        with self._lock:
            self._blackholed = False
            if cut:
                self._generation += 1

    def refuse(self, on: bool = True) -> None:
        with self._lock:
            self._refusing = on

    def reset(self) -> None:
        """Back to a well-behaved network (open connections stay)."""
        with self._lock:
            self._delay, self._rate, self._blackholed, self._refusing = 0.0, None, False, False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def _snapshot(self):
        with self._lock:
            return self._delay, self._rate, self._blackholed, self._generation

    # -- the work ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(TICK)
                continue
            with self._lock:
                refusing, generation = self._refusing, self._generation
                self.connections += 1
            if refusing:
                _reset(client)
                continue
            link = _Link(self, client, generation)
            with self._lock:
                self._links.add(link)
            link.thread.start()

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self.forwarded[direction] += n

    def _done(self, link: "_Link") -> None:
        with self._lock:
            self._links.discard(link)


class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, generation: int):
        self.proxy = proxy
        self.client = client
        self.generation = generation
        self.thread = threading.Thread(target=self._run, name=f"{proxy.name}-link", daemon=True)

    def _run(self) -> None:
        proxy = self.proxy
        upstream = None
        graceful = False
        try:
            # Wait out a blackhole before even connecting upstream (the SYN is lost).
            while not proxy._stopping.is_set():
                _, _, blackholed, generation = proxy._snapshot()
                if generation != self.generation:
                    return
                if not blackholed:
                    break
                time.sleep(TICK)
            try:
                upstream = socket.create_connection(proxy.upstream, timeout=5)
            except OSError:
                return  # upstream down: the client sees its connection reset
            graceful = self._pump(upstream)
        finally:
            close = _close if graceful else _reset
            close(self.client)
            if upstream is not None:
                close(upstream)
            proxy._done(self)

    def _pump(self, upstream: socket.socket) -> bool:
        """Forward until both sides are done (True) or the link is cut or fails (False)."""
        proxy = self.proxy
        ends = {self.client: (upstream, "up"), upstream: (self.client, "down")}
        budget = {"up": _Bucket(), "down": _Bucket()}
        selector = selectors.DefaultSelector()
        try:
            for sock in ends:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            while not proxy._stopping.is_set():
                ready = selector.select(TICK)
                # The switches as they are now, after the wait: a blackhole set during
                # select() must hold what became readable meanwhile.
                delay, rate, blackholed, generation = proxy._snapshot()
                if generation != self.generation:
                    return
                if blackholed:
                    time.sleep(TICK)  # nothing read, nothing sent: the kernel buffers fill up
                    continue
                for key, _ in ready:
                    sock = key.fileobj
                    target, direction = ends[sock]
                    want = CHUNK if rate is None else max(1, min(CHUNK, rate // 20))
                    try:
                        data = sock.recv(want)
                    except OSError:
                        return
                    if not data:
                        # Half-close: pass the FIN on, keep the other direction.
                        try:
                            target.shutdown(socket.SHUT_WR)
                        except OSError:
                            return
                        selector.unregister(sock)
                        if not selector.get_map():
                            return True
                        continue
                    if delay:
                        proxy._stopping.wait(delay)
                    if rate is not None:
                        budget[direction].wait(len(data), rate, proxy._stopping)
                    if proxy._snapshot()[3] != self.generation:
                        return  # cut while this chunk waited
                    try:
                        target.sendall(data)
                    except OSError:
                        return
                    proxy._count(direction, len(data))
            return False
        finally:
            selector.close()


class _Bucket:
    """Paces one direction to ``rate`` bytes a second."""

    def __init__(self):
        self.began = time.monotonic()
        self.sent = 0
        self.rate: int | None = None

    def wait(self, n: int, rate: int, stopping: threading.Event) -> None:
        if rate != self.rate:  # a new rate starts a new account
            self.rate, self.began, self.sent = rate, time.monotonic(), 0
        self.sent += n
        ahead = self.began + self.sent / rate - time.monotonic()
        if ahead > 0:
            stopping.wait(ahead)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
