"""Framing shared by every ZeroMQ boundary: one JSON object in one frame.

A message is ``{"v": 2, "type": "<name>", <fields>}``, UTF-8, at most
MAX_MESSAGE_BYTES. Each boundary module (fetcher_protocol, installer_protocol)
declares its messages as frozen dataclasses and a ``Catalogue``. Decoding
checks, in order, each with one specific reason: size, UTF-8 and JSON within
limits (upparat.safejson: depth, number and string length, no lone
surrogates, no duplicate keys), a JSON object, the version, a known type,
exactly the declared fields, each field's type (nested dataclasses such as
``Release`` field by field), then the message's own ``check()``. Any failure
raises ProtocolError. No pickle anywhere.

Sockets. A server (installer, fetcher) binds a ROUTER; its one client, the
broker, connects a DEALER. On the wire a request is ``[b"", payload]`` from
the DEALER, seen by the ROUTER as ``[identity, b"", payload]``; anything
else (more frames, no delimiter) is dropped with a log line. A ROUTER may
answer later and may push unsolicited messages (state changes) to the
identity that last spoke, so the broker never has to poll.

Limits. ``zmq.MAXMSGSIZE`` caps every frame before libzmq allocates it (a
larger frame disconnects the peer). libzmq buffers the frames of a
multi-frame message until its last frame arrives and offers no cap on that
total; ``Server`` therefore watches its own resident memory and, when a peer
has made it grow past ``memory_limit`` with unread input, closes and re-binds
its socket, which drops the peer's connection and frees what libzmq held
(docs/security.md, "IPC limits").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass
from typing import Callable, ClassVar

import zmq

from upparat import safejson

PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 64 * 1024
SOCKET_MAXMSGSIZE = MAX_MESSAGE_BYTES  # per frame; enforced by libzmq before allocation
MAX_DEPTH = 4
MAX_ITEMS = 256
MAX_REASON = 1000
PAGE = os.sysconf("SC_PAGE_SIZE")

log = logging.getLogger(__name__)


class ProtocolError(Exception):
    """A peer's message is not acceptable; the text says exactly why."""


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def check(self) -> None:
        """Semantic checks beyond field types; raise ProtocolError."""

    def encode(self) -> bytes:
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        body.update(dataclasses.asdict(self))
        data = safejson.dumps(body)
        if len(data) > MAX_MESSAGE_BYTES:
            # Our own message too big is our bug, not the peer's.
            raise ValueError(f"{self.TYPE} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        return data


# Refusal codes: what the client should do about a refusal.
MALFORMED = "malformed"  # the message could not be decoded; never retry as is
NOT_PERMITTED = "not_permitted"  # decoded, but not allowed in this phase
BUSY = "busy"  # allowed, but something else runs now; the server pushes when it is done
REFUSAL_CODES = (MALFORMED, NOT_PERMITTED, BUSY)


@dataclass(frozen=True)
class Refused(Message):
    """A refusal that names what was wrong; nothing of the request was done."""

    TYPE: ClassVar[str] = "refused"
    seq: int
    code: str
    reason: str

    def check(self) -> None:
        if self.code not in REFUSAL_CODES:
            raise ProtocolError(f"unknown refusal code {self.code!r}")
        check_text("reason", self.reason, MAX_REASON)


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    seq: int


def check_seq(seq: int) -> None:
    if not 0 <= seq < 2**63:
        raise ProtocolError("seq must be 0 <= seq < 2^63")


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
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    return False  # a field type this codec does not know: refuse, never guess


def _nested_type(annotation):
    """The dataclass inside ``X`` or ``X | None``, or None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arm in typing.get_args(annotation):
            if dataclasses.is_dataclass(arm):
                return arm
    return None


def decode_fields(cls, body: dict, where: str) -> dict:
    """Exactly the dataclass's fields, each of its declared type; nested
    dataclasses are decoded the same way. Raises ProtocolError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    given = set(body)
    if given - fields:
        raise ProtocolError(f"{where}: unexpected field(s) {', '.join(sorted(given - fields))}")
    if fields - given:
        raise ProtocolError(f"{where}: missing field(s) {', '.join(sorted(fields - given))}")
    values = {}
    for name in sorted(fields):
        value, annotation = body[name], hints[name]
        if not _type_ok(value, annotation):
            raise ProtocolError(f"{where}: field {name} has the wrong type")
        nested = _nested_type(annotation)
        if nested is not None and isinstance(value, dict):
            value = nested(**decode_fields(nested, value, f"{where}.{name}"))
        values[name] = value
    return values


class Catalogue:
    """The message types one side accepts, by type name."""

    def __init__(self, *classes: type[Message]):
        self._classes = {cls.TYPE: cls for cls in classes}

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self._classes)

    def decode(self, data: bytes) -> Message:
        try:
            body = safejson.loads(data, max_bytes=MAX_MESSAGE_BYTES, max_depth=MAX_DEPTH,
                                  max_string=MAX_MESSAGE_BYTES, max_items=MAX_ITEMS)
        except safejson.BadJson as exc:
            raise ProtocolError(f"message refused: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError("message is not a JSON object")
        version = body.pop("v", None)
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
        kind = body.pop("type", None)
        cls = self._classes.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {str(kind)[:64]!r}")
        message = cls(**decode_fields(cls, body, kind))
        check_seq(message.seq)
        message.check()
        return message


def make_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_MAXMSGSIZE)
    return sock


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * PAGE


