"""upparat-jobs without a network: keys, signatures the installer accepts, the job
document and CreateJob request it builds, its usage errors, and its status table."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from upparat import signature, verify
from upparat.operator import cli, keys, plan
from upparat.release import parse_document

ROLE = "arn:aws:iam::123456789012:role/upparat-presign"
URL = "https://s3.us-east-1.amazonaws.com/b/k"


def run(argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, out=out, err=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def firmware(tmp_path):
    path = tmp_path / "fw-1.2.0.bin"
    path.write_bytes(os.urandom(5000))
    return path


@pytest.fixture(params=["ed25519", "p256"])
def keypair(request, tmp_path):
    private, public = keys.keygen(tmp_path / "release", request.param)
    return private, public


def installer_keys(public: Path) -> list:
    return [signature.load_public_key(public.read_bytes())]


def signed_fields(firmware, private, *extra):
    code, out, err = run(["sign", "--key", str(private), "--version", "1.2.0", *extra, str(firmware)])
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------- keygen

def test_keygen_writes_a_private_key_only_its_owner_can_read_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        code, out, err = run(["keygen", "--out", str(tmp_path / "k")])
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub").stat().st_mode & 0o777 == 0o644
    assert b"PRIVATE KEY" in (tmp_path / "k.key").read_bytes()
    signature.load_public_key((tmp_path / "k.pub").read_bytes())  # a key the device accepts
    assert "public_keys" in out


@pytest.mark.parametrize("existing", ["k.key", "k.pub"])
def test_keygen_refuses_to_overwrite_either_file_and_writes_nothing(tmp_path, existing):
    (tmp_path / existing).write_text("precious")
    code, out, err = run(["keygen", "--out", str(tmp_path / "k")])
    assert code == 2
    assert err.count("\n") == 1 and "refusing to overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == "precious"


def test_keygen_p256_makes_an_ecdsa_key(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    assert run(["keygen", "--out", str(tmp_path / "k"), "--type", "p256"])[0] == 0
    key = signature.load_public_key((tmp_path / "k.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)


def test_keygen_unknown_type_is_a_usage_error(tmp_path):
    code, _, err = run(["keygen", "--out", str(tmp_path / "k"), "--type", "rsa"])
    assert code == 2 and err.count("\n") == 1 and "invalid choice" in err


# ---------------------------------------------------------------- sign: what the installer accepts

def test_sign_prints_fields_the_installer_accepts_with_the_pub_file(firmware, keypair):
    private, public = keypair
    fields = signed_fields(firmware, private, "--meta", "channel=beta", "--serial", "42", "--force")
    assert fields["sha256"] == verify.hash_fd(os.open(firmware, os.O_RDONLY))[0]
    assert fields["size"] == 5000 and fields["serial"] == 42 and fields["force"] is True
    release, _ = parse_document({**fields, "file": URL})
    assert verify.release_failure(release, installer_keys(public), verify.Policy()) is None


@pytest.mark.parametrize("change", [
    {"meta": "channel=stable"}, {"force": True}, {"serial": 41}, {"serial": None},
    {"version": "1.2.1"}, {"size": 4999}, {"sha256": "0" * 64},
])
def test_a_signed_document_with_any_field_changed_is_refused(firmware, keypair, change):
    private, public = keypair
    fields = signed_fields(firmware, private, "--meta", "channel=beta", "--serial", "42")
    release, _ = parse_document({**fields, "file": URL})
    changed = dataclasses.replace(release, **change)
    failure = verify.release_failure(changed, installer_keys(public), verify.Policy())
    assert failure is not None and failure.state == verify.VERIFICATION_FAILED


def test_a_signature_from_another_key_is_refused(firmware, keypair, tmp_path):
    private, _ = keypair
    _, other_public = keys.keygen(tmp_path / "other")
    release, _ = parse_document({**signed_fields(firmware, private), "file": URL})
    assert verify.release_failure(release, installer_keys(other_public), verify.Policy()).state == \
        verify.VERIFICATION_FAILED


def test_sign_without_meta_signs_the_empty_meta_and_omits_serial(firmware, keypair):
    private, public = keypair
    fields = signed_fields(firmware, private)
    assert fields["meta"] == "" and "serial" not in fields
    release, _ = parse_document({k: v for k, v in fields.items() if k != "meta"} | {"file": URL})
    assert verify.release_failure(release, installer_keys(public), verify.Policy()) is None


def test_a_group_readable_key_gives_a_warning_but_signs(firmware, keypair):
    private, _ = keypair
    private.chmod(0o640)
    code, _, err = run(["sign", "--key", str(private), "--version", "1", str(firmware)])
    assert code == 0 and "chmod 600" in err


def test_an_encrypted_key_takes_its_passphrase_from_the_environment(firmware, tmp_path, monkeypatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "enc.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"s3cret")))
    path.chmod(0o600)
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "wrong")
    code, _, err = run(["sign", "--key", str(path), "--version", "1", str(firmware)])
    assert code == 2 and "wrong passphrase" in err
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "s3cret")
    code, out, err = run(["sign", "--key", str(path), "--version", "1", str(firmware)])
    assert code == 0, err
    release, _ = parse_document({**json.loads(out), "file": URL})
    assert signature.verifies([key.public_key()], release)


# ---------------------------------------------------------------- the document and the request

def test_the_job_document_is_what_the_device_parses_once_aws_presigned_the_url(firmware, keypair):
    private, public = keypair
    file = plan.hash_file(firmware)
    release = keys.sign_release(keys.load_private_key(private), plan.release_for(file, "1.2.0", "m", True, 3))
    object_url = plan.s3_object_url("fw-bucket", plan.object_key(file), "eu-central-1")
    document = plan.job_document(release, object_url)
    assert document["file"] == "${aws:iot:s3-presigned-url:" + object_url + "}"
    assert object_url == f"https://s3.eu-central-1.amazonaws.com/fw-bucket/upparat/{file.sha256}/fw-1.2.0.bin"
    presigned = dict(document, file=object_url + "?X-Amz-Signature=abc")
    parsed, url = parse_document(json.loads(json.dumps(presigned)))
    assert parsed == release and url.startswith(object_url)
    assert verify.release_failure(parsed, installer_keys(public), verify.Policy()) is None


def test_create_request_carries_only_the_settings_given():
    request = plan.create_job_request("j", {"version": "1"}, ["arn:t"], ROLE, plan.Rollout(), "d")
    assert set(request) == {"jobId", "targets", "document", "description", "presignedUrlConfig", "targetSelection"}
    assert request["presignedUrlConfig"] == {"roleArn": ROLE, "expiresInSec": 3600}
    assert request["targetSelection"] == "SNAPSHOT"


def test_abort_minimum_is_capped_by_the_things_when_no_group_is_targeted():
    rollout = plan.Rollout(abort_failed_percent=20, abort_min_executed=10)
    things = plan.create_job_request("j", {}, ["a", "b", "c"], ROLE, rollout, "d", things_only=True)
    with_group = plan.create_job_request("j", {}, ["a", "g"], ROLE, rollout, "d", things_only=False)
    assert things["abortConfig"]["criteriaList"][0]["minNumberOfExecutedThings"] == 3
    assert with_group["abortConfig"]["criteriaList"][0] == {
        "failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 20.0, "minNumberOfExecutedThings": 10}


@pytest.mark.parametrize("prefix,version", [
    ("upparat-", "1.2.0"), ("", "1.2.0"), ("x" * 40, "a-very-long-version-" * 6), ("fleet_A-", "...")])
def test_generated_job_ids_are_valid_aws_ids_starting_with_the_prefix(prefix, version):
    job_id = plan.new_job_id(prefix, version, now=1_800_000_000, token="abc123")
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", job_id) and job_id.startswith(prefix)
    assert job_id.endswith("-20270115-080000-abc123")
    assert plan.new_job_id(prefix, version) != plan.new_job_id(prefix, version)


def test_thing_names_from_stdin_skip_blanks_and_comments_and_drop_duplicates():
    stdin = io.StringIO("dev-1\n\n# the lab\n  dev-2  \ndev-1\n")
    assert plan.thing_names(["dev-0", "-", "dev-2"], stdin) == ["dev-0", "dev-1", "dev-2"]


def test_object_key_is_derived_from_the_content(tmp_path):
    a, b = tmp_path / "a b$.bin", tmp_path / "other.bin"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    key_a, key_b = plan.object_key(plan.hash_file(a)), plan.object_key(plan.hash_file(b))
    assert key_a.rsplit("/", 1)[0] == key_b.rsplit("/", 1)[0] == "upparat/" + plan.hash_file(a).sha256
    assert key_a.endswith("/a_b_.bin")


# ---------------------------------------------------------------- usage errors: exit 2, one line, no request

def create_args(firmware, *extra):
    return ["--emulator", "http://127.0.0.1:9", "create", "--file", str(firmware), "--version", "1.0",
            "--bucket", "fw-bucket", "--role-arn", ROLE, *extra]


@pytest.mark.parametrize("extra,stdin,fragment", [
    (["--thing", "d"], "", None),  # the baseline reaches the (absent) emulator: exit 1, see below
    ([], "", "no targets"),
    (["--thing", "bad name"], "", "is not a thing name"),
    (["--thing", "-"], "ok\nnot ok\n", "stdin line 2"),
    (["--thing", "-"], "\n# nothing\n", "read no thing names"),
    (["--thing", "-", "--thing", "-"], "a\n", "only once"),
    (["--thing-group", "g"], "", "no thing groups"),
    (["--thing", "d", "--job-id", "has space"], "", "job id"),
    (["--thing", "d", "--job-id", "notify-next"], "", "topic verb"),
    (["--thing", "d", "--job-id", "x-1", "--job-prefix", "fleet-"], "", "does not start with --job-prefix"),
    (["--thing", "d", "--job-prefix", "a.b"], "", "--job-prefix"),
    (["--thing", "d", "--max-per-minute", "0"], "", "--max-per-minute"),
    (["--thing", "d", "--max-per-minute", "1001"], "", "--max-per-minute"),
    (["--thing", "d", "--abort-failed-percent", "0"], "", "--abort-failed-percent"),
    (["--thing", "d", "--abort-failed-percent", "101"], "", "--abort-failed-percent"),
    (["--thing", "d", "--abort-failed-percent", "12.345"], "", "two decimals"),
    (["--thing", "d", "--abort-failed-percent", "nan"], "", "--abort-failed-percent"),
    (["--thing", "d", "--in-progress-timeout", "10081"], "", "--in-progress-timeout"),
    (["--thing", "d", "--serial", "-1"], "", "--serial"),
    (["--thing", "d", "--serial", "x"], "", "invalid int value"),
    (["--thing", "d", "--meta", "x" * 4097], "", "--meta"),
    (["--thing", "d", "--key", "/nonexistent.key"], "", "cannot read key"),
    (["--thing", "d", "--nope"], "", "unrecognized arguments"),
])
def test_create_usage_errors_exit_2_with_one_line_before_any_request(firmware, extra, stdin, fragment):
    code, out, err = run(create_args(firmware, *extra), stdin=stdin)
    if fragment is None:
        assert code == 1 and "cannot reach the jobs emulator" in err and err.count("\n") == 1
        return
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and fragment in err, err


def test_more_than_100_targets_is_a_usage_error(firmware):
    names = "".join(f"dev-{i}\n" for i in range(101))
    code, _, err = run(create_args(firmware, "--thing", "-"), stdin=names)
    assert code == 2 and "at most 100" in err and "--thing-group" in err


@pytest.mark.parametrize("argv,fragment", [
    (["--bucket", "Bad_Bucket"], "--bucket"),
    (["--role-arn", "role/x"], "--role-arn"),
    (["--version", "1\n2"], "--version"),
    (["--file", "/nonexistent/fw.bin"], "cannot read /nonexistent/fw.bin"),
    (["--file", "/"], "not a regular file"),
])
def test_bad_values_of_required_options_exit_2(firmware, argv, fragment):
    base = {"--file": str(firmware), "--version": "1", "--bucket": "fw-bucket", "--role-arn": ROLE}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = ["--emulator", "http://127.0.0.1:9", "create", "--thing", "d"] + [x for kv in base.items() for x in kv]
    code, _, err = run(args)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_status_and_cancel_check_the_job_id(firmware):
    for command in (["status", "a/b"], ["cancel", "a b"]):
        code, _, err = run(["--emulator", "http://127.0.0.1:9", *command])
        assert code == 2 and "job id" in err


def test_without_boto3_aws_commands_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "upparat.operator.aws", None)  # import fails like a missing boto3
    code, _, err = run(["status", "job-1"])
    assert code == 2 and "pip install 'upparat[operator]'" in err


# ---------------------------------------------------------------- status output

class FakeBackend:
    def __init__(self, job):
        self.job = job
        self.canceled = None

    def job_status(self, job_id, executions=True):
        return self.job if executions else {**self.job, "executions": []}

    def cancel_job(self, job_id, force):
        self.canceled = (job_id, force)
        self.job = {**self.job, "status": "CANCELED"}


JOB = {"jobId": "upparat-1", "status": "IN_PROGRESS", "targets": [], "executions": [
    {"thing": "kitchen-1", "status": "IN_PROGRESS", "lastUpdatedAt": "2026-01-01T00:00:00+00:00",
     "statusDetails": {"state": "download_progress", "progress": "40"}},
    {"thing": "garage-22", "status": "FAILED", "lastUpdatedAt": None,
     "statusDetails": {"state": "verification_failed", "message": "the signature does not verify"}},
    {"thing": "attic", "status": "QUEUED", "lastUpdatedAt": None, "statusDetails": {}},
]}


def test_status_table_shows_each_things_status_state_and_message(monkeypatch):
    monkeypatch.setattr(cli, "_backend", lambda args: FakeBackend(JOB))
    code, out, _ = run(["status", "upparat-1"])
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "job upparat-1: IN_PROGRESS (1 FAILED, 1 IN_PROGRESS, 1 QUEUED)"
    assert lines[1].split() == ["THING", "STATUS", "STATE", "MESSAGE"]
    assert lines[2].split() == ["kitchen-1", "IN_PROGRESS", "download_progress"]
    assert lines[3].split(None, 3) == ["garage-22", "FAILED", "verification_failed", "the signature does not verify"]
    assert lines[4].split() == ["attic", "QUEUED", "-"]
    assert len({line.index("STATUS") if "STATUS" in line else None for line in lines[1:2]}) == 1


def test_status_json_lists_every_execution_with_state_and_message(monkeypatch):
    monkeypatch.setattr(cli, "_backend", lambda args: FakeBackend(JOB))
    code, out, _ = run(["status", "upparat-1", "--json"])
    data = json.loads(out)
    assert code == 0 and data["jobId"] == "upparat-1" and data["status"] == "IN_PROGRESS"
    assert data["counts"] == {"IN_PROGRESS": 1, "FAILED": 1, "QUEUED": 1}
    assert [(e["thing"], e["status"], e["state"], e["message"]) for e in data["executions"]] == [
        ("kitchen-1", "IN_PROGRESS", "download_progress", None),
        ("garage-22", "FAILED", "verification_failed", "the signature does not verify"),
        ("attic", "QUEUED", None, None)]
    assert data["executions"][0]["statusDetails"]["progress"] == "40"


def test_cancel_passes_force_and_prints_the_new_status(monkeypatch):
    backend = FakeBackend(JOB)
    monkeypatch.setattr(cli, "_backend", lambda args: backend)
    code, out, err = run(["cancel", "upparat-1", "--force"])
    assert code == 0 and backend.canceled == ("upparat-1", True) and out == "job upparat-1: CANCELED\n"


def test_a_service_answer_of_many_lines_is_reported_on_one(monkeypatch):
    class Broken(FakeBackend):
        def job_status(self, job_id, executions=True):
            raise plan.ServiceError("IoT DescribeJob: 500: <html>\n<title>500</title>\n</html>")

    monkeypatch.setattr(cli, "_backend", lambda args: Broken(JOB))
    code, _, err = run(["status", "x"])
    assert code == 1 and err == "upparat-jobs status: IoT DescribeJob: 500: <html> <title>500</title> </html>\n"


# ---------------------------------------------------------------- boto3 stays off the device

def test_no_device_module_imports_boto3():
    root = Path(__file__).resolve().parents[2] / "upparat"
    importers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                       if re.search(r"^\s*(import boto3|from boto3|import botocore|from botocore)",
                                    p.read_text(), re.MULTILINE))
    assert importers == ["operator/aws.py"]
    code = ("import sys, upparat.supervisor, upparat.broker_proc, upparat.fetcher_proc, upparat.installer_proc, "
            "upparat.operator.cli, upparat.operator.emulator; "
            "sys.exit(any(m.split('.')[0] in ('boto3', 'botocore') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- the progress bar

class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_draws_on_a_terminal_and_says_nothing_elsewhere():
    from upparat.operator.progress import Progress

    for tty in (True, False):
        stream = FakeTerminal(tty)
        progress = Progress(stream, 4 * 1024 * 1024, "uploading fw.bin", interval=0)
        for _ in range(4):
            progress.add(1024 * 1024)
        progress.finish()
        text = stream.getvalue()
        if tty:
            assert text.count("\r") >= 4 and text.endswith("\n")
            assert "100% 4.0 MiB / 4.0 MiB" in text.splitlines()[-1].split("\r")[-1]
        else:
            assert text == ""
