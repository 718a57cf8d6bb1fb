"""Upparat: a secure, robust update agent for Linux IoT devices.

Four processes (see docs/architecture.md): the root supervisor (upparat.supervisor), the
unprivileged MQTT/job-lifecycle process (upparat.broker_proc), the
unprivileged download/verify process (upparat.fetcher_proc) and the minimal
root installer (upparat.installer_proc). They talk over ZeroMQ with the
protocol modules in upparat.ipc.
"""

__version__ = "2.0.0.dev0"
