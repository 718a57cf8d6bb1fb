"""The benchmark harness's own helpers read /proc and render results correctly.

Nothing here measures Upparat (benchmarks live in bench/ and are never
asserted); these prove that the numbers bench/ reports are taken right.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench import procfs, report
from bench.wiretap import Seen

STAT_LINE = ("4242 (python3 (x) y) S 4200 4242 4200 0 -1 4194560 1500 0 0 0 "
             "120 35 7 3 20 0 3 0 98765 200000000 5000 18446744073709551615 1 1 0 0 0 0 0 "
             "16781312 134234626 0 0 0 17 1 0 0 0 0 0")

SMAPS_ROLLUP = """55d0a0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:               10240 kB
Pss:                6000 kB
Pss_Anon:           3000 kB
Shared_Clean:       4000 kB
Private_Clean:       500 kB
Private_Dirty:      2500 kB
Swap:                  0 kB
"""


def test_parse_stat_splits_after_the_last_parenthesis_of_comm():
    stat = procfs.parse_stat(STAT_LINE)
    assert (stat.pid, stat.comm, stat.state, stat.ppid) == (4242, "python3 (x) y", "S", 4200)
    assert (stat.utime, stat.stime, stat.cutime, stat.cstime) == (120, 35, 7, 3)
    assert stat.cpu_ticks == 165
    assert stat.starttime == 98765


def test_parse_smaps_rollup_reads_kib_values_and_skips_the_header():
    values = procfs.parse_smaps_rollup(SMAPS_ROLLUP)
    assert values["Rss"] == 10240 and values["Pss"] == 6000
    assert values["Private_Clean"] + values["Private_Dirty"] == 3000
    assert "55d0a0000000-7ffd00000000 ---p 00000000 00" not in values


def test_process_kind_names_the_module_after_dash_m():
    assert procfs.process_kind(["/venv/bin/python", "-m", "upparat.fetcher_proc", "--from-supervisor"]) == \
        "upparat.fetcher_proc"
    assert procfs.process_kind(["/usr/bin/curl", "-s"]) == "curl"
    assert procfs.process_kind([]) == "?"


def test_extension_modules_name_packages_and_stdlib_modules(tmp_path, monkeypatch):
    maps = "\n".join([
        "7f0000000000-7f0000001000 r-xp 00000000 fe:01 1 /venv/lib/python3.11/site-packages/cryptography/"
        "hazmat/bindings/_rust.abi3.so",
        "7f0000001000-7f0000002000 r-xp 00000000 fe:01 2 /venv/lib/python3.11/site-packages/"
        "_cffi_backend.cpython-311-x86_64-linux-gnu.so",
        "7f0000002000-7f0000003000 r-xp 00000000 fe:01 3 /venv/lib/python3.11/site-packages/pyzmq.libs/"
        "libzmq-2f02442c.so.5.2.5",
        "7f0000003000-7f0000004000 r-xp 00000000 fe:01 4 /usr/lib/python3.11/lib-dynload/"
        "_ssl.cpython-311-x86_64-linux-gnu.so",
        "7f0000004000-7f0000005000 r-xp 00000000 fe:01 5 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7f0000005000-7f0000006000 rw-p 00000000 00:00 0 ",
    ]) + "\n"
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "maps").write_text(maps)
    monkeypatch.setattr(procfs, "PROC", tmp_path)
    assert procfs.extension_modules(77) == ["_cffi_backend", "_ssl", "cryptography"]


def test_tree_finds_a_child_and_a_grandchild_and_their_memory():
    # sh starts sleep as its child: a grandchild of this process.
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while not procfs.children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        found = procfs.children(proc.pid)
        assert len(found) == 1, "sh never started sleep"
        grandchild = found[0]
        members = procfs.tree(os.getpid())
        assert proc.pid in members and grandchild in members
        memory = procfs.tree_memory_kib(proc.pid)
        assert memory["processes"] == 2
        assert 0 < memory["uss"] <= memory["pss"] <= memory["rss"]
    finally:
        proc.kill()
        proc.wait()
    assert procfs.tree(proc.pid) == []


def test_tree_cpu_counts_a_child_that_already_exited():
    before = procfs.tree_cpu_seconds(os.getpid())
    # A child that burns 0.3 s of CPU (by its own clock) and is reaped: its time
    # must show up in this process's cutime, so in the tree's sum.
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass"], check=True)
    after = procfs.tree_cpu_seconds(os.getpid())
    assert after - before >= 0.25


def test_same_memory_tells_a_shared_address_space_from_a_child_of_its_own():
    # A thread shares the address space (as a vfork child does until exec);
    # a started child has its own.
    import threading

    tids: list[int] = []
    release = threading.Event()
    thread = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), release.wait(10)))
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not tids and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procfs.same_memory(os.getpid(), tids[0])
        assert not procfs.same_memory(os.getpid(), child.pid)
        assert child.pid in procfs.counted(os.getpid())
    finally:
        release.set()
        thread.join()
        child.kill()
        child.wait()


def test_wire_bytes_of_a_publish_packet():
    topic = "$aws/things/t/jobs/j/update"  # 27 bytes
    payload = b"x" * 100
    qos1 = Seen(0.0, topic, payload, 1)
    # remaining length = 2 + 27 + 2 (packet id) + 100 = 131 -> 2 length bytes
    assert qos1.wire_bytes == 1 + 2 + 131
    qos0 = Seen(0.0, topic, b"{}", 0)
    assert qos0.wire_bytes == 1 + 1 + (2 + 27 + 2)
    assert (qos1.thing, qos1.job_id, qos1.verb) == ("t", "j", "update")
    assert Seen(0.0, "$aws/things/t/jobs/get", b"{}", 1).job_id is None


def _results(v2_failure: str) -> dict:
    plan = {"sample_interval": 0.05, "import_repeats": 3}
    machine = {"cpu": "CPU", "cores": 2, "ram_gib": 1.0, "kernel": "k", "os": "os", "python": "3", "user": "root"}
    meta = {"date": "d", "command": "bench/run", "machine": machine, "load_before": "0 0 0", "load_after": "0 0 0",
            "plan": "p", "plan_raw": plan, "duration_s": 1.0, "sizes": {"big": 256 << 20},
            "versions": {"upparat2": "x", "upparat112": "y", "curl": "curl", "mosquitto": "m"}}
    big = {"round": 1, "to_install_s": 2.0, "cpu_s": 0.5, "memory": {"peak": {"pss": 20480}, "growth_kib": 0}}
    old = {"label": "upparat 1.12", "ready_signal": "", "starts": [{"ready_s": 0.1, "notify_ready_s": None}],
           "idle": {"pss": 19000, "uss": 18000, "rss": 27000, "processes": 1, "by_kind_pss": {"upparat.cli": 19000}},
           "idle_before_big": None,
           "latency": [{"to_install_s": 0.15, "to_final_s": 0.22}],
           "messages": [{"updates": 1028, "update_payload_bytes": 124000, "update_wire_bytes": 191000,
                         "update_states": {"IN_PROGRESS/download_progress": 1024}}],
           "big": [big], "failures": [], "leftovers": []}
    new = {"label": "Upparat 2", "ready_signal": "", "starts": [], "idle": None, "idle_before_big": None,
           "latency": [], "messages": [], "big": [], "failures": [v2_failure], "leftovers": []}
    return {"meta": meta, "curl": [{"round": 1, "to_install_s": 1.0, "cpu_s": 0.2, "memory": {"peak": {"pss": 6000}}}],
            "agents": {"Upparat 2": new, "upparat 1.12": old},
            "imports": [{"label": "bare interpreter", "source": "checkout", "pss_kib": 5000, "rss_kib": 9000,
                         "uss_kib": 2000, "modules": 30, "notable": [], "error": None}]}


def test_report_marks_upparat2_pending_and_keeps_the_baselines():
    text = report.render(_results("start: Upparat 2: upparat.fetcher_proc not running 1 s after it was ready"))
    targets = text.split("## Targets", 1)[1].split("## 1.", 1)[0]
    assert targets.count("**pending integration**") == 4
    assert "| curl + sha256sum | 1.000 s" in text
    assert "| upparat 1.12 | 2.000 s (2.000–2.000, n=1) | 0.50× | 0.50× (0.50–0.50) |" in text


def test_ratio_keeps_two_significant_digits_below_a_tenth():
    assert report.ratio({"median": 4}, {"median": 1028}) == "0.0039×"
    assert report.ratio({"median": 1}, {"median": 2}) == "0.50×"
    assert report.ratio(None, {"median": 2}) == "–"


def test_report_writes_only_sections_it_owns_and_keeps_the_others():
    text = report.render(_results("start: broken"))
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings and all(h in report.OWN_SECTIONS for h in headings)
    old = "# Benchmarks\n\n## Targets\nold\n\n## Download\nfetcher figures\n"
    merged = report.keep_foreign_sections(text, old)
    assert merged.endswith("## Download\nfetcher figures\n")
    assert "old" not in merged.split("## Targets", 1)[1].split("## 1.", 1)[0]


def test_the_capacity_table_splits_each_sides_times_at_the_free_cpus():
    results = _results("start: broken")
    assert "CPUs free" not in report.render(results)  # results from before the probe: no table
    results["curl"] = [{"round": r, "to_install_s": 0.8, "cpu_s": 0.8, "capacity": c, "memory": {"peak": {"pss": 1}}}
                       for r, c in ((1, 1.95), (2, 1.3), (3, 1.9))]
    results["agents"]["upparat 1.12"]["big"] = [dict(b, round=r, to_install_s=t, capacity=c)
                                                for r, t, c in ((1, 0.4, 1.99), (2, 0.9, 1.2), (3, 0.5, 1.85))
                                                for b in [results["agents"]["upparat 1.12"]["big"][0]]]
    text = report.render(results)
    assert "| curl + sha256sum | 1.90 (1.30–1.95) | 0.800 s (0.800–0.800, n=2) | 0.800 s (0.800–0.800, n=1) |" in text
    assert "| upparat 1.12 | 1.85 (1.20–1.99) | 0.450 s (0.400–0.500, n=2) | 0.900 s (0.900–0.900, n=1) |" in text


def test_parallel_capacity_measures_and_keeps_the_probe_buffer():
    value = procfs.parallel_capacity(size=1 << 20, tries=3)
    assert isinstance(value, float) and value > 0  # its size is timing: judged in bench/, never here
    assert len(procfs._PROBE) == 1 << 20
