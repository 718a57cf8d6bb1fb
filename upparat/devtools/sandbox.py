"""A complete local update rig: a real Mosquitto, the AWS IoT Jobs emulator,
a file server standing in for S3 presigned URLs, hook scripts, a config file
and the real ``upparat-supervisor`` with its three children.

Used by the demo (``upparat-demo``) and by the end-to-end tests, so that the
demo shows exactly what the tests prove. Every process it starts is stopped
by PID in ``stop()``. Development tool: never part of a device deployment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from upparat.devtools.faultproxy import FaultProxy
from upparat.devtools.fileserver import FileServer
from upparat.devtools.jobs_emulator import JobsEmulator

THING = "upparat-sandbox"
BUCKET = "https://upparat-demo.s3.amazonaws.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition()`` until truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("mosquitto is not installed: run scripts/bootstrap (Debian: apt-get install mosquitto)")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Child:
    """A process we started; stopped by PID (SIGTERM, wait, SIGKILL)."""

    def __init__(self, argv, log_path: Path, stdin_data: bytes | None = None, **kwargs):
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL if stdin_data is None else subprocess.PIPE, **kwargs)
        self.pid = self.popen.pid
        if stdin_data is not None:
            try:
                self.popen.stdin.write(stdin_data)
            except BrokenPipeError:
                pass
            finally:
                self.popen.stdin.close()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# Demo hooks. The "device" keeps its installed version in state/version;
# install copies the staged file to installed/ and remembers the version
# from meta; restart makes it current (a soft restart).
HOOK_SCRIPTS = {
    "version": """#!/bin/sh
cat "{base}/state/version"
""",
    "download": """#!/bin/sh
exit 0
""",
    "install": """#!/bin/sh
# argv: elapsed_s retry meta file
set -e
cp "$4" "{base}/installed/$(basename "$4")"
echo "$3" > "{base}/state/pending"
echo "installed $(basename "$4")"
""",
    "restart": """#!/bin/sh
# argv: elapsed_s retry meta force
mv "{base}/state/pending" "{base}/state/version"
""",
    "ready": """#!/bin/sh
exit 0
""",
}


class Sandbox:
    def __init__(self, base: Path, hooks: dict[str, str | None] | None = None, config_extra: str = "",
                 public_keys: list[Path] | None = None, job_prefix: str = "", seed_style: bool = False,
                 signing: bool = True, allow_unsigned: bool = False, mqtt_tls: bool = False,
                 network_faults: bool = False, hook_settings: dict[str, object] | None = None,
                 service_extra: str = ""):
        self.base = Path(base)
        self.hook_bodies = dict(HOOK_SCRIPTS)
        if hooks:
            self.hook_bodies.update(hooks)
        self.config_extra = config_extra
        self.public_keys = list(public_keys or [])
        # signing: a fresh Ed25519 release key whose public half the device trusts;
        # document() signs with it (statement v2) unless told otherwise.
        self.signing_key = None
        if signing:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ed25519

            self.signing_key = ed25519.Ed25519PrivateKey.generate()
            pub = self.base / "keys" / "release.pub"
            pub.parent.mkdir(parents=True, exist_ok=True)
            pub.write_bytes(self.signing_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            self.public_keys.append(pub)
        self.allow_unsigned = allow_unsigned
        # mqtt_tls: the device reaches Mosquitto only over mutual TLS (its own CA,
        # server and client certificates); the emulator keeps a plain local listener.
        self.mqtt_tls = mqtt_tls
        self.tls_port = 0
        self.tls: dict[str, Path] = {}
        self.job_prefix = job_prefix
        # seed_style: the config a user writes from the seed README: no [supervisor]
        # section, no download/staging locations, so every default is used.
        self.seed_style = seed_style
        self.procs: list[Child] = []
        self.mosquitto: Child | None = None
        self.supervisor: Child | None = None
        self.files: FileServer | None = None
        self.emulator: JobsEmulator | None = None
        self.mqtt_port = 0
        # network_faults: the device reaches Mosquitto and the file server through a
        # FaultProxy each (mqtt_proxy, http_proxy); the emulator and tests reach them directly.
        self.network_faults = network_faults
        self.mqtt_proxy: FaultProxy | None = None
        self.http_proxy: FaultProxy | None = None
        # [hooks] bounds (retry_interval, max_retries, timeout, version_confirm_window) and
        # extra [service] lines, e.g. short ones for the reliability runs.
        self.hook_settings = {"retry_interval": 1, "max_retries": 3, "timeout": 60, "version_confirm_window": 10,
                              **(hook_settings or {})}
        self.service_extra = service_extra

    # -- layout -------------------------------------------------------------
    def path(self, *parts) -> Path:
        return self.base.joinpath(*parts)

    def prepare(self) -> None:
        for sub in ("hooks", "state", "installed", "files", "logs", "dl"):
            self.path(sub).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.path("dl").chmod(0o755)
        if not self.path("state", "version").exists():
            self.path("state", "version").write_text("1.0.0\n")
        for name, body in self.hook_bodies.items():
            if body is None:
                continue
            script = self.path("hooks", name)
            script.write_text(body.format(base=self.base))
            script.chmod(0o755)
        self.write_config()

    def write_config(self) -> Path:
        hooks = "\n".join(f"{n} = {self.path('hooks', n)}" for n, b in self.hook_bodies.items() if b is not None)
        keys = ",".join(str(k) for k in self.public_keys)
        locations = "" if self.seed_style else (
            f"download_location = {self.path('dl')}\nstaging_location = {self.path('staging')}\n"
            f"state_location = {self.path('state-dirs')}\n")
        supervisor = "" if self.seed_style else f"[supervisor]\nruntime_dir = {self.path('run')}\n"
        tls = "".join(f"{key} = {self.tls[key]}\n" for key in ("cafile", "certfile", "keyfile") if key in self.tls)
        verification = "".join(line + "\n" for line in (
            f"public_keys = {keys}" if keys else "", "allow_unsigned = true" if self.allow_unsigned else "") if line)
        verification = f"[verification]\n{verification}" if verification else ""
        service_extra = self.service_extra.strip() + "\n" if self.service_extra.strip() else ""
        bounds = "".join(f"{key} = {value}\n" for key, value in self.hook_settings.items())
        text = f"""[service]