def _refusal_seq(data: bytes) -> int:
    """The seq of a refused request, if one can be read safely; else 0."""
    try:
        body = safejson.loads(data, max_bytes=MAX_MESSAGE_BYTES, max_depth=MAX_DEPTH, max_items=MAX_ITEMS)
    except safejson.BadJson:
        return 0
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if type(seq) is int and 0 <= seq < 2**63 else 0


Handler = Callable[[Message, bytes], "Message | None"]


class Server:
    """A ROUTER that decodes every request, answers it, and can push.

    ``handle(message, peer)`` returns the reply, or None to answer later
    with ``push(peer, message)``; it may raise ProtocolError to refuse.
    ``on_bound(path)`` runs after every (re)bind to set the socket file's
    owner and mode. Refusals are logged and answered; nothing raises out of
    ``serve_ready`` because of what a peer sent. The owner's main loop calls
    ``guard_memory()`` on every iteration (at least once a second): an
    unfinished multi-frame message never makes the socket readable.
    """

    def __init__(self, context: zmq.Context, socket_path: os.PathLike, requests: Catalogue, handle: Handler,
                 name: str, on_bound: Callable[[str], None] | None = None, memory_limit: int = 128 * 1024**2):
        self._context = context
        self._path = os.fspath(socket_path)
        self._requests = requests
        self._handle = handle
        self._name = name
        self._on_bound = on_bound
        self._memory_limit = memory_limit
        self._baseline = 0
        self.last_peer: bytes | None = None
        self.sock: zmq.Socket | None = None
        self.rebinds = 0

    @property
    def endpoint(self) -> str:
        return f"ipc://{self._path}"

    def bind(self) -> zmq.Socket:
        try:
            os.unlink(self._path)  # a stale socket of an earlier run; the directory is ours
        except FileNotFoundError:
            pass
        sock = make_socket(self._context, zmq.ROUTER)
        old_umask = os.umask(0o177)  # born 0600; on_bound widens it to the one group allowed
        try:
            sock.bind(self.endpoint)
        finally:
            os.umask(old_umask)
        if self._on_bound is not None:
            self._on_bound(self._path)
        self.sock = sock
        self._baseline = resident_bytes()
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        try:
            os.unlink(self._path)
        except OSError:
            pass

    def guard_memory(self) -> bool:
        """Re-bind when unread peer input made us grow past the limit. True if it did."""
        grown = resident_bytes() - self._baseline
        if grown <= self._memory_limit:
            return False
        log.error("%s: a peer made this process grow by %d MiB with unread input (an endless multi-frame "
                  "message?); dropping every connection and listening again", self._name, grown // 2**20)
        self.sock.close(linger=0)
        self.sock = None
        self.rebinds += 1
        self.bind()
        return True

    def serve_ready(self, limit: int = 100) -> int:
        """Answer the requests that are waiting (at most ``limit``); returns how many."""
        served = 0
        while served < limit and self.sock is not None:
            try:
                frames = self._recv_frames()
            except zmq.Again:
                break
            served += 1
            if frames is None:
                continue
            self._answer(*frames)
        self.guard_memory()
        return served

    def _recv_frames(self) -> tuple[bytes, bytes] | None:
        """(peer identity, payload) of one well-framed request, or None (dropped)."""
        parts = []
        count = 0
        while True:
            frame = self.sock.recv(zmq.NOBLOCK if count == 0 else 0, copy=False)
            count += 1
            if count <= 3:
                parts.append(frame.bytes)
            if not frame.more:
                break
        if count != 3 or parts[1] != b"":
            log.warning("%s: dropped a message of %d frames (a request is exactly one frame)", self._name,
                        count - 1)
            if count >= 2 and parts[1] == b"":
                self._send(parts[0], Refused(seq=0, code=MALFORMED,
                                             reason=f"a request is exactly one frame, got {count - 2}"))
            return None
        return parts[0], parts[2]

    def _answer(self, peer: bytes, payload: bytes) -> None:
        self.last_peer = peer
        try:
            message = self._requests.decode(payload)
        except ProtocolError as exc:
            log.warning("%s: refused a malformed request: %s", self._name, exc)
            self._send(peer, Refused(seq=_refusal_seq(payload), code=MALFORMED, reason=str(exc)[:MAX_REASON]))
            return
        try:
            reply = self._handle(message, peer)
        except ProtocolError as exc:
            code = getattr(exc, "code", NOT_PERMITTED)
            log.warning("%s: refused %s: %s", self._name, message.TYPE, exc)
            reply = Refused(seq=message.seq, code=code, reason=str(exc)[:MAX_REASON])
        if reply is not None:
            self._send(peer, reply)

    def push(self, peer: bytes | None, message: Message) -> None:
        """Send a message to a peer without a request (e.g. a state change)."""
        if peer is not None and self.sock is not None:
            self._send(peer, message)

    def _send(self, peer: bytes, message: Message) -> None:
        try:
            self.sock.send_multipart([peer, b"", message.encode()], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("%s: could not send %s: the peer is not reading", self._name, message.TYPE)
        except zmq.ZMQError as exc:  # e.g. EHOSTUNREACH for a peer that is gone
            log.info("%s: could not send %s: %s", self._name, message.TYPE, exc)


class Refusal(ProtocolError):
    """Raised by a handler to refuse with a specific code."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


class Client:
    """The broker's end of a boundary: a DEALER that sends without waiting.

    Replies and pushes arrive on ``sock`` (register it in the caller's
    poller) and are read with ``receive_ready``. A request sent while the
    peer is not (yet, or again) connected waits in the socket's queue and
    goes out when it connects; requests are idempotent, so a late one does
    no harm. ``send`` returns False only when that queue is full.
    """

    def __init__(self, context: zmq.Context, endpoint: str, replies: Catalogue, name: str):
        self._context = context
        self._endpoint = endpoint
        self._replies = replies
        self.name = name
        self.sock = self._open()
        self.garbage = 0  # replies that could not be used, since the last reset_garbage()
        self.monitor: zmq.Socket | None = None

    def _open(self) -> zmq.Socket:
        sock = make_socket(self._context, zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(self._endpoint)
        return sock

    def send(self, message: Message) -> bool:
        try:
            self.sock.send_multipart([b"", message.encode()], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def receive_ready(self, limit: int = 100) -> list[Message]:
        """Every usable message waiting; garbage is logged and counted."""
        out = []
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            if len(frames) != 2 or frames[0] != b"":
                self.garbage += 1
                log.error("%s: dropped a reply of %d frames", self.name, len(frames))
                continue
            try:
                out.append(self._replies.decode(frames[1]))
            except ProtocolError as exc:
                self.garbage += 1
                log.error("%s: unusable reply: %s", self.name, exc)
        return out

    def watch_connections(self) -> zmq.Socket:
        """A socket (register it in the caller's poller) that becomes readable
        each time the connection to the peer is made, again after the peer
        restarted too. A restarted server cannot push to us before we speak
        (a ROUTER learns its peers from their messages), so the caller asks
        at once instead of at its next safety query."""
        if self.monitor is None:
            self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        return self.monitor

    def connections_ready(self) -> int:
        """How many connections were made since the last call."""
        made = 0
        while self.monitor is not None:
            try:
                self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            made += 1
        return made

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)
