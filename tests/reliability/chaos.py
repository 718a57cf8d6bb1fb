"""Seeded chaos runner: real jobs, real faults, counted (issue 11, DESIGN §3 promises 5-8).

Each trial starts a fresh sandbox — a real Mosquitto, the AWS IoT Jobs
emulator, the file server, and the real supervisor with its three children —
with a FaultProxy between the device and Mosquitto and between the device and
the file server. It creates one signed job, waits until the job reaches the
trial's *moment* (download, staging, install hook, restart hook or the
confirmation after it), waits a random little while more, and injects the
trial's *fault*:

    kill_broker, kill_fetcher, kill_installer   kill -9 of that child (the supervisor restarts it)
    power_loss        every process of the device at once (supervisor, children, hooks and
                      their children: frozen with SIGSTOP, then SIGKILL), the runtime dir
                      cleared (it is a tmpfs), the "bootloader" step, the supervisor started again
    mosquitto_restart kill -9 of Mosquitto (the cloud side), down for 0-2 s, started again
    mqtt_cut          every MQTT connection of the device reset (RST)
    mqtt_blackhole    MQTT traffic held for 1-6 s, then let through, or reset
    http_cut          every HTTP connection of the device reset
    http_stall        HTTP traffic held for 3-5 s (longer than low_speed_time = 2 s)
    http_down         new HTTP connections refused for 1-4 s
    foreign_file      the object on the server replaced by foreign bytes of the same size,
                      and the HTTP connections cut (a resume would fetch the foreign bytes)

The device's hooks model an A/B device: ``install`` records the sha256 of the
file it reads, copies it and marks the new version as pending; ``restart``
makes the pending version current. After a power loss the runner plays the
bootloader: a pending version becomes current (as an A/B system boots the
slot the install marked), so a power loss is also the reboot a restart hook
would have done.

Per trial it records the final status and state, the sha256 of every file
the install hook read, how often install and restart ran, the time from the
fault to the final status (``recovery_s``), files left in the download,
staging and fetcher state directories once the job is over, and processes
left once the sandbox is stopped. The rules (``check``):

- the job ends, SUCCEEDED with ``complete_ready`` unless the fault makes a
  failure the right answer: ``foreign_file`` before the download finished
  (FAILED, ``verification_failed``);
- the install hook only ever read the published bytes, and what is
  installed is the published file;
- install ran once, or twice when a power loss or a kill of the installer
  came before the installer recorded the hook's end (the hook was running,
  or the broker was still waiting for its result): the documented re-run,
  never more; the same for restart (``restart_interrupted``: the rig's
  power loss keeps the boot id);
- the milestones reported to AWS never go backwards;
- nothing is left behind: no download, no staged copy, no resume record,
  no hook process once the job is over; no process at all after the stop;
  the supervisor still has its three children;
- no traceback in the device's logs: no process died of an unexpected
  exception (a kill is a signal, not an exception).

Command line (one trial at a time; everything a trial starts is stopped by PID)::

    .venv/bin/python -m tests.reliability.chaos --trials 200 --seed 11 --out chaos.jsonl
    .venv/bin/python -m tests.reliability.chaos --seed 11 --only 17 --keep   # one trial again

Exit code 0 when every trial kept every rule, 1 otherwise, 2 bad usage.
Results: one JSON line per trial (``--out``) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from upparat.devtools.sandbox import Sandbox, sha256_of, wait_until

FAULTS = ("kill_broker", "kill_fetcher", "kill_installer", "power_loss", "mosquitto_restart", "mqtt_cut",
          "mqtt_blackhole", "http_cut", "http_stall", "http_down", "foreign_file")
MOMENTS = ("download", "staging", "install", "restart", "confirm")
CHILDREN = ("broker", "fetcher", "installer")
JOB = "job-chaos"
VERSION = "2.0.0"
MILESTONES = ("download_start", "installation_start", "reboot_start", "complete_ready")
TRANSITION_RE = re.compile(r"job (\S+): (\w+) -> (\w+) \(")
JOB_TIMEOUT = 150.0  # s from the fault to the final status before the trial counts as hung
MOMENT_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 20.0

# Hooks of an A/B device; every run records itself ($$ is the hook's pid and process group).
HOOK_SCRIPTS = {
    "version": """#!/bin/sh
