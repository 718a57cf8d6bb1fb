"""The AWS IoT Jobs API as pure functions: topics, payloads (parsed with
limits), execution and rejection shapes, the update payload."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from upparat.broker_proc import jobs_api
from upparat.broker_proc.jobs_api import BadPayload, Topics

SHA = "b" * 64


def test_topics_are_classified_by_level_count_even_for_verb_like_job_ids():
    t = Topics("dev")
    base = "$aws/things/dev/jobs"
    assert t.classify(f"{base}/notify") == ("notify", None, None)
    assert t.classify(f"{base}/get/accepted") == ("get", None, "accepted")
    assert t.classify(f"{base}/get/get/accepted") == ("describe", "get", "accepted")
    assert t.classify(f"{base}/notify/update/rejected") == ("update", "notify", "rejected")
    assert t.classify(f"{base}/j1/get") == ("", None, None)  # our own request echoed
    assert t.classify(f"{base}/a.b/get/accepted") == ("", None, None)  # not a job id
    assert t.classify("$aws/things/other/jobs/notify") == ("", None, None)


@pytest.mark.parametrize("payload, reason", [
    (b"\xff", "UTF-8"), (b"[]", "object"), (b"{", "not JSON"), (b"1", "object"),
    (b"[" * 60000, "nested"), (b'{"a":' + b"9" * 5000 + b"}", "digits"), (b'{"a":"\\ud800"}', "surrogate"),
    (b"x" * (jobs_api.MAX_PAYLOAD + 1), "exceed"), (b'{"a":1,"a":2}', "twice"), (b'{"a":NaN}', "NaN"),
])
def test_bad_payloads_are_refused_with_a_reason(payload, reason):
    with pytest.raises(BadPayload, match=reason):
        jobs_api.load_payload(payload)


def test_empty_payload_is_an_empty_object():
    assert jobs_api.load_payload(b"") == {}


def test_execution_fields_are_checked_and_string_numbers_tolerated():
    body = {"execution": {"jobId": "j1", "status": "IN_PROGRESS", "versionNumber": "3", "executionNumber": 2,
                          "statusDetails": {"state": "reboot_start", "bad": 5}, "jobDocument": {"version": "1"}}}
    ex = jobs_api.parse_execution(body)
    assert (ex.job_id, ex.execution_number, ex.state.version_number) == ("j1", 2, 3)
    assert ex.state.status_details == {"state": "reboot_start"}
    assert jobs_api.parse_execution({}) is None
    for bad in ({"execution": []}, {"execution": {"jobId": "a/b", "status": "QUEUED"}},
                {"execution": {"jobId": "j"}}):
        with pytest.raises(BadPayload):
            jobs_api.parse_execution(bad)


def test_pending_jobs_from_get_and_notify():
    assert jobs_api.pending_jobs({"inProgressJobs": [{"jobId": "a", "executionNumber": 1}],
                                  "queuedJobs": [{"jobId": "b"}, {}, {"jobId": "../x"}]}) == ([("a", 1)], [("b", None)])
    assert jobs_api.pending_jobs({"jobs": {"QUEUED": [{"jobId": "c"}]}}) == ([], [("c", None)])
    assert jobs_api.pending_jobs({"jobs": {}}) == ([], [])
    with pytest.raises(BadPayload):
        jobs_api.pending_jobs({"jobs": [1]})


def test_rejection_keeps_code_and_execution_state():
    rejection = jobs_api.parse_rejection({"code": "VersionMismatch", "message": "x\ny",
                                          "executionState": {"status": "IN_PROGRESS", "versionNumber": 4}})
    assert rejection.code == "VersionMismatch" and rejection.state.version_number == 4
    assert "\n" not in rejection.message
    assert jobs_api.parse_rejection({"code": 5}).code == ""


def test_status_details_respect_aws_limits():
    details = jobs_api.status_details("x", message="line1\nline2\t\u200b" + "y" * 5000,
                                      **{k: str(i) for i, k in enumerate("abcdefghij")})
    payload = json.loads(jobs_api.update_payload("FAILED", details, "tok", 7, 2))
    assert len(payload["statusDetails"]) == 10
    assert len(payload["statusDetails"]["message"]) <= 1024
    assert not any(ord(c) < 32 or c == "\u200b" for v in payload["statusDetails"].values() for c in v)
    assert payload["expectedVersion"] == 7 and payload["executionNumber"] == 2
    assert payload["includeJobExecutionState"] is True


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_load_payload_never_raises_anything_but_badpayload(data):
    try:
        body = jobs_api.load_payload(data)
    except BadPayload:
        return
    assert isinstance(body, dict)
    for parse in (jobs_api.parse_execution, jobs_api.pending_jobs, jobs_api.parse_rejection):
        try:
            parse(body)
        except BadPayload:
            pass


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["execution", "jobs", "inProgressJobs", "queuedJobs", "code",
                                        "executionState", "jobId", "status"]), JSON, max_size=5))
def test_every_parser_turns_hostile_shapes_into_badpayload_or_a_checked_value(body):
    for parse in (jobs_api.parse_execution, jobs_api.pending_jobs, jobs_api.parse_rejection):
        try:
            parse(body)
        except BadPayload:
            pass
