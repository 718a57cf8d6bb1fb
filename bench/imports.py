"""Where the memory goes: what one import costs in a fresh interpreter.

Each probe runs ``python -c "<statement>"`` in a new interpreter (the one of
the venv Upparat runs in) and reads its own ``/proc/self/smaps_rollup``
after the import; the cost of an import is its PSS minus that of a bare
interpreter measured the same way. Each probe runs ``repeats`` times and
the median is kept. The probe also lists which notable modules the import
pulled in, so that a module's cost can be traced to the library behind it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

# (label, statement): libraries first, then Upparat's own entry points.
LIBRARY_PROBES = (
    ("bare interpreter", "pass"),
    ("stdlib a child needs (logging, json, socket, select, subprocess, threading)",
     "import logging, json, socket, select, subprocess, threading"),
    ("import ssl", "import ssl"),
    ("import http.client", "import http.client"),
    ("import hashlib", "import hashlib"),
    ("import bz2, lzma", "import bz2, lzma"),
    ("import ctypes", "import ctypes"),
    ("import zmq", "import zmq"),
    ("import paho.mqtt.client", "import paho.mqtt.client"),
    ("import requests", "import requests"),
    ("import urllib3", "import urllib3"),
    ("cryptography: ed25519 + ec + serialization",
     "from cryptography.hazmat.primitives import serialization, hashes\n"
     "from cryptography.hazmat.primitives.asymmetric import ec, ed25519"),
    ("cryptography: x509", "from cryptography import x509"),
    ("import sentry_sdk", "import sentry_sdk"),
)

UPPARAT_PROBES = (
    ("upparat.supervisor", "import upparat.supervisor"),
    ("upparat.broker_proc.__main__", "import upparat.broker_proc.__main__"),
    ("upparat.fetcher_proc.__main__", "import upparat.fetcher_proc.__main__"),
    ("upparat.installer_proc.__main__", "import upparat.installer_proc.__main__"),
    ("upparat.launch (every child's start-up)", "import upparat.launch"),
    ("upparat.ipc.wire (every ZeroMQ boundary)", "import upparat.ipc.wire"),
)

# Modules worth naming when an import drags them in.
NOTABLE = ("zmq", "paho", "requests", "urllib3", "cryptography", "sentry_sdk", "ssl", "http.client",
           "email", "bz2", "lzma", "ctypes", "hashlib", "decimal", "asyncio", "xml", "uuid",
           "multiprocessing", "concurrent.futures", "idna", "charset_normalizer", "certifi")

PROBE = r"""
import sys
__STATEMENT__
import json
mem = {}
for line in open("/proc/self/smaps_rollup"):
    key, _, rest = line.partition(":")
    parts = rest.split()
    if len(parts) == 2 and parts[1] == "kB":
        mem[key.strip()] = int(parts[0])
notable = sorted(n for n in __NOTABLE__ if n in sys.modules)
origin = getattr(sys.modules.get("upparat"), "__file__", None)
print(json.dumps({"pss": mem["Pss"], "rss": mem["Rss"],
                  "uss": mem["Private_Clean"] + mem["Private_Dirty"],
                  "modules": len(sys.modules), "notable": notable, "upparat": origin}))
"""


@dataclass
class ImportCost:
    label: str
    source: str  # "checkout" or the git ref of a snapshot
    pss_kib: float | None
    rss_kib: float | None
    uss_kib: float | None
    modules: int | None
    notable: list[str]
    error: str | None = None


def probe(python: str, statement: str, pythonpath: str | None, cwd: Path, repeats: int) -> dict:
    code = PROBE.replace("__STATEMENT__", statement).replace("__NOTABLE__", repr(NOTABLE))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write into a snapshot or the checkout
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
            return {"error": last}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in ("pss", "rss", "uss", "modules")} | {
        "notable": runs[-1]["notable"], "upparat": runs[-1]["upparat"]}


def measure(python: str, cwd: Path, repeats: int = 3,
            snapshots: dict[str, Path] | None = None, log=print) -> list[ImportCost]:
    """Library probes once; Upparat probes for the checkout and each snapshot
    (``{git ref: directory holding an upparat/ tree}``)."""
    costs: list[ImportCost] = []
    sources: list[tuple[str, str | None]] = [("checkout", None)]
    sources += [(ref, str(path)) for ref, path in (snapshots or {}).items()]
    plan = [(label, stmt, "checkout", None) for label, stmt in LIBRARY_PROBES]
    plan += [(label, stmt, name, path) for name, path in sources for label, stmt in UPPARAT_PROBES]
    for label, statement, source, path in plan:
        result = probe(python, statement, path, cwd, repeats)
        if "error" in result:
            costs.append(ImportCost(label, source, None, None, None, None, [], result["error"]))
        else:
            if path and result["upparat"] and not result["upparat"].startswith(path):
                raise RuntimeError(f"probe of {source} imported upparat from {result['upparat']}")
            costs.append(ImportCost(label, source, result["pss"], result["rss"], result["uss"],
                                    int(result["modules"]), result["notable"]))
        log(f"  import {label} [{source}]: " + (f"PSS {result['pss'] / 1024:.1f} MiB" if "pss" in result
                                                else f"fails: {result['error']}"))
    return costs


def snapshot(repo: Path, ref: str, into: Path) -> Path:
    """The ``upparat/`` tree of a git ref, extracted with ``git archive`` (no
    checkout, no worktree touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "upparat"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def commit_of(repo: Path, ref: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", ref], check=True,
                          capture_output=True, text=True).stdout.strip()

