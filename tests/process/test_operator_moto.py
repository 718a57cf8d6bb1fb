"""upparat-jobs as an operator runs it, against a real moto_server process (S3 and AWS IoT),
found the standard boto3 way: AWS_ENDPOINT_URL and dummy credentials in the environment.

What moto cannot show (said here so nobody reads more into a green run): it keeps no job
execution statusDetails (it has no jobs data plane for a device to report on), never moves an
execution out of QUEUED, and makes one execution per target ARN, a thing group's included
(named after the group). Status with device states and messages is proven against the jobs
emulator (test_operator_emulator.py) and with a fake backend (tests/unit/test_operator.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import boto3
import pytest
import requests

from tests.support import PYTHON, Proc, free_port, poll_for, port_open
from upparat import signature, verify
from upparat.release import parse_document

pytestmark = pytest.mark.timeout(120)

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's
ROLE = f"arn:aws:iam::{ACCOUNT}:role/upparat-presign"
BUCKET = "upparat-releases"
THINGS = ("kitchen-1", "garage-2", "attic-3")
GROUP = "beta-fleet"


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    """A real moto_server on a free port; stopped by PID."""
    workdir = tmp_path_factory.mktemp("moto")
    port = free_port()
    proc = Proc([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log")
    try:
        poll_for(lambda: port_open(port) or (not proc.alive() and pytest.fail(proc.log())), 30,
                 what="moto_server")
        yield f"http://127.0.0.1:{port}", workdir
    finally:
        proc.stop()


def aws_env(endpoint: str, workdir: Path, **overrides) -> dict:
    """This environment without any AWS setting of the machine, plus dummy credentials.
    Instance metadata is off, so no credential lookup ever leaves this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(workdir / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-creds"))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Cloud:
    """The test's own view of moto (boto3 with explicit settings), reset for each test."""

    def __init__(self, endpoint: str, workdir: Path):
        self.endpoint, self.workdir = endpoint, workdir
        requests.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
        session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
        self.s3 = session.client("s3", endpoint_url=endpoint)
        self.iot = session.client("iot", endpoint_url=endpoint)
        self.s3.create_bucket(Bucket=BUCKET)
        # Versioning makes every PutObject visible, even one that rewrites the same bytes.
        self.s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        self.thing_arns = {name: self.iot.create_thing(thingName=name)["thingArn"] for name in THINGS}
        self.group_arn = self.iot.create_thing_group(thingGroupName=GROUP)["thingGroupArn"]

    def run(self, *argv, stdin: str = "", **env) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "upparat.operator", *argv], input=stdin, capture_output=True,
                              text=True, timeout=60, env=aws_env(self.endpoint, self.workdir, **env))

    def versions(self) -> list[dict]:
        return self.s3.list_object_versions(Bucket=BUCKET).get("Versions", [])

    def jobs(self) -> list[str]:
        return [job["jobId"] for job in self.iot.list_jobs().get("jobs", [])]


@pytest.fixture
def cloud(moto_server):
    return Cloud(*moto_server)


@pytest.fixture
def release_files(tmp_path):
    firmware = tmp_path / "firmware-2.0.0.raucb"
    firmware.write_bytes(os.urandom(300_000))
    code = subprocess.run([PYTHON, "-m", "upparat.operator", "keygen", "--out", str(tmp_path / "release")],
                          capture_output=True, text=True, timeout=30)
    assert code.returncode == 0, code.stderr
    return firmware, tmp_path / "release.key", tmp_path / "release.pub"


def create_args(firmware, *extra):
    return ("create", "--file", str(firmware), "--version", "2.0.0", "--bucket", BUCKET, "--role-arn", ROLE, *extra)


def document_of(cloud: Cloud, job_id: str) -> dict:
    return json.loads(cloud.iot.get_job_document(jobId=job_id)["document"])


