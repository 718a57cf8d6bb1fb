"""The fetcher's answers to the broker: one table of request -> handler.

``Fetcher.handle(message, peer)`` is given to ``wire.Server``; each
``answer_*`` matches the request of the same name in
upparat.ipc.fetcher_protocol (``fetch`` -> ``answer_fetch``). Refusals raise
``wire.Refusal``. Nothing here blocks: a download runs in its own thread,
and what the broker must hear later (a state change, progress, the answer
to a cancel that waits for its thread) is queued and taken by the socket
loop with ``outgoing()``.

Downloads are keyed by ``(job_id, execution)``. Once a download's thread has
ended, ``settle`` decides about its files, in one place, with no thread left
that could write them:

    done                      record deleted; the final file stays for the installer
    failed, restartable       (download_failed, url_expired) partial file and record kept: a Fetch resumes
    failed, final             everything deleted (verification_failed, file_too_large,
                              insufficient_disk_space, invalid_job_document)
    cancelled                 everything deleted
    stopped by shutdown       partial file and record kept
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from upparat import verify
from upparat.ipc import fetcher_protocol as fp, wire
from upparat.ipc.wire import Message, Ping
from upparat.release import Release

from . import resume
from .download import CANCEL, RESTARTABLE, SHUTDOWN, Download, Limits, clean_message, describe_url

log = logging.getLogger(__name__)

MAX_KEPT = 16  # settled downloads remembered for QueryFetch and repeated Fetch
Key = tuple[str, int]


@dataclass
class Entry:
    """What the fetcher knows about one download; touched by the socket loop only."""

    job_id: str
    execution: int
    url: str
    release: Release
    state: str = fp.RUNNING
    failure: str | None = None
    message: str = "download starting"
    bytes_done: int = 0
    bytes_total: int | None = None
    download: Download | None = None
    thread: threading.Thread | None = None
    cancelled: bool = False
    waiting: list[tuple[bytes, int]] = field(default_factory=list)  # (peer, seq) answered when the thread ends
    pushed: tuple | None = None  # what the broker last heard (state, failure, bytes_done)
    pushed_at: float = 0.0

    @property
    def key(self) -> Key:
        return self.job_id, self.execution

    @property
    def active(self) -> bool:
        """Its thread has not been settled yet (running, or stopping)."""
        return self.thread is not None

    def status(self, seq: int) -> fp.FetchStatus:
        bytes_done, bytes_total, rate, message = self.bytes_done, self.bytes_total, 0, self.message
        if self.download is not None and self.active:
            progress = self.download.progress()
            bytes_done, bytes_total, rate, message = (progress.bytes_done, progress.bytes_total, progress.rate,
                                                      progress.message)
        return fp.FetchStatus(seq=seq, job_id=self.job_id, execution=self.execution, state=self.state,
                              bytes_done=bytes_done, bytes_total=bytes_total, rate=rate, failure=self.failure,
                              message=clean_message(message))

    def settle(self, state: str, failure: str | None, message: str) -> None:
        self.state, self.failure, self.message = state, failure, clean_message(message)


class Fetcher:
    def __init__(self, download_dir: Path, state_dir: Path, policy: verify.Policy, limits: Limits,
                 notify: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
                 session_factory: Callable | None = None, staging_dir: Path | None = None):
        self.download_dir = Path(download_dir)
        self.state_dir = Path(state_dir)
        self.staging_dir = staging_dir  # only its free space is looked at
        self.policy = policy
        self.limits = limits
        self._notify = notify
        self._clock = clock
        self._session_factory = session_factory
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self._replies: list[tuple[bytes, Message]] = []  # answers that waited for a thread
        self._table = {
            Ping: self.answer_ping,
            fp.Fetch: self.answer_fetch,
            fp.QueryFetch: self.answer_query_fetch,
            fp.CancelFetch: self.answer_cancel_fetch,
        }

    def handle(self, message: Message, peer: bytes) -> Message | None:
        handler = self._table.get(type(message))
        if handler is None:
            raise wire.Refusal(wire.NOT_PERMITTED, f"{message.TYPE} is not a fetcher request")
        reply = handler(message, peer)
        if isinstance(reply, fp.FetchStatus) and (entry := self.entries.get((reply.job_id, reply.execution))):
            self._heard(entry, reply)
        return reply

    @property
    def running(self) -> Entry | None:
        """The download whose thread is not settled yet (one at a time)."""
        for entry in self.entries.values():
            if entry.active:
                return entry
        return None

    # -- answers ----------------------------------------------------------------------
    def answer_ping(self, request: Ping, peer: bytes) -> fp.FetcherPong:
        running = self.running
        return fp.FetcherPong(seq=request.seq, pid=os.getpid(), job_id=running.job_id if running else None,
                              execution=running.execution if running else None)

    def answer_fetch(self, request: fp.Fetch, peer: bytes) -> fp.FetchStatus:
        key = (request.job_id, request.execution)
        known = self.entries.get(key)
        if known is not None and not (known.state == fp.CANCELLED and not known.active):
            if not known.release.same_content(request.release):
                raise wire.Refusal(wire.NOT_PERMITTED, f"job {request.job_id} execution {request.execution} is "
                                                       "already being fetched for another release")
            if known.active:
                if known.cancelled:
                    raise wire.Refusal(wire.BUSY, f"still stopping the cancelled download of job {request.job_id}; "
                                                  "its end is pushed")
                if request.url != known.url:
                    known.url = request.url
                    known.download.use_url(request.url)  # a refreshed presigned URL, for the next attempt
                return known.status(request.seq)
            restart = known.state == fp.FAILED and (known.failure in RESTARTABLE or request.url != known.url)
            if not restart:
                return known.status(request.seq)
        running = self.running
        if running is not None:
            raise wire.Refusal(wire.BUSY, f"busy with job {running.job_id} execution {running.execution}; "
                                          "its end is pushed")
        entry = Entry(request.job_id, request.execution, request.url, request.release,
                      bytes_total=request.release.size)
        self._remember(entry)
        failure = verify.document_failure(request.release, self.policy)
        if failure is not None:
            entry.settle(fp.FAILED, failure.state, failure.message)
            return entry.status(request.seq)
        size = request.release.size
        if size is not None and size > self.limits.max_file_size:
            self._discard(entry)
            entry.settle(fp.FAILED, "file_too_large", f"the job document says {size} bytes, more than [service] "
                                                      f"max_file_size ({self.limits.max_file_size} bytes)")
            return entry.status(request.seq)
        self._discard_others(key)
        download = Download(request.job_id, request.execution, request.url, request.release, self.download_dir,
                            self.state_dir, self.limits, notify=self._notify, clock=self._clock,
                            session=self._session_factory() if self._session_factory else None,
                            staging_dir=self.staging_dir)
        entry.download = download
        entry.thread = threading.Thread(target=download.run, name=f"download-{request.job_id}", daemon=True)
        log.info("job %s execution %d: fetching %s", request.job_id, request.execution, describe_url(request.url))
        entry.thread.start()
        return entry.status(request.seq)

    def answer_query_fetch(self, request: fp.QueryFetch, peer: bytes) -> fp.FetchStatus:
        entry = self.entries.get((request.job_id, request.execution))
        if entry is None:
            return fp.FetchStatus(seq=request.seq, job_id=request.job_id, execution=request.execution,
                                  state=fp.UNKNOWN, bytes_done=0, bytes_total=None, rate=0, failure=None,
                                  message="no download known for this job execution (fetch it: it resumes)")
        return entry.status(request.seq)

    def answer_cancel_fetch(self, request: fp.CancelFetch, peer: bytes) -> fp.FetchStatus | None:
        key = (request.job_id, request.execution)
        entry = self.entries.get(key)
        if entry is not None and entry.active:
            entry.cancelled = True
            entry.waiting.append((peer, request.seq))
            entry.download.stop(CANCEL)
            return None  # answered by settle(), once the thread has let go of the files
        if entry is None:  # e.g. files left from before a restart of this process
            entry = Entry(request.job_id, request.execution, "", Release(version="-"))
            self._remember(entry)
        problem = self._discard(entry)
        entry.settle(fp.CANCELLED, None, "download cancelled; its files are deleted" if problem is None
                     else f"download cancelled, but {problem}")
        return entry.status(request.seq)

    # -- the socket loop's side -----------------------------------------------------------
    def settle(self) -> None:
        """Take over every download whose thread has ended: its files, its
        state, and the answers that waited for it."""
        for entry in list(self.entries.values()):
            if not entry.active or entry.download.outcome is None:
                continue
            entry.thread.join()  # it has returned from run(), or is about to
            outcome = entry.download.outcome
            progress = entry.download.progress()
            entry.bytes_done, entry.bytes_total = progress.bytes_done, progress.bytes_total
            entry.thread = None
            if entry.cancelled:
                problem = self._discard(entry)
                entry.settle(fp.CANCELLED, None, "download cancelled; its files are deleted" if problem is None
                             else f"download cancelled, but {problem}")
            elif outcome.state == fp.FAILED and outcome.failure not in RESTARTABLE:
                problem = self._discard(entry)
                entry.settle(fp.FAILED, outcome.failure,
                             outcome.message if problem is None else f"{outcome.message} ({problem})")
            else:
                entry.settle(outcome.state, outcome.failure, outcome.message)
            for peer, seq in entry.waiting:
                self._replies.append((peer, entry.status(seq)))
                self._heard(entry, self._replies[-1][1])
            entry.waiting.clear()
            log.info("job %s execution %d: %s%s: %s", entry.job_id, entry.execution, entry.state,
                     f" ({entry.failure})" if entry.failure else "", entry.message)

    def outgoing(self, now: float) -> list[tuple[bytes | None, Message]]:
        """What to send now: waiting answers (to their peer), and pushes (seq 0,
        peer None: whoever spoke last) of every state change, and of progress
        at most once per PROGRESS_PUSH_S."""
        self.settle()
        out: list[tuple[bytes | None, Message]] = list(self._replies)
        self._replies.clear()
        for entry in self.entries.values():
            status = entry.status(0)
            seen = (status.state, status.failure, status.bytes_done)
            if seen == entry.pushed:
                continue
            state_changed = entry.pushed is None or seen[:2] != entry.pushed[:2]
            if state_changed or now - entry.pushed_at >= fp.PROGRESS_PUSH_S:
                out.append((None, status))
                entry.pushed, entry.pushed_at = seen, now
        return out

    def _heard(self, entry: Entry, status: fp.FetchStatus) -> None:
        """The broker has this status: push only what changes after it."""
        entry.pushed, entry.pushed_at = (status.state, status.failure, status.bytes_done), self._clock()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop downloads; each keeps its partial file and record for resuming."""
        running = self.running
        if running is None:
            return
        running.download.stop(SHUTDOWN)
        running.thread.join(timeout)
        if running.thread.is_alive():
            log.warning("job %s: the download thread did not stop within %.0f s", running.job_id, timeout)

    # -- files and memory --------------------------------------------------------------------
    def _discard(self, entry: Entry) -> str | None:
        problem = resume.discard(self.download_dir, self.state_dir, entry.job_id, entry.execution)
        if problem:
            log.warning("job %s execution %d: %s", entry.job_id, entry.execution, problem)
        return problem

    def _discard_others(self, key: Key) -> None:
        """One download at a time: what is left of others (partial files, records,
        finished files not known as done here) would only take space."""
        for other in resume.leftovers(self.download_dir, self.state_dir):
            known = self.entries.get(other)
            if other == key or (known is not None and known.state == fp.DONE):
                continue
            log.info("deleting what is left of the download of job %s execution %d", *other)
            resume.discard(self.download_dir, self.state_dir, *other)

    def _remember(self, entry: Entry) -> None:
        self.entries.pop(entry.key, None)
        self.entries[entry.key] = entry
        for key in list(self.entries):
            if len(self.entries) <= MAX_KEPT:
                break
            if not self.entries[key].active:
                del self.entries[key]
