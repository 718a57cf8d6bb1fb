"""The fetcher's small parts on their own: the clock-driven speed checks (with
a fake clock) and the resume records (with hostile files)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from upparat.fetcher_proc import resume
from upparat.fetcher_proc.speed import LowSpeed, Pace, RateMeter
from upparat.release import Release

# -- low speed ------------------------------------------------------------------------


def feed(detector: LowSpeed, samples) -> list[bool]:
    return [detector.stalled(t, n) for t, n in samples]


def test_low_speed_a_transfer_that_stops_is_stalled_once_a_whole_window_has_passed():
    detector = LowSpeed(limit=1, seconds=30)
    detector.start(0.0, 0)
    results = feed(detector, [(t, 1000) for t in range(1, 31)])  # 1000 bytes at once, then nothing
    assert results[:29] == [False] * 29 and results[29] is False  # bytes arrived inside the window
    assert feed(detector, [(30.5, 1000), (31.0, 1000)]) == [False, True]


def test_low_speed_a_steady_transfer_at_the_limit_is_never_stalled():
    detector = LowSpeed(limit=100, seconds=5)
    detector.start(0.0, 0)
    assert not any(feed(detector, [(t / 2, 50 * t + 100) for t in range(1, 200)]))


def test_low_speed_a_trickle_below_the_limit_is_stalled_after_the_window():
    detector = LowSpeed(limit=100, seconds=5)
    detector.start(0.0, 0)
    results = feed(detector, [(t, 90 * t) for t in range(1, 8)])
    assert results == [False, False, False, False, True, True, True]


def test_low_speed_limit_zero_turns_it_off():
    detector = LowSpeed(limit=0, seconds=1)
    detector.start(0.0, 0)
    assert not any(feed(detector, [(t, 0) for t in range(1, 100)]))


def test_low_speed_start_forgets_the_previous_transfer():
    detector = LowSpeed(limit=1, seconds=2)
    detector.start(0.0, 0)
    assert feed(detector, [(1, 0), (2, 0)]) == [False, True]
    detector.start(2.0, 0)
    assert feed(detector, [(3, 0), (4, 0)]) == [False, True]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 3), st.integers(0, 10_000)), min_size=1, max_size=60),
       st.integers(1, 1000), st.floats(0.5, 10))
def test_low_speed_never_calls_stalled_what_brought_enough_bytes_in_every_window(steps, limit, seconds):
    """Property: if every step brings at least limit*duration bytes, it is never stalled."""
    detector = LowSpeed(limit=limit, seconds=seconds)
    now, total = 0.0, 0
    detector.start(now, total)
    for duration, _ in steps:
        now += duration
        total += int(limit * duration) + 1
        assert not detector.stalled(now, total)


def test_rate_meter_reports_bytes_per_second_over_its_window():
    meter = RateMeter(window=3)
    assert meter.rate() == 0
    for t in range(10):
        meter.add(float(t), 1000 * t)
    assert meter.rate() == 1000
    meter.clear()
    assert meter.rate() == 0


def test_pace_waits_just_enough_for_the_rate():
    pace = Pace(rate=1000)
    pace.start(10.0, 0)
    assert pace.delay(10.0, 500) == pytest.approx(0.5)
    assert pace.delay(11.0, 500) == 0.0
    assert Pace(rate=0).delay(0.0, 10**9) == 0.0
    assert Pace(rate=0).read_size(1 << 20) == 1 << 20
    assert 4096 <= Pace(rate=1000).read_size(1 << 20) <= 1 << 20


# -- resume records ------------------------------------------------------------------------------

RELEASE = Release(version="1.0", sha256="a" * 64, size=1000)


def record(**changes) -> resume.Record:
    fields = dict(job_id="job-1", execution=2, url="https://bucket.s3.amazonaws.com/fw.bin", etag='"abc-3"',
                  version="1.0", sha256="a" * 64, size=1000, offset=500, prefix_sha256="b" * 64, total=1000)
    return resume.Record(**(fields | changes))


def test_a_saved_record_loads_back_equal(tmp_path):
    resume.save(tmp_path, record())
    assert resume.load(tmp_path, "job-1", 2) == record()
    assert oct(os.stat(tmp_path / resume.record_name("job-1", 2)).st_mode & 0o777) == "0o600"
    assert os.listdir(tmp_path) == [resume.record_name("job-1", 2)]  # no temporary file left


def test_a_missing_record_is_none(tmp_path):
    assert resume.load(tmp_path, "job-1", 2) is None


@pytest.mark.parametrize("content", [
    b"", b"\xff\xfe", b"null", b"[]", b"{", b'{"v": 1}',
    json.dumps({"v": 2} | record().__dict__).encode(),
    json.dumps({"v": 1} | record().__dict__ | {"extra": 1}).encode(),
    json.dumps({"v": 1} | record(offset=-1).__dict__).encode(),
    json.dumps({"v": 1} | record(offset=2000).__dict__).encode(),
    json.dumps({"v": 1} | record(offset="500").__dict__).encode(),
    json.dumps({"v": 1} | record(etag="W/\"weak\"").__dict__).encode(),
    json.dumps({"v": 1} | record(prefix_sha256="nothex").__dict__).encode(),
    json.dumps({"v": 1} | record(url="file:///etc/shadow").__dict__).encode(),
    json.dumps({"v": 1} | record(job_id="other").__dict__).encode(),
    json.dumps({"v": 1} | record(execution=True).__dict__).encode(),
    b"[" * 10000 + b"]" * 10000,
    b'{"v": 1, "offset": 1' + b"0" * 400 + b"}",
    b" " * (resume.MAX_RECORD + 10),
])
def test_an_unusable_record_is_none_never_an_exception(tmp_path, content):
    (tmp_path / resume.record_name("job-1", 2)).write_bytes(content)
    assert resume.load(tmp_path, "job-1", 2) is None


def test_a_record_that_is_a_symlink_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere.json"
    resume.save(tmp_path, record())
    os.rename(tmp_path / resume.record_name("job-1", 2), target)
    os.symlink(target, tmp_path / resume.record_name("job-1", 2))
    assert resume.load(tmp_path, "job-1", 2) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_load_never_raises_on_any_bytes(tmp_path_factory, content):
    directory = tmp_path_factory.mktemp("records")
    (directory / resume.record_name("job-1", 2)).write_bytes(content)
    assert resume.load(directory, "job-1", 2) is None


def test_a_record_matches_only_its_download_object_and_release():
    url = "https://bucket.s3.amazonaws.com/fw.bin?X-Amz-Signature=new"
    assert record().matches("job-1", 2, url, RELEASE)
    assert not record().matches("job-1", 3, url, RELEASE)
    assert not record().matches("job-1", 2, "https://bucket.s3.amazonaws.com/other.bin", RELEASE)
    assert not record().matches("job-1", 2, url, Release(version="1.0", sha256="c" * 64, size=1000))
    assert not record().matches("job-1", 2, url, Release(version="1.1", sha256="a" * 64, size=1000))


def test_url_identity_drops_the_query_and_credentials():
    assert resume.url_identity("https://user:pw@host:8443/a/b.bin?X-Amz-Signature=s#f") == "https://host:8443/a/b.bin"


@pytest.mark.parametrize("value, usable", [('"abc"', True), ('"d41d8cd98f00b204e9800998ecf8427e-12"', True),
                                           ('W/"abc"', False), ("abc", False), ('"a"b"', False), ('""', True),
                                           ('"\x01"', False), ('"' + "x" * 300 + '"', False), (None, False)])
def test_only_strong_etags_are_used_for_if_range(value, usable):
    assert (resume.strong_etag(value) is not None) is usable


def test_discard_deletes_every_file_of_one_download_and_nothing_else(tmp_path):
    downloads, state = tmp_path / "d", tmp_path / "s"
    downloads.mkdir()
    state.mkdir()
    for name in ("job-1.2.part", "job-1.2", "job-1.3.part", "keep"):
        (downloads / name).write_bytes(b"x")
    resume.save(state, record())
    assert resume.leftovers(downloads, state) == {("job-1", 2), ("job-1", 3)}
    assert resume.discard(downloads, state, "job-1", 2) is None
    assert sorted(os.listdir(downloads)) == ["job-1.3.part", "keep"] and os.listdir(state) == []


def test_discard_says_what_it_could_not_delete(tmp_path):
    downloads = tmp_path / "d"
    (downloads / "job-1.2.part").mkdir(parents=True)  # a directory: unlink fails
    problem = resume.discard(downloads, tmp_path, "job-1", 2)
    assert problem is not None and "job-1.2.part" in problem


# -- the hash beside the stream ----------------------------------------------------------------------------

def test_background_hash_equals_hashlib_and_copies_at_any_point():
    import hashlib

    from upparat.fetcher_proc.speed import BackgroundHash

    chunks = [os.urandom(n) for n in (1, 70_000, 1 << 20, 5, 300_000)]
    pipe = BackgroundHash(depth=2)
    try:
        for i, chunk in enumerate(chunks):
            pipe.update(chunk)
            assert pipe.copy().hexdigest() == hashlib.sha256(b"".join(chunks[: i + 1])).hexdigest()
        pipe.reset()
        pipe.update(b"abc")
        assert pipe.hexdigest() == hashlib.sha256(b"abc").hexdigest()
        start = hashlib.sha256(b"prefix")
        pipe.reset(start)
        pipe.update(b"rest")
        assert pipe.hexdigest() == hashlib.sha256(b"prefixrest").hexdigest()
    finally:
        pipe.close()


def test_background_hash_hands_an_error_to_the_stream():
    from upparat.fetcher_proc.speed import BackgroundHash

    pipe = BackgroundHash()
    try:
        pipe.update("not bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pipe.sync()
    finally:
        pipe.close()
