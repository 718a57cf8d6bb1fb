"""The real installer process, started as the supervisor starts it, and the
unprivileged peers that attack it (as the real users, over the real socket)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

from upparat.ipc import handoff
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import Message, Ping, ProtocolError, Refused
from upparat.release import HOOK_NAMES
from upparat.supervisor import child_interpreter
from tests.support import identities, layout_under, pid_alive, poll_for, start_child_process

HOSTILE_PEER = Path(__file__).with_name("hostile_peer.py")
DEFAULT_HOOKS = {name: 'echo "{name} $*" >> {base}/calls' + ("\necho 1.0" if name == "version" else "")
                 for name in HOOK_NAMES}


class InstallerProcess:
    def __init__(self, base: Path, hooks: dict[str, str | None] | None = None, *, verification="allow_unsigned = true",
                 keys_pem=(), extra_hooks_config="retry_interval = 0\nmax_retries = 1\ntimeout = 60\n"):
        self.base = base
        self.ids = identities()
        self.layout = layout_under(base)
        self.keys_pem = tuple(keys_pem)
        hook_dir = base / "hooks"
        hook_dir.mkdir(exist_ok=True)
        self.hook_paths = {}
        for name, body in (DEFAULT_HOOKS if hooks is None else hooks).items():
            if body is None:
                continue
            path = hook_dir / name
            path.write_text("#!/bin/sh\n" + body.format(name=name, base=base) + "\n")
            path.chmod(0o755)
            self.hook_paths[name] = path
        lines = "".join(f"{name} = {path}\n" for name, path in self.hook_paths.items())
        self.config_text = f"[hooks]\n{lines}{extra_hooks_config}[verification]\n{verification}\n"
        self.proc = None
        self.runs = 0

    def start(self, wait=True):
        self.runs += 1
        self.proc = start_child_process("installer", self.config_text, self.layout, self.ids,
                                        self.base / f"installer-{self.runs}.log", public_keys_pem=self.keys_pem)
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self):
        proc = self.proc
        poll_for(lambda: "listening on" in proc.log() or (not proc.alive() and _died(proc)), 15,
                 what="the installer to listen")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self):
        if self.proc is not None:
            return self.proc.stop()

    def log(self) -> str:
        return "".join((self.base / f"installer-{n}.log").read_text(errors="replace")
                       for n in range(1, self.runs + 1) if (self.base / f"installer-{n}.log").exists())

    def download(self, data: bytes, job_id="job-1", execution=1) -> Path:
        path = self.layout.download_dir / handoff.final_name(job_id, execution)
        path.write_bytes(data)
        os.chown(path, self.ids.fetcher_uid, self.ids.fetcher_gid)
        path.chmod(0o600)
        return path

    def staged_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.layout.staging_dir) if n != "state.json")

    def calls(self) -> list[str]:
        path = self.base / "calls"
        return path.read_text().splitlines() if path.exists() else []


def _died(proc):
    raise AssertionError(f"the installer exited with {proc.popen.returncode}:\n{proc.log()}")


class Peer:
    """A process of an unprivileged user speaking raw ZeroMQ to a socket."""

    def __init__(self, user: str, socket_path: Path):
        ids = identities()
        uid, gid = (ids.broker_uid, ids.broker_gid) if user == "broker" else (ids.fetcher_uid, ids.fetcher_gid)
        # The source goes on the command line: the unprivileged user may not be
        # able to read this checkout (CI clones as root), only the interpreter.
        self.popen = subprocess.Popen([child_interpreter(), "-c", HOSTILE_PEER.read_text(), str(socket_path)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
                                      user=uid, group=gid, extra_groups=[])
        self.pid = self.popen.pid
        self.pushes: list[Message] = []
        self.seq = 100

    def command(self, **command) -> dict:
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise AssertionError(f"the peer died with {self.popen.wait(5)}")
        return json.loads(line)

    def send_frames(self, frames: list[bytes], timeout=10.0) -> None:
        encoded = [base64.b64encode(f).decode() for f in frames]
        poll_for(lambda: self.command(op="send", frames=encoded)["sent"], timeout, what="the peer to send")

    def receive(self, timeout_ms=5000) -> Message | None:
        answer = self.command(op="recv", timeout_ms=timeout_ms)
        if answer.get("timeout"):
            return None
        frames = [base64.b64decode(f) for f in answer["frames"]]
        assert len(frames) == 2 and frames[0] == b"", frames
        return ip.REPLIES.decode(frames[1])

    def raw(self, payload_frames: list[bytes], timeout_ms=5000) -> Message | None:
        """Send a request as the DEALER would (empty delimiter first); the reply."""
        self.send_frames([b""] + payload_frames)
        return self.receive(timeout_ms)

    def request(self, message: Message, timeout=10.0) -> Message:
        self.send_frames([b"", message.encode()])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.receive(200)
            if reply is None:
                continue
            if reply.seq == message.seq:
                return reply
            self.pushes.append(reply)
        raise AssertionError(f"no reply to {message}")

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def ping(self) -> ip.Pong:
        pong = self.request(Ping(seq=self.next_seq()))
        assert isinstance(pong, ip.Pong), pong
        return pong

    def wait_push(self, condition, timeout=30.0, what="a pushed job state") -> ip.JobState:
        deadline = time.monotonic() + timeout
        while True:
            for push in self.pushes:
                if condition(push):
                    self.pushes.remove(push)
                    return push
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}; got {self.pushes}")
            reply = self.receive(200)
            if reply is not None:
                self.pushes.append(reply)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.stdin.close()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen.stdout.close()


def refusal(reply, code=None, text="") -> Refused:
    assert isinstance(reply, Refused), reply
    assert code is None or reply.code == code, reply
    assert text in reply.reason, reply
    return reply


def decodes(data: bytes) -> bool:
    try:
        ip.REQUESTS.decode(data)
        return True
    except ProtocolError:
        return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def same_pid_and_serving(installer: InstallerProcess, peer: Peer, pid: int) -> None:
    assert installer.alive() and installer.pid == pid and pid_alive(pid)
    assert peer.ping().pid == pid
