"""Property-based fuzzing of broker_proc's handling of MQTT payloads on every
job topic (hypothesis), through ``Agent.handle_message`` — the path every
message from the MQTT broker takes — with the real AWS side (the emulator's
JobStore) and the protocol fakes of tests/unit/test_broker_lifecycle.py.

Each example builds a world, holds a job at one point (no job yet, during
the download, the install hook or the restart hook), delivers a burst of
hostile messages to the agent, lets the job go on and advances the clock
past every bound. Messages: every topic the broker subscribes to (and
near-misses), the live job's id, another id and hostile ids; payloads of
raw bytes, hostile JSON, and AWS-shaped answers with hostile fields — some
carrying the agent's own current clientToken, so that they pass as the
answer it waits for.

Properties:
- nothing escapes ``handle_message``, ``on_time`` or the world's delivery;
- no payload reaches the catch-all "unexpected shape" path (every shape is
  refused by a check that names it);
- the job still ends in a terminal status and the agent goes idle: nothing
  waits forever (DESIGN promise 6);
- a burst with no parseable JSON object for the live job leaves its outcome
  alone: SUCCEEDED with ``complete_ready``, the install hook run once.

Short run (CI): ``UPPARAT_FUZZ_EXAMPLES`` (default 300). Long run: docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_broker_lifecycle import THING, World
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.safejson import BadJson, loads

EXAMPLES = int(os.environ.get("UPPARAT_FUZZ_EXAMPLES", "300"))
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 10))
LIVE = "job-1"
BASE = f"$aws/things/{THING}/jobs"
TOKEN = "<the agent's token>"


class Figures(dict):
    """What a fuzz module counts, printed once its tests are done (``-s``)."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def count(self, what: str) -> None:
        self[what] = self.get(what, 0) + 1

    def fixture(self):
        @pytest.fixture(scope="module", autouse=True)
        def figures():
            yield
            print(f"\n{self.label}: " + json.dumps(dict(sorted(self.items()))))
        return figures


FIGURES = Figures("broker fuzz figures")
count = FIGURES.count
figures = FIGURES.fixture()


class Unexpected(logging.Handler):
    """Records the catch-all path of handle_message (and any other logged traceback)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record):
        if record.exc_info or "unexpected shape" in record.getMessage():
            self.records.append(record.getMessage())


# ---- messages ----------------------------------------------------------------------------

job_ids = st.sampled_from([LIVE, "job-2", "job-1 ", "", "a" * 65, "job/1", "+", "#", "\u00e9", "\ud800", 7, None])
leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(2**63 - 1, 2**64),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), job_ids, st.just(TOKEN),
                 st.sampled_from(["QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "CANCELED", "REMOVED", "TIMED_OUT",
                                  "REJECTED", "reboot_start", "ResourceNotFound", "TerminalStateReached",
                                  "InvalidStateTransition", "VersionMismatch", "RequestThrottled", "\ud800"]))
value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.sampled_from(["jobId", "status", "executionNumber", "versionNumber", "statusDetails", "jobDocument",
                     "clientToken", "code", "message", "execution", "jobs", "inProgressJobs", "queuedJobs",
                     "executionState", "state", "x"]), kids, max_size=5), max_leaves=10)
document = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just("2.0.0"), leaf), "file": st.one_of(st.just("https://b.presigned.x/fw"), leaf),
    "sha256": st.one_of(st.just("a" * 64), leaf), "size": st.one_of(st.just(100), leaf), "meta": leaf,
    "force": leaf, "serial": leaf, "signature": leaf})
execution = st.fixed_dictionaries({}, optional={
    "jobId": job_ids, "status": leaf, "executionNumber": st.one_of(st.just(1), leaf),
    "versionNumber": st.one_of(st.just(2), leaf), "statusDetails": st.one_of(value, st.just({"state": "reboot_start"})),
    "jobDocument": st.one_of(document, value), "queuedAt": leaf, "lastUpdatedAt": leaf})
summary = st.fixed_dictionaries({}, optional={"jobId": job_ids, "executionNumber": leaf, "versionNumber": leaf})
aws_shaped = st.one_of(
    st.fixed_dictionaries({"execution": st.one_of(execution, value)}, optional={"clientToken": leaf, "timestamp": leaf}),
    st.fixed_dictionaries({}, optional={"inProgressJobs": st.lists(summary, max_size=3) | value,
                                        "queuedJobs": st.lists(summary, max_size=3) | value, "clientToken": leaf}),
    st.fixed_dictionaries({"jobs": st.one_of(value, st.fixed_dictionaries(
        {}, optional={"QUEUED": st.lists(summary, max_size=3), "IN_PROGRESS": st.lists(summary, max_size=3)}))}),
    st.fixed_dictionaries({}, optional={"code": leaf, "message": leaf, "clientToken": leaf,
                                        "executionState": st.one_of(value, execution)}),
    st.fixed_dictionaries({}, optional={"executionState": st.one_of(execution, value), "clientToken": leaf,
                                        "jobDocument": document, "timestamp": leaf}),
)
payload = st.one_of(
    aws_shaped.map(lambda v: ("json", v)), value.map(lambda v: ("json", v)),
    st.binary(max_size=300).map(lambda b: ("raw", b)),
    st.sampled_from([b"", b"[" * 60000, b'{"a":' + b"9" * 5000 + b"}", b'{"a":"\\ud800"}', b"\xff\xfe", b"NaN",
                     b'{"a":1,"a":2}', b"x" * 300_000, b"null", b"{}"]).map(lambda b: ("raw", b)),
)
suffixes = ["notify", "notify-next", "get/accepted", "get/rejected", "{job}/get/accepted", "{job}/get/rejected",
            "{job}/update/accepted", "{job}/update/rejected", "{job}/get", "{job}/update", "get", "{job}/x/accepted",
            "notify/extra", "{job}/update/accepted/x"]
message = st.tuples(st.sampled_from(suffixes), job_ids, payload, st.sampled_from(["ours", "other thing"]))


def render(world: World, msg) -> tuple[str, bytes, bool]:
    """(topic, payload, about_live) with the agent's current tokens filled in."""
    suffix, job_id, (kind, body), thing = msg
    job = world.agent.job
    tokens = [world.agent.pending_token] + ([job.describe_token] if job else [])
    token = tokens[len(suffix) % len(tokens)]

    def fill(v):
        if v == TOKEN:
            return token
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        return v

    data = json.dumps(fill(body)).encode() if kind == "json" else body
    name = job_id if isinstance(job_id, str) else str(job_id)
    base = BASE if thing == "ours" else "$aws/things/other-thing/jobs"
    topic = f"{base}/{suffix.format(job=name)}"
    try:
        parsed = loads(data, max_bytes=1 << 20) if data else {}  # the broker reads an empty payload as {}
    except BadJson:
        parsed = None
    about_live = isinstance(parsed, dict) and thing == "ours" and (LIVE in topic or LIVE in data.decode("utf-8", "replace")
                                                                   or "{job}" not in suffix)
    return topic, data, about_live


