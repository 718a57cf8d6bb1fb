"""The jobs emulator's controller side without a broker: the job view (GET /jobs/<id>)
and its S3 stand-in (FileStore behind PUT and GET /files)."""

from __future__ import annotations

import hashlib
import http.client
import io

import pytest
import requests

from upparat.devtools.fileserver import FileServer
from upparat.devtools.jobs_emulator import JobsEmulator
from upparat.devtools.jobs_emulator_files import BadName, FileStore
from upparat.devtools.jobs_emulator_http import ControlServer
from upparat.devtools.jobs_emulator_store import JobStore

WAIT = 5


def test_job_view_status_follows_the_executions_and_cancel():
    store = JobStore(clock=lambda: 1_700_000_000)
    assert store.job("j") is None
    store.create_job("j", {"version": "1", "file": "${aws:iot:s3-presigned-url:https://s3/b/k}"}, ["a", "b"])
    view = store.job("j")
    assert view["status"] == "IN_PROGRESS"
    assert view["document"]["file"] == "${aws:iot:s3-presigned-url:https://s3/b/k}"  # as created
    assert [(e["thing"], e["status"]) for e in view["executions"]] == [("a", "QUEUED"), ("b", "QUEUED")]
    for thing in ("a", "b"):
        store.handle(f"$aws/things/{thing}/jobs/j/update",
                     b'{"status": "SUCCEEDED", "statusDetails": {"state": "complete_ready"}}')
    view = store.job("j")
    assert view["status"] == "COMPLETED"
    assert view["executions"][0]["statusDetails"] == {"state": "complete_ready"}

    store.create_job("k", {"version": "2"}, ["a"])
    store.cancel_job("k")
    assert store.job("k")["status"] == "CANCELED"
    assert store.job("k")["executions"][0]["status"] == "CANCELED"


# ---------------------------------------------------------------- FileStore

def test_put_writes_the_object_and_list_finds_it_by_prefix(tmp_path):
    files = FileStore(tmp_path)
    data = b"firmware" * 1000
    sha = hashlib.sha256(data).hexdigest()
    stored = files.put("fw-bucket", f"upparat/{sha}/fw.bin", io.BytesIO(data), len(data), sha)
    assert stored == {"key": f"upparat/{sha}/fw.bin", "size": len(data), "sha256": sha}
    assert (tmp_path / "fw-bucket" / "upparat" / sha / "fw.bin").read_bytes() == data
    assert files.list("fw-bucket", f"upparat/{sha}/") == [stored]
    assert files.list("fw-bucket", "upparat/0") == []
    assert files.list("other-bucket") == []


@pytest.mark.parametrize("length,sha,fragment", [
    (10, None, "ended after 4 of 10"),
    (4, "0" * 64, "sha256"),
])
def test_a_short_or_wrong_upload_leaves_nothing(tmp_path, length, sha, fragment):
    files = FileStore(tmp_path)
    with pytest.raises(ValueError, match=fragment):
        files.put("fw-bucket", "k/fw.bin", io.BytesIO(b"data"), length, sha)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_upload_over_the_limit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        FileStore(tmp_path, max_size=3).put("fw-bucket", "k", io.BytesIO(b"data"), 4)


@pytest.mark.parametrize("bucket,key", [
    ("fw-bucket", "../escape"), ("fw-bucket", "a/./b"), ("fw-bucket", "a//b"), ("fw-bucket", "a b"),
    ("fw-bucket", ""), ("..", "k"), ("UPPER", "k"), ("fw-bucket", "k.partial-1234"),
])
def test_names_that_could_leave_the_tree_or_clash_are_refused(tmp_path, bucket, key):
    with pytest.raises(BadName):
        FileStore(tmp_path).put(bucket, key, io.BytesIO(b"x"), 1)


# ---------------------------------------------------------------- the HTTP routes

@pytest.fixture
def control(tmp_path):
    """The control API of an emulator that is not connected to a broker (nothing is published)."""
    (tmp_path / "files").mkdir()
    server = ControlServer(JobsEmulator(), "127.0.0.1", 0, files=FileStore(tmp_path / "files"))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", tmp_path / "files"
    finally:
        server.stop()


def test_get_job_answers_status_document_and_executions(control):
    api, _ = control
    assert requests.get(f"{api}/jobs/j1", timeout=WAIT).status_code == 404
    assert requests.post(f"{api}/jobs", json={"jobId": "j1", "document": {"version": "1"}, "things": ["t1"]},
                         timeout=WAIT).status_code == 201
    job = requests.get(f"{api}/jobs/j1", timeout=WAIT).json()
    assert job["jobId"] == "j1" and job["status"] == "IN_PROGRESS" and job["document"] == {"version": "1"}
    assert [e["thing"] for e in job["executions"]] == ["t1"]
    assert requests.post(f"{api}/jobs/j1/cancel", timeout=WAIT).status_code == 200
    assert requests.get(f"{api}/jobs/j1", timeout=WAIT).json()["status"] == "CANCELED"


def test_files_are_uploaded_listed_and_served_with_presigned_urls(control):
    api, directory = control
    data = bytes(range(256)) * 300
    sha = hashlib.sha256(data).hexdigest()
    answer = requests.put(f"{api}/files/fw-bucket/upparat/{sha}/fw.bin", data=data,
                          headers={"X-Upparat-Sha256": sha}, timeout=WAIT)
    assert answer.status_code == 201, answer.text
    listing = requests.get(f"{api}/files/fw-bucket", params={"prefix": f"upparat/{sha}/"}, timeout=WAIT).json()
    assert listing == {"objects": [{"key": f"upparat/{sha}/fw.bin", "size": len(data), "sha256": sha}]}
    bad = requests.put(f"{api}/files/fw-bucket/other.bin", data=data, headers={"X-Upparat-Sha256": "0" * 64},
                       timeout=WAIT)
    assert bad.status_code == 400 and "sha256" in bad.json()["error"]
    raw = http.client.HTTPConnection(api.removeprefix("http://"), timeout=WAIT)  # sends ".." as is
    raw.request("PUT", "/files/fw-bucket/a/../b", body=b"x")
    assert raw.getresponse().status == 400
    raw.close()
    assert not (directory / "fw-bucket" / "b").exists() and not (directory / "b").exists()
    with FileServer(directory) as files:  # what --files serves, with its presigner
        url = files.presign(f"https://s3.amazonaws.com/fw-bucket/upparat/{sha}/fw.bin")
        assert requests.get(url, timeout=WAIT).content == data


def test_files_routes_say_how_to_enable_them(tmp_path):
    server = ControlServer(JobsEmulator(), "127.0.0.1", 0)
    server.start()
    try:
        answer = requests.get(f"http://127.0.0.1:{server.port}/files/fw-bucket", timeout=WAIT)
    finally:
        server.stop()
    assert answer.status_code == 404 and "--files DIR" in answer.json()["error"]
