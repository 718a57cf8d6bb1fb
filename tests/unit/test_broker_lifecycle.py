"""The job lifecycle (broker_proc.lifecycle.Agent) with hand-written fakes for
the MQTT connection, the fetcher and the installer."""

import json

import pytest

from upparat import config
from upparat.broker_proc.lifecycle import Agent
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import IpcTimeout, Refused

SHA = "a" * 64
T = "$aws/things/dev1/jobs"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeInstaller:
    """Answers hooks from a script: hook -> list of (state, exit, output) per run."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.runs = []
        self.current = {}
        self.staged = []
        self.timeout_next = False

    def with_timeout(self, _):
        return self

    def request(self, msg):
        if self.timeout_next:
            self.timeout_next = False
            raise IpcTimeout("silent")
        if isinstance(msg, ip.RunHook):
            self.runs.append((msg.hook, msg.meta, msg.force))
            state, code, out = self.script[msg.hook].pop(0)
            self.current[(msg.job_id, msg.seq)] = (msg.hook, state, code, out)
            return ip.HookStatus(job_id=msg.job_id, seq=msg.seq, hook=msg.hook, state=ip.RUNNING,
                                 exit_code=None, attempt=0, output="", message="")
        if isinstance(msg, ip.QueryHook):
            hook, state, code, out = self.current[(msg.job_id, msg.seq)]
            return ip.HookStatus(job_id=msg.job_id, seq=msg.seq, hook=hook, state=state,
                                 exit_code=code, attempt=0, output=out, message="")
        if isinstance(msg, ip.Stage):
            self.staged.append(msg)
            return ip.StageStatus(job_id=msg.job_id, seq=msg.seq, state=ip.STAGED, failure=None, message="")
        if isinstance(msg, ip.Discard):
            return ip.Discarded(job_id=msg.job_id, seq=msg.seq)
        raise AssertionError(msg)


class FakeFetcher:
    def __init__(self, outcome=("done", None, "")):
        self.outcome = outcome
        self.fetches = []

    def request(self, msg):
        if isinstance(msg, fp.Fetch):
            self.fetches.append(msg)
        state, failure, text = self.outcome
        if isinstance(msg, fp.CancelFetch):
            state, failure, text = fp.CANCELLED, None, ""
        return fp.FetchStatus(job_id=msg.job_id, seq=msg.seq, state=state, bytes_done=3, bytes_total=3,
                              failure=failure, message=text)


def make_agent(tmp_path, hooks=("version", "install", "restart", "ready"), fetcher=None, installer=None, extra=""):
    lines = ["[broker]", "thing_name = dev1", "[hooks]", "retry_interval = 0", "version_confirm_window = 30"]
    for h in hooks:
        lines.append(f"{h} = /bin/true")
    cfg = config.parse("\n".join(lines) + "\n" + extra)
    sent = []
    clock = FakeClock()
    agent = Agent(cfg, lambda t, p: sent.append((t, json.loads(p) if p else {})), fetcher or FakeFetcher(),
                  installer, clock=clock)
    agent.handle_connected()
    return agent, sent, clock


def execution(job_id="j1", status="QUEUED", details=None, **doc):
    document = {"version": "2.0", "file": "https://example.invalid/fw.bin", "sha256": SHA, "size": 3}
    document.update(doc)
    body = {"jobId": job_id, "status": status, "versionNumber": 1, "executionNumber": 1, "jobDocument": document}
    if details:
        body["statusDetails"] = details
    return json.dumps({"timestamp": 1, "execution": body}).encode()


def updates(sent):
    return [(p["status"], p["statusDetails"]["state"], p["statusDetails"]) for t, p in sent if t.endswith("/update")]


def accept_all(agent, sent):
    for t, p in list(sent):
        if t.endswith("/update") and p["clientToken"] in agent.outbox:
            agent.handle_message(t + "/accepted", json.dumps({"timestamp": 1, "clientToken": p["clientToken"]}).encode())


def start_job(agent, **doc):
    agent.handle_message(f"{T}/get/accepted", json.dumps({"inProgressJobs": [], "queuedJobs": [{"jobId": "j1"}]}).encode())
    agent.handle_message(f"{T}/j1/get/accepted", execution(**doc))


def drive(agent, sent, clock, steps=20):
    for _ in range(steps):
        accept_all(agent, sent)
        clock.now += 1
        agent.tick()
        accept_all(agent, sent)


def test_happy_path_reports_each_step_and_succeeds(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "1.0"), ("done", 0, "2.0")], "install": [("done", 0, "")],
                          "restart": [("done", 0, "")], "ready": [("done", 0, "")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent)
    drive(agent, sent, clock)
    states = [s for _, s, _ in updates(sent)]
    assert states == ["download_start", "installation_start", "reboot_start", "complete_ready"]
    assert updates(sent)[-1][0] == "SUCCEEDED"
    assert [r[0] for r in inst.runs] == ["version", "install", "restart", "version", "ready"]
    assert inst.staged[0].sha256 == SHA
    assert agent.run is None


def test_version_already_installed_succeeds_without_download(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "2.0")]})
    fetcher = FakeFetcher()
    agent, sent, clock = make_agent(tmp_path, installer=inst, fetcher=fetcher)
    start_job(agent)
    drive(agent, sent, clock)
    assert updates(sent)[-1][:2] == ("SUCCEEDED", "version_already_installed")
    assert fetcher.fetches == []


def test_document_without_sha256_fails_with_a_fix(tmp_path):
    inst = FakeInstaller({})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent, sha256=None)
    status, state, details = updates(sent)[-1]
    assert (status, state) == ("FAILED", "invalid_job_document")
    assert "require_sha256 = false" in details["message"]
    assert inst.runs == []


@pytest.mark.parametrize("doc", [{"version": "1\n2"}, {"file": 5}, {"force": "yes"}, {"size": -1}, {"sha256": "xyz"}])
def test_broken_documents_fail_as_invalid(tmp_path, doc):
    agent, sent, clock = make_agent(tmp_path, installer=FakeInstaller({}))
    start_job(agent, **doc)
    assert updates(sent)[-1][:2] == ("FAILED", "invalid_job_document")


def test_malformed_mqtt_payloads_are_dropped_and_work_goes_on(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "2.0")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    for payload in (b"\xff\xfe", b"[1,2]", b"{not json", b"x" * 300_000, b'{"execution": 5}'):
        agent.handle_message(f"{T}/notify-next", payload)
        agent.handle_message(f"{T}/get/accepted", payload)
        agent.handle_message(f"{T}/j1/get/accepted", payload)
    start_job(agent)
    drive(agent, sent, clock)
    assert updates(sent)[-1][:2] == ("SUCCEEDED", "version_already_installed")


def test_install_hook_failure_fails_job_and_skips_restart(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "1.0")], "install": [("failed", 1, "boom")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent)
    drive(agent, sent, clock)
    status, state, details = updates(sent)[-1]
    assert (status, state) == ("FAILED", "installation_hook_failed")
    assert "exit code 1" in details["message"]
    assert "restart" not in [r[0] for r in inst.runs]


def test_verification_failure_from_fetcher_fails_without_install(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "1.0")]})
    fetcher = FakeFetcher(("failed", "verification_failed", "sha256 differs"))
    agent, sent, clock = make_agent(tmp_path, installer=inst, fetcher=fetcher)
    start_job(agent)
    drive(agent, sent, clock)
    assert updates(sent)[-1][:2] == ("FAILED", "verification_failed")
    assert "install" not in [r[0] for r in inst.runs]


def test_reboot_start_found_at_startup_confirms_version_then_ready(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "2.0")], "ready": [("done", 0, "")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    agent.handle_message(f"{T}/get/accepted", json.dumps({"inProgressJobs": [{"jobId": "j1"}]}).encode())
    agent.handle_message(f"{T}/j1/get/accepted", execution(status="IN_PROGRESS", details={"state": "reboot_start"}))
    drive(agent, sent, clock)
    assert [s for _, s, _ in updates(sent)] == ["complete_ready"]


def test_version_mismatch_after_reboot_fails(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "1.0")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    agent.handle_message(f"{T}/get/accepted", json.dumps({"inProgressJobs": [{"jobId": "j1"}]}).encode())
    agent.handle_message(f"{T}/j1/get/accepted", execution(status="IN_PROGRESS", details={"state": "reboot_start"}))
    drive(agent, sent, clock)
    status, state, details = updates(sent)[-1]
    assert (status, state) == ("FAILED", "version_mismatch")


def test_soft_restart_version_is_asked_again_within_the_window(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "1.0"), ("done", 0, "1.0"), ("done", 0, "2.0")],
                          "install": [("done", 0, "")], "restart": [("done", 0, "")], "ready": [("done", 0, "")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent)
    drive(agent, sent, clock, steps=40)
    assert updates(sent)[-1][:2] == ("SUCCEEDED", "complete_ready")
    assert [r[0] for r in inst.runs].count("version") == 3


def test_jobs_outside_the_prefix_are_never_touched(tmp_path):
    agent, sent, clock = make_agent(tmp_path, installer=FakeInstaller({}), extra="[service]\njob_prefix = upparat_\n")
    agent.handle_message(f"{T}/get/accepted", json.dumps({"queuedJobs": [{"jobId": "other"}]}).encode())
    assert not any("/other/" in t for t, _ in sent)
    assert agent.run is None


def test_final_status_is_resent_until_accepted(tmp_path):
    inst = FakeInstaller({"version": [("done", 0, "2.0")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent)
    agent.tick()
    final = [p for t, p in sent if t.endswith("/update")][-1]
    agent.handle_disconnected()
    clock.now += 100
    agent.tick()
    agent.handle_connected()
    resent = [p for t, p in sent if t.endswith("/update") and p["clientToken"] == final["clientToken"]]
    assert len(resent) == 2
    assert agent.run is not None  # still waiting for the acceptance
    accept_all(agent, sent)
    assert agent.run is None


def test_cancelled_job_is_abandoned(tmp_path):
    inst = FakeInstaller({"version": [("running", None, "")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent)
    agent.handle_message(f"{T}/notify", json.dumps({"timestamp": 1, "jobs": {}}).encode())
    assert sent[-1][0] == f"{T}/j1/get"
    body = json.loads(execution(status="CANCELED"))
    agent.handle_message(f"{T}/j1/get/accepted", json.dumps(body).encode())
    assert agent.run is None
    assert updates(sent) == []


def test_refused_hook_fails_with_the_reason(tmp_path):
    class Refusing(FakeInstaller):
        def request(self, msg):
            if isinstance(msg, ip.RunHook):
                return Refused(seq=msg.seq, reason="hook version is not configured")
            return super().request(msg)

    agent, sent, clock = make_agent(tmp_path, installer=Refusing({}))
    start_job(agent)
    status, state, details = updates(sent)[-1]
    assert (status, state) == ("FAILED", "version_hook_failed")
    assert "not configured" in details["message"]


def test_installer_busy_with_an_earlier_run_is_waited_for(tmp_path):
    class BusyOnce(FakeInstaller):
        refusals = 2

        def request(self, msg):
            if isinstance(msg, ip.RunHook) and self.refusals:
                self.refusals -= 1
                return Refused(seq=msg.seq, reason="busy: the install hook of job j1 is running")
            return super().request(msg)

    inst = BusyOnce({"version": [("done", 0, "2.0")]})
    agent, sent, clock = make_agent(tmp_path, installer=inst)
    start_job(agent)
    drive(agent, sent, clock)
    assert updates(sent)[-1][:2] == ("SUCCEEDED", "version_already_installed")
    assert inst.refusals == 0
