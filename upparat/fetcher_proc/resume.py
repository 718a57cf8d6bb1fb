"""Resume records: what the fetcher needs to continue a download after its
own restart or a device restart, one small JSON file per download in
``<state_location>/fetcher`` (outside /tmp, so it survives a reboot).

A record describes the partial file ``handoff.part_name(job_id, execution)``
at a checkpoint: how many bytes of it are fsynced (``offset``), the sha256 of
exactly those bytes (``prefix_sha256``), where they came from (the URL
without its query: a presigned URL's query changes with every refresh and is
a credential, so it is never stored), the object's ETag (sent back as
If-Range, so a changed object restarts from zero) and which release they
belong to. It is written atomically (temporary file, fsync, rename, fsync of
the directory) at each checkpoint, always after the partial file itself was
fsynced up to ``offset``.

Loading trusts nothing: the file is read with a size limit, parsed with
upparat.safejson and checked field by field. Anything unusable (missing,
truncated, another version, another job, garbage) is None: the download
starts over, it never crashes.
"""

from __future__ import annotations

import errno
import logging
import os
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from upparat import safejson
from upparat.ipc import handoff
from upparat.release import Release, is_count, is_job_id, is_sha256

RECORD_VERSION = 1
MAX_RECORD = 16 * 1024
MAX_ETAG = 256
RECORD_SUFFIX = ".json"

log = logging.getLogger(__name__)


def url_identity(url: str) -> str:
    """scheme://host[:port]/path: the object, without the query (a presigned
    URL's credential, which changes when the broker refreshes it)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def strong_etag(value: str | None) -> str | None:
    """An ETag usable in If-Range (RFC 9110: strong, quoted), or None."""
    if value is None:
        return None
    value = value.strip()
    if (len(value) > MAX_ETAG or len(value) < 2 or not value.startswith('"') or not value.endswith('"')
            or not value.isascii() or not value.isprintable() or '"' in value[1:-1]):
        return None
    return value


@dataclass(frozen=True)
class Record:
    job_id: str
    execution: int
    url: str  # url_identity(), never the query
    etag: str | None
    version: str
    sha256: str | None  # the release's, not the prefix's
    size: int | None
    offset: int  # bytes of the partial file fsynced and hashed
    prefix_sha256: str  # sha256 of the first ``offset`` bytes
    total: int | None  # the object's size as the server announced it, if it did

    def matches(self, job_id: str, execution: int, url: str, release: Release) -> bool:
        """The partial file may be continued for this download."""
        return (self.job_id, self.execution, self.url) == (job_id, execution, url_identity(url)) and (
            self.version, self.sha256, self.size) == (release.version, release.sha256, release.size)


def record_name(job_id: str, execution: int) -> str:
    return handoff.final_name(job_id, execution) + RECORD_SUFFIX


def _check(body: object) -> Record | None:
    if not isinstance(body, dict) or body.get("v") != RECORD_VERSION:
        return None
    fields = {k: v for k, v in body.items() if k != "v"}
    try:
        record = Record(**fields)
    except TypeError:  # missing or unexpected fields
        return None
    ok = (is_job_id(record.job_id) and is_count(record.execution)
          and isinstance(record.url, str) and record.url.startswith(("http://", "https://"))
          and (record.etag is None or strong_etag(record.etag) == record.etag)
          and isinstance(record.version, str)
          and (record.sha256 is None or is_sha256(record.sha256))
          and (record.size is None or is_count(record.size))
          and is_count(record.offset) and is_sha256(record.prefix_sha256)
          and (record.total is None or is_count(record.total))
          and (record.size is None or record.offset <= record.size)
          and (record.total is None or record.offset <= record.total))
    return record if ok else None


def load(state_dir: Path, job_id: str, execution: int) -> Record | None:
    """The record of this download, or None (none, or unusable: logged)."""
    path = Path(state_dir) / record_name(job_id, execution)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the resume record %s (%s); starting over", path.name, exc.strerror)
        return None
    try:
        data = os.read(fd, MAX_RECORD + 1)
    except OSError as exc:
        log.warning("cannot read the resume record %s (%s); starting over", path.name, exc.strerror)
        return None
    finally:
        os.close(fd)
    try:
        body = safejson.loads(data, max_bytes=MAX_RECORD, max_depth=2, max_string=8192, max_items=64)
    except safejson.BadJson as exc:
        log.warning("the resume record %s is unusable (%s); starting over", path.name, exc)
        return None
    record = _check(body)
    if record is None or (record.job_id, record.execution) != (job_id, execution):
        log.warning("the resume record %s is unusable (wrong fields or another download); starting over",
                    path.name)
        return None
    return record


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state_dir: Path, record: Record) -> None:
    """Write atomically; raises OSError (the caller decides how much that matters)."""
    state_dir = Path(state_dir)
    name = record_name(record.job_id, record.execution)
    tmp = state_dir / (name + ".tmp")
    body = {"v": RECORD_VERSION} | asdict(record)
    data = safejson.dumps(body)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, state_dir / name)
    fsync_dir(state_dir)


def _unlink(path: Path) -> str | None:
    """Delete; None when gone, else why not."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot delete {path.name}: {exc.strerror}"
    return None


def remove_record(state_dir: Path, job_id: str, execution: int) -> str | None:
    name = record_name(job_id, execution)
    problems = [p for p in (_unlink(Path(state_dir) / name), _unlink(Path(state_dir) / (name + ".tmp"))) if p]
    return "; ".join(problems) or None


def discard(download_dir: Path, state_dir: Path, job_id: str, execution: int) -> str | None:
    """Delete everything of one download (partial, finished file, record).
    None when all is gone, else what could not be deleted (e.g. a read-only disk)."""
    problems = [p for p in (
        _unlink(Path(download_dir) / handoff.part_name(job_id, execution)),
        _unlink(Path(download_dir) / handoff.final_name(job_id, execution)),
        remove_record(state_dir, job_id, execution),
    ) if p]
    return "; ".join(problems) or None


def _key_of(name: str, suffix: str) -> tuple[str, int] | None:
    if not name.endswith(suffix):
        return None
    job_id, dot, execution = name[: len(name) - len(suffix)].rpartition(".")
    if not dot or not is_job_id(job_id) or not execution.isdigit() or len(execution) > 19:
        return None
    return job_id, int(execution)


def leftovers(download_dir: Path, state_dir: Path) -> set[tuple[str, int]]:
    """(job_id, execution) of every download that has files here."""
    keys = set()
    for directory, suffixes in ((download_dir, (handoff.PART_SUFFIX, "")), (state_dir, (RECORD_SUFFIX,))):
        try:
            names = os.listdir(directory)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot list %s: %s", directory, exc.strerror)
            continue
        for name in names:
            for suffix in suffixes:
                key = _key_of(name, suffix)
                if key is not None:
                    keys.add(key)
                    break
    return keys
