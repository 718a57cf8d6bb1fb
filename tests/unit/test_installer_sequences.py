"""Random sequences of valid requests against the real allow-list (hypothesis
stateful testing): whatever the order, the hooks run in the order the
allow-list promises, each once where it promises once, and a discarded
execution runs nothing more. Installer restarts (a crash or a power loss)
are part of the sequences."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import Refused
from upparat.release import HOOK_NAMES
from tests.installer_support import PAYLOAD, Rig, release

EXECUTIONS = (1, 2, 3)
# Mostly the open job's execution (None), sometimes any: most sequences get somewhere.
TARGET = st.one_of(st.none(), st.none(), st.none(), st.sampled_from(EXECUTIONS))


class InstallerSequences(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="upparat-seq-", dir="/tmp"))
        self.base.chmod(0o755)
        calls = self.base / "calls"
        # Every hook logs "<hook> <meta>"; meta names the execution.
        self.rig = Rig(self.base, hooks={name: f'echo "{name} $3" >> {calls}' + ("; echo 1.0" if name == "version"
                                                                              else "")
                                         for name in HOOK_NAMES})
        self.staged: set[int] = set()  # executions whose stage was reported staged
        self.discarded: set[int] = set()
        self.interrupted: dict[int, int] = {}  # execution -> installer restarts while its install ran
        self.seen = 0  # lines of the calls log already checked

    def teardown(self):
        self.rig.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def _target(self, execution):
        if execution is not None:
            return execution
        job = self.rig.installer.state.job
        return job.execution if job is not None else self.fresh

    @property
    def fresh(self) -> int:
        """The next execution never opened (as AWS numbers a job's re-runs)."""
        return max(EXECUTIONS) + 1 + len(self.discarded)

    def _settled(self, reply):
        pushed = self.rig.settle()
        for message in [reply, pushed]:
            if isinstance(message, ip.JobState) and message.phase == ip.STAGED:
                self.staged.add(message.execution)
        return reply

    @rule(execution=TARGET)
    def open_job(self, execution):
        execution = self._target(execution)
        if not (self.rig.layout.download_dir / f"job-1.{execution}").exists() and execution not in self.staged:
            self.rig.download(PAYLOAD, execution=execution)
        self._settled(self.rig.open(release(meta=f"exec-{execution}"), execution=execution))

    @rule(execution=TARGET)
    def stage(self, execution):
        execution = self._target(execution)
        self._settled(self.rig.stage(execution=execution))

    @rule(execution=TARGET, hook=st.sampled_from(HOOK_NAMES), round_=st.integers(0, 1))
    def run_hook(self, execution, hook, round_):
        execution = self._target(execution)
        if hook in ("install", "restart"):
            round_ = 0
        self._settled(self.rig.hook(hook, round_, execution=execution))

    NEXT = {ip.OPENED: "stage", ip.STAGED: "install", ip.INSTALL_INTERRUPTED: "install", ip.INSTALLED: "restart",
            ip.RESTART_INTERRUPTED: "restart", ip.RESTARTED: "ready"}

    @precondition(lambda self: self.rig.installer.state.job is not None)
    @rule(twice=st.booleans())
    def the_natural_next_step(self, twice):
        """What a broker would ask next (sometimes twice: a retried request)."""
        job = self.rig.installer.state.job
        step = self.NEXT.get(job.phase)
        if step is None:
            return
        for _ in range(2 if twice else 1):
            if step == "stage":
                self._settled(self.rig.stage(execution=job.execution))
            else:
                self._settled(self.rig.hook(step, 0, execution=job.execution))

    @rule(execution=TARGET)
    def discard(self, execution):
        execution = self._target(execution)
        reply = self._settled(self.rig.discard(execution=execution))
        assert not isinstance(reply, Refused), reply
        final = self.rig.discard(execution=execution)
        assert final.phase == ip.DISCARDED, final
        self.discarded.add(execution)

    @precondition(lambda self: self.rig.installer.state.job is not None)
    @rule()
    def installer_restarts(self):
        job = self.rig.installer.state.job
        if job.phase == ip.INSTALLING:
            self.interrupted[job.execution] = self.interrupted.get(job.execution, 0) + 1
        self.rig.installer.stop()  # its threads end; the record stays as it was
        self.rig.start()

    @invariant()
    def hooks_ran_in_the_promised_order(self):
        calls = (self.base / "calls").read_text().splitlines() if (self.base / "calls").exists() else []
        per_execution: dict[int, list[str]] = {}
        for line in calls:
            hook, meta = line.split()
            per_execution.setdefault(int(meta.split("-")[1]), []).append(hook)
        for execution, hooks in per_execution.items():
            installs = hooks.count("install")
            assert installs <= 1 + self.interrupted.get(execution, 0), hooks
            assert hooks.count("restart") <= 1, hooks
            if installs:
                assert execution in self.staged, hooks  # install only on a file staged and verified
                first_install = hooks.index("install")
                assert "download" not in hooks[first_install:], hooks
            if "restart" in hooks:
                assert installs and hooks.index("restart") > hooks.index("install"), hooks
            if "ready" in hooks:
                assert "restart" in hooks and hooks.index("ready") > hooks.index("restart"), hooks
        self.seen = len(calls)

    @invariant()
    def at_most_one_open_job_and_nothing_foreign_staged(self):
        job = self.rig.installer.state.job
        staged = self.rig.staged_files()
        assert staged == [] or (job is not None and staged == [f"job-1.{job.execution}"]), (staged, job)
        if job is not None:
            assert job.execution not in self.discarded


TestInstallerSequences = InstallerSequences.TestCase
TestInstallerSequences.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                           suppress_health_check=list(HealthCheck), database=None)