echo "$$" >> "{base}/state/hook-pids"
if [ -e "{base}/state/restart-runs" ]; then sleep 0.2; fi
cat "{base}/state/version"
""",
    "download": """#!/bin/sh
echo "$$" >> "{base}/state/hook-pids"
exit 0
""",
    "install": """#!/bin/sh
# argv: elapsed_s retry meta file
set -e
echo "$$" >> "{base}/state/hook-pids"
echo "start $$" >> "{base}/state/install-runs"
sum=$(sha256sum "$4" | cut -d' ' -f1)
echo "$sum" >> "{base}/state/install-seen"
sleep 0.3
cp "$4" "{base}/installed/fw.tmp"
mv "{base}/installed/fw.tmp" "{base}/installed/fw.bin"
echo "$3" > "{base}/state/pending.tmp"
mv "{base}/state/pending.tmp" "{base}/state/pending"
echo "end $$" >> "{base}/state/install-runs"
""",
    "restart": """#!/bin/sh
set -e
echo "$$" >> "{base}/state/hook-pids"
echo "start $$" >> "{base}/state/restart-runs"
sleep 0.3
if [ -e "{base}/state/pending" ]; then mv "{base}/state/pending" "{base}/state/version"; fi
echo "end $$" >> "{base}/state/restart-runs"
""",
    "ready": """#!/bin/sh
echo "$$" >> "{base}/state/hook-pids"
exit 0
""",
}
# Short bounds, so that a trial takes seconds: a stalled transfer is noticed after 2 s.
HOOK_SETTINGS = {"retry_interval": 1, "max_retries": 3, "timeout": 10, "version_confirm_window": 3}
SERVICE_EXTRA = "low_speed_time = 2\n"


@dataclass
class Trial:
    index: int
    seed: int
    fault: str
    moment: str
    size: int
    wait_s: float  # after reaching the moment, before the fault
    outage_s: float  # how long an outage lasts (blackhole, stall, down, Mosquitto down)
    cut_after_blackhole: bool
    # results
    phase_at_fault: str = ""  # the broker's phase (last transition logged) when the fault hit
    install_running_at_fault: bool = False
    restart_running_at_fault: bool = False
    effect: str = ""  # what the fault did (e.g. which pid, how many connections)
    status: str = ""
    state: str = ""
    message: str = ""
    history: list[str] = field(default_factory=list)
    install_runs: int = 0
    restart_runs: int = 0
    install_seen_ok: bool = True  # every file the install hook read had the published sha256
    installed_ok: bool | None = None  # the installed file is the published one (None: nothing installed)
    recovery_s: float = 0.0  # from the start of the fault to the final status
    fault_s: float = 0.0  # how long injecting the fault took (an outage's length; a power loss's reboot)
    duration_s: float = 0.0
    leftover_files: list[str] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)
    children_after: int = 0
    tracebacks: int = 0  # uncaught exceptions (and log.exception) in the device's logs
    violations: list[str] = field(default_factory=list)
    error: str = ""


def plan(seed: int, index: int) -> Trial:
    """The trial's random choices: a function of (seed, index) only."""
    rng = random.Random(f"upparat-chaos/{seed}/{index}")
    # Each block of len(FAULTS) trials has every fault once, in a seeded order (and the
    # moments likewise), so that even a short run covers every kind.
    fault = _shuffled(FAULTS, seed, "fault", index)
    moment = _shuffled(MOMENTS, seed, "moment", index)
    # Staging (the installer takes the file over and hashes it again) lasts a few ms for
    # a small file: trials aimed at it get a file of tens of MiB, so staging lasts long
    # enough to be hit.
    staging = moment == "staging"
    return Trial(index=index, seed=seed, fault=fault, moment=moment,
                 size=rng.randint(24 << 20, 48 << 20) if staging else rng.randint(64 * 1024, 512 * 1024),
                 wait_s=round(rng.uniform(0.0, 0.03 if staging else 0.35), 3),
                 outage_s=round({"mqtt_blackhole": rng.uniform(1, 6), "http_stall": rng.uniform(3, 5),
                                 "http_down": rng.uniform(1, 4),
                                 "mosquitto_restart": rng.uniform(0, 2)}.get(fault, 0.0), 2),
                 cut_after_blackhole=rng.random() < 0.5)


