"""upparatctl: ask the running upparat-supervisor what it and its children do.

    upparatctl [-c CONFIG] status [--json]

Connects to ``<runtime_dir>/control/control.sock`` (root and the broker's
group only: the directory is root:<group> 0750, the socket 0660), reads the
one JSON document the supervisor sends (version 1, see
``Supervisor.snapshot``) and prints it as a table, or as JSON with ``--json``.
Exit codes: 0 answered, 1 no answer (not running, not allowed, garbled),
2 bad command line or configuration.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from upparat import codes, config as config_mod, safejson
from upparat.ipc.settings import STANDALONE_TMPDIR, resolve_layout

DEFAULT_CONFIG = "/etc/upparat/upparat.conf"
TIMEOUT = 5.0  # seconds for the whole answer
MAX_ANSWER = 1024 * 1024
SNAPSHOT_VERSION = 1


class NoAnswer(Exception):
    pass


def control_socket(config_path: str | None) -> Path:
    """The socket path from the configuration. Without -c, an unreadable
    default config (0600 root) means the default runtime_dir."""
    path = config_path or DEFAULT_CONFIG
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        if config_path is None:
            return config_mod.DEFAULT_RUNTIME_DIR / "control" / "control.sock"
        raise config_mod.ConfigError("file", None, f"cannot read {path} ({exc})",
                                     "pass a readable configuration with -c, or leave -c out") from None
    cfg = config_mod.parse(text, path, check_files=False)
    return resolve_layout(cfg, STANDALONE_TMPDIR).control_socket


def ask(path: Path, timeout: float = TIMEOUT) -> dict:
    """The supervisor's snapshot; raises NoAnswer with a sentence for a person."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except PermissionError:
            raise NoAnswer(f"permission denied on {path}: only root and the members of the broker user's "
                           "group ([supervisor] user, default upparat) may ask; try sudo") from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoAnswer(f"upparat-supervisor is not running (nothing listens on {path}); in per-process "
                           "mode ask systemd: systemctl status upparat.target") from None
        except OSError as exc:
            raise NoAnswer(f"cannot connect to {path}: {exc.strerror or exc}") from None
        data = b""
        while len(data) <= MAX_ANSWER:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise NoAnswer(f"no answer on {path} within {timeout:.0f} s") from None
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    try:
        answer = safejson.loads(data, max_bytes=MAX_ANSWER, max_depth=6)
    except safejson.BadJson as exc:
        raise NoAnswer(f"garbled answer from {path} ({exc})") from None
    if not isinstance(answer, dict) or answer.get("v") != SNAPSHOT_VERSION:
        raise NoAnswer(f"answer is not version {SNAPSHOT_VERSION} (upparatctl and the supervisor "
                       "from different Upparat versions?)")
    return answer


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def size(count) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)


def render(answer: dict) -> str:
    sup = answer.get("supervisor", {})
    lines = [f"supervisor pid {sup.get('pid')}, up {duration(sup.get('uptime'))}, "
             f"privilege separation {'on' if sup.get('separated') else 'OFF'}, "
             f"{'ready' if sup.get('ready') else 'starting'}"
             + (", reload waiting for the installer" if sup.get("reload_pending") else "")]
    rows = [("PROCESS", "STATE", "PID", "UPTIME", "RESTARTS", "LAST BEAT")]
    for child in answer.get("children", []):
        beat = child.get("last_beat_age")
        rows.append((str(child.get("name")), str(child.get("state")), str(child.get("pid") or "-"),
                     duration(child.get("uptime")), str(child.get("restarts")),
                     "-" if beat is None else f"{beat:.1f}s ago"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    job = answer.get("job")
    if not job:
        lines.append("job: none")
    else:
        text = f"job {job.get('job_id')}"
        if job.get("execution") is not None:
            text += f" (execution {job['execution']})"
        text += f": {job.get('phase') or 'in progress'}"
        if job.get("busy"):
            text += " (installer busy)"
        if job.get("bytes_done") is not None:
            text += f", {size(job['bytes_done'])}"
            if job.get("bytes_total"):
                text += f" of {size(job['bytes_total'])} ({100 * job['bytes_done'] // job['bytes_total']}%)"
            if job.get("rate"):
                text += f" at {size(job['rate'])}/s"
        lines.append(text)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upparatctl", description="Ask the running Upparat service.")
    parser.add_argument("-c", "--config-file", metavar="CONFIG",
                        help=f"configuration file (default {DEFAULT_CONFIG}; its runtime_dir locates the service)")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="what each process and the current job are doing")
    status.add_argument("--json", action="store_true", help="the supervisor's answer as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else codes.EXIT_USAGE
    try:
        path = control_socket(args.config_file)
    except config_mod.ConfigError as exc:
        print(f"upparatctl: configuration error: {exc}", file=sys.stderr)
        return codes.EXIT_USAGE
    try:
        answer = ask(path)
    except NoAnswer as exc:
        print(f"upparatctl: {exc}", file=sys.stderr)
        return codes.EXIT_FAILURE
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return codes.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
