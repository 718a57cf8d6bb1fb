"""Unit tests of installer_proc: hooks, the allow-list, staging, the state file.

Fake hooks are small shell scripts; each writes what it saw to a file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from upparat import config, verify
from upparat.installer_proc.allow import Installer
from upparat.installer_proc.hooks import CLEAN_ENV
from upparat.installer_proc.staging import STATE_FILE, StagingArea
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import Ping, ProtocolError
from tests.support import poll_for

RUNTIME_DIR = "/tmp/upparat-unit-unused"  # parsed, never created by these tests
PAYLOAD = b"firmware image\n" * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def make_config(tmp_path: Path, hooks: dict[str, Path], *, retry_interval=0, max_retries=2, timeout=30,
                verification: str = "", check_files=True) -> config.Config:
    lines = [f"{name} = {path}" for name, path in hooks.items()]
    text = f"""
[service]
download_location = {tmp_path}/dl
staging_location = {tmp_path}/staging
[hooks]
{chr(10).join(lines)}
retry_interval = {retry_interval}
max_retries = {max_retries}
timeout = {timeout}
[verification]
{verification}
[supervisor]
runtime_dir = {RUNTIME_DIR}
"""
    cfg = config.parse(text, check_files=check_files)
    cfg.service.download_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def make_installer(cfg: config.Config, keys=()) -> Installer:
    return Installer(cfg.hooks, StagingArea(cfg, list(keys)))


def run_hook(installer: Installer, hook: str, job_id="job-1", seq=1, meta="the meta", force=False) -> ip.HookStatus:
    installer.dispatch(ip.RunHook(job_id=job_id, seq=seq, hook=hook, meta=meta, force=force))
    query = ip.QueryHook(job_id=job_id, seq=seq, hook=hook)
    return poll_for(lambda: (s := installer.dispatch(query)).state != ip.RUNNING and s, 20,
                    what=f"{hook} hook to finish")


def stage(installer: Installer, job_id="job-1", seq=100, sha256=PAYLOAD_SHA, size=None, signature=None,
          version="2.0.0") -> ip.StageStatus:
    return installer.dispatch(ip.Stage(job_id=job_id, seq=seq, version=version, sha256=sha256, size=size,
                                       signature=signature))


def download(cfg: config.Config, job_id="job-1", data=PAYLOAD) -> Path:
    path = cfg.service.download_dir / job_id
    path.write_bytes(data)
    return path


def argv_recorder(path: Path, out: Path) -> Path:
    return script(path, f"printf '%s\\0' \"$0\" \"$@\" > {out}\n")


def recorded_argv(out: Path) -> list[str]:
    return [arg.decode() for arg in out.read_bytes().split(b"\0")[:-1]]


# ----- hooks ----------------------------------------------------------------
@pytest.mark.parametrize("hook", ["version", "download", "ready"])
def test_plain_hooks_get_elapsed_retry_meta(tmp_path, hook):
    out = tmp_path / "argv"
    cmd = argv_recorder(tmp_path / hook, out)
    installer = make_installer(make_config(tmp_path, {hook: cmd}))
    status = run_hook(installer, hook, meta="some meta; $(rm -rf /) 'q'")
    assert status.state == ip.DONE
    assert recorded_argv(out) == [str(cmd), "0", "0", "some meta; $(rm -rf /) 'q'"]


def test_install_hook_gets_the_staged_file_as_fifth_argument(tmp_path):
    out = tmp_path / "argv"
    cmd = argv_recorder(tmp_path / "install", out)
    cfg = make_config(tmp_path, {"install": cmd})
    installer = make_installer(cfg)
    download(cfg)
    assert stage(installer).state == ip.STAGED
    assert run_hook(installer, "install", seq=2).state == ip.DONE
    assert recorded_argv(out) == [str(cmd), "0", "0", "the meta", str(cfg.service.staging_location / "job-1")]


@pytest.mark.parametrize("force,arg", [(True, "True"), (False, "")])
def test_restart_hook_gets_force_as_upparat_1x_did(tmp_path, force, arg):
    out = tmp_path / "argv"
    cmd = argv_recorder(tmp_path / "restart", out)
    cfg = make_config(tmp_path, {"install": script(tmp_path / "install", "exit 0\n"), "restart": cmd})
    installer = make_installer(cfg)
    download(cfg)
    stage(installer)
    assert run_hook(installer, "install", seq=2).state == ip.DONE
    assert run_hook(installer, "restart", seq=3, force=force).state == ip.DONE
    assert recorded_argv(out) == [str(cmd), "0", "0", "the meta", arg]


def test_hook_runs_with_clean_environment_cwd_root_and_no_stdin(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "leak")
    out = tmp_path / "seen"
    cmd = script(tmp_path / "version", f"""
