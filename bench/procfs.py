"""Reading what the kernel knows about a process tree: children, PSS, CPU time.

Only /proc, no third-party library, so the same numbers can be checked by
hand (``cat /proc/PID/smaps_rollup``). Every function tolerates a process
that exits while it is being read (it is simply left out).

CPU time of a tree over an interval: ``tree_cpu_seconds(root)`` sums, over
every live process of the tree, its own utime+stime plus cutime+cstime (the
time of children it has already waited for). The difference of two such sums
is the CPU the tree used in between, including processes that started and
ended in between (a hook, curl), as long as a process of the tree reaped them.

``parallel_capacity`` is not about a process: it measures how many CPUs the
machine gives right now, so that runs on a machine shared with other work can
be told apart.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    utime: int  # clock ticks
    stime: int
    cutime: int
    cstime: int
    starttime: int

    @property
    def cpu_ticks(self) -> int:
        """Own CPU plus that of waited-for children."""
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> Stat:
    """Parse one /proc/PID/stat line. ``comm`` may hold spaces and parentheses,
    so the fields are split after its *last* closing parenthesis."""
    open_at = text.index("(")
    close_at = text.rindex(")")
    pid = int(text[:open_at])
    comm = text[open_at + 1:close_at]
    rest = text[close_at + 2:].split()
    # rest[0] is field 3 (state); fields are numbered from 1 in proc(5).
    return Stat(pid=pid, comm=comm, state=rest[0], ppid=int(rest[1]),
                utime=int(rest[11]), stime=int(rest[12]), cutime=int(rest[13]), cstime=int(rest[14]),
                starttime=int(rest[19]))


def read_stat(pid: int) -> Stat | None:
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """The ``Key: N kB`` lines of smaps_rollup as a dict of KiB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            values[key.strip()] = int(parts[0])
    return values


def memory_kib(pid: int) -> dict[str, int] | None:
    """Rss, Pss, USS (Private_Clean + Private_Dirty) of one process, in KiB;
    None when it is gone or is a zombie (no mappings)."""
    try:
        values = parse_smaps_rollup((PROC / str(pid) / "smaps_rollup").read_text())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if "Pss" not in values:
        return None
    return {"rss": values.get("Rss", 0), "pss": values["Pss"], "pss_anon": values.get("Pss_Anon", 0),
            "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)}


def children(pid: int) -> list[int]:
    """Direct children of ``pid``. A child forked by any thread appears in that
    thread's ``children`` file, so every thread is read."""
    found: list[int] = []
    try:
        tasks = os.listdir(PROC / str(pid) / "task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in tasks:
        try:
            text = (PROC / str(pid) / "task" / tid / "children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.extend(int(p) for p in text.split())
    return found


def tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now (root first)."""
    if read_stat(root) is None:
        return []
    seen = [root]
    todo = [root]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


_KCMP_SYSCALL = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "armv7l": 378, "armv6l": 378, "i686": 349}
_KCMP_VM = 1
_libc = None


def same_memory(pid_a: int, pid_b: int) -> bool:
    """Whether two processes share one address space, by kcmp(2) KCMP_VM: a
    child between vfork() and exec() (how Python's subprocess starts a hook)
    shows its parent's whole memory in its own smaps_rollup, which would count
    it twice. False when unknown (kcmp missing or not permitted)."""
    global _libc
    number = _KCMP_SYSCALL.get(os.uname().machine)
    if number is None:
        return False
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall(number, pid_a, pid_b, _KCMP_VM, 0, 0) == 0


def counted(root: int) -> list[int]:
    """The processes of the tree whose memory is their own: the tree without
    children that still share their parent's address space (vfork)."""
    pids = tree(root)
    members = set(pids)
    out = []
    for pid in pids:
        if pid != root:
            stat = read_stat(pid)
            if stat is not None and stat.ppid in members and same_memory(pid, stat.ppid):
                continue
        out.append(pid)
    return out


def tree_cpu_seconds(root: int) -> float:
    total = 0
    for pid in tree(root):
        stat = read_stat(pid)
        if stat is not None:
            total += stat.cpu_ticks
    return total / CLOCK_TICKS


def tree_memory_kib(root: int) -> dict[str, int]:
    """Summed rss/pss/uss of the live tree, plus how many processes were counted."""
    total = {"rss": 0, "pss": 0, "pss_anon": 0, "uss": 0, "processes": 0}
    for pid in counted(root):
        mem = memory_kib(pid)
        if mem is None:
            continue
        for key, value in mem.items():
            total[key] += value
        total["processes"] += 1
    return total


def extension_modules(pid: int) -> list[str]:
    """Python extension modules mapped by a process, from /proc/PID/maps: a
    module of the standard library by its name (``_ssl``), one of an installed
    package by the package (``cryptography``, ``zmq``): what it has imported
    that costs native memory, seen from outside."""
    found: set[str] = set()
    try:
        text = (PROC / str(pid) / "maps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].endswith(".so"):
            continue
        path = parts[5]
        name = os.path.basename(path)
        if ".cpython-" not in name and not name.endswith(".abi3.so"):
            continue  # a plain shared library (libc, libzmq): not an import
        inside = path.split("-packages/", 1)[1] if ("/site-packages/" in path or "/dist-packages/" in path) else ""
        if "/" in inside:
            found.add(inside.split("/", 1)[0])
        else:
            found.add(name.split(".", 1)[0])
    return sorted(found)


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(PROC / str(pid) / "task"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def process_kind(argv: list[str]) -> str:
    """A name for a process from its argv: the module after ``-m``, else the
    program's base name."""
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return os.path.basename(argv[0]) if argv else "?"


def loadavg_text() -> str:
    return " ".join((PROC / "loadavg").read_text().split()[:3])


_PROBE = b""


def parallel_capacity(size: int = 64 * 1024 * 1024, tries: int = 3) -> float:
    """How many CPUs this machine gives right now, between 1 and 2: the time to
    hash ``size`` bytes in one thread, doubled, over the time to hash it in two
    threads at once (hashlib releases the GIL). About 2 when two CPUs are free;
    nearer 1 when the machine (or the host of a VM, which may throttle a VM that
    keeps two vCPUs busy) runs only one of them at a time. The median of
    ``tries`` measurements; about 0.1 s each."""
    global _PROBE
    if len(_PROBE) != size:
        _PROBE = os.urandom(size)

    def one() -> None:
        hashlib.sha256(_PROBE).digest()

    def measure() -> float:
        began = time.perf_counter()
        one()
        alone = time.perf_counter() - began
        threads = [threading.Thread(target=one) for _ in range(2)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        both = time.perf_counter() - began
        return 2 * alone / both if both > 0 else 0.0

    values = sorted(measure() for _ in range(tries))
    return values[len(values) // 2]
