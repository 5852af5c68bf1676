"""The dispatcher's HTTP side (``--http-port``): the live results page, each commit's
files, JSON mirroring the read-only protocol queries, and ``/metrics``. Read-only:
GET and HEAD, nothing else.

Served with the standard library's ``ThreadingHTTPServer`` (a thread per connection),
bounded here: at most ``MAX_CONNECTIONS`` connections at once (one more gets ``503``
and is closed), each socket read or write ``IO_TIMEOUT_S``, a whole request within
``REQUEST_DEADLINE_S`` and ``MAX_REQUEST_BYTES`` (request line and headers; there is
no body), one request per connection (HTTP/1.0). TLS, when the dispatcher serves it
(``--tls-cert``, ``--tls-key``), is the same context, its handshake on the
connection's thread.

* ``/``: the results page (page.py), rendered for HTTP: the same page with a running
  jobs section and ``live.js``, a script of ours from this server, which polls
  ``/api`` about every second to show each running job's live log as it grows and its
  verdict when it comes, then fetches the page again to update the rest, without a
  reload. Its Content-Security-Policy allows scripts from this origin alone, no inline
  script; everything from commits is escaped by the template, and the script only
  ever sets text (``textContent``).
* ``/<sha>``, ``/<sha>.log``, ``/<sha>.xml``, ``/<sha>.json`` and
  ``/runs/<sha>/<run>/<sha>[.log|.xml|.json]``: the files of the results folder, as
  the page links them. They are hostile content (a commit's output): ``text/plain``
  (JSON as ``application/json``) with ``X-Content-Type-Options: nosniff`` and a
  policy that forbids everything (``default-src 'none'; sandbox``).
* ``/api/<query>[/<commit>]?<option>=<value>``: the answer to the protocol's
  read-only query of that name (``status``, ``queue``, ``branches``, ``runners``,
  ``recent``, ``lookup/<commit prefix>``, ``flaky``, ``tail/<commit prefix>``), its
  options as query parameters, checked by the protocol's own field parsers; the JSON
  document the query answers (``status``: its counts; ``tail``: with ``text``, the
  chunk as UTF-8). A refusal: ``{"error": reason}``, 404 for an unknown commit, 400
  otherwise.
* ``/metrics``: Prometheus's text format (metrics.py).

There is no authentication on this port: it shows what the results folder and the
read-only queries show, to anyone who can reach it (README, HTTP).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable
from urllib.parse import parse_qsl

from commit_ci.protocol import REQUESTS, Message
from commit_ci.result_files import RUNS_FOLDER
from commit_ci.wire import ProtocolError

if TYPE_CHECKING:
    import ssl

    from prometheus_client import CollectorRegistry

log = logging.getLogger("dispatcher.http")

#: Connections served at once; past it a new one gets 503 (the page polls once a second,
#: so a few dozen viewers fit).
MAX_CONNECTIONS = 64
#: Each read or write on a connection.
IO_TIMEOUT_S = 10.0
#: A whole request (line and headers) must have arrived within this time of the first byte...
REQUEST_DEADLINE_S = 20.0
#: ...and be at most this long: a GET needs a line and a few headers.
MAX_REQUEST_BYTES = 16 * 1024
#: Bytes of a file sent per write.
SEND_BYTES = 64 * 1024

#: The read-only protocol queries /api answers (protocol.REQUESTS has their fields).
API_QUERIES = ("status", "queue", "branches", "runners", "recent", "lookup", "flaky", "tail")
#: The results page's policy: scripts and requests to this origin only, no inline script.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: Everything else (files from commits, JSON): nothing runs, nothing loads.
LOCKED_POLICY = "default-src 'none'; sandbox; frame-ancestors 'none'"
#: A file of the results folder, as the page links to it.
_RESULT_FILE = re.compile(r"/(?:%s/([0-9a-f]{40}|[0-9a-f]{64})/([1-9][0-9]{0,5})/)?([0-9a-f]{40}|[0-9a-f]{64})"
                          r"(\.log|\.xml|\.json)?\Z" % RUNS_FOLDER)
_TYPES = {"": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8",
          ".xml": "text/plain; charset=utf-8", ".json": "application/json"}
#: The page's script, a file of the package.
_SCRIPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "live.js")


class _RequestTooLarge(Exception):
    pass


class _BoundedReader:
    """The request's input, refusing to read past a byte budget or a deadline: what the
    server reads of a request (its line and headers) is bounded in size and time."""

    def __init__(self, raw, limit: int, deadline: float):
        self._raw, self._left, self._deadline = raw, limit, deadline

    def _check(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise _RequestTooLarge("request over %d bytes" % MAX_REQUEST_BYTES)
        if time.monotonic() > self._deadline:
            raise TimeoutError("request not whole within %g s" % REQUEST_DEADLINE_S)
        return data

    def readline(self, limit: int = -1) -> bytes:
        size = self._left + 1 if limit < 0 else min(limit, self._left + 1)
        return self._check(self._raw.readline(size))

    def read(self, size: int = -1) -> bytes:
        return self._check(self._raw.read(self._left + 1 if size < 0 else min(size, self._left + 1)))

    def close(self) -> None:
        self._raw.close()


class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    timeout = IO_TIMEOUT_S
    server_version = "commit-ci"
    sys_version = ""
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def setup(self) -> None:
        super().setup()
        self.rfile = _BoundedReader(self.rfile, MAX_REQUEST_BYTES, time.monotonic() + REQUEST_DEADLINE_S)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _RequestTooLarge as exc:
            log.warning("HTTP request from %s refused: %s", self.client_address[0], exc)
            self.close_connection = True
            try:
                self.send_error(431, "Request too large")
            except OSError:
                pass
        except TimeoutError as exc:
            log.info("HTTP request from %s dropped: %s", self.client_address[0], exc or "timed out")
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the standard library's name
        log.debug("HTTP %s: %s", self.client_address[0], format % args)

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        log.info("HTTP %s: %s", self.client_address[0], format % args)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _read_only(self) -> None:
        log.info("HTTP %s: %s refused: read-only", self.client_address[0], self.command)
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "0")
        self.send_header("Content-Security-Policy", LOCKED_POLICY)
        self.end_headers()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _read_only  # noqa: N815 - the standard library's names

    def _serve(self, head: bool) -> None:
        path, _, query = self.path.partition("?")
        try:
            if path in ("/", "/index.html"):
                page = self.server.page()
                if page is None:
                    return self._send(503, b"the results page is being built\n", "text/plain; charset=utf-8", head)
                return self._send(200, page, "text/html; charset=utf-8", head, PAGE_POLICY)
            if path == "/favicon.ico":  # browsers ask; there is none, and a 404 would be an error in their console
                return self._send(204, b"", "image/x-icon", head)
            if path == "/live.js":
                return self._send(200, self.server.script, "text/javascript; charset=utf-8", head)
            if path == "/metrics":
                from commit_ci.metrics import exposition  # prometheus_client: imported once it is asked for

                return self._send(200, exposition(self.server.registry), "text/plain; version=0.0.4; charset=utf-8",
                                  head)
            if path.startswith("/api/"):
                status, document = self.server.api(path[len("/api/"):], query, self.client_address[0])
                return self._send(status, json.dumps(document).encode("utf-8"), "application/json", head)
            match = _RESULT_FILE.match(path)
            if match and (match.group(1) is None or match.group(1) == match.group(3)):
                return self._send_file(match, head)
            return self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
        except Exception:  # a bug must cost one request, not the server
            log.exception("HTTP %s: error serving %s", self.client_address[0], path[:200])
            return self._send(500, b"internal error\n", "text/plain; charset=utf-8", head)

    def _send(self, status: int, body: bytes, content_type: str, head: bool, policy: str = LOCKED_POLICY) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", policy)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_file(self, match: re.Match, head: bool) -> None:
        folder_commit, run, commit, suffix = match.groups()
        folder = self.server.results_dir
        if folder_commit is not None:
            folder = os.path.join(folder, RUNS_FOLDER, folder_commit, run)
        try:  # the results folder is the dispatcher's own; no link is followed at the last step anyway
            fd = os.open(os.path.join(folder, commit + (suffix or "")), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", _TYPES[suffix or ""])
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Security-Policy", LOCKED_POLICY)
            self.end_headers()
            left = 0 if head else size  # the file is written once (atomically): its size stays
            while left > 0:
                data = handle.read(min(SEND_BYTES, left))
                if not data:
                    break
                self.wfile.write(data)
                left -= len(data)


class WebServer(ThreadingHTTPServer):
    """The HTTP server (see the module docstring). ``handle`` answers a protocol request
    (the dispatcher's), ``page`` returns the page for HTTP (None until it is built),
    ``registry`` holds the metrics."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handle: Callable[[Message, str], Message],
                 page: Callable[[], bytes | None], results_dir: str, registry: "CollectorRegistry",
                 tls: "ssl.SSLContext | None" = None, max_connections: int = MAX_CONNECTIONS):
        self.handle = handle
        self.page = page
        self.results_dir = results_dir
        self.registry = registry
        self.tls = tls
        with open(_SCRIPT_PATH, "rb") as handle_:
            self.script = handle_.read()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return host, port

    # --- bounded connections, TLS on the connection's thread ------------------------

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("HTTP connection from %s refused: %d connections busy", client_address[0], MAX_CONNECTIONS)
            try:
                request.settimeout(0.2)
                if self.tls is None:
                    request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: socket.socket, client_address) -> None:
        request.settimeout(IO_TIMEOUT_S)
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:
            tls = self.tls.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError included
            log.info("HTTP TLS handshake with %s failed: %s", client_address[0], exc)
            return None
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request, client_address) -> None:
        log.exception("HTTP: unexpected error serving %s", client_address[0])

    # --- /api ------------------------------------------------------------------------

    def api(self, path: str, query: str, peer: str) -> tuple[int, dict]:
        """The status and JSON document of ``/api/<path>?<query>``."""
        name, _, argument = path.partition("/")
        if name not in API_QUERIES:
            return 404, {"error": "no such query (want one of %s)" % ", ".join(API_QUERIES)}
        try:
            message = _query_message(name, argument, query)
        except ProtocolError as exc:
            return 400, {"error": str(exc)}
        answer = self.handle(message, "http %s" % peer)
        if answer.verb != "OK":
            reason = str(answer.get("reason"))
            return (404 if reason.startswith("unknown commit") else 400), {"error": reason}
        if "json" not in answer.sections:
            return 200, dict(answer.fields)
        document = json.loads(answer.sections["json"])
        if "chunk" in answer.sections:
            document["text"] = answer.sections["chunk"].decode("utf-8", "replace")
        return 200, document


def _query_message(name: str, argument: str, query: str) -> Message:
    """The protocol request for an /api path: its positional field from the path, its
    options from the query string, each checked by the protocol's own parser."""
    verb = REQUESTS[name]
    message = Message(verb.name)
    arguments = [argument] if argument else []
    if len(arguments) != len(verb.positional):
        raise ProtocolError("/api/%s needs %s" % (name, "/<commit>" if verb.positional else "no more path"))
    for (field, parser), text in zip(verb.positional, arguments):
        message.fields[field] = parser(text)
    options = dict(verb.options)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=len(options) or 1)
    except ValueError:
        raise ProtocolError("malformed query string") from None
    for key, value in pairs:
        if key not in options:
            raise ProtocolError("unknown option %r for %s" % (key[:40], name))
        if key in message.fields:
            raise ProtocolError("duplicate option %r" % key[:40])
        message.fields[key] = options[key](value)
    return message


def serve_in_thread(server: WebServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    return thread

