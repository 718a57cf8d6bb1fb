"""Garbage on the broker's job topics is logged and dropped, never acted on
(DESIGN promise 3), with the real AWS side (the emulator's JobStore) and the
protocol fakes of test_broker_lifecycle. Found by tests/fuzz/test_broker_fuzz.py."""

import json

import pytest

from tests.unit.test_broker_lifecycle import World, final
from upparat.ipc import fetcher_protocol as fp

BASE = "$aws/things/thing-1/jobs"


@pytest.mark.parametrize("payload", [b"", b"{}", b'{"timestamp":1}',
                                     json.dumps({"execution": {"jobId": "job-2", "status": "CANCELED"}}).encode()],
                         ids=["empty", "no execution", "timestamp only", "another job's execution"])
def test_describe_answer_without_the_jobs_execution_is_garbage_not_a_gone_job(tmp_path, payload):
    world = World(tmp_path)
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.connect()
    world.fetcher.hold = True
    world.create("job-1")
    assert world.agent.job.phase.value == "fetch"
    world.agent.handle_message(f"{BASE}/job-1/get/accepted", payload)
    world.settle()
    assert world.agent.job is not None and not world.agent.job.abandoned  # the download goes on
    assert "cancel_fetch" not in world.fetcher.calls
    world.fetcher.hold = False
    world.to_agent.append(("fetcher", fp.FetchStatus(seq=0, job_id="job-1", execution=1, state=fp.DONE,
                                                     bytes_done=100, bytes_total=100, rate=0, failure=None,
                                                     message="")))
    world.settle()
    world.advance(120, step=5)
    assert final(world, "job-1") == ("SUCCEEDED", "complete_ready")
    assert [hook for hook, _ in world.installer.runs].count("install") == 1
