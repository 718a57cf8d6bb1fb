"""upparat-jobs: the operator's side of an update (docs/contracts.md: Commands, Job document, Signature statement).

Runs on an operator's machine or in CI, never on a device. It signs a
release with the statement the root installer re-verifies (``upparat.release``,
``upparat.signature``: one definition for both sides), uploads the file to S3
once per sha256, creates the AWS IoT job whose document devices parse with
``upparat.release.parse_document``, and shows or cancels a job.

What it trusts: the operator's command line, the signing key file, and the
answers of AWS (or of the local jobs emulator). What it promises: every
problem is one line naming what to fix; exit 2 for a bad command line or
local input (options, file, key), 1 when AWS or the emulator refused or could
not be reached, 0 otherwise; ``create --dry-run`` sends no request that
changes anything.

Modules: ``plan`` (pure: release, document, requests, ids), ``keys``
(keygen, private keys), ``aws`` (boto3, imported only here and only for AWS),
``emulator`` (the jobs emulator's HTTP control API), ``progress``, ``cli``.
"""
