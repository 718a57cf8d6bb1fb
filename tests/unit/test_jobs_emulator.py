"""The jobs emulator's AWS logic (JobStore), without a broker: wire shapes and the
notify / notify-next rules of reference §5 and pitfalls 8-10, 13-15, 17, 20, 23."""

import json

import pytest

from upparat.devtools.jobs_emulator_store import JobStore, parse_request_topic

T = "thing-1"
BASE = f"$aws/things/{T}/jobs"


class Clock:
    def __init__(self, now=1_747_341_071.7):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    return JobStore(clock=clock)


def ask(store, suffix, payload=None, thing=T):
    raw = payload if isinstance(payload, bytes) else (b"" if payload is None else json.dumps(payload).encode())
    return {p.topic: p.payload for p in store.handle(f"$aws/things/{thing}/jobs/{suffix}", raw)}


def topics(pubs):
    return [p.topic for p in pubs]


# ---------------------------------------------------------------- topics

@pytest.mark.parametrize("topic,expected", [
    ("$aws/things/T/jobs/get", ("T", "get", None)),
    ("$aws/things/T/jobs/start-next", ("T", "start-next", None)),
    ("$aws/things/T/jobs/J/get", ("T", "describe", "J")),
    ("$aws/things/T/jobs/$next/get", ("T", "describe", "$next")),
    ("$aws/things/T/jobs/J/update", ("T", "update", "J")),
    ("$aws/things/T/jobs/get/accepted", None),
    ("$aws/things/T/jobs/start-next/rejected", None),
    ("$aws/things/T/jobs/J/get/accepted", None),
    ("$aws/things/T/jobs/J/update/rejected", None),
    ("$aws/things/T/jobs/notify", None),
    ("$aws/things/T/jobs/notify-next", None),
    ("aws/things/T/jobs/get", None),
    ("$aws/things//jobs/get", None),
])
def test_topics_are_parsed_by_level_count_so_replies_are_never_requests(topic, expected):
    assert parse_request_topic(topic) == expected


def test_own_replies_fed_back_produce_nothing(store):
    store.create_job("j1", {"version": "1"}, [T])
    for pub in store.handle(f"{BASE}/start-next", b""):
        assert store.handle(pub.topic, json.dumps(pub.payload).encode()) == []


# ---------------------------------------------------------------- create / notifications

def test_first_job_emits_notify_and_notify_next_with_document(store):
    pubs = store.create_job("j1", {"version": "1.0", "file": "x"}, [T])
    assert topics(pubs) == [f"{BASE}/notify", f"{BASE}/notify-next"]
    notify, nxt = pubs[0].payload, pubs[1].payload
    assert notify == {"timestamp": 1_747_341_071, "jobs": {"QUEUED": [
        {"jobId": "j1", "queuedAt": 1_747_341_071, "lastUpdatedAt": 1_747_341_071,
         "versionNumber": 1, "executionNumber": 1}]}}
    assert nxt == {"timestamp": 1_747_341_071, "execution": {
        "jobId": "j1", "status": "QUEUED", "queuedAt": 1_747_341_071,
        "lastUpdatedAt": 1_747_341_071, "versionNumber": 1, "executionNumber": 1,
        "jobDocument": {"version": "1.0", "file": "x"}}}


def test_second_job_behind_head_emits_only_notify(store, clock):
    store.create_job("j1", {}, [T])
    clock.now += 5
    pubs = store.create_job("j2", {}, [T])
    assert topics(pubs) == [f"{BASE}/notify"]
    assert [s["jobId"] for s in pubs[0].payload["jobs"]["QUEUED"]] == ["j1", "j2"]


def test_create_for_two_things_notifies_each_thing(store):
    pubs = store.create_job("j1", {}, ["a", "b"])
    assert topics(pubs) == ["$aws/things/a/jobs/notify", "$aws/things/a/jobs/notify-next",
                            "$aws/things/b/jobs/notify", "$aws/things/b/jobs/notify-next"]


