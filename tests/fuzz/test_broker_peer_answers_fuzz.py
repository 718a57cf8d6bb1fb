"""Property-based fuzzing of broker_proc's handling of its peers' answers
(hypothesis): repeated, stale, out-of-order and contradictory — but
well-formed — installer job states and fetcher statuses, delivered through
``Agent.handle_installer``/``handle_fetcher`` while a job is held at one
point (sync, open, version hook, download, staging, install, restart).
Malformed bytes never get this far: the decoders refuse them
(test_decoders_fuzz.py); this is about what decodes.

A peer may repeat an answer (a request sent twice: a retry, or the ask on
reconnect), answer late, or — after a crash, a lost state file or a bug —
report a phase that does not fit. Properties:
- nothing escapes (an impossible transition raises RuntimeError inside the
  broker: that would be a crash and a restart);
- the job still ends in a terminal status and the agent goes idle;
- answers about another job or execution change nothing: SUCCEEDED
  ``complete_ready`` with one install.

It found two ways to crash the broker, both fixed (docs/reliability.md, Findings).
Short run (CI): ``UPPARAT_FUZZ_EXAMPLES`` (default 300). Long run: docs/reliability.md.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.test_broker_fuzz import LIVE, Figures, release_fetch, release_hook, run_to_the_end
from tests.unit.test_broker_lifecycle import World
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import ProtocolError
from upparat.release import HOOK_NAMES

EXAMPLES = int(os.environ.get("UPPARAT_FUZZ_EXAMPLES", "300"))
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 10))
HOLDS = ("sync", "open", "version", "fetch", "stage", "install", "restart")
FIGURES = Figures("broker peer-answer fuzz figures")
count = FIGURES.count
figures = FIGURES.fixture()


text = st.sampled_from(["", "2.0.0", "1.0.0", "x" * 300, "boom"])
hook_run = st.builds(ip.HookRun, hook=st.sampled_from(HOOK_NAMES), round=st.integers(0, 2),
                     state=st.sampled_from([ip.RUNNING, ip.DONE, ip.HOOK_FAILED, ip.GAVE_UP]),
                     exit_code=st.one_of(st.none(), st.sampled_from([0, 1, 3, 255])),
                     attempt=st.integers(0, 3), output=text, message=text)
# about: the live job (its execution), another execution of it, another job
about = st.sampled_from(["live", "live", "live", "other execution", "other job"])
installer_answer = st.tuples(st.just("installer"), about, st.sampled_from(ip.PHASES),
                             st.one_of(st.none(), hook_run),
                             st.one_of(st.none(), st.sampled_from(["verification_failed", "rollback_refused",
                                                                   "installation_hook_failed"])))
fetcher_answer = st.tuples(st.just("fetcher"), about, st.sampled_from(fp.STATES), st.integers(0, 200),
                           st.one_of(st.none(), st.sampled_from(["download_failed", "verification_failed"])))
answer = st.one_of(installer_answer, fetcher_answer)


def build(tmp_path, hold: str) -> World:
    world = World(tmp_path)
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.connect()
    if hold in ("sync", "open", "stage"):
        method = {"sync": "ping", "open": "open_job", "stage": "stage"}[hold]
        setattr(world.installer, method, lambda *args: True)  # the answer is late: held here
    elif hold == "fetch":
        world.fetcher.hold = True
    else:
        world.installer.hold.add(hold)
    world.create(LIVE)
    return world


def release(world: World, hold: str) -> None:
    if hold in ("sync", "open", "stage"):
        delattr(world.installer, {"sync": "ping", "open": "open_job", "stage": "stage"}[hold])
    elif hold == "fetch":
        release_fetch(world, only_while_fetching=True)
    else:
        release_hook(world, hold)
    world.settle()


def render(world: World, spec) -> tuple[str, object]:
    peer, whom, *rest = spec
    job = world.agent.job
    execution = job.execution if job is not None and job.job_id == LIVE else 1
    job_id, execution = {"live": (LIVE, execution), "other execution": (LIVE, execution + 1),
                         "other job": ("job-other", 1)}[whom]
    if peer == "installer":
        phase, hook, failure = rest
        return peer, ip.JobState(seq=0, job_id=job_id, execution=execution, phase=phase,
                                 failure=failure if phase == ip.FAILED else None, message="fuzz", hook=hook)
    state, done, failure = rest
    return peer, fp.FetchStatus(seq=0, job_id=job_id, execution=execution, state=state, bytes_done=done,
                                bytes_total=100, rate=0, failure=failure if state == fp.FAILED else None,
                                message="fuzz")


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(hold=st.sampled_from(HOLDS), answers=st.lists(answer, min_size=1, max_size=6))
def test_repeated_stale_or_contradictory_peer_answers_never_crash_and_never_strand_the_job(tmp_path_factory,
                                                                                          hold, answers):
    count("examples")
    world = build(tmp_path_factory.mktemp("w"), hold)
    live = False

    def deliver():
        nonlocal live
        for spec in answers:
            peer, message = render(world, spec)
            try:
                message.check()  # what the decoder would refuse never reaches the agent
            except ProtocolError:
                count("refused by the decoder's check")
                continue
            live |= spec[1] == "live"
            (world.agent.handle_installer if peer == "installer" else world.agent.handle_fetcher)(message)
            count("answers")
            world.settle()

    execution, outcome = run_to_the_end(world, deliver, lambda: release(world, hold))
    count(f"outcome {outcome[0]} {outcome[1]}")
    if not live:
        count("only answers about another job or execution")
        assert outcome == ("SUCCEEDED", "complete_ready"), execution
        assert [run for run in world.installer.runs if run[0] == "install"] == [("install", 0)]
