"""Network faults with the real four processes (issue 11): the device reaches
Mosquitto and the file server through a FaultProxy each
(upparat/devtools/faultproxy.py), and the tests make the network misbehave
in the middle of a job — MQTT held (blackholed) for a while, held and then
reset, every connection cut, MQTT latency, HTTP slowed below the low-speed
limit, HTTP refused. The job still ends as it should, with the published
bytes installed once and its status reported in order."""

from __future__ import annotations

import os

import pytest

from tests.support import poll_for, running_sandbox
from upparat.devtools.sandbox import sha256_of

KiB, MiB = 1024, 1024 * 1024
MILESTONES = ["download_start", "installation_start", "reboot_start", "complete_ready"]

# install records every run, so that "installed once" can be checked
HOOKS = {"install": """#!/bin/sh
set -e
echo run >> "{base}/state/install-runs"
cp "$4" "{base}/installed/fw.bin"
echo "$3" > "{base}/state/pending"
"""}


@pytest.fixture
def box(world_tmp):
    with running_sandbox(world_tmp / "box", hooks=HOOKS, network_faults=True) as sandbox:
        yield sandbox


@pytest.fixture
def slow_box(world_tmp):
    with running_sandbox(world_tmp / "box", hooks=HOOKS, network_faults=True,
                         service_extra="low_speed_limit = 100000\nlow_speed_time = 2\n") as sandbox:
        yield sandbox


def start_job(box, job_id, size=300 * KiB, version="2.0.0"):
    box.add_file(f"{job_id}.bin", os.urandom(size))
    box.create_job(job_id, box.document(f"{job_id}.bin", version))


def assert_succeeded_once(box, job_id, final):
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
        box.logs()[-4000:]
    states = [h["statusDetails"].get("state") for h in final["history"]]
    assert [s for s in states if s in MILESTONES] == MILESTONES, states
    assert box.path("state", "install-runs").read_text().count("run") == 1
    assert sha256_of(box.path("installed", "fw.bin")) == sha256_of(box.path("files", f"{job_id}.bin"))


def hold_the_download(box, seconds=2.0):
    """The file server waits before its answer, so that a fault set once
    download_start is seen lands before installation_start: a job with
    instant hooks goes from one to the other in milliseconds."""
    box.files.faults.delay_s = seconds
    box.files.faults.times = 1


def reported(box, job_id, state):
    execution = box.execution(job_id)
    return execution is not None and any(h["statusDetails"].get("state") == state
                                         for h in execution.get("history", []))


def test_mqtt_blackholed_mid_job_holds_the_reports_and_the_job_still_succeeds(box):
    hold_the_download(box)
    start_job(box, "job-hole")
    poll_for(lambda: reported(box, "job-hole", "download_start"), 30, what="download_start reported")
    box.mqtt_proxy.blackhole()
    # The device works on (download, install) but cannot report: AWS sees nothing new.
    poll_for(lambda: box.path("state", "install-runs").exists(), 30, what="the install hook to run")
    held = box.execution("job-hole")
    assert held["status"] == "IN_PROGRESS" and not reported(box, "job-hole", "installation_start")
    box.mqtt_proxy.lift()
    final = box.wait_for_job("job-hole", timeout=60)
    assert_succeeded_once(box, "job-hole", final)
    assert box.mqtt_proxy.connections == 1  # the held connection lived on: no reconnect was needed


def test_mqtt_blackholed_then_reset_the_device_reconnects_and_the_job_succeeds(box):
    hold_the_download(box)
    start_job(box, "job-reset")
    poll_for(lambda: reported(box, "job-reset", "download_start"), 30, what="download_start reported")
    box.mqtt_proxy.blackhole()
    poll_for(lambda: box.path("state", "install-runs").exists(), 30, what="the install hook to run")
    box.mqtt_proxy.lift(cut=True)  # the connection's state timed out somewhere meanwhile
    final = box.wait_for_job("job-reset", timeout=60)
    assert_succeeded_once(box, "job-reset", final)
    assert box.mqtt_proxy.connections >= 2  # the device connected again


def test_every_mqtt_connection_cut_at_each_milestone_the_job_succeeds(box):
    start_job(box, "job-cut")
    for state in MILESTONES[:3]:
        poll_for(lambda s=state: reported(box, "job-cut", s), 60, what=f"{state} reported")
        # The milestone may have been reported before the previous cut: then the
        # broker is still reconnecting, and the cut waits for its new connection.
        poll_for(lambda: box.mqtt_proxy.cut() >= 1, 30, what="a connection of the broker to cut")
    final = box.wait_for_job("job-cut", timeout=60)
    assert_succeeded_once(box, "job-cut", final)
    assert box.mqtt_proxy.connections >= 2


def test_mqtt_latency_of_300_ms_each_way_the_job_succeeds(box):
    box.mqtt_proxy.delay(0.3)
    start_job(box, "job-late")
    final = box.wait_for_job("job-late", timeout=90)
    assert_succeeded_once(box, "job-late", final)


def test_http_slowed_below_the_low_speed_limit_is_aborted_and_resumed_with_a_range_request(slow_box):
    box = slow_box
    box.http_proxy.slow(20 * KiB)  # far below low_speed_limit = 100000 bytes/s
    start_job(box, "job-slow", size=2 * MiB)
    poll_for(lambda: "the transfer stalled: less than 100000 bytes/s" in box.logs(), 30,
             what="the low-speed abort")
    box.http_proxy.slow(None)
    final = box.wait_for_job("job-slow", timeout=60)
    assert_succeeded_once(box, "job-slow", final)
    ranges = [r for _, r in box.files.requests if r]
    assert ranges and all(r.startswith("bytes=") for r in ranges), box.files.requests
    assert int(ranges[0][len("bytes="):].rstrip("-")) > 0  # resumed from where it was, not from zero


def test_http_refused_for_a_while_the_download_is_retried_and_succeeds(box):
    box.http_proxy.refuse(True)
    start_job(box, "job-down")
    poll_for(lambda: "attempt 2 failed" in box.logs(), 30, what="two failed attempts")
    box.http_proxy.refuse(False)
    final = box.wait_for_job("job-down", timeout=60)
    assert_succeeded_once(box, "job-down", final)
