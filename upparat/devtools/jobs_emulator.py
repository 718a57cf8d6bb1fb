"""A local AWS IoT Jobs emulator (the AWS side) over an ordinary MQTT broker such as Mosquitto.

Development and test tool, never part of a device installation. It lets Upparat (or any
device agent) run its whole job lifecycle without a cloud account.

Contract:
- ``JobsEmulator(host, port, presign)`` connects one paho-mqtt 2.x client, subscribes to the
  device request topics of every thing (``$aws/things/+/jobs/get``, ``.../start-next``,
  ``.../+/get``, ``.../+/update``) and answers them on ``<request>/accepted|rejected``; it
  publishes ``notify`` / ``notify-next`` when a thing's pending set or head changes.
- Deviation from AWS that a device must live with: Mosquitto only delivers to subscribers,
  so a device must subscribe to its reply topics (AWS pushes them unsubscribed). Replies
  are visible to every subscriber, not only the requester; correlate by ``clientToken``.
- All replies and notifications are published at QoS 1 (``reply_qos``), never retained.
- ``presign(s3_url) -> url`` replaces ``${aws:iot:s3-presigned-url:<url>}`` in every string
  of a job document on every delivery (start-next, describe, notify-next, update with
  ``includeJobDocument``); ``None`` leaves placeholders as they are.
- Thread-safe: the paho network thread answers requests while a test thread creates or
  cancels jobs; one lock serialises every access to the store and the publications that
  follow from it, so notifications go out in the order the state changed.
- The AWS behaviour itself, and the table of choices made where AWS is not documented,
  live in ``jobs_emulator_store`` (pure logic, unit-tested without a broker).

Command line: ``upparat-jobs-emulator --mqtt-host H --mqtt-port P --http-port 8081`` runs the
emulator plus a small JSON control API on 127.0.0.1 (see ``jobs_emulator_http``). With
``--files DIR`` it also stands in for S3: a file server on DIR, presigned URLs to it, and
uploads through the control API (``upparat-jobs --emulator URL create`` uses them).
Exit codes: 0 clean stop (SIGTERM/SIGINT), 1 the broker could not be reached, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from upparat.devtools.jobs_emulator_store import JobStore, Publication

log = logging.getLogger("upparat.devtools.jobs_emulator")

REQUEST_FILTERS = (
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
)


class JobsEmulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883,
                 presign: Callable[[str], str] | None = None, *,
                 reply_qos: int = 1, include_thing_name: bool = False,
                 merge_status_details: bool = False, strip_nulls: bool = False,
                 start_timeout: float = 10.0, client_id: str | None = None):
        self._host = host
        self._port = port
        self._reply_qos = reply_qos
        self._start_timeout = start_timeout
        self._client_id = client_id or f"upparat-jobs-emulator-{os.getpid()}-{secrets.token_hex(3)}"
        self._store = JobStore(presign=presign, clock=time.time,
                               include_thing_name=include_thing_name,
                               merge_status_details=merge_status_details,
                               strip_nulls=strip_nulls)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # woken after every state change
        self._client: mqtt.Client | None = None
        self._subscribe_mid: int | None = None
        self._ready = threading.Event()
        self._failure: str | None = None
        self.faults = EmulatorFaults()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect and subscribe; return once the broker granted every subscription."""
        if self._client is not None:
            raise RuntimeError("emulator already started")
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self._client_id, protocol=mqtt.MQTTv311,
                             clean_session=True)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        try:
            client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            self._client = None
            raise ConnectionError(f"jobs emulator: cannot reach MQTT broker "
                                  f"{self._host}:{self._port}: {exc}") from exc
        client.loop_start()
        if not self._ready.wait(self._start_timeout) or self._failure:
            reason = self._failure or f"no SUBACK within {self._start_timeout}s"
            self.stop()
            raise ConnectionError(f"jobs emulator: could not subscribe on "
                                  f"{self._host}:{self._port}: {reason}")
        log.info("jobs emulator ready on %s:%s", self._host, self._port)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # ------------------------------------------------------------------ controller API

    def create_job(self, job_id: str, document: dict, things: list[str]) -> None:
        self._apply(self._store.create_job, job_id, document, things)
        log.info("created job %s for %s", job_id, ", ".join(things))

    def cancel_job(self, job_id: str, force: bool = False) -> None:
        self._apply(self._store.cancel_job, job_id, force)
        log.info("canceled job %s (force=%s)", job_id, force)

    def delete_execution(self, job_id: str, thing: str, force: bool = False) -> None:
        self._apply(self._store.delete_execution, job_id, thing, force)
        log.info("deleted execution of job %s on %s (force=%s)", job_id, thing, force)

    def execution(self, job_id: str, thing: str) -> dict | None:
        with self._lock:
            return self._store.execution(job_id, thing)

    def job(self, job_id: str) -> dict | None:
        with self._lock:
            return self._store.job(job_id)

    def wait_for_status(self, job_id: str, thing: str, statuses: set[str], timeout: float) -> dict:
        """The snapshot once the execution's status is in ``statuses``; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                snapshot = self._store.execution(job_id, thing)
                if snapshot is not None and snapshot["status"] in statuses:
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"job {job_id} on {thing} did not reach "
                                       f"{sorted(statuses)} within {timeout}s; last: {snapshot}")
                self._changed.wait(remaining)

    # ------------------------------------------------------------------ MQTT glue

    def _apply(self, operation, *args) -> None:
        with self._changed:
            publications = operation(*args)
            self._publish(publications)
            self._changed.notify_all()

    def _publish(self, publications: list[Publication]) -> None:
        # Called with the lock held: paho's publish() only queues, and publishing under the
        # lock keeps notifications in the order of the state changes that caused them.
        client = self._client
        for pub in publications:
            log.debug("-> %s %s", pub.topic, pub.payload)
            if client is None:
                continue  # not started (or stopped): nobody could be listening anyway
            client.publish(pub.topic, json.dumps(pub.payload, separators=(",", ":")),
                           qos=self._reply_qos, retain=False)

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties):
        if reason_code.is_failure:
            self._failure = f"CONNACK refused: {reason_code}"
            self._ready.set()
            return
        # Clean session: subscribe on every (re)connect.
        _rc, self._subscribe_mid = client.subscribe([(f, 1) for f in REQUEST_FILTERS])

    def _on_subscribe(self, _client, _userdata, mid, reason_codes, _properties):
        if mid != self._subscribe_mid:
            return
        failed = [f for f, rc in zip(REQUEST_FILTERS, reason_codes) if rc.is_failure]
        if failed:
            self._failure = f"SUBACK refused {failed}"
        self._ready.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties):
        if self._client is not None:
            log.warning("jobs emulator disconnected (%s); paho reconnects", reason_code)

    def _on_message(self, _client, _userdata, message):
        log.debug("<- %s %r", message.topic, message.payload[:200])
        rule = self.faults.take(message.topic, message.payload)
        if rule is None:
            self._apply(self._store.handle, message.topic, message.payload)
            return
        with self._changed:
            if rule.action == "reject":
                request = _json_object(message.payload)
                reply = {"timestamp": int(time.time()), "code": rule.code, "message": "injected by the emulator"}
                if isinstance(request.get("clientToken"), str):
                    reply["clientToken"] = request["clientToken"]
                self._publish([Publication(message.topic + "/rejected", reply)])
                return
            publications = self._store.handle(message.topic, message.payload)
            self._changed.notify_all()
            replies = [p for p in publications if p.topic.startswith(message.topic + "/")]
            others = [p for p in publications if p not in replies]
            self._publish(others)
        if rule.action == "delay":
            timer = threading.Timer(rule.seconds, self._publish_locked, (replies,))
            timer.daemon = True
            timer.start()
        # "drop": the change is stored, the reply never arrives

    def _publish_locked(self, publications: list[Publication]) -> None:
        with self._lock:
            self._publish(publications)


def _no_delay(client, userdata, sock) -> None:
    """Replies go out at once (AWS answers without Nagle's delay either)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


@dataclass
class FaultRule:
    state: str | None  # statusDetails.state of the update it applies to; None: any update
    action: str  # "reject" (with ``code``, nothing stored), "drop" (stored, no reply), "delay" (reply later)
    times: int
    code: str = "RequestThrottled"
    seconds: float = 0.0


class EmulatorFaults:
    """Faults for UpdateJobExecution requests, for tests of the device's
    retries and ordering: reject an update (e.g. ``RequestThrottled``), store
    it but lose the reply, or send the reply late."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self.applied: list[tuple[str, str | None]] = []  # (action, state)

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def take(self, topic: str, payload: bytes) -> FaultRule | None:
        if not topic.endswith("/update"):
            return None
        details = _json_object(payload).get("statusDetails")
        state = details.get("state") if isinstance(details, dict) else None
        with self._lock:
            for rule in self._rules:
                if rule.times > 0 and rule.state in (None, state):
                    rule.times -= 1
                    self.applied.append((rule.action, state))
                    return rule
        return None


def _json_object(payload: bytes) -> dict:
    try:
        body = json.loads(payload or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# ---------------------------------------------------------------------- command line

def fake_presigner(base_url: str, expires: int = 3600) -> Callable[[str], str]:
    """Map an S3 URL to ``<base_url>/<last path segment>`` with a fresh fake signature per
    call, so that each delivery differs like AWS's (pitfall 13). A static file server
    ignores the query string."""
    def presign(s3_url: str) -> str:
        name = urllib.parse.urlsplit(s3_url).path.rsplit("/", 1)[-1]
        query = urllib.parse.urlencode({
            "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "X-Amz-Expires": str(expires),
            "X-Amz-Signature": secrets.token_hex(32),
        })
        return f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}?{query}"
    return presign


def main(argv: list[str] | None = None) -> int:
    from upparat.devtools.jobs_emulator_http import ControlServer

    parser = argparse.ArgumentParser(
        prog="upparat-jobs-emulator",
        description="Local AWS IoT Jobs emulator over an MQTT broker, with a JSON control API.")
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--http-port", type=int, default=8081,
                        help="control API port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--presign-base", metavar="URL",
                        help="replace ${aws:iot:s3-presigned-url:<s3 url>} by "
                             "URL/<file name>?<fresh fake signature> on every delivery")
    parser.add_argument("--files", metavar="DIR",
                        help="stand in for S3: serve DIR/<bucket>/<key> over HTTP, presign "
                             "${aws:iot:s3-presigned-url:https://<host>/<bucket>/<key>} to it, and accept "
                             "uploads on the control API (PUT /files/<bucket>/<key>)")
    parser.add_argument("--files-host", default="127.0.0.1",
                        help="address the file server listens on and puts into URLs (default 127.0.0.1)")
    parser.add_argument("--files-port", type=int, default=0, help="file server port (default: a free one)")
    parser.add_argument("--max-file-size", type=int, default=4 * 1024**3, metavar="BYTES",
                        help="largest upload accepted (default 4 GiB)")
    parser.add_argument("--thing-name-in-execution", action="store_true",
                        help="include thingName in JobExecution payloads (AWS docs vs captures)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every message")
    args = parser.parse_args(argv)
    if args.files and args.presign_base:
        parser.error("--files and --presign-base both choose where presigned URLs lead: give one")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s upparat-jobs-emulator %(levelname)s %(message)s")

    stop = threading.Event()
    # Handlers only set the event; the main thread does the stopping.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    presign = fake_presigner(args.presign_base) if args.presign_base else None
    files = store = None
    if args.files:
        from upparat.devtools.fileserver import FileServer
        from upparat.devtools.jobs_emulator_files import FileStore

        directory = Path(args.files)
        if not directory.is_dir():
            parser.error(f"--files {args.files}: no such directory")
        store = FileStore(directory, max_size=args.max_file_size)
        try:
            files = FileServer(directory, host=args.files_host, port=args.files_port).start()
        except OSError as exc:
            log.error("cannot serve files on %s:%s: %s", args.files_host, args.files_port, exc)
            return 1
        presign = files.presign
    emulator = JobsEmulator(args.mqtt_host, args.mqtt_port, presign,
                            include_thing_name=args.thing_name_in_execution)
    try:
        emulator.start()
    except ConnectionError as exc:
        log.error("%s", exc)
        if files is not None:
            files.stop()
        return 1
    try:
        server = ControlServer(emulator, "127.0.0.1", args.http_port, files=store)
    except OSError as exc:
        log.error("cannot listen on 127.0.0.1:%s: %s", args.http_port, exc)
        emulator.stop()
        if files is not None:
            files.stop()
        return 1
    server.start()
    # One stable line that scripts and tests can wait for.
    print(f"upparat-jobs-emulator ready: mqtt {args.mqtt_host}:{args.mqtt_port} "
          f"control http://127.0.0.1:{server.port}"
          + (f" files {files.base_url}" if files is not None else ""), flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping")
        server.stop()
        emulator.stop()
        if files is not None:
            files.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
