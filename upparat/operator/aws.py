"""upparat-jobs against AWS: S3 for the file, AWS IoT for the job (boto3, imported only here).

Credentials, region and endpoint come the standard boto3 way: ``--profile`` /
``AWS_PROFILE``, the environment (``AWS_ACCESS_KEY_ID``..., ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL_IOT``),
``~/.aws/config``, SSO, instance roles. Every refusal becomes one
``ServiceError`` line that names the request and what to do.

Calls made (the operator's IAM policy needs exactly these, see docs/operator.md):
iot:DescribeJob, iot:DescribeThing, iot:DescribeThingGroup, iot:CreateJob,
iot:CancelJob, iot:ListJobExecutionsForJob, iot:DescribeJobExecution,
iam:PassRole (for the presigned-URL role), s3:ListBucket, s3:GetObject
(HeadObject), s3:PutObject.
"""

from __future__ import annotations

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from upparat.operator.plan import LocalFile, ServiceError, UsageError, object_prefix, s3_object_url
from upparat.release import Release

MULTIPART_THRESHOLD = 64 * 1024 * 1024
METADATA_SHA256 = "sha256"  # x-amz-meta-sha256: what makes an existing object reusable


def _error(exc: Exception, what: str) -> ServiceError:
    """One line for any boto3/botocore failure of the request ``what``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message") or ""
        if code in ("AccessDenied", "AccessDeniedException", "403", "Forbidden"):
            return ServiceError(f"{what}: access denied ({message or code}); the operator's IAM policy "
                                "needs the permissions listed in docs/operator.md")
        if code in ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId",
                    "UnrecognizedClientException", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return ServiceError(f"{what}: AWS does not accept these credentials ({code}); "
                                "refresh them (aws sso login, new keys)")
        return ServiceError(f"{what}: {code}: {message}".rstrip(": "))
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ServiceError("no AWS credentials found: set AWS_PROFILE (or --profile), "
                            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run aws configure")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return ServiceError(f"{what}: cannot reach the AWS endpoint ({exc})")
    return ServiceError(f"{what}: {exc}")


class Aws:
    name = "AWS"

    def __init__(self, profile: str | None = None, region: str | None = None):
        try:
            session = boto3.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise UsageError(f"AWS profile not found: {exc}") from None
        if not session.region_name:
            raise ServiceError("no AWS region: set AWS_DEFAULT_REGION, a region in your profile, or --region")
        try:
            credentials = session.get_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            raise ServiceError(f"cannot load AWS credentials: {exc}") from None
        if credentials is None:
            raise _error(botocore.exceptions.NoCredentialsError(), "")
        self.region = session.region_name
        config = Config(retries={"mode": "standard", "max_attempts": 5})
        self._s3 = session.client("s3", config=config)
        self._iot = session.client("iot", config=config)

    # ------------------------------------------------------------------ the file

    def object_url(self, bucket: str, key: str) -> str:
        return s3_object_url(bucket, key, self.region)

    def find_object(self, bucket: str, file: LocalFile) -> str | None:
        """The key of an object already holding these bytes (same size and x-amz-meta-sha256)."""
        prefix = object_prefix(file.sha256)
        try:
            listing = self._s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=100)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise ServiceError(f"bucket {bucket} does not exist (S3 NoSuchBucket in {self.region}): "
                                   "create it or check --bucket") from None
            raise _error(exc, f"S3 ListObjectsV2 s3://{bucket}/{prefix}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error(exc, f"S3 ListObjectsV2 s3://{bucket}/{prefix}") from None
        for entry in listing.get("Contents", []):
            if entry.get("Size") != file.size:
                continue
            try:
                head = self._s3.head_object(Bucket=bucket, Key=entry["Key"])
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise _error(exc, f"S3 HeadObject s3://{bucket}/{entry['Key']}") from None
            if head.get("Metadata", {}).get(METADATA_SHA256) == file.sha256:
                return entry["Key"]
        return None

    def _upload_args(self, release: Release) -> dict:
        return {"Metadata": {METADATA_SHA256: release.sha256, "upparat-version": release.version[:256]},
                "ContentType": "application/octet-stream"}

    def upload_request(self, bucket: str, key: str, file: LocalFile, release: Release) -> dict:
        params = {"Bucket": bucket, "Key": key, **self._upload_args(release),
                  "Body": f"<{file.path}: {file.size} bytes, sha256 {file.sha256}>"}
        if file.size < MULTIPART_THRESHOLD:
            return {"service": "s3", "operation": "PutObject", "params": params}
        parts = -(-file.size // MULTIPART_THRESHOLD)
        return {"service": "s3", "operation": "CreateMultipartUpload, UploadPart, CompleteMultipartUpload",
                "parts": parts, "params": params}

    def upload(self, bucket: str, key: str, file: LocalFile, release: Release, progress) -> None:
        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        try:
            with open(file.path, "rb") as fh:
                self._s3.upload_fileobj(fh, bucket, key, ExtraArgs=self._upload_args(release),
                                        Callback=progress.add, Config=config)
        except OSError as exc:
            raise UsageError(f"cannot read {file.path}: {exc.strerror}") from None
        except (boto3.exceptions.S3UploadFailedError, botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError) as exc:
            raise _error(exc, f"upload to s3://{bucket}/{key}") from None

    # ------------------------------------------------------------------ the job

    def check_job_free(self, job_id: str) -> None:
        try:
            job = self._iot.describe_job(jobId=job_id)["job"]
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return
            raise _error(exc, f"IoT DescribeJob {job_id}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error(exc, f"IoT DescribeJob {job_id}") from None
        raise ServiceError(f"job {job_id} already exists (status {job.get('status')}): choose another --job-id")

    def resolve_targets(self, things: list[str], groups: list[str]) -> list[str]:
        targets = [self._arn("thing", "describe_thing", {"thingName": name}, "thingArn") for name in things]
        targets += [self._arn("thing group", "describe_thing_group", {"thingGroupName": name}, "thingGroupArn")
                    for name in groups]
        return targets

    def _arn(self, kind: str, call: str, params: dict, field: str) -> str:
        name = next(iter(params.values()))
        try:
            return getattr(self._iot, call)(**params)[field]
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise ServiceError(f"unknown {kind} {name} (not in the AWS IoT registry of {self.region})") from None
            raise _error(exc, f"IoT {call} {name}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error(exc, f"IoT {call} {name}") from None

    def job_request(self, create_job: dict, things: list[str]) -> dict:
        return {"service": "iot", "operation": "CreateJob", "params": create_job}

    def ignored(self, create_job: dict) -> list[str]:
        return []

    def create_job(self, request: dict) -> None:
        params = request["params"]
        try:
            self._iot.create_job(**params)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceAlreadyExistsException":
                raise ServiceError(f"job {params['jobId']} already exists: choose another --job-id") from None
            raise _error(exc, f"IoT CreateJob {params['jobId']}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error(exc, f"IoT CreateJob {params['jobId']}") from None

    def cancel_job(self, job_id: str, force: bool) -> None:
        try:
            self._iot.cancel_job(jobId=job_id, force=force)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise ServiceError(f"no job {job_id} in {self.region}") from None
            raise _error(exc, f"IoT CancelJob {job_id}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error(exc, f"IoT CancelJob {job_id}") from None

    def job_status(self, job_id: str, executions: bool = True) -> dict:
        """The job's status and, per execution, the thing, status and statusDetails
        (ListJobExecutionsForJob has no statusDetails: one DescribeJobExecution each)."""
        what = f"IoT DescribeJob {job_id}"
        try:
            job = self._iot.describe_job(jobId=job_id)["job"]
            what = f"IoT ListJobExecutionsForJob {job_id}"
            summaries = []
            pages = self._iot.get_paginator("list_job_executions_for_job").paginate(jobId=job_id) if executions else []
            for page in pages:
                summaries += page.get("executionSummaries", [])
            found = []
            for summary in summaries:
                thing = thing_name(summary.get("thingArn", ""))
                what = f"IoT DescribeJobExecution {job_id} {thing}"
                execution = self._iot.describe_job_execution(jobId=job_id, thingName=thing)["execution"]
                found.append({
                    "thing": thing,
                    "status": execution.get("status") or summary.get("jobExecutionSummary", {}).get("status"),
                    "statusDetails": (execution.get("statusDetails") or {}).get("detailsMap") or {},
                    "lastUpdatedAt": _iso(execution.get("lastUpdatedAt")),
                })
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise ServiceError(f"no job {job_id} in {self.region}") from None
            raise _error(exc, what) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error(exc, what) from None
        return {"jobId": job_id, "status": job.get("status"), "targets": job.get("targets", []),
                "executions": found}


def thing_name(arn: str) -> str:
    """``arn:aws:iot:<region>:<account>:thing/<name>`` -> ``<name>``."""
    return arn.split(":thing/", 1)[-1] if ":thing/" in arn else arn.rsplit("/", 1)[-1]


def _iso(value) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value