def test_start_of_head_emits_no_notification_and_bumps_version(store, clock):
    store.create_job("j1", {"v": 1}, [T])
    clock.now += 10
    pubs = store.handle(f"{BASE}/start-next", b"")
    assert topics(pubs) == [f"{BASE}/start-next/accepted"]
    execution = pubs[0].payload["execution"]
    assert execution["status"] == "IN_PROGRESS"
    assert execution["versionNumber"] == 2
    assert execution["startedAt"] == execution["lastUpdatedAt"] == 1_747_341_081
    assert execution["jobDocument"] == {"v": 1}
    assert "statusDetails" not in execution and "thingName" not in execution
    assert "clientToken" not in pubs[0].payload


def test_terminal_update_of_head_emits_notify_and_notify_next_with_new_head(store):
    store.create_job("j1", {}, [T])
    store.create_job("j2", {"n": 2}, [T])
    store.handle(f"{BASE}/start-next", b"")
    pubs = store.handle(f"{BASE}/j1/update", b'{"status":"SUCCEEDED"}')
    assert topics(pubs) == [f"{BASE}/j1/update/accepted", f"{BASE}/notify", f"{BASE}/notify-next"]
    assert pubs[0].payload == {"timestamp": 1_747_341_071}
    assert [s["jobId"] for s in pubs[1].payload["jobs"]["QUEUED"]] == ["j2"]
    assert "IN_PROGRESS" not in pubs[1].payload["jobs"]
    assert pubs[2].payload["execution"]["jobId"] == "j2"
    assert pubs[2].payload["execution"]["jobDocument"] == {"n": 2}


def test_last_job_finishing_emits_empty_shapes(store):
    store.create_job("j1", {}, [T])
    pubs = store.handle(f"{BASE}/j1/update", b'{"status":"FAILED"}')
    by_topic = {p.topic: p.payload for p in pubs}
    assert by_topic[f"{BASE}/notify"] == {"timestamp": 1_747_341_071, "jobs": {}}
    assert by_topic[f"{BASE}/notify-next"] == {"timestamp": 1_747_341_071}


def test_progress_update_emits_nothing_but_the_reply(store):
    store.create_job("j1", {}, [T])
    store.handle(f"{BASE}/start-next", b"")
    pubs = store.handle(f"{BASE}/j1/update", b'{"status":"IN_PROGRESS","statusDetails":{"state":"x"}}')
    assert topics(pubs) == [f"{BASE}/j1/update/accepted"]


def test_non_head_started_becomes_head_emits_only_notify_next(store, clock):
    store.create_job("j1", {}, [T])
    clock.now += 1
    store.create_job("j2", {}, [T])
    pubs = store.handle(f"{BASE}/j2/update", b'{"status":"IN_PROGRESS"}')
    assert topics(pubs) == [f"{BASE}/j2/update/accepted", f"{BASE}/notify-next"]
    assert pubs[1].payload["execution"]["jobId"] == "j2"
    assert pubs[1].payload["execution"]["status"] == "IN_PROGRESS"


def test_non_head_terminal_emits_only_notify(store, clock):
    store.create_job("j1", {}, [T])
    clock.now += 1
    store.create_job("j2", {}, [T])
    pubs = store.handle(f"{BASE}/j2/update", b'{"status":"REJECTED"}')
    assert topics(pubs) == [f"{BASE}/j2/update/accepted", f"{BASE}/notify"]


# ---------------------------------------------------------------- get / start-next / describe

def test_get_pending_lists_both_arrays_without_status(store, clock):
    assert ask(store, "get", {"clientToken": "t"})[f"{BASE}/get/accepted"] == {
        "timestamp": 1_747_341_071, "clientToken": "t", "inProgressJobs": [], "queuedJobs": []}
    store.create_job("j1", {}, [T])
    clock.now += 2
    store.create_job("j2", {}, [T])
    store.handle(f"{BASE}/start-next", b"")
    answer = ask(store, "get")[f"{BASE}/get/accepted"]
    assert [s["jobId"] for s in answer["inProgressJobs"]] == ["j1"]
    assert [s["jobId"] for s in answer["queuedJobs"]] == ["j2"]
    assert all("status" not in s for s in answer["inProgressJobs"] + answer["queuedJobs"])
    assert "startedAt" in answer["inProgressJobs"][0] and "startedAt" not in answer["queuedJobs"][0]