def _shuffled(choices: tuple[str, ...], seed: int, what: str, index: int) -> str:
    block, place = divmod(index, len(choices))
    return random.Random(f"upparat-chaos/{seed}/{what}/{block}").sample(choices, len(choices))[place]


# -- watching the device ----------------------------------------------------------------

class LogWatch:
    """Reads the supervisor's log (every child writes to it) as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.text = ""
        self.phase = ""

    def poll(self) -> str:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return self.text
        if data:
            # only whole lines
            cut = data.rfind(b"\n") + 1
            data = data[:cut]
            self.offset += cut
            chunk = data.decode(errors="replace")
            self.text += chunk
            for match in TRANSITION_RE.finditer(chunk):
                if match.group(1) == JOB:
                    self.phase = match.group(3)
        return self.text


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def runs(path: Path) -> tuple[int, int]:
    """(started, finished) runs of a hook that records 'start PID' / 'end PID'."""
    words = _lines(path)
    return words.count("start"), words.count("end")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (depth first), read from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as fh:
                    kids = [int(p) for p in fh.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


def proc_info(pid: int) -> tuple[str, int, str] | None:
    """(state, process group, command line) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = stat[stat.rfind(")") + 2:].split()
    state, pgid = rest[0], int(rest[2])
    if state == "Z":
        return None
    return state, pgid, cmdline


def strays(base: Path, pids: set[int], groups: set[int]) -> dict[int, str]:
    """Live processes that belong to this trial: a known pid, a member of a hook's
    process group, or anything whose command line names the trial's directory."""
    found = {}
    marker = str(base)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        info = proc_info(pid)
        if info is None:
            continue
        _, pgid, cmdline = info
        if pid in pids or pgid in groups or marker in cmdline:
            found[pid] = cmdline[:160]
    return found


