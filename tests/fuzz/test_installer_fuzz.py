"""Property-based fuzzing of the installer's boundary (hypothesis).

The real main loop (``upparat.installer_proc.__main__.serve``) runs in a
thread with the real ``wire.Server`` on a real socket, the real allow-list,
record, staging and hooks; the test is the broker's DEALER. Inputs: raw
bytes, JSON with hostile values (lone surrogates, huge numbers, deep
nesting, wrong types), valid-ish requests of every type with hostile field
values, and multi-frame messages. State carries over between examples, so
that sequences open, stage, install, discard and fail jobs.

Property: every request gets exactly one reply of a known type with its seq
(0 when it could not be read), the loop never dies, the record stays
consistent, and afterwards a valid ping is answered by the same loop.

Short run (CI): the default number of examples. Long run:
``UPPARAT_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q tests/fuzz`` (docs/fuzzing.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
import types

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upparat.installer_proc import __main__ as installer_main
from upparat.wakeup import Wakeup
from upparat.installer_proc import allow
from upparat.ipc import handoff
from upparat.ipc import installer_protocol as ip
from upparat.ipc import wire
from upparat.release import HOOK_NAMES
from tests.installer_support import PAYLOAD, PAYLOAD_SHA, Rig, release

EXAMPLES = int(os.environ.get("UPPARAT_FUZZ_EXAMPLES", "300"))
REPLY_TIMEOUT = 10.0
JOB_IDS = ("job-1", "job-2")
OPEN = "<the open job>"  # replaced when sent: most requests are about the job that is open

# pytest-timeout's default (setup.cfg) is for ordinary tests; a long run takes ~3 ms per input.
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 20))

COUNTS = {"examples": 0, "replies": 0, "refused": 0, "job_state": 0, "pong": 0}
PHASES_SEEN: dict[str, int] = {}


class Loop:
    """The installer's real main loop in a thread, and a DEALER to talk to it."""

    def __init__(self, base):
        hooks = {name: "echo 1.0" for name in HOOK_NAMES}
        # What the install hook got: checked against promise 2 after every input.
        hooks["install"] = f'sha256sum "$4" >> {base}/installs'
        self.installs = base / "installs"
        self.rig = Rig(base, hooks=hooks, allow_unsigned=True)
        self.installer = self.rig.installer
        self.context = zmq.Context()
        self.waker = Wakeup()
        self.installer._wake = self.waker
        # The memory guard watches this whole test process (hypothesis included), so
        # it is set out of reach here; tests/process proves it on the real process.
        self.server = wire.Server(self.context, self.rig.layout.installer_socket, ip.REQUESTS,
                                  lambda message, peer: allow.dispatch(self.installer, message, peer), "installer",
                                  memory_limit=64 * 1024**3)
        self.rig.layout.installer_socket.parent.mkdir(parents=True, exist_ok=True)
        self.server.bind()
        self.ctx = types.SimpleNamespace(stop=threading.Event(),
                                         heartbeat=types.SimpleNamespace(beat=lambda **status: None))
        self.crash: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, name="installer-main-loop", daemon=True)
        self.thread.start()
        self.client = self.context.socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(self.server.endpoint)

    def _serve(self):
        try:
            installer_main.serve(self.ctx, self.installer, self.server, self.waker)
        except BaseException as exc:  # noqa: BLE001 - the property under test
            self.crash.append(exc)
            raise

    def send(self, frames: list[bytes]) -> None:
        self.client.send_multipart([b""] + frames)

    def send_oversized(self, frames: list[bytes]) -> None:
        """From a throwaway DEALER: libzmq disconnects the sender of a frame
        over the limit, before allocating it; the test's own connection stays."""
        sock = self.context.socket(zmq.DEALER)
        try:
            sock.connect(self.server.endpoint)
            sock.send_multipart([b""] + frames)
            sock.setsockopt(zmq.LINGER, 2000)  # let it go out before the close
        finally:
            sock.close()

    def replies(self, until_seq: int | None) -> list[wire.Message]:
        """Read until a reply with ``until_seq`` (or any non-push when None)."""
        got = []
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            if not self.client.poll(50):
                assert self.thread.is_alive(), f"the main loop died: {self.crash}"
                continue
            frames = self.client.recv_multipart()
            assert len(frames) == 2 and frames[0] == b"", frames
            reply = ip.REPLIES.decode(frames[1])  # our own replies always decode
            if isinstance(reply, ip.JobState) and reply.seq == 0 and until_seq != 0:
                continue  # a push about a job whose thread finished
            got.append(reply)
            if until_seq is None or reply.seq == until_seq:
                return got
        raise AssertionError(f"no reply within {REPLY_TIMEOUT} s (main loop alive: {self.thread.is_alive()}, "
                             f"re-binds: {self.server.rebinds})")

    def restock_download(self):
        """Keep a finished download for the open job, so that staging can succeed."""
        job = self.installer.state.job
        if job is None or job.phase != ip.OPENED:
            return
        path = self.rig.layout.download_dir / handoff.final_name(job.job_id, job.execution)
        if not path.exists():
            self.rig.download(PAYLOAD, job.job_id, job.execution)

    def check_consistent(self):
        state = self.installer.state
        job = state.job
        if job is not None:
            assert job.phase in ip.PHASES and job.phase not in (ip.NONE, ip.DISCARDED)
            assert (job.failure is None) == (job.phase != ip.FAILED) or job.phase == ip.FAILED
            if job.phase in (ip.STAGED, ip.INSTALLING, ip.INSTALLED):
                assert job.staged_sha256 is not None
        assert len(state.history) <= 32
        # Promise 2: the install hook only ever got a staged file of the verified bytes.
        if self.installs.exists():
            for line in self.installs.read_text().splitlines():
                digest, path = line.split(maxsplit=1)
                assert digest == PAYLOAD_SHA and os.path.dirname(path) == str(self.rig.layout.staging_dir), line
                COUNTS["install_hook_runs"] = COUNTS.get("install_hook_runs", 0) + 1
            self.installs.unlink()
        staged = self.rig.staged_files()
        allowed = set() if job is None else {handoff.staged_name(job.job_id, job.execution)}
        # Only the open job's file, or a temporary copy/record while a thread works.
        assert all(name in allowed or name.startswith((".stage-", ".state-")) for name in staged), staged

    def close(self):
        self.ctx.stop.set()
        self.thread.join(10)
        self.client.close(linger=0)
        self.installer.stop()
        self.server.close()
        self.context.term()
        self.waker.close()
        self.rig.close()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="upparat-fuzz-", dir="/tmp"))
    base.chmod(0o755)
    loop = Loop(base)
    try:
        yield loop
    finally:
        loop.close()
        shutil.rmtree(base, ignore_errors=True)
        print("\nfuzz figures:", json.dumps(COUNTS), "phases answered:", json.dumps(PHASES_SEEN, sort_keys=True))


