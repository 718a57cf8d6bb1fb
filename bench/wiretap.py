"""A listener on the device -> AWS request topics, seen from the cloud side.

It subscribes (QoS 1) to every request a device can publish to AWS IoT Jobs
and records each with its arrival time (``time.time()``), so that the bench
counts and times what any agent (upparat 1.12 or 2) sends, without relying on
the agent's logs:

- ``first_request(thing, after)``: the agent is connected and subscribed
  (both agents publish their first ``get``/``start-next`` once subscribed);
- ``updates(thing, job_id)``: UpdateJobExecution publishes, with payload and
  estimated on-the-wire size of the PUBLISH packet;
- ``wait_status(...)``: the arrival of the update that reports a status.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

FILTERS = (
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
)


@dataclass(frozen=True)
class Seen:
    t: float  # time.time() at arrival
    topic: str
    payload: bytes
    qos: int

    @property
    def thing(self) -> str:
        return self.topic.split("/")[2]

    @property
    def verb(self) -> str:
        return self.topic.rsplit("/", 1)[1]

    @property
    def job_id(self) -> str | None:
        parts = self.topic.split("/")
        return parts[4] if len(parts) == 6 else None

    def status(self) -> str | None:
        try:
            body = json.loads(self.payload)
        except ValueError:
            return None
        return body.get("status") if isinstance(body, dict) else None

    @property
    def wire_bytes(self) -> int:
        """Size of the MQTT 3.1.1 PUBLISH packet that carried it: fixed header,
        remaining length, topic (2 + n), packet id for QoS > 0, payload."""
        remaining = 2 + len(self.topic.encode()) + (2 if self.qos else 0) + len(self.payload)
        length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
        return 1 + length_bytes + remaining


class Wiretap:
    def __init__(self, host: str, port: int):
        self._host, self._port = host, port
        self._seen: list[Seen] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=f"upparat-bench-wiretap-{time.monotonic_ns()}",
                                   protocol=mqtt.MQTTv311, clean_session=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> "Wiretap":
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(timeout):
            self.stop()
            raise ConnectionError("wiretap: no SUBACK from the broker")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties):
        if not reason_code.is_failure:
            client.subscribe([(f, 1) for f in FILTERS])

    def _on_message(self, _client, _userdata, message):
        seen = Seen(time.time(), message.topic, bytes(message.payload), message.qos)
        with self._cond:
            self._seen.append(seen)
            self._cond.notify_all()

    # -- queries ----------------------------------------------------------------
    def seen(self) -> list[Seen]:
        with self._cond:
            return list(self._seen)

    def _wait(self, predicate, timeout: float, what: str) -> Seen:
        deadline = time.monotonic() + timeout
        checked = 0  # each message is looked at once, however many arrive
        with self._cond:
            while True:
                for item in self._seen[checked:]:
                    if predicate(item):
                        return item
                checked = len(self._seen)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:.0f} s")
                self._cond.wait(remaining)

    def first_request(self, thing: str, after: float, timeout: float) -> Seen:
        """The first jobs request of ``thing`` that arrived after ``after``."""
        return self._wait(lambda s: s.thing == thing and s.t >= after and s.verb in ("get", "start-next"),
                          timeout, f"jobs request from {thing}")

    def wait_status(self, thing: str, job_id: str, statuses: set[str], timeout: float) -> Seen:
        return self._wait(lambda s: s.thing == thing and s.job_id == job_id and s.verb == "update"
                          and s.status() in statuses, timeout, f"update {sorted(statuses)} for job {job_id}")

    def updates(self, thing: str, job_id: str) -> list[Seen]:
        return [s for s in self.seen() if s.thing == thing and s.job_id == job_id and s.verb == "update"]
