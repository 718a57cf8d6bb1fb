import json

import pytest

from upparat.broker_proc import jobs_api
from upparat.broker_proc.jobs_api import BadDocument, BadPayload, Topics

SHA = "b" * 64


def test_topics_are_classified_by_level_count_even_for_verb_like_job_ids():
    t = Topics("dev")
    base = "$aws/things/dev/jobs"
    assert t.classify(f"{base}/notify") == ("notify", None, None)
    assert t.classify(f"{base}/get/accepted") == ("get", None, "accepted")
    assert t.classify(f"{base}/get/get/accepted") == ("describe", "get", "accepted")
    assert t.classify(f"{base}/notify/update/rejected") == ("update", "notify", "rejected")
    assert t.classify(f"{base}/j1/get") == ("", None, None)  # our own request echoed
    assert t.classify("$aws/things/other/jobs/notify") == ("", None, None)


@pytest.mark.parametrize("payload", [b"\xff", b"[]", b"{", b"1"])
def test_bad_payloads_raise(payload):
    with pytest.raises(BadPayload):
        jobs_api.load_payload(payload)


def test_empty_payload_is_an_empty_object():
    assert jobs_api.load_payload(b"") == {}


def test_document_fields_are_checked():
    doc = {"version": "1", "file": "https://x/y", "sha256": SHA.upper(), "size": 3, "meta": "m"}
    parsed = jobs_api.parse_document(doc, True, False)
    assert parsed.sha256 == SHA and parsed.force is False and parsed.meta == "m"


@pytest.mark.parametrize("doc, words", [
    ([], "not a JSON object"),
    ({"file": "https://x"}, '"version"'),
    ({"version": "1"}, '"file"'),
    ({"version": "1", "file": "${aws:iot:s3-presigned-url:https://b/k}"}, "presignedUrlConfig"),
    ({"version": "1", "file": "ftp://x"}, "http(s)"),
    ({"version": "1\n", "file": "https://x", "sha256": SHA}, "line breaks"),
    ({"version": "1", "file": "https://x", "sha256": SHA, "meta": 5}, '"meta"'),
    ({"version": "1", "file": "https://x", "sha256": SHA, "signature": "!!"}, "base64"),
    ({"version": "1", "file": "https://x", "sha256": SHA, "signature": "AAAA"}, '"size"'),
    ({"version": "1", "file": "https://x"}, "require_sha256 = false"),
])
def test_bad_documents_say_what_to_fix(doc, words):
    with pytest.raises(BadDocument) as err:
        jobs_api.parse_document(doc, True, False)
    assert words in str(err.value)


def test_signature_required_when_configured():
    with pytest.raises(BadDocument, match="signed"):
        jobs_api.parse_document({"version": "1", "file": "https://x", "sha256": SHA, "size": 1}, True, True)


def test_status_details_respect_aws_limits():
    payload = json.loads(jobs_api.update_payload(
        "FAILED", "x", "tok", message="line1\nline2\t\u200b" + "y" * 5000, a="1", b="2", c="3", d="4",
        e="5", f="6", g="7", h="8", i="9", j="10"))
    details = payload["statusDetails"]
    assert len(details) == 10
    assert len(details["message"]) <= 1024
    assert not any(ord(c) < 32 for v in details.values() for c in v)
    assert payload["status"] == "FAILED" and payload["clientToken"] == "tok"


def test_pending_ids_from_get_and_notify():
    assert jobs_api.pending_job_ids({"inProgressJobs": [{"jobId": "a"}], "queuedJobs": [{"jobId": "b"}, {}]}) == (["a"], ["b"])
    assert jobs_api.pending_job_ids({"jobs": {"QUEUED": [{"jobId": "c"}]}}) == ([], ["c"])
    assert jobs_api.pending_job_ids({"jobs": {}}) == ([], [])
