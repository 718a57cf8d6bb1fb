"""An in-process installer for unit and fuzz tests: the real Installer and
allow-list on real directories, real hooks (small shell scripts), no socket.

Directories live under a ``world_tmp`` base so that, as root, the fetcher's
user can own the download directory as it would on a device.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from upparat import config, verify
from upparat.installer_proc import allow, staging
from upparat.installer_proc.dirs import ensure_dir
from upparat.installer_proc.installer import Installer, Settings
from upparat.ipc import handoff
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import Message, Refusal, Refused
from upparat.release import HOOK_NAMES, Release
from tests.support import identities, layout_under, poll_for

PAYLOAD = b"firmware image\n" * 4096
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def default_hooks(base: Path) -> dict[str, str]:
    """Each hook appends its argv to <base>/calls (one line per run)."""
    calls = base / "calls"
    return {name: f'echo "{name} $*" >> {calls}' + ("\necho 1.0" if name == "version" else "")
            for name in HOOK_NAMES}


class Rig:
    def __init__(self, base: Path, hooks: dict[str, str | None] | None = None, *, keys=(), allow_unsigned=True,
                 require_sha256=True, timeout=30, max_retries=2, retry_interval=0, max_file_size=2**40,
                 layout=None):
        self.base = base
        self.ids = identities()
        self.layout = layout or layout_under(base)
        hook_dir = base / "hooks"
        hook_dir.mkdir(exist_ok=True)
        bodies = default_hooks(base) if hooks is None else hooks
        self.hook_paths = {name: script(hook_dir / name, body) for name, body in bodies.items() if body is not None}
        lines = "\n".join(f"{name} = {path}" for name, path in self.hook_paths.items())
        self.hooks_cfg = config.parse(f"[hooks]\n{lines}\nretry_interval = {retry_interval}\nmax_retries = "
                                      f"{max_retries}\ntimeout = {timeout}\n", check_files=False).hooks
        self.layout.download_dir.mkdir(parents=True, exist_ok=True)
        if self.ids.separated:
            os.chown(self.layout.download_dir, self.ids.fetcher_uid, self.ids.fetcher_gid)
            self.layout.download_dir.chmod(0o700)
        self.keys = list(keys)
        self.policy = verify.Policy(allow_unsigned=allow_unsigned, require_sha256=require_sha256)
        self.max_file_size = max_file_size
        staging.ignore_lease_breaks()  # as the installer's main() does
        self.staging_dirfd = ensure_dir(self.layout.staging_dir, 0o700)
        self.installer: Installer | None = None
        self.pushed: list[Message] = []
        self.seq = 0
        self.start()

    def start(self) -> Installer:
        settings = Settings(hooks=self.hooks_cfg, staging_dir=self.layout.staging_dir,
                            download_dir=self.layout.download_dir,
                            fetcher_uid=self.ids.fetcher_uid if self.ids.separated else None, keys=self.keys,
                            policy=self.policy, max_file_size=self.max_file_size, as_root=os.geteuid() == 0)
        self.installer = Installer(settings, self.staging_dirfd, lambda: None)
        self.installer.push = self.pushed.append
        self.installer.recover()
        return self.installer

    def close(self) -> None:
        if self.installer is not None:
            self.installer.stop()
        os.close(self.staging_dirfd)

    # ----- requests, as the socket would deliver them ----------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def ask(self, message: Message) -> Message:
        """The reply to one request: the answer, or Refused."""
        try:
            return allow.dispatch(self.installer, message)
        except Refusal as exc:
            return Refused(seq=message.seq, code=exc.code, reason=str(exc))

    def open(self, release: Release, job_id="job-1", execution=1) -> Message:
        return self.ask(ip.OpenJob(seq=self.next_seq(), job_id=job_id, execution=execution, release=release))

    def stage(self, job_id="job-1", execution=1) -> Message:
        return self.ask(ip.Stage(seq=self.next_seq(), job_id=job_id, execution=execution))

    def hook(self, name: str, round_=0, job_id="job-1", execution=1) -> Message:
        return self.ask(ip.RunHook(seq=self.next_seq(), job_id=job_id, execution=execution, hook=name,
                                   round=round_))

    def discard(self, job_id="job-1", execution=1) -> Message:
        return self.ask(ip.Discard(seq=self.next_seq(), job_id=job_id, execution=execution))

    def query(self, job_id="job-1", execution=1) -> ip.JobState:
        return self.ask(ip.QueryJob(seq=self.next_seq(), job_id=job_id, execution=execution))

    def settle(self, timeout: float = 20.0) -> ip.JobState | None:
        """Run the main loop's part until no thread works; the last push, if any."""
        def idle():
            self.installer.apply_events()
            return not self.installer.busy()
        poll_for(idle, timeout, what="the installer's thread to finish")
        return self.pushed[-1] if self.pushed else None

    # ----- the fetcher's side ----------------------------------------------------
    def download(self, data: bytes = PAYLOAD, job_id="job-1", execution=1) -> Path:
        """A finished download as the fetcher leaves it."""
        path = self.layout.download_dir / handoff.final_name(job_id, execution)
        path.write_bytes(data)
        if self.ids.separated:
            os.chown(path, self.ids.fetcher_uid, self.ids.fetcher_gid)
        path.chmod(0o600)
        return path

    def staged_files(self) -> list[str]:
        return staging.staged_files(self.staging_dirfd)

    def calls(self) -> list[str]:
        path = self.base / "calls"
        return path.read_text().splitlines() if path.exists() else []


def release(data: bytes = PAYLOAD, **fields) -> Release:
    values = {"version": "2.0", "meta": "meta", "force": False, "sha256": hashlib.sha256(data).hexdigest(),
              "size": len(data)}
    values.update(fields)
    return Release(**values)


def wait_for(condition, timeout=10.0, what="condition"):
    return poll_for(condition, timeout, what=what)


def monotonic() -> float:
    return time.monotonic()
