"""The real installer process against a compromised broker (user upparat,
raw ZeroMQ over the real socket) and a compromised fetcher (user
upparat-fetch, files in the download directory). Each attack is refused or
harmless, and afterwards the installer has the same PID and serves a valid
request. Every process started here is stopped by PID."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from upparat import signature
from upparat.ipc import handoff
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import BUSY, MALFORMED, NOT_PERMITTED, SOCKET_MAXMSGSIZE
from upparat.release import Release
from upparat.supervisor import child_interpreter
from tests.process.installer_rig import InstallerProcess, Peer, refusal, rss_bytes, same_pid_and_serving
from tests.support import pid_alive, poll_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the boundary is between root and two other users")

PAYLOAD = os.urandom(256 * 1024)


def rel(data=PAYLOAD, **fields) -> Release:
    values = dict(version="2.0", meta="meta", force=False, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    values.update(fields)
    return Release(**values)


@pytest.fixture
def started(world_tmp):
    """Start an InstallerProcess (and its broker peer) with the given options; stop both by PID."""
    made = []

    def start(**options):
        installer = InstallerProcess(world_tmp, **options).start()
        peer = Peer("broker", installer.layout.installer_socket)
        made.append((installer, peer))
        return installer, peer

    yield start
    for installer, peer in made:
        peer.close()
        installer.stop()


@pytest.fixture
def installer(started):
    return started()


def open_job(peer, release, job_id="job-1", execution=1):
    return peer.request(ip.OpenJob(seq=peer.next_seq(), job_id=job_id, execution=execution, release=release))


def stage(peer, job_id="job-1", execution=1):
    reply = peer.request(ip.Stage(seq=peer.next_seq(), job_id=job_id, execution=execution))
    if isinstance(reply, ip.JobState) and reply.phase == ip.STAGING:
        return peer.wait_push(lambda s: s.phase != ip.STAGING and s.job_id == job_id, what="staging to end")
    return reply


def run_hook(peer, hook, round_=0, job_id="job-1", execution=1, wait=True):
    reply = peer.request(ip.RunHook(seq=peer.next_seq(), job_id=job_id, execution=execution, hook=hook,
                                    round=round_))
    if wait and isinstance(reply, ip.JobState) and reply.hook is not None and reply.hook.state == ip.RUNNING:
        return peer.wait_push(lambda s: s.hook is not None and s.hook.hook == hook and s.hook.state != ip.RUNNING,
                              what=f"the {hook} hook to end")
    return reply


def discard(peer, job_id="job-1", execution=1):
    return peer.request(ip.Discard(seq=peer.next_seq(), job_id=job_id, execution=execution))


def query(peer, job_id="job-1", execution=1):
    return peer.request(ip.QueryJob(seq=peer.next_seq(), job_id=job_id, execution=execution))


def as_fetcher(installer, code: str, *args, stdin=None) -> subprocess.Popen:
    ids = installer.ids
    return subprocess.Popen([child_interpreter(), "-c", code, *map(str, args)], user=ids.fetcher_uid,
                            group=ids.fetcher_gid, extra_groups=[], cwd="/", text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


# ----- the socket -----------------------------------------------------------------
def test_socket_is_root_and_the_brokers_group_only(installer):
    inst, peer = installer
    sock = inst.layout.installer_socket.stat()
    assert (sock.st_uid, sock.st_gid, stat.S_IMODE(sock.st_mode)) == (0, inst.ids.broker_gid, 0o660)
    directory = inst.layout.installer_socket.parent.stat()
    assert (directory.st_uid, directory.st_gid, stat.S_IMODE(directory.st_mode)) == (0, inst.ids.broker_gid,
                                                                                       0o750)
    assert peer.ping().pid == inst.pid


def test_the_fetchers_user_cannot_connect_eacces(installer):
    inst, _ = installer
    fetcher = Peer("fetcher", inst.layout.installer_socket)
    try:
        assert fetcher.command(op="connect_unix") == {"errno": errno.EACCES}
    finally:
        fetcher.close()


# ----- hostile frames from the broker's user ----------------------------------------
def frame(**body) -> bytes:
    return json.dumps(body).encode()


PING = {"v": 2, "type": "ping", "seq": 1}
HOSTILE = {
    "not JSON": [b"{not json"],
    "not UTF-8": [b"\xff\xfe\x00garbage"],
    "UTF-8 encoded surrogate": [b'{"v": 2, "type": "ping", "seq": 1, "x": "\xed\xa0\x80"}'],
    "60000 brackets": [b"[" * 60000],
    "5000-digit integer": [b'{"v": 2, "type": "ping", "seq": ' + b"9" * 5000 + b"}"],
    "lone surrogate in a key": [b'{"v": 2, "type": "ping", "seq": 1, "\\ud800": 1}'],
    "lone surrogate in a value": [b'{"v": 2, "type": "query_job", "seq": 1, "job_id": "\\udfff", "execution": 1}'],
    "two frames": [frame(**PING), frame(**PING)],
    "JSON array": [b"[1, 2, 3]"],
    "wrong version": [frame(**{**PING, "v": 1})],
    "unknown type": [frame(v=2, type="run_command", seq=1, command="/bin/sh")],
    "extra field": [frame(**PING, command="/bin/sh")],
    "bool for int": [frame(v=2, type="ping", seq=True)],
    "NaN": [b'{"v": 2, "type": "ping", "seq": NaN}'],
    "duplicate key": [b'{"v": 2, "type": "ping", "seq": 1, "seq": 2}'],
    "path as job_id": [frame(v=2, type="stage", seq=1, job_id="../../etc", execution=1)],
    "hook as a path": [frame(v=2, type="run_hook", seq=1, job_id="j", execution=1, hook="/bin/sh", round=0)],
    "install round 1": [frame(v=2, type="run_hook", seq=1, job_id="j", execution=1, hook="install", round=1)],
    "negative execution": [frame(v=2, type="discard", seq=1, job_id="j", execution=-1)],
    "huge execution": [frame(v=2, type="discard", seq=1, job_id="j", execution=2**64)],
    "release with a NUL in meta": [frame(v=2, type="open_job", seq=1, job_id="j", execution=1, release={
        "version": "1", "meta": "a\u0000b", "force": False, "sha256": None, "size": None, "serial": None,
        "signature": None})],
    "install before open": [frame(v=2, type="run_hook", seq=1, job_id="j", execution=1, hook="install", round=0)],
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frames_are_refused_and_the_installer_keeps_serving(installer, name):
    inst, peer = installer
    pid = inst.pid
    reply = peer.raw(HOSTILE[name])
    refusal(reply)
    assert reply.code in (MALFORMED, NOT_PERMITTED)
    same_pid_and_serving(inst, peer, pid)


def test_all_hostile_frames_in_a_row_then_a_whole_job(installer):
    inst, peer = installer
    pid = inst.pid
    for frames in HOSTILE.values():
        refusal(peer.raw(frames))
    inst.download(PAYLOAD)
    assert open_job(peer, rel()).phase == ip.OPENED
    assert stage(peer).phase == ip.STAGED
    assert run_hook(peer, "install").phase == ip.INSTALLED
    same_pid_and_serving(inst, peer, pid)


def test_an_oversized_frame_is_dropped_before_allocation(installer):
    inst, peer = installer
    pid = inst.pid
    assert peer.raw([b"x" * (SOCKET_MAXMSGSIZE + 1)], timeout_ms=1000) is None  # libzmq disconnects us
    peer.command(op="reconnect")
    same_pid_and_serving(inst, peer, pid)


def test_a_message_of_1500_frames_of_64k_is_dropped_and_memory_stays_bounded(installer):
    inst, peer = installer
    pid = inst.pid
    before = rss_bytes(pid)
    sent = peer.command(op="flood", frame=64 * 1024, count=1500, seconds=60, end=True)
    assert sent["frames_sent"] == 1500
    # The message is complete, so the ping queued behind it is read after it.
    same_pid_and_serving(inst, peer, pid)
    assert "dropped a message of 1501 frames" in inst.log() or "dropping every connection" in inst.log()
    assert rss_bytes(pid) - before < 256 * 1024**2


def test_an_endless_multi_frame_message_cannot_bloat_the_installer(installer):
    inst, peer = installer
    pid = inst.pid
    before = rss_bytes(pid)
    peak = [0]
    sampler_done = []

    import threading

    def sample():
        while not sampler_done:
            try:
                peak[0] = max(peak[0], rss_bytes(pid))
            except (OSError, AssertionError):
                return
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        sent = peer.command(op="zmtp_flood", frame=64 * 1024, count=-1, seconds=20)
    finally:
        sampler_done.append(True)
        thread.join()
    assert sent["dropped"], sent  # the memory guard dropped the connection
    assert sent["frames_sent"] * 64 * 1024 > 128 * 1024**2, sent
    # Every connection was dropped, the peer's DEALER too: a request it had in
    # flight may be lost (the broker retries on its own deadline); connect anew.
    peer.command(op="reconnect")
    same_pid_and_serving(inst, peer, pid)
    assert peak[0] - before < 400 * 1024**2, f"grew by {(peak[0] - before) // 2**20} MiB"
    assert "dropping every connection" in inst.log()


# ----- a whole job, and the once-only steps, as the broker's user -----------------------
def test_a_whole_job_with_pushed_states(installer):
    inst, peer = installer
    inst.download(PAYLOAD)
    assert open_job(peer, rel(meta="the meta", force=True)).phase == ip.OPENED
    assert run_hook(peer, "version").hook.output == "1.0"
    staged = stage(peer)
    assert staged.phase == ip.STAGED and "in place" in staged.message
    assert run_hook(peer, "install").phase == ip.INSTALLED
    refusal(run_hook(peer, "ready"), NOT_PERMITTED, "phase installed")
    assert run_hook(peer, "restart").phase == ip.RESTARTED
    assert run_hook(peer, "ready").phase == ip.RESTARTED
    assert discard(peer).phase == ip.DISCARDED
    staged_path = inst.layout.staging_dir / "job-1.1"
    assert inst.calls() == ["version 0 0 the meta", f"install 0 0 the meta {staged_path}",
                            "restart 0 0 the meta True", "ready 0 0 the meta"]
    assert inst.staged_files() == []


def test_a_second_job_is_busy_and_late_requests_for_a_discarded_one_are_refused(installer):
    inst, peer = installer
    open_job(peer, rel())
    refusal(open_job(peer, rel(), job_id="job-2"), BUSY, "job job-1 execution 1 is open")
    discard(peer)
    refusal(stage(peer), NOT_PERMITTED, "discarded")
    assert query(peer).phase == ip.DISCARDED
    assert open_job(peer, rel(), job_id="job-2").phase == ip.OPENED


# ----- the compromised fetcher ------------------------------------------------------------
def test_a_symlink_from_the_fetcher_is_refused(installer, world_tmp):
    inst, peer = installer
    secret = world_tmp / "root-secret"
    secret.write_bytes(PAYLOAD)
    final = inst.layout.download_dir / handoff.final_name("job-1", 1)
    final.symlink_to(secret)
    os.chown(final, inst.ids.fetcher_uid, inst.ids.fetcher_gid, follow_symlinks=False)
    open_job(peer, rel())
    state = stage(peer)
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed") and "symbolic link" in state.message
    assert secret.stat().st_uid == 0 and inst.staged_files() == []
    same_pid_and_serving(inst, peer, inst.pid)


def test_a_hard_link_from_the_fetcher_is_refused(installer):
    inst, peer = installer
    final = inst.download(PAYLOAD)
    fetcher = as_fetcher(inst, "import os, sys; os.link(sys.argv[1], sys.argv[1] + '-link')", final)
    assert fetcher.wait(10) == 0
    open_job(peer, rel())
    state = stage(peer)
    assert state.failure == "verification_failed" and "hard links" in state.message
    same_pid_and_serving(inst, peer, inst.pid)


def test_a_writable_fd_held_by_the_fetcher_is_refused_and_its_writes_reach_nothing_staged(installer):
    inst, peer = installer
    final = inst.download(PAYLOAD)
    code = ("import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\nprint('open', flush=True)\n"
            "sys.stdin.readline()\nos.write(fd, b'appended after done')\nprint('written', flush=True)\n")
    fetcher = as_fetcher(inst, code, final)
    try:
        assert fetcher.stdout.readline().strip() == "open"
        open_job(peer, rel())
        state = stage(peer)
        assert state.failure == "verification_failed" and "still open for writing" in state.message
        fetcher.stdin.write("go\n")
        fetcher.stdin.flush()
        assert fetcher.stdout.readline().strip() == "written"
        assert inst.staged_files() == []
        refusal(run_hook(peer, "install"), NOT_PERMITTED)
        assert inst.calls() == []
    finally:
        fetcher.kill()
        fetcher.wait(5)
    same_pid_and_serving(inst, peer, inst.pid)


def test_swap_and_append_after_done(installer):
    inst, peer = installer
    inst.download(PAYLOAD)
    open_job(peer, rel())
    assert stage(peer).phase == ip.STAGED
    final = inst.layout.download_dir / handoff.final_name("job-1", 1)
    # After the stage: the fetcher writes a new file under the same name and appends to it.
    code = ("import os, sys\np = sys.argv[1]\nopen(p + '.x', 'wb').write(b'evil')\nos.rename(p + '.x', p)\n"
            "open(p, 'ab').write(b'more')\n")
    assert as_fetcher(inst, code, final).wait(10) == 0
    assert run_hook(peer, "install").phase == ip.INSTALLED
    staged = inst.layout.staging_dir / "job-1.1"
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == rel().sha256  # the verified bytes
    same_pid_and_serving(inst, peer, inst.pid)


def test_a_swap_before_the_stage_is_caught_by_the_installers_own_hash(installer):
    inst, peer = installer
    inst.download(b"what the broker and fetcher chose" * 100)
    open_job(peer, rel())
    state = stage(peer)
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    assert "has 3300 bytes, the job document says" in state.message
    same_pid_and_serving(inst, peer, inst.pid)


# Keeps opening argv[1] for writing (without blocking) until argv[2] exists;
# prints how often it met a lease (the open refused, a lease break started).
WRITER = ("import os, sys, time\nmet = 0\nend = time.monotonic() + 20\nprint('ready', flush=True)\n"
          "while time.monotonic() < end and not os.path.exists(sys.argv[2]):\n"
          "    try:\n        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))\n"
          "    except BlockingIOError:\n        met += 1\n"
          "    except OSError:\n        pass\n"
          "print(met, flush=True)\n")


def stage_beside(writer: subprocess.Popen, peer, data: bytes, stop: Path) -> tuple[ip.JobState, int]:
    """Open and stage a job while ``writer`` (running WRITER) tries; its count."""
    try:
        assert writer.stdout.readline().strip() == "ready"
        open_job(peer, rel(data))
        state = stage(peer)
        stop.touch()
        met = int(writer.communicate(timeout=30)[0].split()[-1])
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(5)
    return state, met


def test_the_fetcher_opening_its_file_for_writing_while_the_installer_hashes_it_is_caught(installer):
    """The file is still the fetcher's while the installer hashes it (the lease
    is taken before the chown): the fetcher, as its own user, keeps opening it
    for writing. Every outcome must be a refusal with nothing staged."""
    inst, peer = installer
    data = os.urandom(256 * 1024 * 1024)
    final = inst.download(data)
    stop = inst.layout.download_dir / "stop-writing"
    pid = inst.pid
    state, met = stage_beside(as_fetcher(inst, WRITER, final, stop), peer, data, stop)
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed"), state.message
    assert "for writing" in state.message
    # Either the lease was refused (the writer held its descriptor at that instant)
    # or the writer met the lease and broke it.
    assert met > 0 or "still open for writing" in state.message
    assert inst.staged_files() == []
    same_pid_and_serving(inst, peer, pid)


def test_a_writer_opening_during_the_take_over_cannot_kill_the_installer(installer):
    """A lease break sends SIGIO to the installer; a writer (root, so that no
    permission stops it) keeps trying to open the staged file while it is
    taken over and hashed (256 MiB under a read lease)."""
    inst, peer = installer
    data = os.urandom(256 * 1024 * 1024)
    inst.download(data)
    staged = inst.layout.staging_dir / handoff.staged_name("job-1", 1)
    done_flag = inst.base / "writer-done"
    pid = inst.pid
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(staged), str(done_flag)],
                              stdout=subprocess.PIPE, text=True)
    state, met = stage_beside(writer, peer, data, done_flag)
    assert met > 0, "the writer never met a lease: the test proved nothing"
    same_pid_and_serving(inst, peer, pid)
    if state.phase == ip.STAGED:  # the writer's open came between the leases: harmless
        assert hashlib.sha256(staged.read_bytes()).hexdigest() == rel(data).sha256
    else:
        assert state.failure == "verification_failed" and "for writing" in state.message
        assert inst.staged_files() == []


# ----- releases with the installer's own keys ----------------------------------------------
@pytest.fixture
def key():
    return ed25519.Ed25519PrivateKey.generate()


def pem(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signed(key, **fields):
    unsigned = rel(**fields)
    return dataclasses.replace(unsigned, signature=signature.sign(key, unsigned))


def test_with_keys_an_unsigned_release_is_refused_before_any_hook(started, key):
    inst, peer = started(verification="", keys_pem=[pem(key)])
    inst.download(PAYLOAD)
    state = open_job(peer, rel())
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    for hook in ("version", "download", "install", "restart", "ready"):
        refusal(run_hook(peer, hook), NOT_PERMITTED)
    refusal(stage(peer), NOT_PERMITTED)
    assert inst.calls() == []
    same_pid_and_serving(inst, peer, inst.pid)


@pytest.mark.parametrize("change", [{"meta": "--evil"}, {"force": True}])
def test_with_keys_a_changed_meta_or_force_is_refused(started, key, change):
    inst, peer = started(verification="", keys_pem=[pem(key)])
    state = open_job(peer, dataclasses.replace(signed(key), **change))
    assert (state.phase, state.failure) == (ip.FAILED, "verification_failed")
    refusal(run_hook(peer, "version"), NOT_PERMITTED)
    assert inst.calls() == []


def test_with_keys_rollback_by_serial_is_refused_and_an_equal_serial_allowed(started, key):
    inst, peer = started(verification="", keys_pem=[pem(key)])
    inst.download(PAYLOAD)
    open_job(peer, signed(key, serial=10))
    stage(peer)
    assert run_hook(peer, "install").phase == ip.INSTALLED
    discard(peer)
    state = open_job(peer, signed(key, serial=9), execution=2)
    assert (state.phase, state.failure) == (ip.FAILED, "rollback_refused")
    discard(peer, execution=2)
    # The serial survives an installer restart (root-only state).
    inst.stop()
    peer.close()
    inst.start()
    peer = Peer("broker", inst.layout.installer_socket)
    try:
        assert open_job(peer, signed(key, serial=9), execution=3).failure == "rollback_refused"
        discard(peer, execution=3)
        assert open_job(peer, signed(key, serial=10), execution=4).phase == ip.OPENED
    finally:
        peer.close()


def test_without_keys_and_without_allow_unsigned_the_message_names_both(started):
    inst, peer = started(verification="")
    state = open_job(peer, rel())
    assert state.failure == "verification_failed"
    assert "[verification] public_keys" in state.message and "allow_unsigned" in state.message


def test_allow_unsigned_accepts_on_sha256_and_a_signed_document_must_still_verify(started, key):
    inst, peer = started(verification="allow_unsigned = true")
    assert open_job(peer, rel()).phase == ip.OPENED
    discard(peer)
    assert open_job(peer, signed(key), execution=2).failure == "verification_failed"


def test_a_bad_public_key_is_exit_2_naming_the_key(world_tmp):
    inst = InstallerProcess(world_tmp, keys_pem=["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
    inst.start(wait=False)
    try:
        assert inst.proc.popen.wait(30) == 2
        assert "[verification] public_keys" in inst.log()
    finally:
        inst.stop()


# ----- hooks -------------------------------------------------------------------------------
def test_a_symlinked_hook_in_a_directory_of_the_broker_user_is_refused_at_start(world_tmp):
    evil_dir = world_tmp / "evil"
    evil_dir.mkdir()
    evil = evil_dir / "hook"
    evil.write_text("#!/bin/sh\nexit 0\n")
    evil.chmod(0o755)
    inst = InstallerProcess(world_tmp)
    os.chown(evil_dir, inst.ids.broker_uid, inst.ids.broker_gid)
    inst.hook_paths["install"].unlink()
    inst.hook_paths["install"].symlink_to(evil)
    inst.start(wait=False)
    try:
        assert inst.proc.popen.wait(30) == 2
        assert "[hooks] install" in inst.log() and f"owned by uid {inst.ids.broker_uid}" in inst.log()
    finally:
        inst.stop()


def test_a_hook_re_pointed_while_running_is_refused_at_its_run(installer, world_tmp):
    inst, peer = installer
    evil_dir = world_tmp / "evil"
    evil_dir.mkdir()
    (evil_dir / "hook").write_text(f"#!/bin/sh\ntouch {world_tmp}/pwned\n")
    (evil_dir / "hook").chmod(0o755)
    os.chown(evil_dir, inst.ids.broker_uid, inst.ids.broker_gid)
    inst.hook_paths["version"].unlink()
    inst.hook_paths["version"].symlink_to(evil_dir / "hook")
    open_job(peer, rel())
    state = run_hook(peer, "version")
    assert state.failure == "version_hook_failed" and "refused to run" in state.message
    assert not (world_tmp / "pwned").exists()
    same_pid_and_serving(inst, peer, inst.pid)


# ----- crashes, power loss, discard ----------------------------------------------------------
SLOW_WITH_CHILD = 'sleep 300 & echo $! > {base}/{name}.child; echo $$ > {base}/{name}.leader; wait'


def read_pid(path):
    return int(poll_for(lambda: path.exists() and path.read_text().strip(), 15, what=str(path)))


def test_kill_9_during_install_kills_the_hook_and_restart_says_install_interrupted(started):
    inst, peer = started(hooks={"install": SLOW_WITH_CHILD, "restart": "exit 0"})
    inst.download(PAYLOAD)
    open_job(peer, rel())
    stage(peer)
    run_hook(peer, "install", wait=False)
    leader, child = read_pid(inst.base / "install.leader"), read_pid(inst.base / "install.child")
    os.kill(inst.pid, signal.SIGKILL)
    inst.proc.popen.wait(10)
    poll_for(lambda: not pid_alive(leader), 10, what="the hook to die with the installer (PR_SET_PDEATHSIG)")
    assert pid_alive(child)  # the hook's own child has no death signal ...
    inst.start()
    poll_for(lambda: not pid_alive(child), 10, what="the start-up to kill the leftover by its marker")
    state = query(peer)
    assert state.phase == ip.INSTALL_INTERRUPTED and "install hook may run again" in state.message
    assert run_hook(peer, "install", wait=False).phase == ip.INSTALLING  # re-verified, then run again
    discard(peer)
    poll_for(lambda: discard(peer).phase == ip.DISCARDED, 15, what="the discard")


def test_kill_9_during_restart_hook_says_restart_interrupted_and_runs_it_once_more(started):
    inst, peer = started(hooks={"install": "exit 0", "restart": SLOW_WITH_CHILD})
    inst.download(PAYLOAD)
    open_job(peer, rel())
    stage(peer)
    run_hook(peer, "install")
    run_hook(peer, "restart", wait=False)
    leader = read_pid(inst.base / "restart.leader")
    os.kill(inst.pid, signal.SIGKILL)
    inst.proc.popen.wait(10)
    inst.start()
    poll_for(lambda: not pid_alive(leader), 10, what="the cut-off restart hook to be gone")
    state = query(peer)
    assert state.phase == ip.RESTART_INTERRUPTED  # same boot: the installer died, not the device
    assert run_hook(peer, "install").phase == ip.RESTART_INTERRUPTED  # never install again
    assert run_hook(peer, "restart", wait=False).phase == ip.RESTARTING  # the restart runs once more
    assert len([line for line in inst.calls() if line.startswith("install")]) <= 1


def test_sigterm_during_restart_hook_counts_as_restarted(started):
    """A restart hook that restarts this service (or reboots) stops the installer
    in an orderly way: that is the restart, and it is not run again."""
    inst, peer = started(hooks={"install": "exit 0", "restart": SLOW_WITH_CHILD})
    inst.download(PAYLOAD)
    open_job(peer, rel())
    stage(peer)
    run_hook(peer, "install")
    run_hook(peer, "restart", wait=False)
    read_pid(inst.base / "restart.leader")
    os.kill(inst.pid, signal.SIGTERM)
    inst.proc.popen.wait(15)
    inst.start()
    assert query(peer).phase == ip.RESTARTED
    assert run_hook(peer, "restart").phase == ip.RESTARTED  # answered, never run again


def test_discard_during_a_running_install_kills_it_and_empties_staging(started):
    inst, peer = started(hooks={"install": SLOW_WITH_CHILD})
    inst.download(PAYLOAD)
    open_job(peer, rel())
    stage(peer)
    run_hook(peer, "install", wait=False)
    leader, child = read_pid(inst.base / "install.leader"), read_pid(inst.base / "install.child")
    assert discard(peer).phase == ip.INSTALLING  # stopping it
    peer.wait_push(lambda s: s.phase == ip.DISCARDED, what="the discard to complete")
    assert not pid_alive(leader) and not pid_alive(child)
    assert inst.staged_files() == []
    assert discard(peer).phase == ip.DISCARDED
    same_pid_and_serving(inst, peer, inst.pid)


def test_twenty_discards_in_a_row_leave_nothing_behind(started):
    inst, peer = started(hooks={"install": "sleep 300"})
    for execution in range(1, 21):
        inst.download(PAYLOAD, execution=execution)
        open_job(peer, rel(), execution=execution)
        stage(peer, execution=execution)
        run_hook(peer, "install", execution=execution, wait=False)
        poll_for(lambda: discard(peer, execution=execution).phase == ip.DISCARDED, 20, what="discarded")
    assert inst.staged_files() == [] and os.listdir(inst.layout.download_dir) == []
    assert subprocess.run(["pgrep", "-f", str(inst.hook_paths["install"])], capture_output=True).stdout == b""
    same_pid_and_serving(inst, peer, inst.pid)


def test_sigterm_kills_a_running_hook_and_exits_0(started):
    inst, peer = started(hooks={"version": SLOW_WITH_CHILD})
    open_job(peer, rel())
    run_hook(peer, "version", wait=False)
    leader, child = read_pid(inst.base / "version.leader"), read_pid(inst.base / "version.child")
    assert inst.stop() == 0
    assert not pid_alive(leader) and not pid_alive(child)
    assert not inst.layout.installer_socket.exists()


# ----- root stays small; standalone mode --------------------------------------------------------
FORBIDDEN = ("requests", "urllib3", "paho", "sentry_sdk", "http.client", "urllib.request", "boto3", "botocore",
             "awscrt", "awsiot")


def loaded_after_start(world_tmp, keys_pem=()) -> set[str]:
    inst = InstallerProcess(world_tmp)
    code = f"""
