"""The local trial: ``upparat-jobs --emulator URL`` with the same create/status/cancel commands
as against AWS, a real ``upparat-jobs-emulator --files DIR`` (its S3 stand-in), a real
Mosquitto and a paho device that takes the job, downloads the presigned file and reports."""

from __future__ import annotations

import json
import queue
import re
import subprocess

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import PYTHON, Proc, poll_for
from upparat import signature, verify
from upparat.release import parse_document

pytestmark = pytest.mark.timeout(90)

WAIT = 10.0
ROLE = "arn:aws:iam::123456789012:role/unused-by-the-emulator"


@pytest.fixture
def emulator(mosquitto, tmp_path):
    files = tmp_path / "s3"
    files.mkdir()
    proc = Proc([PYTHON, "-m", "upparat.devtools.jobs_emulator", "--mqtt-port", mosquitto, "--http-port", "0",
                 "--files", files], tmp_path / "emulator.log")
    try:
        ready = poll_for(lambda: re.search(r"control (http://127\.0\.0\.1:\d+) files (http://\S+)", proc.log())
                         or (not proc.alive() and pytest.fail(proc.log())), WAIT, what="emulator ready")
        yield ready.group(1), files
    finally:
        proc.stop()


class Device:
    """One thing that takes its next job and reports, as a device agent would."""

    def __init__(self, port: int, thing: str):
        self.thing = thing
        self.base = f"$aws/things/{thing}/jobs"
        self.replies: queue.Queue = queue.Queue()
        subscribed = queue.Queue()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{thing}-test")
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{self.base}/start-next/+", 1),
                                                            (f"{self.base}/+/update/+", 1)])
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.on_message = lambda _c, _u, m: self.replies.put((m.topic, json.loads(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribed.get(timeout=WAIT)

    def ask(self, suffix: str, payload: dict) -> dict:
        self.client.publish(f"{self.base}/{suffix}", json.dumps(payload), qos=1).wait_for_publish(WAIT)
        topic, answer = self.replies.get(timeout=WAIT)
        assert topic == f"{self.base}/{suffix}/accepted", (topic, answer)
        return answer

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def jobs(api, *argv, stdin=""):
    return subprocess.run([PYTHON, "-m", "upparat.operator", "--emulator", api, *argv], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_a_developer_tries_a_signed_update_with_the_aws_commands(emulator, mosquitto, tmp_path):
    api, s3 = emulator
    firmware = tmp_path / "firmware-3.1.bin"
    firmware.write_bytes(bytes(range(256)) * 1000)
    assert jobs(api, "keygen", "--out", str(tmp_path / "dev")).returncode == 0
    create = ("create", "--file", str(firmware), "--version", "3.1", "--bucket", "dev-bucket", "--role-arn", ROLE,
              "--key", str(tmp_path / "dev.key"), "--meta", "from my laptop")

    result = jobs(api, *create, "--thing", "-", "--job-id", "trial-1", "--in-progress-timeout", "30",
                  stdin="dev-a\ndev-b\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "trial-1\n"
    assert "ignores the in-progress timeout" in result.stderr
    stored = [p for p in s3.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].read_bytes() == firmware.read_bytes()

    device = Device(mosquitto, "dev-a")
    try:
        execution = device.ask("start-next", {"clientToken": "c1"})["execution"]
        assert execution["jobId"] == "trial-1"
        release, url = parse_document(execution["jobDocument"])  # the presigned URL, filled in
        assert requests.get(url, timeout=WAIT).content == firmware.read_bytes()
        keys = [signature.load_public_key((tmp_path / "dev.pub").read_bytes())]
        assert verify.release_failure(release, keys, verify.Policy()) is None
        assert release.meta == "from my laptop"
        device.ask("trial-1/update", {"status": "IN_PROGRESS",
                                      "statusDetails": {"state": "download_progress", "message": "40% of 256 kB"}})
    finally:
        device.close()

    status = jobs(api, "status", "trial-1", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["status"] == "IN_PROGRESS"
    assert [(e["thing"], e["status"], e["state"], e["message"]) for e in report["executions"]] == [
        ("dev-a", "IN_PROGRESS", "download_progress", "40% of 256 kB"), ("dev-b", "QUEUED", None, None)]
    table = jobs(api, "status", "trial-1").stdout.splitlines()
    assert table[0] == "job trial-1: IN_PROGRESS (1 IN_PROGRESS, 1 QUEUED)"
    assert table[2].split(None, 3) == ["dev-a", "IN_PROGRESS", "download_progress", "40% of 256 kB"]

    # The same file again: not uploaded again.
    again = jobs(api, *create, "--thing", "dev-c", "--job-id", "trial-2")
    assert again.returncode == 0 and "not uploading" in again.stderr
    assert len([p for p in s3.rglob("*") if p.is_file()]) == 1

    # Cancel without force leaves the device that started alone, with force not.
    assert jobs(api, "cancel", "trial-1").stdout == "job trial-1: CANCELED\n"
    report = json.loads(jobs(api, "status", "trial-1", "--json").stdout)
    assert [(e["thing"], e["status"]) for e in report["executions"]] == [("dev-a", "IN_PROGRESS"),
                                                                        ("dev-b", "CANCELED")]
    assert jobs(api, "cancel", "trial-1", "--force").returncode == 0
    report = json.loads(jobs(api, "status", "trial-1", "--json").stdout)
    assert {e["status"] for e in report["executions"]} == {"CANCELED"}


def test_emulator_errors_are_one_line(emulator, tmp_path):
    api, _ = emulator
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"x" * 10)
    create = ("create", "--file", str(firmware), "--version", "1", "--bucket", "dev-bucket", "--role-arn", ROLE,
              "--thing", "dev-a", "--job-id", "e-1")
    assert jobs(api, *create).returncode == 0
    taken = jobs(api, *create)
    assert taken.returncode == 1
    assert taken.stderr.splitlines()[-1] == ("upparat-jobs create: job e-1 already exists (status IN_PROGRESS): "
                                            "choose another --job-id")
    missing = jobs(api, "status", "nope")
    assert missing.returncode == 1 and missing.stderr == "upparat-jobs status: no job nope in the jobs emulator\n"
    gone = jobs("http://127.0.0.1:9", "status", "e-1")
    assert gone.returncode == 1 and "is upparat-jobs-emulator running?" in gone.stderr


def test_an_emulator_without_files_says_how_to_start_it(mosquitto, tmp_path):
    proc = Proc([PYTHON, "-m", "upparat.devtools.jobs_emulator", "--mqtt-port", mosquitto, "--http-port", "0"],
                tmp_path / "emulator.log")
    try:
        ready = poll_for(lambda: re.search(r"control (http://127\.0\.0\.1:\d+)", proc.log()), WAIT,
                         what="emulator ready")
        firmware = tmp_path / "fw.bin"
        firmware.write_bytes(b"x")
        result = jobs(ready.group(1), "create", "--file", str(firmware), "--version", "1", "--bucket", "b-1",
                      "--role-arn", ROLE, "--thing", "dev-a")
    finally:
        proc.stop()
    assert result.returncode == 1 and "start it with --files DIR" in result.stderr.splitlines()[-1]
