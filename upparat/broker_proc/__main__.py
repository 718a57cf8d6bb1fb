"""Entry point: python -m upparat.broker_proc (--from-supervisor | -c CONFIG).

One loop waits on everything at once — the MQTT events (an eventfd written
by paho's network thread), the installer's and the fetcher's sockets, a
self-pipe for SIGTERM and, with Sentry on, the root processes' error
records on stdin — with the lifecycle's next deadline as the timeout.
A message or reply is handled the moment it arrives.
"""

from __future__ import annotations

import logging
import sys
import time

import zmq

from upparat import launch
from upparat.wakeup import Wakeup
from upparat.broker_proc.jobs_api import Topics
from upparat.broker_proc.lifecycle import Agent
from upparat.broker_proc.mqtt import Connection
from upparat.broker_proc.peers import FetcherPeer, InstallerPeer
from upparat.broker_proc.problems import ProblemRelay

log = logging.getLogger("upparat.broker")
HEARTBEAT_S = 1.0  # the loop wakes at least this often, to beat the supervisor's heartbeat


def main(argv=None) -> int:
    ctx = launch.start_child("broker", unprivileged=True, argv=argv)
    cfg = ctx.config
    zctx = zmq.Context()
    installer = InstallerPeer(zctx, ctx.layout.installer_endpoint)
    fetcher = FetcherPeer(zctx, ctx.layout.fetcher_endpoint)
    signals = Wakeup()
    signals.catch_signals()
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
        poller.register(signals.read_fd, zmq.POLLIN)
        watched = {peer.client.watch_connections(): peer for peer in (installer, fetcher)}
        for monitor in watched:
            poller.register(monitor, zmq.POLLIN)
        relay = None
        if ctx.problems_fd is not None:
            relay = ProblemRelay(ctx.problems_fd, cfg.broker.thing_name, ctx.problems_rest)
            poller.register(relay.fd, zmq.POLLIN)
        conn.start()
        while not ctx.stop.is_set():
            deadline = agent.next_deadline()
            timeout = HEARTBEAT_S if deadline is None else min(HEARTBEAT_S, max(0.0, deadline - time.monotonic()))
            ready = dict(poller.poll(timeout * 1000))
            if signals.read_fd in ready:
                signals.drain()
            if conn.wake_fd in ready:
                for event in conn.events():
                    if event[0] == "connected":
                        agent.handle_connected()
                    elif event[0] == "disconnected":
                        agent.handle_disconnected()
                    else:
                        agent.handle_message(event[1], event[2])
            if relay is not None and relay.fd in ready:
                relay.read_ready()
                if not relay.open:
                    poller.unregister(relay.fd)
                    relay = None
            if installer.sock in ready:
                for message in installer.receive():
                    agent.handle_installer(message)
            if fetcher.sock in ready:
                for message in fetcher.receive():
                    agent.handle_fetcher(message)
            for monitor, peer in watched.items():
                if monitor in ready and peer.client.connections_ready():
                    agent.handle_peer_connected(peer.name)
            agent.on_time()
            ctx.heartbeat.beat(**agent.status())
    finally:
        signals.close()
        if conn is not None:
            conn.stop()
        installer.close()
        fetcher.close()
        zctx.term()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
