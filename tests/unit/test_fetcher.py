"""The fetcher's answers and download engine, in this process, against a real
local FileServer (faults switched on per test) and a temporary directory."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from upparat import verify
from upparat.devtools.fileserver import Faults, FileServer
from upparat.fetcher_proc import download as download_mod, resume
from upparat.fetcher_proc.download import Limits, clean_message
from upparat.fetcher_proc.fetcher import Fetcher
from upparat.ipc import fetcher_protocol as fp, handoff, wire
from upparat.release import Release
from tests.support import free_port, poll_for

DATA = os.urandom(700 * 1024 + 123)  # several reads, not a multiple of any
SHA = hashlib.sha256(DATA).hexdigest()
FAST = Limits(max_file_size=2**40, download_timeout=60, low_speed_limit=1, low_speed_time=5, rate_limit=0,
              connect_timeout=2, backoff_s=0.02, backoff_max_s=0.1)
UNSIGNED = verify.Policy(allow_unsigned=True)
PART = handoff.part_name("job-1", 1)
FINAL = handoff.final_name("job-1", 1)
RECORD = resume.record_name("job-1", 1)


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
def dirs(tmp_path) -> tuple[Path, Path]:
    download_dir, state_dir = tmp_path / "downloads", tmp_path / "state"
    download_dir.mkdir()
    state_dir.mkdir()
    return download_dir, state_dir


@pytest.fixture
def fetcher(dirs):
    made = []

    def make(policy=UNSIGNED, **limits) -> Fetcher:
        f = Fetcher(dirs[0], dirs[1], policy, Limits(**(FAST.__dict__ | limits)))
        made.append(f)
        return f

    yield make
    for f in made:
        f.shutdown()


def release(sha256=SHA, size=len(DATA), version="1.0.0", **kw) -> Release:
    return Release(version=version, sha256=sha256, size=size, **kw)


def fetch(url, job_id="job-1", execution=1, seq=1, **kw) -> fp.Fetch:
    return fp.Fetch(seq=seq, job_id=job_id, execution=execution, url=url, release=release(**kw))


def query(f: Fetcher, job_id="job-1", execution=1) -> fp.FetchStatus:
    f.settle()
    return f.handle(fp.QueryFetch(seq=9, job_id=job_id, execution=execution), b"peer")


def wait_final(f: Fetcher, job_id="job-1", execution=1, timeout=15.0) -> fp.FetchStatus:
    def finished():
        status = query(f, job_id, execution)
        return status if status.state != fp.RUNNING else None

    return poll_for(finished, timeout, what=f"job {job_id} to finish")


def url_of(server, key="/fw.bin", **kw):
    return server.presign(f"https://bucket.s3.amazonaws.com{key}", **kw)


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# -- the normal case -------------------------------------------------------------------

def test_verified_file_is_renamed_0600_with_no_part_and_no_record_left(fetcher, server, dirs):
    f = fetcher()
    first = f.handle(fetch(url_of(server)), b"peer")
    assert (first.state, first.bytes_total, first.seq) == (fp.RUNNING, len(DATA), 1)
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.DONE, None), status.message
    assert status.bytes_done == status.bytes_total == len(DATA)
    final = dirs[0] / FINAL
    assert final.read_bytes() == DATA
    assert final.stat().st_mode & 0o777 == 0o600
    assert listing(dirs[0]) == [FINAL] and listing(dirs[1]) == []
    assert server.requests == [("/fw.bin", None)]


def test_repeated_fetch_of_a_known_download_answers_its_status_without_downloading_again(fetcher, server):
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    wait_final(f)
    again = f.handle(fetch(url_of(server), seq=2), b"peer")
    assert (again.state, again.seq) == (fp.DONE, 2)
    assert len(server.requests) == 1


def test_fetch_of_a_known_download_with_another_release_is_refused(fetcher, server):
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    with pytest.raises(wire.Refusal) as refused:
        f.handle(fetch(url_of(server), version="2.0.0"), b"peer")
    assert refused.value.code == wire.NOT_PERMITTED


def test_a_new_execution_is_a_new_download(fetcher, server, dirs):
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    wait_final(f)
    f.handle(fetch(url_of(server), execution=2), b"peer")
    assert wait_final(f, execution=2).state == fp.DONE
    assert (dirs[0] / handoff.final_name("job-1", 2)).read_bytes() == DATA


def test_state_changes_are_pushed_at_once_and_progress_at_most_once_per_interval(fetcher, server):
    server.faults.rate = 400 * 1024  # about 1.8 s
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    pushes: list[tuple[float, fp.FetchStatus]] = []

    def collect():
        now = time.monotonic()
        pushes.extend((now, message) for peer, message in f.outgoing(now))
        return pushes and pushes[-1][1].state == fp.DONE

    poll_for(collect, 15, interval=0.01, what="done pushed")
    assert all(peer_message.seq == 0 for _, peer_message in pushes)
    running = [(t, m) for t, m in pushes if m.state == fp.RUNNING]
    assert len(running) >= 1 and all(m.bytes_done > 0 for _, m in running)
    gaps = [b[0] - a[0] for a, b in zip(running, running[1:])]
    assert all(gap >= fp.PROGRESS_PUSH_S * 0.99 for gap in gaps), gaps
    assert pushes[-1][1].bytes_done == len(DATA)
    assert f.outgoing(time.monotonic()) == []  # nothing new: nothing sent


# -- checks of the bytes ------------------------------------------------------------------

def test_sha256_mismatch_is_verification_failed_names_both_and_deletes_everything(fetcher, server, dirs):
    f = fetcher()
    f.handle(fetch(url_of(server), sha256="0" * 64), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "verification_failed")
    assert SHA in status.message and "0" * 64 in status.message
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []


def test_a_corrupted_body_fails_verification(fetcher, server, dirs):
    server.faults.corrupt = True
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).failure == "verification_failed"
    assert listing(dirs[0]) == []


def test_content_length_above_the_size_is_file_too_large_before_any_byte(fetcher, server, dirs):
    f = fetcher()
    f.handle(fetch(url_of(server), size=1000), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "file_too_large")
    assert str(len(DATA)) in status.message and "1000" in status.message
    assert status.bytes_done == 0
    assert listing(dirs[0]) == []


def test_a_server_with_fewer_bytes_than_the_size_fails_before_any_byte(fetcher, server, dirs):
    f = fetcher()
    f.handle(fetch(url_of(server), size=len(DATA) + 1), b"peer")
    status = wait_final(f)
    assert (status.failure, status.bytes_done) == ("verification_failed", 0)
    assert listing(dirs[0]) == []


def test_a_body_without_length_longer_than_the_size_is_stopped(fetcher, server, dirs):
    server.faults.chunked = True
    f = fetcher()
    f.handle(fetch(url_of(server), size=100 * 1024), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "file_too_large")
    assert status.bytes_done <= 100 * 1024
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []


def test_a_size_above_max_file_size_is_file_too_large_without_a_request(fetcher, server, dirs):
    f = fetcher(max_file_size=1000)
    status = f.handle(fetch(url_of(server)), b"peer")
    assert (status.state, status.failure) == (fp.FAILED, "file_too_large")
    assert "max_file_size" in status.message and str(len(DATA)) in status.message
    assert server.requests == [] and listing(dirs[0]) == []


def test_no_size_and_no_content_length_is_stopped_at_max_file_size(fetcher, server, dirs):
    server.faults.chunked = True
    f = fetcher(max_file_size=256 * 1024)
    f.handle(fetch(url_of(server), size=None), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "file_too_large")
    assert "max_file_size" in status.message
    assert status.bytes_done <= 256 * 1024
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []


def test_no_size_and_a_content_length_above_max_file_size_fails_before_any_byte(fetcher, server, dirs):
    f = fetcher(max_file_size=1000)
    f.handle(fetch(url_of(server), size=None), b"peer")
    status = wait_final(f)
    assert (status.failure, status.bytes_done) == ("file_too_large", 0)
    assert listing(dirs[0]) == []


def test_no_size_takes_the_total_from_content_length(fetcher, server):
    f = fetcher()
    f.handle(fetch(url_of(server), size=None), b"peer")
    status = wait_final(f)
    assert status.state == fp.DONE and status.bytes_total == len(DATA)


# -- resuming within one run ------------------------------------------------------------------

def test_a_truncated_body_is_resumed_with_range_and_if_range(fetcher, server, dirs):
    server.plan = [Faults(truncate_after=200_000)]
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert (dirs[0] / FINAL).read_bytes() == DATA
    first, second = server.log
    assert first.range is None and second.range == "bytes=200000-"
    assert second.if_range is not None and second.status == 206
    assert server.bytes_sent == len(DATA)


def test_a_200_answer_to_a_range_request_restarts_from_zero(fetcher, server, dirs):
    server.plan = [Faults(truncate_after=300_000), Faults(ignore_range=True)]
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert [s.status for s in server.log] == [200, 200]
    assert server.log[1].range == "bytes=300000-"
    assert (dirs[0] / FINAL).read_bytes() == DATA  # appended, the file would be 300000 bytes too long


def test_a_206_that_does_not_continue_at_the_partial_end_is_not_appended(fetcher, server, dirs):
    server.plan = [Faults(truncate_after=100_000), Faults(range_from_zero=True)]
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert [s.range for s in server.log] == [None, "bytes=100000-", None]
    assert (dirs[0] / FINAL).read_bytes() == DATA


def test_an_object_whose_etag_changed_is_downloaded_again_from_zero(fetcher, server, dirs):
    server.plan = [Faults(truncate_after=300_000), Faults(new_etag=True)]
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    first, second = server.log
    assert second.range == "bytes=300000-" and second.if_range is not None
    assert (second.status, second.bytes_sent) == (200, len(DATA))
    assert (dirs[0] / FINAL).read_bytes() == DATA


def test_403_is_url_expired_keeps_the_part_and_a_fresh_url_resumes(fetcher, server, dirs):
    server.plan = [Faults(truncate_after=50_000), Faults(fail_status=403)]
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "url_expired")
    assert "fresh URL" in status.message and "AccessDenied" in status.message
    assert (dirs[0] / PART).stat().st_size == 50_000
    assert resume.load(dirs[1], "job-1", 1).offset == 50_000

    fresh = url_of(server)
    assert f.handle(fetch(fresh, seq=2), b"peer").state == fp.RUNNING
    assert wait_final(f).state == fp.DONE
    assert server.log[-1].range == "bytes=50000-" and server.log[-1].status == 206


def test_an_expired_presigned_url_is_url_expired(fetcher, server):
    f = fetcher()
    f.handle(fetch(url_of(server, expires_in=-10)), b"peer")
    status = wait_final(f)
    assert status.failure == "url_expired" and "Request has expired" in status.message


def test_404_is_download_failed_with_the_status_and_without_the_url_credential(fetcher, server):
    f = fetcher()
    f.handle(fetch(url_of(server, key="/missing.bin")), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "404" in status.message and "NoSuchKey" in status.message and "/missing.bin" in status.message
    assert "X-Amz-Signature" not in status.message
    assert len(server.requests) == 1


def test_5xx_is_retried_then_succeeds(fetcher, server):
    server.faults.fail_status = 503
    server.faults.times = 2
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert len(server.requests) == 3


def test_persistent_5xx_gives_up_after_a_bounded_number_of_attempts(fetcher, server, dirs):
    server.faults.fail_status = 500
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "gave up after 5 attempts" in status.message and "500" in status.message
    assert len(server.requests) == 5


def test_an_unreachable_server_is_download_failed(fetcher):
    f = fetcher()
    f.handle(fetch(f"http://127.0.0.1:{free_port()}/fw.bin"), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "cannot reach" in status.message


# -- time: stalls, slow links, the deadline, the rate limit -----------------------------------------

def test_a_stall_mid_body_is_aborted_within_the_low_speed_time_and_resumed(fetcher, server, dirs):
    server.plan = [Faults(stall_after=300_000, stall_s=60)]
    f = fetcher(low_speed_time=1)
    started = time.monotonic()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f, timeout=20)
    took = time.monotonic() - started
    assert status.state == fp.DONE, status.message
    assert took < 1 + 2.5, f"took {took:.1f}s; the stall is 60 s"
    assert [s.range for s in server.log] == [None, "bytes=300000-"]
    assert (dirs[0] / FINAL).read_bytes() == DATA


def test_a_trickle_below_the_low_speed_limit_counts_as_a_stall(fetcher, server):
    server.faults.rate = 20 * 1024
    f = fetcher(low_speed_limit=100 * 1024, low_speed_time=1, max_failures_in_a_row=2, max_attempts=2)
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f, timeout=20)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "stalled" in status.message and "low_speed_limit" in status.message
    assert len(server.requests) == 2


def test_a_slow_link_above_the_limit_is_not_a_stall(fetcher, server):
    server.faults.rate = 512 * 1024  # about 1.4 s, longer than the low-speed window
    f = fetcher(low_speed_limit=64 * 1024, low_speed_time=0.5)
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert len(server.requests) == 1


def test_the_overall_deadline_is_download_failed_naming_download_timeout(fetcher, server, dirs):
    server.faults.rate = 100 * 1024  # 7 s for the whole file
    f = fetcher(download_timeout=1.0)
    started = time.monotonic()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert time.monotonic() - started < 3
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "download_timeout = 1 s" in status.message
    assert (dirs[0] / PART).exists()  # kept for resuming: a fetch again continues


def test_the_deadline_also_ends_a_stall_before_any_answer(fetcher, server):
    server.faults.delay_s = 30  # accepts, then says nothing
    f = fetcher(download_timeout=1.0, low_speed_time=20)
    started = time.monotonic()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f, timeout=40)
    assert status.failure == "download_failed" and "download_timeout" in status.message
    assert time.monotonic() - started < 3


def test_download_rate_limit_paces_the_download(fetcher, server):
    f = fetcher(rate_limit=1024 * 1024)
    started = time.monotonic()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert time.monotonic() - started >= 0.8 * len(DATA) / (1024 * 1024)


# -- cancel, busy, unknown --------------------------------------------------------------------------

def test_cancel_ends_even_a_stalled_read_at_once_and_deletes_everything(fetcher, server, dirs):
    server.faults.stall_after = 200_000
    server.faults.stall_s = 60
    f = fetcher(low_speed_time=30)
    f.handle(fetch(url_of(server)), b"peer")
    poll_for(lambda: query(f).bytes_done >= 200_000, 5, what="the first bytes")
    assert f.handle(wire.Ping(seq=1), b"peer").job_id == "job-1"
    started = time.monotonic()
    assert f.handle(fp.CancelFetch(seq=7, job_id="job-1", execution=1), b"broker") is None  # answered later

    def answered():
        return [(peer, m) for peer, m in f.outgoing(time.monotonic()) if m.seq == 7]

    ((peer, reply),) = poll_for(answered, 5, what="the cancel's answer")
    assert time.monotonic() - started < 1.0
    assert (peer, reply.state) == (b"broker", fp.CANCELLED)
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []
    assert f.handle(wire.Ping(seq=2), b"peer").job_id is None
    assert query(f).state == fp.CANCELLED


def test_cancel_of_a_finished_download_deletes_its_file(fetcher, server, dirs):
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    wait_final(f)
    assert f.handle(fp.CancelFetch(seq=2, job_id="job-1", execution=1), b"peer").state == fp.CANCELLED
    assert listing(dirs[0]) == []


def test_cancel_of_an_unknown_download_deletes_what_an_earlier_run_left(fetcher, dirs):
    (dirs[0] / PART).write_bytes(b"x")
    (dirs[1] / RECORD).write_bytes(b"{}")
    status = fetcher().handle(fp.CancelFetch(seq=3, job_id="job-1", execution=1), b"peer")
    assert (status.state, status.seq) == (fp.CANCELLED, 3)
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []


def test_a_fetch_after_a_cancel_starts_again(fetcher, server):
    f = fetcher()
    f.handle(fp.CancelFetch(seq=1, job_id="job-1", execution=1), b"peer")
    assert f.handle(fetch(url_of(server)), b"peer").state == fp.RUNNING
    assert wait_final(f).state == fp.DONE


def test_fetch_for_another_download_while_one_runs_is_refused_busy(fetcher, server):
    server.faults.rate = 200 * 1024
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    with pytest.raises(wire.Refusal) as refused:
        f.handle(fetch(url_of(server), job_id="job-2"), b"peer")
    assert refused.value.code == wire.BUSY and "job-1" in str(refused.value)
    assert query(f, "job-2").state == fp.UNKNOWN


def test_query_of_an_unknown_download_is_unknown(fetcher):
    status = query(fetcher(), "nope", 3)
    assert (status.state, status.execution, status.bytes_done) == (fp.UNKNOWN, 3, 0)


def test_a_new_url_for_a_running_download_is_used_from_the_next_attempt(fetcher, server):
    server.plan = [Faults(stall_after=100_000, stall_s=60)]
    f = fetcher(low_speed_time=1)
    f.handle(fetch(url_of(server)), b"peer")
    poll_for(lambda: query(f).bytes_done >= 100_000, 5, what="the first bytes")
    fresh = url_of(server, expires_in=7200)
    assert f.handle(fetch(fresh, seq=2), b"peer").state == fp.RUNNING
    assert wait_final(f).state == fp.DONE
    first, second = server.log
    assert "X-Amz-Expires=3600" in first.query and "X-Amz-Expires=7200" in second.query
    assert second.range == "bytes=100000-"


# -- the release itself -----------------------------------------------------------------------------

def test_no_sha256_while_required_is_invalid_job_document_without_a_request(fetcher, server):
    f = fetcher(policy=verify.Policy(allow_unsigned=True, require_sha256=True))
    status = f.handle(fetch(url_of(server), sha256=None), b"peer")
    assert (status.state, status.failure) == (fp.FAILED, "invalid_job_document")
    assert "require_sha256" in status.message
    assert server.requests == []


def test_the_fetcher_leaves_signatures_to_the_installer_and_checks_the_sha256(fetcher, server):
    """The installer verified the release when the job was opened; the fetcher
    holds no keys and checks the bytes against the release's sha256 and size."""
    f = fetcher(policy=verify.Policy())
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    g = fetcher(policy=verify.Policy())
    g.handle(fp.Fetch(seq=1, job_id="job-2", execution=1, url=url_of(server),
                      release=Release(**(release().__dict__ | {"sha256": "0" * 64}))), b"peer")
    assert wait_final(g, "job-2").failure == "verification_failed"


