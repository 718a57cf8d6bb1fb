"""The broker's job lifecycle against the real AWS side (the emulator's pure
JobStore) and small hand-written fakes of the installer and fetcher that
follow their protocols. A fake clock drives the deadlines; messages are
delivered by ``World.settle`` until nothing moves, so every test is
deterministic and fast."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, replace

import pytest

from upparat import config
from upparat.broker_proc import lifecycle
from upparat.broker_proc.lifecycle import Agent, Phase
from upparat.devtools.jobs_emulator_store import JobStore
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import BUSY, NOT_PERMITTED, Refused
from upparat.release import Release

THING = "thing-1"
SHA = "a" * 64


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeClient:
    garbage = 0


@dataclass
class Record:
    release: Release
    phase: str = ip.OPENED
    hook: ip.HookRun | None = None
    failure: str | None = None
    message: str = ""


class FakeInstaller:
    """The installer's protocol, with instant staging and scripted hooks."""

    def __init__(self, world):
        self.world = world
        self.client = FakeClient()
        self.records: dict[tuple[str, int], Record] = {}
        self.open: tuple[str, int] | None = None
        self.outputs = {"version": "1.0.0"}  # hook -> last stdout line
        self.exits: dict[str, int] = {}  # hook -> exit code (default 0)
        self.hold: set[str] = set()  # hooks that keep running until finish_hook()
        self.runs: list[tuple[str, int]] = []  # (hook, round) actually started
        self.calls: list[str] = []
        self.open_failure: tuple[str, str] | None = None

    def _state(self, key, seq=0) -> ip.JobState:
        rec = self.records.get(key)
        if rec is None:
            return ip.JobState(seq=seq, job_id=key[0], execution=key[1], phase=ip.NONE, failure=None, message="",
                               hook=None)
        return ip.JobState(seq=seq, job_id=key[0], execution=key[1], phase=rec.phase, failure=rec.failure,
                           message=rec.message, hook=rec.hook)

    def _reply(self, message):
        self.world.to_agent.append(("installer", message))
        return True

    def ping(self):
        self.calls.append("ping")
        phase = self.records[self.open].phase if self.open else None
        return self._reply(ip.Pong(seq=1, pid=1, job_id=self.open[0] if self.open else None,
                                   execution=self.open[1] if self.open else None, phase=phase))

    def open_job(self, job_id, execution, release):
        self.calls.append("open_job")
        key = (job_id, execution)
        if self.open is not None and self.open != key:
            return self._reply(Refused(seq=1, code=BUSY, reason=f"job {self.open[0]} is open"))
        if key not in self.records:
            self.records[key] = Record(release)
            if self.open_failure:
                self.records[key].phase = ip.FAILED
                self.records[key].failure, self.records[key].message = self.open_failure
        self.open = key
        return self._reply(self._state(key))

    def query_job(self, job_id, execution):
        self.calls.append("query_job")
        return self._reply(self._state((job_id, execution)))

    def stage(self, job_id, execution):
        self.calls.append("stage")
        key = (job_id, execution)
        rec = self.records.get(key)
        if rec is None:
            return self._reply(Refused(seq=1, code=NOT_PERMITTED, reason="no such job"))
        if rec.phase == ip.OPENED:
            rec.phase = ip.STAGED
            rec.message = "staged"
        return self._reply(self._state(key))

    def run_hook(self, job_id, execution, hook, round=0):  # noqa: A002
        self.calls.append(f"run_hook {hook}")
        key = (job_id, execution)
        rec = self.records.get(key)
        if rec is None:
            return self._reply(Refused(seq=1, code=NOT_PERMITTED, reason="no such job"))
        if rec.hook is not None and (rec.hook.hook, rec.hook.round) == (hook, round) and \
                rec.phase not in (ip.INSTALL_INTERRUPTED, ip.RESTART_INTERRUPTED):
            return self._reply(self._state(key))  # idempotent
        if rec.hook is not None and rec.hook.state == ip.RUNNING:
            return self._reply(Refused(seq=1, code=BUSY, reason="a hook runs"))
        self.runs.append((hook, round))
        rec.hook = ip.HookRun(hook=hook, round=round, state=ip.RUNNING, exit_code=None, attempt=0, output="",
                              message="running")
        if hook == "install":
            rec.phase = ip.INSTALLING
        if hook == "restart":
            rec.phase = ip.RESTARTING
        self._reply(self._state(key))
        if hook not in self.hold:
            self.finish_hook(key)
        return True

    def finish_hook(self, key):
        rec = self.records[key]
        hook = rec.hook.hook
        code = self.exits.get(hook, 0)
        output = self.outputs.get(hook, "")
        if callable(output):
            output = output()
        state = ip.DONE if code == 0 else ip.HOOK_FAILED
        rec.hook = replace(rec.hook, state=state, exit_code=code, output=output, message=f"exit code {code}")
        if code == 0 and hook == "install":
            rec.phase = ip.INSTALLED
        elif code == 0 and hook == "restart":
            rec.phase = ip.RESTARTED
        elif code != 0:
            rec.phase = ip.FAILED
            rec.failure = lifecycle.FAILED_STATE[hook]
        self.world.to_agent.append(("installer", self._state(key)))

    def discard(self, job_id, execution):
        self.calls.append("discard")
        key = (job_id, execution)
        if key in self.records:
            self.records[key].phase = ip.DISCARDED
            self.records[key].hook = None
        if self.open == key:
            self.open = None
        return self._reply(self._state(key))

    def crash(self, reboot=False):
        """The installer restarts: a running install is interrupted; a running restart
        too, unless the device rebooted (then it counts as done)."""
        for rec in self.records.values():
            if rec.hook is not None and rec.hook.state == ip.RUNNING:
                rec.hook = replace(rec.hook, state=ip.HOOK_FAILED, message="interrupted")
            if rec.phase == ip.INSTALLING:
                rec.phase = ip.INSTALL_INTERRUPTED
            elif rec.phase == ip.RESTARTING:
                rec.phase = ip.RESTARTED if reboot else ip.RESTART_INTERRUPTED