def test_start_next_prefers_in_progress_then_oldest_queued(store, clock):
    store.create_job("old", {}, [T])
    clock.now += 1
    store.create_job("new", {}, [T])
    store.handle(f"{BASE}/new/update", b'{"status":"IN_PROGRESS"}')
    answer = ask(store, "start-next")[f"{BASE}/start-next/accepted"]
    assert answer["execution"]["jobId"] == "new"
    assert answer["execution"]["versionNumber"] == 2  # already IN_PROGRESS: unchanged


def test_start_next_with_nothing_pending_has_no_execution_key(store):
    assert ask(store, "start-next", {"clientToken": "c"}) == {
        f"{BASE}/start-next/accepted": {"timestamp": 1_747_341_071, "clientToken": "c"}}


def test_start_next_stores_status_details_when_starting(store):
    store.create_job("j1", {}, [T])
    ask(store, "start-next", {"statusDetails": {"state": "download_start"}})
    assert store.execution("j1", T)["statusDetails"] == {"state": "download_start"}
    assert store.execution("j1", T)["history"] == [
        {"status": "IN_PROGRESS", "statusDetails": {"state": "download_start"}, "versionNumber": 2}]


def test_describe_next_is_read_only_and_keeps_literal_next_in_topic(store):
    store.create_job("j1", {"a": 1}, [T])
    answer = ask(store, "$next/get")
    assert list(answer) == [f"{BASE}/$next/get/accepted"]
    assert answer[f"{BASE}/$next/get/accepted"]["execution"]["status"] == "QUEUED"
    assert store.execution("j1", T)["versionNumber"] == 1


def test_describe_next_with_nothing_pending_answers_without_execution(store):
    assert ask(store, "$next/get") == {f"{BASE}/$next/get/accepted": {"timestamp": 1_747_341_071}}


def test_describe_honours_include_job_document_and_execution_number(store):
    store.create_job("j1", {"a": 1}, [T])
    assert "jobDocument" in ask(store, "j1/get")[f"{BASE}/j1/get/accepted"]["execution"]
    no_doc = ask(store, "j1/get", {"includeJobDocument": False})[f"{BASE}/j1/get/accepted"]
    assert "jobDocument" not in no_doc["execution"]
    assert ask(store, "j1/get", {"executionNumber": 1}).keys() == {f"{BASE}/j1/get/accepted"}
    rejected = ask(store, "j1/get", {"executionNumber": 2})[f"{BASE}/j1/get/rejected"]
    assert rejected["code"] == "ResourceNotFound"


def test_describe_unknown_job_or_other_thing_is_resource_not_found(store):
    store.create_job("j1", {}, ["other"])
    rejected = ask(store, "j1/get", {"clientToken": "x"})[f"{BASE}/j1/get/rejected"]
    assert rejected["code"] == "ResourceNotFound"
    assert rejected["clientToken"] == "x"
    assert "executionState" not in rejected


# ---------------------------------------------------------------- update

def test_update_with_states_and_document_on_request(store):
    store.create_job("j1", {"d": 1}, [T])
    answer = ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"state": "a"},
                                      "includeJobExecutionState": True, "includeJobDocument": True,
                                      "clientToken": "k"})[f"{BASE}/j1/update/accepted"]
    assert answer == {"timestamp": 1_747_341_071, "clientToken": "k",
                      "executionState": {"status": "IN_PROGRESS", "statusDetails": {"state": "a"},
                                         "versionNumber": 2},
                      "jobDocument": {"d": 1}}


