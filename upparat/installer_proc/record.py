"""The installer's record, in root-only state: what was opened, staged, run
and finished, so that after a crash or a power loss broker and installer
agree on what was already done (promise 8, docs/contracts.md).

``<staging_dir>/state.json`` holds at most one open job execution (its
verified ``Release``, phase, failure, the latest hook run and, while a hook
runs, its process group and a random marker), the highest signed ``serial``
ever installed, the boot id of the last write, and a short history of
discarded job executions. It is written atomically (temporary file, fsync,
rename, fsync of the directory) and read back with ``safejson`` and a field
by field check; a record that does not pass is logged and replaced by a
clean one (the installer never crashes on its own state file).

``recover`` turns what a previous life of the installer left into what is
true now (docs/security.md, "After a crash or a power loss"):

    installing  -> install_interrupted   the hook was cut off; install may run again
    restarting  -> restarted             after a reboot: the restart the hook asked for
    restarting  -> restart_interrupted   same boot: the installer died and took the hook
                                         with it; restart may run again (an orderly stop
                                         during the hook was recorded as restarted already)
    staging     -> opened                stage again; a file already moved is re-verified
    a read-only hook recorded as running -> forgotten, so that it can be asked again
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import Callable

from upparat import safejson
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import ProtocolError, decode_fields
from upparat.release import Release

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
TEMP_PREFIX = ".state-"  # job ids hold no dots: never a staged file's name
MAX_STATE_BYTES = 256 * 1024
MAX_HISTORY = 32  # discarded job executions remembered, oldest forgotten first
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass
class JobRecord:
    """The one open job execution."""

    job_id: str
    execution: int
    release: Release  # verified by the installer with its own keys and policy
    phase: str
    failure: str | None = None
    message: str = ""
    hook: ip.HookRun | None = None  # the latest hook run
    hook_pgid: int | None = None  # while a hook runs: its process group ...
    hook_token: str | None = None  # ... whose members carry UPPARAT_HOOK_RUN=<token>
    staged_sha256: str | None = None  # what the installer verified on its own read
    staged_size: int | None = None
    stage_begun: bool = False  # once-only steps begun for this execution
    install_begun: bool = False
    restart_begun: bool = False
    discarding: bool = False  # discard asked; completed once its hook is gone

    @property
    def ids(self) -> tuple[str, int]:
        return self.job_id, self.execution


@dataclass(frozen=True)
class Closed:
    """A discarded job execution (late requests for it are refused)."""

    job_id: str
    execution: int


@dataclass
class State:
    boot_id: str
    highest_serial: int | None = None  # highest signed serial installed (anti-rollback)
    job: JobRecord | None = None
    history: list[Closed] = field(default_factory=list)

    def closed(self, job_id: str, execution: int) -> bool:
        return Closed(job_id, execution) in self.history

    def close(self, job_id: str, execution: int) -> None:
        entry = Closed(job_id, execution)
        if entry in self.history:
            self.history.remove(entry)
        self.history.append(entry)
        del self.history[:-MAX_HISTORY]


def boot_id() -> str:
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as fh:
            return fh.read(64).strip()
    except OSError:
        return ""


# ----- encoding and the field-by-field check of what is read back -----------
def encode(state: State) -> bytes:
    return safejson.dumps({"v": STATE_VERSION, **dataclasses.asdict(state)})


class CorruptState(ValueError):
    pass


def _job(body: object) -> JobRecord:
    if not isinstance(body, dict):
        raise CorruptState("job is not an object")
    try:
        values = decode_fields(JobRecord, dict(body), "job")
    except ProtocolError as exc:
        raise CorruptState(str(exc)) from None
    job = JobRecord(**values)
    try:
        ip.check_ids(job.job_id, job.execution)
        if job.hook is not None:
            job.hook.check()
    except ProtocolError as exc:
        raise CorruptState(str(exc)) from None
    problem = job.release.problem()
    if problem:
        raise CorruptState(f"release: {problem}")
    if job.phase not in ip.PHASES or job.phase in (ip.NONE, ip.DISCARDED):
        raise CorruptState(f"phase {job.phase!r}")
    if job.failure is not None and job.failure not in ip.FAILURES:
        raise CorruptState(f"failure {job.failure!r}")
    if (job.hook_pgid is not None and job.hook_pgid <= 1) or (
            job.hook_token is not None and not (job.hook_token.isalnum() and len(job.hook_token) <= 64)):
        raise CorruptState("hook process group or marker")
    return job


def decode(data: bytes) -> State:
    """Raises CorruptState (or safejson.BadJson) naming the problem."""
    body = safejson.loads(data, max_bytes=MAX_STATE_BYTES, max_depth=6, max_string=8192, max_items=2000)
    if not isinstance(body, dict) or body.get("v") != STATE_VERSION:
        raise CorruptState(f"not a version {STATE_VERSION} record")
    if set(body) != {"v", "boot_id", "highest_serial", "job", "history"}:
        raise CorruptState("unexpected or missing keys")
    serial = body["highest_serial"]
    if serial is not None and not (type(serial) is int and 0 <= serial < 2**63):
        raise CorruptState("highest_serial")
    if not isinstance(body["boot_id"], str) or not isinstance(body["history"], list):
        raise CorruptState("boot_id or history")
    history = []
    for item in body["history"][-MAX_HISTORY:]:
        if not isinstance(item, dict):
            raise CorruptState("history entry")
        try:
            entry = Closed(**decode_fields(Closed, dict(item), "history"))
            ip.check_ids(entry.job_id, entry.execution)
        except ProtocolError as exc:
            raise CorruptState(str(exc)) from None
        history.append(entry)
    job = None if body["job"] is None else _job(body["job"])
    return State(boot_id=body["boot_id"], highest_serial=serial, job=job, history=history)


def salvage_serial(data: bytes) -> int | None:
    """From a record that did not pass: the anti-rollback serial, if it is readable."""
    try:
        body = safejson.loads(data, max_bytes=MAX_STATE_BYTES, max_depth=6, max_string=8192, max_items=2000)
    except safejson.BadJson:
        return None
    serial = body.get("highest_serial") if isinstance(body, dict) else None
    return serial if type(serial) is int and 0 <= serial < 2**63 else None


# ----- the file ----------------------------------------------------------------
class StateFile:
    """``state.json`` in the staging directory (an open O_DIRECTORY fd)."""

    def __init__(self, dirfd: int, where: str):
        self._dirfd = dirfd
        self._where = where

    def load(self) -> State:
        """The recorded state; a missing or corrupt record gives a clean one."""
        clean = State(boot_id="")
        try:
            fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dirfd)
        except FileNotFoundError:
            return clean
        except OSError as exc:
            log.error("cannot open %s/%s (%s); starting with a clean record", self._where, STATE_FILE,
                      exc.strerror)
            return clean
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                log.error("%s/%s is not a regular file of this user; starting with a clean record",
                          self._where, STATE_FILE)
                return clean
            data = os.read(fd, MAX_STATE_BYTES + 1)
        except OSError as exc:
            log.error("cannot read %s/%s (%s); starting with a clean record", self._where, STATE_FILE,
                      exc.strerror)
            return clean
        finally:
            os.close(fd)
        try:
            return decode(data)
        except (CorruptState, safejson.BadJson) as exc:
            clean.highest_serial = salvage_serial(data)
            log.error("%s/%s is corrupt (%s); starting with a clean record (highest installed serial: %s)",
                      self._where, STATE_FILE, exc, clean.highest_serial)
            return clean

    def save(self, state: State) -> None:
        """Atomically replace the record; raises OSError (e.g. disk full)."""
        data = encode(state)
        temp = TEMP_PREFIX + secrets.token_hex(8)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._dirfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(temp, STATE_FILE, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
            os.fsync(self._dirfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(temp, dir_fd=self._dirfd)
            except OSError:
                pass
            raise


# ----- what a previous life left behind ------------------------------------------
def recover(state: State, now_boot_id: str, kill_leftovers: Callable[[JobRecord], None]) -> list[str]:
    """Bring a loaded record up to date (see the module docstring); returns
    what was changed, for the log. ``kill_leftovers`` stops hook processes of
    the same boot that still carry the record's marker."""
    notes = []
    job = state.job
    rebooted = bool(state.boot_id) and state.boot_id != now_boot_id
    state.boot_id = now_boot_id
    if job is None:
        return notes
    who = "the device restarted" if rebooted else "the installer stopped"
    if job.hook_token is not None and not rebooted:
        kill_leftovers(job)
    job.hook_pgid = None
    job.hook_token = None
    running = job.hook is not None and job.hook.state == ip.RUNNING
    if job.phase == ip.INSTALLING:
        job.phase = ip.INSTALL_INTERRUPTED
        job.install_begun = False
        job.message = f"{who} while the install hook ran; the install hook may run again"
        notes.append("installing -> install_interrupted")
    elif job.phase == ip.RESTARTING and rebooted:
        job.phase = ip.RESTARTED
        job.message = "the device restarted while the restart hook ran: the restart it asked for"
        notes.append("restarting -> restarted")
    elif job.phase == ip.RESTARTING:
        # Same boot, and no orderly stop recorded it (see Installer.stop): the
        # installer died and took the hook with it; the hook may run again.
        job.phase = ip.RESTART_INTERRUPTED
        job.restart_begun = False
        job.message = "the installer stopped while the restart hook ran; the restart hook may run again"
        notes.append("restarting -> restart_interrupted")
    elif job.phase == ip.STAGING:
        job.phase = ip.OPENED
        job.stage_begun = False
        job.message = f"{who} while staging; stage again"
        notes.append("staging -> opened")
    elif running:
        job.message = f"{who} while the {job.hook.hook} hook ran; it may be asked again"
        notes.append(f"{job.hook.hook} hook run forgotten")
    if running:
        job.hook = None
    return notes
