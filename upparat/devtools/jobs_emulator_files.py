"""The jobs emulator's stand-in for S3: a directory of ``<bucket>/<key>`` files.

``upparat-jobs-emulator --files DIR`` serves DIR with ``FileServer`` and
presigns every ``${aws:iot:s3-presigned-url:https://<host>/<bucket>/<key>}``
to it, so a device downloads DIR/<bucket>/<key> through a URL that expires and
refuses tampering like S3's. ``FileStore`` is what the control API writes with
(``PUT /files/<bucket>/<key>``) and lists (``GET /files/<bucket>?prefix=P``), so
``upparat-jobs --emulator URL create`` uploads the same way it does to S3.

Names are checked segment by segment (no ``.``/``..``, no other characters than
S3-safe ones) and the directory tree is never left; an upload is written to a
temporary file, hashed while it is written and renamed into place only when
complete (and equal to the announced sha256, when one was announced).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
MAX_DEPTH = 16
CHUNK = 1024 * 1024
PARTIAL = ".partial-"  # temporary upload files: <name>.partial-<random>, never listed


class BadName(ValueError):
    pass


class FileStore:
    def __init__(self, directory: Path, max_size: int = 4 * 1024**3):
        self.directory = Path(directory).resolve()
        self.max_size = max_size

    def _path(self, bucket: str, key: str = "") -> Path:
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise BadName(f"bucket {bucket!r} is not an S3 bucket name")
        parts = key.split("/") if key else []
        if len(parts) > MAX_DEPTH or any(not SEGMENT_RE.fullmatch(p) or p in (".", "..") or PARTIAL in p
                                         for p in parts):
            raise BadName(f"key {key!r}: each /-separated part must be 1-255 characters of A-Z a-z 0-9 . _ -")
        return self.directory.joinpath(bucket, *parts)

    def list(self, bucket: str, prefix: str = "") -> list[dict]:
        """Objects whose key starts with ``prefix``: key, size, sha256 (hashed now)."""
        root = self._path(bucket)
        if not root.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                key = path.relative_to(root).as_posix()
                if PARTIAL in name or not key.startswith(prefix) or path.is_symlink() or not path.is_file():
                    continue
                found.append({"key": key, "size": path.stat().st_size, "sha256": _sha256(path)})
        return found

    def put(self, bucket: str, key: str, stream, length: int, sha256: str | None = None) -> dict:
        """Write ``length`` bytes from ``stream`` to <bucket>/<key>; ValueError when they are not
        all there or do not hash to ``sha256``; nothing is left behind then."""
        if not key:
            raise BadName("an object needs a key: PUT /files/<bucket>/<key>")
        target = self._path(bucket, key)
        if length < 0 or length > self.max_size:
            raise ValueError(f"size must be 0-{self.max_size} bytes (--max-file-size)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.parent.resolve().is_relative_to(self.directory):
            raise BadName(f"key {key!r} leads outside the files directory")
        temporary = target.with_name(f"{target.name}{PARTIAL}{secrets.token_hex(4)}")
        digest = hashlib.sha256()
        received = 0
        try:
            with open(temporary, "xb") as fh:
                while received < length:
                    data = stream.read(min(CHUNK, length - received))
                    if not data:
                        break
                    fh.write(data)
                    digest.update(data)
                    received += len(data)
            if received != length:
                raise ValueError(f"the body ended after {received} of {length} bytes")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ValueError(f"the body's sha256 is {digest.hexdigest()}, not {sha256}")
            os.replace(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()
        return {"key": key, "size": received, "sha256": digest.hexdigest()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
