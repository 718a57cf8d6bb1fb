"""The jobs emulator as users run it: the ``upparat-jobs-emulator`` program with its JSON
control API, a plain paho-mqtt device, a real Mosquitto; plus the Python API's waits."""

from __future__ import annotations

import json
import queue
import re
import threading

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import PYTHON, Proc, free_port, poll_for
from upparat.devtools.jobs_emulator import JobsEmulator

pytestmark = pytest.mark.timeout(60)

THING = "paho-thing"
BASE = f"$aws/things/{THING}/jobs"
WAIT = 5.0


class Device:
    """A paho client subscribed like a device agent should be (reply topics included)."""

    FILTERS = [f"{BASE}/notify-next", f"{BASE}/start-next/+", f"{BASE}/+/update/+", f"{BASE}/+/get/+"]

    def __init__(self, port: int):
        self.messages: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"{THING}-paho")
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in self.FILTERS])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(WAIT), "device: no SUBACK"

    def _on_message(self, _client, _userdata, message):
        self._queue(message.topic).put(json.loads(message.payload))

    def _queue(self, topic) -> queue.Queue:
        with self._lock:
            return self.messages.setdefault(topic, queue.Queue())

    def publish(self, suffix: str, payload: dict) -> None:
        self.client.publish(f"{BASE}/{suffix}", json.dumps(payload), qos=1).wait_for_publish(WAIT)

    def received(self, suffix: str) -> dict:
        try:
            return self._queue(f"{BASE}/{suffix}").get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"device got nothing on {suffix} within {WAIT}s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(mosquitto):
    dev = Device(mosquitto)
    try:
        yield dev
    finally:
        dev.close()


def test_command_line_emulator_with_control_api(mosquitto, device, tmp_path):
    proc = Proc([PYTHON, "-m", "upparat.devtools.jobs_emulator", "--mqtt-port", mosquitto,
                 "--http-port", "0", "--presign-base", "http://files.example/"],
                tmp_path / "emulator.log")
    try:
        ready = poll_for(lambda: re.search(r"control http://127\.0\.0\.1:(\d+)", proc.log())
                         or (not proc.alive() and pytest.fail(proc.log())), WAIT, what="emulator ready")
        api = f"http://127.0.0.1:{ready.group(1)}"

        document = {"version": "2.0", "file": "${aws:iot:s3-presigned-url:https://b.s3.amazonaws.com/fw/a.raucb}"}
        answer = requests.post(f"{api}/jobs", json={"jobId": "j1", "document": document,
                                                    "things": [THING]}, timeout=WAIT)
        assert answer.status_code == 201, answer.text
        announced = device.received("notify-next")["execution"]
        assert announced["jobId"] == "j1"
        assert re.fullmatch(r"http://files\.example/a\.raucb\?X-Amz-Date=\w+&X-Amz-Expires=3600"
                            r"&X-Amz-Signature=[0-9a-f]{64}", announced["jobDocument"]["file"])

        device.publish("start-next", {"clientToken": "t1"})
        started = device.received("start-next/accepted")
        assert started["clientToken"] == "t1"
        assert started["execution"]["jobDocument"]["file"] != announced["jobDocument"]["file"]
        device.publish("j1/update", {"status": "SUCCEEDED", "statusDetails": {"state": "complete_ready"}})
        assert set(device.received("j1/update/accepted")) == {"timestamp"}
        assert set(device.received("notify-next")) == {"timestamp"}  # nothing pending any more

        snapshot = requests.get(f"{api}/jobs/j1/things/{THING}", timeout=WAIT).json()
        assert snapshot["status"] == "SUCCEEDED"
        assert [h["status"] for h in snapshot["history"]] == ["IN_PROGRESS", "SUCCEEDED"]

        for body, fragment in [({"jobId": "j2", "document": {}}, "missing things"),
                               ({"jobId": "get", "document": {}, "things": [THING]}, "verb"),
                               ({"jobId": "j2", "document": [], "things": [THING]}, "JSON object")]:
            bad = requests.post(f"{api}/jobs", json=body, timeout=WAIT)
            assert bad.status_code == 400 and fragment in bad.json()["error"], bad.text
        bad = requests.post(f"{api}/jobs", data=b"{nope", timeout=WAIT)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        assert requests.get(f"{api}/jobs/nope/things/{THING}", timeout=WAIT).status_code == 404

        assert requests.post(f"{api}/jobs", json={"jobId": "j2", "document": {"version": "3"},
                                                  "things": [THING]}, timeout=WAIT).status_code == 201
        assert device.received("notify-next")["execution"]["jobId"] == "j2"
        bad = requests.post(f"{api}/jobs/j2/cancel", json={"force": "yes"}, timeout=WAIT)
        assert bad.status_code == 400 and "force" in bad.json()["error"]
        assert requests.post(f"{api}/jobs/j2/cancel", json={"force": True}, timeout=WAIT).status_code == 200
        assert set(device.received("notify-next")) == {"timestamp"}
        assert requests.get(f"{api}/jobs/j2/things/{THING}", timeout=WAIT).json()["status"] == "CANCELED"
        assert requests.delete(f"{api}/jobs/j2/things/{THING}", timeout=WAIT).status_code == 200
        assert requests.get(f"{api}/jobs/j2/things/{THING}", timeout=WAIT).status_code == 404
    finally:
        code = proc.stop()
    assert code == 0, proc.log()  # SIGTERM is a clean stop


def test_command_line_exits_1_without_broker(tmp_path):
    proc = Proc([PYTHON, "-m", "upparat.devtools.jobs_emulator", "--mqtt-port", free_port(),
                 "--http-port", "0"], tmp_path / "emulator.log")
    try:
        poll_for(lambda: not proc.alive(), 15, what="emulator exit")
    finally:
        code = proc.stop()
    assert code == 1
    assert "cannot reach MQTT broker" in proc.log()


def test_start_raises_without_broker():
    emulator = JobsEmulator("127.0.0.1", free_port(), start_timeout=2)
    with pytest.raises(ConnectionError, match="cannot reach"):
        emulator.start()


def test_wait_for_status_wakes_on_device_update_and_times_out_with_snapshot(mosquitto, device):
    emulator = JobsEmulator("127.0.0.1", mosquitto)
    emulator.start()
    try:
        emulator.create_job("j1", {"version": "1"}, [THING])
        with pytest.raises(TimeoutError, match="'status': 'QUEUED'"):
            emulator.wait_for_status("j1", THING, {"SUCCEEDED"}, timeout=0.3)
        device.publish("j1/update", {"status": "IN_PROGRESS", "statusDetails": {"state": "download_start"}})
        snapshot = emulator.wait_for_status("j1", THING, {"IN_PROGRESS"}, timeout=WAIT)
        assert snapshot["statusDetails"] == {"state": "download_start"}
        assert snapshot["versionNumber"] == 2
        with pytest.raises(TimeoutError):
            emulator.wait_for_status("nope", THING, {"SUCCEEDED"}, timeout=0.1)
    finally:
        emulator.stop()
