"""broker_proc: the unprivileged MQTT process that owns the job lifecycle.

Trusts: nothing it receives. MQTT payloads (job documents included) are size
limited and checked field by field before use (jobs_api); a bad job document
ends its job FAILED with ``invalid_job_document`` and a message that says
how to fix it; any other bad payload is logged and dropped.
Accepts: AWS IoT Jobs messages for its own thing name only (topics are
matched exactly), and replies from the fetcher and installer protocols.
Promises: runs as an unprivileged user with no_new_privs (checked at start),
never runs commands and never touches files; every job it takes ends in a
terminal status with a reason (promise 6, docs/contracts.md); a status update is sent again
until AWS accepts or rejects it, so a broker restart loses none.
"""
