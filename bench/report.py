"""docs/benchmarks.md from one run's results (a plain dict, also saved as JSON).

Figures are medians over the timed runs (warm-ups excluded) with min and
max; ratios are taken between medians of the same run. An agent without
results shows why (for Upparat 2 before its processes are integrated:
"pending integration" and the first error).
"""

from __future__ import annotations

import re
import statistics

MIB = 1024 * 1024
GIB = 1024 * MIB
# Every "## " heading render() can write; any other section of an existing
# docs/benchmarks.md (e.g. "## Download", written by bench/fetch_speed.py on
# the fetcher branch) is kept, after these.
OWN_SECTIONS = ("This run", "Targets", "1. 256 MiB: job created → install hook starts",
                "2. CPU seconds per GiB, all processes together", "3. Memory: total PSS of all the agent's processes",
                "4. Status messages for a 100 MiB job", "5. Latency", "Where the memory goes",
                "What did not run")
V2 = "Upparat 2"
V112 = "upparat 1.12"
CURL = "curl + sha256sum"


def timed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not r.get("warmup")]


def stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(st: dict | None, unit: str = "s", digits: int = 3, scale: float = 1.0) -> str:
    if st is None:
        return "–"
    m, lo, hi = (st[k] / scale for k in ("median", "min", "max"))
    unit = f" {unit}" if unit else ""
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f}, n={st['n']})"


def ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or not b["median"]:
        return "–"
    value = a["median"] / b["median"]
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def paired_speed(results: dict, label: str) -> str:
    """Median (min–max) over rounds of baseline time / agent time within one
    round: runs of one round are adjacent in time, so load that drifts over
    the run affects both sides of each ratio alike."""
    curl = {r["round"]: r["to_install_s"] for r in timed(results["curl"]) if "round" in r}
    agent = {r["round"]: r["to_install_s"] for r in timed(results["agents"].get(label, {}).get("big", []))
             if "round" in r}
    values = [curl[k] / agent[k] for k in curl if k in agent and agent[k]]
    st = stats(values)
    return "–" if st is None else f"{st['median']:.2f}× ({st['min']:.2f}–{st['max']:.2f})"


FREE = 1.8  # CPUs free (of 2) from which a run counts as run on a quiet machine


def capacity_lines(results: dict, labels: list[str]) -> list[str]:
    """How many CPUs the machine gave around each 256 MiB run, and each
    side's median time split by that (nothing when the run predates the probe)."""
    lines = []
    curl_runs = timed(results["curl"])
    if not any("capacity" in r for r in curl_runs):
        return lines
    for who in [CURL] + labels:
        runs = curl_runs if who == CURL else timed(results["agents"].get(who, {}).get("big", []))
        runs = [r for r in runs if r.get("capacity") is not None]
        if not runs:
            continue
        free = stats([r["capacity"] for r in runs])
        quiet = stats([r["to_install_s"] for r in runs if r["capacity"] >= FREE])
        busy = stats([r["to_install_s"] for r in runs if r["capacity"] < FREE])
        lines.append(f"| {who} | {free['median']:.2f} ({free['min']:.2f}–{free['max']:.2f}) | "
                     f"{fmt(quiet, 's', 3) if quiet else '–'} | {fmt(busy, 's', 3) if busy else '–'} |")
    return lines


def why_missing(agent: dict, series: str) -> str:
    """Text for a cell without figures: what stopped the series."""
    prefixes = {"starts": ("start",), "idle": ("start",), "latency": ("start", "latency"),
                "messages": ("start", "messages"), "big": ("256 MiB",)}[series]
    for failure in agent["failures"]:
        if failure.startswith(prefixes):
            # "<series>: <agent>: <what> (<figures>)": the what is enough here; the
            # whole line is under "What did not run".
            line = failure.splitlines()[0]
            text = line.split(": ", 1)[-1]
            text = text.removeprefix(agent["label"] + ": ").split(" (", 1)[0].split("; ", 1)[0]
            missing = re.search(r"missing: ([^)]*)", line)
            if missing and missing.group(1) not in text:
                text += f" ({missing.group(1)} not running)"
            text = text if len(text) <= 120 else text[:117] + "..."
            return ("pending integration: " if agent["label"] == V2 else "failed: ") + text.replace("|", "\\|")
    return "not run"


