"""The rig (Mosquitto, jobs emulator, file server, wiretap) and the two agents
under test, driven the same way: start, wait until ready, take jobs, stop.

Both agents get the same instant hooks (``INSTANT_HOOKS``): the install hook
first writes its own start time (``date +%s.%N``) to
``<base>/stamps/install-<meta>``; the restart hook makes the new version
current, so that Upparat 2's version check after the restart passes. Both
agents log at INFO (the sandbox's DEBUG would cost them CPU).

- ``Upparat2``: the sandbox's config, signed release documents (statement v2)
  and the real ``upparat-supervisor``, started with a ``NOTIFY_SOCKET`` that
  the bench listens on (``READY=1``). As root the broker and the fetcher run
  as ``upparat`` and ``upparat-fetch``, as in a device.
- ``Upparat112``: upparat 1.12 from PyPI in its own venv (``paho-mqtt<2``,
  ``pysm``, ``backoff``), one process, same user as the bench, its own thing
  name so that the two agents never see each other's jobs. 1.12 checks
  nothing it downloads: its job document has no sha256, size or signature.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from upparat.devtools.sandbox import BUCKET, THING, Child, Sandbox, port_open, sha256_of, wait_until

from bench import procfs
from bench.wiretap import Wiretap

REPO = Path(__file__).resolve().parent.parent

INSTANT_HOOKS = {
    "version": '#!/bin/sh\ncat "{base}/state/version"\n',
    "download": "#!/bin/sh\nexit 0\n",
    "install": ('#!/bin/sh\n# argv: elapsed_s retry meta file. First act: note when it started.\n'
                'date +%s.%N > "{base}/stamps/install-$3"\n'
                'echo "$3" > "{base}/state/pending"\n'),
    "restart": '#!/bin/sh\n# argv: elapsed_s retry meta force\nmv "{base}/state/pending" "{base}/state/version"\n',
    "ready": "#!/bin/sh\nexit 0\n",
}
UPPARAT112_PINS = ("upparat==1.12", "paho-mqtt<2", "pysm", "backoff")
THING_112 = "upparat-bench-112"
LIVENESS_S = 1.0
TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED"}


class BenchSandbox(Sandbox):
    """The sandbox with the bench's log level (INFO instead of DEBUG), and its
    state directories always under its own base: with the default
    (/var/lib/upparat) a run would share the broker's outbox, with its list of
    finished jobs, with every other run on the machine."""

    def write_config(self) -> Path:
        path = super().write_config()
        text = path.read_text().replace("log_level = DEBUG", "log_level = INFO")
        if "state_location" not in text:
            text = text.replace("[service]\n", f"[service]\nstate_location = {self.path('state-dirs')}\n", 1)
        path.write_text(text)
        return path


class Rig:
    """Mosquitto, the emulator and the wiretap in the sandbox's way, with the
    file server moved into its own process (``bench.fileserve``)."""

    def __init__(self, base: Path):
        self.base = base
        self.sandbox = BenchSandbox(base / "upparat2", hooks=INSTANT_HOOKS)
        self.wiretap: Wiretap | None = None
        self._sha256: dict[str, tuple[str, int]] = {}

    def start(self) -> "Rig":
        sb = self.sandbox
        sb.start(supervisor=False)
        presigner = sb.files
        presigner.stop()  # keep it only to presign; the same port serves from another process
        server = Child([sys.executable, "-m", "bench.fileserve", presigner.directory, presigner.port],
                       self.base / "fileserver.log", stdin_data=presigner.secret.hex().encode() + b"\n", cwd=REPO)
        sb.procs.append(server)
        wait_until(lambda: port_open(presigner.port) or not server.alive(), 10, "the file server to listen")
        if not server.alive():
            raise RuntimeError(f"file server did not start:\n{server.log()}")
        self.wiretap = Wiretap("127.0.0.1", sb.mqtt_port).start()
        return self

    def stop(self) -> None:
        if self.wiretap is not None:
            self.wiretap.stop()
        self.sandbox.stop()

    @property
    def emulator(self):
        return self.sandbox.emulator

    @property
    def files_dir(self) -> Path:
        return self.sandbox.path("files")

    def add_file(self, name: str, size: int) -> Path:
        """A random file, written once and read once so that every agent and
        every baseline reads it from the page cache."""
        path = self.files_dir / name
        with open(path, "wb") as fh:
            left = size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                fh.write(chunk)
                left -= len(chunk)
        self._sha256[name] = (sha256_of(path), size)
        return path

    def digest(self, name: str) -> tuple[str, int]:
        return self._sha256[name]

    def url(self, name: str) -> str:
        return self.sandbox.files.presign(f"{BUCKET}/{name}")


class Agent:
    """What the bench needs from an agent under test."""

    label: str
    thing: str
    base: Path
    child: Child | None = None
    ready_signal: str  # what "ready" means for this agent, for the report
    expected_processes: tuple[str, ...]  # process kinds (see procfs.process_kind) of a healthy agent

    def start(self) -> float:
        raise NotImplementedError

    def wait_ready(self, started: float, timeout: float) -> dict:
        raise NotImplementedError

    def document(self, name: str, version: str) -> dict:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        return self.child.pid

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def stamp(self, version: str) -> Path:
        return self.base / "stamps" / f"install-{version}"

    def running(self) -> str:
        kinds = [procfs.process_kind(procfs.cmdline(pid)) for pid in procfs.tree(self.pid)] if self.child else []
        missing = [k for k in self.expected_processes if k not in kinds]
        return f"running: {', '.join(kinds) or 'nothing'}" + (f"; missing: {', '.join(missing)}" if missing else "")

    def check_processes(self, ready_at: float, figures: str) -> None:
        """All of the agent's processes must still run ``LIVENESS_S`` after it
        was ready: a child that crashes at start-up would otherwise make the
        idle memory look small and every job wait."""
        time.sleep(max(0.0, ready_at + LIVENESS_S - time.time()))
        kinds = [procfs.process_kind(procfs.cmdline(pid)) for pid in procfs.tree(self.pid)]
        missing = [k for k in self.expected_processes if k not in kinds]
        if missing:
            raise AgentFailed(f"{self.label}: {', '.join(missing)} not running {LIVENESS_S:.0f} s after it was "
                              f"ready ({figures}; running: {', '.join(kinds) or 'nothing'})", self.log_tail())

    def stop(self) -> list[int]:
        """Stop by PID (SIGTERM, wait, SIGKILL); returns PIDs of the tree that
        outlived their parent and had to be killed here (should be none)."""
        if self.child is None:
            return []
        pids = procfs.tree(self.child.pid)
        self.child.stop()
        leftovers = []
        for pid in pids[1:]:
            try:
                wait_until(lambda: procfs.read_stat(pid) is None or procfs.read_stat(pid).state == "Z", 5,
                           f"pid {pid} to exit")
            except TimeoutError:
                leftovers.append(pid)
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        self.child = None
        return leftovers

    def log_tail(self, chars: int = 3000) -> str:
        return self.child.log()[-chars:] if self.child else ""


class Upparat2(Agent):
    label = "Upparat 2"
    ready_signal = ("the later of READY=1 (sd_notify: all children up) and the first jobs request on MQTT "
                    "(subscribed); all four processes still running 1 s later")
    expected_processes = ("upparat.supervisor", "upparat.broker_proc", "upparat.fetcher_proc",
                          "upparat.installer_proc")

    def __init__(self, rig: Rig, pythonpath: Path | None = None):
        self.rig = rig
        self.pythonpath = pythonpath  # run Upparat 2 from this tree instead of the checkout
        self.sandbox = rig.sandbox
        self.thing = THING
        self.base = self.sandbox.base
        (self.base / "stamps").mkdir(parents=True, exist_ok=True)
        self.notify_path = self.base / "notify.sock"
        self._notify: socket.socket | None = None
        self._notes: list[tuple[float, str]] = []
        self._runs = 0

    def _listen_notify(self) -> None:
        if self.notify_path.exists():
            self.notify_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.notify_path))
        self._notify = sock

        def reader():
            while True:
                try:
                    data = sock.recv(4096)
                except OSError:
                    return
                self._notes.append((time.time(), data.decode(errors="replace")))

        threading.Thread(target=reader, name="notify", daemon=True).start()

    def start(self) -> float:
        if self._notify is None:
            self._listen_notify()
        self._notes.clear()
        self._runs += 1
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path))
        if self.pythonpath is not None:
            env["PYTHONPATH"] = str(self.pythonpath)  # the supervisor hands it on to its children
        argv = [sys.executable, "-m", "upparat.supervisor", "-c", self.sandbox.path("upparat.conf")]
        started = time.time()
        self.child = Child(argv, self.sandbox.path("logs", f"supervisor-{self._runs}.log"), env=env)
        self.sandbox.supervisor = self.child
        return started

    def _notified_ready(self) -> float | None:
        return next((t for t, text in list(self._notes) if "READY=1" in text.split("\n")), None)

    def wait_ready(self, started: float, timeout: float) -> dict:
        try:
            first = self.rig.wiretap.first_request(self.thing, started, timeout)
            notified = wait_until(self._notified_ready, max(0.1, started + timeout - time.time()), "READY=1")
        except TimeoutError as exc:
            raise AgentFailed(f"{self.label} not ready: {exc} ({self.running()})", self.log_tail()) from None
        ready_at = max(first.t, notified)
        figures = {"ready_s": ready_at - started, "request_s": first.t - started, "notify_ready_s": notified - started}
        self.check_processes(ready_at, ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        return figures

    def document(self, name: str, version: str) -> dict:
        sha256, size = self.rig.digest(name)
        return self.sandbox.document(name, version, sha256=sha256, size=size)

    def stop(self) -> list[int]:
        leftovers = super().stop()
        self.sandbox.supervisor = None
        return leftovers

    def close(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            self.notify_path.unlink(missing_ok=True)


class Upparat112(Agent):
    label = "upparat 1.12"
    ready_signal = "first jobs request on MQTT (connected, subscribed); still running 1 s later"
    expected_processes = ("upparat.cli",)

    def __init__(self, rig: Rig, python: Path):
        self.rig = rig
        self.python = python
        self.thing = THING_112
        self.base = rig.base / "upparat112"
        self._runs = 0
        for sub in ("hooks", "state", "stamps", "dl", "logs"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "state" / "version").write_text("1.0.0\n")
        hooks = []
        for name, body in INSTANT_HOOKS.items():
            script = self.base / "hooks" / name
            script.write_text(body.format(base=self.base))
            script.chmod(0o755)
            hooks.append(f"{name} = {script}")
        self.config = self.base / "upparat.conf"
        self.config.write_text(
            "[service]\nlog_level = INFO\n"
            f"download_location = {self.base / 'dl'}\n\n"
            f"[broker]\nhost = 127.0.0.1\nport = {rig.sandbox.mqtt_port}\n"
            f"thing_name = {self.thing}\nclient_id = {self.thing}\n\n"
            "[hooks]\n" + "\n".join(hooks) + "\nretry_interval = 1\nmax_retries = 3\n")

    def start(self) -> float:
        self._runs += 1
        # cwd is its own directory: `-m` puts cwd first on sys.path, and the
        # bench's checkout holds another package named upparat.
        argv = [self.python, "-m", "upparat.cli", "-c", self.config]
        started = time.time()
        self.child = Child(argv, self.base / "logs" / f"upparat-{self._runs}.log", cwd=self.base)
        return started

    def wait_ready(self, started: float, timeout: float) -> dict:
        try:
            first = self.rig.wiretap.first_request(self.thing, started, timeout)
        except TimeoutError as exc:
            raise AgentFailed(f"{self.label} not ready: {exc} ({self.running()})", self.log_tail()) from None
        figures = {"ready_s": first.t - started, "request_s": first.t - started, "notify_ready_s": None}
        self.check_processes(first.t, f"ready_s {figures['ready_s']:.3f}")
        return figures

    def document(self, name: str, version: str) -> dict:
        # What 1.12 reads: version, file, meta, force. It verifies nothing.
        return {"version": version, "file": f"${{aws:iot:s3-presigned-url:{BUCKET}/{name}}}",
                "meta": version, "force": False}


class AgentFailed(RuntimeError):
    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


def ensure_upparat112(venv: Path, log=print) -> Path:
    """upparat 1.12 and its pins in ``venv`` (created once, reused after);
    built from the system interpreter the bench itself runs on, like the
    project's own venv, so that both agents run the same Python."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import upparat.cli, paho.mqtt.client, pysm, backoff, importlib.metadata as m; "
             "assert m.version('upparat') == '1.12' and m.version('paho-mqtt') < '2'"]
    # cwd: not the checkout, whose own upparat package would shadow 1.12's.
    if python.exists() and subprocess.run(check, capture_output=True, cwd=venv).returncode == 0:
        return python
    base_python = os.path.realpath(sys.executable)
    log(f"  creating {venv} with {base_python} and installing {' '.join(UPPARAT112_PINS)}")
    subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           *UPPARAT112_PINS], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(UPPARAT112_PINS)} failed:\n{proc.stdout}\n{proc.stderr}")
    subprocess.run(check, check=True, cwd=venv)
    return python


def installed_versions(python: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    import json
    proc = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True,
                          cwd=python.parent)
    return json.loads(proc.stdout)
