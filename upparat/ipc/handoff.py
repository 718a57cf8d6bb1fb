"""The fetcher -> installer file handoff: a boundary through the file system.

The fetcher writes a job's download to ``part_name`` in the download
directory (``<download_location>/upparat``, owned by the fetcher's user, mode
0700) and, once it has checked size and sha256 while streaming, closes
every descriptor it holds on it and renames it to ``final_name``. Only then
does it report ``done``. It does not fsync the finished file: the installer
does, in a second thread while it hashes, before the file gets its staged
name; after a power cut the fetcher hashes a finished file again before it
reports it (a lost write-back means downloading again).

The installer never takes a path from a message. For ``stage`` it builds
``final_name(job_id, execution)`` itself and opens it relative to the
download directory without following links. It accepts only a regular file
with one link, owned by the fetcher's uid, no larger than the release says;
then it hashes its own read under a read lease that proves no writer
remains, and takes the file out of the fetcher's reach (chown to root, mode
0400, rename into its 0700 staging directory; or, across file systems, one
pass that copies and hashes) before anything is installed
(docs/security.md, "Staging").
"""

from __future__ import annotations

from upparat.release import is_job_id

PART_SUFFIX = ".part"


def final_name(job_id: str, execution: int) -> str:
    """The verified download, ready to be staged. Job ids hold no dots."""
    if not is_job_id(job_id) or not 0 <= execution < 2**63:
        raise ValueError("bad job id or execution")
    return f"{job_id}.{execution}"


def part_name(job_id: str, execution: int) -> str:
    """The download while it is written (and kept for resuming)."""
    return final_name(job_id, execution) + PART_SUFFIX


def staged_name(job_id: str, execution: int) -> str:
    """The installer's verified copy in its staging directory: the install hook's file."""
    return final_name(job_id, execution)
