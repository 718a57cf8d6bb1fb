"""upparatctl status against the real supervisor and its real children during
a throttled download (issue 9). Needs the integrated children: they call
``ctx.heartbeat.beat(job_id=..., execution=..., phase=..., bytes_done=...,
bytes_total=..., rate=...)`` from their main loops (fetcher: progress;
broker: job and phase)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import child_pids, poll_for
from upparat.devtools.sandbox import Sandbox

UPPARATCTL = str(Path(sys.executable).parent / "upparatctl")


def status(box: Sandbox) -> dict:
    result = subprocess.run([UPPARATCTL, "-c", str(box.path("upparat.conf")), "status", "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def throttled(world_tmp):
    box = Sandbox(world_tmp / "box")
    box.start(supervisor=False)
    text = box.path("upparat.conf").read_text()
    text = text.replace("[service]\n", "[service]\ndownload_rate_limit = 64K\n", 1)
    text = text.replace("[verification]\n", "[verification]\nallow_unsigned = true\n", 1)
    box.path("upparat.conf").write_text(text)
    box.start_supervisor()
    try:
        poll_for(lambda: len(child_pids(box.supervisor.pid)) == 3 or (not box.supervisor.alive() and
                 pytest.fail(box.logs()[-3000:])), 30, what="three children")
        yield box
    finally:
        box.stop()


def test_status_twice_during_a_throttled_download_shows_a_growing_byte_count(throttled):
    box = throttled
    box.add_file("big.bin", os.urandom(2_000_000))  # ~30 s at 64 KiB/s
    box.create_job("job-status", box.document("big.bin", "2.0.0"))

    def downloading():
        snap = status(box)
        job = snap["job"]
        return snap if job and job["job_id"] == "job-status" and job["bytes_done"] else None
    first = poll_for(downloading, 30, what="the download in upparatctl status")
    second = poll_for(lambda: (s := status(box))["job"]["bytes_done"] > first["job"]["bytes_done"] and s, 15,
                      what="a growing byte count")
    assert second["job"]["job_id"] == first["job"]["job_id"] == "job-status"
    assert second["job"]["bytes_total"] == 2_000_000
    assert second["job"]["rate"] and second["job"]["rate"] <= 2 * 64 * 1024
    assert all(c["state"] in ("STARTING", "RUNNING") and c["restarts"] == 0 for c in second["children"])