class FakeFetcher:
    def __init__(self, world):
        self.world = world
        self.client = FakeClient()
        self.calls: list[str] = []
        self.failure: tuple[str, str] | None = None  # (failure, message) for the next fetch
        self.hold = False

    def _status(self, job_id, execution, state, failure=None, message=""):
        return fp.FetchStatus(seq=0, job_id=job_id, execution=execution, state=state, bytes_done=0,
                              bytes_total=100, rate=0, failure=failure, message=message)

    def ping(self):
        return True

    def fetch(self, job_id, execution, url, release):
        self.calls.append(f"fetch {url}")
        self.world.to_agent.append(("fetcher", self._status(job_id, execution, fp.RUNNING)))
        if not self.hold:
            if self.failure:
                failure, message = self.failure
                self.failure = None
                self.world.to_agent.append(("fetcher", self._status(job_id, execution, fp.FAILED, failure, message)))
            else:
                self.world.to_agent.append(("fetcher", self._status(job_id, execution, fp.DONE)))
        return True

    def query_fetch(self, job_id, execution):
        self.calls.append("query_fetch")
        return True

    def cancel_fetch(self, job_id, execution):
        self.calls.append("cancel_fetch")
        self.world.to_agent.append(("fetcher", self._status(job_id, execution, fp.CANCELLED)))
        return True


HOOKS = ("version", "download", "install", "restart", "ready")


def make_config(tmp_path, hooks=HOOKS, extra=""):
    lines = ["[broker]", f"thing_name = {THING}", "[hooks]"]
    for name in hooks:
        hook = tmp_path / f"{name}.sh"
        hook.write_text("#!/bin/sh\n")
        hook.chmod(0o755)
        lines.append(f"{name} = {hook}")
    lines.append("version_confirm_window = 30")
    return config.parse("\n".join(lines) + "\n" + extra, check_files=False)


