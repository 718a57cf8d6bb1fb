"""The fault proxy (upparat/devtools/faultproxy.py) against a real echo
server on loopback: it forwards faithfully, and each switch does what it
says — delay, slow, cut, blackhole and lift, refuse."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.support import poll_for
from upparat.devtools.faultproxy import FaultProxy


class EchoServer:
    """Echoes every byte back; closes its side when the client half-closes."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _echo(self, conn):
        conn.settimeout(0.1)
        with conn:
            while not self.stopping.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def proxy():
    echo = EchoServer()
    fault = FaultProxy(echo.port, name="test").start()
    try:
        yield fault
    finally:
        fault.stop()
        echo.stop()


def connect(proxy, timeout=5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    return sock


def recv_exactly(sock, n) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_forwards_every_byte_both_ways_and_passes_the_half_close_on(proxy):
    data = os.urandom(1_000_000)
    with connect(proxy) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        back = recv_exactly(sock, len(data) + 1)  # +1: only EOF ends it
        sender.join(5)
    assert back == data
    assert proxy.forwarded == {"up": len(data), "down": len(data)}
    poll_for(lambda: proxy.open_connections == 0, 5, what="the link to end after both FINs")


def test_delay_holds_each_chunk_back(proxy):
    proxy.delay(0.3)
    with connect(proxy) as sock:
        began = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        # one delay up, one down
        assert time.monotonic() - began >= 0.55


def test_slow_limits_the_rate_of_each_direction(proxy):
    proxy.slow(50_000)
    data = os.urandom(50_000)
    with connect(proxy) as sock:
        began = time.monotonic()
        threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()
        assert recv_exactly(sock, len(data)) == data
        elapsed = time.monotonic() - began
    assert elapsed >= 0.9, elapsed
    proxy.slow(None)
    with connect(proxy) as sock:
        began = time.monotonic()
        threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()
        assert recv_exactly(sock, len(data)) == data
        assert time.monotonic() - began < 0.5


def test_cut_resets_open_connections_and_new_ones_work(proxy):
    with connect(proxy) as old:
        old.sendall(b"a")
        assert recv_exactly(old, 1) == b"a"
        assert proxy.cut() == 1
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            # the reset arrives; recv then raises (or a send fails)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if old.recv(1) == b"":
                    raise ConnectionResetError("EOF")
    with connect(proxy) as new:
        new.sendall(b"b")
        assert recv_exactly(new, 1) == b"b"


def test_blackhole_holds_everything_until_lifted_old_and_new_connections(proxy):
    with connect(proxy) as old:
        old.sendall(b"?")
        assert recv_exactly(old, 1) == b"?"
        proxy.blackhole()
        old.sendall(b"held")
        old.settimeout(0.5)
        with pytest.raises(socket.timeout):
            old.recv(4)
        new = connect(proxy)  # the kernel accepts; nothing goes upstream
        new.settimeout(0.5)
        new.sendall(b"new!")
        with pytest.raises(socket.timeout):
            new.recv(4)
        proxy.lift()
        old.settimeout(5)
        new.settimeout(5)
        assert recv_exactly(old, 4) == b"held"
        assert recv_exactly(new, 4) == b"new!"
        new.close()


def test_lift_with_cut_resets_what_was_held(proxy):
    with connect(proxy) as old:
        old.sendall(b"?")
        assert recv_exactly(old, 1) == b"?"
        proxy.blackhole()
        old.sendall(b"x")
        proxy.lift(cut=True)
        old.settimeout(5)
        with pytest.raises(ConnectionResetError):
            if old.recv(1) == b"":
                raise ConnectionResetError("EOF")


def test_refuse_resets_new_connections_only_while_on(proxy):
    with connect(proxy) as old:
        old.sendall(b"?")
        assert recv_exactly(old, 1) == b"?"  # accepted and linked before refusing
        proxy.refuse(True)
        with pytest.raises(ConnectionResetError):  # at connect() or at the first read
            with connect(proxy) as refused:
                if refused.recv(1) == b"":
                    raise ConnectionResetError("EOF")
        old.sendall(b"still")  # an open connection is left alone
        assert recv_exactly(old, 5) == b"still"
    proxy.refuse(False)
    with connect(proxy) as new:
        new.sendall(b"ok")
        assert recv_exactly(new, 2) == b"ok"
