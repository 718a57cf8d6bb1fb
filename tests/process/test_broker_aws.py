"""broker_proc against an AWS side that misbehaves: rejected, lost and late
status replies (the emulator's fault rules) and hostile payloads on every
jobs topic. Real supervisor, Mosquitto, emulator and file server."""

import json
import os
import random

import paho.mqtt.client as mqtt
import pytest

from tests.support import child_pids, running_sandbox
from upparat.devtools.jobs_emulator import FaultRule
from upparat.devtools.sandbox import THING


@pytest.fixture
def box(world_tmp):
    with running_sandbox(world_tmp / "box") as sandbox:
        yield sandbox


def states(execution):
    return [h["statusDetails"].get("state") for h in execution["history"]]


def run_job(box, job_id, version="2.0.0", timeout=90):
    box.add_file(f"{job_id}.bin", os.urandom(20_000))
    box.create_job(job_id, box.document(f"{job_id}.bin", version))
    return box.wait_for_job(job_id, timeout=timeout)


def test_reboot_start_throttled_twice_the_restart_waits_for_acceptance(box):
    box.emulator.faults.add(FaultRule(state="reboot_start", action="reject", code="RequestThrottled", times=2))
    final = run_job(box, "job-throttled", timeout=120)
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), box.logs()[-4000:]
    assert box.emulator.faults.applied == [("reject", "reboot_start")] * 2
    assert states(final) == ["download_start", "installation_start", "reboot_start", "complete_ready"]
    log = box.logs()
    assert log.index("AWS holds reboot_start") > log.rindex("rejected with RequestThrottled")


def test_lost_update_replies_are_resent_and_nothing_is_stored_twice_or_out_of_order(box):
    box.emulator.faults.add(FaultRule(state="download_start", action="drop", times=1))
    box.emulator.faults.add(FaultRule(state="installation_start", action="drop", times=1))
    final = run_job(box, "job-lost-replies", timeout=120)
    assert final["status"] == "SUCCEEDED", box.logs()[-4000:]
    assert states(final) == ["download_start", "installation_start", "reboot_start", "complete_ready"]
    assert "was already stored" in box.logs()


def test_late_update_replies_do_not_reorder_the_status(box):
    box.emulator.faults.add(FaultRule(state=None, action="delay", seconds=1.5, times=3))
    final = run_job(box, "job-late", timeout=120)
    assert final["status"] == "SUCCEEDED", box.logs()[-4000:]
    assert states(final)[-1] == "complete_ready"
    assert states(final).index("reboot_start") > states(final).index("installation_start")


def garbage_payloads(seed: int, count: int):
    rng = random.Random(seed)
    valid = [
        {"jobs": {"QUEUED": [{"jobId": "j1", "executionNumber": 1}]}},
        {"execution": {"jobId": "j1", "status": "QUEUED", "versionNumber": 1, "executionNumber": 1,
                       "jobDocument": {"version": "1", "file": "https://x/y", "sha256": "a" * 64}}},
        {"inProgressJobs": [], "queuedJobs": [{"jobId": "j1"}], "clientToken": "x"},
        {"code": "InvalidStateTransition", "clientToken": "t", "executionState": {"status": "CANCELED"}},
    ]
    specials = [b"[" * 60000, b'{"a":' + b"9" * 5000 + b"}", b'{"a":"\\ud800"}', b"\xff\xfe\x00",
                b'{"a":1,"a":2}', b"NaN", b'{"jobs":[]}', b'{"execution":[]}', b"x" * 300_000]
    for n in range(count):
        if n < len(specials):
            yield specials[n]
            continue
        data = bytearray(json.dumps(rng.choice(valid)).encode())
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) or 1)
            if op == 0 and data:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos:pos + rng.randint(1, 8)]
            elif op == 2:
                data[pos:pos] = rng.choice([b"{", b"[", b'"', b"\\ud800", b"1e999", b"null", b"-0"])
            else:
                data = data[:pos]
        yield bytes(data)


def test_a_thousand_fuzzed_payloads_on_every_jobs_topic_leave_the_broker_running(box):
    broker_pid = child_pids(box.supervisor.pid)["broker"]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer")
    client.connect("127.0.0.1", box.mqtt_port)
    client.loop_start()
    base = f"$aws/things/{THING}/jobs"
    topics = [f"{base}/notify", f"{base}/notify-next", f"{base}/get/accepted", f"{base}/get/rejected",
              f"{base}/j1/get/accepted", f"{base}/j1/get/rejected", f"{base}/j1/update/accepted",
              f"{base}/j1/update/rejected"]
    try:
        for topic in topics:
            for payload in garbage_payloads(seed=hash(topic) & 0xFFFF, count=1000):
                client.publish(topic, payload, qos=0)
        # the last one with QoS 1, so that everything before it has been delivered
        client.publish(topics[0], b"{}", qos=1).wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()
    final = run_job(box, "job-after-fuzz")
    assert final["status"] == "SUCCEEDED", box.logs()[-4000:]
    assert child_pids(box.supervisor.pid)["broker"] == broker_pid  # never crashed and restarted
