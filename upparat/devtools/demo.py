"""upparat-demo: one real, signed update end to end on this machine.

Starts a local Mosquitto, the AWS IoT Jobs emulator, a file server standing
in for S3, generates an Ed25519 release key, writes a config with demo hooks,
starts the real supervisor (and through it the broker, fetcher and installer
processes), creates a job for a signed file and prints every status update
until the job ends. No cloud account needed. Exit 0 when the job SUCCEEDED.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from upparat.devtools.sandbox import Sandbox, describe, sha256_of

VERSION = "2.0.0"


def step(n: int, text: str) -> None:
    print(f"[{n}/7] {text}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upparat-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    parser.add_argument("--size", type=int, default=4 * 1024 * 1024, help="update file size in bytes")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="upparat-demo-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    print(f"Upparat demo in {base}")
    if os.geteuid() == 0:
        print("running as root: the broker runs as user 'upparat', the fetcher as 'upparat-fetch', the installer as root")
    else:
        print("not root: all processes run as you (privilege separation off, as the supervisor will say)")

    step(1, "generating an Ed25519 release key (the device trusts its public half)")
    sandbox = Sandbox(base)
    print(f"      public key {sandbox.public_keys[0]}")
    try:
        step(2, "starting Mosquitto, the AWS IoT Jobs emulator and the file server")
        sandbox.start(supervisor=False)
        print(f"      MQTT 127.0.0.1:{sandbox.mqtt_port}, files {sandbox.files.base_url}")

        step(3, f"creating a {args.size} byte update file for version {VERSION} and signing it")
        name = f"firmware-{VERSION}.bin"
        path = sandbox.add_file(name, os.urandom(args.size))
        sha256 = sha256_of(path)
        document = sandbox.document(name, VERSION)
        print(f"      sha256 {sha256}, signature statement v2 signed with the release key")

        step(4, f"starting upparat-supervisor -c {sandbox.path('upparat.conf')}")
        sandbox.start_supervisor()

        step(5, "creating AWS IoT job demo-update-1")
        sandbox.create_job("demo-update-1", document)

        step(6, "following the job")
        seen = 0
        deadline = time.monotonic() + args.timeout
        final = None
        while time.monotonic() < deadline:
            execution = sandbox.execution("demo-update-1") or {}
            history = execution.get("history", [])
            for entry in history[seen:]:
                details = entry.get("statusDetails") or {}
                print(f"      {entry.get('status'):<12} {details.get('state', '')}"
                      f"{'  ' + details['message'] if details.get('message') else ''}"
                      f"{'  ' + details['progress'] + '%' if details.get('progress') else ''}")
            seen = len(history)
            if execution.get("status") in ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT"):
                final = execution
                break
            if not sandbox.supervisor.alive():
                print("      the supervisor exited early; its log follows")
                break
            time.sleep(0.2)

        step(7, "result")
        if final is None:
            print(f"      job did not finish: {describe(sandbox.execution('demo-update-1'))}")
            print(sandbox.logs()[-5000:])
            return 1
        print(f"      final job status: {describe(final)}")
        found = sorted(sandbox.path("installed").glob("demo-update-1.*"))  # the staged name: <job id>.<execution>
        installed = found[0] if found else None
        if final["status"] == "SUCCEEDED" and installed is not None:
            same = sha256_of(installed) == sha256
            print(f"      installed file: {installed} ({installed.stat().st_size} bytes, sha256 "
                  f"{'matches' if same else 'DIFFERS'})")
            print(f"      device version now: {sandbox.path('state', 'version').read_text().strip()}")
        print(f"      logs: {sandbox.path('logs')}")
        return 0 if final["status"] == "SUCCEEDED" else 1
    finally:
        sandbox.stop()


if __name__ == "__main__":
    sys.exit(main())