def test_status_details_are_replaced_not_merged(store):
    store.create_job("j1", {}, [T])
    ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"a": "1", "b": "2"}})
    ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"c": "3"}})
    assert store.execution("j1", T)["statusDetails"] == {"c": "3"}
    ask(store, "j1/update", {"status": "IN_PROGRESS"})  # omitted: unchanged
    assert store.execution("j1", T)["statusDetails"] == {"c": "3"}


def test_merge_option_merges_status_details(clock):
    store = JobStore(clock=clock, merge_status_details=True)
    store.create_job("j1", {}, [T])
    ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"a": "1"}})
    ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"b": "2"}})
    assert store.execution("j1", T)["statusDetails"] == {"a": "1", "b": "2"}


@pytest.mark.parametrize("expected", [2, "2"])
def test_expected_version_accepts_int_or_string(store, expected):
    store.create_job("j1", {}, [T])
    store.handle(f"{BASE}/start-next", b"")
    answer = ask(store, "j1/update", {"status": "SUCCEEDED", "expectedVersion": expected})
    assert f"{BASE}/j1/update/accepted" in answer
    assert store.execution("j1", T)["versionNumber"] == 3


def test_version_mismatch_carries_execution_state_and_changes_nothing(store):
    store.create_job("j1", {}, [T])
    ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"s": "1"}})
    rejected = ask(store, "j1/update", {"status": "SUCCEEDED", "expectedVersion": 1})[
        f"{BASE}/j1/update/rejected"]
    assert rejected["code"] == "VersionMismatch"
    assert rejected["executionState"] == {"status": "IN_PROGRESS", "statusDetails": {"s": "1"},
                                          "versionNumber": 2}
    assert store.execution("j1", T)["status"] == "IN_PROGRESS"


def test_update_of_terminal_execution_is_invalid_state_transition(store):
    store.create_job("j1", {}, [T])
    ask(store, "j1/update", {"status": "SUCCEEDED"})
    rejected = ask(store, "j1/update", {"status": "IN_PROGRESS"})[f"{BASE}/j1/update/rejected"]
    assert rejected["code"] == "InvalidStateTransition"
    assert rejected["executionState"] == {"status": "SUCCEEDED", "versionNumber": 2}


@pytest.mark.parametrize("request_body", [
    {},
    {"status": "CANCELED"},
    {"status": "QUEUED"},
    {"status": "DONE"},
    {"status": "SUCCEEDED", "expectedVersion": "two"},
    {"status": "SUCCEEDED", "expectedVersion": True},
    {"status": "IN_PROGRESS", "statusDetails": "state=x"},
    {"status": "IN_PROGRESS", "statusDetails": {f"k{i}": "v" for i in range(11)}},
    {"status": "IN_PROGRESS", "statusDetails": {"bad key": "v"}},
    {"status": "IN_PROGRESS", "statusDetails": {"k" * 129: "v"}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": ""}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": "x" * 1025}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": "line\nbreak"}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": "tab\t"}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": "zero\u200bwidth"}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": 5}},
    {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0},
    {"status": "IN_PROGRESS", "includeJobDocument": "yes"},
    {"status": "IN_PROGRESS", "clientToken": 7},
])
def test_invalid_updates_are_invalid_request_and_change_nothing(store, request_body):
    store.create_job("j1", {}, [T])
    rejected = ask(store, "j1/update", request_body)[f"{BASE}/j1/update/rejected"]
    assert rejected["code"] == "InvalidRequest", rejected
    assert "executionState" not in rejected
    assert store.execution("j1", T)["versionNumber"] == 1


def test_status_details_at_the_limits_are_accepted(store):
    store.create_job("j1", {}, [T])
    details = {f"k:{i}_-": "x" * 1024 for i in range(10)}
    assert f"{BASE}/j1/update/accepted" in ask(store, "j1/update", {"status": "IN_PROGRESS",
                                                                    "statusDetails": details})


def test_update_unknown_job_is_resource_not_found(store):
    rejected = ask(store, "nope/update", {"status": "SUCCEEDED"})[f"{BASE}/nope/update/rejected"]
    assert rejected["code"] == "ResourceNotFound"