cat /proc/$$/environ > {out}.env
pwd > {out}.cwd
readlink /proc/$$/fd/0 > {out}.stdin
echo 1.0
""")
    installer = make_installer(make_config(tmp_path, {"version": cmd}))
    assert run_hook(installer, "version").state == ip.DONE
    env = dict(item.split("=", 1) for item in Path(f"{out}.env").read_text().split("\0") if item)
    assert env == CLEAN_ENV
    assert Path(f"{out}.cwd").read_text().strip() == "/"
    assert Path(f"{out}.stdin").read_text().strip() == "/dev/null"


def test_version_output_is_last_non_empty_line_without_control_characters(tmp_path):
    cmd = script(tmp_path / "version", "echo starting\nprintf '2.1.0\\033[0m\\n\\n  \\n'\necho to-stderr >&2\n")
    installer = make_installer(make_config(tmp_path, {"version": cmd}))
    status = run_hook(installer, "version")
    assert (status.state, status.exit_code, status.output) == (ip.DONE, 0, "2.1.0[0m")


def test_exit_3_then_0_is_done_after_one_retry(tmp_path):
    counter = tmp_path / "count"
    cmd = script(tmp_path / "ready", f"echo x >> {counter}\n[ $(wc -l < {counter}) -ge 2 ] && exit 0\nexit 3\n")
    installer = make_installer(make_config(tmp_path, {"ready": cmd}))
    status = run_hook(installer, "ready")
    assert (status.state, status.attempt) == (ip.DONE, 1)
    assert len(counter.read_text().splitlines()) == 2


def test_exit_3_forever_gives_up_after_max_retries(tmp_path):
    counter = tmp_path / "count"
    cmd = script(tmp_path / "download", f"echo \"$2\" >> {counter}\nexit 3\n")
    installer = make_installer(make_config(tmp_path, {"download": cmd}, max_retries=2))
    status = run_hook(installer, "download")
    assert (status.state, status.attempt) == (ip.GAVE_UP, 2)
    assert counter.read_text().split() == ["0", "1", "2"]  # the retry argument counts up


def test_other_exit_code_fails_with_that_code(tmp_path):
    cmd = script(tmp_path / "version", "echo broken >&2\nexit 1\n")
    installer = make_installer(make_config(tmp_path, {"version": cmd}))
    status = run_hook(installer, "version")
    assert (status.state, status.exit_code) == (ip.FAILED, 1)
    assert "broken" in status.message


def test_hook_that_cannot_be_executed_fails_with_a_message(tmp_path):
    cmd = script(tmp_path / "version", "exit 0\n")
    installer = make_installer(make_config(tmp_path, {"version": cmd}))
    cmd.chmod(0o644)
    status = run_hook(installer, "version")
    assert (status.state, status.exit_code) == (ip.FAILED, None)
    assert "cannot run" in status.message


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_timeout_kills_the_hooks_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    cmd = script(tmp_path / "ready", f"sleep 60 &\necho $! > {pidfile}\nsleep 60\n")
    installer = make_installer(make_config(tmp_path, {"ready": cmd}, timeout=1))
    status = run_hook(installer, "ready")
    assert status.state == ip.FAILED
    assert "killed after 1 s" in status.message
    poll_for(lambda: _pid_gone(int(pidfile.read_text())), 5, what="the hook's background child to die")


def test_stop_terminates_a_running_hook(tmp_path):
    cmd = script(tmp_path / "ready", "sleep 60\n")
    installer = make_installer(make_config(tmp_path, {"ready": cmd}))
    installer.dispatch(ip.RunHook(job_id="job-1", seq=1, hook="ready", meta="", force=False))
    installer.stop()
    status = installer.dispatch(ip.QueryHook(job_id="job-1", seq=1, hook="ready"))
    assert status.state == ip.FAILED and "shutting down" in status.message


# ----- the allow-list -------------------------------------------------------
def test_unconfigured_hook_is_refused(tmp_path):
    installer = make_installer(make_config(tmp_path, {}))
    with pytest.raises(ProtocolError, match="hook version is not configured"):
        installer.dispatch(ip.RunHook(job_id="job-1", seq=1, hook="version", meta="", force=False))


def test_second_hook_while_one_runs_is_refused_busy(tmp_path):
    cmd = script(tmp_path / "ready", "sleep 60\n")
    installer = make_installer(make_config(tmp_path, {"ready": cmd, "version": cmd}))
    try:
        installer.dispatch(ip.RunHook(job_id="job-1", seq=1, hook="ready", meta="", force=False))
        with pytest.raises(ProtocolError, match="busy"):
            installer.dispatch(ip.RunHook(job_id="job-1", seq=2, hook="version", meta="", force=False))
        with pytest.raises(ProtocolError, match="busy"):
            stage(installer)
        pong = installer.dispatch(Ping(seq=3))
        assert pong.busy_job_id == "job-1" and pong.pid == os.getpid()
    finally:
        installer.stop()


def test_repeated_run_hook_is_answered_not_run_again(tmp_path):
    counter = tmp_path / "count"
    cmd = script(tmp_path / "version", f"echo x >> {counter}\necho 1.0\n")
    installer = make_installer(make_config(tmp_path, {"version": cmd}))
    first = run_hook(installer, "version", seq=7)
    again = installer.dispatch(ip.RunHook(job_id="job-1", seq=7, hook="version", meta="", force=False))
    assert again == first
    assert len(counter.read_text().splitlines()) == 1
    assert installer.dispatch(ip.QueryHook(job_id="job-1", seq=6, hook="version")).state == ip.UNKNOWN


def test_install_is_refused_before_stage(tmp_path):
    cmd = script(tmp_path / "install", f"touch {tmp_path}/ran\n")
    installer = make_installer(make_config(tmp_path, {"install": cmd}))
    with pytest.raises(ProtocolError, match="has not been staged"):
        installer.dispatch(ip.RunHook(job_id="job-1", seq=1, hook="install", meta="", force=False))
    assert not (tmp_path / "ran").exists()


def test_restart_is_refused_before_install_finished_with_exit_0(tmp_path):
    cfg = make_config(tmp_path, {"install": script(tmp_path / "install", "exit 1\n"),
                                 "restart": script(tmp_path / "restart", "exit 0\n")})
    installer = make_installer(cfg)
    restart = ip.RunHook(job_id="job-1", seq=1, hook="restart", meta="", force=False)
    with pytest.raises(ProtocolError, match="restart refused"):
        installer.dispatch(restart)
    download(cfg)
    stage(installer)
    with pytest.raises(ProtocolError, match="restart refused"):
        installer.dispatch(restart)
    assert run_hook(installer, "install", seq=2).state == ip.FAILED
    with pytest.raises(ProtocolError, match="restart refused"):
        installer.dispatch(ip.RunHook(job_id="job-1", seq=3, hook="restart", meta="", force=False))


def test_restart_is_permitted_after_an_installer_restart_and_install_is_not(tmp_path):
    cfg = make_config(tmp_path, {"install": script(tmp_path / "install", "exit 0\n"),
                                 "restart": script(tmp_path / "restart", "exit 0\n")})
    first = make_installer(cfg)
    download(cfg)
    stage(first)
    assert run_hook(first, "install", seq=2).state == ip.DONE
    first.staging.close()

    second = make_installer(cfg)  # the same directories: a restarted installer
    with pytest.raises(ProtocolError, match="already completed"):
        second.dispatch(ip.RunHook(job_id="job-1", seq=3, hook="install", meta="", force=False))
    with pytest.raises(ProtocolError, match="already installed"):
        stage(second, seq=4)
    with pytest.raises(ProtocolError, match="restart refused"):
        second.dispatch(ip.RunHook(job_id="other", seq=5, hook="restart", meta="", force=False))
    assert run_hook(second, "restart", seq=6).state == ip.DONE


def test_corrupt_state_file_is_logged_and_the_installer_starts_clean(tmp_path, caplog):
    cfg = make_config(tmp_path, {"install": script(tmp_path / "install", "exit 0\n")})
    first = make_installer(cfg)
    download(cfg)
    assert stage(first).state == ip.STAGED
    first.staging.close()
    (cfg.service.staging_location / STATE_FILE).write_text('{"v": 1, "jobs": {"../x": ')
    second = make_installer(cfg)
    assert "corrupt" in caplog.text
    with pytest.raises(ProtocolError, match="has not been staged"):
        second.dispatch(ip.RunHook(job_id="job-1", seq=2, hook="install", meta="", force=False))


def test_discard_forgets_the_job_and_deletes_the_staged_file(tmp_path):
    cfg = make_config(tmp_path, {"install": script(tmp_path / "install", "exit 0\n")})
    installer = make_installer(cfg)
    download(cfg)
    stage(installer)
    assert (cfg.service.staging_location / "job-1").exists()
    assert installer.dispatch(ip.Discard(job_id="job-1", seq=5)) == ip.Discarded(job_id="job-1", seq=5)
    assert not (cfg.service.staging_location / "job-1").exists()
    with pytest.raises(ProtocolError, match="has not been staged"):
        installer.dispatch(ip.RunHook(job_id="job-1", seq=6, hook="install", meta="", force=False))


# ----- staging --------------------------------------------------------------
def staged_files(cfg) -> list[str]:
    """Everything in the staging directory but the state record."""
    return sorted(set(os.listdir(cfg.service.staging_location)) - {STATE_FILE})


def test_stage_copies_into_a_root_only_directory_and_verifies_there(tmp_path):
    cfg = make_config(tmp_path, {})
    installer = make_installer(cfg)
    download(cfg)
    status = stage(installer, size=len(PAYLOAD))
    assert (status.state, status.failure) == (ip.STAGED, None)
    staged = cfg.service.staging_location / "job-1"
    assert staged.read_bytes() == PAYLOAD
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600 and staged.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(cfg.service.staging_location.stat().st_mode) == 0o700


def test_stage_detects_sha256_mismatch_and_leaves_no_staged_file(tmp_path):
    cfg = make_config(tmp_path, {})
    installer = make_installer(cfg)
    download(cfg, data=PAYLOAD + b"tampered")
    status = stage(installer)
    assert (status.state, status.failure) == (ip.STAGE_FAILED, "verification_failed")
    assert "sha256" in status.message and PAYLOAD_SHA in status.message
    assert staged_files(cfg) == []


def test_stage_refuses_a_symlink_as_source(tmp_path):
    cfg = make_config(tmp_path, {})
    installer = make_installer(cfg)
    real = tmp_path / "elsewhere"
    real.write_bytes(PAYLOAD)
    (cfg.service.download_dir / "job-1").symlink_to(real)
    status = stage(installer)
    assert (status.state, status.failure) == (ip.STAGE_FAILED, "file_missing")
    assert "symlink" in status.message
    assert staged_files(cfg) == []


def test_stage_of_a_missing_file_fails_file_missing(tmp_path):
    installer = make_installer(make_config(tmp_path, {}))
    status = stage(installer)
    assert (status.state, status.failure) == (ip.STAGE_FAILED, "file_missing")


def test_stage_without_sha256_is_refused_by_the_installers_own_policy(tmp_path):
    cfg = make_config(tmp_path, {})
    download(cfg)
    status = stage(make_installer(cfg), sha256=None)
    assert (status.state, status.failure) == (ip.STAGE_FAILED, "verification_failed")
    assert "require_sha256" in status.message


def test_stage_checks_the_signature_with_the_installers_keys(tmp_path):
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    cfg = make_config(tmp_path, {}, verification=f"public_keys = {tmp_path}/key.pem")
    installer = make_installer(cfg, [verify.load_public_key(pem)])
    download(cfg)
    assert stage(installer, signature=None).failure == "verification_failed"
    wrong = verify.sign(private, "6.6.6", PAYLOAD_SHA, len(PAYLOAD))
    bad = stage(installer, seq=2, signature=wrong)
    assert bad.failure == "verification_failed" and "signature" in bad.message
    good = verify.sign(private, "2.0.0", PAYLOAD_SHA, len(PAYLOAD))
    assert stage(installer, seq=3, signature=good).state == ip.STAGED


def test_a_file_changed_in_the_download_dir_after_stage_does_not_reach_install(tmp_path):
    out = tmp_path / "installed.sha256"
    cmd = script(tmp_path / "install", f"sha256sum \"$4\" | cut -d' ' -f1 > {out}\n")
    cfg = make_config(tmp_path, {"install": cmd})
    installer = make_installer(cfg)
    source = download(cfg)
    assert stage(installer).state == ip.STAGED
    source.write_bytes(b"evil replacement")  # the unprivileged side changes its copy
    assert run_hook(installer, "install", seq=2).state == ip.DONE
    assert out.read_text().strip() == PAYLOAD_SHA


def test_repeated_stage_is_answered_not_copied_again(tmp_path):
    cfg = make_config(tmp_path, {})
    installer = make_installer(cfg)
    source = download(cfg)
    first = stage(installer, seq=9)
    source.unlink()
    assert stage(installer, seq=9) == first
    assert stage(installer, seq=10).failure == "file_missing"