# -- disk -----------------------------------------------------------------------------------------------

def test_insufficient_disk_space_is_known_before_a_request_and_says_how_much(fetcher, server, dirs):
    st = os.statvfs(dirs[0])
    free = st.f_bavail * st.f_frsize
    f = fetcher()
    f.handle(fetch(url_of(server), size=free * 2), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "insufficient_disk_space")
    assert str(free * 2) in status.message and "free" in status.message
    assert server.requests == [] and listing(dirs[0]) == []


def _failing_pwrite(monkeypatch, err: int, after: int):
    real = os.pwrite

    def pwrite(fd, data, offset):
        if offset >= after:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(download_mod.os, "pwrite", pwrite)


def test_a_disk_that_fills_up_mid_download_fails_it_and_leaves_nothing(fetcher, server, dirs, monkeypatch):
    _failing_pwrite(monkeypatch, errno.ENOSPC, 128 * 1024)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "insufficient_disk_space")
    assert "filled up" in status.message
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []


def test_a_disk_that_turns_read_only_mid_download_is_a_clear_download_failed(fetcher, server, dirs, monkeypatch):
    _failing_pwrite(monkeypatch, errno.EROFS, 128 * 1024)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "download_failed")
    assert "read-only file system" in status.message
    assert f.handle(fp.CancelFetch(seq=2, job_id="job-1", execution=1), b"peer").state == fp.CANCELLED
    assert listing(dirs[0]) == [] and listing(dirs[1]) == []