# ----- strategies -------------------------------------------------------------------
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=40)  # lone surrogates included
hostile_text = st.one_of(
    any_text,
    st.sampled_from(["", "../../etc/passwd", "/bin/sh", "job-1\n", "a" * 65, "x\x00y", "install", "NaN",
                     "${aws:iot:s3-presigned-url:x}", "\u202e", "\ud800", "\udfff"]),
    st.text(max_size=5000),
)
hostile_int = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.integers(),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]),
)
hostile_scalar = st.one_of(st.none(), st.booleans(), hostile_int, hostile_text,
                           st.floats(allow_nan=False, allow_infinity=False))
hostile_value = st.recursive(hostile_scalar,
                             lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(hostile_text, inner, max_size=4)),
                             max_leaves=12)
good_release = st.sampled_from([release(), release(meta="m", force=True), release(sha256=None, size=None),
                                release(serial=3), release(version="1.0")])
release_body = st.one_of(good_release.map(lambda r: dict(r.__dict__)), st.dictionaries(hostile_text, hostile_value,
                                                                                         max_size=8),
                         st.fixed_dictionaries({}, optional={
                             "version": hostile_value, "meta": hostile_value, "force": hostile_value,
                             "sha256": hostile_value, "size": hostile_value, "serial": hostile_value,
                             "signature": st.one_of(hostile_value, st.just("AAAA"))}))
VALID = {
    "seq": st.integers(min_value=1, max_value=2**62),
    "job_id": st.one_of(st.just(OPEN), st.just(OPEN), st.sampled_from(JOB_IDS)),
    "execution": st.one_of(st.just(OPEN), st.just(OPEN), st.integers(min_value=1, max_value=10**6)),
    "hook": st.sampled_from(HOOK_NAMES),
    "round": st.integers(min_value=0, max_value=2),
}
REQUEST_FIELDS = {
    "ping": ("seq",),
    "open_job": ("seq", "job_id", "execution", "release"),
    "query_job": ("seq", "job_id", "execution"),
    "stage": ("seq", "job_id", "execution"),
    "run_hook": ("seq", "job_id", "execution", "hook", "round"),
    "discard": ("seq", "job_id", "execution"),
}
assert set(REQUEST_FIELDS) == set(ip.REQUESTS.types)


@st.composite
def request_body(draw, hostility: int):
    """A request of any type; each part is hostile with probability about hostility/20."""
    def hostile() -> bool:
        return draw(st.integers(0, 19)) < hostility

    kind = draw(st.sampled_from(sorted(REQUEST_FIELDS)))
    body = {"v": draw(hostile_value) if hostile() else 2, "type": draw(hostile_value) if hostile() else kind}
    for name in REQUEST_FIELDS[kind]:
        if hostile() and draw(st.booleans()):
            continue  # missing
        if name == "release":
            body[name] = draw(hostile_value) if hostile() else draw(release_body)
        else:
            body[name] = draw(hostile_value) if hostile() else draw(VALID[name])
    if hostile():
        body[draw(hostile_text)] = draw(hostile_value)  # an extra field
    return body


