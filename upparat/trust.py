"""Is a path under root's sole control? Used for the files that decide what
root runs: the hook executables and the configuration file.

A path is trusted when nobody but root can change what it leads to: every
directory on the way (from ``/``, following symlinks component by component
without ever letting the kernel follow one for us) is owned by root and not
writable by group or others (a sticky directory such as ``/tmp`` is accepted,
because there nobody but root can replace root's entries), every symlink on
the way is root's and lies in such a directory, and the final file is a
regular file owned by root and not writable by group or others.

The supervisor checks the hooks at start-up (a bad one is a configuration
error); the installer checks them again right before every run (OpenSSH's
"check here, too"), so a link re-pointed later is caught.
"""

from __future__ import annotations

import os
import stat

MAX_LINKS = 40


def _dir_problem(path: str, st: os.stat_result) -> str | None:
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}"
    sticky = st.st_mode & stat.S_ISVTX
    if st.st_mode & stat.S_IWOTH and not sticky:
        return f"{path} is writable by everyone"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
        return f"{path} is writable by group {st.st_gid}"
    return None


def _file_problem(path: str, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}"
    if st.st_mode & stat.S_IWOTH:
        return f"{path} is writable by everyone"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"{path} is writable by group {st.st_gid}"
    return None


def root_controlled(path: str | os.PathLike) -> str | None:
    """Why someone other than root could change what ``path`` leads to, or None."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        return f"{path} is not an absolute path"
    pending = [p for p in path.split("/") if p]
    pending.reverse()  # a stack: the next component is at the end
    current = "/"
    links = 0
    try:
        problem = _dir_problem("/", os.lstat("/"))
        if problem:
            return problem
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                current = os.path.dirname(current) or "/"
                continue
            candidate = os.path.join(current, name)
            st = os.lstat(candidate)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    return f"{path} has too many symbolic links"
                if st.st_uid != 0:
                    return f"{candidate} is a symbolic link owned by uid {st.st_uid}"
                target = os.readlink(candidate)
                parts = [p for p in target.split("/") if p]
                pending.extend(reversed(parts))
                if target.startswith("/"):
                    current = "/"
                continue
            if pending:
                if not stat.S_ISDIR(st.st_mode):
                    return f"{candidate} is not a directory"
                problem = _dir_problem(candidate, st)
            else:
                problem = _file_problem(candidate, st)
            if problem:
                return problem
            current = candidate
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def executable_problem(path: str | os.PathLike, as_root: bool) -> str | None:
    """Why ``path`` must not be run as a hook, or None.

    As root, also everything ``root_controlled`` demands; otherwise (a
    development run as one user) only that it is an executable file.
    """
    path = os.fspath(path)
    if not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path} cannot be found ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        return f"{path} is not an executable file"
    if as_root:
        problem = root_controlled(path)
        if problem:
            return f"root runs this hook, but {problem}"
    return None