class World:
    def __init__(self, tmp_path, hooks=HOOKS, store=None, state_dir=None):
        self.clock = Clock()
        self.store = store or JobStore(presign=lambda url: url.replace("s3", "presigned"), clock=self.clock)
        self.cfg = make_config(tmp_path, hooks)
        self.installer = FakeInstaller(self)
        self.fetcher = FakeFetcher(self)
        self.to_agent: deque = deque()
        self.mqtt: deque = deque()
        self.published: list[tuple[str, dict]] = []
        self.drop = None  # predicate (topic, payload) -> True to lose an MQTT message to the device
        self.state_dir = state_dir or tmp_path / "broker-state"
        self.state_dir.mkdir(exist_ok=True)
        self.agent = self.new_agent()

    def new_agent(self) -> Agent:
        agent = Agent(self.cfg, self.publish, self.installer, self.fetcher, self.state_dir, clock=self.clock)
        self.agent = agent
        return agent

    def publish(self, topic, payload):
        self.published.append((topic, json.loads(payload) if payload else {}))
        for publication in self.store.handle(topic, payload):
            self.mqtt.append(publication)

    def emit(self, publications):
        self.mqtt.extend(publications)

    def settle(self, limit=2000):
        for _ in range(limit):
            if self.mqtt:
                pub = self.mqtt.popleft()
                if self.drop and self.drop(pub.topic, pub.payload):
                    continue
                self.agent.handle_message(pub.topic, json.dumps(pub.payload).encode())
            elif self.to_agent:
                peer, message = self.to_agent.popleft()
                (self.agent.handle_installer if peer == "installer" else self.agent.handle_fetcher)(message)
            else:
                self.agent.on_time()
                if not self.mqtt and not self.to_agent:
                    return
        raise AssertionError("the world did not settle")

    def connect(self):
        self.agent.handle_connected()
        self.settle()

    def advance(self, seconds, step=1.0):
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + step)
            self.settle()

    def create(self, job_id, version="2.0.0", **doc):
        document = {"version": version, "file": "${aws:iot:s3-presigned-url:https://b.s3.x/fw}",
                    "sha256": SHA, "size": 100, "meta": "m", **doc}
        self.emit(self.store.create_job(job_id, document, [THING]))
        self.settle()

    def execution(self, job_id):
        return self.store.execution(job_id, THING)

    def states(self, job_id):
        return [h["statusDetails"].get("state") for h in self.execution(job_id)["history"]]


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    w.connect()
    return w


def final(world, job_id):
    ex = world.execution(job_id)
    return ex["status"], ex["statusDetails"].get("state")


# ----- the happy path and the hooks' outcomes --------------------------------

def test_job_runs_through_every_phase_and_succeeds(world):
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-1")
    assert final(world, "job-1") == ("SUCCEEDED", "complete_ready")
    assert world.states("job-1") == ["download_start", "installation_start", "reboot_start", "complete_ready"]
    assert [h for h, _ in world.installer.runs] == ["version", "download", "install", "restart", "version", "ready"]
    assert world.installer.calls[-1] == "discard" and world.agent.job is None
    assert "cancel_fetch" in world.fetcher.calls


def test_version_already_installed_succeeds_without_a_download(world):
    world.installer.outputs["version"] = "2.0.0"
    world.create("job-same")
    assert final(world, "job-same") == ("SUCCEEDED", "version_already_installed")
    assert not [c for c in world.fetcher.calls if c.startswith("fetch")]


def test_install_hook_failure_fails_the_job_and_cleans_up(world):
    world.installer.exits["install"] = 1
    world.create("job-fail")
    assert final(world, "job-fail") == ("FAILED", "installation_hook_failed")
    assert world.installer.records[("job-fail", 1)].phase == ip.DISCARDED


def test_installers_verification_failure_is_the_jobs_failure(world):
    world.installer.open_failure = ("rollback_refused", "serial 3 is lower than the installed serial 5")
    world.create("job-old", serial=3)
    assert final(world, "job-old") == ("FAILED", "rollback_refused")
    assert "serial 3" in world.execution("job-old")["statusDetails"]["message"]
    assert world.installer.runs == []


def test_force_skips_version_and_download_hooks(world):
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-force", force=True)
    assert final(world, "job-force") == ("SUCCEEDED", "complete_ready")
    assert [h for h, _ in world.installer.runs][:2] == ["install", "restart"]


def test_invalid_document_fails_with_a_reason_and_runs_nothing(world):
    world.emit(world.store.create_job("job-bad", {"version": "1\n2", "file": "https://x/y"}, [THING]))
    world.settle()
    assert final(world, "job-bad") == ("FAILED", "invalid_job_document")
    assert "version" in world.execution("job-bad")["statusDetails"]["message"]
    assert world.installer.runs == [] and "open_job" not in world.installer.calls


def test_version_mismatch_after_restart_is_asked_again_within_the_window(world):
    world.installer.outputs["version"] = "1.0.0"
    world.create("job-mismatch")
    world.advance(40, step=0.5)
    assert final(world, "job-mismatch") == ("FAILED", "version_mismatch")
    confirm_rounds = [r for h, r in world.installer.runs if h == "version"]
    assert len(confirm_rounds) > 3 and confirm_rounds[-1] > 0


