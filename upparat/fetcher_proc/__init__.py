"""upparat-fetcher: downloads and first verification of update files.

Runs as the unprivileged user (uid/gid not 0, no capabilities, no_new_privs;
checked by launch.start_child before anything else), with a REP socket at
``<runtime_dir>/fetcher/fetcher.sock`` that the broker talks to.

Trusts: its configuration and the public keys handed over by the supervisor
(or read from [verification] public_keys when started on its own).

Accepts: only the messages of upparat.ipc.fetcher_protocol (Ping, Fetch,
QueryFetch, CancelFetch), each decoded and checked field by field; anything
else, and a Fetch for another job while one is running ("busy with job X"),
is refused with a Refused reply and logged. HTTP answers are untrusted input:
status, headers and body are checked before use, and a body is never trusted
until its size, sha256 and signature have been checked.

Promises:
- One download at a time, in a background thread; the socket keeps answering
  (QueryFetch reports bytes_done/bytes_total) while it runs.
- Writes only ``<download_dir>/<job_id>.part`` and, once verified,
  ``<download_dir>/<job_id>`` (mode 0640, fsynced, renamed into place). The
  job_id is checked by the protocol, so the path cannot leave download_dir.
  Paths never cross the boundary.
- Bounded memory (64 KiB chunks, hashed while written) and bounded time
  (connect/read timeouts on every request, a bounded number of attempts with
  backoff).
- DESIGN promise 7: a 200 answer to a range request restarts from zero; a
  206 is accepted only when its Content-Range starts where the .part ends; a
  truncated body is resumed; a body larger than the job's size is stopped at
  size+1 bytes (``file_too_large``); a hash or signature mismatch deletes the
  file (``verification_failed``). A file is reported ``done`` only after
  verify.check passed on the bytes this process wrote.
- Failures (FetchStatus.failure): ``download_failed`` (4xx, or retries
  exhausted), ``url_expired`` (HTTP 403; the .part is kept so a fresh URL
  resumes), ``verification_failed`` (also: no sha256 while [verification]
  require_sha256 is on), ``file_too_large``, ``insufficient_disk_space``.
  Messages are for a person: at most 1024 characters, no control characters.
- A repeated Fetch for a known job answers its status and does not start it
  again, unless it failed with url_expired or download_failed, or was
  cancelled: then it starts again, resuming from the .part.
- After a restart of this process, a Fetch finds the .part (resumed) or a
  finished file (re-verified, not downloaded again).
- SIGTERM: the running download stops between chunks (its .part is kept for
  resuming), the socket is closed, exit 0.
- Never runs commands, never touches the staging directory.
"""
