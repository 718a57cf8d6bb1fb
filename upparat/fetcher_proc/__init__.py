"""upparat-fetcher: downloads update files and checks them a first time.

Runs as ``[supervisor] fetcher_user`` (``upparat-fetch``), a user of its own
that is not the broker's: uid and gid not 0, no capabilities, no_new_privs,
not dumpable (checked by launch.start_child before anything else). Binds a
ROUTER (upparat.ipc.wire.Server) at ``<runtime_dir>/fetcher/fetcher.sock``;
the directory belongs to this user with the broker's group and setgid, and
the socket is made 0660, so the broker's group, and nobody else but root,
can connect. Details for operators: docs/downloads.md.

Trusts: the settings envelope from the supervisor (configuration, layout).
Nothing else. It holds no release keys: the installer checks a release's
signature with its own keys when the job is opened, before the broker asks
for the download; the fetcher checks the bytes against its sha256 and size.

Accepts: only the requests of upparat.ipc.fetcher_protocol (ping, fetch,
query_fetch, cancel_fetch), each decoded and checked field by field by
wire.Server; anything else is refused (``malformed``), logged and answered,
and the process keeps running. A fetch for another download while one runs
is refused ``busy`` (its end is pushed). A fetch for a known
``(job_id, execution)`` with another release is refused ``not_permitted``.
HTTP answers are untrusted: status, headers and body are checked before use;
no exception caused by them leaves the download thread.

Promises:
- Answers at once; pushes (seq 0, to the peer that spoke last) every state
  change of a download the moment it happens and progress at most once per
  PROGRESS_PUSH_S. Never polls anything.
- Idempotent per ``(job_id, execution)``: a repeated fetch answers the
  status; it resumes after ``download_failed``, ``url_expired`` or a cancel,
  and after any failure when a new URL is given for the same release. A new
  URL for a running download is used from its next attempt.
- Writes only ``handoff.part_name`` while downloading and, once size and
  sha256 are checked, closes its descriptor and renames it to
  ``handoff.final_name`` in ``<download_dir>`` (mode 0600), and only then
  reports ``done`` (the installer fsyncs it while it hashes; a finished file
  found after a restart is hashed again before it is reported). Writes resume records only in
  ``<state_location>/fetcher``. Paths never cross the socket.
- promise 7, docs/contracts.md: a 200 answer to a range request restarts from zero; a 206
  is used only when its Content-Range continues exactly where the partial
  file ends; If-Range with the object's ETag, so a changed object restarts
  from zero; a truncated body is resumed; a 416 is complete only when size
  and hash match; a body longer than the release's size, or than
  ``[service] max_file_size`` when no size is known, is stopped
  (``file_too_large``); a hash mismatch is ``verification_failed``.
- Bounded: memory (1 MiB reads, whatever the file size); time (the low-speed
  abort of ``[service] low_speed_limit``/``low_speed_time``, then a resume
  with Range; at most 5 failed attempts in a row and 30 in all; the overall
  ``download_timeout``); disk (``max_file_size``; the free space for the rest
  of the file is checked before its first byte is written, and, when staging
  is on another file system, room there for the installer's copy).
- Resumes across its own restarts and device restarts from the partial file
  and its record, re-hashing the checkpointed bytes; a corrupt or foreign
  record means starting over, never a crash.
- Files of a download are deleted when it is cancelled or fails for good
  (``verification_failed``, ``file_too_large``, ``insufficient_disk_space``,
  ``invalid_job_document``); they are kept after ``download_failed`` and
  ``url_expired`` for resuming, until the broker cancels the download.
  Starting a download deletes what is left of others (one job at a time).
- SIGTERM: the download checkpoints and stops, the socket is closed, exit 0.
- Never runs commands, never touches the staging directory, reaches no root
  socket.

Failures (FetchStatus.failure, job statusDetails.state names):
``download_failed`` (HTTP 4xx other than 403, retries exhausted, the deadline,
a disk that cannot be written), ``url_expired`` (HTTP 403: ask AWS for a
fresh URL and fetch again; it resumes), ``verification_failed``,
``invalid_job_document``, ``file_too_large``, ``insufficient_disk_space``.
Messages are for a person: at most 1024 characters, no control characters,
never a presigned URL's query.
"""
