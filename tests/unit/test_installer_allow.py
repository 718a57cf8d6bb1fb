"""The installer's allow-list and answers, in process: the literal table, phases,
once-only steps, busy, the release checks with the installer's own keys, and
that every hook argument comes from the installer's record."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from upparat import signature, verify
from upparat.installer_proc import allow
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import BUSY, NOT_PERMITTED, Refused
from upparat.release import HOOK_NAMES
from tests.installer_support import PAYLOAD, Rig, release


@pytest.fixture
def rig(world_tmp):
    r = Rig(world_tmp)
    try:
        yield r
    finally:
        r.close()


def signed(key, data=PAYLOAD, **fields):
    unsigned = release(data, **fields)
    return dataclasses.replace(unsigned, signature=signature.sign(key, unsigned))


@pytest.fixture
def key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def keyed(world_tmp, key):
    r = Rig(world_tmp, keys=[key.public_key()], allow_unsigned=False)
    try:
        yield r
    finally:
        r.close()


def refused(reply, code=NOT_PERMITTED, text=""):
    assert isinstance(reply, Refused), reply
    assert reply.code == code, reply
    assert text in reply.reason, reply
    return reply


def install_through(rig: Rig, rel=None):
    rig.download()
    assert rig.open(rel or release()).phase == ip.OPENED
    assert rig.stage().phase == ip.STAGING
    assert rig.settle().phase == ip.STAGED


# ----- the table itself ------------------------------------------------------------
def test_the_table_has_exactly_the_protocol_request_types():
    assert {request for request, _ in allow.ALLOW} == set(ip.REQUESTS.types)


def test_the_table_has_one_rule_per_hook_and_none_other():
    hooks = {hook for request, hook in allow.ALLOW if request == "run_hook"}
    assert hooks == set(HOOK_NAMES)
    assert all(hook is None for request, hook in allow.ALLOW if request != "run_hook")


def test_install_and_restart_are_once_only_and_ready_only_after_restart():
    assert allow.ALLOW[("run_hook", "install")].once == allow.ONCE
    assert allow.ALLOW[("run_hook", "restart")].once == allow.ONCE
    assert allow.ALLOW[("run_hook", "restart")].phases == {ip.INSTALLED, ip.RESTART_INTERRUPTED}
    assert allow.ALLOW[("run_hook", "ready")].phases == {ip.RESTARTED}
    assert allow.staged_here in allow.ALLOW[("run_hook", "install")].requires


# ----- phases ------------------------------------------------------------------------
def test_nothing_runs_before_open_job(rig):
    for name in HOOK_NAMES:
        refused(rig.hook(name), text="open_job first")
    refused(rig.stage(), text="open_job first")
    assert rig.calls() == []


def test_install_before_stage_is_refused(rig):
    rig.open(release())
    refused(rig.hook("install"), text="phase opened")
    assert rig.calls() == []


def test_restart_before_install_and_ready_before_restart_are_refused(rig):
    install_through(rig)
    refused(rig.hook("restart"), text="phase staged")
    refused(rig.hook("ready"), text="phase staged")
    assert rig.hook("install").phase == ip.INSTALLING
    assert rig.settle().phase == ip.INSTALLED
    refused(rig.hook("ready"), text="phase installed")
    assert rig.hook("restart").phase == ip.RESTARTING
    assert rig.settle().phase == ip.RESTARTED
    assert rig.hook("ready").phase == ip.RESTARTED
    assert rig.settle().hook.state == ip.DONE
    assert [line.split()[0] for line in rig.calls()] == ["install", "restart", "ready"]


def test_install_runs_once_per_execution_and_a_repeat_is_answered(rig):
    install_through(rig)
    rig.hook("install")
    rig.settle()
    again = rig.hook("install")
    assert isinstance(again, ip.JobState) and again.phase == ip.INSTALLED
    rig.hook("restart")
    rig.settle()
    again = rig.hook("restart")
    assert isinstance(again, ip.JobState) and again.phase == ip.RESTARTED
    assert [line.split()[0] for line in rig.calls()] == ["install", "restart"]


def test_same_round_of_a_read_only_hook_is_answered_not_run_again(rig):
    rig.open(release())
    rig.hook("version", 0)
    assert rig.settle().hook.output == "1.0"
    assert rig.hook("version", 0).hook.state == ip.DONE
    rig.hook("version", 1)
    rig.settle()
    assert len([c for c in rig.calls() if c.startswith("version")]) == 2


def test_a_second_job_while_one_is_open_is_busy_naming_it(rig):
    rig.open(release())
    refused(rig.open(release(), job_id="job-2"), BUSY, "job job-1 execution 1 is open")
    refused(rig.open(release(), execution=2), BUSY, "job job-1 execution 1 is open")


def test_open_job_is_idempotent_and_its_release_never_changes(rig):
    first = rig.open(release())
    again = rig.open(release())
    assert (again.phase, again.message) == (first.phase, first.message)
    refused(rig.open(release(meta="other")), text="another release")
    refused(rig.open(release(force=True)), text="another release")


def test_a_hook_while_another_runs_is_busy(world_tmp):
    rig = Rig(world_tmp, hooks={"download": "sleep 5", "version": "echo 1"})
    try:
        rig.open(release())
        assert rig.hook("download").hook.state == ip.RUNNING
        refused(rig.hook("version"), BUSY, "the download hook")
        refused(rig.stage(), BUSY, "the download hook")
    finally:
        rig.close()


def test_unconfigured_hook_is_refused(world_tmp):
    rig = Rig(world_tmp, hooks={"install": "exit 0"})
    try:
        rig.open(release())
        refused(rig.hook("version"), text="not configured")
    finally:
        rig.close()


def test_a_failed_job_permits_only_discard(rig):
    rig.download(b"not the promised bytes")
    rig.open(release())
    rig.stage()
    state = rig.settle()
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    refused(rig.hook("install"), text="only discard")
    refused(rig.hook("version"), text="only discard")
    assert rig.discard().phase == ip.DISCARDED


def test_late_requests_for_a_discarded_execution_are_refused(rig):
    install_through(rig)
    assert rig.discard().phase == ip.DISCARDED
    assert rig.query().phase == ip.DISCARDED
    refused(rig.open(release()), text="it was discarded")
    refused(rig.stage(), text="it was discarded")
    refused(rig.hook("install"), text="it was discarded")
    assert rig.discard().phase == ip.DISCARDED
    assert rig.staged_files() == []


def test_query_of_an_unknown_execution_says_none(rig):
    state = rig.query(job_id="never", execution=7)
    assert (state.phase, state.hook) == (ip.NONE, None)


def test_ping_names_the_open_job(rig):
    rig.open(release())
    pong = rig.ask(ip.Ping(seq=5))
    assert (pong.job_id, pong.execution, pong.phase) == ("job-1", 1, ip.OPENED)


# ----- hook arguments come from the record ---------------------------------------------
def test_hook_arguments_are_the_recorded_release(world_tmp):
    rig = Rig(world_tmp)
    try:
        install_through(rig, release(meta="m; rm -rf /", force=True))
        rig.hook("install")
        rig.settle()
        rig.hook("restart")
        rig.settle()
        install, restart = rig.calls()
        staged = rig.layout.staging_dir / "job-1.1"
        assert install.endswith(f" m; rm -rf / {staged}")
        assert restart.endswith(" m; rm -rf / True")
    finally:
        rig.close()


def test_restart_gets_an_empty_force_argument_as_upparat_1_did(world_tmp):
    base = world_tmp
    rig = Rig(base, hooks={"install": "exit 0", "restart": f'printf "%s|" "$@" > {base}/argv'})
    try:
        install_through(rig, release(meta="x", force=False))
        rig.hook("install")
        rig.settle()
        rig.hook("restart")
        rig.settle()
        assert (base / "argv").read_text().split("|")[2:] == ["x", "", ""]
    finally:
        rig.close()


def test_the_phase_is_recorded_before_the_install_hook_runs(world_tmp):
    state = world_tmp / "staging" / "state.json"
    rig = Rig(world_tmp, hooks={"install": f"cp {state} {world_tmp}/seen"})
    try:
        install_through(rig)
        rig.hook("install")
        rig.settle()
        seen = json.loads((world_tmp / "seen").read_text())
        assert seen["job"]["phase"] == ip.INSTALLING
        assert seen["job"]["hook_token"]
    finally:
        rig.close()


# ----- verification with the installer's own keys ------------------------------------
def test_unsigned_release_is_refused_before_any_hook_runs(keyed):
    state = keyed.open(release())
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    for name in HOOK_NAMES:
        refused(keyed.hook(name))
    assert keyed.calls() == []


def test_a_signed_release_is_accepted(keyed, key):
    install_through(keyed, signed(key))
    keyed.hook("install")
    assert keyed.settle().phase == ip.INSTALLED


@pytest.mark.parametrize("change", [{"meta": "--evil"}, {"force": True}, {"version": "9.9"}, {"serial": 1},
                                    {"size": 1}])
def test_a_changed_field_under_the_signature_is_refused(keyed, key, change):
    good = signed(key)
    state = keyed.open(dataclasses.replace(good, **change))
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    assert "does not verify" in state.message
    refused(keyed.hook("version"))
    assert keyed.calls() == []


def test_a_signature_of_another_key_is_refused(keyed):
    other = ed25519.Ed25519PrivateKey.generate()
    assert keyed.open(signed(other)).failure == "verification_failed"


def test_rollback_by_serial_is_refused_equal_serial_is_allowed(keyed, key):
    install_through(keyed, signed(key, serial=5))
    keyed.hook("install")
    assert keyed.settle().phase == ip.INSTALLED
    assert keyed.installer.state.highest_serial == 5
    keyed.discard()
    older = keyed.open(signed(key, serial=4), execution=2)
    assert (older.phase, older.failure) == (ip.FAILED, "rollback_refused")
    assert "lower than the highest serial installed" in older.message
    keyed.discard(execution=2)
    keyed.download(execution=3)
    assert keyed.open(signed(key, serial=5), execution=3).phase == ip.OPENED


def test_only_signed_serials_are_recorded_and_only_on_install_exit_0(world_tmp, key):
    rig = Rig(world_tmp, keys=[key.public_key()], allow_unsigned=True,
              hooks={"install": f"test ! -e {world_tmp}/fail"})
    try:
        install_through(rig, release(serial=99))  # unsigned: accepted (allow_unsigned), never recorded
        rig.hook("install")
        assert rig.settle().phase == ip.INSTALLED
        rig.discard()
        (world_tmp / "fail").touch()
        rig.download(execution=2)
        assert rig.open(signed(key, serial=7), execution=2).phase == ip.OPENED
        rig.stage(execution=2)
        rig.settle()
        rig.hook("install", execution=2)
        assert rig.settle().failure == "installation_hook_failed"
        assert rig.installer.state.highest_serial is None
    finally:
        rig.close()


def test_no_keys_and_allow_unsigned_false_names_both_keys(world_tmp):
    rig = Rig(world_tmp, allow_unsigned=False)
    try:
        state = rig.open(release())
        assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
        assert "[verification] public_keys" in state.message and "allow_unsigned" in state.message
    finally:
        rig.close()


def test_allow_unsigned_accepts_on_sha256_but_a_signed_document_must_still_verify(world_tmp, key):
    rig = Rig(world_tmp, allow_unsigned=True)
    try:
        assert rig.open(release()).phase == ip.OPENED
        rig.discard()
        state = rig.open(signed(key), execution=2)
        assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    finally:
        rig.close()


def test_allow_unsigned_still_checks_the_bytes_against_sha256(rig):
    rig.download(b"a file the broker chose")
    rig.open(release())
    rig.stage()
    state = rig.settle()
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    assert rig.staged_files() == []


# ----- hostile signatures never raise out of open_job -------------------------------


@pytest.fixture(scope="module")
def two_keys():
    return [ed25519.Ed25519PrivateKey.generate().public_key(), ec.generate_private_key(ec.SECP256R1()).public_key()]


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=120))
def test_any_signature_bytes_are_a_verification_failure_never_an_exception(two_keys, raw):
    candidate = dataclasses.replace(release(), signature=base64.b64encode(raw).decode() or "AA==")
    if candidate.problem():
        return  # refused by the decoder before open_job
    failure = verify.release_failure(candidate, two_keys, verify.Policy())
    assert failure is not None and failure.state == "verification_failed"
