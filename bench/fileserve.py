"""The sandbox's file server (``upparat.devtools.fileserver``) in its own process.

    python -m bench.fileserve DIR PORT    (the HMAC secret, hex, on stdin)

In the bench process it would share one interpreter lock with the emulator
and the wiretap, which handle every status message an agent sends: an agent
that sends many would slow its own download through the rig. Here it runs
alone; the bench keeps an unstarted ``FileServer`` with the same directory,
port and secret to presign URLs. Prints ``serving`` once listening; stops on
SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from upparat.devtools.fileserver import FileServer


def main(argv: list[str]) -> int:
    directory, port = Path(argv[0]), int(argv[1])
    secret = bytes.fromhex(sys.stdin.readline().strip())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = FileServer(directory, port=port, secret=secret).start()
    print("serving", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