def series_stats(results: dict, who: str, series: str, key: str, scale: float = 1.0) -> dict | None:
    runs = results["curl"] if who == CURL else results["agents"].get(who, {}).get(series, [])
    st = stats([r[key] * scale if r.get(key) is not None else None for r in timed(runs)])
    return st


def mem_stat(runs: list[dict], path: tuple[str, ...]) -> dict | None:
    values = []
    for run in timed(runs):
        node = run
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        values.append(node)
    return stats(values)


def target_row(text: str, source: str, figure: str, met: bool | None, pending: str | None) -> str:
    status = "**pending integration**" if met is None else ("met" if met else "**missed**")
    return f"| {text} | {source} | {figure if met is not None else (pending or '–')} | {status} |"


def render(results: dict) -> str:
    meta = results["meta"]
    agents = results["agents"]
    v2 = agents.get(V2)
    v112 = agents.get(V112)
    out: list[str] = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("Written by `bench/run` (see `bench/__main__.py`); do not edit by hand. A benchmark is not a test:")
    w("nothing here is asserted in `tests/`. Figures are medians of the timed runs (warm-ups excluded),")
    w("with (min–max, n); every ratio compares medians measured **in this same run**.")
    w("")
    w("Run it from the repository root after `scripts/bootstrap` (as root, as on a device: the broker and the "
      "fetcher then run as their own users): `bench/run` (a few minutes; `--help` for the options, e.g. "
      "`--upparat-src GITREF` to measure another branch's Upparat 2 with this rig).")
    w("")
    w("## This run")
    w("")
    m = meta["machine"]
    w(f"- Date: {meta['date']}; the whole run took {meta['duration_s']:.0f} s.")
    w(f"- Command: `{meta['command']}`")
    w(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, kernel {m['kernel']}, "
      f"{m['os']}; Python {m['python']}; running as {m['user']}.")
    loads = [float(r["load"].split()[0]) for r in results["curl"] + [
        run for a in agents.values() for key in ("latency", "messages", "big") for run in a.get(key, [])]
        if r.get("load")]
    during = f", 1-min load {min(loads):.2f}–{max(loads):.2f} at the end of the runs" if loads else ""
    w(f"- Load average (1, 5, 15 min): {meta['load_before']} before, {meta['load_after']} after{during}; the "
      "machine is shared with other work, so figures move between runs: compare ratios, not absolute times.")
    w(f"- Under test: Upparat 2 at `{meta['versions']['upparat2']}`; upparat 1.12 from PyPI in its own venv "
      f"({meta['versions']['upparat112']}); {meta['versions']['curl']}; {meta['versions']['mosquitto']}.")
    w(f"- Plan: {meta['plan']}.")
    w("- Page cache: warm. Each source file is written once and read once before any timing; caches are never "
      "dropped (shared machine). `sync` runs before every timed transfer so no earlier run's dirty pages are "
      "written back during it. The file server runs in its own process; the emulator, the wiretap and the bench in "
      "another; all over loopback.")
    w("")

    # ------------------------------------------------------------------ targets
    w("## Targets")
    w("")
    w("| target | from | figure | status |")
    w("|---|---|---|---|")
    curl_big = series_stats(results, CURL, "big", "to_install_s")
    v2_big = series_stats(results, V2, "big", "to_install_s")
    speed = curl_big["median"] / v2_big["median"] if curl_big and v2_big else None
    w(target_row("256 MiB, job start → install hook, ≥ 1.2× the speed of `curl -o && sha256sum`", "issue 8",
                 f"{speed:.2f}× (curl {curl_big['median']:.3f} s / Upparat 2 {v2_big['median']:.3f} s)" if speed else "",
                 None if speed is None else speed >= 1.2, v2 and why_missing(v2, "big")))
    lat = series_stats(results, V2, "latency", "to_final_s")
    w(target_row("1 MiB job, instant hooks, created → SUCCEEDED, median ≤ 0.25 s", "issue 6",
                 f"{lat['median']:.3f} s" if lat else "", None if lat is None else lat["median"] <= 0.25,
                 v2 and why_missing(v2, "latency")))
    idle = v2.get("idle") if v2 else None
    w(target_row("idle total PSS of the four processes ≤ 40 MiB, Sentry off", "issue 10",
                 f"{idle['pss'] / 1024:.1f} MiB" if idle else "", None if idle is None else idle["pss"] <= 40 * 1024,
                 v2 and why_missing(v2, "idle")))
    growth = mem_stat(v2["big"], ("memory", "growth_kib")) if v2 else None
    w(target_row("peak PSS during the 256 MiB job ≤ idle + 16 MiB (judged on the worst run)", "issue 10",
                 f"+{growth['max'] / 1024:.1f} MiB worst, +{growth['median'] / 1024:.1f} MiB median" if growth else "",
                 None if growth is None else growth["max"] <= 16 * 1024, v2 and why_missing(v2, "big")))
    w("")

    # ------------------------------------------------------------------ 1. speed
    w("## 1. 256 MiB: job created → install hook starts")
    w("")
    w("Agents: from `create_job` in the emulator to the first line of the install hook (`date +%s.%N`). "
      "Baseline: `curl -s -o f URL && sha256sum f` against the same file server and URL kind. "
      "Speed ratio = baseline time / agent time (above 1: faster than the baseline).")
    w("")
    w(f"| who | time | speed vs {CURL} | same, per round | speed vs {V112} |")
    w("|---|---|---|---|---|")
    big_112 = series_stats(results, V112, "big", "to_install_s")
    w(f"| {CURL} | {fmt(curl_big)} | 1 | – | {ratio(big_112, curl_big)} |")
    for label, st in ((V2, v2_big), (V112, big_112)):
        if label not in agents:
            continue
        cell = fmt(st) if st else why_missing(agents[label], "big")
        w(f"| {label} | {cell} | {ratio(curl_big, st)} | {paired_speed(results, label)} | "
          f"{ratio(big_112, st) if label != V112 else '1'} |")
    w("")
    w("`same, per round`: the median (min–max) of the ratio taken within each round, where the runs are "
      "adjacent in time; the target is judged on the ratio of the medians.")
    w("")
    rows = capacity_lines(results, [label for label in (V2, V112) if label in agents])
    if rows:
        w(f"CPUs free around each run (`bench.procfs.parallel_capacity` just before and just after it, the lower "
          f"kept: 2 when both CPUs are free, nearer 1 when the machine runs only one at a time), and the times "
          f"split at {FREE} CPUs free. Upparat's download keeps both CPUs busy (file server, download, hash "
          "thread), curl mostly one. Reported to tell a run on a contended machine from one on a quiet machine; "
          "not used to judge the target.")
        w("")
        w(f"| who | CPUs free, median (min–max) | time, ≥ {FREE} free | time, < {FREE} free |")
        w("|---|---|---|---|")
        for row in rows:
            w(row)
        w("")

    # ------------------------------------------------------------------ 2. cpu
    w("## 2. CPU seconds per GiB, all processes together")
    w("")
    w("Agents: utime+stime of every process of the agent's tree (including waited-for children: hooks) from "
      "just before job creation to 0.5 s after the final status, from /proc/PID/stat. Baseline: "
      "getrusage of the `sh -c 'curl … && sha256sum …'` wrapper (curl, sha256sum, sh). Same 256 MiB runs as §1.")
    w("")
    w(f"| who | CPU s/GiB | × {CURL} |")
    w("|---|---|---|")
    per_gib = GIB / results["meta"]["sizes"]["big"]
    curl_cpu = series_stats(results, CURL, "big", "cpu_s", per_gib)
    w(f"| {CURL} | {fmt(curl_cpu, 's', 2)} | 1 |")
    for label in (V2, V112):
        if label in agents:
            st = series_stats(results, label, "big", "cpu_s", per_gib)
            w(f"| {label} | {fmt(st, 's', 2) if st else why_missing(agents[label], 'big')} | {ratio(st, curl_cpu)} |")
    ctx = results.get("hash_context")
    if ctx:
        w("")
        w(f"For scale: hashing the same 256 MiB from the page cache takes {ctx['sha256sum']:.2f} s of CPU with "
          f"coreutils' `sha256sum` and {ctx['hashlib']:.2f} s with Python's `hashlib` (OpenSSL) on this CPU "
          "(best of 3), so part of any gap to the baseline is the hasher, not the transfer.")
    w("")

    # ------------------------------------------------------------------ 3. memory
    w("## 3. Memory: total PSS of all the agent's processes")
    w("")
    w("PSS from /proc/PID/smaps_rollup summed over the agent's process tree. Idle: after the last start, sampled "
      "every 0.5 s until it moved < 256 KiB over 2 s. Peak: a sampler process reads the tree every "
      f"{meta['plan_raw']['sample_interval'] * 1000:.0f} ms during each 256 MiB job; growth = peak − its first "
      "sample (just before the job was created). PSS splits shared pages among all processes mapping them, "
      "including the bench's own Python processes, so a process's PSS here is a little lower than on a device "
      "running the agent alone; USS (private pages) is the floor.")
    w("")
    w(f"| who | idle PSS | idle USS | idle RSS | peak PSS during 256 MiB | growth | PSS × {V112} (idle / peak) |")
    w("|---|---|---|---|---|---|---|")
    idle_112 = v112.get("idle") if v112 else None
    peak_112 = mem_stat(v112["big"], ("memory", "peak", "pss")) if v112 else None
    for label in (V2, V112):
        if label not in agents:
            continue
        a = agents[label]
        i = a.get("idle")
        peak = mem_stat(a["big"], ("memory", "peak", "pss"))
        grow = mem_stat(a["big"], ("memory", "growth_kib"))
        idle_cells = (f"{i['pss'] / 1024:.1f} MiB | {i['uss'] / 1024:.1f} MiB | {i['rss'] / 1024:.1f} MiB"
                      if i else f"{why_missing(a, 'idle')} | – | –")
        rat_idle = f"{i['pss'] / idle_112['pss']:.2f}×" if i and idle_112 else "–"
        w(f"| {label} | {idle_cells} | {fmt(peak, 'MiB', 1, 1024) if peak else why_missing(a, 'big')} | "
          f"{fmt(grow, 'MiB', 1, 1024)} | {rat_idle} / {ratio(peak, peak_112)} |")
    curl_peak = mem_stat(results["curl"], ("memory", "peak", "pss"))
    w(f"| {CURL} (for scale) | – | – | – | {fmt(curl_peak, 'MiB', 1, 1024)} | – | – |")
    w("")
    rows = [(label, p) for label in (V2, V112) if agents.get(label, {}).get("idle")
            for p in agents[label]["idle"].get("per_process", [])]
    if rows:
        w("Idle, per process. `extension modules` are read from the process's own /proc/PID/maps: what it has "
          "imported that carries native code (a package by its name, a standard-library module by its own).")
        w("")
        w("| agent | process | PSS | of which anonymous | USS | threads | extension modules |")
        w("|---|---|---|---|---|---|---|")
        for label, p in rows:
            w(f"| {label} | `{p['kind']}` | {p['pss'] / 1024:.1f} MiB | {p.get('pss_anon', 0) / 1024:.1f} MiB | "
              f"{p['uss'] / 1024:.1f} MiB | {p['threads']} | {', '.join(p['extensions']) or '–'} |")
        w("")

    # ------------------------------------------------------------------ 4. messages
    w("## 4. Status messages for a 100 MiB job")
    w("")
    w("UpdateJobExecution publishes (`$aws/things/<thing>/jobs/<job>/update`) counted by a subscriber on the cloud "
      "side, from creation to the final status. Bytes: payload, and the MQTT PUBLISH packet that carried it "
      "(fixed header, topic, packet id, payload; as received by the subscriber).")
    w("")
    w(f"| who | messages | payload bytes | packet bytes | × {V112} (messages / bytes) |")
    w("|---|---|---|---|---|")
    msg_112 = series_stats(results, V112, "messages", "updates")
    wire_112 = series_stats(results, V112, "messages", "update_wire_bytes")
    for label in (V2, V112):
        if label not in agents:
            continue
        n = series_stats(results, label, "messages", "updates")
        pb = series_stats(results, label, "messages", "update_payload_bytes")
        wb = series_stats(results, label, "messages", "update_wire_bytes")
        if n is None:
            w(f"| {label} | {why_missing(agents[label], 'messages')} | – | – | – |")
            continue
        w(f"| {label} | {fmt(n, '', 0)} | {fmt(pb, '', 0)} | {fmt(wb, '', 0)} | "
          f"{ratio(n, msg_112)} / {ratio(wb, wire_112)} |")
    w("")
    for label in (V2, V112):
        runs = timed(agents.get(label, {}).get("messages", []))
        if runs:
            states = ", ".join(f"{k} ×{v}" for k, v in runs[-1]["update_states"].items())
            w(f"- {label}, one run: {states}.")
    w("")

    # ------------------------------------------------------------------ 5. latency
    w("## 5. Latency")
    w("")
    w("1 MiB job, instant hooks: creation → install hook starts, and creation → the SUCCEEDED update arrives at "
      "the cloud side. Start → ready: from spawning the agent until it is connected and subscribed (its first jobs "
      "request on MQTT) and, for Upparat 2, all children are up (`READY=1` on a NOTIFY_SOCKET the bench listens "
      "on; ready is the later of the two). A start counts only if every process of the agent still runs 1 s "
      "later. Warm-up: one start and one job discarded.")
    w("")
    w(f"| who | created → install hook | created → SUCCEEDED | start → ready | start → READY=1 | × {V112} (SUCCEEDED / ready) |")
    w("|---|---|---|---|---|---|")
    suc_112 = series_stats(results, V112, "latency", "to_final_s")
    rdy_112 = series_stats(results, V112, "starts", "ready_s")
    for label in (V2, V112):
        if label not in agents:
            continue
        a = agents[label]
        inst = series_stats(results, label, "latency", "to_install_s")
        suc = series_stats(results, label, "latency", "to_final_s")
        rdy = series_stats(results, label, "starts", "ready_s")
        note = series_stats(results, label, "starts", "notify_ready_s")
        w(f"| {label} | {fmt(inst) if inst else why_missing(a, 'latency')} | {fmt(suc) if suc else '–'} | "
          f"{fmt(rdy) if rdy else why_missing(a, 'starts')} | {fmt(note) if note else '–'} | "
          f"{ratio(suc, suc_112)} / {ratio(rdy, rdy_112)} |")
    w("")

    # ------------------------------------------------------------------ imports
    w("## Where the memory goes")
    w("")
    w("Each line: a fresh interpreter of the Upparat venv runs one import and reads its own smaps_rollup "
      f"(median of {meta['plan_raw'].get('import_repeats', 3)} runs). Cost = its PSS − the PSS of a bare "
      "interpreter measured the same way (the costs of two imports overlap where they share modules: they do "
      "not add up). `loads` names notable modules the import pulled in.")
    w("")
    imports_ = results["imports"]
    bare = next((c for c in imports_ if c["label"] == "bare interpreter" and c["pss_kib"]), None)

    def cost(c: dict) -> str:
        return f"+{(c['pss_kib'] - bare['pss_kib']) / 1024:.1f} MiB" if bare else "–"

    libraries = [c for c in imports_ if not c["label"].startswith("upparat.")]
    entries = [c for c in imports_ if c["label"].startswith("upparat.")]
    if libraries:
        w("| import | PSS | cost over bare | USS | modules | loads |")
        w("|---|---|---|---|---|---|")
        for c in libraries:
            if c["error"]:
                w(f"| `{c['label']}` | fails: {c['error'][:120]} | – | – | – | – |")
            else:
                w(f"| `{c['label']}` | {c['pss_kib'] / 1024:.1f} MiB | {cost(c)} | {c['uss_kib'] / 1024:.1f} MiB | "
                  f"{c['modules']} | {', '.join(c['notable']) or '–'} |")
        w("")
    if entries:
        w("Upparat's own entry points, from this checkout and from `git archive` snapshots of the branches "
          "where the processes are being rewritten (`--imports-from`), since a module may not import in one tree "
          "yet. A process imports more after start-up (e.g. keys are loaded): its idle PSS in §3 is the real figure.")
        w("")
        w("| module | source | PSS | cost over bare | modules | loads |")
        w("|---|---|---|---|---|---|")
        for c in entries:
            if c["error"]:
                w(f"| `{c['label']}` | {c['source']} | does not import: {c['error'][:100].replace('|', '/')} | – | – | – |")
            else:
                w(f"| `{c['label']}` | {c['source']} | {c['pss_kib'] / 1024:.1f} MiB | {cost(c)} | {c['modules']} | "
                  f"{', '.join(c['notable']) or '–'} |")
        w("")
        processes = ("upparat.supervisor", "upparat.broker_proc.__main__", "upparat.fetcher_proc.__main__",
                     "upparat.installer_proc.__main__")
        alone = [c for c in entries if c["source"] == "checkout" and c["label"] in processes and not c["error"]]
        if bare and len(alone) == len(processes):
            total = sum(c["pss_kib"] for c in alone) / 1024
            w(f"The four processes' entry points, each imported in an interpreter of its own as on a device, come "
              f"to {total:.1f} MiB of PSS together before any work ({bare['pss_kib'] / 1024:.1f} MiB of it per "
              "bare interpreter; measured alone, so shared pages split differently than in §3). "
              + ("That is above the 40 MiB idle target already: with four CPython processes and the libraries the "
                 "design names (pyzmq in every child, paho-mqtt in the broker, requests in the fetcher) the target "
                 "cannot be met; it would take fewer interpreters or a process in another language, which the "
                 "fixed four-process shape rules out. What was cut: the fetcher holds no keys and never imports "
                 "cryptography, the installer imports it only at its first signature check, the supervisor "
                 "imports neither hashlib, tempfile nor ctypes, and no process imports sentry-sdk unless it is "
                 "configured."
                 if total > 40 else ""))
            w("")

    # ------------------------------------------------------------------ failures
    failures = [(label, f) for label, a in agents.items() for f in a["failures"]]
    if failures or any(a["leftovers"] for a in agents.values()):
        w("## What did not run")
        w("")
        for label, failure in failures:
            w(f"- {label}, {failure.splitlines()[0]}")
        for label, a in agents.items():
            if a["leftovers"]:
                w(f"- {label}: PIDs {a['leftovers']} outlived their parent and were killed by the bench.")
        w("")
        w("Log tails of the failures are in the run's JSON (`docs/benchmarks.json`).")
        w("")
    return "\n".join(out)


def keep_foreign_sections(new_text: str, old_text: str) -> str:
    """``new_text`` plus every ``## `` section of ``old_text`` this module does not write."""
    kept = []
    for block in re.split(r"(?m)^(?=## )", old_text):
        if block.startswith("## "):
            heading = block[3:].split("\n", 1)[0].strip()
            if heading not in OWN_SECTIONS:
                kept.append(block.rstrip("\n") + "\n")
    if not kept:
        return new_text
    return new_text.rstrip("\n") + "\n\n" + "\n".join(kept)