import json, sys
from pathlib import Path
from upparat import config, launch
from upparat.installer_proc import __main__ as m
from upparat.ipc.settings import Layout, resolve_identities
cfg = config.parse({inst.config_text!r}, check_files=False)
ids = resolve_identities(cfg, True, 0, 0, "root")
layout = Layout(**{{k: Path(v) for k, v in {dict((k, str(v)) for k, v in dataclasses.asdict(inst.layout).items())!r}.items()}})
ctx = launch.ChildContext(name="installer", config=config.parse({inst.config_text!r}, check_files=False),
                          layout=layout, ids=ids, verbose=False, public_keys_pem=tuple({list(keys_pem)!r}))
m.build(ctx, lambda: None)
print(json.dumps(sorted(sys.modules)))
"""
    from upparat.supervisor import prepare_directories
    prepare_directories(inst.layout, inst.ids)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_the_installer_imports_nothing_network_facing(world_tmp, key):
    modules = loaded_after_start(world_tmp)
    assert "upparat.installer_proc.installer" in modules  # it really started
    assert not [m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN]
    assert not [m for m in modules if m.startswith("cryptography")]
    # With keys: checked at start by a short-lived child, loaded at the first verification.
    with_keys = loaded_after_start(world_tmp, [pem(key)])
    assert "upparat.installer_proc.installer" in with_keys
    assert not [m for m in with_keys if m.startswith("cryptography")]


def test_standalone_refuses_a_config_file_others_can_change(world_tmp):
    inst = InstallerProcess(world_tmp)
    conf_dir = world_tmp / "conf"
    conf_dir.mkdir()
    os.chown(conf_dir, inst.ids.broker_uid, inst.ids.broker_gid)
    conf = conf_dir / "upparat.ini"
    conf.write_text(inst.config_text + f"[supervisor]\nruntime_dir = {world_tmp}/run2\n")
    out = subprocess.run([sys.executable, "-m", "upparat.installer_proc", "-c", str(conf)], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert f"owned by uid {inst.ids.broker_uid}" in out.stderr and "chown root:root" in out.stderr


def test_standalone_prepares_its_own_directories_and_serves(world_tmp):
    inst = InstallerProcess(world_tmp)
    conf = world_tmp / "upparat.ini"
    conf.write_text(inst.config_text + f"[service]\nstaging_location = {world_tmp}/st\n"
                    f"download_location = {world_tmp}/dl2\n[supervisor]\nruntime_dir = {world_tmp}/run2\n")
    from tests.support import Proc
    proc = Proc([sys.executable, "-m", "upparat.installer_proc", "-c", str(conf)], world_tmp / "standalone.log")
    peer = None
    try:
        sock = world_tmp / "run2" / "installer" / "installer.sock"
        poll_for(lambda: sock.exists() or (not proc.alive() and pytest.fail(proc.log())), 15, what="the socket")
        st = sock.parent.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, inst.ids.broker_gid, 0o750)
        assert stat.S_IMODE((world_tmp / "st").stat().st_mode) == 0o700
        peer = Peer("broker", sock)
        assert peer.ping().pid == proc.pid
    finally:
        if peer is not None:
            peer.close()
        assert proc.stop() == 0
