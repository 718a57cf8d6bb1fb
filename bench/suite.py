"""The measurements. Every figure is a list of runs; the report takes the
median (and min/max). A warm-up run is made and discarded wherever the first
run differs (bytecode compiled, connections opened, files first read).

Order, one thing at a time (the machine has 2 cores):
  1. per agent, alone: start -> ready (warm-up + N starts), idle memory once
     settled, 1 MiB jobs (latency), 100 MiB jobs (status messages); stopped;
  2. 256 MiB: both agents started and idle, then rounds of
     curl+sha256sum / Upparat 2 / upparat 1.12 in rotating order (round 0
     is the warm-up), each with the memory sampler and CPU accounting, and
     with how many CPUs the machine gave just before and just after it
     (``procfs.parallel_capacity``: a contended run is told from a quiet one);
  3. import costs (see ``bench.imports``).

Before every timed transfer the bench calls sync(2) (no dirty pages from an
earlier run are written back during this one) and waits until the agent is
idle. The page cache is warm on purpose: each source file is written once
and read once before any timing; caches are never dropped (the machine is
shared).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procfs
from bench.agents import REPO, TERMINAL, Agent, AgentFailed, Rig
from bench.sampler import sample as sample_tree

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass
class Plan:
    starts: int = 5  # timed starts per agent (after one warm-up start)
    latency_jobs: int = 7  # 1 MiB jobs per agent (after one warm-up job)
    message_jobs: int = 3  # 100 MiB jobs per agent
    big_rounds: int = 7  # 256 MiB rounds (after one warm-up round)
    big_size: int = 256 * MIB
    message_size: int = 100 * MIB
    latency_size: int = 1 * MIB
    sample_interval: float = 0.05
    job_timeout_base: float = 30.0  # a job fails after base + size / rate seconds
    job_timeout_rate: float = 5 * MIB
    pickup_timeout: float = 15.0  # ... or when it is still QUEUED after this long
    ready_timeout: float = 20.0
    pause: float = 1.0  # between runs, not timed
    cpu_tail: float = 0.5  # CPU accounting continues this long after the final status


@dataclass
class AgentResults:
    label: str
    ready_signal: str
    starts: list[dict] = field(default_factory=list)
    idle: dict | None = None
    idle_before_big: dict | None = None  # the same, re-measured before the 256 MiB rounds
    latency: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    big: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # what stopped a series, with the agent's log tail
    leftovers: list[int] = field(default_factory=list)  # PIDs that had to be killed after a stop

    def failed(self, what: str, exc: Exception) -> None:
        tail = getattr(exc, "log_tail", "")
        self.failures.append(f"{what}: {exc}" + (f"\n--- log tail ---\n{tail}" if tail else ""))


class JobFailed(AgentFailed):
    pass


class Bench:
    def __init__(self, rig: Rig, plan: Plan, workdir: Path, log=print):
        self.rig = rig
        self.plan = plan
        self.workdir = workdir
        self.log = log
        self._seq = 0
        # Job ids are unique in an AWS account; a run never reuses one of an earlier run.
        self._run_token = secrets.token_hex(3)

    # -- building blocks ----------------------------------------------------------
    def _next(self, agent: Agent, tag: str) -> tuple[str, str]:
        self._seq += 1
        short = "v2" if agent.label.startswith("Upparat 2") else "v112"
        return f"upparat_{short}_{tag}_{self._run_token}_{self._seq}", f"2.0.{self._seq}"

    def start_agent(self, agent: Agent) -> dict:
        started = agent.start()
        result = agent.wait_ready(started, self.plan.ready_timeout)
        if not agent.alive():
            raise AgentFailed(f"{agent.label} exited after it was ready", agent.log_tail())
        return result

    def settle_idle(self, agent: Agent, minimum: float = 3.0, maximum: float = 20.0) -> dict:
        """Memory once start-up is over: sampled every 0.5 s until the tree's
        PSS moved less than 256 KiB over 2 s (at least ``minimum`` s)."""
        kinds: dict[int, str] = {}
        began = time.monotonic()
        samples: list[dict] = []
        while True:
            samples.append(sample_tree(agent.pid, kinds))
            elapsed = time.monotonic() - began
            window = [s["pss"] for s in samples[-5:]]
            if elapsed >= minimum and len(window) == 5 and max(window) - min(window) < 256:
                break
            if elapsed >= maximum:
                break
            time.sleep(0.5)
        last = dict(samples[-1])
        last["settled_after_s"] = round(time.monotonic() - began, 1)
        last["settled"] = time.monotonic() - began < maximum
        last["per_process"] = []
        for pid in procfs.counted(agent.pid):
            mem = procfs.memory_kib(pid)
            if mem is not None:
                last["per_process"].append(mem | {"kind": kinds.get(pid) or procfs.process_kind(procfs.cmdline(pid)),
                                                  "threads": procfs.thread_count(pid),
                                                  "extensions": procfs.extension_modules(pid)})
        return last

    def _start_sampler(self, pid: int, out: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "bench.sampler", str(pid), str(self.plan.sample_interval),
                                 str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        line = proc.stdout.readline().strip()
        if line != "sampling":
            proc.wait(5)
            raise RuntimeError(f"memory sampler did not start (said {line!r})")
        return proc

    @staticmethod
    def _stop_sampler(proc: subprocess.Popen, out: Path) -> dict:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        proc.stdout.close()
        data = json.loads(out.read_text())
        out.unlink()
        if data.get("peak") and data.get("first"):
            data["growth_kib"] = data["peak"]["pss"] - data["first"]["pss"]
        return data

    def _quiet(self) -> None:
        os.sync()
        time.sleep(self.plan.pause)

    def _wait_final(self, agent: Agent, job_id: str, created: float, size: int):
        """The update with the final status; fails fast when the agent died or
        left the job QUEUED (both agents take a job within a second)."""
        limit = self.plan.job_timeout_base + size / self.plan.job_timeout_rate
        while True:
            try:
                return self.rig.wiretap.wait_status(agent.thing, job_id, TERMINAL, 1.0)
            except TimeoutError:
                pass
            waited = time.time() - created
            execution = self.rig.emulator.execution(job_id, agent.thing) or {}
            status = execution.get("status")
            problem = None
            if not agent.alive():
                problem = f"{agent.label} exited"
            elif status == "QUEUED" and waited > self.plan.pickup_timeout:
                problem = f"still QUEUED after {waited:.0f} s: {agent.label} did not take it"
            elif waited > limit:
                problem = f"no final status within {limit:.0f} s"
            if problem:
                raise JobFailed(f"job {job_id}: {problem}; emulator says {status} "
                                f"{json.dumps(execution.get('statusDetails') or {})}", agent.log_tail())

    def run_job(self, agent: Agent, name: str, tag: str, *, memory: bool = False) -> dict:
        """One job from creation to its final status, as the cloud sees it."""
        size = self.rig.digest(name)[1]
        job_id, version = self._next(agent, tag)
        document = agent.document(name, version)
        stamp = agent.stamp(version)
        self._quiet()
        sampler = self._start_sampler(agent.pid, self.workdir / f"mem-{job_id}.json") if memory else None
        try:
            cpu_before = procfs.tree_cpu_seconds(agent.pid)
            created = time.time()
            self.rig.emulator.create_job(job_id, document, [agent.thing])
            final = self._wait_final(agent, job_id, created, size)
            time.sleep(self.plan.cpu_tail)
            cpu_after = procfs.tree_cpu_seconds(agent.pid)
        finally:
            mem = self._stop_sampler(sampler, self.workdir / f"mem-{job_id}.json") if sampler else None
        status = final.status()
        updates = self.rig.wiretap.updates(agent.thing, job_id)
        execution = self.rig.emulator.execution(job_id, agent.thing) or {}
        details = execution.get("statusDetails") or {}
        if status != "SUCCEEDED":
            raise JobFailed(f"job {job_id} ended {status} {json.dumps(details)}", agent.log_tail())
        if not stamp.exists():
            raise JobFailed(f"job {job_id} SUCCEEDED but the install hook left no timestamp", agent.log_tail())
        installed_at = float(stamp.read_text().strip())
        states: dict[str, int] = {}
        for update in updates:
            try:
                state = (json.loads(update.payload).get("statusDetails") or {}).get("state", "?")
            except (ValueError, AttributeError):
                state = "?"
            key = f"{update.status()}/{state}"
            states[key] = states.get(key, 0) + 1
        result = {
            "job_id": job_id,
            "to_install_s": installed_at - created,
            "to_final_s": final.t - created,
            "cpu_s": cpu_after - cpu_before,
            "updates": len(updates),
            "update_payload_bytes": sum(len(u.payload) for u in updates),
            "update_wire_bytes": sum(u.wire_bytes for u in updates),
            "update_states": states,
            "emulator_history": len(execution.get("history") or []),
            "final_state": details.get("state"),
            "load": procfs.loadavg_text(),
        }
        if mem is not None:
            result["memory"] = mem
        return result

    def run_curl(self, name: str, size: int) -> dict:
        """``curl -s -o f URL && sha256sum f``, gated on stdin so that the
        sampler watches it from its first instruction; CPU from wait4(2)."""
        url = self.rig.url(name)
        target = self.workdir / "curl.out"
        target.unlink(missing_ok=True)
        self._quiet()
        shell = subprocess.Popen(["sh", "-c", 'read _ && curl -s -o "$1" "$2" && sha256sum "$1"', "sh",
                                  str(target), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out = self.workdir / "mem-curl.json"
        sampler = self._start_sampler(shell.pid, out)
        try:
            began = time.monotonic()
            shell.stdin.write(b"\n")
            shell.stdin.close()
            _, status, usage = os.wait4(shell.pid, 0)
            elapsed = time.monotonic() - began
            shell.returncode = os.waitstatus_to_exitcode(status)
        finally:
            mem = self._stop_sampler(sampler, out)
        printed = shell.stdout.read().decode()
        shell.stdout.close()
        target.unlink(missing_ok=True)
        expected, _ = self.rig.digest(name)
        if shell.returncode != 0 or not printed.startswith(expected):
            raise RuntimeError(f"curl + sha256sum failed (exit {shell.returncode}): {printed!r}")
        return {"to_install_s": elapsed, "cpu_s": usage.ru_utime + usage.ru_stime, "memory": mem,
                "load": procfs.loadavg_text()}

    # -- phases ------------------------------------------------------------------
    def agent_alone(self, agent: Agent, res: AgentResults, files: dict[str, str]) -> None:
        """Start-up series, idle memory, 1 MiB latency, 100 MiB messages; stops the agent.
        An agent that started only in part still gets its first job (so the job
        path is exercised as far as it goes); the first failed job ends the series."""
        plan = self.plan
        try:
            for i in range(plan.starts + 1):
                if agent.alive():
                    res.leftovers += agent.stop()
                    time.sleep(plan.pause)
                one = self.start_agent(agent)
                one["warmup"] = i == 0
                res.starts.append(one)
                self.log(f"  {agent.label} start {i}{' (warm-up)' if i == 0 else ''}: ready {one['ready_s']:.3f} s")
            res.idle = self.settle_idle(agent)
            self.log(f"  {agent.label} idle PSS {res.idle['pss'] / 1024:.1f} MiB {res.idle['by_kind_pss']}")
        except AgentFailed as exc:
            res.failed("start", exc)
            self.log(f"  {exc}")
            if not agent.alive():
                res.leftovers += agent.stop()
                return
        try:
            for series, name, tag, count, warm in (("latency", files["latency"], "lat", plan.latency_jobs, True),
                                                   ("messages", files["messages"], "msg", plan.message_jobs, False)):
                runs = getattr(res, series)
                for i in range(count + (1 if warm else 0)):
                    try:
                        one = self.run_job(agent, name, tag)
                    except AgentFailed as exc:
                        res.failed(series, exc)
                        self.log(f"  {agent.label} {series}: {exc}")
                        return
                    one["warmup"] = warm and i == 0
                    runs.append(one)
                    self.log(f"  {agent.label} {tag} {i}: install hook {one['to_install_s']:.3f} s, "
                             f"final {one['to_final_s']:.3f} s, {one['updates']} updates")
        finally:
            res.leftovers += agent.stop()

    def hash_context(self, name: str) -> dict:
        """CPU seconds to hash the 256 MiB file (warm cache) with coreutils'
        sha256sum and with Python's hashlib (OpenSSL), for reading §2: the
        baseline's hasher and the agents' may differ in speed on this CPU."""
        path = self.rig.files_dir / name
        out = {}
        for key, argv in (("sha256sum", ["sha256sum", str(path)]),
                          ("hashlib", [sys.executable, "-c", "import hashlib, sys\nh = hashlib.sha256()\n"
                                       "with open(sys.argv[1], 'rb') as f:\n"
                                       "    while b := f.read(1 << 20): h.update(b)", str(path)])):
            best = None
            for _ in range(3):
                proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
                _, _, usage = os.wait4(proc.pid, 0)
                proc.returncode = 0
                cpu = usage.ru_utime + usage.ru_stime
                best = cpu if best is None else min(best, cpu)
            out[key] = best
        return out

    def big_rounds(self, agents: list[tuple[Agent, AgentResults]], curl: list[dict], name: str) -> None:
        """256 MiB: curl and every agent that could start, in rotating order."""
        plan = self.plan
        running: list[tuple[Agent, AgentResults]] = []
        for agent, res in agents:
            try:
                self.start_agent(agent)
                res.idle_before_big = self.settle_idle(agent)
                running.append((agent, res))
            except AgentFailed as exc:
                res.failed("256 MiB start", exc)
                res.leftovers += agent.stop()
        try:
            for round_no in range(plan.big_rounds + 1):
                order: list = [None] + running
                shift = round_no % len(order)
                order = order[shift:] + order[:shift]
                for entry in order:
                    capacity = procfs.parallel_capacity()
                    if entry is None:
                        one = self.run_curl(name, plan.big_size)
                        one["warmup"] = round_no == 0
                        one["round"] = round_no
                        curl.append(one)
                        label = "curl + sha256sum"
                    else:
                        agent, res = entry
                        if res.failures and any(f.startswith("256 MiB") for f in res.failures):
                            continue
                        try:
                            one = self.run_job(agent, name, "big", memory=True)
                        except AgentFailed as exc:
                            res.failed("256 MiB", exc)
                            self.log(f"  {agent.label} 256 MiB: {exc}")
                            continue
                        one["warmup"] = round_no == 0
                        one["round"] = round_no
                        res.big.append(one)
                        label = agent.label
                    one["capacity"] = min(capacity, procfs.parallel_capacity())
                    self.log(f"  round {round_no} {label}: {one['to_install_s']:.3f} s, cpu {one['cpu_s']:.2f} s, "
                             f"peak PSS {one['memory']['peak']['pss'] / 1024:.1f} MiB, "
                             f"{one['capacity']:.2f} CPUs free")
        finally:
            for agent, res in running:
                res.leftovers += agent.stop()
