"""The fetcher's download engine, in-process, against a real FileServer."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from upparat import verify
from upparat.config import VerificationConfig
from upparat.devtools.fileserver import FileServer
from upparat.fetcher_proc.download import Limits, clean_message
from upparat.fetcher_proc.fetcher import Fetcher
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc.wire import Ping, ProtocolError
from tests.support import poll_for

DATA = os.urandom(700 * 1024 + 123)  # several 64 KiB chunks, not a multiple of one
SHA = hashlib.sha256(DATA).hexdigest()
FAST = Limits(connect_timeout_s=2, read_timeout_s=2, backoff_s=0.02, backoff_max_s=0.1)
NO_KEYS = VerificationConfig(public_keys=(), require_signature=False, require_sha256=True)


@pytest.fixture
def server(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "fw.bin").write_bytes(DATA)
    fs = FileServer(bucket).start()
    try:
        yield fs
    finally:
        fs.stop()


@pytest.fixture
def download_dir(tmp_path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def fetcher(download_dir):
    made = []

    def make(keys=(), verification=NO_KEYS, limits=FAST):
        f = Fetcher(download_dir, list(keys), verification, limits)
        made.append(f)
        return f

    yield make
    for f in made:
        f.shutdown()


def fetch_msg(url, job_id="job-1", sha256=SHA, size=len(DATA), version="1.0.0", signature=None, seq=1):
    return fp.Fetch(job_id=job_id, seq=seq, url=url, version=version, sha256=sha256, size=size, signature=signature)


def wait_final(f: Fetcher, job_id="job-1", timeout=15.0) -> fp.FetchStatus:
    def finished():
        status = f.handle(fp.QueryFetch(job_id=job_id, seq=9))
        return status if status.state != fp.RUNNING else None

    return poll_for(finished, timeout, what=f"job {job_id} to finish")


def presigned(server, key="/fw.bin", **kw):
    return server.presign(f"https://bucket.s3.amazonaws.com{key}", **kw)


def test_happy_path_writes_verified_file_0640_and_no_part(fetcher, server, download_dir):
    f = fetcher()
    first = f.handle(fetch_msg(presigned(server)))
    assert first.state == fp.RUNNING and first.bytes_total == len(DATA)
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.DONE, None), status.message
    assert status.bytes_done == status.bytes_total == len(DATA)
    final = download_dir / "job-1"
    assert final.read_bytes() == DATA
    assert final.stat().st_mode & 0o777 == 0o640
    assert not (download_dir / "job-1.part").exists()
    assert server.requests == [("/fw.bin", None)]


def test_repeated_fetch_of_known_job_answers_status_without_downloading_again(fetcher, server):
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    wait_final(f)
    again = f.handle(fetch_msg(presigned(server), seq=2))
    assert again.state == fp.DONE and again.seq == 2
    assert len(server.requests) == 1


def test_sha256_mismatch_deletes_the_file_and_says_what_differed(fetcher, server, download_dir):
    f = fetcher()
    f.handle(fetch_msg(presigned(server), sha256="0" * 64))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "verification_failed")
    assert "sha256" in status.message and SHA in status.message
    assert list(download_dir.iterdir()) == []


def test_corrupted_body_fails_verification(fetcher, server, download_dir):
    server.faults.corrupt = True
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.failure == "verification_failed"
    assert list(download_dir.iterdir()) == []


def test_content_length_larger_than_size_is_file_too_large_before_reading(fetcher, server, download_dir):
    f = fetcher()
    f.handle(fetch_msg(presigned(server), size=1000))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "file_too_large")
    assert str(len(DATA)) in status.message and "1000" in status.message
    assert status.bytes_done == 0
    assert list(download_dir.iterdir()) == []


def test_body_without_length_is_stopped_at_size_plus_one(fetcher, server, download_dir):
    server.faults.chunked = True  # the size only shows while reading
    f = fetcher()
    f.handle(fetch_msg(presigned(server), size=100 * 1024))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "file_too_large")
    assert status.bytes_done <= 100 * 1024
    assert list(download_dir.iterdir()) == []


def test_truncated_body_is_resumed_with_a_range_request(fetcher, server, download_dir):
    server.faults.truncate_after = 200_000
    server.faults.times = 1
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert (download_dir / "job-1").read_bytes() == DATA
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    resumed_at = int(server.requests[1][1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 200_000


def test_existing_part_is_resumed_and_hashed_whole(fetcher, server, download_dir):
    (download_dir / "job-1.part").write_bytes(DATA[:300_000])
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert server.requests == [("/fw.bin", "bytes=300000-")]
    assert (download_dir / "job-1").read_bytes() == DATA


def test_complete_part_answered_416_is_verified_not_downloaded(fetcher, server, download_dir):
    (download_dir / "job-1.part").write_bytes(DATA)
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert server.requests == [("/fw.bin", f"bytes={len(DATA)}-")]


def test_200_answer_to_a_range_request_restarts_from_zero(fetcher, server, download_dir):
    # A foreign .part: if the 200 body were appended, the hash would not match.
    (download_dir / "job-1.part").write_bytes(b"x" * 100_000)
    server.faults.ignore_range = True
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert server.requests == [("/fw.bin", "bytes=100000-")]
    assert (download_dir / "job-1").read_bytes() == DATA


def test_206_that_does_not_start_at_the_part_end_is_not_appended(fetcher, server, download_dir):
    (download_dir / "job-1.part").write_bytes(b"x" * 100_000)
    server.faults.range_from_zero = True
    server.faults.times = 1
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert server.requests == [("/fw.bin", "bytes=100000-"), ("/fw.bin", None)]
    assert (download_dir / "job-1").read_bytes() == DATA


def test_403_is_url_expired_keeps_part_and_a_new_fetch_resumes(fetcher, server, download_dir):
    (download_dir / "job-1.part").write_bytes(DATA[:50_000])
    f = fetcher()
    f.handle(fetch_msg(presigned(server, expires_in=-10)))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "url_expired")
    assert "Request has expired" in status.message
    assert (download_dir / "job-1.part").stat().st_size == 50_000

    f.handle(fetch_msg(presigned(server), seq=2))  # a fresh URL: starts again, resuming
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert server.requests[-1] == ("/fw.bin", "bytes=50000-")


def test_404_fails_download_failed_with_the_status(fetcher, server):
    f = fetcher()
    f.handle(fetch_msg(presigned(server, key="/missing.bin")))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "404" in status.message and "NoSuchKey" in status.message
    assert "X-Amz-Signature" not in status.message  # the URL's credential stays out of reports
    assert len(server.requests) == 1


def test_5xx_is_retried_then_succeeds(fetcher, server):
    server.faults.fail_status = 503
    server.faults.times = 2
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    assert wait_final(f).state == fp.DONE
    assert len(server.requests) == 3


def test_persistent_5xx_gives_up_after_bounded_attempts(fetcher, server):
    server.faults.fail_status = 500
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "gave up after 5 attempts" in status.message and "500" in status.message
    assert len(server.requests) == 5


def test_unreachable_server_fails_download_failed(fetcher, download_dir):
    from tests.support import free_port

    f = fetcher()
    f.handle(fetch_msg(f"http://127.0.0.1:{free_port()}/fw.bin"))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")


def test_cancel_stops_promptly_between_chunks_and_deletes_files(fetcher, server, download_dir):
    server.faults.chunk_delay_s = 0.2  # about 2.4 s for the whole file
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    poll_for(lambda: f.handle(fp.QueryFetch(job_id="job-1", seq=1)).bytes_done > 0, 5, what="first bytes")
    assert f.handle(Ping(seq=1)).busy_job_id == "job-1"
    started = time.monotonic()
    status = f.handle(fp.CancelFetch(job_id="job-1", seq=2))
    assert status.state == fp.CANCELLED
    assert f.busy_job_id() is None
    assert time.monotonic() - started < 1.0
    assert f.handle(Ping(seq=1)).busy_job_id is None
    assert list(download_dir.iterdir()) == []
    assert f.handle(fp.QueryFetch(job_id="job-1", seq=3)).state == fp.CANCELLED


def test_cancel_of_a_finished_job_deletes_its_file(fetcher, server, download_dir):
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    wait_final(f)
    assert f.handle(fp.CancelFetch(job_id="job-1", seq=2)).state == fp.CANCELLED
    assert list(download_dir.iterdir()) == []


def test_fetch_for_another_job_while_busy_is_refused(fetcher, server):
    server.faults.chunk_delay_s = 0.2
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    with pytest.raises(ProtocolError, match="busy with job job-1"):
        f.handle(fetch_msg(presigned(server), job_id="job-2"))
    assert f.handle(fp.QueryFetch(job_id="job-2", seq=1)).state == fp.UNKNOWN


def test_query_of_unknown_job_is_unknown(fetcher):
    status = fetcher().handle(fp.QueryFetch(job_id="nope", seq=4))
    assert (status.state, status.seq, status.bytes_done) == (fp.UNKNOWN, 4, 0)


def test_missing_sha256_refused_when_required_with_how_to_allow(fetcher, server, download_dir):
    f = fetcher()
    status = f.handle(fetch_msg(presigned(server), sha256=None))
    assert (status.state, status.failure) == (fp.FAILED, "verification_failed")
    assert "require_sha256 = false" in status.message
    assert server.requests == []


def test_missing_sha256_allowed_when_not_required(fetcher, server, download_dir):
    f = fetcher(verification=VerificationConfig(public_keys=(), require_signature=False, require_sha256=False))
    f.handle(fetch_msg(presigned(server), sha256=None, size=None))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert status.bytes_total == len(DATA)  # learnt from Content-Length


def _keypair():
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, verify.load_public_key(pem)


SIGNED = VerificationConfig(public_keys=(Path("/unused.pem"),), require_signature=True, require_sha256=True)


def test_good_signature_is_accepted(fetcher, server, download_dir):
    private, public = _keypair()
    f = fetcher(keys=[public], verification=SIGNED)
    f.handle(fetch_msg(presigned(server), signature=verify.sign(private, "1.0.0", SHA, len(DATA))))
    status = wait_final(f)
    assert status.state == fp.DONE, status.message


def test_signature_from_another_key_or_version_fails(fetcher, server, download_dir):
    private, public = _keypair()
    other, _ = _keypair()
    f = fetcher(keys=[public], verification=SIGNED)
    f.handle(fetch_msg(presigned(server), signature=verify.sign(other, "1.0.0", SHA, len(DATA))))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "verification_failed")
    assert "signature" in status.message
    # Signed for another version: also refused.
    f.handle(fetch_msg(presigned(server), job_id="job-2", signature=verify.sign(private, "9.9.9", SHA, len(DATA))))
    assert wait_final(f, "job-2").failure == "verification_failed"
    assert list(download_dir.iterdir()) == []


def test_missing_signature_fails_when_required(fetcher, server):
    _, public = _keypair()
    f = fetcher(keys=[public], verification=SIGNED)
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert status.failure == "verification_failed" and "require_signature" in status.message


def test_earlier_finished_file_is_reverified_not_downloaded(fetcher, server, download_dir):
    (download_dir / "job-1").write_bytes(DATA)
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    assert wait_final(f).state == fp.DONE
    assert server.requests == []


def test_insufficient_disk_space_before_starting(fetcher, server, download_dir):
    free = os.statvfs(download_dir).f_bavail * os.statvfs(download_dir).f_frsize
    f = fetcher(verification=VerificationConfig(public_keys=(), require_signature=False, require_sha256=True))
    f.handle(fetch_msg(presigned(server), size=free * 2))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "insufficient_disk_space")
    assert server.requests == []


def test_messages_have_no_control_characters_and_are_bounded():
    text = clean_message("line1\nline2\x1b[31m" + "x" * 5000)
    assert len(text) <= 1024
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text)


def test_own_dir_creates_with_mode_and_refuses_a_foreign_or_open_one(tmp_path):
    from upparat.fetcher_proc.__main__ import own_dir

    created = tmp_path / "fetcher"
    assert own_dir(created, 0o700) is None
    assert created.stat().st_mode & 0o777 == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert "writable by other users" in own_dir(open_dir, 0o750)
    assert "cannot create" in own_dir(tmp_path / "missing" / "child", 0o750)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 12345, 12345)
        assert "owned by uid 12345" in own_dir(foreign, 0o750)


def test_disk_full_while_writing_is_insufficient_disk_space(fetcher, server, download_dir, monkeypatch):
    real_write = os.write

    def write(fd, data):  # the disk fills up once the .part holds 128 KiB
        if os.readlink(f"/proc/self/fd/{fd}").endswith("job-1.part") and os.fstat(fd).st_size >= 128 * 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    f = fetcher()
    f.handle(fetch_msg(presigned(server)))
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "insufficient_disk_space")
    assert "free space" in status.message
    assert list(download_dir.iterdir()) == []  # the .part is deleted to give the space back
