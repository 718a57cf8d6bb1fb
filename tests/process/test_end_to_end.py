"""End to end: a real Mosquitto, the jobs emulator, a real HTTP file server,
the real supervisor and its three children (as root: broker and fetcher as
their unprivileged users). Releases are signed with the sandbox's release
key unless a test says otherwise. Each test creates a job and waits, with a
deadline, for its terminal status."""

import os
import signal

import pytest

from tests.support import child_pids, poll_for
from upparat.devtools.sandbox import Sandbox, sha256_of

FAILING_INSTALL = """#!/bin/sh
touch "{base}/state/install-ran"
exit 1
"""
RETRYING_INSTALL = """#!/bin/sh
# exit 3 (retry) on the first attempt, then install
if [ ! -e "{base}/state/asked-retry" ]; then touch "{base}/state/asked-retry"; exit 3; fi
cp "$4" "{base}/installed/$(basename "$4")"
echo "$3" > "{base}/state/pending"
"""
MARKING_INSTALL = """#!/bin/sh
touch "{base}/state/install-ran"
cp "$4" "{base}/installed/$(basename "$4")"
echo "$3" > "{base}/state/pending"
"""


@pytest.fixture
def sandbox(world_tmp, request):
    hooks = getattr(request, "param", None) or {}
    box = Sandbox(world_tmp / "box", hooks=hooks)
    box.start()
    try:
        def three_children():
            if not box.supervisor.alive():
                raise AssertionError(f"supervisor exited:\n{box.logs()[-3000:]}")
            return len(child_pids(box.supervisor.pid)) == 3

        poll_for(three_children, 20, what="three children")
        yield box
    finally:
        box.stop()
        if os.environ.get("UPPARAT_TEST_LOGS"):
            print(box.logs())


def states(execution):
    return [h["statusDetails"].get("state") for h in execution["history"]]


def installed(box, job_id):
    """The file the install hook copied (the staged file is named <job id>.<execution>)."""
    found = list(box.path("installed").glob(f"{job_id}.*"))
    assert len(found) == 1, found
    return found[0]


def test_happy_path_installs_the_verified_file(sandbox):
    path = sandbox.add_file("fw-2.bin", os.urandom(300_000))
    sandbox.create_job("job-happy", sandbox.document("fw-2.bin", "2.0.0"))
    final = sandbox.wait_for_job("job-happy")
    assert final["status"] == "SUCCEEDED", sandbox.logs()[-4000:]
    assert final["statusDetails"]["state"] == "complete_ready"
    assert states(final)[0] == "download_start"
    assert "installation_start" in states(final) and "reboot_start" in states(final)
    assert sha256_of(installed(sandbox, "job-happy")) == sha256_of(path)
    assert sandbox.path("state", "version").read_text().strip() == "2.0.0"


def test_version_already_installed_succeeds_without_download(sandbox):
    sandbox.add_file("fw-1.bin", b"same version")
    sandbox.create_job("job-same", sandbox.document("fw-1.bin", "1.0.0"))
    final = sandbox.wait_for_job("job-same")
    assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "version_already_installed")
    assert sandbox.files.requests == []


@pytest.mark.parametrize("sandbox", [{"install": FAILING_INSTALL}], indirect=True)
def test_install_hook_exit_1_fails_the_job(sandbox):
    sandbox.add_file("fw-3.bin", b"x" * 1000)
    sandbox.create_job("job-fail", sandbox.document("fw-3.bin", "3.0.0"))
    final = sandbox.wait_for_job("job-fail")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "installation_hook_failed")
    assert "exit code 1" in final["statusDetails"]["message"]


@pytest.mark.parametrize("sandbox", [{"install": RETRYING_INSTALL}], indirect=True)
def test_hook_exit_3_then_0_succeeds(sandbox):
    sandbox.add_file("fw-4.bin", b"y" * 1000)
    sandbox.create_job("job-retry", sandbox.document("fw-4.bin", "4.0.0"))
    final = sandbox.wait_for_job("job-retry")
    assert final["status"] == "SUCCEEDED", final
    assert sandbox.path("state", "asked-retry").exists()


@pytest.mark.parametrize("sandbox", [{"install": MARKING_INSTALL}], indirect=True)
def test_sha256_mismatch_fails_verification_and_never_installs(sandbox):
    sandbox.add_file("fw-5.bin", b"z" * 1000)
    document = sandbox.document("fw-5.bin", "5.0.0", sha256="0" * 64)
    sandbox.create_job("job-badhash", document)
    final = sandbox.wait_for_job("job-badhash")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "verification_failed")
    assert "sha256" in final["statusDetails"]["message"]
    assert not sandbox.path("state", "install-ran").exists()
    assert not list(sandbox.path("installed").glob("job-badhash*"))


@pytest.mark.parametrize("child", ["broker", "fetcher", "installer"])
def test_killed_child_is_restarted_and_next_job_succeeds(sandbox, child):
    before = child_pids(sandbox.supervisor.pid)
    os.kill(before[child], signal.SIGKILL)
    after = poll_for(lambda: (p := child_pids(sandbox.supervisor.pid)).get(child) not in (None, before[child]) and p,
                     30, what=f"{child} to be restarted")
    assert after[child] != before[child]
    sandbox.add_file("fw-6.bin", os.urandom(5000))
    sandbox.create_job(f"job-after-{child}", sandbox.document("fw-6.bin", "6.0.0"))
    final = sandbox.wait_for_job(f"job-after-{child}", timeout=90)
    assert final["status"] == "SUCCEEDED", sandbox.logs()[-4000:]


