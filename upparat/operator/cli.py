"""The ``upparat-jobs`` command line (docs/contracts.md, Commands): keygen, sign, create, cancel, status.

Exit codes (``upparat.codes``): 0 done; 1 AWS or the jobs emulator refused or could
not be reached (credentials, region, bucket, thing, job id, permissions); 2 the
command line or a local input is unusable (options, file, key). Each failure is
one line on stderr. Results go to stdout (JSON where a program reads them);
notes and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from upparat import codes
from upparat.operator import plan
from upparat.operator.plan import ServiceError, UsageError

PROG = "upparat-jobs"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one line from ``main`` (exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Sign, upload and roll out Upparat updates with AWS IoT Jobs.")
    parser.add_argument("--emulator", metavar="URL",
                        help="talk to a local upparat-jobs-emulator's control API instead of AWS "
                             "(start it with --files DIR to stand in for S3)")
    parser.add_argument("--profile", help="AWS profile (default: AWS_PROFILE or the default profile)")
    parser.add_argument("--region", help="AWS region (default: AWS_DEFAULT_REGION or the profile's region)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    keygen = commands.add_parser("keygen", help="make a release signing key pair")
    keygen.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (0600) and PREFIX.pub")
    keygen.add_argument("--type", default="ed25519", choices=("ed25519", "p256"))

    sign = commands.add_parser("sign", help="print a file's signed job document fields as JSON")
    sign.add_argument("--key", required=True, help="private key (from keygen)")
    _release_options(sign)
    sign.add_argument("file", metavar="FILE")

    create = commands.add_parser("create", help="upload a file and create the AWS IoT job for it")
    create.add_argument("--file", required=True)
    create.add_argument("--bucket", required=True, help="S3 bucket for the file")
    create.add_argument("--role-arn", required=True,
                        help="IAM role AWS IoT assumes to presign the file's URL (s3:GetObject)")
    create.add_argument("--key", help="private key to sign with (without one, devices refuse the job "
                                      "unless they set [verification] allow_unsigned = true)")
    _release_options(create)
    create.add_argument("--thing", action="append", default=[], metavar="NAME",
                        help="target thing (repeatable); '-' reads names from stdin, one a line")
    create.add_argument("--thing-group", action="append", default=[], metavar="NAME",
                        help="target thing group (repeatable)")
    create.add_argument("--job-id", help="default: <job-prefix><version>-<UTC date>-<time>-<random>")
    create.add_argument("--job-prefix", help=f"prefix of the generated job id (default {plan.DEFAULT_JOB_PREFIX}); "
                                             "given with --job-id, the id must start with it")
    create.add_argument("--max-per-minute", type=int, metavar="N",
                        help=f"rollout: notify at most N things a minute (1-{plan.MAX_PER_MINUTE})")
    create.add_argument("--abort-failed-percent", type=float, metavar="P",
                        help="cancel the job's queued executions once P%% of executed ones failed, "
                             "were rejected or timed out")
    create.add_argument("--abort-min-executed", type=int, default=plan.DEFAULT_ABORT_MIN_EXECUTED, metavar="N",
                        help="... but only after N things executed (default %(default)s, at most the "
                             "number of --thing targets when there is no group)")
    create.add_argument("--in-progress-timeout", type=int, metavar="MIN",
                        help=f"an execution IN_PROGRESS longer than MIN minutes becomes TIMED_OUT "
                             f"(1-{plan.MAX_TIMEOUT_MINUTES})")
    create.add_argument("--continuous", action="store_true",
                        help="things added to a target group later get the job too (default: snapshot)")
    create.add_argument("--dry-run", action="store_true",
                        help="look things up, print the requests that would change something, send none")

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--force", action="store_true",
                        help="also cancel executions already IN_PROGRESS (a device may be mid-install)")

    status = commands.add_parser("status", help="a job's status and each device's state and message")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _release_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", required=True, help="the release's version (what the version hook reports)")
    parser.add_argument("--meta", help="text passed to every hook (signed)")
    parser.add_argument("--force", action="store_true", help="skip the version and download hooks (signed)")
    parser.add_argument("--serial", type=int, metavar="N",
                        help="anti-rollback serial: signed devices refuse one lower than they installed")


# ---------------------------------------------------------------------- commands

def cmd_keygen(args, out, err) -> int:
    from upparat.operator import keys

    private, public = keys.keygen(args.out, args.type)
    print(f"wrote {private} (private, mode 0600: keep it secret) and {public}", file=out)
    print(f"copy {public.name} to each device and list it there, e.g. "
          f"[verification] public_keys = /etc/upparat/{public.name}", file=out)
    return codes.EXIT_OK


def _release(args, path: str, key_path: str | None, err):
    """Hash the file and sign its release; the key is loaded first (a wrong key or passphrase
    should not wait for a large file to be hashed)."""
    from upparat.operator import keys

    private_key = None
    if key_path is not None:
        private_key = keys.load_private_key(key_path, warn=lambda m: print(m, file=err))
    file = plan.hash_file(path)
    release = plan.release_for(file, args.version, args.meta, args.force, args.serial)
    if private_key is not None:
        release = keys.sign_release(private_key, release)
    return file, release


def cmd_sign(args, out, err) -> int:
    _, release = _release(args, args.file, args.key, err)
    json.dump(plan.document_fields(release), out, indent=2)
    out.write("\n")
    return codes.EXIT_OK


def _backend(args):
    if args.emulator:
        from upparat.operator.emulator import Emulator

        return Emulator(args.emulator)
    try:
        from upparat.operator.aws import Aws
    except ImportError:
        raise UsageError("boto3 is not installed: pip install 'upparat[operator]' "
                         "(or use --emulator URL for a local trial)") from None
    return Aws(args.profile, args.region)


def cmd_create(args, out, err, stdin) -> int:
    # Everything local first: a bad option or file never costs a request.
    plan.check_bucket(args.bucket)
    plan.check_role_arn(args.role_arn)
    if args.job_prefix is not None:
        plan.check_job_prefix(args.job_prefix)
    if args.job_id is not None:
        plan.check_job_id(args.job_id, args.job_prefix)
    things = plan.thing_names(args.thing, stdin)
    groups = plan.group_names(args.thing_group)
    if groups and args.emulator:
        raise UsageError("the jobs emulator has no thing groups: name the things with --thing")
    if not things and not groups:
        raise UsageError("no targets: give --thing NAME, --thing - (names on stdin) or --thing-group NAME")
    if len(things) + len(groups) > plan.MAX_TARGETS:
        raise UsageError(f"{len(things) + len(groups)} targets; AWS allows at most {plan.MAX_TARGETS} per job: "
                         "put the things into a thing group and use --thing-group")
    rollout = plan.Rollout(max_per_minute=args.max_per_minute, abort_failed_percent=args.abort_failed_percent,
                           abort_min_executed=args.abort_min_executed,
                           in_progress_timeout=args.in_progress_timeout, continuous=args.continuous)
    problem = rollout.problem()
    if problem:
        raise UsageError(problem)
    file, release = _release(args, args.file, args.key, err)
    job_id = args.job_id or plan.new_job_id(
        plan.DEFAULT_JOB_PREFIX if args.job_prefix is None else args.job_prefix, release.version)

    backend = _backend(args)
    backend.check_job_free(job_id)
    targets = backend.resolve_targets(things, groups)
    key = backend.find_object(args.bucket, file)
    upload = key is None
    key = key or plan.object_key(file)
    document = plan.job_document(release, backend.object_url(args.bucket, key))
    create_job = plan.create_job_request(job_id, document, targets, args.role_arn, rollout,
                                         plan.describe(release, file), things_only=not groups)
    request = backend.job_request(create_job, things)
    if release.signature is None:
        print("warning: unsigned release (no --key): devices refuse this job unless their config sets "
              "[verification] allow_unsigned = true", file=err)
    for setting in backend.ignored(create_job):
        print(f"note: {backend.name} ignores the {setting}", file=err)
    if not upload:
        print(f"{args.bucket}/{key} already holds this file (sha256 {file.sha256}): not uploading", file=err)

    if args.dry_run:
        requests = ([backend.upload_request(args.bucket, key, file, release)] if upload else []) + [request]
        json.dump({"dryRun": True, "requests": requests}, out, indent=2)
        out.write("\n")
        print("dry run: nothing uploaded, no job created", file=err)
        return codes.EXIT_OK

    if upload:
        from upparat.operator.progress import Progress

        progress = Progress(err, file.size, f"uploading {file.name}")
        backend.upload(args.bucket, key, file, release, progress)
        progress.finish()
        print(f"uploaded {file.name} to {args.bucket}/{key}", file=err)
    backend.create_job(request)
    print(f"created job {job_id} for {_count(len(things), 'thing')}"
          f"{' and ' + _count(len(groups), 'thing group') if groups else ''}"
          f"; follow it with: {PROG} status {job_id}", file=err)
    print(job_id, file=out)
    return codes.EXIT_OK


def cmd_cancel(args, out, err) -> int:
    plan.check_job_id(args.job_id)
    backend = _backend(args)
    backend.job_status(args.job_id, executions=False)  # "no job X" before trying to cancel it
    backend.cancel_job(args.job_id, args.force)
    status = backend.job_status(args.job_id, executions=False)["status"]
    print(f"job {args.job_id}: {status}", file=out)
    if not args.force:
        print("executions already IN_PROGRESS go on; --force cancels them too", file=err)
    return codes.EXIT_OK


def cmd_status(args, out, err) -> int:
    plan.check_job_id(args.job_id)
    job = _backend(args).job_status(args.job_id)
    executions = [{"thing": e["thing"], "status": e["status"],
                   "state": e["statusDetails"].get("state"), "message": e["statusDetails"].get("message"),
                   "statusDetails": e["statusDetails"], "lastUpdatedAt": e.get("lastUpdatedAt")}
                  for e in job["executions"]]
    counts: dict[str, int] = {}
    for execution in executions:
        counts[execution["status"]] = counts.get(execution["status"], 0) + 1
    if args.json:
        json.dump({"jobId": job["jobId"], "status": job["status"], "counts": counts,
                   "executions": executions}, out, indent=2)
        out.write("\n")
        return codes.EXIT_OK
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no executions"
    print(f"job {job['jobId']}: {job['status']} ({summary})", file=out)
    if executions:
        rows = [("THING", "STATUS", "STATE", "MESSAGE")] + [
            (e["thing"], e["status"], e["state"] or "-", e["message"] or "") for e in executions]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3], file=out)
    return codes.EXIT_OK


def _one_line(exc: Exception, limit: int = 600) -> str:
    """A service may answer with a page of HTML: a failure stays one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def main(argv: list[str] | None = None, out=None, err=None, stdin=None) -> int:
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(_one_line(exc), file=err)
        return codes.EXIT_USAGE
    try:
        if args.command == "keygen":
            return cmd_keygen(args, out, err)
        if args.command == "sign":
            return cmd_sign(args, out, err)
        if args.command == "create":
            return cmd_create(args, out, err, stdin)
        if args.command == "cancel":
            return cmd_cancel(args, out, err)
        return cmd_status(args, out, err)
    except UsageError as exc:
        print(f"{PROG} {args.command}: {_one_line(exc)}", file=err)
        return codes.EXIT_USAGE
    except ServiceError as exc:
        print(f"{PROG} {args.command}: {_one_line(exc)}", file=err)
        return codes.EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
