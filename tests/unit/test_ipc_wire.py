"""The framing and decoding every ZeroMQ boundary shares (upparat.ipc.wire):
round trips of every message of both protocols, one specific refusal per
malformed field, property-based decoding of hostile input, and the ROUTER
server's framing and memory guard on a real ipc:// socket."""

import json
import os
import time

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc import wire
from upparat.ipc.wire import MAX_MESSAGE_BYTES, Ping, ProtocolError, Refused
from upparat.release import Release

SHA = "a" * 64
RELEASE = Release(version="1.0", meta="m", force=False, sha256=SHA, size=10, serial=None, signature=None)
REQUESTS = [
    Ping(seq=1),
    ip.OpenJob(seq=2, job_id="j", execution=1, release=RELEASE),
    ip.QueryJob(seq=3, job_id="j", execution=1),
    ip.Stage(seq=4, job_id="j", execution=1),
    ip.RunHook(seq=5, job_id="j", execution=1, hook="version", round=3),
    ip.Discard(seq=6, job_id="j", execution=1),
]
REPLIES = [
    ip.Pong(seq=1, pid=10, job_id="j", execution=1, phase=ip.STAGED),
    ip.JobState(seq=0, job_id="j", execution=1, phase=ip.INSTALLING, failure=None, message="",
                hook=ip.HookRun("install", 0, ip.RUNNING, None, 0, "50%", "running")),
    Refused(seq=3, code=wire.BUSY, reason="a hook runs"),
]
FETCHER = [fp.Fetch(seq=1, job_id="j", execution=1, url="https://x/y", release=RELEASE),
           fp.QueryFetch(seq=2, job_id="j", execution=1), fp.CancelFetch(seq=3, job_id="j", execution=1)]


def frame(**body):
    return json.dumps(body).encode()


def test_every_message_of_both_protocols_round_trips():
    for message in REQUESTS:
        assert ip.REQUESTS.decode(message.encode()) == message
    for message in REPLIES:
        assert ip.REPLIES.decode(message.encode()) == message
    for message in FETCHER:
        assert fp.REQUESTS.decode(message.encode()) == message
    status = fp.FetchStatus(seq=0, job_id="j", execution=1, state=fp.RUNNING, bytes_done=5, bytes_total=10, rate=3,
                            failure=None, message="")
    assert fp.REPLIES.decode(status.encode()) == status


def test_catalogues_hold_exactly_the_protocol_messages():
    assert ip.REQUESTS.types == {"ping", "open_job", "query_job", "stage", "run_hook", "discard"}
    assert fp.REQUESTS.types == {"ping", "fetch", "query_fetch", "cancel_fetch"}


def run_hook(**over):
    body = {"v": 2, "type": "run_hook", "seq": 1, "job_id": "j", "execution": 1, "hook": "install", "round": 0}
    body.update(over)
    return frame(**body)


def open_job(**release_over):
    release = {"version": "1", "meta": "", "force": False, "sha256": SHA, "size": 1, "serial": None,
               "signature": None}
    release.update(release_over)
    return frame(v=2, type="open_job", seq=1, job_id="j", execution=1, release=release)


@pytest.mark.parametrize("data, reason", [
    (b"\xff", "not UTF-8"),
    (b"{", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b"[" * 60000, "nested deeper"),
    (frame(v=1, type="ping", seq=1), "version 1"),
    (frame(v=True, type="ping", seq=1), "version True"),
    (frame(type="ping", seq=1), "version None"),
    (frame(v=2, type="exec", seq=1), "unknown message type"),
    (frame(v=2, type=["ping"], seq=1), "unknown message type"),
    (frame(v=2, type="ping"), "missing field"),
    (frame(v=2, type="ping", seq=1, cmd="sh"), "unexpected field"),
    (frame(v=2, type="ping", seq=True), "wrong type"),
    (frame(v=2, type="ping", seq=-1), "seq"),
    (b'{"v":2,"type":"ping","seq":' + b"9" * 5000 + b"}", "digits"),
    (b'{"v":2,"type":"ping","seq":1,"\\ud800":1}', "surrogate"),
    (b'{"v":2,"v":2,"type":"ping","seq":1}', "twice"),
    (run_hook(job_id="../../etc"), "job_id"),
    (run_hook(job_id="j\n"), "job_id"),
    (run_hook(hook="/bin/sh"), "hook must be"),
    (run_hook(round=1), "round must be 0"),
    (run_hook(execution=-1), "execution"),
    (run_hook(execution=2**63), "execution"),
    (open_job(version="1\n2"), "version"),
    (open_job(meta="\x00"), "NUL"),
    (open_job(force="true"), "force has the wrong type"),
    (open_job(sha256=SHA.upper()), "sha256"),
    (open_job(size=-1), "size"),
    (open_job(extra=1), "unexpected field"),
    (open_job(signature="AAAA", size=None), "needs sha256 and size"),
    (frame(v=2, type="open_job", seq=1, job_id="j", execution=1, release="x"), "release has the wrong type"),
    (b"{" + b" " * MAX_MESSAGE_BYTES + b"}", "exceed"),
])
def test_installer_refuses_each_malformed_frame_with_a_specific_reason(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        ip.REQUESTS.decode(data)


def test_a_reply_type_is_not_a_request():
    with pytest.raises(ProtocolError, match="unknown message type"):
        ip.REQUESTS.decode(REPLIES[1].encode())


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=1024))
def test_random_bytes_are_refused_with_protocolerror_only(data):
    for catalogue in (ip.REQUESTS, ip.REPLIES, fp.REQUESTS, fp.REPLIES):
        try:
            catalogue.decode(data)
        except ProtocolError:
            pass


