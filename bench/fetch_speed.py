"""Download speed of the fetcher against ``curl -s -o f URL && sha256sum f``.

One command, from the repository root (as root, so the fetcher runs as
``upparat-fetch`` as in production; as another user it runs as that user)::

    .venv/bin/python bench/fetch_speed.py [--size-mib 256] [--runs 5] [--update-doc]

In one run it creates a random file, serves it from the local FileServer
(loopback, sendfile), starts the real fetcher process with its settings
envelope (tests.support.start_child_process), then times, alternating the
order in every round:

- curl + sha256sum: ``sh -c 'curl -s -o F URL && sha256sum F'``, wall time
  and CPU seconds of the shell and its children (getrusage of children);
  and, for context, ``curl -s -o F URL`` and ``sha256sum F`` alone;
- the fetcher: from sending ``fetch`` to receiving the pushed ``done``
  (download, sha256 while streaming, size check, rename), wall time and
  the fetcher's CPU seconds (/proc/PID/stat), over its socket as the broker
  would.

It prints the medians, the speed ratio (curl+sha256sum time / fetcher time:
above 1 the fetcher is faster) and CPU seconds per GiB for both, plus the
fetcher's peak resident memory. ``--update-doc`` writes the results into the
"Download" section of docs/benchmarks.md. ``--approaches`` also times, in
this process, the ways of reading a body that were compared when the fetcher
was written (read sizes; requests/urllib3 read1 against http.client readinto1
into a preallocated buffer; hashing in a second thread).

A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import os
import platform
import queue
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import zmq  # noqa: E402

from tests.support import identities, layout_under, poll_for, start_child_process  # noqa: E402
from upparat.devtools.fileserver import FileServer  # noqa: E402
from upparat.ipc import fetcher_protocol as fp, wire  # noqa: E402
from upparat.release import Release  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
TICK = os.sysconf("SC_CLK_TCK")
CONFIG = "[verification]\nallow_unsigned = true\n"


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(4 * MiB)
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = block[: min(len(block), left)]
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def time_curl(url: str, out: Path, sha256: str | None) -> tuple[float, float]:
    """curl + sha256sum, or with ``sha256`` None curl alone (for context)."""
    script = 'curl -s -o "$1" "$2" && sha256sum "$1"' if sha256 else 'curl -s -o "$1" "$2"'
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(["sh", "-c", script, "sh", str(out), url], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    if sha256 and done.stdout.split()[0] != sha256:
        raise SystemExit("curl fetched something else")
    out.unlink()
    return wall, children_cpu() - cpu


def time_sha256sum(path: Path) -> tuple[float, float]:
    cpu = children_cpu()
    started = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], capture_output=True, check=True)
    return time.perf_counter() - started, children_cpu() - cpu


class Broker:
    def __init__(self, endpoint: str):
        self.zctx = zmq.Context()
        self.client = wire.Client(self.zctx, endpoint, fp.REPLIES, "bench")
        self.seq = 0

    def send(self, message) -> None:
        poll_for(lambda: self.client.send(message), 20, what=f"the fetcher to take {message.TYPE}")

    def wait(self, condition, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.sock.poll(1000):
                for message in self.client.receive_ready():
                    if condition(message):
                        return message
        raise SystemExit("the fetcher did not answer in time")

    def close(self):
        self.client.close()
        self.zctx.term()


def time_fetcher(broker: Broker, pid: int, url: str, release: Release, job_id: str) -> tuple[float, float]:
    cpu = process_cpu(pid)
    started = time.perf_counter()
    broker.send(fp.Fetch(seq=1, job_id=job_id, execution=1, url=url, release=release))
    end = broker.wait(lambda m: isinstance(m, fp.FetchStatus) and m.seq == 0 and m.state != fp.RUNNING)
    wall = time.perf_counter() - started
    if end.state != fp.DONE:
        raise SystemExit(f"the fetcher failed: {end.failure}: {end.message}")
    spent = process_cpu(pid) - cpu
    broker.send(fp.CancelFetch(seq=2, job_id=job_id, execution=1))  # deletes the file
    broker.wait(lambda m: isinstance(m, fp.FetchStatus) and m.seq == 2)
    return wall, spent


# -- the approaches compared in this process ------------------------------------------------------------

def approach_requests_read1(url: str, out: Path, chunk: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with requests.get(url, stream=True, timeout=30) as response:
        while chunk_bytes := response.raw.read1(chunk, decode_content=False):
            digest.update(chunk_bytes)
            os.write(fd, chunk_bytes)
    os.close(fd)
    return digest.hexdigest()


def approach_httpclient_readinto1(url: str, out: Path, chunk: int) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    digest = hashlib.sha256()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", f"{parts.path}?{parts.query}")
    response = conn.getresponse()
    left = int(response.getheader("Content-Length"))
    buffer = memoryview(bytearray(chunk))
    while left:
        n = response.fp.readinto1(buffer[: min(chunk, left)])  # preallocated: no bytes objects
        if not n:
            break
        digest.update(buffer[:n])
        os.write(fd, buffer[:n])
        left -= n
    conn.close()
    os.close(fd)
    return digest.hexdigest()


def approach_hash_thread(url: str, out: Path, chunk: int) -> str:
    digest = hashlib.sha256()
    pending: queue.Queue = queue.Queue(maxsize=8)

    def hasher():
        while (piece := pending.get()) is not None:
            digest.update(piece)

    thread = threading.Thread(target=hasher)
    thread.start()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with requests.get(url, stream=True, timeout=30) as response:
        while piece := response.raw.read1(chunk, decode_content=False):
            os.write(fd, piece)
            pending.put(piece)
    pending.put(None)
    thread.join()
    os.close(fd)
    return digest.hexdigest()


def compare_approaches(url: str, work: Path, sha256: str, runs: int) -> list[str]:
    lines = ["| approach (in one process, 256 MiB unless said) | median s | CPU s |", "|---|---|---|"]
    variants = [(f"requests, raw.read1({size // 1024} KiB)", approach_requests_read1, size)
                for size in (64 * 1024, 256 * 1024, MiB, 4 * MiB)]
    variants += [("http.client, readinto1 into a preallocated 1 MiB buffer", approach_httpclient_readinto1, MiB),
                  ("requests, read1(1 MiB), sha256 in a second thread", approach_hash_thread, MiB)]
    out = work / "approach.bin"
    for name, function, size in variants:
        walls, cpus = [], []
        for _ in range(runs):
            cpu = time.process_time()
            started = time.perf_counter()
            if function(url, out, size) != sha256:
                raise SystemExit(f"{name}: wrong hash")
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
            out.unlink()
        lines.append(f"| {name} | {statistics.median(walls):.3f} | {statistics.median(cpus):.3f} |")
    return lines


# -- the report ------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read()
    sha_ni = " (SHA-NI)" if re.search(r"\bsha_ni\b", flags) else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (f"{cpu}{sha_ni}, {os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {curl_version()}")


def curl_version() -> str:
    try:
        return subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0].split(
            " (")[0]
    except OSError:
        return "curl missing"


def update_doc(section: str) -> Path:
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasurements, not tests: see bench/.\n"
    pattern = re.compile(r"^## Download\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--approaches", action="store_true", help="also compare ways of reading a body")
    parser.add_argument("--update-doc", action="store_true", help="write the Download section of docs/benchmarks.md")
    args = parser.parse_args()
    if shutil.which("curl") is None or shutil.which("sha256sum") is None:
        raise SystemExit("needs curl and sha256sum")

    work = Path(tempfile.mkdtemp(prefix="upparat-bench-", dir="/var/tmp"))
    work.chmod(0o755)  # the fetcher's user traverses it
    size = args.size_mib * MiB
    fs = proc = broker = None
    try:
        (work / "srv").mkdir()
        sha256 = make_file(work / "srv" / "image.bin", size)
        fs = FileServer(work / "srv").start()
        url = fs.presign("https://bucket.s3.amazonaws.com/image.bin", expires_in=86400)
        layout = layout_under(work)
        proc = start_child_process("fetcher", CONFIG, layout, identities(), work / "fetcher.log", verbose=False)
        poll_for(lambda: layout.fetcher_socket.exists() or not proc.alive() and sys.exit(proc.log()), 20,
                 what="the fetcher's socket")
        broker = Broker(layout.fetcher_endpoint)
        release = Release(version="bench", sha256=sha256, size=size)
        time_curl(url, work / "warm.bin", sha256)  # warm up: page cache, first connections
        time_fetcher(broker, proc.pid, url, release, "warmup")

        curl, fetcher, curl_alone, sha_alone = [], [], [], []
        for run in range(args.runs):
            order = [0, 1] if run % 2 == 0 else [1, 0]
            for which in order:
                os.sync()  # the previous run's deletion and writeback are not billed to this one
                if which == 0:
                    curl.append(time_curl(url, work / "curl.bin", sha256))
                else:
                    fetcher.append(time_fetcher(broker, proc.pid, url, release, f"run-{run}"))
            os.sync()
            curl_alone.append(time_curl(url, work / "curl.bin", None))
            sha_alone.append(time_sha256sum(work / "srv" / "image.bin"))
        peak = vm_hwm(proc.pid)
        approaches = compare_approaches(url, work, sha256, args.runs) if args.approaches else []
    finally:
        if broker is not None:
            broker.close()
        if proc is not None:
            proc.stop()
        if fs is not None:
            fs.stop()
        shutil.rmtree(work, ignore_errors=True)

    curl_wall = statistics.median(w for w, _ in curl)
    curl_cpu = statistics.median(c for _, c in curl)
    fetch_wall = statistics.median(w for w, _ in fetcher)
    fetch_cpu = statistics.median(c for _, c in fetcher)
    alone_wall = statistics.median(w for w, _ in curl_alone)
    alone_cpu = statistics.median(c for _, c in curl_alone)
    sha_wall = statistics.median(w for w, _ in sha_alone)
    sha_cpu = statistics.median(c for _, c in sha_alone)
    per_gib = GiB / size
    command = " ".join(["bench/fetch_speed.py"] + sys.argv[1:])
    lines = [
        "## Download",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}, as "
        f"{'root (the fetcher as upparat-fetch)' if os.geteuid() == 0 else 'user ' + str(os.getuid())}.",
        f"Machine: {machine()}.",
        f"{args.size_mib} MiB over loopback from the local FileServer (sendfile), median of {args.runs} runs, "
        "alternating which goes first, on a machine shared with other work.",
        "",
        "| | wall s | MiB/s | CPU s | CPU s per GiB |",
        "|---|---|---|---|---|",
        f"| curl -s -o f URL && sha256sum f | {curl_wall:.3f} | {size / MiB / curl_wall:.0f} | {curl_cpu:.3f} "
        f"| {curl_cpu * per_gib:.2f} |",
        f"| fetcher: fetch -> pushed done (sha256 while streaming, rename; the installer fsyncs while it hashes) | {fetch_wall:.3f} "
        f"| {size / MiB / fetch_wall:.0f} | {fetch_cpu:.3f} | {fetch_cpu * per_gib:.2f} |",
        f"| for context, curl -s -o f URL alone (verifies nothing) | {alone_wall:.3f} "
        f"| {size / MiB / alone_wall:.0f} | {alone_cpu:.3f} | {alone_cpu * per_gib:.2f} |",
        f"| for context, sha256sum alone (file in the page cache) | {sha_wall:.3f} "
        f"| {size / MiB / sha_wall:.0f} | {sha_cpu:.3f} | {sha_cpu * per_gib:.2f} |",
        "",
        f"Speed ratio (curl+sha256sum time / fetcher time): **{curl_wall / fetch_wall:.2f}x**. "
        f"Fetcher peak resident memory: {peak / MiB:.0f} MiB.",
        "",
        "All runs (wall s, CPU s): curl " + ", ".join(f"{w:.3f}/{c:.2f}" for w, c in curl)
        + "; fetcher " + ", ".join(f"{w:.3f}/{c:.2f}" for w, c in fetcher) + ".",
        "",
    ]
    if "page_reporting" in open("/proc/cmdline").read():
        lines += ["This machine is a VM that reports free memory to its host: memory that one run freed (a "
                  "deleted 256 MiB file) is faulted back in by the next, which shows as system time and makes "
                  "single runs vary by up to 2x; the medians and all runs are given.", ""]
    if approaches:
        lines += ["Ways of reading a body, compared in one process (same server, same file):", ""] + approaches + [""]
    section = "\n".join(lines)
    print(section)
    if args.update_doc:
        print(f"written to {update_doc(section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
