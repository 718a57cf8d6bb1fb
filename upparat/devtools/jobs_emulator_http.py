"""A tiny JSON control API for the jobs emulator: the "AWS console" of ``upparat-jobs-emulator``.

Listens on 127.0.0.1 only (no authentication: it is a development tool). Routes:

| Method and path | Body | Answer |
|---|---|---|
| ``POST /jobs`` | ``{"jobId": str, "document": object, "things": [str, ...]}`` | 201 ``{"jobId": ...}`` |
| ``POST /jobs/<id>/cancel`` | ``{"force": bool}`` (optional) | 200 ``{"jobId": ..., "canceled": true}`` |
| ``DELETE /jobs/<id>/things/<thing>[?force=true]`` | - | 200 ``{"deleted": true}`` |
| ``GET /jobs/<id>/things/<thing>`` | - | 200 execution snapshot (with ``history``) |
| ``GET /jobs/<id>`` | - | 200 ``{"jobId", "status", "document", "executions": [{"thing", ...snapshot}]}`` |
| ``GET /files/<bucket>?prefix=P`` | - | 200 ``{"objects": [{"key", "size", "sha256"}]}`` |
| ``PUT /files/<bucket>/<key>`` | the file's bytes (``Content-Length``; optional ``X-Upparat-Sha256``) | 201 ``{"key", "size", "sha256"}`` |

``status`` of a job: CANCELED once canceled, COMPLETED when every execution is terminal,
else IN_PROGRESS. The ``/files`` routes exist when the emulator was started with
``--files DIR`` (else 404): they are its S3 (see ``jobs_emulator_files``).

Bad requests get 400 ``{"error": "<what is wrong and how to fix it>"}``; unknown jobs or
executions 404; anything else 404/405. JSON bodies are limited to 64 KiB, files to
``--max-file-size``.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("upparat.devtools.jobs_emulator")

MAX_BODY = 64 * 1024


class _BadRequest(Exception):
    pass


class ControlServer:
    def __init__(self, emulator, host: str = "127.0.0.1", port: int = 8081, files=None):
        handler = type("Handler", (_Handler,), {"emulator": emulator, "files": files})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="jobs-emulator-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    emulator = None  # set per server by ControlServer
    files = None  # a jobs_emulator_files.FileStore, or None without --files
    server_version = "upparat-jobs-emulator"

    def log_message(self, fmt, *args):  # route through logging, not stderr
        log.debug("control %s", fmt % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        query = urllib.parse.parse_qs(url.query)
        try:
            if method == "POST" and parts == ["jobs"]:
                return self._create(self._body())
            if method == "POST" and len(parts) == 3 and parts[0] == "jobs" and parts[2] == "cancel":
                body = self._body(optional=True)
                force = body.get("force", False)
                if not isinstance(force, bool):
                    raise _BadRequest('"force" must be true or false')
                self.emulator.cancel_job(parts[1], force=force)
                return self._send(200, {"jobId": parts[1], "canceled": True})
            if method == "GET" and len(parts) == 2 and parts[0] == "jobs":
                job = self.emulator.job(parts[1])
                if job is None:
                    return self._send(404, {"error": f"no job {parts[1]!r}"})
                return self._send(200, job)
            if parts[0] == "files" and len(parts) >= 2 and method in ("GET", "PUT"):
                return self._files(method, parts[1], "/".join(parts[2:]), query)
            if len(parts) == 4 and parts[0] == "jobs" and parts[2] == "things":
                job_id, thing = parts[1], parts[3]
                if method == "GET":
                    snapshot = self.emulator.execution(job_id, thing)
                    if snapshot is None:
                        return self._send(404, {"error": f"no execution of job {job_id!r} "
                                                         f"on thing {thing!r}"})
                    return self._send(200, snapshot)
                if method == "DELETE":
                    force = query.get("force", ["false"])[-1].lower() in ("1", "true", "yes")
                    self.emulator.delete_execution(job_id, thing, force=force)
                    return self._send(200, {"deleted": True})
            return self._send(404, {"error": f"no route {method} {url.path}; see "
                                             "upparat.devtools.jobs_emulator_http"})
        except _BadRequest as exc:
            self._send(400, {"error": str(exc)})
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
        except KeyError as exc:
            self._send(404, {"error": exc.args[0] if exc.args else "not found"})

    def _files(self, method: str, bucket: str, key: str, query: dict) -> None:
        from upparat.devtools.jobs_emulator_files import BadName

        if self.files is None:
            return self._send(404, {"error": "this emulator serves no files: start it with --files DIR"})
        try:
            if method == "GET" and not key:
                prefix = query.get("prefix", [""])[-1]
                return self._send(200, {"objects": self.files.list(bucket, prefix)})
            if method == "PUT":
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    raise _BadRequest("an upload needs a Content-Length") from None
                # HTTP/1.0: the connection closes after the answer, so an unread rest of a
                # refused body is never taken for the next request.
                stored = self.files.put(bucket, key, self.rfile, length, self.headers.get("X-Upparat-Sha256"))
                log.info("stored file %s/%s (%d bytes)", bucket, key, stored["size"])
                return self._send(201, stored)
        except BadName as exc:
            raise _BadRequest(str(exc)) from None
        return self._send(405, {"error": f"no route {method} /files/{bucket}/{key}"})

    def _create(self, body: dict) -> None:
        missing = [k for k in ("jobId", "document", "things") if k not in body]
        if missing:
            raise _BadRequest(f"missing {', '.join(missing)}; expected "
                              '{"jobId": "...", "document": {...}, "things": ["..."]}')
        if not isinstance(body["things"], list):
            raise _BadRequest('"things" must be a list of thing names')
        self.emulator.create_job(body["jobId"], body["document"], body["things"])
        self._send(201, {"jobId": body["jobId"]})

    def _body(self, optional: bool = False) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _BadRequest("bad Content-Length") from None
        if length > MAX_BODY:
            raise _BadRequest(f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw and optional:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise _BadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("body must be a JSON object")
        return body

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