def test_a_hook_that_never_answers_fails_at_the_phase_deadline(world):
    world.installer.hold.add("install")
    world.create("job-hang")
    assert world.agent.job.phase is Phase.INSTALL
    world.advance(lifecycle.PEER_LIMIT + 5, step=5)  # the installer answers queries, the hook runs on
    assert world.agent.job.phase is Phase.INSTALL
    world.installer.client.garbage = lifecycle.GARBAGE_LIMIT + 1  # now it answers only garbage
    world.advance(2)
    assert final(world, "job-hang") == ("FAILED", "installation_hook_failed")
    assert "unusable" in world.execution("job-hang")["statusDetails"]["message"]


# ----- crash consistency --------------------------------------------------

def test_broker_restarted_during_install_waits_for_it_and_runs_install_once(world):
    world.installer.hold.add("install")
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-crash")
    assert world.agent.job.phase is Phase.INSTALL
    world.new_agent()  # broker_proc killed and restarted; the installer keeps running the hook
    world.connect()
    assert world.agent.job.phase is Phase.INSTALL
    world.installer.finish_hook(("job-crash", 1))
    world.settle()
    assert world.installer.runs.count(("install", 0)) == 1
    assert final(world, "job-crash") == ("SUCCEEDED", "complete_ready")
    assert world.states("job-crash").count("installation_start") == 1


def test_broker_restarted_right_after_install_goes_on_to_restart(world):
    world.installer.hold.add("restart")
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-after")
    assert world.agent.job.phase is Phase.RESTART
    world.new_agent()
    world.connect()
    assert world.agent.job.phase is Phase.RESTART
    world.installer.finish_hook(("job-after", 1))
    world.settle()
    assert final(world, "job-after") == ("SUCCEEDED", "complete_ready")
    assert world.installer.runs.count(("install", 0)) == 1 and world.installer.runs.count(("restart", 0)) == 1
    assert world.states("job-after").count("installation_start") == 1


def test_device_reboot_during_restart_confirms_and_succeeds(world):
    world.installer.hold.add("restart")
    world.create("job-reboot")
    world.installer.crash(reboot=True)  # installer and broker start afresh
    world.installer.outputs["version"] = "2.0.0"
    world.new_agent()
    world.connect()
    assert final(world, "job-reboot") == ("SUCCEEDED", "complete_ready")
    assert world.installer.runs.count(("install", 0)) == 1


def test_restart_interrupted_by_an_installer_crash_runs_again_once(world):
    world.installer.hold.add("restart")
    world.create("job-rint")
    assert world.agent.job.phase is Phase.RESTART
    world.installer.crash()  # same boot: the installer died and took the restart hook with it
    world.installer.hold.clear()
    world.installer.outputs["version"] = "2.0.0"
    world.advance(lifecycle.HOOK_QUERY + 1)
    assert final(world, "job-rint") == ("SUCCEEDED", "complete_ready")
    assert world.installer.runs.count(("restart", 0)) == 2 and world.installer.runs.count(("install", 0)) == 1


def test_a_peer_that_connects_again_is_asked_at_once_not_at_the_next_query(world):
    world.installer.hold.add("restart")
    world.create("job-back")
    assert world.agent.job.phase is Phase.RESTART
    world.installer.crash()  # same boot: it cannot speak first after its restart
    world.installer.hold.clear()
    world.installer.outputs["version"] = "2.0.0"
    world.agent.handle_peer_connected("fetcher")  # not the peer this phase waits on
    world.settle()
    assert world.agent.job.phase is Phase.RESTART
    world.agent.handle_peer_connected("installer")
    world.settle()  # no time passes: the request goes out now
    assert final(world, "job-back") == ("SUCCEEDED", "complete_ready")
    assert world.installer.runs.count(("restart", 0)) == 2


def test_a_repeated_no_record_answer_while_opening_is_ignored_not_a_crash(world):
    """Two queries in SYNC (a retry, or a reconnect) give two "no record" answers:
    the second arrives in OPEN and used to crash the broker (no transition open -> open)."""
    opens = []
    world.installer.open_job = lambda *args: opens.append(args) or True  # the answer is late
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-dup")
    assert world.agent.job.phase is Phase.OPEN
    stale = ip.JobState(seq=0, job_id="job-dup", execution=1, phase=ip.NONE, failure=None, message="", hook=None)
    world.agent.handle_installer(stale)
    assert world.agent.job.phase is Phase.OPEN
    del world.installer.open_job  # the real fake again: the retried open is answered
    world.advance(lifecycle.PEER_RETRY + 1)
    assert final(world, "job-dup") == ("SUCCEEDED", "complete_ready")


