"""Entry point: python -m upparat.broker_proc (--from-supervisor | -c CONFIG).

One loop waits on everything at once — the MQTT events (an eventfd written
by paho's network thread), the installer's and the fetcher's sockets, and a
self-pipe for SIGTERM — with the lifecycle's next deadline as the timeout.
A message or reply is handled the moment it arrives.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import zmq

from upparat import launch
from upparat.broker_proc.jobs_api import Topics
from upparat.broker_proc.lifecycle import Agent
from upparat.broker_proc.mqtt import Connection
from upparat.broker_proc.peers import FetcherPeer, InstallerPeer

log = logging.getLogger("upparat.broker")
HEARTBEAT_S = 1.0  # the loop wakes at least this often, to beat the supervisor's heartbeat


def main(argv=None) -> int:
    ctx = launch.start_child("broker", unprivileged=True, argv=argv)
    cfg = ctx.config
    zctx = zmq.Context()
    installer = InstallerPeer(zctx, ctx.layout.installer_endpoint)
    fetcher = FetcherPeer(zctx, ctx.layout.fetcher_endpoint)
    signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
    conn = None
    try:
        conn = Connection(cfg.broker, Topics(cfg.broker.thing_name).subscriptions(), ctx.tls)
        agent = Agent(cfg, conn.publish, installer, fetcher, ctx.layout.broker_state_dir)
        log.info("thing %s, broker %s:%d, job prefix %r", cfg.broker.thing_name, cfg.broker.host,
                 cfg.broker.port, cfg.service.job_prefix)
        poller = zmq.Poller()
        poller.register(conn.wake_fd, zmq.POLLIN)
        poller.register(installer.sock, zmq.POLLIN)
        poller.register(fetcher.sock, zmq.POLLIN)
        poller.register(signal_r, zmq.POLLIN)
        conn.start()
        while not ctx.stop.is_set():
            deadline = agent.next_deadline()
            timeout = HEARTBEAT_S if deadline is None else min(HEARTBEAT_S, max(0.0, deadline - time.monotonic()))
            ready = dict(poller.poll(timeout * 1000))
            if signal_r in ready:
                while True:
                    try:
                        if not os.read(signal_r, 64):
                            break
                    except BlockingIOError:
                        break
            if conn.wake_fd in ready:
                for event in conn.events():
                    if event[0] == "connected":
                        agent.handle_connected()
                    elif event[0] == "disconnected":
                        agent.handle_disconnected()
                    else:
                        agent.handle_message(event[1], event[2])
            if installer.sock in ready:
                for message in installer.receive():
                    agent.handle_installer(message)
            if fetcher.sock in ready:
                for message in fetcher.receive():
                    agent.handle_fetcher(message)
            agent.on_time()
            ctx.heartbeat.beat(**agent.status())
    finally:
        signal.set_wakeup_fd(-1)
        if conn is not None:
            conn.stop()
        installer.close()
        fetcher.close()
        zctx.term()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
