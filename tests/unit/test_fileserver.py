"""The S3 stand-in answers like S3 where the fetcher depends on it."""

from __future__ import annotations

import http.client
import os
from datetime import datetime, timedelta, timezone

import pytest
import requests

from tests.support import poll_for
from upparat.devtools.fileserver import FileServer

DATA = bytes(range(256)) * 1000  # 256000 bytes


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "bucket"
    (root / "fw").mkdir(parents=True)
    (root / "fw" / "image.bin").write_bytes(DATA)
    (tmp_path / "secret.txt").write_text("outside")
    fs = FileServer(root).start()
    try:
        yield fs
    finally:
        fs.stop()


def url(fs, key="/fw/image.bin", **kw):
    return fs.presign(f"https://bucket.s3.amazonaws.com{key}", **kw)


def test_presign_maps_any_host_to_local_base_url(served):
    signed = url(served)
    assert signed.startswith(served.base_url + "/fw/image.bin?X-Amz-Expires=3600&X-Amz-Date=")
    assert "X-Amz-Signature=" in signed
    assert served.base_url.startswith("http://127.0.0.1:")


def test_get_serves_the_whole_file_with_content_length(served):
    resp = requests.get(url(served), timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Length"] == str(len(DATA))
    assert resp.content == DATA
    assert served.requests == [("/fw/image.bin", None)]


def test_head_gives_headers_without_body(served):
    resp = requests.head(url(served), timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Length"] == str(len(DATA))
    assert resp.content == b""


def test_open_range_answers_206_with_content_range(served):
    resp = requests.get(url(served), headers={"Range": "bytes=1000-"}, timeout=5)
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-{len(DATA) - 1}/{len(DATA)}"
    assert resp.headers["Content-Length"] == str(len(DATA) - 1000)
    assert resp.content == DATA[1000:]
    assert served.requests[-1] == ("/fw/image.bin", "bytes=1000-")


def test_range_past_the_end_is_416_invalid_range(served):
    resp = requests.get(url(served), headers={"Range": f"bytes={len(DATA)}-"}, timeout=5)
    assert resp.status_code == 416
    assert "<Code>InvalidRange</Code>" in resp.text
    assert resp.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert resp.headers["Content-Length"] == str(len(resp.content))


def test_expired_url_is_403_request_has_expired(served):
    old = datetime.now(timezone.utc) - timedelta(hours=2)
    resp = requests.get(url(served, expires_in=3600, now=old), timeout=5)
    assert resp.status_code == 403
    assert "<Code>AccessDenied</Code><Message>Request has expired</Message>" in resp.text


def test_tampered_signature_or_path_is_403(served):
    signed = url(served)
    assert requests.get(signed.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=5).status_code == 403
    # A signature is only good for its own key.
    other = signed.replace("/fw/image.bin", "/fw/other.bin")
    resp = requests.get(other, timeout=5)
    assert resp.status_code == 403
    assert "SignatureDoesNotMatch" in resp.text
    assert requests.get(served.base_url + "/fw/image.bin", timeout=5).status_code == 403


def test_missing_key_is_404(served):
    resp = requests.get(url(served, key="/fw/nothing.bin"), timeout=5)
    assert resp.status_code == 404
    assert "<Code>NoSuchKey</Code>" in resp.text


@pytest.mark.parametrize("key", ["/fw/../../secret.txt", "/%2e%2e/secret.txt", "/fw/%2E%2E/%2e%2e/secret.txt"])
def test_never_serves_outside_the_directory(served, key):
    # http.client sends the path as given (requests would normalise the dots away).
    signed = url(served, key=key)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    try:
        conn.request("GET", signed[len(served.base_url):])
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert served.requests[-1][0] == key
    assert resp.status == 404
    assert b"outside" not in body
    assert served.resolve(key) is None


def test_symlink_leading_out_is_not_followed(served, tmp_path):
    os.symlink(tmp_path / "secret.txt", served.directory / "fw" / "link.bin")
    resp = requests.get(url(served, key="/fw/link.bin"), timeout=5)
    assert resp.status_code == 404


def test_fault_ignore_range_answers_200_full_body(served):
    served.faults.ignore_range = True
    resp = requests.get(url(served), headers={"Range": "bytes=1000-"}, timeout=5)
    assert resp.status_code == 200
    assert resp.content == DATA


def test_fault_truncate_after_drops_the_connection(served):
    served.faults.truncate_after = 5000
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url(served), timeout=5).content  # noqa: B018 - reading is the point


def test_fault_times_limits_how_many_requests_misbehave(served):
    served.faults.fail_status = 503
    served.faults.times = 1
    first = requests.get(url(served), timeout=5)
    second = requests.get(url(served), timeout=5)
    assert first.status_code == 503 and "<Code>SlowDown</Code>" in first.text
    assert second.status_code == 200 and second.content == DATA


def test_fault_corrupt_flips_a_byte(served):
    served.faults.corrupt = True
    body = requests.get(url(served), timeout=5).content
    assert len(body) == len(DATA)
    assert body != DATA
    assert body[1:] == DATA[1:]


def test_fault_chunked_hides_the_length(served):
    served.faults.chunked = True
    resp = requests.get(url(served), timeout=5)
    assert "Content-Length" not in resp.headers
    assert resp.content == DATA


def test_fault_range_from_zero_sends_a_206_for_the_wrong_range(served):
    served.faults.range_from_zero = True
    resp = requests.get(url(served), headers={"Range": "bytes=1000-"}, timeout=5)
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes 0-{len(DATA) - 1}/{len(DATA)}"
    assert resp.content == DATA


def test_fault_chunk_delay_slows_the_body(served):
    import time

    served.faults.chunk_delay_s = 0.05
    started = time.monotonic()
    assert requests.get(url(served), timeout=5).content == DATA
    assert time.monotonic() - started >= 0.05 * (len(DATA) // (64 * 1024))


def test_log_records_if_range_status_and_bytes_sent(served):
    requests.get(url(served), timeout=5)
    requests.get(url(served), headers={"Range": "bytes=1000-", "If-Range": '"nope"'}, timeout=5)
    # The server counts a chunk once sendfile returns, which may be after the client read it all.
    poll_for(lambda: served.bytes_sent == 2 * len(DATA), 5, what="the server's count of bytes sent")
    first, second = served.log
    assert (first.range, first.if_range, first.status, first.bytes_sent) == (None, None, 200, len(DATA))
    assert (second.range, second.if_range) == ("bytes=1000-", '"nope"')


def test_if_range_with_the_current_etag_gets_the_range(served):
    etag = requests.head(url(served), timeout=5).headers["ETag"]
    resp = requests.get(url(served), headers={"Range": "bytes=1000-", "If-Range": etag}, timeout=5)
    assert resp.status_code == 206 and resp.content == DATA[1000:]


def test_if_range_with_another_etag_gets_the_whole_object(served):
    resp = requests.get(url(served), headers={"Range": "bytes=1000-", "If-Range": '"old"'}, timeout=5)
    assert resp.status_code == 200 and resp.content == DATA
    # counted once sendfile returns, which may be after the client read it all
    poll_for(lambda: served.log[-1].bytes_sent == len(DATA), 5, what="the whole object counted as sent")


def test_fault_new_etag_changes_the_etag_on_every_answer(served):
    served.faults.new_etag = True
    first = requests.head(url(served), timeout=5).headers["ETag"]  # HEAD takes no faults
    resp = requests.get(url(served), headers={"Range": "bytes=1000-", "If-Range": first}, timeout=5)
    assert resp.status_code == 200 and resp.content == DATA
    again = requests.get(url(served), timeout=5).headers["ETag"]
    assert len({first, resp.headers["ETag"], again}) == 3


def test_fault_stall_sends_nothing_for_a_while_mid_body(served):
    import time

    served.faults.stall_after = 100_000
    served.faults.stall_s = 1.0
    with requests.get(url(served), stream=True, timeout=5) as resp:
        got = resp.raw.read(100_000)
        started = time.monotonic()
        rest = resp.raw.read()
        waited = time.monotonic() - started
    assert got + rest == DATA
    assert waited >= 0.9


def test_fault_stall_longer_than_the_client_waits_times_the_client_out(served):
    served.faults.stall_after = 1000
    served.faults.stall_s = 30
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url(served), timeout=(5, 0.5)).content  # noqa: B018 - reading is the point
    poll_for(lambda: served.log[-1].bytes_sent == 1000, 5, what="1000 bytes counted as sent")


def test_fault_rate_paces_the_body(served):
    import time

    served.faults.rate = 512 * 1024
    started = time.monotonic()
    assert requests.get(url(served), timeout=5).content == DATA
    assert time.monotonic() - started >= 0.8 * len(DATA) / (512 * 1024)


def test_fault_truncate_after_records_what_was_sent(served):
    served.faults.truncate_after = 5000
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url(served), timeout=5).content  # noqa: B018
    poll_for(lambda: served.log[-1].bytes_sent == 5000, 5, what="5000 bytes counted as sent")


def test_stop_ends_a_stall_at_once(tmp_path):
    import time

    (tmp_path / "f").write_bytes(DATA)
    fs = FileServer(tmp_path).start()
    fs.faults.stall_after = 10
    fs.faults.stall_s = 60
    with requests.get(fs.presign("https://b/f"), stream=True, timeout=5) as resp:
        assert resp.raw.read(10) == DATA[:10]
        started = time.monotonic()
        fs.stop()
        assert resp.raw.read() == DATA[10:]  # would time out after 5 s if the stall went on
    assert time.monotonic() - started < 3


def test_plan_gives_each_next_request_its_own_faults(served):
    from upparat.devtools.fileserver import Faults

    served.plan = [Faults(fail_status=503), Faults(ignore_range=True)]
    assert requests.get(url(served), timeout=5).status_code == 503
    assert requests.get(url(served), headers={"Range": "bytes=10-"}, timeout=5).status_code == 200
    assert requests.get(url(served), headers={"Range": "bytes=10-"}, timeout=5).status_code == 206
    assert served.plan == []