def test_an_installer_that_lost_its_record_while_staging_is_synced_again(world):
    stages = []
    world.installer.stage = lambda *args: stages.append(args) or True  # staging takes a while
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-lost")
    assert world.agent.job.phase is Phase.STAGE
    world.installer.records.clear()  # its state.json is gone
    world.installer.open = None
    lost = ip.JobState(seq=0, job_id="job-lost", execution=1, phase=ip.NONE, failure=None, message="", hook=None)
    del world.installer.stage
    world.agent.handle_installer(lost)
    world.settle()
    assert final(world, "job-lost") == ("SUCCEEDED", "complete_ready")


def test_install_interrupted_by_an_installer_crash_runs_again(world):
    world.installer.hold.add("install")
    world.create("job-int")
    world.installer.crash()
    world.installer.hold.clear()
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.advance(lifecycle.HOOK_QUERY + 1)
    assert final(world, "job-int") == ("SUCCEEDED", "complete_ready")
    assert world.installer.runs.count(("install", 0)) == 2


def test_a_lost_run_hook_reply_is_answered_not_run_again(world):
    world.installer.hold.add("install")
    lost = []
    original = world.installer._reply

    def lose_first_install_reply(message):
        if isinstance(message, ip.JobState) and message.hook and message.hook.hook == "install" and not lost:
            lost.append(message)
            return True
        return original(message)

    world.installer._reply = lose_first_install_reply
    world.create("job-lost")
    assert lost and world.agent.job.phase is Phase.INSTALL
    world.advance(lifecycle.PEER_RETRY + 1)
    assert world.installer.calls.count("run_hook install") >= 2
    assert world.installer.runs.count(("install", 0)) == 1
    world.installer.finish_hook(("job-lost", 1))
    world.settle()
    assert world.agent.job is None or world.agent.job.phase is not Phase.INSTALL


def test_a_stale_job_in_the_installer_is_discarded_before_the_next_one(world):
    world.installer.records[("job-old", 1)] = Record(Release(version="0.9", sha256=SHA, size=1), ip.STAGED)
    world.installer.open = ("job-old", 1)
    world.installer.outputs["version"] = "2.0.0"
    world.create("job-new")
    assert world.installer.records[("job-old", 1)].phase == ip.DISCARDED
    assert final(world, "job-new") == ("SUCCEEDED", "version_already_installed")


# ----- cancellation -----------------------------------------------------------

def test_cancel_during_install_stops_it_cleans_up_and_reports_nothing_more(world):
    world.installer.hold.add("install")
    world.create("job-cancel")
    world.emit(world.store.cancel_job("job-cancel", force=True))
    world.settle()
    assert world.agent.job is None
    assert world.installer.records[("job-cancel", 1)].phase == ip.DISCARDED
    assert world.execution("job-cancel")["status"] == "CANCELED"
    assert "installation_start" in world.states("job-cancel")


def test_twenty_cancels_during_install_then_a_job_succeeds(world):
    world.installer.hold.add("install")
    for n in range(20):
        world.create(f"job-c{n}")
        world.emit(world.store.cancel_job(f"job-c{n}", force=True))
        world.settle()
    world.installer.hold.clear()
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-after-cancels")
    assert final(world, "job-after-cancels") == ("SUCCEEDED", "complete_ready")
    assert all(r.phase == ip.DISCARDED for k, r in world.installer.records.items() if k[0].startswith("job-c"))


# ----- downloads ------------------------------------------------------------

def test_expired_url_is_refreshed_from_aws_and_the_download_resumes(world):
    world.fetcher.failure = ("url_expired", "403 AccessDenied")
    world.installer.outputs["version"] = lambda: "2.0.0" if ("restart", 0) in world.installer.runs else "1.0.0"
    world.create("job-url")
    assert final(world, "job-url") == ("SUCCEEDED", "complete_ready")
    assert len([c for c in world.fetcher.calls if c.startswith("fetch")]) == 2


def test_download_failure_is_reported_with_its_state(world):
    world.fetcher.failure = ("file_too_large", "the server has 200 bytes, the job document says 100")
    world.create("job-big")
    assert final(world, "job-big") == ("FAILED", "file_too_large")


# ----- status updates ---------------------------------------------------------

