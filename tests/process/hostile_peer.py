"""A compromised broker (or fetcher) for the process tests: run as the
unprivileged user, it speaks raw ZeroMQ to a socket and does whatever the
test tells it on stdin, one JSON command per line, answering one JSON line:

    {"op": "send", "frames": [<base64>...]}           -> {"sent": true} | {"sent": false}
    {"op": "recv", "timeout_ms": N}                   -> {"frames": [<base64>...]} | {"timeout": true}
    {"op": "flood", "frame": N, "count": C, "seconds": S, "end": bool}
        one multi-frame message of C frames of N bytes (C = -1: until S seconds
        have passed), completed with a last frame only if "end"  -> {"frames_sent": n}
    {"op": "zmtp_flood", "frame": N, "count": C, "seconds": S}
        the same, speaking ZMTP 3.0 on a plain unix socket: libzmq sends a
        multi-frame message only once it is complete, but a hostile peer need
        not use libzmq; the installer buffers what it receives until the last
        frame (never sent here)      -> {"frames_sent": n, "dropped": bool}
    {"op": "reconnect"}                               -> {"ok": true}
    {"op": "connect_unix"}  a plain AF_UNIX connect   -> {"ok": true} | {"errno": n}

Usage: python hostile_peer.py SOCKET_PATH
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time

import zmq


def _read_exactly(raw: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = raw.recv(n - len(data))
        if not more:
            raise ConnectionError("closed during the handshake")
        data += more
    return data


def zmtp_flood(path: str, frame: int, count: int, seconds: float) -> dict:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    raw.settimeout(5)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    raw.sendall(greeting)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    raw.sendall(b"\x04" + bytes([len(body)]) + body)
    # Data only after the server's READY: before it, libzmq takes any frame for
    # a handshake command and drops the connection.
    _read_exactly(raw, 64)  # the server's greeting
    flags, size = _read_exactly(raw, 2)
    assert flags == 0x04, flags  # a short command: READY
    _read_exactly(raw, size)
    header = b"\x03" + struct.pack(">Q", frame)  # MORE | LONG: never the last frame
    chunk = header + b"\x00" * frame
    sent = 0
    dropped = False
    deadline = time.monotonic() + seconds
    try:
        raw.sendall(b"\x01\x00")  # the DEALER's empty delimiter, MORE
        while (count < 0 or sent < count) and time.monotonic() < deadline:
            raw.sendall(chunk)
            sent += 1
    except OSError:  # EPIPE / ECONNRESET: the installer dropped the connection
        dropped = True
    raw.close()
    return {"frames_sent": sent, "dropped": dropped}


def main() -> int:
    path = sys.argv[1]
    context = zmq.Context()

    def connect():
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # a flood must not be stopped by our own high-water mark
        sock.setsockopt(zmq.SNDTIMEO, 2000)
        sock.connect(f"ipc://{path}")
        return sock

    sock = connect()
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "send":
            frames = [base64.b64decode(f) for f in command["frames"]]
            try:
                sock.send_multipart(frames)
                answer = {"sent": True}
            except zmq.Again:
                answer = {"sent": False}
        elif op == "recv":
            if sock.poll(command.get("timeout_ms", 5000), zmq.POLLIN):
                answer = {"frames": [base64.b64encode(f).decode() for f in sock.recv_multipart()]}
            else:
                answer = {"timeout": True}
        elif op == "flood":
            chunk = b"\x00" * command["frame"]
            deadline = time.monotonic() + command.get("seconds", 30)
            sent = 0
            count = command["count"]
            try:
                while (count < 0 or sent < count) and time.monotonic() < deadline:
                    sock.send(chunk, zmq.SNDMORE)
                    sent += 1
                if command.get("end"):
                    sock.send(b"")
            except zmq.ZMQError:
                pass
            answer = {"frames_sent": sent}
        elif op == "zmtp_flood":
            answer = zmtp_flood(path, command["frame"], command["count"], command.get("seconds", 30))
        elif op == "reconnect":
            sock.close(linger=0)
            sock = connect()
            answer = {"ok": True}
        elif op == "connect_unix":
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                raw.connect(path)
                answer = {"ok": True}
            except OSError as exc:
                answer = {"errno": exc.errno}
            finally:
                raw.close()
        else:
            answer = {"error": f"unknown op {op}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    sock.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
