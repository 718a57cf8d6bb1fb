import json

import pytest

from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import MAX_MESSAGE_BYTES, Ping, ProtocolError


def frame(**body):
    return json.dumps(body).encode()


def test_round_trip_of_every_request():
    for msg in (ip.RunHook(job_id="j", seq=1, hook="install", meta="m", force=False),
                ip.Stage(job_id="j", seq=2, version="1", sha256="a" * 64, size=1, signature=None),
                ip.QueryHook(job_id="j", seq=3, hook="version"), ip.Discard(job_id="j", seq=4), Ping(seq=5)):
        assert ip.REQUESTS.decode(msg.encode()) == msg
    fetch = fp.Fetch(job_id="j", seq=1, url="https://x/y", version="1", sha256=None, size=None, signature=None)
    assert fp.REQUESTS.decode(fetch.encode()) == fetch


@pytest.mark.parametrize("data, reason", [
    (b"\xff", "not UTF-8"),
    (b"{", "not JSON"),
    (b"[1]", "not a JSON object"),
    (frame(v=2, type="ping", seq=1), "version"),
    (frame(v=True, type="ping", seq=1), "version"),
    (frame(v=1, type="exec", seq=1), "unknown message type"),
    (frame(v=1, type="ping"), "missing field"),
    (frame(v=1, type="ping", seq=1, cmd="sh"), "unexpected field"),
    (frame(v=1, type="ping", seq=True), "wrong type"),
    (frame(v=1, type="run_hook", job_id="../../etc", seq=1, hook="install", meta="", force=False), "job_id"),
    (frame(v=1, type="run_hook", job_id="j", seq=1, hook="/bin/sh", meta="", force=False), "hook must be"),
    (frame(v=1, type="stage", job_id="j", seq=1, version="1\n", sha256=None, size=None, signature=None), "version"),
    (b"{" + b" " * MAX_MESSAGE_BYTES + b"}", "exceeds"),
])
def test_installer_refuses_each_malformed_frame_with_a_specific_reason(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        ip.REQUESTS.decode(data)


def test_a_reply_type_is_not_a_request():
    status = ip.Discarded(job_id="j", seq=1)
    with pytest.raises(ProtocolError, match="unknown message type"):
        ip.REQUESTS.decode(status.encode())
