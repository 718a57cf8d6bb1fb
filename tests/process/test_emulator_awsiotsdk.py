"""The jobs emulator against AWS's own device SDK (awsiotsdk / awscrt) over a real Mosquitto.

AWS's clients are the judge of the wire shapes: every reply and event is parsed by the SDK's
own deserializers (``from_payload``), and the classic client hands ``None`` to a callback
whose payload it could not parse, so ``received(...)`` never returning None is part of the
proof. Timestamps are checked to be near "now", which only works if they are seconds.

Both SDK clients run on plain TCP to 127.0.0.1 (``tls_ctx=None``):
- ``IotJobsClient`` (classic, MQTT 3.1.1 through ``awscrt.mqtt.Connection``);
- ``IotJobsClientV2`` (request-response client over MQTT 5 through ``awscrt.mqtt5.Client``).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import itertools
import queue
from collections import defaultdict
from concurrent.futures import Future

import pytest

awscrt = pytest.importorskip("awscrt")
awsiot = pytest.importorskip("awsiot")

from awscrt import common, io, mqtt, mqtt5, mqtt_request_response  # noqa: E402
from awsiot import iotjobs  # noqa: E402

from upparat.devtools.jobs_emulator import JobsEmulator  # noqa: E402

pytestmark = pytest.mark.timeout(60)

THING = "sdk-thing"
QOS1 = mqtt.QoS.AT_LEAST_ONCE
WAIT = 5.0
S3_URL = "https://bucket.s3.amazonaws.com/fw.raucb"
DOCUMENT = {"version": "1.2.0", "file": "${aws:iot:s3-presigned-url:" + S3_URL + "}",
            "meta": "m", "force": False, "size": 3}


def _release_crt() -> None:
    """Free the CRT's native resources before the interpreter finalises: left to
    finalisation (e.g. a client kept alive by a failed test's traceback) the CRT can abort
    the process at exit. Runs at exit, once pytest has dropped its test items."""
    gc.collect()
    io.ClientBootstrap.release_static_default()
    io.DefaultHostResolver.release_static_default()
    io.EventLoopGroup.release_static_default()
    gc.collect()
    common.join_all_native_threads(timeout_sec=5)


atexit.register(_release_crt)


@pytest.fixture
def emulator(mosquitto):
    counter = itertools.count(1)
    emu = JobsEmulator("127.0.0.1", mosquitto,
                       presign=lambda url: f"http://127.0.0.1:9/fw.raucb?sig={next(counter)}&for={url}")
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


class Inbox:
    """One queue per event name; ``received`` waits with a deadline."""

    def __init__(self):
        self._queues = defaultdict(queue.Queue)

    def callback(self, name):
        return lambda event: self._queues[name].put(event)

    def received(self, name, timeout: float = WAIT):
        try:
            event = self._queues[name].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {name} within {timeout}s") from None
        assert event is not None, f"the SDK could not parse the {name} payload"
        return event

    def empty(self, name) -> bool:
        return self._queues[name].empty()


def assert_now(ts):
    """A datetime from the SDK close to now: seconds, not milliseconds (pitfall 6)."""
    assert isinstance(ts, datetime.datetime)
    assert abs(ts - datetime.datetime.now()) < datetime.timedelta(minutes=5)


def assert_execution(execution, job_id, status, version, document=True):
    assert isinstance(execution, iotjobs.JobExecutionData)
    assert execution.job_id == job_id
    assert execution.status == status
    assert execution.version_number == version
    assert execution.execution_number == 1
    assert execution.thing_name is None  # not in live AWS payloads
    assert_now(execution.queued_at)
    assert_now(execution.last_updated_at)
    if status == "QUEUED":
        assert execution.started_at is None
    else:
        assert_now(execution.started_at)
    if document:
        assert isinstance(execution.job_document, dict)
        assert execution.job_document["version"] == DOCUMENT["version"]
        assert execution.job_document["file"].startswith("http://127.0.0.1:9/fw.raucb?sig=")
        assert S3_URL in execution.job_document["file"]
    else:
        assert execution.job_document is None


# ---------------------------------------------------------------------- classic client

@pytest.fixture
def classic(mosquitto):
    bootstrap = io.ClientBootstrap.get_or_create_static_default()
    connection = mqtt.Connection(client=mqtt.Client(bootstrap, None), host_name="127.0.0.1",
                                 port=mosquitto, client_id=f"{THING}-classic",
                                 clean_session=True, keep_alive_secs=30)
    connection.connect().result(WAIT)
    try:
        yield connection
    finally:
        connection.disconnect().result(WAIT)


def subscribe_all(jobs: iotjobs.IotJobsClient, inbox: Inbox, job_ids):
    thing = iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=THING)
    futures = [
        jobs.subscribe_to_get_pending_job_executions_accepted(thing, QOS1, inbox.callback("get+"))[0],
        jobs.subscribe_to_get_pending_job_executions_rejected(thing, QOS1, inbox.callback("get-"))[0],
        jobs.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=THING), QOS1,
            inbox.callback("start+"))[0],
        jobs.subscribe_to_job_executions_changed_events(
            iotjobs.JobExecutionsChangedSubscriptionRequest(thing_name=THING), QOS1,
            inbox.callback("notify"))[0],
        jobs.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=THING), QOS1,
            inbox.callback("notify-next"))[0],
    ]
    for job_id in job_ids:
        describe = iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=THING, job_id=job_id)
        update = iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=THING, job_id=job_id)
        futures += [
            jobs.subscribe_to_describe_job_execution_accepted(describe, QOS1, inbox.callback(f"{job_id}/get+"))[0],
            jobs.subscribe_to_describe_job_execution_rejected(describe, QOS1, inbox.callback(f"{job_id}/get-"))[0],
            jobs.subscribe_to_update_job_execution_accepted(update, QOS1, inbox.callback(f"{job_id}/update+"))[0],
            jobs.subscribe_to_update_job_execution_rejected(update, QOS1, inbox.callback(f"{job_id}/update-"))[0],
        ]
    for future in futures:
        future.result(WAIT)  # SUBACK received


def test_classic_client_full_lifecycle_and_errors(emulator, classic):
    jobs = iotjobs.IotJobsClient(classic)
    inbox = Inbox()
    subscribe_all(jobs, inbox, ["job1", "job2", "$next", "nosuch"])

    def update(job_id, **fields):
        jobs.publish_update_job_execution(
            iotjobs.UpdateJobExecutionRequest(thing_name=THING, job_id=job_id, **fields), QOS1).result(WAIT)

    # create -> notify + notify-next (it is the head)
    emulator.create_job("job1", DOCUMENT, [THING])
    event = inbox.received("notify")
    assert_now(event.timestamp)
    assert list(event.jobs) == ["QUEUED"]
    assert [s.job_id for s in event.jobs["QUEUED"]] == ["job1"]
    assert event.jobs["QUEUED"][0].version_number == 1
    nxt = inbox.received("notify-next")
    assert_now(nxt.timestamp)
    assert_execution(nxt.execution, "job1", "QUEUED", 1)

    # a second job behind the head -> notify only (proved below: the next notify-next is job2's)
    emulator.create_job("job2", DOCUMENT, [THING])
    assert [s.job_id for s in inbox.received("notify").jobs["QUEUED"]] == ["job1", "job2"]

    # get pending
    jobs.publish_get_pending_job_executions(
        iotjobs.GetPendingJobExecutionsRequest(thing_name=THING, client_token="c-get"), QOS1).result(WAIT)
    pending = inbox.received("get+")
    assert pending.client_token == "c-get"
    assert_now(pending.timestamp)
    assert pending.in_progress_jobs == []
    assert [s.job_id for s in pending.queued_jobs] == ["job1", "job2"]
    assert all(s.started_at is None and s.version_number == 1 for s in pending.queued_jobs)

    # start-next: job1 QUEUED -> IN_PROGRESS, version 1 -> 2, fresh presigned URL
    jobs.publish_start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(thing_name=THING, client_token="c-start",
                                                    status_details={"state": "download_start"}),
        QOS1).result(WAIT)
    started = inbox.received("start+")
    assert started.client_token == "c-start"
    assert_execution(started.execution, "job1", "IN_PROGRESS", 2)
    assert started.execution.status_details == {"state": "download_start"}
    assert started.execution.job_document["file"] != nxt.execution.job_document["file"]

    # describe $next (read-only) and job2 without its document
    jobs.publish_describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="$next"), QOS1).result(WAIT)
    assert_execution(inbox.received("$next/get+").execution, "job1", "IN_PROGRESS", 2)
    jobs.publish_describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="job2", include_job_document=False,
                                            execution_number=1), QOS1).result(WAIT)
    assert_execution(inbox.received("job2/get+").execution, "job2", "QUEUED", 1, document=False)

    # update with expectedVersion, state and document in the answer
    update("job1", status="IN_PROGRESS", expected_version=2, status_details={"state": "installation_start"},
           include_job_execution_state=True, include_job_document=True, client_token="c-u1")
    accepted = inbox.received("job1/update+")
    assert accepted.client_token == "c-u1"
    assert accepted.execution_state.status == "IN_PROGRESS"
    assert accepted.execution_state.version_number == 3
    assert accepted.execution_state.status_details == {"state": "installation_start"}
    assert accepted.job_document["version"] == "1.2.0"

    # VersionMismatch carries the current state
    update("job1", status="SUCCEEDED", expected_version=2, client_token="c-vm")
    rejected = inbox.received("job1/update-")
    assert rejected.code == iotjobs.RejectedErrorCode.VERSION_MISMATCH
    assert rejected.client_token == "c-vm"
    assert rejected.execution_state.version_number == 3
    assert rejected.execution_state.status == "IN_PROGRESS"
    assert_now(rejected.timestamp)

    # terminal update of the head -> accepted + notify + notify-next(job2)
    update("job1", status="SUCCEEDED", expected_version=3, status_details={"state": "complete_ready"})
    accepted = inbox.received("job1/update+")
    assert accepted.client_token is None and accepted.execution_state is None
    assert [s.job_id for s in inbox.received("notify").jobs["QUEUED"]] == ["job2"]
    assert_execution(inbox.received("notify-next").execution, "job2", "QUEUED", 1)

    # further updates of a terminal execution
    update("job1", status="IN_PROGRESS")
    rejected = inbox.received("job1/update-")
    assert rejected.code == iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION
    assert rejected.execution_state.status == "SUCCEEDED"

    # unknown job, missing status, bad statusDetails, non-JSON payload
    update("nosuch", status="SUCCEEDED")
    assert inbox.received("nosuch/update-").code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND
    jobs.publish_describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="nosuch"), QOS1).result(WAIT)
    assert inbox.received("nosuch/get-").code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND
    update("job2", client_token="c-nostatus")
    rejected = inbox.received("job2/update-")
    assert rejected.code == iotjobs.RejectedErrorCode.INVALID_REQUEST
    assert rejected.client_token == "c-nostatus" and rejected.execution_state is None
    update("job2", status="IN_PROGRESS", status_details={"log": "line1\nline2"})
    assert inbox.received("job2/update-").code == iotjobs.RejectedErrorCode.INVALID_REQUEST
    classic.publish(f"$aws/things/{THING}/jobs/get", b"{not json", QOS1)[0].result(WAIT)
    assert inbox.received("get-").code == iotjobs.RejectedErrorCode.INVALID_JSON

    # the last pending job fails -> empty notify and notify-next without execution
    update("job2", status="FAILED", status_details={"state": "download_failed", "message": "403"})
    assert inbox.received("job2/update+").execution_state is None
    assert inbox.received("notify").jobs == {}
    assert inbox.received("notify-next").execution is None

    # an empty start-next answer has no execution; no other notifications were sent
    jobs.publish_start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(thing_name=THING), QOS1).result(WAIT)
    assert inbox.received("start+").execution is None
    assert inbox.empty("notify") and inbox.empty("notify-next")

    final = emulator.execution("job1", THING)
    assert [h["versionNumber"] for h in final["history"]] == [2, 3, 4]
    assert final["statusDetails"] == {"state": "complete_ready"}


def test_classic_client_sees_force_cancel_and_deletion(emulator, classic):
    jobs = iotjobs.IotJobsClient(classic)
    inbox = Inbox()
    subscribe_all(jobs, inbox, ["job1", "job2"])
    emulator.create_job("job1", DOCUMENT, [THING])
    emulator.create_job("job2", DOCUMENT, [THING])
    inbox.received("notify"), inbox.received("notify-next"), inbox.received("notify")

    jobs.publish_start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(thing_name=THING), QOS1).result(WAIT)
    assert_execution(inbox.received("start+").execution, "job1", "IN_PROGRESS", 2)

    emulator.cancel_job("job1")  # not forced: IN_PROGRESS stays, nothing is announced
    assert emulator.execution("job1", THING)["status"] == "IN_PROGRESS"
    emulator.cancel_job("job1", force=True)
    assert [s.job_id for s in inbox.received("notify").jobs["QUEUED"]] == ["job2"]
    assert_execution(inbox.received("notify-next").execution, "job2", "QUEUED", 1)
    jobs.publish_update_job_execution(
        iotjobs.UpdateJobExecutionRequest(thing_name=THING, job_id="job1", status="SUCCEEDED"),
        QOS1).result(WAIT)
    rejected = inbox.received("job1/update-")
    assert rejected.code == iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION
    assert rejected.execution_state.status == "CANCELED"

    emulator.delete_execution("job2", THING)
    assert inbox.received("notify").jobs == {}
    assert inbox.received("notify-next").execution is None
    jobs.publish_describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="job2"), QOS1).result(WAIT)
    assert inbox.received("job2/get-").code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND


# ---------------------------------------------------------------------- V2 client (MQTT 5)

@pytest.fixture
def mqtt5_client(mosquitto):
    connected: Future = Future()
    stopped: Future = Future()

    def on_success(_data):
        if not connected.done():
            connected.set_result(True)

    def on_failure(data):
        if not connected.done():
            connected.set_exception(RuntimeError(f"MQTT 5 connect failed: {data.exception}"))

    client = mqtt5.Client(mqtt5.ClientOptions(
        host_name="127.0.0.1", port=mosquitto,
        bootstrap=io.ClientBootstrap.get_or_create_static_default(),
        connect_options=mqtt5.ConnectPacket(client_id=f"{THING}-v2", keep_alive_interval_sec=30),
        on_lifecycle_event_connection_success_fn=on_success,
        on_lifecycle_event_connection_failure_fn=on_failure,
        on_lifecycle_event_stopped_fn=lambda _data: stopped.done() or stopped.set_result(True)))
    client.start()
    try:
        connected.result(WAIT)
        yield client
    finally:
        client.stop()
        stopped.result(WAIT)


def open_stream(create, request, inbox: Inbox, name):
    established: Future = Future()

    def on_status(event):
        if event.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED \
                and not established.done():
            established.set_result(True)

    stream = create(request, awsiot.ServiceStreamOptions(
        incoming_event_listener=inbox.callback(name), subscription_status_listener=on_status,
        deserialization_failure_listener=lambda failure: inbox.callback(name)(None)))
    stream.open()
    established.result(WAIT)
    return stream


def v2_error(future) -> iotjobs.V2ErrorResponse:
    with pytest.raises(awsiot.V2ServiceException) as info:
        future.result(WAIT)
    assert info.value.modeled_error is not None, f"not a modeled rejection: {info.value.inner_error!r}"
    return info.value.modeled_error


def test_v2_client_over_mqtt5(emulator, mqtt5_client):
    jobs = iotjobs.IotJobsClientV2(mqtt5_client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=4, max_streaming_subscriptions=2,
        operation_timeout_in_seconds=10))
    inbox = Inbox()
    streams = [  # keep references: a collected stream unsubscribes
        open_stream(jobs.create_job_executions_changed_stream,
                    iotjobs.JobExecutionsChangedSubscriptionRequest(thing_name=THING), inbox, "notify"),
        open_stream(jobs.create_next_job_execution_changed_stream,
                    iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=THING), inbox, "notify-next"),
    ]

    emulator.create_job("job1", DOCUMENT, [THING])
    assert [s.job_id for s in inbox.received("notify").jobs["QUEUED"]] == ["job1"]
    assert_execution(inbox.received("notify-next").execution, "job1", "QUEUED", 1)

    pending = jobs.get_pending_job_executions(
        iotjobs.GetPendingJobExecutionsRequest(thing_name=THING)).result(WAIT)
    assert [s.job_id for s in pending.queued_jobs] == ["job1"] and pending.in_progress_jobs == []
    assert_now(pending.timestamp)

    nothing_started = jobs.describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="$next")).result(WAIT)
    assert_execution(nothing_started.execution, "job1", "QUEUED", 1)

    started = jobs.start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(thing_name=THING)).result(WAIT)
    assert_execution(started.execution, "job1", "IN_PROGRESS", 2)
    assert started.execution.status_details is None

    described = jobs.describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="job1", include_job_document=False)
    ).result(WAIT)
    assert_execution(described.execution, "job1", "IN_PROGRESS", 2, document=False)

    updated = jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=THING, job_id="job1", status="IN_PROGRESS", expected_version="2",  # string: pitfall 14
        status_details={"state": "download_progress"}, include_job_execution_state=True)).result(WAIT)
    assert updated.execution_state.version_number == 3
    assert_now(updated.timestamp)

    error = v2_error(jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=THING, job_id="job1", status="SUCCEEDED", expected_version=2)))
    assert error.code == iotjobs.RejectedErrorCode.VERSION_MISMATCH
    assert error.execution_state.version_number == 3
    assert error.execution_state.status_details == {"state": "download_progress"}

    error = v2_error(jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=THING, job_id="job1", status="CANCELED")))
    assert error.code == iotjobs.RejectedErrorCode.INVALID_REQUEST

    error = v2_error(jobs.describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=THING, job_id="nosuch")))
    assert error.code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND

    jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=THING, job_id="job1", status="SUCCEEDED", expected_version=3)).result(WAIT)
    assert inbox.received("notify").jobs == {}
    assert inbox.received("notify-next").execution is None
    emulator.wait_for_status("job1", THING, {"SUCCEEDED"}, timeout=WAIT)

    error = v2_error(jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=THING, job_id="job1", status="FAILED")))
    assert error.code == iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION
    assert error.execution_state.status == "SUCCEEDED"

    idle = jobs.start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(thing_name=THING)).result(WAIT)
    assert idle.execution is None
    assert inbox.empty("notify") and inbox.empty("notify-next")
    del streams  # held until here: a collected stream unsubscribes