def encode(body, how: str) -> bytes:
    return Encoded(body, how)


class Encoded(bytes):
    """A request body, encoded only when sent: ``OPEN`` becomes the open job's ids."""

    def __new__(cls, body, how):
        self = super().__new__(cls, b"<request>")
        self.body, self.how = body, how
        return self

    def __repr__(self):
        return f"encode({self.body!r}, {self.how!r})"


def to_bytes(frame: bytes, open_ids: tuple[str, int]) -> bytes:
    if not isinstance(frame, Encoded):
        return frame
    body = frame.body
    if isinstance(body, dict):
        body = dict(body)
        if body.get("job_id") == OPEN:
            body["job_id"] = open_ids[0]
        if body.get("execution") == OPEN:
            body["execution"] = open_ids[1]
    how = frame.how
    if how == "ascii":
        return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    return json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


payloads = st.one_of(
    st.tuples(request_body(0), st.just("ascii")).map(lambda t: [encode(*t)]),  # valid-ish: state changes
    st.tuples(request_body(0), st.just("ascii")).map(lambda t: [encode(*t)]),
    st.tuples(request_body(1), st.just("ascii")).map(lambda t: [encode(*t)]),
    st.tuples(request_body(4), st.sampled_from(["ascii", "raw"])).map(lambda t: [encode(*t)]),
    st.binary(max_size=3000).map(lambda b: [b]),
    st.binary(max_size=200).map(lambda b: [b'{"v":2,"type":"open_job","seq":1,' + b]),
    st.integers(1, wire.SOCKET_MAXMSGSIZE).map(lambda n: [b"[" * n]),
    st.integers(wire.SOCKET_MAXMSGSIZE + 1, 3 * wire.SOCKET_MAXMSGSIZE).map(lambda n: [b"{" * n]),
    st.integers(1, 9000).map(lambda n: [b'{"v":2,"type":"ping","seq":' + b"7" * n + b"}"]),
    hostile_value.map(lambda v: [encode(v, "ascii")]),
    st.lists(st.binary(max_size=64), min_size=0, max_size=4).map(lambda frames: frames or []),
    st.lists(st.tuples(request_body(1), st.just("ascii")).map(lambda t: encode(*t)), min_size=2, max_size=3),
)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
          suppress_health_check=list(HealthCheck))
@given(frames=payloads)
def test_the_main_loop_answers_every_input_and_survives(loop, frames):
    COUNTS["examples"] += 1
    loop.restock_download()
    job = loop.installer.state.job
    fresh = (JOB_IDS[COUNTS["examples"] % 2], COUNTS["examples"])  # a new execution when none is open
    frames = [to_bytes(frame, job.ids if job is not None else fresh) for frame in frames]
    if any(len(frame) > wire.SOCKET_MAXMSGSIZE for frame in frames):
        COUNTS["oversized"] = COUNTS.get("oversized", 0) + 1
        loop.send_oversized(frames)
    else:
        loop.send(frames)
        expected = wire._refusal_seq(frames[0]) if len(frames) == 1 else None
        if expected == 0 and not decodes(frames[0]):
            expected = None  # its refusal has seq 0: any reply but a push
        # A valid request with seq 0 is answered with seq 0, like a push: wait for seq 0.
        replies = loop.replies(expected)
        reply = replies[-1]
        COUNTS["replies"] += len(replies)
        check_reply(reply)
    # The same loop answers a valid request afterwards.
    loop.send([wire.Ping(seq=2**62 + 1).encode()])
    pong = loop.replies(2**62 + 1)[-1]
    assert isinstance(pong, ip.Pong) and pong.pid == os.getpid()
    assert loop.thread.is_alive(), loop.crash
    assert loop.server.rebinds == 0
    loop.check_consistent()


def decodes(frame: bytes) -> bool:
    try:
        ip.REQUESTS.decode(frame)
        return True
    except wire.ProtocolError:
        return False


def check_reply(reply):
    assert isinstance(reply, (wire.Refused, ip.JobState, ip.Pong)), reply
    if isinstance(reply, wire.Refused):
        COUNTS["refused"] += 1
        assert reply.code in wire.REFUSAL_CODES and reply.reason
    elif isinstance(reply, ip.JobState):
        COUNTS["job_state"] += 1
        PHASES_SEEN[reply.phase] = PHASES_SEEN.get(reply.phase, 0) + 1
    else:
        COUNTS["pong"] += 1