def test_broken_job_document_fails_with_a_reason_and_garbage_payloads_are_survived(sandbox):
    import paho.mqtt.client as mqtt

    from upparat.devtools.sandbox import THING

    broker_pid = child_pids(sandbox.supervisor.pid)["broker"]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="garbage-sender")
    client.connect("127.0.0.1", sandbox.mqtt_port)
    client.loop_start()
    try:
        base = f"$aws/things/{THING}/jobs"
        for topic in (f"{base}/notify-next", f"{base}/notify", f"{base}/get/accepted",
                      f"{base}/job-x/get/accepted", f"{base}/job-x/update/rejected"):
            for payload in (b"\xff\xfe", b"[]", b"{", b'{"execution": {"jobId": 5}}', b"x" * 100_000):
                client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    sandbox.create_job("job-broken", {"version": "1\n2", "file": "https://example.invalid/x"})
    final = sandbox.wait_for_job("job-broken")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "invalid_job_document")
    assert "version" in final["statusDetails"]["message"]
    sandbox.add_file("fw-7.bin", b"after garbage")
    sandbox.create_job("job-after-garbage", sandbox.document("fw-7.bin", "7.0.0"))
    assert sandbox.wait_for_job("job-after-garbage")["status"] == "SUCCEEDED", sandbox.logs()[-4000:]
    assert child_pids(sandbox.supervisor.pid)["broker"] == broker_pid  # never crashed and restarted


@pytest.mark.parametrize("sandbox", [{"install": MARKING_INSTALL}], indirect=True)
def test_only_a_release_signed_with_a_configured_key_installs(sandbox):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from upparat import signature
    from upparat.release import Release

    path = sandbox.add_file("fw-8.bin", os.urandom(10_000))
    release = Release(version="8.0.0", meta="8.0.0", sha256=sha256_of(path), size=path.stat().st_size)
    stranger = signature.sign(ed25519.Ed25519PrivateKey.generate(), release)
    sandbox.create_job("job-stranger", sandbox.document("fw-8.bin", "8.0.0", signature=stranger))
    final = sandbox.wait_for_job("job-stranger")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "verification_failed")
    assert "signature" in final["statusDetails"]["message"]
    sandbox.create_job("job-unsigned", sandbox.document("fw-8.bin", "8.0.0", sign=False))
    final = sandbox.wait_for_job("job-unsigned")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "verification_failed")
    assert "no signature" in final["statusDetails"]["message"]
    # signed, then meta changed by whoever handled the document: the installer's own check refuses it
    sandbox.create_job("job-changed", {**sandbox.document("fw-8.bin", "8.0.0"), "meta": "--evil"})
    final = sandbox.wait_for_job("job-changed")
    assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "verification_failed")
    assert not sandbox.path("state", "install-ran").exists()
    sandbox.create_job("job-signed", sandbox.document("fw-8.bin", "8.0.0"))
    assert sandbox.wait_for_job("job-signed")["status"] == "SUCCEEDED", sandbox.logs()[-4000:]
    assert sandbox.path("state", "install-ran").exists()


AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the default runtime and staging directories are root's")


@AS_ROOT
def test_seed_config_refuses_unsigned_jobs_and_names_the_fix(world_tmp):
    """The seed's own config as a 1.x user has it: no [supervisor], no
    [verification], no locations. Every child must agree on the defaults, and
    an unsigned job fails with a message that says what to do."""
    box = Sandbox(world_tmp / "box", seed_style=True, signing=False)
    box.start()
    try:
        text = box.path("upparat.conf").read_text()
        assert "[supervisor]" not in text and "download_location" not in text and "public_keys" not in text
        box.add_file("fw-seed.bin", os.urandom(20_000))
        # The default state directories outlive this test: a job id of its own each run.
        job_id = f"job-seed-unsigned-{os.urandom(4).hex()}"
        box.create_job(job_id, box.document("fw-seed.bin", "9.0.0"))
        final = box.wait_for_job(job_id, timeout=60)
        assert (final["status"], final["statusDetails"]["state"]) == ("FAILED", "verification_failed")
        assert "[verification] public_keys" in final["statusDetails"]["message"]
        assert "allow_unsigned" in final["statusDetails"]["message"]
        assert os.path.exists("/run/upparat/installer/installer.sock")
    finally:
        box.stop()


@AS_ROOT
def test_seed_config_with_a_release_key_runs_a_signed_job_with_every_default(world_tmp):
    """The README's quick start: the seed config plus [verification] public_keys."""
    box = Sandbox(world_tmp / "box", seed_style=True)
    box.start()
    try:
        path = box.add_file("fw-seed.bin", os.urandom(20_000))
        job_id = f"job-seed-{os.urandom(4).hex()}"  # the default state directories outlive this test
        box.create_job(job_id, box.document("fw-seed.bin", "9.0.0"))
        final = box.wait_for_job(job_id, timeout=60)
        assert final["status"] == "SUCCEEDED", box.logs()[-4000:]
        assert sha256_of(installed(box, job_id)) == sha256_of(path)
    finally:
        box.stop()