def test_create_uploads_the_file_and_creates_the_job_as_given(cloud, release_files):
    firmware, key, pub = release_files
    result = cloud.run(*create_args(firmware, "--key", str(key), "--meta", "channel=beta", "--serial", "7",
                                    "--thing", "-", "--thing-group", GROUP, "--job-prefix", "fleet-",
                                    "--max-per-minute", "25", "--abort-failed-percent", "12.5",
                                    "--abort-min-executed", "4", "--in-progress-timeout", "90"),
                       stdin="kitchen-1\n# not this one: attic-3\n\ngarage-2\n")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert job_id.startswith("fleet-2_0_0-") and cloud.jobs() == [job_id]
    assert "\r" not in result.stderr and "[#" not in result.stderr  # no progress bar off a terminal

    # The S3 object holds the file's bytes, under a key derived from its sha256.
    file = verify.hash_fd(os.open(firmware, os.O_RDONLY))
    key_name = f"upparat/{file[0]}/{firmware.name}"
    assert cloud.s3.get_object(Bucket=BUCKET, Key=key_name)["Body"].read() == firmware.read_bytes()

    job = cloud.iot.describe_job(jobId=job_id)["job"]
    assert job["targets"] == [cloud.thing_arns["kitchen-1"], cloud.thing_arns["garage-2"], cloud.group_arn]
    assert job["targetSelection"] == "SNAPSHOT"
    assert job["presignedUrlConfig"] == {"roleArn": ROLE, "expiresInSec": 3600}
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 25}
    assert job["abortConfig"] == {"criteriaList": [{"failureType": "ALL", "action": "CANCEL",
                                                    "thresholdPercentage": 12.5, "minNumberOfExecutedThings": 4}]}
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 90}

    # The document (docs/contracts.md, Job document): the file is AWS's presigned-URL placeholder for that object...
    document = document_of(cloud, job_id)
    object_url = f"https://s3.{REGION}.amazonaws.com/{BUCKET}/{key_name}"
    assert document["file"] == "${aws:iot:s3-presigned-url:" + object_url + "}"
    assert (document["version"], document["sha256"], document["size"]) == ("2.0.0", file[0], file[1])
    assert (document["meta"], document["force"], document["serial"]) == ("channel=beta", False, 7)
    # ... and once AWS filled it in, the device parses it and the installer's own check passes
    # with the .pub file under statement v2.
    delivered = dict(document, file=object_url + "?X-Amz-Security-Token=t&X-Amz-Signature=s")
    release, _ = parse_document(delivered)
    keys = [signature.load_public_key(pub.read_bytes())]
    assert verify.release_failure(release, keys, verify.Policy()) is None


def test_a_second_job_with_the_same_file_uploads_nothing(cloud, release_files):
    firmware, key, _ = release_files
    first = cloud.run(*create_args(firmware, "--key", str(key), "--thing", "kitchen-1"))
    assert first.returncode == 0, first.stderr
    assert len(cloud.versions()) == 1
    second = cloud.run(*create_args(firmware, "--thing", "garage-2", "--job-id", "again-1"), stdin="")
    assert second.returncode == 0, second.stderr
    assert "not uploading" in second.stderr and "uploaded" not in second.stderr
    assert len(cloud.versions()) == 1  # no second PutObject, not even of the same bytes
    assert document_of(cloud, "again-1")["file"] == document_of(cloud, first.stdout.strip())["file"]
    assert "allow_unsigned = true" in second.stderr  # no --key: says the devices will refuse it


