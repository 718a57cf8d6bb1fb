"""The fetcher's answers to the broker: one table of request -> handler.

``Fetcher.handle(message)`` is given to wire.serve_one; each ``answer_*``
matches the broker's call of the same name (``fetch`` -> ``answer_fetch``).
Out-of-phase requests raise ProtocolError, which serve_one turns into a
Refused reply.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from upparat.config import VerificationConfig
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc.wire import Message, Ping, Pong, ProtocolError

from .download import Download, Job, Limits, describe_url

log = logging.getLogger(__name__)

MAX_JOBS_KEPT = 32  # finished jobs remembered for QueryFetch and repeated Fetch
CANCEL_WAIT_S = 5.0
SHUTDOWN_WAIT_S = 5.0
# A repeated Fetch starts these again (resuming the .part); any other known
# job is answered with its status.
RESTARTABLE_FAILURES = ("url_expired", "download_failed")
NO_SHA256 = ("the job document has no sha256 and [verification] require_sha256 is on; add the file's sha256 "
             "to the job document, or set [verification] require_sha256 = false to allow it")


class Fetcher:
    def __init__(self, download_dir: Path, keys: list, verification: VerificationConfig, limits: Limits = Limits()):
        self.download_dir = Path(download_dir)
        self.keys = keys
        self.verification = verification
        self.limits = limits
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._worker: tuple[Job, threading.Thread] | None = None
        self._shutdown = threading.Event()
        self._table = {
            Ping: self.answer_ping,
            fp.Fetch: self.answer_fetch,
            fp.QueryFetch: self.answer_query_fetch,
            fp.CancelFetch: self.answer_cancel_fetch,
        }

    def handle(self, message: Message) -> Message:
        handler = self._table.get(type(message))
        if handler is None:
            raise ProtocolError(f"{message.TYPE} is not a fetcher request")
        return handler(message)

    def busy_job_id(self) -> str | None:
        """The job whose download thread is alive (also while it stops)."""
        if self._worker is not None and self._worker[1].is_alive():
            return self._worker[0].job_id
        return None

    # -- answers -----------------------------------------------------------
    def answer_ping(self, request: Ping) -> Pong:
        return Pong(seq=request.seq, pid=os.getpid(), busy_job_id=self.busy_job_id())

    def answer_fetch(self, request: fp.Fetch) -> fp.FetchStatus:
        known = self.jobs.get(request.job_id)
        if known is not None:
            status = known.status(request.seq)
            restartable = status.state == fp.CANCELLED or (
                status.state == fp.FAILED and status.failure in RESTARTABLE_FAILURES)
            if not restartable:
                return status
        busy = self.busy_job_id()
        if busy is not None:
            raise ProtocolError(f"busy with job {busy}" if busy != request.job_id
                                else f"still stopping the previous download of job {busy}; ask again")
        job = Job(request)
        self._remember(job)
        if request.sha256 is None and self.verification.require_sha256:
            job.finish(fp.FAILED, "verification_failed", NO_SHA256)
            return job.status(request.seq)
        download = Download(job, self.download_dir, self.keys, self.verification.require_signature,
                            self._shutdown, self.limits)
        thread = threading.Thread(target=download.run, name=f"download-{job.job_id}", daemon=True)
        self._worker = (job, thread)
        log.info("job %s: fetching %s", job.job_id, describe_url(request.url))
        thread.start()
        return job.status(request.seq)

    def answer_query_fetch(self, request: fp.QueryFetch) -> fp.FetchStatus:
        job = self.jobs.get(request.job_id)
        if job is None:
            return fp.FetchStatus(job_id=request.job_id, seq=request.seq, state=fp.UNKNOWN, bytes_done=0,
                                  bytes_total=None, failure=None, message="no download known for this job")
        return job.status(request.seq)

    def answer_cancel_fetch(self, request: fp.CancelFetch) -> fp.FetchStatus:
        job = self.jobs.get(request.job_id)
        if job is None:  # e.g. files left from before a restart of this process
            job = Job(fp.Fetch(job_id=request.job_id, seq=request.seq, url="http://cancelled.invalid/",
                               version="-", sha256=None, size=None, signature=None))
            self._remember(job)
        with job.lock:  # see Download._verify_and_publish: the rename and the cancel exclude each other
            job.cancel.set()
        if self._worker is not None and self._worker[0] is job:
            self._worker[1].join(CANCEL_WAIT_S)
            if self._worker[1].is_alive():
                log.warning("job %s: download thread still stopping; it deletes its files when it does", job.job_id)
        for path in (self.download_dir / f"{job.job_id}.part", self.download_dir / job.job_id):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("job %s: cannot delete %s: %s", job.job_id, path.name, exc)
        # Whatever state it was in (a finished job too: the broker is done with its file).
        job.cancelled("download cancelled; its files are deleted")
        return job.status(request.seq)

    # -- lifecycle ---------------------------------------------------------
    def shutdown(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Stop the running download between chunks; its .part stays for resuming."""
        self._shutdown.set()
        if self._worker is not None:
            self._worker[1].join(timeout)
            if self._worker[1].is_alive():
                log.warning("job %s: download thread did not stop within %.0fs", self._worker[0].job_id, timeout)

    def _remember(self, job: Job) -> None:
        self.jobs.pop(job.job_id, None)
        self.jobs[job.job_id] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            oldest_id = next(iter(self.jobs))
            if self.jobs[oldest_id].running:
                break  # never forget the running job
            del self.jobs[oldest_id]

