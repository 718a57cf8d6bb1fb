"""The real ``python -m upparat.fetcher_proc`` as the unprivileged user,
spoken to over its ZeroMQ socket, downloading from a real FileServer."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess

import pytest
import zmq

from upparat import codes, config, launch
from upparat.devtools.fileserver import FileServer
from upparat.ipc import fetcher_protocol as fp, wire
from upparat.ipc.wire import Ping, Pong, Refused
from tests.support import PYTHON, REPO, Proc, poll_for

AS_ROOT = os.geteuid() == 0
USER = "upparat"
DATA = os.urandom(300 * 1024 + 7)
SHA = hashlib.sha256(DATA).hexdigest()


def _drop_kwargs() -> dict:
    return {"user": USER, "group": USER, "extra_groups": []} if AS_ROOT else {}


def _cannot_run_unprivileged() -> str | None:
    """Why the unprivileged user cannot start this interpreter here, or None."""
    if not AS_ROOT:
        return None
    try:
        pwd.getpwnam(USER)
        done = subprocess.run([PYTHON, "-c", "import upparat.fetcher_proc, zmq, requests"], cwd=REPO,
                              capture_output=True, timeout=60, env={"PATH": os.environ.get("PATH", "")},
                              **_drop_kwargs())
    except (KeyError, OSError) as exc:
        return (f"user {USER!r} cannot start {PYTHON}: {exc} (is the interpreter under a directory "
                f"it cannot traverse, e.g. a 0700 /root? build .venv from a system-wide Python)")
    if done.returncode != 0:
        return f"user {USER!r} cannot import upparat with {PYTHON}: {done.stderr.decode(errors='replace')[-300:]}"
    return None


def _chown_to_user(path):
    if AS_ROOT:
        entry = pwd.getpwnam(USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="module")
def unprivileged_ok():
    reason = _cannot_run_unprivileged()
    if reason:
        # scripts/bootstrap sets this up as root; in CI a skip would hide it.
        if AS_ROOT and os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


class Running:
    def __init__(self, world_tmp):
        self.root = world_tmp
        (world_tmp / "dl").mkdir()
        (world_tmp / "run").mkdir()
        (world_tmp / "srv").mkdir()
        _chown_to_user(world_tmp / "dl")
        _chown_to_user(world_tmp / "run")
        (world_tmp / "srv" / "fw.bin").write_bytes(DATA)
        self.config_path = world_tmp / "fetcher.ini"
        text = (f"[service]\ndownload_location = {world_tmp / 'dl'}\n"
                f"[supervisor]\nruntime_dir = {world_tmp / 'run'}\n")
        self.config_path.write_text(text)
        self.cfg = config.parse(text, check_files=False)
        self.zctx = zmq.Context()
        self.client = wire.Client(self.zctx, launch.fetcher_endpoint(self.cfg), fp.REPLIES, timeout_s=2.0)
        self.fs = FileServer(world_tmp / "srv").start()
        self.proc: Proc | None = None

    def start(self, **popen_kwargs) -> Proc:
        self.proc = Proc([PYTHON, "-m", "upparat.fetcher_proc", "-c", self.config_path, "-v"],
                         self.root / "fetcher.log", cwd=REPO, env={"PATH": os.environ.get("PATH", "")},
                         **popen_kwargs)
        return self.proc

    def wait_ready(self) -> Pong:
        def pong():
            if not self.proc.alive():
                raise AssertionError(f"fetcher exited {self.proc.popen.returncode}:\n{self.proc.log()}")
            return self.client.request(Ping(seq=1))

        try:
            return poll_for(pong, 20, what="the fetcher to answer a ping")
        except AssertionError:
            print(self.proc.log())
            raise

    def close(self):
        if self.proc is not None:
            self.proc.stop()
        self.client.close()
        self.zctx.term()
        self.fs.stop()


@pytest.fixture
def running(world_tmp):
    r = Running(world_tmp)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def fetcher(running, unprivileged_ok):
    running.start(**_drop_kwargs())
    running.wait_ready()
    return running


def _url(r: Running) -> str:
    return r.fs.presign("https://bucket.s3.amazonaws.com/fw.bin")


def _fetch(job_id="job-1", url="", seq=1, **kw) -> fp.Fetch:
    fields = {"version": "1.0", "sha256": SHA, "size": len(DATA), "signature": None} | kw
    return fp.Fetch(job_id=job_id, seq=seq, url=url, **fields)


def test_fetches_a_file_and_reports_done(fetcher):
    r = fetcher
    pong = r.client.request(Ping(seq=5))
    assert isinstance(pong, Pong) and pong.pid == r.proc.pid and pong.busy_job_id is None
    first = r.client.request(_fetch(url=_url(r)))
    assert isinstance(first, fp.FetchStatus) and first.state in (fp.RUNNING, fp.DONE)

    def done():
        status = r.client.request(fp.QueryFetch(job_id="job-1", seq=2))
        assert status.state in (fp.RUNNING, fp.DONE), status
        return status if status.state == fp.DONE else None

    status = poll_for(done, 20, what="download done")
    assert status.bytes_done == status.bytes_total == len(DATA)
    final = r.cfg.service.download_dir / "job-1"
    assert final.read_bytes() == DATA
    assert final.stat().st_mode & 0o777 == 0o640
    if AS_ROOT:
        assert final.stat().st_uid == pwd.getpwnam(USER).pw_uid
        socket_dir = r.cfg.supervisor.runtime_dir / "fetcher"
        assert socket_dir.stat().st_mode & 0o777 == 0o700
    assert not (r.cfg.service.download_dir / "job-1.part").exists()


def _raw_request(r: Running, frames: list[bytes]):
    sock = wire.make_socket(r.zctx, zmq.REQ)
    try:
        sock.connect(launch.fetcher_endpoint(r.cfg))
        sock.send_multipart(frames)
        assert sock.poll(5000, zmq.POLLIN), f"no answer to {frames[0][:40]!r}"
        return fp.REPLIES.decode(sock.recv())
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("frames, reason", [
    ([b"\xff\xfe garbage"], "not UTF-8"),
    ([b"not json"], "not JSON"),
    ([b"[1, 2]"], "not a JSON object"),
    ([b'{"v": 2, "type": "ping", "seq": 1}'], "unsupported protocol version"),
    ([b'{"v": 1, "type": "run_hook", "seq": 1}'], "unknown message type"),
    ([b'{"v": 1, "type": "pong", "seq": 1, "pid": 1, "busy_job_id": null}'], "unknown message type"),
    ([b'{"v": 1, "type": "query_fetch", "seq": 1, "job_id": "../../etc"}'], "job_id"),
    ([b'{"v": 1, "type": "ping", "seq": 1, "extra": 1}'], "unexpected field"),
    ([b'{"v": 1, "type": "fetch", "seq": 1, "job_id": "j", "url": "file:///etc/shadow", "version": "1",'
      b' "sha256": null, "size": null, "signature": null}'], "http"),
    ([b"x" * (100 * 1024)], "exceeds"),
    ([b'{"v": 1, "type": "ping", "seq": 1}', b"second frame"], "expected 1 frame"),
])
def test_refuses_bad_requests_and_keeps_answering(fetcher, frames, reason):
    reply = _raw_request(fetcher, frames)
    assert isinstance(reply, Refused)
    assert reason in reply.reason
    pong = fetcher.client.request(Ping(seq=7))
    assert isinstance(pong, Pong) and pong.seq == 7 and pong.pid == fetcher.proc.pid
    assert fetcher.proc.alive()


def test_fetch_for_another_job_while_busy_is_refused(fetcher):
    r = fetcher
    r.fs.faults.chunk_delay_s = 0.3  # ~1.5 s for the whole file
    assert r.client.request(_fetch(url=_url(r))).state == fp.RUNNING
    reply = r.client.request(_fetch(job_id="job-2", url=_url(r), seq=2))
    assert isinstance(reply, Refused) and "busy with job job-1" in reply.reason
    assert r.client.request(Ping(seq=3)).busy_job_id == "job-1"
    cancelled = r.client.request(fp.CancelFetch(job_id="job-1", seq=4))
    assert cancelled.state == fp.CANCELLED
    assert r.client.request(Ping(seq=5)).busy_job_id is None


def test_sigterm_during_a_download_exits_0_and_keeps_the_part(fetcher):
    r = fetcher
    r.fs.faults.chunk_delay_s = 0.3
    r.client.request(_fetch(url=_url(r)))
    poll_for(lambda: r.client.request(fp.QueryFetch(job_id="job-1", seq=2)).bytes_done > 0, 10,
             what="first bytes")
    assert r.proc.stop(timeout=10) == codes.EXIT_OK, r.proc.log()
    part = r.cfg.service.download_dir / "job-1.part"
    assert 0 < part.stat().st_size < len(DATA)


def test_sigterm_when_idle_exits_0(fetcher):
    assert fetcher.proc.stop(timeout=10) == codes.EXIT_OK, fetcher.proc.log()
    assert "stopped" in fetcher.proc.log()


@pytest.mark.skipif(not AS_ROOT, reason="only root can start it with uid 0")
def test_refuses_to_run_as_root(running):
    proc = running.start()
    poll_for(lambda: not proc.alive(), 20, what="the fetcher to refuse uid 0")
    assert proc.popen.returncode == codes.EXIT_UNSAFE
    assert "refusing to run" in proc.log()
    assert not (running.cfg.supervisor.runtime_dir / "fetcher").exists()