def test_reboot_start_must_be_accepted_before_the_restart_hook_runs(world):
    world.installer.hold.add("install")
    world.create("job-rs")
    throttled = []

    def throttle_reboot_start(topic, payload):
        # AWS answers reboot_start with RequestThrottled (twice): replace the reply.
        return False

    original = world.store.handle

    def handle(topic, payload):
        body = json.loads(payload) if payload else {}
        if topic.endswith("/update") and body.get("statusDetails", {}).get("state") == "reboot_start" \
                and len(throttled) < 2:
            throttled.append(body)
            from upparat.devtools.jobs_emulator_store import Publication
            return [Publication(topic + "/rejected", {"code": "RequestThrottled", "message": "slow down",
                                                      "clientToken": body["clientToken"]})]
        return original(topic, payload)

    world.store.handle = handle
    world.installer.finish_hook(("job-rs", 1))
    world.settle()
    assert len(throttled) == 1 and ("restart", 0) not in world.installer.runs
    world.advance(lifecycle.PEER_LIMIT)
    assert len(throttled) == 2 and ("restart", 0) in world.installer.runs


def test_an_old_update_redelivered_late_cannot_overwrite_a_newer_state(world):
    world.installer.hold.add("install")
    world.create("job-order")
    first = next(p for t, p in world.published if t.endswith("/update"))  # download_start
    # A stray duplicate of the first update arrives after installation_start was stored.
    world.publish(f"$aws/things/{THING}/jobs/job-order/update", json.dumps(first).encode())
    world.settle()
    assert world.execution("job-order")["statusDetails"]["state"] == "installation_start"


def test_a_late_rejection_for_a_finished_job_does_not_touch_the_running_one(world):
    world.installer.outputs["version"] = "2.0.0"
    world.create("job-done")
    assert final(world, "job-done")[0] == "SUCCEEDED"
    world.installer.outputs["version"] = "1.0.0"
    world.installer.hold.add("install")
    world.create("job-running")
    world.agent.handle_message(f"$aws/things/{THING}/jobs/job-done/update/rejected",
                               json.dumps({"code": "InvalidStateTransition", "clientToken": "old"}).encode())
    world.settle()
    assert world.agent.job is not None and world.agent.job.job_id == "job-running"


def test_unconfirmed_updates_survive_a_broker_restart(world, tmp_path):
    world.drop = lambda topic, payload: topic.endswith("/update/accepted")  # AWS stores, replies are lost
    world.installer.outputs["version"] = "2.0.0"
    world.create("job-persist")
    assert world.agent.outbox.has_final("job-persist")
    world.drop = None
    world.new_agent()  # the new process reads the outbox from the state directory
    assert world.agent.outbox.has_final("job-persist")
    world.connect()
    assert not world.agent.outbox.has_final("job-persist")
    assert final(world, "job-persist") == ("SUCCEEDED", "version_already_installed")


# ----- hostile payloads --------------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"[" * 60000, b'{"jobs": ' + b"9" * 5000 + b"}", b"\xff\xfe", b'{"a": "\\ud800"}', b"x" * 300_000,
    b'{"execution": {"jobId": 5}}', b'{"execution": {"jobId": "j", "status": "QUEUED", "jobDocument": 1}}',
])
@pytest.mark.parametrize("topic", ["notify", "notify-next", "get/accepted", "job-x/get/accepted",
                                   "job-x/update/rejected"])
def test_garbage_on_every_topic_is_dropped_without_a_crash(world, topic, payload):
    world.agent.handle_message(f"$aws/things/{THING}/jobs/{topic}", payload)
    world.settle()
    world.installer.outputs["version"] = "2.0.0"
    world.create("job-after-garbage")
    assert final(world, "job-after-garbage") == ("SUCCEEDED", "version_already_installed")


def test_a_document_with_a_lone_surrogate_fails_that_job_and_the_next_runs(world):
    world.emit(world.store.create_job("job-sur", {"version": "1.0", "file": "https://x/y", "meta": "\ud800"},
                                      [THING]))
    world.settle()
    assert final(world, "job-sur") == ("FAILED", "invalid_job_document")
    world.installer.outputs["version"] = "2.0.0"
    world.create("job-next")
    assert final(world, "job-next")[0] == "SUCCEEDED"


def test_transition_table_covers_every_phase():
    assert set(lifecycle.TRANSITIONS) == set(Phase)
    for phase in Phase:
        if phase is not Phase.FINISH:
            assert hasattr(Agent, f"_start_{phase.value}")
