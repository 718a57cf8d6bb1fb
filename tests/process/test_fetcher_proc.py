"""The real ``python -m upparat.fetcher_proc --from-supervisor``, started with
its settings envelope and dropped to ``upparat-fetch`` as the supervisor does,
spoken to as the broker (a DEALER) over its socket, downloading from a real
local FileServer with fault switches; small tmpfs mounts for the disk cases.
Every process is stopped by PID; every wait has a deadline."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from upparat.devtools.fileserver import Faults, FileServer
from upparat.fetcher_proc import resume
from upparat.ipc import fetcher_protocol as fp, handoff, wire
from upparat.release import Release
from tests.support import PYTHON, REPO, Proc, identities, layout_under, poll_for, start_child_process

AS_ROOT = os.geteuid() == 0
MiB = 1024 * 1024
DATA = os.urandom(4 * MiB + 12345)
SHA = hashlib.sha256(DATA).hexdigest()

def config_text(service: str = "", allow_unsigned: bool = True) -> str:
    """``service``: more [service] lines. A stall is detected within 10 s, not 30 (the
    stall test sets 2 s; shorter in every test would take a busy CI machine for a stall)."""
    if "low_speed_time" not in service:
        service = "low_speed_time = 10\n" + service
    return f"[service]\n{service}[verification]\nallow_unsigned = {str(allow_unsigned).lower()}\n"
PART = handoff.part_name("job-1", 1)
FINAL = handoff.final_name("job-1", 1)


class Broker:
    """The broker's end: a DEALER that keeps every push it receives."""

    def __init__(self, zctx: zmq.Context, endpoint: str):
        self.client = wire.Client(zctx, endpoint, fp.REPLIES, "test-broker")
        self.pushes: list[fp.FetchStatus] = []
        self._seq = 100

    def ask(self, message, timeout: float = 10.0):
        poll_for(lambda: self.client.send(message), timeout, what=f"the fetcher to take {message.TYPE}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.sock.poll(100):
                answer = None
                # The whole batch: a push that came right behind the answer (a download
                # that ended at once) must be kept, not dropped with the rest of it.
                for reply in self.client.receive_ready():
                    if reply.seq == message.seq and reply.seq != 0 and answer is None:
                        answer = reply
                    else:
                        self.pushes.append(reply)
                if answer is not None:
                    return answer
        raise AssertionError(f"no answer to {message.TYPE} within {timeout}s")

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def wait_push(self, condition, timeout: float = 20.0, what: str = "a push") -> fp.FetchStatus:
        def found():
            for reply in self.client.receive_ready():
                self.pushes.append(reply)
            return next((p for p in self.pushes if condition(p)), None)

        return poll_for(found, timeout, interval=0.02, what=what)

    def wait_end(self, job_id="job-1", execution=1, timeout: float = 30.0) -> fp.FetchStatus:
        return self.wait_push(lambda p: isinstance(p, fp.FetchStatus) and p.seq == 0 and p.state != fp.RUNNING
                              and (p.job_id, p.execution) == (job_id, execution), timeout, what="the end pushed")

    def close(self):
        self.client.close()


class Rig:
    def __init__(self, base: Path):
        self.base = base
        self.layout = layout_under(base)
        self.ids = identities()
        (base / "srv").mkdir()
        (base / "srv" / "fw.bin").write_bytes(DATA)
        self.fs = FileServer(base / "srv").start()
        self.zctx = zmq.Context()
        self.proc: Proc | None = None
        self.brokers: list[Broker] = []
        self.mounts: list[Path] = []
        self.starts = 0

    def start(self, service: str = "", public_keys_pem: tuple[str, ...] = ()) -> Proc:
        self.starts += 1
        self.proc = start_child_process("fetcher", config_text(service, allow_unsigned=not public_keys_pem),
                                        self.layout, self.ids, self.base / f"fetcher-{self.starts}.log",
                                        public_keys_pem=public_keys_pem)
        broker = self.broker()
        proc = self.proc
        poll_for(lambda: proc.alive() or pytest.fail(f"the fetcher exited {proc.popen.returncode}:\n{proc.log()}"),
                 0.5, what="the fetcher alive")
        poll_for(lambda: self.layout.fetcher_socket.exists() or not proc.alive() and pytest.fail(
            f"the fetcher exited {proc.popen.returncode}:\n{proc.log()}"), 20, what="the fetcher's socket")
        pong = broker.ask(wire.Ping(seq=1), timeout=20)
        assert pong.pid == self.proc.pid, self.proc.log()
        return self.proc

    def broker(self) -> Broker:
        broker = Broker(self.zctx, self.layout.fetcher_endpoint)
        self.brokers.append(broker)
        return broker

    def url(self, key="/fw.bin") -> str:
        return self.fs.presign(f"https://bucket.s3.amazonaws.com{key}")

    def fetch(self, broker: Broker, job_id="job-1", execution=1, sha256=SHA, size=len(DATA)) -> fp.FetchStatus:
        release = Release(version="1.0", sha256=sha256, size=size)
        return broker.ask(fp.Fetch(seq=broker.next_seq(), job_id=job_id, execution=execution, url=self.url(),
                                   release=release))

    def mount_tmpfs(self, path: Path, size: str) -> None:
        if not AS_ROOT:
            pytest.skip("mounting a tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounts.append(path)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    @property
    def downloads(self) -> list[str]:
        return sorted(os.listdir(self.layout.download_dir))

    @property
    def records(self) -> list[str]:
        return sorted(os.listdir(self.layout.fetcher_state_dir))

    def record(self) -> resume.Record | None:
        return resume.load(self.layout.fetcher_state_dir, "job-1", 1)

    def close(self) -> None:
        for broker in self.brokers:
            broker.close()
        if self.proc is not None:
            self.proc.stop()
        self.zctx.term()
        self.fs.stop()
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def rig(world_tmp):
    r = Rig(world_tmp)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def running(rig):
    rig.start()
    return rig


# -- the normal case and the socket --------------------------------------------------------------

def test_fetches_verifies_renames_and_pushes_done(running):
    r = running
    broker = r.brokers[0]
    first = r.fetch(broker)
    assert (first.state, first.bytes_total) == (fp.RUNNING, len(DATA))
    done = broker.wait_end()
    assert (done.state, done.failure, done.bytes_done) == (fp.DONE, None, len(DATA)), done.message
    final = r.layout.download_dir / FINAL
    assert final.read_bytes() == DATA
    st = final.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_nlink == 1
    assert r.downloads == [FINAL] and r.records == []
    if AS_ROOT:
        assert st.st_uid == r.ids.fetcher_uid
    query = broker.ask(fp.QueryFetch(seq=broker.next_seq(), job_id="job-1", execution=1))
    assert query.state == fp.DONE
    with open(f"/proc/{r.proc.pid}/maps") as fh:  # no keys configured: cryptography never loaded
        assert "cryptography" not in fh.read()


def test_with_keys_configured_the_fetcher_holds_none_and_never_loads_cryptography(rig):
    """Signatures are the installer's to check (when the job is opened, before
    the download); the fetcher checks the bytes against the release's sha256."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    rig.start(public_keys_pem=(pem,))
    broker = rig.brokers[0]
    rig.fetch(broker)
    assert broker.wait_end("job-1", 1).state == fp.DONE
    with open(f"/proc/{rig.proc.pid}/maps") as fh:
        assert "cryptography" not in fh.read()
    wrong = Release(version="1.0", sha256="0" * 64, size=len(DATA))
    broker.ask(fp.Fetch(seq=broker.next_seq(), job_id="job-2", execution=1, url=rig.url(), release=wrong))
    assert broker.wait_end("job-2", 1).failure == "verification_failed"


def test_the_socket_is_open_to_the_broker_group_only(running):
    r = running
    sock_path = r.layout.fetcher_socket
    st = sock_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    directory = sock_path.parent.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o2750
    if not AS_ROOT:
        return
    assert st.st_gid == r.ids.broker_gid and directory.st_uid == r.ids.fetcher_uid
    ping_as = ("import sys, zmq; from upparat.ipc import wire, fetcher_protocol as fp\n"
               "c = wire.Client(zmq.Context(), sys.argv[1], fp.REPLIES, 'x')\n"
               "import time; t = time.monotonic() + 5\n"
               "while not c.send(wire.Ping(seq=3)) and time.monotonic() < t: time.sleep(0.05)\n"
               "print('pid', c.sock.poll(5000) and c.receive_ready()[0].pid)\n")
    as_broker = subprocess.run([PYTHON, "-c", ping_as, r.layout.fetcher_endpoint], cwd=REPO, capture_output=True,
                               text=True, timeout=30, user=r.ids.broker_uid, group=r.ids.broker_gid,
                               extra_groups=[])
    assert as_broker.stdout.strip() == f"pid {r.proc.pid}", as_broker.stderr
    connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    nobody = pwd.getpwnam("nobody")
    as_other = subprocess.run([PYTHON, "-c", connect, str(sock_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=30, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    assert as_other.returncode != 0 and "PermissionError" in as_other.stderr


def _raw(r: Rig, frames: list[bytes], wait_ms: int = 5000):
    sock = wire.make_socket(r.zctx, zmq.DEALER)
    try:
        sock.connect(r.layout.fetcher_endpoint)
        sock.send_multipart(frames)
        if not sock.poll(wait_ms, zmq.POLLIN):
            return None
        empty, payload = sock.recv_multipart()
        assert empty == b""
        return fp.REPLIES.decode(payload)
    finally:
        sock.close(linger=0)


FETCH_V2 = (b'{"v": 2, "type": "fetch", "seq": 1, "job_id": "j", "execution": 1, "url": %s, "release": '
            b'{"version": "1", "meta": "", "force": false, "sha256": %s, "size": null, "serial": null, '
            b'"signature": null}}')


@pytest.mark.parametrize("payload, reason", [
    (b"\xff\xfe garbage", "not UTF-8"),
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"v": 1, "type": "ping", "seq": 1}', "unsupported protocol version"),
    (b'{"v": 2, "type": "run_hook", "seq": 1}', "unknown message type"),
    (b'{"v": 2, "type": "fetch_status", "seq": 1}', "unknown message type"),
    (b'{"v": 2, "type": "query_fetch", "seq": 1, "job_id": "../../etc", "execution": 1}', "job_id"),
    (b'{"v": 2, "type": "query_fetch", "seq": 1, "job_id": "j", "execution": -1}', "execution"),
    (b'{"v": 2, "type": "ping", "seq": 1, "extra": 1}', "unexpected field"),
    (b'{"v": 2, "type": "ping", "seq": "1"}', "wrong type"),
    (b'{"v": 2, "type": "ping", "seq": 1, "seq": 2}', "appears twice"),
    (b'{"v": 2, "type": "ping", "seq": 1' + b"0" * 30 + b"}", "digits"),
    (b'{"v": 2, "type": "ping", "seq": 1, "x": "\\ud800"}', "surrogate"),
    (b"[" * 5000 + b"]" * 5000, "nested"),
    (FETCH_V2 % (b'"file:///etc/shadow"', b"null"), "http"),
    (FETCH_V2 % (b'"http://h/f\\n"', b"null"), "control characters"),
    (FETCH_V2 % (b'"http://h/f"', b'"ABC"'), "sha256"),
])
def test_refuses_malformed_requests_and_keeps_running(running, payload, reason):
    reply = _raw(running, [b"", payload])
    assert isinstance(reply, wire.Refused) and reply.code == wire.MALFORMED
    assert reason in reply.reason
    assert running.brokers[0].ask(wire.Ping(seq=7)).pid == running.proc.pid


def test_refuses_more_than_one_frame_and_drops_what_has_no_delimiter(running):
    reply = _raw(running, [b"", b'{"v": 2, "type": "ping", "seq": 1}', b"second"])
    assert isinstance(reply, wire.Refused) and "exactly one frame" in reply.reason
    assert _raw(running, [b'{"v": 2, "type": "ping", "seq": 1}'], wait_ms=500) is None
    assert running.brokers[0].ask(wire.Ping(seq=8)).pid == running.proc.pid


def test_an_oversized_frame_disconnects_that_peer_only(running):
    assert _raw(running, [b"", b"x" * (wire.SOCKET_MAXMSGSIZE + 1)], wait_ms=500) is None
    assert running.brokers[0].ask(wire.Ping(seq=9)).pid == running.proc.pid


def test_a_fetch_for_another_job_while_one_runs_is_refused_busy_and_its_end_is_pushed(running):
    r = running
    r.fs.faults.rate = 2 * MiB
    broker = r.brokers[0]
    r.fetch(broker)
    refused = r.fetch(broker, job_id="job-2")
    assert isinstance(refused, wire.Refused) and refused.code == wire.BUSY and "job-1" in refused.reason
    assert broker.ask(wire.Ping(seq=broker.next_seq())).job_id == "job-1"
    cancelled = broker.ask(fp.CancelFetch(seq=broker.next_seq(), job_id="job-1", execution=1))
    assert cancelled.state == fp.CANCELLED
    assert r.downloads == [] and r.records == []
    assert broker.ask(wire.Ping(seq=broker.next_seq())).job_id is None


def test_the_log_never_shows_a_presigned_url_query(running):
    r = running
    broker = r.brokers[0]
    r.fetch(broker)
    broker.wait_end()
    log = r.proc.log()
    assert "fetching http://127.0.0.1" in log and "X-Amz-Signature" not in log


# -- time ----------------------------------------------------------------------------------------------

def test_a_stall_mid_body_is_aborted_and_resumed_within_the_configured_bound(rig):
    r = rig
    r.start("low_speed_time = 2\n")
    r.fs.plan = [Faults(stall_after=MiB, stall_s=60)]
    broker = r.brokers[0]
    started = time.monotonic()
    r.fetch(broker)
    done = broker.wait_end(timeout=30)
    took = time.monotonic() - started
    assert done.state == fp.DONE, done.message
    assert took < 2 + 1 + 3, f"took {took:.1f} s: the stall (60 s) was waited out instead of detected"
    first, second = r.fs.log
    assert (first.range, first.bytes_sent) == (None, MiB)
    assert second.range == f"bytes={MiB}-" and second.status == 206
    assert (r.layout.download_dir / FINAL).read_bytes() == DATA


def test_the_overall_deadline_fails_the_download_naming_download_timeout(rig):
    rig.start("download_timeout = 10\n")  # the smallest the configuration allows
    rig.fs.faults.rate = 200 * 1024  # 21 s for the file
    broker = rig.brokers[0]
    started = time.monotonic()
    rig.fetch(broker)
    end = broker.wait_end(timeout=30)
    assert 9 < time.monotonic() - started < 14
    assert (end.state, end.failure) == (fp.FAILED, "download_failed")
    assert "download_timeout = 10 s" in end.message
    assert rig.downloads == [PART]  # kept for resuming, until the broker cancels


# -- bounds and disk ---------------------------------------------------------------------------------------

def test_no_size_and_no_content_length_is_stopped_at_max_file_size(rig):
    rig.start("max_file_size = 1M\n")
    rig.fs.faults.chunked = True
    broker = rig.brokers[0]
    rig.fetch(broker, size=None)
    end = broker.wait_end()
    assert (end.state, end.failure) == (fp.FAILED, "file_too_large")
    assert "max_file_size" in end.message and end.bytes_done <= MiB
    assert rig.downloads == [] and rig.records == []


def test_not_enough_space_is_insufficient_disk_space_before_any_byte(rig):
    rig.mount_tmpfs(rig.layout.download_dir.parent, "1m")
    rig.start()
    broker = rig.brokers[0]
    rig.fetch(broker)
    end = broker.wait_end()
    assert (end.state, end.failure) == (fp.FAILED, "insufficient_disk_space")
    assert str(len(DATA)) in end.message and "free" in end.message
    assert rig.fs.requests == [] and rig.downloads == []


def test_a_disk_that_fills_up_mid_download_fails_and_leaves_no_partial_file(rig):
    rig.mount_tmpfs(rig.layout.download_dir.parent, "2m")
    rig.start()
    rig.fs.faults.chunked = True  # no size anywhere: nothing to check in advance
    broker = rig.brokers[0]
    rig.fetch(broker, size=None)
    end = broker.wait_end()
    assert (end.state, end.failure) == (fp.FAILED, "insufficient_disk_space")
    assert "filled up" in end.message
    assert rig.downloads == [] and rig.records == []
    assert rig.proc.alive() and broker.ask(wire.Ping(seq=broker.next_seq())).pid == rig.proc.pid


def test_a_read_only_download_directory_is_a_clear_failure_not_a_crash(rig):
    mount = rig.layout.download_dir.parent
    rig.mount_tmpfs(mount, "8m")
    rig.start()
    done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    broker = rig.brokers[0]
    rig.fetch(broker)
    end = broker.wait_end()
    assert (end.state, end.failure) == (fp.FAILED, "download_failed")
    assert "read-only file system" in end.message and str(rig.layout.download_dir) in end.message
    assert rig.fs.requests == []
    assert rig.proc.alive() and broker.ask(wire.Ping(seq=broker.next_seq())).pid == rig.proc.pid


# -- restarts ---------------------------------------------------------------------------------------------------

def _kill_at_half(r: Rig) -> resume.Record:
    r.fs.faults.rate = MiB  # about 4 s: time to see half of it and a checkpoint
    broker = r.brokers[-1]
    r.fetch(broker)
    broker.wait_push(lambda p: isinstance(p, fp.FetchStatus) and p.bytes_done >= len(DATA) // 2,
                     what="half of the file")
    poll_for(lambda: (rec := r.record()) and rec.offset >= len(DATA) // 4, 10, what="a checkpoint")
    r.kill()
    r.fs.faults.rate = None
    record = r.record()
    assert record is not None and 0 < record.offset < len(DATA)
    return record


def test_killed_at_half_then_restarted_it_resumes_from_the_partial_file(running):
    r = running
    record = _kill_at_half(r)
    requests_before = len(r.fs.log)
    r.start()
    broker = r.brokers[-1]
    r.fetch(broker)
    assert broker.wait_end().state == fp.DONE
    (resumed,) = r.fs.log[requests_before:]
    assert resumed.range == f"bytes={record.offset}-" and resumed.if_range == record.etag
    assert resumed.status == 206
    assert r.fs.bytes_sent < 2 * len(DATA)
    assert (r.layout.download_dir / FINAL).read_bytes() == DATA and r.records == []


def test_a_device_restart_resumes_from_the_checkpoint_only(running):
    r = running
    record = _kill_at_half(r)
    shutil.rmtree(r.layout.runtime_dir)  # /run is empty after a reboot
    with open(r.layout.download_dir / PART, "r+b") as fh:  # what was not fsynced may be anything
        fh.seek(record.offset)
        fh.write(b"\0" * 100_000)
    requests_before = len(r.fs.log)
    r.start()
    broker = r.brokers[-1]
    r.fetch(broker)
    assert broker.wait_end().state == fp.DONE
    (resumed,) = r.fs.log[requests_before:]
    assert resumed.range == f"bytes={record.offset}-" and resumed.status == 206
    assert (r.layout.download_dir / FINAL).read_bytes() == DATA


def test_a_device_restart_that_lost_the_finished_files_bytes_downloads_it_again(running):
    """The fetcher does not fsync the finished file (the installer does, while it
    hashes: upparat.ipc.handoff). A power cut right after ``done`` can leave it
    shorter or with zeros: verified again, it is downloaded again, not staged."""
    r = running
    broker = r.brokers[-1]
    r.fetch(broker)
    assert broker.wait_end().state == fp.DONE
    r.kill()
    shutil.rmtree(r.layout.runtime_dir)
    final = r.layout.download_dir / FINAL
    with open(final, "r+b") as fh:  # write-back lost: the tail never reached the disk
        fh.truncate(len(DATA) // 3)
    requests_before = len(r.fs.log)
    r.start()
    broker = r.brokers[-1]
    r.fetch(broker)
    done = broker.wait_end()
    assert done.state == fp.DONE and "earlier run" not in done.message, done.message
    (again,) = r.fs.log[requests_before:]
    assert (again.range, again.status, again.bytes_sent) == (None, 200, len(DATA))
    assert final.read_bytes() == DATA and r.records == []
    assert "does not match" in r.proc.log() and "downloading again" in r.proc.log()


def test_an_object_changed_between_attempts_is_downloaded_again_from_zero(running):
    r = running
    record = _kill_at_half(r)
    r.fs.faults.new_etag = True  # the object behind the URL was replaced
    requests_before = len(r.fs.log)
    r.start()
    broker = r.brokers[-1]
    r.fetch(broker)
    assert broker.wait_end().state == fp.DONE
    (again,) = r.fs.log[requests_before:]
    assert again.range == f"bytes={record.offset}-" and again.if_range == record.etag
    assert (again.status, again.bytes_sent) == (200, len(DATA))
    assert (r.layout.download_dir / FINAL).read_bytes() == DATA


def test_sigterm_checkpoints_and_exits_0(running):
    r = running
    r.fs.faults.rate = 2 * MiB
    broker = r.brokers[0]
    r.fetch(broker)
    broker.wait_push(lambda p: isinstance(p, fp.FetchStatus) and p.bytes_done > MiB, what="1 MiB")
    assert r.proc.stop() == 0
    record = r.record()
    assert record is not None and record.offset > MiB
    assert (r.layout.download_dir / PART).stat().st_size >= record.offset


def test_a_cancel_after_a_restart_deletes_what_the_earlier_run_left(running):
    r = running
    _kill_at_half(r)
    r.start()
    broker = r.brokers[-1]
    unknown = broker.ask(fp.QueryFetch(seq=broker.next_seq(), job_id="job-1", execution=1))
    assert unknown.state == fp.UNKNOWN
    assert broker.ask(fp.CancelFetch(seq=broker.next_seq(), job_id="job-1", execution=1)).state == fp.CANCELLED
    assert r.downloads == [] and r.records == []


# -- bad HTTP answers (promise 7, docs/contracts.md) ----------------------------------------------------------------------------

@pytest.mark.parametrize("plan, size, state, failure", [
    ([Faults(truncate_after=MiB)], len(DATA), fp.DONE, None),  # truncated: resumed
    ([Faults(truncate_after=MiB), Faults(ignore_range=True)], len(DATA), fp.DONE, None),  # 200 to a range
    ([Faults(truncate_after=MiB), Faults(range_from_zero=True)], len(DATA), fp.DONE, None),  # wrong 206
    ([Faults(truncate_after=MiB), Faults(new_etag=True)], len(DATA), fp.DONE, None),  # changed object
    ([Faults(corrupt=True)], len(DATA), fp.FAILED, "verification_failed"),
    ([Faults(chunked=True)], len(DATA) - 1000, fp.FAILED, "file_too_large"),  # longer than the size
    ([], len(DATA) - 1000, fp.FAILED, "file_too_large"),  # Content-Length above the size
    ([Faults(fail_status=403)], len(DATA), fp.FAILED, "url_expired"),
    ([Faults(fail_status=404)], len(DATA), fp.FAILED, "download_failed"),
], ids=["truncated", "200-to-range", "wrong-206", "changed-etag", "corrupt", "too-long", "too-large",
        "403", "404"])
def test_bad_http_answers_are_caught(running, plan, size, state, failure):
    r = running
    r.fs.plan = list(plan)
    broker = r.brokers[0]
    r.fetch(broker, size=size)
    end = broker.wait_end()
    assert (end.state, end.failure) == (state, failure), end.message
    if state == fp.DONE:
        assert (r.layout.download_dir / FINAL).read_bytes() == DATA
    elif failure not in ("url_expired", "download_failed"):
        assert r.downloads == [] and r.records == []


# -- memory --------------------------------------------------------------------------------------------------------

def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_memory_does_not_grow_with_the_file_size(rig):
    big = os.urandom(1024 * 1024) * 96  # 96 MiB, hashed as it streams
    (rig.base / "srv" / "big.bin").write_bytes(big)
    rig.start()
    peak_before = _vm_hwm(rig.proc.pid)
    broker = rig.brokers[0]
    release = Release(version="1.0", sha256=hashlib.sha256(big).hexdigest(), size=len(big))
    broker.ask(fp.Fetch(seq=broker.next_seq(), job_id="big", execution=1, url=rig.url("/big.bin"),
                        release=release))
    end = broker.wait_end("big", 1, timeout=60)
    assert end.state == fp.DONE, end.message
    grown = _vm_hwm(rig.proc.pid) - peak_before
    assert grown < 24 * MiB, f"the fetcher grew by {grown / MiB:.1f} MiB for a 96 MiB file"