def test_dry_run_uploads_nothing_creates_nothing_and_prints_the_requests_that_would_be(cloud, release_files):
    firmware, key, _ = release_files
    args = create_args(firmware, "--key", str(key), "--thing", "kitchen-1", "--thing-group", GROUP,
                       "--job-id", "dry-1", "--max-per-minute", "5")
    dry = cloud.run(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert cloud.versions() == [] and cloud.jobs() == []
    printed = json.loads(dry.stdout)["requests"]
    assert [(r["service"], r["operation"]) for r in printed] == [("s3", "PutObject"), ("iot", "CreateJob")]
    assert printed[0]["params"]["Bucket"] == BUCKET

    # The same command without --dry-run sends exactly the printed CreateJob (Ed25519 is deterministic).
    real = cloud.run(*args)
    assert real.returncode == 0, real.stderr
    create_job = printed[1]["params"]
    job = cloud.iot.describe_job(jobId="dry-1")["job"]
    assert job["targets"] == create_job["targets"] == [cloud.thing_arns["kitchen-1"], cloud.group_arn]
    assert job["jobExecutionsRolloutConfig"] == create_job["jobExecutionsRolloutConfig"]
    assert cloud.iot.get_job_document(jobId="dry-1")["document"] == create_job["document"]
    assert [v["Key"] for v in cloud.versions()] == [printed[0]["params"]["Key"]]


def test_cancel_leaves_the_job_canceled(cloud, release_files):
    firmware, key, _ = release_files
    assert cloud.run(*create_args(firmware, "--key", str(key), "--thing", "attic-3", "--job-id", "to-cancel")
                     ).returncode == 0
    result = cloud.run("cancel", "to-cancel", "--force")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job to-cancel: CANCELED\n"
    job = cloud.iot.describe_job(jobId="to-cancel")["job"]
    assert job["status"] == "CANCELED" and job["forceCanceled"] is True


def test_status_json_lists_the_executions(cloud, release_files):
    firmware, key, _ = release_files
    assert cloud.run(*create_args(firmware, "--key", str(key), "--thing", "-", "--job-id", "watch-1"),
                     stdin="kitchen-1\ngarage-2\n").returncode == 0
    result = cloud.run("status", "watch-1", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["jobId"] == "watch-1"
    assert [(e["thing"], e["status"]) for e in status["executions"]] == [("kitchen-1", "QUEUED"),
                                                                        ("garage-2", "QUEUED")]
    assert status["counts"] == {"QUEUED": 2}
    table = cloud.run("status", "watch-1")
    assert table.returncode == 0 and [line.split()[:2] for line in table.stdout.splitlines()[2:]] == [
        ["kitchen-1", "QUEUED"], ["garage-2", "QUEUED"]]


# ---------------------------------------------------------------- errors: one line each

def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_no_credentials_is_one_line_and_exit_1(cloud, release_files):
    firmware, _, _ = release_files
    result = cloud.run(*create_args(firmware, "--thing", "kitchen-1"),
                       AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    assert result.returncode == 1
    assert "no AWS credentials found" in one_line(result)
    assert cloud.versions() == [] and cloud.jobs() == []


def test_no_region_is_one_line_and_exit_1(cloud):
    result = cloud.run("status", "any-job", AWS_DEFAULT_REGION=None)
    assert result.returncode == 1 and "no AWS region" in one_line(result)


def test_a_missing_bucket_is_one_line_and_exit_1(cloud, release_files):
    firmware, _, _ = release_files
    result = cloud.run("create", "--file", str(firmware), "--version", "1", "--bucket", "no-such-bucket",
                       "--role-arn", ROLE, "--thing", "kitchen-1")
    assert result.returncode == 1
    assert one_line(result) == ("upparat-jobs create: bucket no-such-bucket does not exist "
                                f"(S3 NoSuchBucket in {REGION}): create it or check --bucket")
    assert cloud.jobs() == []


def test_an_unknown_thing_is_one_line_exit_1_and_nothing_is_uploaded(cloud, release_files):
    firmware, _, _ = release_files
    result = cloud.run(*create_args(firmware, "--thing", "-"), stdin="kitchen-1\nnot-registered\n")
    assert result.returncode == 1
    assert one_line(result) == (f"upparat-jobs create: unknown thing not-registered "
                                f"(not in the AWS IoT registry of {REGION})")
    assert cloud.versions() == [] and cloud.jobs() == []


def test_an_unknown_group_is_one_line_and_exit_1(cloud, release_files):
    firmware, _, _ = release_files
    result = cloud.run(*create_args(firmware, "--thing-group", "no-group"))
    assert result.returncode == 1 and "unknown thing group no-group" in one_line(result)


def test_an_existing_job_id_is_one_line_exit_1_and_the_new_file_is_not_uploaded(cloud, release_files, tmp_path):
    firmware, key, _ = release_files
    assert cloud.run(*create_args(firmware, "--key", str(key), "--thing", "kitchen-1", "--job-id", "taken")
                     ).returncode == 0
    other = tmp_path / "other.bin"
    other.write_bytes(b"other release")
    result = cloud.run(*create_args(other, "--key", str(key), "--thing", "kitchen-1", "--job-id", "taken"))
    assert result.returncode == 1
    assert one_line(result) == "upparat-jobs create: job taken already exists (status QUEUED): choose another --job-id"
    assert len(cloud.versions()) == 1


def test_status_and_cancel_of_an_unknown_job_exit_1(cloud):
    for command in ("status", "cancel"):
        result = cloud.run(command, "no-such-job")
        assert result.returncode == 1
        assert one_line(result) == f"upparat-jobs {command}: no job no-such-job in {REGION}"


def test_usage_errors_exit_2_and_send_nothing(cloud, release_files):
    firmware, _, _ = release_files
    result = cloud.run(*create_args(firmware, "--thing", "kitchen-1", "--in-progress-timeout", "0"))
    assert result.returncode == 2 and "--in-progress-timeout" in one_line(result)
    result = cloud.run(*create_args(firmware, "--thing", "kitchen-1", "--serial"))
    assert result.returncode == 2 and "expected one argument" in one_line(result)
    assert cloud.versions() == [] and cloud.jobs() == []


def test_an_unreachable_endpoint_is_one_line_and_exit_1(cloud):
    result = cloud.run("status", "any-job", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                       AWS_MAX_ATTEMPTS="1")
    assert result.returncode == 1 and "cannot reach the AWS endpoint" in one_line(result)