def child_pids(supervisor_pid: int) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as fh:
            kids = [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return found
    for pid in kids:
        info = proc_info(pid)
        if info is None:
            continue
        for name in CHILDREN:
            if f"upparat.{name}_proc" in info[2]:
                found[name] = pid
    return found


# -- one trial ----------------------------------------------------------------------------

class Run:
    def __init__(self, trial: Trial, workdir: Path, keep: bool = False, verbose: bool = False):
        self.t = trial
        self.keep = keep
        self.verbose = verbose
        self.base = Path(tempfile.mkdtemp(prefix=f"chaos-{trial.seed}-{trial.index}-", dir=workdir))
        self.base.chmod(0o755)
        self.box = Sandbox(self.base / "box", hooks=HOOK_SCRIPTS, network_faults=True,
                           hook_settings=HOOK_SETTINGS, service_extra=SERVICE_EXTRA)
        self.log: LogWatch | None = None
        self.pids: set[int] = set()  # every device and rig process seen, to check after the stop
        self.published_sha = ""

    def state_path(self, *parts) -> Path:
        return self.box.path("state", *parts)

    def note_pids(self) -> None:
        box = self.box
        for proc in box.procs:
            self.pids.add(proc.pid)
        if box.supervisor is not None and box.supervisor.alive():
            self.pids.update(descendants(box.supervisor.pid))

    def hook_groups(self) -> set[int]:
        return {int(p) for p in _lines(self.state_path("hook-pids")) if p.isdigit()}

    def run(self) -> Trial:
        t = self.t
        began = time.monotonic()
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - a broken trial is a result, reported with its reason
            t.error = f"{type(exc).__name__}: {exc}"
            t.violations.append(f"trial error: {t.error}")
        finally:
            self._stop()
            t.duration_s = round(time.monotonic() - began, 2)
            if not t.violations and not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)
        return t

    def _run(self) -> None:
        t, box = self.t, self.box
        box.start()
        self.log = LogWatch(box.path("logs", "supervisor.log"))
        wait_until(lambda: len(child_pids(box.supervisor.pid)) == 3, 30, "three children")
        data = random.Random(f"data/{t.seed}/{t.index}").randbytes(t.size)
        box.add_file("fw.bin", data)
        self.published_sha = sha256_of(box.path("files", "fw.bin"))
        # About half a second of download, so that the download moment has a window.
        box.files.faults.rate = t.size * 2
        self.note_pids()
        box.create_job(JOB, box.document("fw.bin", VERSION))
        self._reach_moment()
        fault_at = time.monotonic()
        self._inject()
        t.fault_s = round(time.monotonic() - fault_at, 2)
        final = self._wait_final()
        t.recovery_s = round(time.monotonic() - fault_at, 2)
        t.status = final["status"]
        details = final.get("statusDetails") or {}
        t.state, t.message = details.get("state", ""), details.get("message", "")[:300]
        t.history = [(h.get("statusDetails") or {}).get("state", "") for h in final.get("history", [])]
        self._wait_clean()
        self._collect()
        check(t)

    def _reach_moment(self) -> None:
        t, box = self.t, self.box

        def reached():
            text = self.log.poll()
            if t.moment == "download":
                return box.files.bytes_sent > 0
            if t.moment == "staging":
                return "fetch -> stage" in text
            if t.moment == "install":
                return runs(self.state_path("install-runs"))[0] > 0
            if t.moment == "restart":
                return runs(self.state_path("restart-runs"))[0] > 0
            return "restart -> confirm" in text  # confirm

        wait_until(reached, MOMENT_TIMEOUT, f"the job to reach {t.moment}", interval=0.005)
        if t.wait_s:
            time.sleep(t.wait_s)  # the random moment within the phase is the experiment
        self.log.poll()
        t.phase_at_fault = self.log.phase
        self._note_running(t)

    def _note_running(self, t: Trial) -> None:
        started, finished = runs(self.state_path("install-runs"))
        t.install_running_at_fault = started > finished
        started, finished = runs(self.state_path("restart-runs"))
        t.restart_running_at_fault = started > finished

    def _inject(self) -> None:
        t, box = self.t, self.box
        self.note_pids()
        fault = t.fault
        if fault.startswith("kill_"):
            name = fault[len("kill_"):]
            pid = child_pids(box.supervisor.pid)[name]
            # read the phase again right before the kill: the job moves on while we look
            self._note_running(t)
            os.kill(pid, signal.SIGKILL)
            t.effect = f"killed {name} {pid}"
        elif fault == "power_loss":
            self._power_loss()
        elif fault == "mosquitto_restart":
            old = box.mosquitto.pid
            box.restart_mosquitto(down_for=t.outage_s, hard=True)
            self.note_pids()
            t.effect = f"mosquitto {old} killed, {box.mosquitto.pid} started after {t.outage_s} s"
        elif fault == "mqtt_cut":
            t.effect = f"reset {box.mqtt_proxy.cut()} MQTT connection(s)"
        elif fault == "mqtt_blackhole":
            box.mqtt_proxy.blackhole()
            time.sleep(t.outage_s)  # the outage is the experiment
            box.mqtt_proxy.lift(cut=t.cut_after_blackhole)
            t.effect = f"MQTT held {t.outage_s} s, then {'reset' if t.cut_after_blackhole else 'let through'}"
        elif fault == "http_cut":
            t.effect = f"reset {box.http_proxy.cut()} HTTP connection(s)"
        elif fault == "http_stall":
            box.http_proxy.blackhole()
            time.sleep(t.outage_s)
            box.http_proxy.lift()
            t.effect = f"HTTP held {t.outage_s} s"
        elif fault == "http_down":
            box.http_proxy.refuse(True)
            time.sleep(t.outage_s)
            box.http_proxy.refuse(False)
            t.effect = f"HTTP refused for {t.outage_s} s"
        elif fault == "foreign_file":
            target = box.path("files", "fw.bin")
            foreign = box.path("files", ".fw.foreign")
            foreign.write_bytes(os.urandom(t.size))
            os.utime(foreign, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a new ETag for sure
            os.replace(foreign, target)  # a transfer in progress keeps reading the old inode
            t.effect = f"object replaced; reset {box.http_proxy.cut()} HTTP connection(s)"
        else:
            raise ValueError(f"unknown fault {fault}")
        if self.verbose:
            print(f"  trial {t.index}: {fault} at {t.moment} (phase {t.phase_at_fault}): {t.effect}", flush=True)

    def _power_loss(self) -> None:
        """Every process of the device stops at one instant; then the device boots."""
        t, box = self.t, self.box
        sup = box.supervisor
        frozen: list[int] = []
        # Freeze the tree from the top, again and again until no new process appears
        # (a process may fork while we look), then kill everything frozen.
        for _ in range(20):
            tree = [sup.pid] + descendants(sup.pid)
            new = [p for p in tree if p not in frozen]
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            frozen += new
            if not new:
                break
        self._note_running(t)
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.update(frozen)
        sup.popen.wait(10)
        wait_until(lambda: not any(proc_info(p) for p in frozen), 10, "every process of the device to be gone")
        t.effect = f"killed {len(frozen)} processes"
        # The reboot: /run is a tmpfs, so the runtime directory is empty; the bootloader
        # starts the slot the install marked as pending.
        shutil.rmtree(box.path("run"), ignore_errors=True)
        if self.state_path("pending").exists():
            os.replace(self.state_path("pending"), self.state_path("version"))
            t.effect += "; booted the pending version"
        box.start_supervisor()
        self.note_pids()

    def _wait_final(self) -> dict:
        box = self.box
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            self.note_pids()
            try:
                return box.wait_for_job(JOB, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the job did not end within {JOB_TIMEOUT:.0f} s after the fault; "
                                       f"last: {box.execution(JOB)}") from None

    def leftovers(self) -> list[str]:
        box = self.box
        left = []
        for directory, allowed in ((box.path("dl", "upparat"), set()), (box.path("staging"), {"state.json"}),
                                   (box.path("state-dirs", "fetcher"), set())):
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            left += [f"{directory.relative_to(box.base)}/{n}" for n in names if n not in allowed]
        groups = self.hook_groups()
        for pid, cmdline in strays(self.base, set(), groups).items():
            if "hooks/" in cmdline or (proc_info(pid) or ("", 0, ""))[1] in groups:
                left.append(f"hook process {pid}: {cmdline}")
        return left

    def _wait_clean(self) -> None:
        """Once the job is over, its files go and its hooks end, within a bound."""
        try:
            wait_until(lambda: not self.leftovers() and "job job-chaos: done" in self.log.poll()
                       and len(child_pids(self.box.supervisor.pid)) == 3,
                       CLEANUP_TIMEOUT, "the job's files and processes to be gone, three children", interval=0.1)
        except TimeoutError:
            pass  # recorded by _collect
        self.t.leftover_files = self.leftovers()

    def _collect(self) -> None:
        t, box = self.t, self.box
        t.install_runs = runs(self.state_path("install-runs"))[0]
        t.restart_runs = runs(self.state_path("restart-runs"))[0]
        seen = _lines(self.state_path("install-seen"))
        t.install_seen_ok = all(s == self.published_sha for s in seen)
        installed = box.path("installed", "fw.bin")
        t.installed_ok = None if not installed.exists() else sha256_of(installed) == self.published_sha
        t.children_after = len(child_pids(box.supervisor.pid)) if box.supervisor.alive() else 0
        t.tracebacks = box.logs().count("Traceback (most recent call last)")

    def _stop(self) -> None:
        """Stop everything this trial started, by PID; whatever outlives that is recorded and killed."""
        if self.box.supervisor is not None:
            self.note_pids()
        try:
            self.box.stop()
        except Exception as exc:  # noqa: BLE001
            self.t.violations.append(f"sandbox stop failed: {exc}")
        groups = self.hook_groups()
        try:
            wait_until(lambda: not strays(self.base, self.pids, groups), 10, "every process of the trial to end")
        except TimeoutError:
            pass
        left = strays(self.base, self.pids, groups)
        for pid, cmdline in left.items():
            self.t.leftover_processes.append(f"{pid}: {cmdline}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            self.t.violations.append(f"{len(left)} process(es) outlived the stop")


# -- the rules ------------------------------------------------------------------------------

def expected_outcomes(t: Trial) -> set[tuple[str, str]]:
    ok = {("SUCCEEDED", "complete_ready")}
    if t.fault == "foreign_file" and t.phase_at_fault in ("", "describe", "sync", "open", "version",
                                                          "download_hook", "fetch"):
        # The object changed under a running download: the fetcher may still have had every
        # original byte (then it succeeds), else it must refuse the foreign ones.
        ok.add(("FAILED", "verification_failed"))
    return ok


def check(t: Trial) -> None:
    v = t.violations
    if (t.status, t.state) not in expected_outcomes(t):
        v.append(f"ended {t.status} {t.state} ({t.message}); expected one of {sorted(expected_outcomes(t))}")
    if not t.install_seen_ok:
        v.append("the install hook read bytes other than the published file")
    if t.installed_ok is False:
        v.append("the installed file is not the published file")
    if t.status == "SUCCEEDED" and t.installed_ok is not True:
        v.append("SUCCEEDED without the published file installed")
    # The installer runs a hook again when it died before it recorded the hook's end: the
    # hook was running at the fault, or had just ended and the broker had not heard (it was
    # still in that hook's phase). A power loss here keeps the boot id: the same rule.
    def rerun_allowed(hook: str, running: bool) -> bool:
        return t.fault in ("power_loss", "kill_installer") and (running or t.phase_at_fault == hook)

    rerun_install = rerun_allowed("install", t.install_running_at_fault)
    allowed_runs = {1, 2} if rerun_install else {1}
    if t.status == "FAILED":
        allowed_runs |= {0}
    if t.install_runs not in allowed_runs:
        v.append(f"install ran {t.install_runs} times (allowed {sorted(allowed_runs)})")
    restart_rerun = rerun_allowed("restart", t.restart_running_at_fault)
    if t.restart_runs > (2 if restart_rerun else 1):
        v.append(f"restart ran {t.restart_runs} times (allowed at most {2 if restart_rerun else 1})")
    ranks = [MILESTONES.index(s) for s in t.history if s in MILESTONES]
    if ranks != sorted(ranks):
        v.append(f"the reported milestones went backwards: {t.history}")
    if t.leftover_files:
        v.append(f"left behind after the job: {t.leftover_files}")
    if t.children_after != 3:
        v.append(f"{t.children_after} children running after the job (expected 3)")
    if t.tracebacks:
        v.append(f"{t.tracebacks} traceback(s) in the device's logs: a process died of, or logged, an unexpected "
                 "exception")


# -- many trials --------------------------------------------------------------------------

def run_trials(trials: int, seed: int, only: list[int] | None = None, out: Path | None = None,
               workdir: Path | None = None, keep: bool = False, verbose: bool = False,
               progress=print, stop: threading.Event | None = None) -> list[Trial]:
    """Run the trials one after the other; ``stop`` set ends the run after the current trial."""
    workdir = Path(workdir or tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    indexes = only if only else list(range(trials))
    results = []
    sink = open(out, "a") if out else None
    try:
        for index in indexes:
            if stop is not None and stop.is_set():
                break
            t = Run(plan(seed, index), workdir, keep=keep, verbose=verbose).run()
            results.append(t)
            if sink:
                sink.write(json.dumps(asdict(t), sort_keys=True) + "\n")
                sink.flush()
            if progress:
                mark = "ok " if not t.violations else "BAD"
                progress(f"[{mark}] trial {t.index:4d} {t.fault:17s} at {t.moment:8s} (phase {t.phase_at_fault or '-':13s})"
                         f" -> {t.status} {t.state}, install x{t.install_runs}, recovered in {t.recovery_s:.1f} s"
                         + ("" if not t.violations else "\n      " + "\n      ".join(t.violations)))
    finally:
        if sink:
            sink.close()
    return results


def summary(results: list[Trial]) -> dict:
    by_fault = collections.Counter(t.fault for t in results)
    by_moment = collections.Counter(t.moment for t in results)
    by_phase = collections.Counter(t.phase_at_fault or "-" for t in results)
    outcomes = collections.Counter(f"{t.status} {t.state}" for t in results)
    recovery = sorted(t.recovery_s for t in results if t.status)
    installs = collections.Counter(t.install_runs for t in results)
    per_fault = {}
    for fault in sorted(by_fault):
        times = [t.recovery_s for t in results if t.fault == fault and t.status]
        per_fault[fault] = {"trials": by_fault[fault],
                            "outcomes": dict(collections.Counter(f"{t.status} {t.state}" for t in results
                                                                 if t.fault == fault)),
                            "recovery_median_s": round(statistics.median(times), 2) if times else None,
                            "recovery_max_s": max(times) if times else None,
                            "fault_median_s": round(statistics.median(t.fault_s for t in results
                                                                      if t.fault == fault), 2)}
    return {
        "trials": len(results),
        "violations": sum(1 for t in results if t.violations),
        "by_fault": dict(sorted(by_fault.items())),
        "by_moment": dict(sorted(by_moment.items())),
        "by_phase_at_fault": dict(sorted(by_phase.items())),
        "outcomes": dict(outcomes),
        "install_runs": {str(k): v for k, v in sorted(installs.items())},
        "install_reruns_after_power_loss_or_installer_kill": sum(1 for t in results if t.install_runs == 2),
        "restart_reruns_after_power_loss_or_installer_kill": sum(1 for t in results if t.restart_runs == 2),
        "recovery_median_s": round(statistics.median(recovery), 2) if recovery else None,
        "recovery_max_s": max(recovery) if recovery else None,
        "trial_median_s": round(statistics.median(t.duration_s for t in results), 2) if results else None,
        "leftover_files": sum(len(t.leftover_files) for t in results),
        "leftover_processes": sum(len(t.leftover_processes) for t in results),
        "tracebacks": sum(t.tracebacks for t in results),
        "per_fault": per_fault,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--only", type=int, action="append", metavar="INDEX",
                        help="run only this trial of the seed (repeatable): reproduces it")
    parser.add_argument("--out", type=Path, help="append one JSON line per trial to this file")
    parser.add_argument("--workdir", type=Path, help="where trial directories go (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every trial's directory (failed ones are kept anyway)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    # The rig's own warnings (the emulator reconnecting after a Mosquitto restart) are expected here.
    logging.getLogger("upparat.devtools").setLevel(logging.ERROR)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    # SIGTERM or SIGINT (also ignored SIGINT: a background job's) ends the run after the
    # current trial, which stops everything it started.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    began = time.monotonic()
    results = run_trials(args.trials, args.seed, args.only, args.out, args.workdir, args.keep, args.verbose,
                         stop=stop)
    figures = summary(results)
    figures["wall_s"] = round(time.monotonic() - began, 1)
    if stop.is_set():
        figures["stopped_early"] = True
    print("chaos figures: " + json.dumps(figures, indent=1))
    return 1 if figures["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
