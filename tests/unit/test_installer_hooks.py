"""Hooks (upparat.installer_proc.hooks) and discard: fixed environment, own
process group, timeout and discard kill the whole group, retries, the trust
check before every run, leftovers found by their marker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from upparat.installer_proc import hooks
from upparat.ipc import installer_protocol as ip
from tests.installer_support import Rig, release
from tests.support import pid_alive, poll_for


def read_pid(path, timeout=10.0) -> int:
    return int(poll_for(lambda: path.exists() and path.read_text().strip(), timeout, what=f"{path}"))


def test_a_hook_runs_with_a_fixed_environment_no_stdin_cwd_root_and_its_own_session(world_tmp):
    out = world_tmp / "seen"
    body = (f'env > {out}.env; pwd > {out}.cwd; cat > {out}.stdin; '
            f'ps -o pid=,sid=,pgid= -p $$ > {out}.ids; echo 1.0')
    rig = Rig(world_tmp, hooks={"version": body})
    try:
        rig.open(release())
        rig.hook("version")
        state = rig.settle()
        assert state.hook.state == ip.DONE and state.hook.output == "1.0"
        env = dict(line.split("=", 1) for line in (world_tmp / "seen.env").read_text().splitlines())
        env.pop("PWD", None), env.pop("SHLVL", None), env.pop("_", None)  # set by the shell itself
        assert set(env) == {"PATH", "LANG", hooks.MARKER}
        assert env["LANG"] == "C.UTF-8" and len(env[hooks.MARKER]) == 32
        assert (world_tmp / "seen.cwd").read_text().strip() == "/"
        assert (world_tmp / "seen.stdin").read_text() == ""
        pid, sid, pgid = (world_tmp / "seen.ids").read_text().split()
        assert pid == sid == pgid
    finally:
        rig.close()


def test_the_argv_is_elapsed_retry_meta_and_exit_3_retries_up_to_max_retries(world_tmp):
    rig = Rig(world_tmp, hooks={"download": f'echo "$@" >> {world_tmp}/argv; exit 3'}, max_retries=2)
    try:
        rig.open(release(meta="the meta"))
        rig.hook("download")
        state = rig.settle()
        assert (state.phase, state.failure, state.hook.state) == (ip.FAILED, "download_hook_failed", ip.GAVE_UP)
        lines = (world_tmp / "argv").read_text().splitlines()
        assert [line.split(" ", 2)[1:] for line in lines] == [["0", "the meta"], ["1", "the meta"],
                                                               ["2", "the meta"]]
    finally:
        rig.close()


def test_a_failing_hook_fails_the_job_with_its_state_and_last_stderr_line(world_tmp):
    rig = Rig(world_tmp, hooks={"version": "echo boom >&2; exit 7"})
    try:
        rig.open(release())
        rig.hook("version")
        state = rig.settle()
        assert (state.phase, state.failure, state.hook.exit_code) == (ip.FAILED, "version_hook_failed", 7)
        assert "boom" in state.message
    finally:
        rig.close()


def test_output_is_bounded_and_cleaned(world_tmp):
    rig = Rig(world_tmp, hooks={"version": "head -c 100000 /dev/zero | tr '\\0' x; echo; printf 'v\\0\\0\\033[31m2\\n'"})
    try:
        rig.open(release())
        rig.hook("version")
        assert rig.settle().hook.output == "v[31m2"
    finally:
        rig.close()


def test_timeout_kills_the_whole_group(world_tmp):
    child = world_tmp / "child"
    rig = Rig(world_tmp, hooks={"install": f"sleep 300 & echo $! > {child}; wait"}, timeout=2)
    try:
        rig.download()
        rig.open(release())
        rig.stage()
        rig.settle()
        rig.hook("install")
        pid = read_pid(child)
        state = rig.settle()
        assert (state.phase, state.failure) == (ip.FAILED, "installation_hook_failed")
        assert "[hooks] timeout" in state.message
        assert not pid_alive(pid)
    finally:
        rig.close()


def test_discard_during_the_install_hook_kills_its_group_and_leaves_nothing_staged(world_tmp):
    child = world_tmp / "child"
    rig = Rig(world_tmp, hooks={"install": f"sleep 300 & echo $! > {child}; wait"})
    try:
        rig.download()
        rig.open(release())
        rig.stage()
        rig.settle()
        rig.hook("install")
        pid = read_pid(child)
        first = rig.discard()
        assert first.phase == ip.INSTALLING and "discarded" in first.message
        pushed = rig.settle()
        assert pushed.phase == ip.DISCARDED
        assert rig.discard().phase == ip.DISCARDED  # the broker's retry
        assert not pid_alive(pid)
        assert rig.staged_files() == []
    finally:
        rig.close()


def test_twenty_discards_in_a_row_leave_nothing_behind(world_tmp):
    rig = Rig(world_tmp, hooks={"install": "sleep 300"})
    try:
        for execution in range(1, 21):
            rig.download(execution=execution)
            assert rig.open(release(), execution=execution).phase == ip.OPENED
            rig.stage(execution=execution)
            if execution % 2:
                rig.settle()
                rig.hook("install", execution=execution)
            rig.discard(execution=execution)
            rig.settle()
            assert rig.discard(execution=execution).phase == ip.DISCARDED
        assert rig.staged_files() == []
        assert rig.installer.state.job is None
        assert os.listdir(rig.layout.download_dir) == []
        assert len(rig.installer.state.history) <= 32
    finally:
        rig.close()


def test_a_hook_re_pointed_after_start_up_is_refused_and_nothing_runs(world_tmp):
    if os.geteuid() != 0:
        pytest.skip("the ownership check applies to root")
    evil_dir = world_tmp / "evil"
    evil_dir.mkdir()
    evil = evil_dir / "payload"
    evil.write_text(f"#!/bin/sh\ntouch {world_tmp}/pwned\n")
    evil.chmod(0o755)
    from tests.support import identities
    ids = identities()
    os.chown(evil_dir, ids.broker_uid, ids.broker_gid)  # a directory the unprivileged user owns
    rig = Rig(world_tmp, hooks={"version": "echo 1"})
    try:
        rig.open(release())
        version = rig.hook_paths["version"]
        version.unlink()
        version.symlink_to(evil)
        rig.hook("version")
        state = rig.settle()
        assert (state.phase, state.failure) == (ip.FAILED, "version_hook_failed")
        assert "refused to run the version hook" in state.message and f"owned by uid {ids.broker_uid}" in state.message
        assert not (world_tmp / "pwned").exists()
    finally:
        rig.close()


def test_kill_marked_kills_only_processes_carrying_the_marker(world_tmp):
    token = "a" * 32
    env = hooks.hook_env(token)
    marked = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    unmarked = subprocess.Popen(["sleep", "300"], env=hooks.hook_env("b" * 32), start_new_session=True)
    try:
        # Until it has exec'd, a child shows its parent's environment (no marker).
        poll_for(lambda: hooks._marked(marked.pid, token) and hooks._marked(unmarked.pid, "b" * 32), 10,
                 what="both sleeps exec'd with their markers")
        # The same group id, but without the marker (a reused id) must survive.
        killed = hooks.kill_marked(unmarked.pid, token)
        assert killed == 1
        assert marked.wait(5) == -signal.SIGKILL
        assert unmarked.poll() is None
    finally:
        for proc in (marked, unmarked):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_the_hook_dies_with_the_thread_that_spawned_it(world_tmp):
    """PR_SET_PDEATHSIG: a process spawning a hook and then dying takes the hook with it."""
    code = """
import time
from pathlib import Path
from upparat.installer_proc import hooks
runner = hooks.HookRunner("version", 0, Path("/bin/sleep"), ("300",), "c" * 32, hooks.Limits(600, 0, 0),
                          as_root=False, on_spawned=lambda pgid: print(pgid, flush=True), on_done=print)
runner.start()
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert pid_alive(pid)
        proc.kill()
        proc.wait(5)
        poll_for(lambda: not pid_alive(pid), 5, what="the hook to die with its parent")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_stop_group_waits_until_every_member_is_gone(world_tmp):
    child = world_tmp / "child"
    token = "d" * 32
    leader = subprocess.Popen(["/bin/sh", "-c", f"trap '' TERM; sleep 300 & echo $! > {child}; wait"],
                              env=hooks.hook_env(token), start_new_session=True)
    pid = read_pid(child)
    started = time.monotonic()

    def wait(seconds):
        try:
            leader.wait(seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    hooks.stop_group(leader.pid, token, wait)
    assert not pid_alive(pid) and leader.poll() is not None
    assert time.monotonic() - started < hooks.KILL_GRACE_S + hooks.GONE_WAIT_S