log_level = DEBUG
{locations}{service_extra}{f"job_prefix = {self.job_prefix}" if self.job_prefix else ""}

[broker]
host = 127.0.0.1
port = {self.device_mqtt_port or 1883}
thing_name = {THING}
client_id = upparat-{THING}
{tls}
[hooks]
{hooks}
{bounds}
{verification}
{supervisor}{self.config_extra}
"""
        self.path("upparat.conf").write_text(text)
        return self.path("upparat.conf")

    @property
    def device_mqtt_port(self) -> int:
        """The port the device connects to: Mosquitto's, its TLS listener's, or the proxy's."""
        if self.mqtt_proxy is not None:
            return self.mqtt_proxy.port
        return self.tls_port if self.mqtt_tls else self.mqtt_port

    # -- lifecycle ----------------------------------------------------------
    def start(self, supervisor: bool = True) -> "Sandbox":
        self.prepare()
        self.mqtt_port = free_port()
        conf = self.path(f"mosquitto-{self.mqtt_port}.conf")
        # set_tcp_nodelay: like AWS IoT, the broker forwards small packets at once
        # (Mosquitto's default leaves Nagle's algorithm on, ~40 ms per hop).
        text = (f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "set_tcp_nodelay true\n")
        if self.mqtt_tls:
            self.tls_port = free_port()
            material = make_tls_material(self.path("tls"))
            self.tls = {"cafile": material["ca"], "certfile": material["client_cert"],
                        "keyfile": material["client_key"]}
            text += (f"per_listener_settings false\nlistener {self.tls_port} 127.0.0.1\n"
                     f"cafile {material['ca']}\ncertfile {material['server_cert']}\n"
                     f"keyfile {material['server_key']}\nrequire_certificate true\n")
        conf.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))
        self._start_mosquitto()
        self.files = FileServer(self.path("files"))
        self.files.start()
        presign = self.files.presign
        if self.network_faults:
            if self.mqtt_tls:
                raise ValueError("network_faults proxies the plain MQTT listener only")
            self.mqtt_proxy = FaultProxy(self.mqtt_port, name="mqtt-proxy").start()
            self.http_proxy = FaultProxy(self.files.port, name="http-proxy").start()
            direct, proxied = self.files.base_url, f"http://127.0.0.1:{self.http_proxy.port}"

            def presign_via_proxy(s3_url: str) -> str:  # the signature covers the path only
                return self.files.presign(s3_url).replace(direct, proxied, 1)

            presign = presign_via_proxy
        self.emulator = JobsEmulator(host="127.0.0.1", port=self.mqtt_port, presign=presign)
        self.emulator.start()
        self.write_config()
        if supervisor:
            self.start_supervisor()
        return self

    def _start_mosquitto(self) -> Child:
        conf = self.path(f"mosquitto-{self.mqtt_port}.conf")
        self.mosquitto = Child([mosquitto_binary(), "-c", conf], self.path("logs", "mosquitto.log"))
        self.procs.append(self.mosquitto)
        wait_until(lambda: (port_open(self.mqtt_port) and (not self.mqtt_tls or port_open(self.tls_port)))
                   or not self.mosquitto.alive(), 10, "mosquitto to listen")
        if not self.mosquitto.alive():
            raise RuntimeError(f"mosquitto did not start:\n{self.mosquitto.log()}")
        return self.mosquitto

    def restart_mosquitto(self, down_for: float = 0.0, hard: bool = True) -> Child:
        """Stop Mosquitto (SIGKILL when ``hard``, else SIGTERM), wait ``down_for`` s,
        start it again on the same port. Nothing of its sessions survives (no persistence)."""
        old = self.mosquitto
        if hard and old.alive():
            os.kill(old.pid, signal.SIGKILL)
        old.stop()
        self.procs.remove(old)
        time.sleep(down_for)  # an outage of this length is the experiment, not a wait for a condition
        return self._start_mosquitto()

    def start_supervisor(self) -> Child:
        argv = [sys.executable, "-m", "upparat.supervisor", "-c", self.path("upparat.conf"), "-v"]
        self.supervisor = Child(argv, self.path("logs", "supervisor.log"))
        self.procs.append(self.supervisor)
        return self.supervisor

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.emulator is not None:
            self.emulator.stop()
        for proxy in (self.mqtt_proxy, self.http_proxy):
            if proxy is not None:
                proxy.stop()
        if self.files is not None:
            self.files.stop()
        for proc in reversed(self.procs):
            proc.stop()

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- jobs ---------------------------------------------------------------
    def add_file(self, name: str, data: bytes) -> Path:
        target = self.path("files", name)
        target.write_bytes(data)
        return target

    def document(self, name: str, version: str, sha256: str | None = None, size: int | None = None,
                 signature: str | None = None, meta: str | None = None, force: bool = False,
                 serial: int | None = None, sign: bool = True, **extra) -> dict:
        """A job document for files/<name>, signed with the sandbox's release key
        (statement v2) unless ``sign`` is False or a ``signature`` is given.
        ``extra`` fields are set after signing (to play an attacker)."""
        from upparat import signature as signature_mod
        from upparat.release import Release

        path = self.path("files", name)
        release = Release(version=version, meta=version if meta is None else meta, force=force,
                          sha256=sha256 if sha256 is not None else sha256_of(path),
                          size=size if size is not None else path.stat().st_size, serial=serial)
        if signature is None and sign and self.signing_key is not None:
            signature = signature_mod.sign(self.signing_key, release)
        doc = {
            "version": release.version,
            "file": f"${{aws:iot:s3-presigned-url:{BUCKET}/{name}}}",
            "meta": release.meta,
            "force": release.force,
            "sha256": release.sha256,
            "size": release.size,
            "serial": release.serial,
            "signature": signature,
        }
        doc.update(extra)
        return {k: v for k, v in doc.items() if v is not None}

    def create_job(self, job_id: str, document: dict) -> None:
        self.emulator.create_job(job_id, document, [THING])

    def wait_for_job(self, job_id: str, statuses=("SUCCEEDED", "FAILED"), timeout: float = 60.0) -> dict:
        return self.emulator.wait_for_status(job_id, THING, set(statuses), timeout)

    def execution(self, job_id: str) -> dict | None:
        return self.emulator.execution(job_id, THING)

    def logs(self) -> str:
        return self.supervisor.log() if self.supervisor else ""


def make_tls_material(directory: Path, ca_name: str = "upparat-test-ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    import ipaddress

    for role, usage, san in (("server", ExtendedKeyUsageOID.SERVER_AUTH,
                              [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                             ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(THING)])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"upparat-test-{role}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[f"{role}_cert"] = directory / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = directory / f"{role}.key"
        write_key(key, out[f"{role}_key"])
    return out


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def describe(execution: dict | None) -> str:
    if execution is None:
        return "no such execution"
    details = execution.get("statusDetails") or {}
    return f"{execution.get('status')} {json.dumps(details, sort_keys=True)}"