def test_a_bug_of_ours_fails_the_download_with_a_message_and_a_traceback(fetcher, server, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(download_mod.verify, "bytes_failure", broken)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert status.failure == "download_failed" and "internal error" in status.message and "a bug" in status.message
    assert "Traceback" in caplog.text


# -- resuming across restarts -----------------------------------------------------------------------------

def _stop_midway(fetcher, server, dirs, at=300_000) -> resume.Record:
    """A first run that stops (as on SIGTERM) with ``at`` bytes or more checkpointed."""
    server.faults.rate = 300 * 1024
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    poll_for(lambda: (r := resume.load(dirs[1], "job-1", 1)) and r.offset >= at, 10, what="a checkpoint")
    f.shutdown()
    server.faults.rate = None
    record = resume.load(dirs[1], "job-1", 1)
    assert record is not None and (dirs[0] / PART).stat().st_size >= record.offset
    return record


def test_a_restart_resumes_from_the_record_with_range_and_the_etag(fetcher, server, dirs):
    record = _stop_midway(fetcher, server, dirs)
    before = len(server.log)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    (again,) = server.log[before:]
    assert again.range == f"bytes={record.offset}-" and again.if_range == record.etag and again.status == 206
    assert (dirs[0] / FINAL).read_bytes() == DATA
    assert listing(dirs[1]) == []


def test_only_checkpointed_bytes_are_trusted_after_a_power_loss(fetcher, server, dirs):
    record = _stop_midway(fetcher, server, dirs)
    with open(dirs[0] / PART, "r+b") as fh:  # what was not fsynced may be anything
        fh.truncate(record.offset)
        fh.seek(record.offset)
        fh.write(b"\0" * 50_000)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert server.log[-1].range == f"bytes={record.offset}-"
    assert (dirs[0] / FINAL).read_bytes() == DATA


@pytest.mark.parametrize("garbage", [b"", b"not json", b'{"v": 1}', b"[1]", b'{"v": 99, "offset": 5}',
                                     b"{" * 1000, b'{"v": 1, "job_id": "job-1", "offset": -1}'])
def test_an_unusable_record_starts_over_and_never_crashes(fetcher, server, dirs, garbage):
    (dirs[0] / PART).write_bytes(DATA[:300_000])
    (dirs[1] / RECORD).write_bytes(garbage)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert server.requests == [("/fw.bin", None)]


def test_a_partial_file_without_its_record_starts_over(fetcher, server, dirs):
    (dirs[0] / PART).write_bytes(DATA[:300_000])
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert server.requests == [("/fw.bin", None)] and (dirs[0] / FINAL).read_bytes() == DATA


def test_a_record_for_another_release_or_object_starts_over(fetcher, server, dirs):
    record = _stop_midway(fetcher, server, dirs)
    moved = resume.Record(**(record.__dict__ | {"url": record.url.replace("/fw.bin", "/other.bin")}))
    resume.save(dirs[1], moved)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert server.log[-1].range is None and server.log[-1].bytes_sent == len(DATA)


def test_a_partial_file_that_does_not_match_its_record_starts_over(fetcher, server, dirs):
    record = _stop_midway(fetcher, server, dirs)
    with open(dirs[0] / PART, "r+b") as fh:
        fh.write(b"X")  # one byte changed in the checkpointed prefix
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert server.log[-1].range is None
    assert record.offset > 0 and (dirs[0] / FINAL).read_bytes() == DATA


def _complete_partial(dirs, **changes):
    (dirs[0] / PART).write_bytes(DATA)
    fields = dict(job_id="job-1", execution=1, url="http://127.0.0.1/fw.bin", etag='"e"', version="1.0.0",
                  sha256=SHA, size=len(DATA), offset=len(DATA), prefix_sha256=SHA, total=len(DATA)) | changes
    return resume.Record(**fields)


def test_a_complete_partial_file_is_verified_without_a_request(fetcher, server, dirs):
    record = _complete_partial(dirs, url=resume.url_identity(url_of(server)))
    resume.save(dirs[1], record)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert server.requests == []


def test_416_counts_as_complete_only_when_size_and_hash_match(fetcher, server, dirs):
    # Without a size in the document the fetcher asks from where its file ends; S3 answers 416.
    resume.save(dirs[1], _complete_partial(dirs, url=resume.url_identity(url_of(server)), size=None, etag=None))
    f = fetcher()
    f.handle(fetch(url_of(server), size=None), b"peer")
    assert wait_final(f).state == fp.DONE
    assert [(s.range, s.status) for s in server.log] == [(f"bytes={len(DATA)}-", 416)]


def test_416_with_a_hash_that_does_not_match_starts_over(fetcher, server, dirs):
    other = os.urandom(len(DATA))
    resume.save(dirs[1], _complete_partial(dirs, url=resume.url_identity(url_of(server)), size=None, etag=None,
                                           sha256=SHA, prefix_sha256=hashlib.sha256(other).hexdigest()))
    (dirs[0] / PART).write_bytes(other)
    f = fetcher()
    f.handle(fetch(url_of(server), size=None), b"peer")
    assert wait_final(f).state == fp.DONE
    assert [(s.range, s.status) for s in server.log] == [(f"bytes={len(DATA)}-", 416), (None, 200)]
    assert (dirs[0] / FINAL).read_bytes() == DATA


def test_an_earlier_finished_file_is_verified_again_not_downloaded(fetcher, server, dirs):
    (dirs[0] / FINAL).write_bytes(DATA)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert status.state == fp.DONE and "earlier run" in status.message
    assert server.requests == []


def test_an_earlier_finished_file_that_does_not_match_is_downloaded_again(fetcher, server, dirs):
    (dirs[0] / FINAL).write_bytes(b"old" + DATA[3:])
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert (dirs[0] / FINAL).read_bytes() == DATA and len(server.requests) == 1


def test_starting_a_download_deletes_what_other_downloads_left(fetcher, server, dirs):
    for name in (handoff.part_name("old", 3), handoff.final_name("old", 4), resume.record_name("old", 3),
                 "unrelated.txt"):
        (dirs[1] if name.endswith(".json") else dirs[0]).joinpath(name).write_bytes(b"x")
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    wait_final(f)
    assert listing(dirs[0]) == [FINAL, "unrelated.txt"] and listing(dirs[1]) == []


def test_messages_have_no_control_characters_and_are_bounded():
    text = clean_message("line1\nline2\x1b[31m" + "x" * 5000)
    assert len(text) <= fp.MAX_MESSAGE
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text)


