"""The broker's calls to its two peers, named after the handlers that answer
them: ``InstallerPeer.open_job()`` is answered by the installer's
``answer_open_job()``, ``FetcherPeer.fetch()`` by the fetcher's
``answer_fetch()`` (OpenSSH's ``mm_x``/``mm_answer_x``).

Calls never wait: they send on a DEALER (upparat.ipc.wire.Client) and
return whether the message left; replies and pushes arrive on the same
socket and are read in one place, ``receive()``, by the broker's main loop,
which hands them to the lifecycle. Every request carries a fresh ``seq``;
the servers make requests idempotent per (job id, execution, step), so
sending one again after a lost reply is always safe.
"""

from __future__ import annotations

import itertools
import time

import zmq

from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc.wire import Client, Message, Ping
from upparat.release import Release


class _Peer:
    def __init__(self, context: zmq.Context, endpoint: str, replies, name: str):
        self.client = Client(context, endpoint, replies, name)
        # seqs must not repeat across restarts of this process (a late reply to an old
        # request must not be mistaken for the answer to a new one).
        self._seq = itertools.count(int(time.time() * 1000) % 2**40)

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def sock(self) -> zmq.Socket:
        return self.client.sock

    def _call(self, message_type, **fields) -> bool:
        return self.client.send(message_type(seq=next(self._seq), **fields))

    def receive(self) -> list[Message]:
        return self.client.receive_ready()

    def ping(self) -> bool:
        return self._call(Ping)

    def close(self) -> None:
        self.client.close()


class InstallerPeer(_Peer):
    def __init__(self, context: zmq.Context, endpoint: str):
        super().__init__(context, endpoint, ip.REPLIES, "installer")

    def open_job(self, job_id: str, execution: int, release: Release) -> bool:
        return self._call(ip.OpenJob, job_id=job_id, execution=execution, release=release)

    def query_job(self, job_id: str, execution: int) -> bool:
        return self._call(ip.QueryJob, job_id=job_id, execution=execution)

    def stage(self, job_id: str, execution: int) -> bool:
        return self._call(ip.Stage, job_id=job_id, execution=execution)

    def run_hook(self, job_id: str, execution: int, hook: str, round: int = 0) -> bool:  # noqa: A002
        return self._call(ip.RunHook, job_id=job_id, execution=execution, hook=hook, round=round)

    def discard(self, job_id: str, execution: int) -> bool:
        return self._call(ip.Discard, job_id=job_id, execution=execution)


class FetcherPeer(_Peer):
    def __init__(self, context: zmq.Context, endpoint: str):
        super().__init__(context, endpoint, fp.REPLIES, "fetcher")

    def fetch(self, job_id: str, execution: int, url: str, release: Release) -> bool:
        return self._call(fp.Fetch, job_id=job_id, execution=execution, url=url, release=release)

    def query_fetch(self, job_id: str, execution: int) -> bool:
        return self._call(fp.QueryFetch, job_id=job_id, execution=execution)

    def cancel_fetch(self, job_id: str, execution: int) -> bool:
        return self._call(fp.CancelFetch, job_id=job_id, execution=execution)
