"""The wire protocol shared by the observer, the dispatcher and the runners.

This module, with protocol_core.py below it, is the only place where bytes become
messages and messages become bytes. A message is one header line -- a verb, its positional fields, then
``key=value`` options -- optionally followed by binary sections whose byte
lengths the header declares (``log=1234``). Every verb is described once, in
``REQUESTS`` and ``REPLIES``; ``decode`` checks a header against that table and
turns each field into a typed value, or raises ``ProtocolError``, which the
server turns into an ``ERR <reason>`` reply and a log line. docs/protocol.md is
the human description of the same table; keep the two in step.

The lowest layer -- header lines and their size cap, reading under deadlines, the
``auth`` line, commit ids and addresses -- is protocol_core.py, which the push
trigger's hook uses on its own because it is cheap to import; this module
re-exports it.

Besides the codec, this module holds what all three daemons share around it:
``communicate()`` (one request, one reply, bounded in time and size),
``ProtocolServer`` (a threaded socketserver that never lets a bad peer kill a
thread), atomic file writes, logging set-up and signal handling.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    import ssl

# ssl, tempfile and ipaddress are imported where they are used: most processes that
# import this module never need them, and together they cost about 15 ms to import.
from urllib.parse import quote, unquote

# The client's side of the bytes -- header lines, reading under deadlines, the auth
# line, commit ids and addresses -- lives in protocol_core.py, cheap to import for the
# push trigger's hook; it is re-exported from here, where the daemons look for it.
from protocol_core import (  # noqa: F401 - re-exported
    CONNECT_TIMEOUT_S,
    IO_TIMEOUT_S,
    MAX_CLOCK_SKEW_S,
    MAX_LINE_BYTES,
    MESSAGE_DEADLINE_S,
    MIN_SECRET_BYTES,
    SECRET_ENV,
    Authenticator,
    ProtocolError,
    Stream,
    client_tls_context,
    connect,
    format_address,
    header_bytes,
    is_commit_id,
    is_decimal,
    parse_address,
    parse_commit,
    parse_host,
    parse_port,
    read_secret,
    split_header,
)

# --- Limits and timings (one place, with units; those a client needs are in protocol_core)

#: Test output the dispatcher keeps per result; the rest is cut off with a marker
#: so that a chatty test suite still gets its verdict recorded.
MAX_LOG_BYTES = 8 * 1024 * 1024
#: JUnit XML kept per result; a larger file is dropped (a cut XML file is useless).
MAX_JUNIT_BYTES = 8 * 1024 * 1024
#: JSON document in an ``OK`` reply (operator queries).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: A declared section larger than this is refused outright: reading and
#: discarding it would tie up a thread for too long.
MAX_SECTION_ON_WIRE_BYTES = 256 * 1024 * 1024

#: A server closes a connection on which no new request starts within this time.
IDLE_TIMEOUT_S = 15.0
#: A server thread left without a connection for this long exits.
THREAD_IDLE_S = 30.0

NAME_PATTERN = re.compile(r"[A-Za-z0-9._:@\-]{1,128}\Z")

#: Statuses a runner may report for an attempt. ``passed`` and ``failed`` are the
#: commit's verdict; ``error`` is an infrastructure fault on the runner (retried
#: elsewhere); ``aborted`` means the runner handed the job back (shutting down).
RUNNER_STATUSES = ("passed", "failed", "error", "aborted")

log = logging.getLogger("ci.protocol")


# --- Field types ---------------------------------------------------------------------
# Each parser takes the wire text (already percent-decoded) and returns the typed
# value, or raises ProtocolError with a reason fit for the peer to read. parse_commit,
# parse_host and parse_port are in protocol_core.


def parse_count(text: str) -> int:
    if not is_decimal(text):
        raise ProtocolError("invalid count (want a non-negative integer)")
    return int(text)


def parse_attempt(text: str) -> int:
    value = parse_count(text)
    if value < 1:
        raise ProtocolError("invalid attempt id (want a positive integer)")
    return value


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError("invalid duration (want seconds)") from None
    if not 0 <= value < 1e9:
        raise ProtocolError("invalid duration (want seconds)")
    return value


def parse_name(text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise ProtocolError("invalid name")
    return text


def parse_text(text: str) -> str:
    """Free text (reasons, messages): printable, at most 1000 characters."""
    if len(text) > 1000 or any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
        raise ProtocolError("invalid text field")
    return text


def parse_status(text: str) -> str:
    if text not in RUNNER_STATUSES:
        raise ProtocolError("invalid status (want one of %s)" % ", ".join(RUNNER_STATUSES))
    return text


def parse_runner_state(text: str) -> str:
    if text not in ("idle", "busy"):
        raise ProtocolError("invalid state (want idle or busy)")
    return text


JOB_STATES = ("queued", "running", "passed", "failed", "error")


def parse_job_state(text: str) -> str:
    if text not in JOB_STATES:
        raise ProtocolError("invalid job state (want one of %s)" % ", ".join(JOB_STATES))
    return text


@dataclass(frozen=True)
class Section:
    """A binary part after the header; the header option of the same name gives its length.

    ``keep`` bytes are kept; with ``truncate`` the rest is discarded and a marker
    appended, otherwise a longer section is dropped entirely and replaced by
    ``b""`` (the message's ``truncated`` set names it either way).
    """

    name: str
    keep: int
    truncate: bool


@dataclass(frozen=True)
class Verb:
    """One verb of the protocol: its positional fields, options and sections, in order."""

    name: str
    positional: tuple[tuple[str, Callable[[str], object]], ...] = ()
    options: tuple[tuple[str, Callable[[str], object]], ...] = ()
    sections: tuple[Section, ...] = ()
    #: The last positional field takes the rest of the line, spaces included.
    rest_of_line: bool = False


LOG_SECTION = Section("log", MAX_LOG_BYTES, truncate=True)
JUNIT_SECTION = Section("junit", MAX_JUNIT_BYTES, truncate=False)
JSON_SECTION = Section("json", MAX_JSON_BYTES, truncate=False)

#: What a peer may send to a server (dispatcher or runner).
REQUESTS: dict[str, Verb] = {
    verb.name: verb
    for verb in (
        # to the dispatcher
        Verb("status"),
        Verb("dispatch", positional=(("commit", parse_commit),)),
        # read-only, for operators (ci-ctl) and the local launcher; answered with JSON
        Verb("queue", options=(("limit", parse_count),)),
        Verb("runners"),
        Verb("recent", options=(("limit", parse_count),)),
        Verb("result", positional=(("commit", parse_commit),)),
        Verb(
            "register",
            positional=(("host", parse_host), ("port", parse_port)),
            options=(("name", parse_name), ("commit", parse_commit), ("attempt", parse_attempt)),
        ),
        Verb(
            "results",
            positional=(("commit", parse_commit), ("attempt", parse_attempt), ("status", parse_status)),
            options=(
                ("passed", parse_count),
                ("failed", parse_count),
                ("errors", parse_count),
                ("skipped", parse_count),
                ("duration", parse_seconds),
                ("reason", parse_text),
            ),
            sections=(LOG_SECTION, JUNIT_SECTION),
        ),
        # to a runner
        Verb("ping"),
        Verb("runtest", positional=(("commit", parse_commit), ("attempt", parse_attempt))),
    )
}

#: What a server may answer.
REPLIES: dict[str, Verb] = {
    verb.name: verb
    for verb in (
        Verb(
            "OK",
            options=(
                ("state", parse_runner_state),
                ("commit", parse_commit),
                ("attempt", parse_attempt),
                ("job", parse_job_state),
                ("new", parse_count),
                ("queued", parse_count),
                ("running", parse_count),
                ("runners", parse_count),
                ("idle", parse_count),
                ("runner", parse_name),
                ("heartbeat", parse_seconds),
                ("recorded", parse_count),
            ),
            sections=(JSON_SECTION,),
        ),
        Verb("BUSY"),
        Verb("ERR", positional=(("reason", parse_text),), rest_of_line=True),
    )
}


@dataclass
class Message:
    """A decoded message: verb, typed fields and sections.

    ``fields`` holds positional fields and options alike, by name; an option the
    sender left out is absent. ``truncated`` names sections that did not fit.
    """

    verb: str
    fields: dict[str, object] = field(default_factory=dict)
    sections: dict[str, bytes] = field(default_factory=dict)
    truncated: set[str] = field(default_factory=set)
    #: The nonce of the ``auth`` line it came with, when authenticated.
    nonce: str | None = None

    def get(self, name: str, default: object = None) -> object:
        return self.fields.get(name, default)

    def __str__(self) -> str:  # for log lines: the header without sections
        return encode_header(self, REQUESTS if self.verb in REQUESTS else REPLIES)


def request(verb: str, **fields: object) -> Message:
    """Build a request; ``bytes`` values become sections, ``None`` values are left out."""
    return _build(verb, fields)


def reply(verb: str, **fields: object) -> Message:
    """Build a reply (``OK``, ``BUSY`` or ``ERR``)."""
    return _build(verb, fields)


def error(reason: str) -> Message:
    """An ``ERR`` reply; control characters are replaced so the reply stays one line."""
    clean = "".join(c if c >= " " else " " for c in reason)[:1000] or "error"
    return Message("ERR", {"reason": clean})


def _build(verb: str, fields: Mapping[str, object]) -> Message:
    message = Message(verb)
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray)):
            message.sections[name] = bytes(value)
        else:
            message.fields[name] = value
    return message


# --- Encoding ------------------------------------------------------------------------

# Characters that never need escaping in a field; everything else is %XX (UTF-8).
_SAFE = "-_.:@/+,"


def _wire_text(value: object) -> str:
    if isinstance(value, float):
        text = repr(round(value, 6))
    else:
        text = str(value)
    return quote(text, safe=_SAFE)


def encode_header(message: Message, table: Mapping[str, Verb]) -> str:
    verb = table.get(message.verb)
    if verb is None:
        raise ValueError("unknown verb %r" % message.verb)
    parts = [verb.name]
    for index, (name, _parser) in enumerate(verb.positional):
        value = message.fields[name]
        if verb.rest_of_line and index == len(verb.positional) - 1:
            parts.append(str(value))
        else:
            parts.append(_wire_text(value))
    for name, _parser in verb.options:
        if name in message.fields:
            parts.append("%s=%s" % (name, _wire_text(message.fields[name])))
    for section in verb.sections:
        if section.name in message.sections:
            parts.append("%s=%d" % (section.name, len(message.sections[section.name])))
    return " ".join(parts)


def encode(message: Message, table: Mapping[str, Verb]) -> bytes:
    """The bytes of ``message``: its header line, then its sections in table order."""
    header = header_bytes(encode_header(message, table))
    verb = table[message.verb]
    return header + b"".join(message.sections[s.name] for s in verb.sections if s.name in message.sections)


# --- Decoding ------------------------------------------------------------------------


def decode_header(line: bytes, table: Mapping[str, Verb]) -> tuple[Message, list[tuple[Section, int]]]:
    """Parse one header line (without its newline).

    Returns the message with its fields and the sections still to read, with
    their declared lengths. Raises ProtocolError for anything the table does not
    allow: unknown verbs, missing or extra fields, bad values, duplicates.
    """
    head, rest = split_header(line)
    verb = table.get(head)
    if verb is None:
        shown = head[:40] + ("..." if len(head) > 40 else "")
        raise ProtocolError("unknown verb %r" % shown)
    message = Message(verb.name)
    if verb.rest_of_line:
        # Only ERR: its single field is the free text after the verb.
        name, parser = verb.positional[0]
        message.fields[name] = parser(rest)
        return message, []
    tokens = rest.split(" ") if rest else []
    if any(token == "" for token in tokens):
        raise ProtocolError("fields must be separated by single spaces")
    if len(tokens) < len(verb.positional):
        wanted = " ".join("<%s>" % name for name, _ in verb.positional)
        raise ProtocolError("%s needs %s" % (verb.name, wanted))
    for (name, parser), token in zip(verb.positional, tokens):
        message.fields[name] = parser(_unquote(token, name))
    options = dict(verb.options)
    sections = {s.name: s for s in verb.sections}
    pending: list[tuple[Section, int]] = []
    seen: set[str] = set()
    for token in tokens[len(verb.positional):]:
        key, sep, raw = token.partition("=")
        if not sep:
            raise ProtocolError("unexpected field %r" % token[:40])
        if key in seen:
            raise ProtocolError("duplicate option %r" % key[:40])
        seen.add(key)
        if key in options:
            message.fields[key] = options[key](_unquote(raw, key))
        elif key in sections:
            length = parse_count(raw)
            if length > MAX_SECTION_ON_WIRE_BYTES:
                raise ProtocolError("section %r too large (%d bytes)" % (key, length))
            pending.append((sections[key], length))
        else:
            raise ProtocolError("unknown option %r for %s" % (key[:40], verb.name))
    # Sections travel in table order, whatever order the header listed them in.
    order = [s.name for s in verb.sections]
    pending.sort(key=lambda item: order.index(item[0].name))
    return message, pending


def _unquote(token: str, name: str) -> str:
    try:
        return unquote(token, errors="strict")
    except UnicodeDecodeError:
        raise ProtocolError("field %r is not UTF-8 once decoded" % name[:40]) from None


class MessageStream(Stream):
    """Reads and writes whole messages on one socket: protocol_core.Stream's lines,
    byte runs and ``auth`` lines, plus this module's codec (verbs, fields, sections)."""

    def read_message(
        self,
        table: Mapping[str, Verb],
        first_byte_timeout: float,
        request_nonce: str | None = None,
    ) -> Message | None:
        """The next message, or None when the peer closed before starting one.

        With authentication, a request is checked for freshness and replay, a
        reply (``request_nonce`` given) for being the answer to that request.
        """
        header = self.read_header(first_byte_timeout, request_nonce)
        if header is None:
            return None
        line, verification = header
        message, pending = decode_header(line, table)
        for section, length in pending:
            data = self.read_bytes(length, section.keep, self._message_deadline, verification)
            if length > section.keep:
                message.truncated.add(section.name)
                if section.truncate:
                    data += b"\n[... %d more bytes cut off: output limit is %d bytes ...]\n" % (
                        length - section.keep,
                        section.keep,
                    )
                else:
                    data = b""
            message.sections[section.name] = data
        if verification is not None:
            message.nonce = verification.finish()
        return message

    def write_message(
        self, message: Message, table: Mapping[str, Verb], request_nonce: str | None = None, signed: bool = True
    ) -> str | None:
        """Send ``message`` (behind an ``auth`` line when authenticating and ``signed``).

        Returns the nonce of that line, which the reply must name, or None.
        """
        return self.send(encode(message, table), request_nonce, signed)


# --- Authentication ------------------------------------------------------------------
# Authenticator (the auth line's HMAC, replay and clock checks) is in protocol_core.


# --- TLS and the security settings of a daemon -----------------------------------------


@dataclass
class Security:
    """How a daemon talks: the shared secret's authenticator and TLS contexts, each optional."""

    auth: Authenticator | None = None
    #: Serve with TLS (this daemon's certificate and key).
    server_tls: ssl.SSLContext | None = None
    #: Connect with TLS, trusting the peers' certificates through this CA file.
    client_tls: ssl.SSLContext | None = None


def server_tls_context(certificate: str, key: str) -> ssl.SSLContext:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    return context


def add_security_arguments(parser, serves: bool) -> None:
    """The options every daemon shares for the secret, TLS and (for servers) binding."""
    group = parser.add_argument_group("security")
    group.add_argument("--secret-file", metavar="FILE",
                       help="file holding the shared secret (at least %d bytes) that authenticates every "
                       "message; or set it in the environment variable %s. Never on the command line, "
                       "where ps shows it" % (MIN_SECRET_BYTES, SECRET_ENV))
    group.add_argument("--tls-ca", metavar="FILE",
                       help="connect to peers with TLS, trusting certificates signed by this CA file")
    if serves:
        group.add_argument("--tls-cert", metavar="FILE", help="serve with TLS: this daemon's certificate (PEM)")
        group.add_argument("--tls-key", metavar="FILE", help="serve with TLS: the certificate's private key (PEM)")
        group.add_argument("--insecure", action="store_true",
                           help="allow listening on a non-loopback address without a shared secret")


def security_from_arguments(args, serves: bool) -> Security:
    """Read the secret and TLS files named by ``add_security_arguments``; ValueError if wrong."""
    secret = read_secret(args.secret_file)
    security = Security(auth=Authenticator(secret) if secret is not None else None)
    try:
        if args.tls_ca:
            security.client_tls = client_tls_context(args.tls_ca)
        if serves and (args.tls_cert or args.tls_key):
            if not (args.tls_cert and args.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            security.server_tls = server_tls_context(args.tls_cert, args.tls_key)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ValueError("cannot load TLS files: %s" % exc) from None
    return security


def check_bind(host: str, security: Security, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a secret, unless told to."""
    if security.auth is None and not insecure and not is_loopback(host):
        raise ValueError(
            "refusing to listen on %s without a shared secret: anyone who reaches it could "
            "post results or run code; set --secret-file (or %s), or pass --insecure" % (host, SECRET_ENV)
        )


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    import ipaddress

    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


# --- Client side ---------------------------------------------------------------------


class Connection:
    """A client connection that can carry several requests, one after another."""

    def __init__(
        self,
        address: tuple[str, int],
        connect_timeout: float = CONNECT_TIMEOUT_S,
        security: Security | None = None,
    ):
        self.address = address
        security = security or Security()
        self.sock = connect(address, connect_timeout, security.client_tls)
        self.stream = MessageStream(self.sock, security.auth)

    def request(self, message: Message, timeout: float = IO_TIMEOUT_S) -> Message:
        """Send ``message`` and wait at most ``timeout`` seconds for the start of its reply."""
        nonce = self.stream.write_message(message, REQUESTS)
        try:
            answer = self.stream.read_message(REPLIES, first_byte_timeout=timeout, request_nonce=nonce)
        except ProtocolError as exc:
            raise ProtocolError("%s: %s" % (format_address(self.address), exc)) from None
        if answer is None:
            raise ConnectionError("%s closed the connection without a reply" % format_address(self.address))
        return answer

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def communicate(
    address: tuple[str, int],
    message: Message,
    timeout: float = IO_TIMEOUT_S,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    security: Security | None = None,
) -> Message:
    """Send one request to ``address`` and return its reply.

    Raises OSError (unreachable, timed out, reset, TLS failure) or ProtocolError
    (the peer answered something that is not a reply, or not an authentic one);
    never blocks longer than the timeouts allow.
    """
    with Connection(address, connect_timeout=connect_timeout, security=security) as connection:
        return connection.request(message, timeout=timeout)


# --- Server side ---------------------------------------------------------------------

#: Connections a server keeps open at once. Past this, the connection idle the
#: longest is closed to make room, so idle or slow clients cannot starve real ones.
MAX_CONNECTIONS = 256


class ProtocolServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server speaking this protocol; one thread per connection.

    Threads are reused: one that has finished with its connection waits up to
    THREAD_IDLE_S for the next, and a new thread starts only when none is idle.
    Starting a thread costs more than serving a short request, and socketserver's
    accept loop waits for each new thread to run before it accepts again.

    ``handle_message(message, peer)`` is called for each decoded request and
    returns the reply. Malformed or unauthentic input gets ``ERR <reason>``, a log
    line and a closed connection (after a framing error the stream cannot be
    trusted); an exception in the handler gets ``ERR internal error`` and a
    traceback in the log. No thread dies and nothing else is affected.
    """

    daemon_threads = True
    allow_reuse_address = True
    # Threads are tracked only to be joined at shutdown; daemon threads are not.
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handle_message: Callable[[Message, str], Message],
        logger: logging.Logger,
        security: Security | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.handle_message = handle_message
        self.logger = logger
        self.security = security or Security()
        self.max_connections = max_connections
        self._connections_lock = threading.Lock()
        #: Open connections -> since when each has waited for a request (None: serving one).
        self._waiting_since: dict[socket.socket, float | None] = {}
        self._pool_lock = threading.Lock()
        self._idle_threads = 0  # threads waiting for a connection, less those promised one
        self._connections: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(address, _ProtocolHandler)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return host, port

    def process_request(self, request, client_address) -> None:
        # Runs in the accepting thread: decide here, before a thread is spent on it.
        with self._connections_lock:
            if len(self._waiting_since) >= self.max_connections:
                idle = [(since, sock) for sock, since in self._waiting_since.items() if since is not None]
                if not idle:
                    self.logger.warning("connection from %s refused: %d connections busy", client_address[0], len(self._waiting_since))
                    _refuse(request, "too many connections")
                    self.shutdown_request(request)
                    return
                _, oldest = min(idle, key=lambda item: item[0])
                self._waiting_since[oldest] = None  # evicted once only
                self.logger.info("at %d connections: closing the one idle longest", self.max_connections)
                try:
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._waiting_since[request] = time.monotonic()
        self._hand_to_thread(request, client_address)

    def _hand_to_thread(self, request, client_address) -> None:
        with self._pool_lock:
            if self._idle_threads:
                self._idle_threads -= 1
                self._connections.put((request, client_address))
                return
        thread = threading.Thread(target=self._serve_connections, args=(request, client_address),
                                  name="connection", daemon=True)
        thread.start()

    def _serve_connections(self, request, client_address) -> None:
        while True:
            self.process_request_thread(request, client_address)  # handles and closes it
            with self._pool_lock:
                self._idle_threads += 1
            try:
                request, client_address = self._connections.get(timeout=THREAD_IDLE_S)
            except queue.Empty:
                with self._pool_lock:
                    # A connection may have been queued for this thread between the
                    # timeout and the lock: serve it rather than leave it waiting.
                    try:
                        request, client_address = self._connections.get_nowait()
                    except queue.Empty:
                        self._idle_threads -= 1
                        return

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self._waiting_since.pop(request, None)
        super().shutdown_request(request)

    def _set_waiting(self, sock: socket.socket, waiting: bool) -> None:
        with self._connections_lock:
            if sock in self._waiting_since:
                self._waiting_since[sock] = time.monotonic() if waiting else None

    def handle_error(self, request, client_address) -> None:  # noqa: D401 - socketserver hook
        # socketserver prints tracebacks to stderr; send them to the log instead.
        self.logger.exception("unexpected error serving %s", client_address)


def _refuse(sock: socket.socket, reason: str) -> None:
    try:
        sock.settimeout(0.2)
        sock.sendall(encode(error(reason), REPLIES))
    except OSError:
        pass


class _ProtocolHandler(socketserver.BaseRequestHandler):
    server: ProtocolServer

    def handle(self) -> None:
        peer = "%s:%s" % self.client_address[:2]
        raw = self.request
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sock = raw
        if self.server.security.server_tls is not None:
            try:
                sock = self.server.security.server_tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                sock.settimeout(IO_TIMEOUT_S)
                sock.do_handshake()
            except OSError as exc:  # ssl.SSLError included
                self.server.logger.warning("TLS handshake with %s failed: %s", peer, exc)
                return
        stream = MessageStream(sock, self.server.security.auth)
        while True:
            self.server._set_waiting(raw, True)
            try:
                message = stream.read_message(REQUESTS, first_byte_timeout=IDLE_TIMEOUT_S)
            except ProtocolError as exc:
                self.server.logger.warning("bad request from %s: %s", peer, exc)
                # An unauthentic request gets an unsigned answer: there is nothing to bind it to.
                self._send(stream, error(str(exc)), peer, None)
                return
            except (OSError, TimeoutError) as exc:
                self.server.logger.debug("connection from %s ended: %s", peer, exc)
                return
            if message is None:
                return
            self.server._set_waiting(raw, False)
            try:
                answer = self.server.handle_message(message, peer)
            except Exception:  # a bug must cost one reply, not the thread
                self.server.logger.exception("error handling %s from %s", message.verb, peer)
                answer = error("internal error")
            if not self._send(stream, answer, peer, message.nonce):
                return

    def _send(self, stream: MessageStream, answer: Message, peer: str, request_nonce: str | None) -> bool:
        try:
            stream.write_message(answer, REPLIES, request_nonce=request_nonce, signed=request_nonce is not None)
            return True
        except OSError as exc:
            self.server.logger.info("could not reply to %s: %s", peer, exc)
            return False


def serve_in_thread(server: ProtocolServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True)
    thread.start()
    return thread


# --- Files, logging, signals ---------------------------------------------------------


def atomic_write(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never part.

    The data goes to a temporary file in the same folder, is flushed (and, with
    ``durable``, fsync'ed), then renamed over ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    import tempfile

    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """One line per event: time, daemon, level, message; to stderr or to ``log_file``."""
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # GitPython logs every git call at DEBUG; that drowns the daemon's own lines.
    logging.getLogger("git").setLevel(logging.INFO)


def install_stop_signals(stop: threading.Event, logger: logging.Logger) -> None:
    """SIGTERM and SIGINT set ``stop``; a second one exits at once.

    The handler only records: the main thread notices ``stop`` and shuts down in
    order. Must be called from the main thread.
    """

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def script_path(name: str) -> str:
    """Where one of the project's shell scripts is: beside this module in a source
    checkout; after ``pip install``, in the environment's scripts folder (setup.py
    installs them there) or elsewhere on PATH."""
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    if os.path.exists(beside):
        return beside
    installed = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.exists(installed):
        return installed
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError("%s is neither beside %s, in %s, nor on PATH" % (name, __file__, sysconfig.get_path("scripts")))
    return found
