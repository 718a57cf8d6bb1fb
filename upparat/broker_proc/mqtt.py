"""paho-mqtt 2.x glue: connect, (re)subscribe, and turn callbacks into events
for the main loop. Only the public paho API; no subclassing.

paho's network thread (``loop_start``) owns the socket and reconnects; its
callbacks only append to a queue and write to an eventfd that the main
loop's poller watches together with the ZeroMQ sockets, so a message is
handled the moment it arrives, without a tick. Events: ("connected",) once
every subscription is acknowledged, ("disconnected",), ("message", topic,
payload).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import ssl
import sys
import threading

import paho.mqtt.client as mqtt

log = logging.getLogger("upparat.broker.mqtt")

MAX_PENDING_EVENTS = 10000  # a flood of messages is dropped beyond this, not buffered without end


def _memfd_path(name: str, text: str) -> str:
    """A path to PEM text held only in this process's memory: the key file
    itself may be readable by root only (the supervisor passed its content)."""
    fd = os.memfd_create(name, 0)
    os.write(fd, text.encode())
    return f"/proc/self/fd/{fd}"


def tls_context(broker_cfg, files: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if files.get("cafile"):
        context.load_verify_locations(cadata=files["cafile"])
    if files.get("certfile") and files.get("keyfile"):
        context.load_cert_chain(_memfd_path("cert", files["certfile"]), _memfd_path("key", files["keyfile"]))
        if broker_cfg.port == 443:
            # AWS IoT: MQTT with client certificates on 443 needs this ALPN.
            context.set_alpn_protocols(["x-amzn-mqtt-ca"])
    return context


def _no_delay(client, userdata, sock) -> None:
    """Small MQTT packets go out at once: with Nagle's algorithm, an update sent
    right after a PUBACK waits for the broker's delayed TCP ACK (up to 40 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a websocket wrapper): nothing to tune


class Connection:
    def __init__(self, broker_cfg, subscriptions: list[str], files: dict[str, str]):
        self.cfg = broker_cfg
        self.subscriptions = subscriptions
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._dropped = 0
        self._pending_mids: set[int] = set()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=broker_cfg.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(1000)
        if broker_cfg.ssl:
            self.client.tls_set_context(tls_context(broker_cfg, files))
        self.client.on_socket_open = _no_delay
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=60)
        self.client.loop_start()

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            os.close(self.wake_fd)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def events(self) -> list[tuple]:
        """Every event waiting, oldest first (main loop only)."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        with self._lock:
            events = list(self._events)
            self._events.clear()
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.error("dropped %d MQTT messages: they arrived faster than they could be handled", dropped)
        return events

    def _put(self, event: tuple) -> None:
        with self._lock:
            if event[0] == "message" and len(self._events) >= MAX_PENDING_EVENTS:
                self._dropped += 1
                return
            self._events.append(event)
        os.eventfd_write(self.wake_fd, 1)

    # ----- paho callbacks (network thread) ------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("MQTT connection refused by %s:%d: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        log.info("connected to %s:%d", self.cfg.host, self.cfg.port)
        result, mid = client.subscribe([(t, 1) for t in self.subscriptions])
        if result != mqtt.MQTT_ERR_SUCCESS:
            log.error("subscribe failed: %s", mqtt.error_string(result))
            return
        self._pending_mids = {mid}

    def _on_connect_fail(self, client, userdata):
        # paho calls this inside its ``except OSError`` block: the cause is the active exception.
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLCertVerificationError):
            cause = (f"the broker's TLS certificate does not verify ({exc.verify_message}): check that "
                     "[broker] cafile is the CA that signed it and that [broker] host matches its name")
        elif isinstance(exc, ssl.SSLError):
            cause = (f"TLS failed ({exc.reason or exc}): check [broker] certfile and keyfile (the device "
                     "certificate must be one the broker accepts), cafile and port")
        else:
            cause = str(exc) if exc else "unknown reason"
        log.error("cannot connect to the MQTT broker %s:%d: %s; retrying", self.cfg.host, self.cfg.port, cause)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if mid not in self._pending_mids:
            return
        self._pending_mids.discard(mid)
        failed = [self.subscriptions[i] for i, rc in enumerate(reason_codes) if rc.is_failure]
        if failed:
            # AWS answers a policy problem with a failing SUBACK (pitfall 22).
            log.error("broker refused subscriptions %s: check the device policy", failed)
            return
        self._put(("connected",))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("disconnected from the MQTT broker (%s); reconnecting", reason_code)
        else:
            log.info("disconnected from the MQTT broker")
        self._put(("disconnected",))

    def _on_message(self, client, userdata, message):
        self._put(("message", message.topic, bytes(message.payload)))
