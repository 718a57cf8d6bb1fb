"""Memory sampler, run as its own process so that it shares no interpreter
lock with the file server and the emulator of the bench process.

    python -m bench.sampler ROOT_PID INTERVAL_S OUT.json

Every INTERVAL_S it sums Rss/Pss/USS over the live process tree of ROOT_PID
(``/proc/PID/smaps_rollup``). It prints ``sampling`` once the first sample is
taken, and on SIGTERM (or when the tree is gone) writes the first, last and
peak (by PSS) samples to OUT.json, the peak broken down per process kind.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from bench import procfs


def sample(root: int, kinds: dict[int, str]) -> dict:
    total = {"rss": 0, "pss": 0, "pss_anon": 0, "uss": 0, "processes": 0}
    by_kind: dict[str, int] = {}
    for pid in procfs.counted(root):
        mem = procfs.memory_kib(pid)
        if mem is None:
            continue
        for key, value in mem.items():
            total[key] += value
        total["processes"] += 1
        if pid not in kinds:
            kinds[pid] = procfs.process_kind(procfs.cmdline(pid))
        by_kind[kinds[pid]] = by_kind.get(kinds[pid], 0) + mem["pss"]
    total["by_kind_pss"] = by_kind
    return total


def main(argv: list[str]) -> int:
    root, interval, out = int(argv[0]), float(argv[1]), argv[2]
    stop = False

    def handle_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handle_term)
    kinds: dict[int, str] = {}
    first = last = peak = None
    count = 0
    started = time.monotonic()
    next_at = started
    while not stop:
        now = time.monotonic()
        current = sample(root, kinds)
        if current["processes"] == 0:
            break
        current["t"] = round(now - started, 3)
        count += 1
        if first is None:
            first = current
            print("sampling", flush=True)
        last = current
        if peak is None or current["pss"] > peak["pss"]:
            peak = current
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()  # fell behind: do not try to catch up in a burst
    with open(out, "w") as fh:
        json.dump({"samples": count, "interval_s": interval, "first": first, "last": last, "peak": peak}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