def test_non_json_is_invalid_json_and_empty_payload_is_an_empty_request(store):
    assert ask(store, "get", b"{not json")[f"{BASE}/get/rejected"]["code"] == "InvalidJson"
    assert ask(store, "get", b"\xff\xfe")[f"{BASE}/get/rejected"]["code"] == "InvalidJson"
    assert f"{BASE}/get/accepted" in ask(store, "get", b"")


def test_history_records_every_accepted_device_change(store):
    store.create_job("j1", {}, [T])
    store.handle(f"{BASE}/start-next", b"")
    ask(store, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"state": "download_start"}})
    ask(store, "j1/update", {"status": "SUCCEEDED", "statusDetails": {"state": "complete_ready"}})
    ask(store, "j1/update", {"status": "FAILED"})  # rejected: not recorded
    assert store.execution("j1", T)["history"] == [
        {"status": "IN_PROGRESS", "statusDetails": {}, "versionNumber": 2},
        {"status": "IN_PROGRESS", "statusDetails": {"state": "download_start"}, "versionNumber": 3},
        {"status": "SUCCEEDED", "statusDetails": {"state": "complete_ready"}, "versionNumber": 4},
    ]


def test_snapshot_is_a_copy(store):
    store.create_job("j1", {}, [T])
    snap = store.execution("j1", T)
    snap["status"] = "SUCCEEDED"
    snap["history"].append("x")
    assert store.execution("j1", T)["status"] == "QUEUED"
    assert store.execution("j1", T)["history"] == []
    assert store.execution("j1", "nobody") is None


# ---------------------------------------------------------------- cancel / delete

def test_cancel_without_force_leaves_in_progress_alone(store, clock):
    store.create_job("j1", {}, ["a", "b"])
    store.handle("$aws/things/a/jobs/start-next", b"")
    pubs = store.cancel_job("j1")
    assert store.execution("j1", "a")["status"] == "IN_PROGRESS"
    assert store.execution("j1", "b")["status"] == "CANCELED"
    assert topics(pubs) == ["$aws/things/b/jobs/notify", "$aws/things/b/jobs/notify-next"]
    answer = ask(store, "j1/update", {"status": "SUCCEEDED"}, thing="a")
    assert "$aws/things/a/jobs/j1/update/accepted" in answer


def test_force_cancel_of_in_progress_notifies_and_refuses_later_updates(store):
    store.create_job("j1", {}, [T])
    store.handle(f"{BASE}/start-next", b"")
    pubs = store.cancel_job("j1", force=True)
    assert topics(pubs) == [f"{BASE}/notify", f"{BASE}/notify-next"]
    assert pubs[1].payload == {"timestamp": 1_747_341_071}
    rejected = ask(store, "j1/update", {"status": "SUCCEEDED"})[f"{BASE}/j1/update/rejected"]
    assert rejected["code"] == "InvalidStateTransition"
    assert rejected["executionState"]["status"] == "CANCELED"


def test_delete_execution_notifies_and_then_describe_is_not_found(store, clock):
    store.create_job("j1", {}, [T])
    clock.now += 1
    store.create_job("j2", {}, [T])
    pubs = store.delete_execution("j1", T)
    assert topics(pubs) == [f"{BASE}/notify", f"{BASE}/notify-next"]
    assert pubs[1].payload["execution"]["jobId"] == "j2"
    assert ask(store, "j1/get")[f"{BASE}/j1/get/rejected"]["code"] == "ResourceNotFound"
    assert store.execution("j1", T) is None


def test_delete_in_progress_needs_force(store):
    store.create_job("j1", {}, [T])
    store.handle(f"{BASE}/start-next", b"")
    with pytest.raises(ValueError):
        store.delete_execution("j1", T)
    store.delete_execution("j1", T, force=True)
    assert store.execution("j1", T) is None


