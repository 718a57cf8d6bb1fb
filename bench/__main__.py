"""Upparat's benchmark suite: one command, results in docs/benchmarks.md.

    bench/run                       # everything, ~5 minutes on 2 cores
    bench/run --quick               # fewer repeats, to try the harness
    bench/run --agents 1.12         # only the baselines (curl, upparat 1.12)

Runs on this machine, against a local Mosquitto, the AWS IoT Jobs emulator
and a local file server (the sandbox of ``upparat.devtools``), and compares
Upparat 2 with ``curl -s -o f URL && sha256sum f`` and with upparat 1.12
(installed from PyPI into its own venv under the work directory) in the
same run. Writes docs/benchmarks.md and docs/benchmarks.json (every run's
raw figures). Everything it starts is stopped by PID; the work directory's
run data is removed at the end (the 1.12 venv is kept for the next run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import imports, procfs, report
from bench.agents import REPO, Rig, Upparat2, Upparat112, ensure_upparat112, installed_versions
from bench.suite import MIB, AgentResults, Bench, Plan


def machine() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    os_name = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem_kib / 1024 / 1024, "kernel": platform.release(),
            "os": os_name, "python": platform.python_version(), "user": pwd.getpwuid(os.geteuid()).pw_name}


def tool_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return f"{argv[0]} (version unknown)"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else f"{argv[0]} (version unknown)"


def git_describe() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    branch = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"{branch} {head}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="2,1.12",
                        help="which agents: '2', '1.12' or '2,1.12' (default); curl always runs")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (to try the harness; not for docs)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "upparat-bench"),
                        help="work directory; the upparat 1.12 venv is kept there (default %(default)s)")
    parser.add_argument("--imports-from", action="append", default=[], metavar="GITREF",
                        help="also measure Upparat's entry-point imports in a git archive snapshot of GITREF "
                             "(repeatable); e.g. the branches where a process is being rewritten")
    parser.add_argument("--upparat-src", metavar="GITREF",
                        help="run Upparat 2 from a git archive snapshot of GITREF (through PYTHONPATH) instead of "
                             "this checkout; the rig (sandbox, emulator, file server) stays this checkout's")
    parser.add_argument("--skip-imports", action="store_true")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs) afterwards")
    parser.add_argument("--render", metavar="RESULTS.json",
                        help="measure nothing: write --output again from a saved run (after a change of the report)")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        write_report(results, Path(args.output))
        print(f"bench: wrote {args.output} from {args.render}")
        return 0
    wanted = {a.strip() for a in args.agents.split(",") if a.strip()}
    if not wanted <= {"2", "1.12"}:
        parser.error("--agents takes 2 and/or 1.12")
    if os.path.realpath(sys.prefix) != os.path.realpath(REPO / ".venv"):
        print(f"note: running with {sys.executable}, not the project's .venv", file=sys.stderr)

    plan = Plan()
    if args.quick:
        plan = Plan(starts=2, latency_jobs=2, message_jobs=1, big_rounds=1)
    log = lambda text: print(text, flush=True)  # noqa: E731
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the unprivileged agents must reach the rig below it
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    run_dir.chmod(0o755)
    try:
        return run(args, plan, wanted, workdir, run_dir, log, argv)
    finally:
        if args.keep:
            log(f"bench: kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def write_report(results: dict, output: Path) -> None:
    """The report, keeping the sections of an existing file that it does not write."""
    text = report.render(results) + "\n"
    if output.exists():
        text = report.keep_foreign_sections(text, output.read_text())
    output.write_text(text)


def run(args, plan: Plan, wanted: set[str], workdir: Path, run_dir: Path, log, argv) -> int:
    began = time.time()
    command = "bench/run " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command.strip(), "machine": machine(),
            "load_before": procfs.loadavg_text(), "plan_raw": dataclasses.asdict(plan)}
    meta["plan"] = (f"{plan.starts} starts, {plan.latency_jobs} × 1 MiB, {plan.message_jobs} × 100 MiB per agent "
                    f"(plus one warm-up start and one warm-up 1 MiB job); {plan.big_rounds} rounds of 256 MiB "
                    "(plus one warm-up round), order rotating each round")
    meta["sizes"] = {"big": plan.big_size, "messages": plan.message_size, "latency": plan.latency_size}

    log(f"bench: work directory {run_dir}; load {meta['load_before']}")
    python112 = None
    if "1.12" in wanted:
        log("bench: upparat 1.12 venv")
        python112 = ensure_upparat112(workdir / "venv-upparat-1.12", log)
        pins = installed_versions(python112, ("upparat", "paho-mqtt", "pysm", "backoff"))
        meta_112 = ", ".join(f"{k} {v}" for k, v in pins.items())
    else:
        meta_112 = "not run"
    upparat2_src = None
    upparat2_version = git_describe()
    if args.upparat_src and "2" in wanted:
        upparat2_src = imports.snapshot(REPO, args.upparat_src, run_dir / "upparat2-src")
        upparat2_version = (f"git archive of {args.upparat_src} ({imports.commit_of(REPO, args.upparat_src)}), "
                            f"rig from {upparat2_version}")
    meta["versions"] = {"upparat2": upparat2_version, "upparat112": meta_112,
                        "curl": tool_version(["curl", "--version"]),
                        "mosquitto": tool_version([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"])}

    results: dict = {"meta": meta, "curl": [], "agents": {}, "imports": []}
    rig = Rig(run_dir / "rig")
    bench = Bench(rig, plan, run_dir, log)
    agents: list = []
    try:
        log("bench: starting Mosquitto, the jobs emulator, the file server and the wiretap")
        rig.start()
        files = {"latency": "one-mib.bin", "messages": "hundred-mib.bin", "big": "big.bin"}
        for key, name in files.items():
            path = rig.add_file(name, meta["sizes"][key])
            with open(path, "rb") as fh:  # read once: the page cache is warm for everyone
                while fh.read(8 * MIB):
                    pass
        if "2" in wanted:
            agents.append((Upparat2(rig, upparat2_src), AgentResults(Upparat2.label, Upparat2.ready_signal)))
        if "1.12" in wanted:
            agents.append((Upparat112(rig, python112), AgentResults(Upparat112.label, Upparat112.ready_signal)))
        for agent, res in agents:
            log(f"bench: {agent.label} alone: start-up, idle memory, 1 MiB latency, 100 MiB status messages")
            bench.agent_alone(agent, res, files)
        results["hash_context"] = bench.hash_context(files["big"])
        log(f"bench: hashing 256 MiB takes {results['hash_context']}")
        log("bench: 256 MiB rounds")
        bench.big_rounds(agents, results["curl"], files["big"])
    finally:
        for agent, res in agents:
            res.leftovers += agent.stop()
            if hasattr(agent, "close"):
                agent.close()
        rig.stop()
    results["agents"] = {res.label: dataclasses.asdict(res) for _, res in agents}

    if not args.skip_imports:
        log("bench: import costs")
        snapshots = {}
        for ref in args.imports_from:
            label = f"{ref} ({imports.commit_of(REPO, ref)})"
            snapshots[label] = imports.snapshot(REPO, ref, run_dir / "snapshots" / ref.replace("/", "_"))
        results["imports"] = [dataclasses.asdict(c) for c in
                              imports.measure(str(Path(sys.executable)), run_dir, snapshots=snapshots, log=log)]
        meta["plan_raw"]["import_repeats"] = 3

    meta["load_after"] = procfs.loadavg_text()
    meta["duration_s"] = time.time() - began
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_report(results, output)
    log(f"bench: wrote {output} and {output.with_suffix('.json')} in {meta['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
