"""The status channel (upparat/ipc/status.py) and the child's Heartbeat."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from upparat import launch
from upparat.ipc import status
from upparat.ipc.status import LineBuffer, Problem, Status, StatusError, decode, encode_beat, encode_problem


def test_beat_round_trip():
    beat = Status(busy=True, job_id="job-1", execution=3, phase="install", bytes_done=10, bytes_total=20,
                  rate=5, subscribed=True)
    line = encode_beat(beat)
    assert line.endswith(b"\n") and len(line) <= status.MAX_LINE
    assert decode(line[:-1]) == beat


def test_problem_round_trip_and_fitting():
    problem = Problem.fitted("ERROR", "upparat.installer", "é" * 5000, "Traceback\n" + "frame\n" * 2000)
    line = encode_problem(problem)
    assert len(line) <= status.MAX_LINE
    assert decode(line[:-1]) == problem
    assert problem.traceback.endswith("frame\n")  # the innermost frames are kept


@pytest.mark.parametrize("line, reason", [
    (b"", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"v":2,"type":"beat","status":{}}', "version is not 1"),
    (b'{"v":1,"type":"hello"}', "type is not beat or problem"),
    (b'{"v":1,"type":"beat"}', "status is not an object"),
    (b'{"v":1,"type":"beat","status":{},"x":1}', "unknown field 'x'"),
    (b'{"v":1,"type":"beat","status":{"colour":1}}', "unknown status field 'colour'"),
    (b'{"v":1,"type":"beat","status":{"busy":1}}', "busy is not a boolean"),
    (b'{"v":1,"type":"beat","status":{"bytes_done":-1}}', "bytes_done is not a count"),
    (b'{"v":1,"type":"beat","status":{"rate":true}}', "rate is not a count"),
    (b'{"v":1,"type":"beat","status":{"execution":1e3}}', "execution is not a count"),
    (b'{"v":1,"type":"beat","status":{"job_id":"a b"}}', "job_id is not a job id"),
    (b'{"v":1,"type":"beat","status":{"job_id":"j\\n"}}', "job_id is not a job id"),
    (b'{"v":1,"type":"beat","status":{"phase":"Install!"}}', "phase is not a short lowercase word"),
    (b'{"v":1,"type":"beat","status":{"busy":true,"busy":false}}', "appears twice"),
    (b'{"v":1,"type":"beat","status":{"phase":"\\ud800"}}', "lone surrogate"),
    (b'{"v":1,"type":"beat","status":{"a":{"b":{}}}}', "nested deeper"),
    (b'{"v":1,"type":"problem","level":"INFO","logger":"x","message":"m"}', "level is not ERROR"),
    (b'{"v":1,"type":"problem","level":"ERROR","logger":"a b","message":"m"}', "logger is not"),
    (b'{"v":1,"type":"problem","level":"ERROR","logger":"x","message":"a\\u001bb"}', "message is not printable"),
    (b'{"v":1,"type":"problem","level":"ERROR","logger":"x","message":"m","role":"Root"}', "role is not"),
    (b"x" * status.MAX_LINE, "exceeds"),
])
def test_refusals_name_the_reason(line, reason):
    with pytest.raises(StatusError, match=reason.replace("(", r"\(")):
        decode(line)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decode_never_crashes_on_bytes(data):
    try:
        decode(data)
    except StatusError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3),
                           max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(status.STATUS_FIELDS) + ["other"]), json_values, max_size=6))
def test_decode_accepts_exactly_valid_statuses(fields):
    import json
    line = json.dumps({"v": 1, "type": "beat", "status": fields}).encode()
    try:
        result = decode(line)
    except StatusError:
        assert status.status_problem(fields) is not None or len(line) >= status.MAX_LINE
        return
    assert status.status_problem(fields) is None
    assert result == Status(**fields)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(min_value=1, max_value=50))
def test_line_buffer_yields_the_same_lines_however_the_bytes_are_split(lines, chunk):
    data = b"".join(line.replace(b"\n", b"") + b"\n" for line in lines)
    buffer = LineBuffer(max_line=100)
    out = []
    for i in range(0, len(data), chunk):
        out += buffer.feed(data[i:i + chunk])
    expected = [line.replace(b"\n", b"") for line in lines]
    assert [x for x in out if isinstance(x, bytes)] == [x for x in expected if len(x) < 100]
    assert sum(isinstance(x, StatusError) for x in out) == sum(len(x) >= 100 for x in expected)


def test_line_buffer_skips_an_overlong_line_and_keeps_the_next():
    buffer = LineBuffer(max_line=10)
    out = buffer.feed(b"0123456789abc")
    assert len(out) == 1 and isinstance(out[0], StatusError)
    assert buffer.feed(b"def\nok\n") == [b"ok"]


def test_a_wrong_field_is_the_child_s_own_bug_and_raises_at_once():
    with pytest.raises(TypeError):
        Status(colour="red")
    with pytest.raises(ValueError):
        launch.Heartbeat().beat(bytes_done=-1)


# -- the child's side: launch.Heartbeat ------------------------------------------------


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def pipe_heartbeat(**kwargs):
    r, w = os.pipe()
    clock = Clock()
    return r, w, clock, launch.Heartbeat(w, clock=clock, **kwargs)


def read_lines(fd) -> list[Status]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        return []
    return [decode(line) for line in data.split(b"\n") if line]


def test_heartbeat_rate_limits_progress_but_sends_changes_at_once():
    r, w, clock, hb = pipe_heartbeat(min_interval=0.5)
    try:
        hb.beat(job_id="j", bytes_done=1)
        hb.beat(job_id="j", bytes_done=2)  # progress only, 0 s later: dropped
        hb.beat(job_id="j", bytes_done=3, busy=True)  # busy changed: sent at once
        clock.now += 0.6
        hb.beat(job_id="j", bytes_done=4, busy=True)  # interval over: sent
        assert [s.bytes_done for s in read_lines(r)] == [1, 3, 4]
    finally:
        os.close(r)
        os.close(w)


def test_heartbeat_never_blocks_on_a_full_pipe():
    r, w, clock, hb = pipe_heartbeat(min_interval=0.0)
    try:
        for i in range(20000):  # far more than a pipe holds
            hb.beat(bytes_done=i, phase="download")
        assert hb.dropped > 0
        for line in os.read(r, 1 << 20).split(b"\n"):
            if line:
                decode(line)  # every line arrived whole
    finally:
        os.close(r)
        os.close(w)


def test_heartbeat_notices_that_the_supervisor_is_gone():
    r, w = os.pipe()
    os.close(r)
    orphaned = []
    hb = launch.Heartbeat(w, on_orphaned=lambda: orphaned.append(True))
    hb.beat()
    assert hb.orphaned and orphaned == [True]
    hb.beat()  # no second call, no exception
    assert orphaned == [True]
    os.close(w)


def test_heartbeat_without_a_supervisor_does_nothing():
    launch.Heartbeat().beat(busy=True)
