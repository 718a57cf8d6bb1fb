"""The installer's own directories: created or checked, fixed or refused."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class SetupError(Exception):
    """A directory the installer needs is unsafe; the message says how to fix it."""


def check_ancestors(path: Path) -> None:
    """Every directory above ``path`` must be owned by root or us and not
    writable by others (unless sticky, like /tmp): otherwise someone else
    could swap ``path`` for a directory of their own."""
    me = os.geteuid()
    for parent in path.parents:
        st = os.stat(parent)
        if st.st_uid not in (0, me):
            raise SetupError(f"{parent} (above {path}) is owned by uid {st.st_uid}; it must be owned by root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise SetupError(f"{parent} (above {path}) is writable by group or others; chmod go-w {parent}")


def ensure_dir(path: Path, mode: int, gid: int | None = None) -> int:
    """Create ``path`` or check it: a real directory (not a symlink) owned by
    us, with ``mode`` and group ``gid`` (fixed when wrong). Returns an open
    O_DIRECTORY fd, so that later work happens in exactly this directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create {path.parent}: {exc.strerror}") from None
    check_ancestors(path)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise SetupError(f"cannot create {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SetupError(f"{path} is not a directory (or is a symlink): {exc.strerror}; remove it") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise SetupError(f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}; remove it or chown it")
        if gid is not None and st.st_gid != gid:
            os.fchown(fd, -1, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            if not created:
                log.warning("%s had mode %o; setting %o", path, stat.S_IMODE(st.st_mode), mode)
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
