"""A local stand-in for S3 presigned URLs, for the demo and the tests.

``FileServer(directory).start()`` serves the files under ``directory`` over
plain HTTP on 127.0.0.1 (threaded stdlib http.server), or HTTPS with
``tls=(certificate, key)``. ``presign(s3_url)``
maps any ``https://<bucket-host>/<key>`` to a local URL carrying
``X-Amz-Expires``, ``X-Amz-Date`` and an HMAC ``X-Amz-Signature``, so that an
expired or tampered URL is answered like S3 answers it: 403 with S3's XML.

It behaves like S3 where the fetcher depends on it: GET and HEAD,
``Range: bytes=N-`` (206 with Content-Range; 416 ``InvalidRange`` when N is
past the end), a strong ``ETag`` and ``If-Range`` (a range request whose
If-Range does not match the current ETag gets the whole object, 200),
Content-Length on every answer, 404 ``NoSuchKey``. It never serves anything
outside ``directory`` (no ``..``, no symlink leading out). Bodies without a
fault go out with sendfile(2), so a benchmark measures the client, not this
server.

``faults`` makes it misbehave on purpose for robustness tests (see Faults),
and ``plan`` gives each of the next requests faults of its own;
``requests`` records every request seen as ``(path, range_header)``, and
``log`` the same with the If-Range header, the status and the body bytes
sent so far (``bytes_sent`` adds them up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

CHUNK = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024  # bytes_sent stays current during a long sendfile
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Faults:
    """Ways to misbehave; tests set these fields while the server runs.

    ``times``: how many more GET requests the faults apply to (each one
    counts down); None means every request.
    """

    ignore_range: bool = False  # answer 200 with the full body to a Range request
    truncate_after: int | None = None  # drop the connection after N body bytes of an answer
    corrupt: bool = False  # flip the first body byte sent
    delay_s: float = 0.0  # wait before answering
    fail_status: int | None = None  # answer this HTTP status (with an S3-like XML error)
    chunked: bool = False  # no Content-Length: Transfer-Encoding chunked (hides the size)
    chunk_delay_s: float = 0.0  # wait before each 64 KiB of body (a slow network)
    rate: int | None = None  # send the body at about this many bytes per second
    stall_after: int | None = None  # after N body bytes of an answer, send nothing for stall_s
    stall_s: float = 0.0
    new_etag: bool = False  # a different ETag on every answer: the object changed since the last request
    range_from_zero: bool = False  # answer a Range request with a 206 for the whole file (a wrong range)
    times: int | None = None

    def shapes_body(self) -> bool:
        """The body must be written by hand (no sendfile)."""
        return bool(self.truncate_after is not None or self.corrupt or self.chunked or self.chunk_delay_s
                    or self.rate or self.stall_after is not None)

    def _take(self, lock: threading.Lock) -> "Faults | None":
        """The faults that apply to this request (a copy), counting down ``times``."""
        with lock:
            if self.times is not None:
                if self.times <= 0:
                    return None
                self.times -= 1
            return dataclasses.replace(self, times=None)


ERROR_TEXT = {
    400: ("InvalidRequest", "Invalid request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def _error_xml(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource>"
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    ).encode("utf-8")


class FileServer:
    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0, secret: bytes | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.directory = Path(directory).resolve()
        self.host = host
        self.port = port
        self.tls = tls  # (certificate, key) PEM files: serve HTTPS
        self.secret = secret if secret is not None else secrets.token_bytes(32)
        self.faults = Faults()
        self.plan: list[Faults] = []  # faults for the next GET requests, one each, before ``faults`` applies
        self.requests: list[tuple[str, str | None]] = []
        self.log: list[Served] = []
        self._answers = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # ends stalls and delays when the server stops
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "FileServer":
        server = self
        self._stopping.clear()

        class Handler(_Handler):
            fileserver = server

        self._httpd = _Server((self.host, self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, self.tls))
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fileserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    # -- URLs --------------------------------------------------------------
    def _signature(self, path: str, expires: str, date: str) -> str:
        text = f"GET\n{path}\n{expires}\n{date}".encode("utf-8")
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()

    def presign(self, s3_url: str, expires_in: int = 3600, now: datetime | None = None) -> str:
        """A local URL for the key of ``s3_url`` (its host is ignored), valid
        ``expires_in`` seconds from ``now`` (a negative value gives an expired URL)."""
        path = urllib.parse.urlsplit(s3_url).path or "/"
        date = (now or datetime.now(timezone.utc)).strftime(AMZ_DATE_FORMAT)
        expires = str(int(expires_in))
        query = urllib.parse.urlencode({
            "X-Amz-Expires": expires,
            "X-Amz-Date": date,
            "X-Amz-Signature": self._signature(path, expires, date),
        })
        return f"{self.base_url}{path}?{query}"

    def _authorize(self, raw_path: str, query: str) -> tuple[str, str] | None:
        """None when the URL's signature is valid and unexpired, else (code, message)."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        try:
            (expires,) = params["X-Amz-Expires"]
            (date,) = params["X-Amz-Date"]
            (signature,) = params["X-Amz-Signature"]
        except (KeyError, ValueError):
            return "AccessDenied", "Query-string authentication requires the Signature, Expires and Date parameters"
        if not hmac.compare_digest(signature, self._signature(raw_path, expires, date)):
            return ("SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.")
        try:
            signed_at = datetime.strptime(date, AMZ_DATE_FORMAT).replace(tzinfo=timezone.utc)
            lifetime = int(expires)
        except ValueError:
            return "AuthorizationQueryParametersError", "X-Amz-Date or X-Amz-Expires is malformed"
        if time.time() > signed_at.timestamp() + lifetime:
            return "AccessDenied", "Request has expired"
        return None

    def resolve(self, raw_path: str) -> Path | None:
        """The regular file under ``directory`` named by a URL path, or None."""
        path = urllib.parse.unquote(raw_path)
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") or "\x00" in p or "\\" in p for p in parts):
            return None
        candidate = self.directory.joinpath(*parts)
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.directory) or not real.is_file():
            return None
        return real

    def _record(self, path: str, query: str, range_header: str | None, if_range: str | None) -> "Served":
        served = Served(path, range_header, if_range, query)
        with self._lock:
            self.requests.append((path, range_header))
            self.log.append(served)
            self._answers += 1
        return served

    def _take_faults(self) -> Faults | None:
        with self._lock:
            if self.plan:
                return dataclasses.replace(self.plan.pop(0), times=None)
        return self.faults._take(self._lock)

    def _answer_number(self) -> int:
        with self._lock:
            return self._answers

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent in all answers so far."""
        with self._lock:
            return sum(served.bytes_sent for served in self.log)


@dataclass
class Served:
    """One request as the server saw it, and how much body it sent (so far)."""

    path: str
    range: str | None
    if_range: str | None
    query: str = ""
    status: int = 0
    bytes_sent: int = 0


class _Handler(BaseHTTPRequestHandler):
    fileserver: FileServer
    protocol_version = "HTTP/1.1"
    server_version = "AmazonS3"
    sys_version = ""
    timeout = 30  # a stuck client does not hold a thread forever

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # quiet in tests; requests are recorded in fileserver.requests

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _send_error_xml(self, status: int, code: str | None = None, message: str | None = None,
                        resource: str = "", extra: dict[str, str] | None = None, send_body: bool = True):
        default_code, default_message = ERROR_TEXT.get(status, ("Error", "Error"))
        body = _error_xml(code or default_code, message or default_message, resource)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _answer(self, send_body: bool):
        fs = self.fileserver
        split = urllib.parse.urlsplit(self.path)
        raw_path = split.path
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        served = fs._record(raw_path, split.query, range_header, if_range)
        faults = fs._take_faults() if send_body else None

        if faults and faults.delay_s:
            fs._stopping.wait(faults.delay_s)
        denied = fs._authorize(raw_path, split.query)
        if denied:
            served.status = 403
            self._send_error_xml(403, *denied, resource=raw_path, send_body=send_body)
            return
        if faults and faults.fail_status:
            served.status = faults.fail_status
            self._send_error_xml(faults.fail_status, resource=raw_path, send_body=send_body)
            return
        target = fs.resolve(raw_path)
        if target is None:
            served.status = 404
            self._send_error_xml(404, resource=raw_path, send_body=send_body)
            return

        with open(target, "rb") as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}"'
            if faults and faults.new_etag:
                etag = f'"{st.st_mtime_ns:x}-{size:x}-{fs._answer_number():x}"'
            start, end = 0, size - 1
            status = 200
            match = RANGE_RE.match(range_header.strip()) if range_header else None
            if if_range is not None and if_range.strip() != etag:
                match = None  # RFC 9110 13.1.5: the object changed, so the whole of it, 200
            if match and not (faults and faults.ignore_range) and (match.group(1) or match.group(2)):
                first, last = match.group(1), match.group(2)
                if first:
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
                    if start >= size:
                        served.status = 416
                        self._send_error_xml(416, resource=raw_path, send_body=send_body,
                                             extra={"Content-Range": f"bytes */{size}"})
                        return
                    if end < start:  # "bytes=5-2" is invalid: ignored, like S3
                        start, end = 0, size - 1
                    else:
                        status = 206
                    if status == 206 and faults and faults.range_from_zero:
                        start, end = 0, size - 1
                else:  # suffix range "bytes=-K": the last K bytes
                    count = min(int(last), size)
                    if count > 0:
                        start, end, status = size - count, size - 1, 206
            length = max(0, end - start + 1)

            served.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            chunked = bool(faults and faults.chunked)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            if not send_body:
                return
            if faults and faults.shapes_body():
                self._send_body(fh, start, length, faults, chunked, served)
            else:
                self._sendfile(fh, start, length, served)

    def _sendfile(self, fh, start: int, length: int, served: "Served"):
        sent = 0
        try:
            while sent < length:
                count = self.connection.sendfile(fh, start + sent, min(SENDFILE_CHUNK, length - sent))
                if count == 0:
                    break
                sent += count
                served.bytes_sent = sent
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def _send_body(self, fh, start: int, length: int, faults: Faults, chunked: bool, served: "Served"):
        fs = self.fileserver
        fh.seek(start)
        sent = 0
        limit = faults.truncate_after
        stall_at = faults.stall_after
        began = time.monotonic()
        first = True
        try:
            while sent < length:
                want = min(CHUNK, length - sent)
                if limit is not None:
                    want = min(want, limit - sent)
                    if want <= 0:
                        break
                if stall_at is not None:
                    if sent >= stall_at:
                        self.wfile.flush()
                        fs._stopping.wait(faults.stall_s)
                        stall_at = None
                    else:
                        want = min(want, stall_at - sent)
                if faults.chunk_delay_s:
                    self.wfile.flush()
                    fs._stopping.wait(faults.chunk_delay_s)
                if faults.rate:
                    want = min(want, max(1, faults.rate // 20))  # ~20 writes a second: a smooth rate
                    ahead = began + sent / faults.rate - time.monotonic()
                    if ahead > 0:
                        fs._stopping.wait(ahead)
                data = fh.read(want)
                if not data:
                    break
                if first and faults and faults.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                first = False
                if chunked:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                else:
                    self.wfile.write(data)
                sent += len(data)
                served.bytes_sent = sent
            if limit is not None and sent < length:
                # Drop the connection mid-body, as a failing network would.
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hangs up (a cancelled download) is normal here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)