def test_reads_are_bounded_whatever_the_file_size(fetcher, server, monkeypatch):
    import urllib3

    sizes = []
    real = urllib3.response.HTTPResponse.read1

    def read1(self, amt=None, decode_content=None):
        sizes.append(amt)
        return real(self, amt, decode_content)

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read1", read1)
    f = fetcher()
    f.handle(fetch(url_of(server)), b"peer")
    assert wait_final(f).state == fp.DONE
    assert sizes and all(size is not None and 0 < size <= download_mod.READ_SIZE for size in sizes)


def test_a_proxy_from_the_standard_environment_variables_is_used(fetcher, server, dirs, monkeypatch):
    # The FileServer answers absolute-URI requests too, as an HTTP proxy receives them; the
    # object's own host does not exist, so only a request through the proxy can succeed.
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base_url)
    unreachable = url_of(server).replace(server.base_url, "http://bucket.s3.example.invalid")
    f = fetcher()
    f.handle(fetch(unreachable), b"peer")
    status = wait_final(f)
    assert status.state == fp.DONE, status.message
    assert server.requests == [("/fw.bin", None)]


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a small tmpfs (root only); yields a function mounting one at a path."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_staging_file_system_without_room_for_the_copy_fails_before_a_request(dirs, server, tmp_path,
                                                                                small_tmpfs):
    staging = small_tmpfs(tmp_path / "staging", "256k")
    f = Fetcher(dirs[0], dirs[1], UNSIGNED, FAST, staging_dir=staging)
    f.handle(fetch(url_of(server)), b"peer")
    status = wait_final(f)
    assert (status.state, status.failure) == (fp.FAILED, "insufficient_disk_space")
    assert str(staging) in status.message and "another file system" in status.message
    assert server.requests == []


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_over_tls_a_stall_is_cut_and_resumed_and_a_cancel_ends_a_stalled_read_at_once(dirs, tmp_path, monkeypatch):
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # trust this server, the standard way
    bucket = tmp_path / "tls-bucket"
    bucket.mkdir()
    (bucket / "fw.bin").write_bytes(DATA)
    tls_server = FileServer(bucket, tls=(cert, key)).start()
    try:
        assert tls_server.base_url.startswith("https://")
        tls_server.plan = [Faults(stall_after=300_000, stall_s=60)]
        f = Fetcher(dirs[0], dirs[1], UNSIGNED, Limits(**(FAST.__dict__ | {"low_speed_time": 1})))
        f.handle(fetch(url_of(tls_server)), b"peer")
        assert wait_final(f, timeout=20).state == fp.DONE
        assert [s.range for s in tls_server.log] == [None, "bytes=300000-"]

        tls_server.plan = [Faults(stall_after=200_000, stall_s=60)]
        f.handle(fetch(url_of(tls_server), execution=2), b"peer")
        poll_for(lambda: query(f, execution=2).bytes_done >= 200_000, 5, what="the first bytes")
        started = time.monotonic()
        assert f.handle(fp.CancelFetch(seq=5, job_id="job-1", execution=2), b"peer") is None
        poll_for(lambda: [m for _, m in f.outgoing(time.monotonic()) if m.seq == 5], 5, what="the answer")
        assert time.monotonic() - started < 1.0
        f.shutdown()
    finally:
        tls_server.stop()