def test_unknown_job_or_execution_raise_key_error(store):
    with pytest.raises(KeyError):
        store.cancel_job("nope")
    with pytest.raises(KeyError):
        store.delete_execution("nope", T)


# ---------------------------------------------------------------- create validation, documents

@pytest.mark.parametrize("job_id", ["get", "start-next", "notify", "notify-next", "", "a/b",
                                    "$next", "x" * 65, "has space"])
def test_create_refuses_bad_or_verb_job_ids(store, job_id):
    with pytest.raises(ValueError):
        store.create_job(job_id, {}, [T])


@pytest.mark.parametrize("document,things", [
    ("not a dict", [T]), ({"x": float("nan")}, [T]), ({"x": "y" * 40000}, [T]),
    ({}, []), ({}, "thing"), ({}, ["bad/thing"]), ({}, [T, T]),
])
def test_create_refuses_bad_documents_and_things(store, document, things):
    with pytest.raises(ValueError):
        store.create_job("j1", document, things)
    assert store.execution("j1", T) is None


def test_create_refuses_duplicate_job(store):
    store.create_job("j1", {}, [T])
    with pytest.raises(ValueError):
        store.create_job("j1", {}, ["other"])


def test_presigned_placeholders_are_signed_fresh_on_every_delivery(clock):
    calls = []

    def presign(url):
        calls.append(url)
        return f"http://files/{len(calls)}"

    store = JobStore(clock=clock, presign=presign)
    document = {"file": "${aws:iot:s3-presigned-url:https://b.s3.amazonaws.com/fw.raucb}",
                "nested": ["pre ${aws:iot:s3-presigned-url:https://b/x} post"], "n": 3}
    nxt = store.create_job("j1", document, [T])[1].payload["execution"]["jobDocument"]
    described = ask(store, "j1/get")[f"{BASE}/j1/get/accepted"]["execution"]["jobDocument"]
    started = ask(store, "start-next")[f"{BASE}/start-next/accepted"]["execution"]["jobDocument"]
    assert nxt == {"file": "http://files/1", "nested": ["pre http://files/2 post"], "n": 3}
    assert described["file"] == "http://files/3"
    assert started["file"] == "http://files/5"
    assert calls[0] == "https://b.s3.amazonaws.com/fw.raucb"
    assert document["file"].startswith("${aws:iot")  # the caller's dict is untouched


def test_without_presigner_placeholders_stay(store):
    doc = {"file": "${aws:iot:s3-presigned-url:https://b/x}"}
    store.create_job("j1", doc, [T])
    assert ask(store, "j1/get")[f"{BASE}/j1/get/accepted"]["execution"]["jobDocument"] == doc


def test_thing_name_and_null_stripping_options(clock):
    store = JobStore(clock=clock, include_thing_name=True, strip_nulls=True)
    store.create_job("j1", {"a": None, "b": 1}, [T])
    execution = ask(store, "j1/get")[f"{BASE}/j1/get/accepted"]["execution"]
    assert execution["thingName"] == T
    assert execution["jobDocument"] == {"b": 1}


def test_listing_is_capped_at_ten(store, clock):
    for i in range(12):
        clock.now += 1
        store.create_job(f"j{i:02}", {}, [T])
    answer = ask(store, "get")[f"{BASE}/get/accepted"]
    assert [s["jobId"] for s in answer["queuedJobs"]] == [f"j{i:02}" for i in range(10)]


def test_internal_error_is_answered_not_raised(clock):
    calls = []

    def presign_once(url):
        calls.append(url)
        if len(calls) > 1:
            raise RuntimeError("signing service down")
        return "http://signed"

    store = JobStore(clock=clock, presign=presign_once)
    store.create_job("j1", {"f": "${aws:iot:s3-presigned-url:https://b/x}"}, [T])  # 1st call
    rejected = ask(store, "j1/get", {"clientToken": "c"})[f"{BASE}/j1/get/rejected"]
    assert rejected["code"] == "InternalError"
    assert rejected["clientToken"] == "c"
