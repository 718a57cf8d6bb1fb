"""Framing shared by every ZeroMQ boundary: one JSON object per single frame.

A frame is ``{"v": 1, "type": "<name>", <fields>}``, UTF-8, at most
MAX_MESSAGE_BYTES. Each boundary module (fetcher_protocol, installer_protocol)
declares its messages as frozen dataclasses and a ``Catalogue``; decoding
checks, in order: size, UTF-8, JSON object, version, known type, exactly the
declared fields, each field's type, then the message's own ``check()``. Any
failure raises ProtocolError with one specific reason. No pickle anywhere.

Sockets: servers bind a REP socket, clients use REQ with a receive timeout
and reopen the socket after a timeout (zguide "Lazy Pirate"). ZMQ's own
MAXMSGSIZE is set above our limit so that a slightly oversized request is
still answered with a refusal, and a huge one is dropped by ZMQ itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

import zmq

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
SOCKET_MAXMSGSIZE = 1024 * 1024
JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger(__name__)


class ProtocolError(Exception):
    """A peer's message is not acceptable; the text says exactly why."""


class IpcTimeout(Exception):
    """The peer did not answer in time."""


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def check(self) -> None:
        """Semantic checks beyond field types; raise ProtocolError."""

    def encode(self) -> bytes:
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        body.update(dataclasses.asdict(self))
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(data) > MAX_MESSAGE_BYTES:
            # Our own message too big is our bug, not the peer's.
            raise ValueError(f"{self.TYPE} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        return data


# Shared by both boundaries: a refusal that names what was wrong.
@dataclass(frozen=True)
class Refused(Message):
    TYPE: ClassVar[str] = "refused"
    seq: int
    reason: str


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int
    pid: int
    busy_job_id: str | None


def check_job_id(job_id: str) -> None:
    if not JOB_ID_RE.match(job_id):
        raise ProtocolError("job_id must be 1-64 characters from a-z A-Z 0-9 _ -")


def check_text(name: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise ProtocolError(f"{name} longer than {limit} characters")


def _type_ok(value, annotation) -> bool:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_type_ok(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


class Catalogue:
    """The message types one side accepts, by type name."""

    def __init__(self, *classes: type[Message]):
        self._classes = {cls.TYPE: cls for cls in classes}
        self._hints = {cls.TYPE: typing.get_type_hints(cls) for cls in classes}

    def decode(self, data: bytes) -> Message:
        if len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            body = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"message is not JSON ({exc.msg})") from None
        if not isinstance(body, dict):
            raise ProtocolError("message is not a JSON object")
        if body.get("v") != PROTOCOL_VERSION or isinstance(body.get("v"), bool):
            raise ProtocolError(f"unsupported protocol version {body.get('v')!r}")
        kind = body.get("type")
        cls = self._classes.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {kind!r}")
        hints = self._hints[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        given = set(body) - {"v", "type"}
        if given - fields:
            raise ProtocolError(f"{kind}: unexpected field(s) {', '.join(sorted(given - fields))}")
        if fields - given:
            raise ProtocolError(f"{kind}: missing field(s) {', '.join(sorted(fields - given))}")
        for name in sorted(fields):
            if not _type_ok(body[name], hints[name]):
                raise ProtocolError(f"{kind}: field {name} has the wrong type")
        message = cls(**{name: body[name] for name in fields})
        message.check()
        return message


def make_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_MAXMSGSIZE)
    return sock


class Client:
    """REQ client with a bounded wait; a timeout resets the socket."""

    def __init__(self, context: zmq.Context, endpoint: str, replies: Catalogue, timeout_s: float = 5.0):
        self._context = context
        self._endpoint = endpoint
        self._replies = replies
        self._timeout_ms = int(timeout_s * 1000)
        self._sock: zmq.Socket | None = None

    def _open(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = make_socket(self._context, zmq.REQ)
            self._sock.connect(self._endpoint)
        return self._sock

    def with_timeout(self, timeout_s: float) -> "Client":
        """A client for the same peer with another wait (own socket)."""
        return Client(self._context, self._endpoint, self._replies, timeout_s)

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(self, message: Message) -> Message:
        sock = self._open()
        sock.send(message.encode())
        if not sock.poll(self._timeout_ms, zmq.POLLIN):
            self.reset()
            raise IpcTimeout(f"no answer from {self._endpoint} to {message.TYPE}")
        data = sock.recv()
        return self._replies.decode(data)

    def close(self) -> None:
        self.reset()


def serve_one(sock: zmq.Socket, requests: Catalogue, handle, name: str) -> None:
    """Receive one request on a REP socket, answer it; never raise on peer input.

    ``handle(message) -> Message`` may raise ProtocolError to refuse.
    """
    frames = sock.recv_multipart()
    seq = 0
    try:
        if len(frames) != 1:
            raise ProtocolError(f"expected 1 frame, got {len(frames)}")
        message = requests.decode(frames[0])
        seq = getattr(message, "seq", 0)
        reply = handle(message)
    except ProtocolError as exc:
        log.warning("%s: refused request: %s", name, exc)
        reply = Refused(seq=seq, reason=str(exc)[:1000])
    sock.send(reply.encode())