# ---- the world ---------------------------------------------------------------------------

HOLDS = ("idle", "fetch", "install", "restart")


def build(tmp_path, hold: str) -> World:
    world = World(tmp_path)
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.connect()
    if hold == "fetch":
        world.fetcher.hold = True
    elif hold in ("install", "restart"):
        world.installer.hold.add(hold)
    if hold != "idle":
        world.create(LIVE)
    return world


def release_fetch(world: World, only_while_fetching: bool = False) -> None:
    """The held download ends: the fetcher pushes done for the live job."""
    world.fetcher.hold = False
    job = world.agent.job
    if job is None or job.job_id != LIVE or only_while_fetching and job.phase.value != "fetch":
        return
    world.to_agent.append(("fetcher", fp.FetchStatus(seq=0, job_id=LIVE, execution=job.execution, state=fp.DONE,
                                                     bytes_done=100, bytes_total=100, rate=0, failure=None,
                                                     message="")))


def release_hook(world: World, hold: str) -> None:
    """The held hook (install or restart) ends."""
    world.installer.hold.discard(hold)
    for key, record in world.installer.records.items():
        if record.hook is not None and record.hook.hook == hold and record.hook.state == ip.RUNNING:
            world.installer.finish_hook(key)


def release(world: World, hold: str) -> None:
    if hold == "idle":
        world.create(LIVE)
    elif hold == "fetch":
        release_fetch(world)
    else:
        release_hook(world, hold)
    world.settle()


def run_to_the_end(world: World, deliver, release) -> tuple[dict, tuple[str, str]]:
    """The course of every broker fuzz example: ``deliver`` the hostile input,
    ``release`` the held job, advance past every retry and bound of every
    phase; then what each must show — nothing reached the catch-all path (or
    logged a traceback), the live job ended, the agent is idle. Returns the
    execution and its (status, state)."""
    catcher = Unexpected()
    logger = logging.getLogger("upparat.broker")
    logger.addHandler(catcher)
    try:
        deliver()
        release()
        world.advance(900, step=15)
    finally:
        logger.removeHandler(catcher)
    assert not catcher.records, catcher.records
    execution = world.execution(LIVE)
    assert execution is not None
    assert execution["status"] in ("SUCCEEDED", "FAILED"), (execution["status"], execution["statusDetails"])
    assert world.agent.job is None, world.agent.job.phase
    return execution, (execution["status"], execution["statusDetails"].get("state"))


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(hold=st.sampled_from(HOLDS), burst=st.lists(message, min_size=1, max_size=8))
def test_hostile_payloads_on_every_job_topic_never_crash_and_never_strand_the_job(tmp_path_factory, hold, burst):
    count("examples")
    world = build(tmp_path_factory.mktemp("w"), hold)
    touched = False

    def deliver():
        nonlocal touched
        for msg in burst:
            topic, data, about_live = render(world, msg)
            touched |= about_live
            world.agent.handle_message(topic, data)
            count("messages")
            world.settle()

    execution, outcome = run_to_the_end(world, deliver, lambda: release(world, hold))
    count(f"outcome {outcome[0]} {outcome[1]}")
    installs = [run for run in world.installer.runs if run[0] == "install"]
    if not touched:
        count("bursts that never addressed the live job")
        assert outcome == ("SUCCEEDED", "complete_ready"), execution
        assert len(installs) == 1
    assert len(installs) <= 1, installs