VALUES = st.none() | st.booleans() | st.integers() | st.text(max_size=30) | st.lists(st.integers(), max_size=3) \
    | st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=5), max_size=3)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(sorted(ip.REQUESTS.types | fp.REQUESTS.types)),
       st.dictionaries(st.sampled_from(["seq", "job_id", "execution", "hook", "round", "release", "url", "v",
                                        "version", "meta", "x"]), VALUES, max_size=8))
def test_hostile_field_values_are_refused_or_decoded_into_checked_messages(kind, fields):
    data = json.dumps({"v": 2, "type": kind, **fields}).encode()
    for catalogue in (ip.REQUESTS, fp.REQUESTS):
        try:
            message = catalogue.decode(data)
        except ProtocolError:
            continue
        message.check()  # what decodes satisfies its own checks


# ----- the ROUTER server on a real socket ---------------------------------------

@pytest.fixture
def server(tmp_path):
    context = zmq.Context()
    handled = []

    def handle(message, peer):
        handled.append(message)
        return wire.Refused(seq=message.seq, code=wire.NOT_PERMITTED, reason="no") if message.seq == 99 \
            else ip.Pong(seq=message.seq, pid=os.getpid(), job_id=None, execution=None, phase=None)

    srv = wire.Server(context, tmp_path / "s.sock", ip.REQUESTS, handle, "test", memory_limit=64 * 1024**2)
    srv.bind()
    client = context.socket(zmq.DEALER)
    client.connect(srv.endpoint)
    yield srv, client, handled
    client.close(linger=0)
    srv.close()
    context.term()


def serve_until(srv, condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.sock.poll(50):
            srv.serve_ready()
        srv.guard_memory()  # what a server's main loop does on every iteration
        if condition():
            return True
    return False


def answer(client, timeout=5.0):
    assert client.poll(int(timeout * 1000)), "no answer"
    frames = client.recv_multipart()
    assert frames[0] == b"" and len(frames) == 2
    return ip.REPLIES.decode(frames[1])


def test_a_request_is_answered_and_garbage_refused_with_its_seq(server):
    srv, client, handled = server
    client.send_multipart([b"", Ping(seq=7).encode()])
    assert serve_until(srv, lambda: handled)
    assert answer(client).seq == 7
    client.send_multipart([b"", b'{"v":2,"type":"ping","seq":5,"x":1}'])
    serve_until(srv, lambda: False, timeout=0.3)
    refused = answer(client)
    assert isinstance(refused, Refused) and refused.code == wire.MALFORMED and refused.seq == 5
    client.send_multipart([b"", Ping(seq=99).encode()])
    serve_until(srv, lambda: len(handled) == 2)
    assert answer(client).code == wire.NOT_PERMITTED


def test_multi_frame_requests_are_refused_whole(server):
    srv, client, handled = server
    client.send_multipart([b"", Ping(seq=1).encode(), b"more"])
    client.send_multipart([Ping(seq=2).encode()])  # no delimiter: dropped without an answer
    serve_until(srv, lambda: False, timeout=0.5)
    assert handled == []
    refused = answer(client)
    assert refused.code == wire.MALFORMED and "exactly one frame" in refused.reason
    client.send_multipart([b"", Ping(seq=3).encode()])
    assert serve_until(srv, lambda: handled)
    assert answer(client).seq == 3


def test_an_oversized_frame_never_reaches_the_decoder(server):
    srv, client, handled = server
    client.send_multipart([b"", b"{" + b" " * (wire.SOCKET_MAXMSGSIZE + 10) + b"}"])
    serve_until(srv, lambda: False, timeout=0.5)
    assert handled == []
    fresh = srv._context.socket(zmq.DEALER)  # libzmq disconnected the sender; others are served
    fresh.connect(srv.endpoint)
    try:
        fresh.send_multipart([b"", Ping(seq=4).encode()])
        assert serve_until(srv, lambda: handled)
        assert answer(fresh).seq == 4
    finally:
        fresh.close(linger=0)


def test_an_endless_multi_frame_message_trips_the_memory_guard_and_the_server_serves_on(server):
    srv, client, handled = server
    chunk = b"x" * (wire.SOCKET_MAXMSGSIZE - 16)
    client.send(b"", zmq.SNDMORE)
    for _ in range(1500):  # ~96 MiB that libzmq buffers until a last frame that never comes
        client.send(chunk, zmq.SNDMORE)
    assert serve_until(srv, lambda: srv.rebinds > 0, timeout=30)
    client.close(linger=0)
    fresh = srv._context.socket(zmq.DEALER)
    fresh.connect(srv.endpoint)
    try:
        fresh.send_multipart([b"", Ping(seq=8).encode()])
        assert serve_until(srv, lambda: handled)
        assert answer(fresh).seq == 8
    finally:
        fresh.close(linger=0)
