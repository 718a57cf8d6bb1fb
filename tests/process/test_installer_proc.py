"""The real installer process: peer garbage is refused, it keeps answering,
its socket and staging directory have the right owners and modes, and
SIGTERM stops it cleanly."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import stat

import pytest
import zmq

from upparat import config, launch
from upparat.ipc import installer_protocol as ip
from upparat.ipc import wire
from tests.support import PYTHON, REPO, Proc, poll_for


@pytest.fixture
def installer(world_tmp):
    hooks = world_tmp / "hooks"
    hooks.mkdir()
    version = hooks / "version"
    version.write_text("#!/bin/sh\necho checking >&2\necho 3.1.4\n")
    version.chmod(0o755)
    install = hooks / "install"
    install.write_text(f"#!/bin/sh\nsha256sum \"$4\" | cut -d' ' -f1 > {world_tmp}/installed\n")
    install.chmod(0o755)
    cfg_path = world_tmp / "config.ini"
    cfg_path.write_text(f"""
[service]
download_location = {world_tmp}/dl
staging_location = {world_tmp}/staging
[hooks]
version = {version}
install = {install}
retry_interval = 0
max_retries = 1
timeout = 10
[supervisor]
runtime_dir = {world_tmp}/run
""")
    cfg, _ = config.load(cfg_path)
    proc = Proc([PYTHON, "-m", "upparat.installer_proc", "-c", cfg_path, "-v"], world_tmp / "installer.log",
                cwd=REPO)
    context = zmq.Context()
    client = wire.Client(context, launch.installer_endpoint(cfg), ip.REPLIES, timeout_s=5)
    try:
        socket_path = cfg.supervisor.runtime_dir / "installer" / "installer.sock"
        poll_for(lambda: socket_path.exists() or (not proc.alive() and pytest.fail(proc.log())), 10,
                 what="the installer socket")
        assert isinstance(client.request(wire.Ping(seq=0)), wire.Pong)  # bound, chmod-ed, serving
        yield proc, cfg, client, context
    finally:
        client.close()
        context.term()
        proc.stop()


def raw_request(context: zmq.Context, cfg, frames: list[bytes], timeout_ms=5000) -> wire.Message | None:
    sock = wire.make_socket(context, zmq.REQ)
    try:
        sock.connect(launch.installer_endpoint(cfg))
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return ip.REPLIES.decode(sock.recv())
    finally:
        sock.close(linger=0)


def frame(**body) -> bytes:
    return json.dumps(body).encode()


PING = {"v": 1, "type": "ping", "seq": 1}
BAD_REQUESTS = {
    "not JSON": [b"{not json"],
    "not UTF-8": [b"\xff\xfe\x00garbage"],
    "JSON array": [b"[1, 2, 3]"],
    "wrong version": [frame(**{**PING, "v": 2})],
    "unknown type": [frame(v=1, type="run_command", seq=1, command="/bin/sh")],
    "missing field": [frame(v=1, type="query_hook", seq=1, hook="version")],
    "extra field": [frame(**PING, command="/bin/sh")],
    "bool for int": [frame(v=1, type="ping", seq=True)],
    "oversized": [frame(**PING, pad="x" * 100 * 1024)],
    "multi-frame": [frame(**PING), frame(**PING)],
    "path as job_id": [frame(v=1, type="stage", job_id="../../etc", seq=1, version="1", sha256=None,
                             size=None, signature=None)],
    "unconfigured hook": [frame(v=1, type="run_hook", job_id="job-1", seq=1, hook="restart", meta="",
                                force=False)],
    "install before stage": [frame(v=1, type="run_hook", job_id="job-1", seq=1, hook="install", meta="",
                                   force=False)],
}


def test_socket_and_staging_directory_are_private(installer):
    proc, cfg, client, _ = installer
    socket_path = cfg.supervisor.runtime_dir / "installer" / "installer.sock"
    st = socket_path.stat()
    staging = cfg.service.staging_location.lstat()
    assert stat.S_ISDIR(staging.st_mode) and stat.S_IMODE(staging.st_mode) == 0o700
    assert staging.st_uid == os.geteuid()
    if os.geteuid() == 0:
        gid = grp.getgrnam(cfg.supervisor.group).gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid and st.st_uid == 0
        sdir = socket_path.parent.stat()
        assert stat.S_IMODE(sdir.st_mode) == 0o750 and sdir.st_gid == gid
    else:
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_the_installer_keeps_answering(installer, name):
    proc, cfg, client, context = installer
    reply = raw_request(context, cfg, BAD_REQUESTS[name])
    assert isinstance(reply, wire.Refused), reply
    assert reply.reason
    assert proc.alive()
    assert isinstance(client.request(wire.Ping(seq=2)), wire.Pong)
    assert f"refused request: {reply.reason}"[:60] in proc.log()


def test_message_above_zmq_limit_is_dropped_and_the_installer_survives(installer):
    proc, cfg, client, context = installer
    assert raw_request(context, cfg, [b"x" * (2 * 1024 * 1024)], timeout_ms=1000) is None
    assert proc.alive()
    pong = client.request(wire.Ping(seq=3))
    assert isinstance(pong, wire.Pong) and pong.pid == proc.pid


def test_version_hook_runs_after_garbage(installer):
    proc, cfg, client, context = installer
    for frames in BAD_REQUESTS.values():
        assert isinstance(raw_request(context, cfg, frames), wire.Refused)
    started = client.request(ip.RunHook(job_id="job-1", seq=10, hook="version", meta="m", force=False))
    assert isinstance(started, ip.HookStatus) and started.state in (ip.RUNNING, ip.DONE)
    query = ip.QueryHook(job_id="job-1", seq=10, hook="version")
    done = poll_for(lambda: (s := client.request(query)).state != ip.RUNNING and s, 10, what="version hook")
    assert (done.state, done.exit_code, done.output) == (ip.DONE, 0, "3.1.4")


def test_sigterm_exits_0(installer):
    proc, cfg, client, _ = installer
    assert isinstance(client.request(wire.Ping(seq=1)), wire.Pong)
    assert proc.stop() == 0
    assert not (cfg.supervisor.runtime_dir / "installer" / "installer.sock").exists()


def test_stage_then_install_gets_the_verified_copy(installer, world_tmp):
    proc, cfg, client, _ = installer
    payload = b"image" * 10000
    cfg.service.download_dir.mkdir(parents=True)
    source = cfg.service.download_dir / "job-2"
    source.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    staged = client.request(ip.Stage(job_id="job-2", seq=1, version="2", sha256=sha, size=len(payload),
                                     signature=None))
    assert isinstance(staged, ip.StageStatus) and staged.state == ip.STAGED, staged
    source.write_bytes(b"swapped after staging")
    client.request(ip.RunHook(job_id="job-2", seq=2, hook="install", meta="", force=False))
    query = ip.QueryHook(job_id="job-2", seq=2, hook="install")
    done = poll_for(lambda: (s := client.request(query)).state != ip.RUNNING and s, 10, what="install hook")
    assert done.state == ip.DONE
    assert (world_tmp / "installed").read_text().strip() == sha
