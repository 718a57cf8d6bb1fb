"""Entry point: python -m upparat.broker_proc (--from-supervisor | -c CONFIG)."""

from __future__ import annotations

import logging
import queue
import sys

import zmq

from upparat import launch
from upparat.broker_proc.jobs_api import Topics
from upparat.broker_proc.lifecycle import Agent
from upparat.broker_proc.mqtt import Connection
from upparat.ipc import fetcher_protocol, installer_protocol
from upparat.ipc.wire import Client

log = logging.getLogger("upparat.broker")
TICK = 0.25


def main(argv=None) -> int:
    ctx = launch.start_child("broker", unprivileged=True, argv=argv)
    cfg = ctx.config
    zctx = zmq.Context()
    fetcher = Client(zctx, launch.fetcher_endpoint(cfg), fetcher_protocol.REPLIES, timeout_s=5.0)
    installer = Client(zctx, launch.installer_endpoint(cfg), installer_protocol.REPLIES, timeout_s=5.0)
    events: queue.Queue = queue.Queue()
    agent = None
    conn = None
    try:
        conn = Connection(cfg.broker, Topics(cfg.broker.thing_name).subscriptions(), events, ctx.files)
        agent = Agent(cfg, conn.publish, fetcher, installer)
        log.info("thing %s, broker %s:%d, job prefix %r", cfg.broker.thing_name, cfg.broker.host,
                 cfg.broker.port, cfg.service.job_prefix)
        conn.start()
        while not ctx.stop.is_set():
            try:
                event = events.get(timeout=TICK)
            except queue.Empty:
                event = None
            if event is not None:
                if event[0] == "connected":
                    agent.handle_connected()
                elif event[0] == "disconnected":
                    agent.handle_disconnected()
                elif event[0] == "message":
                    agent.handle_message(event[1], event[2])
            agent.tick()
    finally:
        if conn is not None:
            conn.stop()
        fetcher.close()
        installer.close()
        zctx.term()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
