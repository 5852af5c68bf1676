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
``ProtocolServer`` (an event loop with threads for slow connections, which never
lets a bad peer disturb the others), atomic file writes, logging set-up and signal handling.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import signal
import selectors
import socket
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

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
    is_commit_prefix,
    is_decimal,
    parse_address,
    parse_commit,
    parse_commit_prefix,
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

#: Section bytes one process holds at once for messages still arriving. Until its
#: last byte a message is not authenticated, so without this anyone who can connect
#: could make a server hold MAX_CONNECTIONS times 16 MiB; past it, a message with
#: sections is refused with ERR (a runner keeps its result and sends it again).
SECTION_BUDGET_BYTES = 64 * 1024 * 1024

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
# parse_commit_prefix, parse_host and parse_port are in protocol_core.


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
        # The one verb that takes a commit id prefix: people type ids to look them up.
        Verb("result", positional=(("commit", parse_commit_prefix),)),
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


#: The ``ERR`` reason to ``results`` for an attempt the dispatcher never gave out:
#: the only refusal after which a runner drops the result (docs/protocol.md).
UNKNOWN_ATTEMPT = "unknown commit or attempt"


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


class _ByteBudget:
    """A count of bytes that threads take from and give back; taking fails, rather
    than waits, when there are not enough left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_use = 0

    def take(self, count: int, limit: int) -> bool:
        with self._lock:
            if count and self.in_use + count > limit:
                return False
            self.in_use += count
            return True

    def give_back(self, count: int) -> None:
        with self._lock:
            self.in_use -= count


_sections_arriving = _ByteBudget()


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
        held = sum(min(length, section.keep) for section, length in pending)
        if not _sections_arriving.take(held, SECTION_BUDGET_BYTES):
            raise ProtocolError("busy: too many large messages arriving at once; send it again later")
        try:
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
        finally:
            # Once whole (and authenticated), a message is its handler's to hold.
            _sections_arriving.give_back(held)
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

    def request(self, message: Message, timeout: float = IO_TIMEOUT_S, total_timeout: float | None = None) -> Message:
        """Send ``message`` and wait at most ``timeout`` seconds for the start of its
        reply, and, with ``total_timeout``, at most that long for all of it."""
        self.stream.deadline_cap = None if total_timeout is None else time.monotonic() + total_timeout
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
    total_timeout: float | None = None,
) -> Message:
    """Send one request to ``address`` and return its reply.

    ``timeout`` bounds the wait for the reply's first byte; a reply then has
    MESSAGE_DEADLINE_S to arrive whole, or ``total_timeout`` (from the moment it
    is sent) when given: a peer that answers a byte at a time cannot hold a caller
    that has somewhere else to be. Raises OSError (unreachable, timed out, reset,
    TLS failure) or ProtocolError (the peer answered something that is not a reply,
    or not an authentic one); never blocks longer than the timeouts allow.
    """
    with Connection(address, connect_timeout=connect_timeout, security=security) as connection:
        return connection.request(message, timeout=timeout, total_timeout=total_timeout)


# --- Server side ---------------------------------------------------------------------

#: Connections a server keeps open at once. Past this, the connection idle the
#: longest is closed to make room, so idle or slow clients cannot starve real ones.
MAX_CONNECTIONS = 256
#: Per turn of the event loop: connections accepted, requests answered on one
#: connection. A burst on one socket must not keep the others waiting.
ACCEPTS_PER_TURN = 64
REQUESTS_PER_TURN = 8
#: Bytes the event loop takes from a socket at a time.
RECEIVE_BYTES = 65536
#: The event loop looks for connections idle past IDLE_TIMEOUT_S at least this often.
IDLE_SWEEP_S = 1.0
#: How long ``shutdown()`` waits for the event loop to finish its turn.
SHUTDOWN_WAIT_S = 30.0

_LISTENER = "listener"
_WAKE_UP = "wake-up"


class _NeedMore(Exception):
    """The bytes received so far end in the middle of a message."""


class _ReceivedStream(MessageStream):
    """A MessageStream over what the event loop has received from a non-blocking
    socket: where a blocking one would wait for more, it gives up and consumes nothing."""

    def _recv(self, deadline: float) -> bytes:
        raise _NeedMore

    def receive(self, data: bytes) -> None:
        self._buffer += data

    @property
    def received(self) -> bytes:
        """What has arrived and not been read yet."""
        return bytes(self._buffer)

    def read_whole_request(self) -> Message | None:
        """The next request if all of it has arrived, else None. ProtocolError as
        ``read_message`` raises it, which needs no more bytes to be sure."""
        before = bytes(self._buffer)
        try:
            return self.read_message(REQUESTS, first_byte_timeout=0)
        except _NeedMore:
            self._buffer[:] = before
            return None


class ProtocolServer:
    """Serves this protocol on a TCP port: an event loop for the common case, a thread
    for each connection that has to be waited on.

    ``handle_message(message, peer)`` is called for each decoded request and returns
    the reply. The thread in ``serve_forever`` accepts connections, waits on all of
    them at once and answers every request that has arrived whole, unless its verb is
    one of ``threaded_verbs`` (those that write files or otherwise take a while). A
    request on a fresh connection then costs no thread switch: with a thread per
    connection, handing the GIL and the locks around among some thirty threads cost
    more than serving the request (docs/performance.md).

    A connection moves to a pool thread, which serves it with blocking reads under
    deadlines until it closes, when it is TLS, when a request arrives in pieces (a
    runner's results with their log), for a threaded verb, and when the socket does
    not take a reply at once. Pool threads are reused: one that has finished with its
    connection waits up to THREAD_IDLE_S for the next.

    Malformed or unauthentic input gets ``ERR <reason>``, a log line and a closed
    connection (after a framing error the stream cannot be trusted); an exception in
    the handler gets ``ERR internal error`` and a traceback in the log. Nothing else is
    affected. At ``max_connections`` the connection idle longest is closed for the new one.
    """

    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handle_message: Callable[[Message, str], Message],
        logger: logging.Logger,
        security: Security | None = None,
        max_connections: int = MAX_CONNECTIONS,
        threaded_verbs: Iterable[str] = (),
    ):
        self.handle_message = handle_message
        self.logger = logger
        self.security = security or Security()
        self.max_connections = max_connections
        self.threaded_verbs = frozenset(threaded_verbs)
        self._connections_lock = threading.Lock()
        #: Open connections -> since when each has waited for a request (None: serving one).
        self._waiting_since: dict[socket.socket, float | None] = {}
        #: The connections the event loop serves, with their peer and stream (the loop's alone).
        self._loop_connections: dict[socket.socket, tuple[str, _ReceivedStream]] = {}
        self._pool_lock = threading.Lock()
        self._idle_threads = 0  # pool threads waiting for a connection, less those promised one
        self._handovers: queue.SimpleQueue = queue.SimpleQueue()
        self._stop_requested = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(self.request_queue_size)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.server_address = self._listener.getsockname()
        # Written to by shutdown(), so that the loop stops now rather than at its next timeout.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, _WAKE_UP)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return host, port

    # --- the event loop ---------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until ``shutdown()``; no wait of the loop is longer than ``poll_interval``."""
        self._stopped.clear()
        next_sweep = time.monotonic()
        try:
            while not self._stop_requested:
                now = time.monotonic()
                if now >= next_sweep:
                    self._close_idle_connections(now)
                    next_sweep = now + min(IDLE_SWEEP_S, IDLE_TIMEOUT_S / 2)
                for key, _ in self._selector.select(min(poll_interval, next_sweep - now)):
                    if key.data is _LISTENER:
                        self._accept_some()
                    elif key.data is _WAKE_UP:
                        self._drain_wake_ups()
                    elif key.fileobj in self._loop_connections:  # not closed earlier in this turn
                        self._serve_readable(key.fileobj)
        finally:
            self._stop_requested = False
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait until it has returned."""
        self._stop_requested = True
        try:
            self._wake_writer.send(b"\0")
        except OSError:  # full: a wake-up is pending anyway
            pass
        if not self._stopped.wait(SHUTDOWN_WAIT_S):
            self.logger.warning("the server's event loop did not stop within %g s", SHUTDOWN_WAIT_S)

    def server_close(self) -> None:
        """Close the listening socket and the connections the event loop holds (after
        ``shutdown()``); pool threads finish with theirs at their next read."""
        self._selector.close()
        self._listener.close()
        for sock in list(self._loop_connections):
            self._close(sock)
        self._loop_connections.clear()
        self._wake_reader.close()
        self._wake_writer.close()

    def _drain_wake_ups(self) -> None:
        try:
            self._wake_reader.recv(4096)
        except OSError:
            pass

    def _accept_some(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, client_address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, for one
                self.logger.warning("could not accept a connection: %s", exc)
                return
            peer = "%s:%s" % client_address[:2]
            if not self._make_room(peer):
                _refuse(sock, "too many connections")
                sock.close()
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._connections_lock:
                self._waiting_since[sock] = time.monotonic()
            if self.security.server_tls is not None:
                self._hand_to_thread(sock, peer, None, None, b"")
                continue
            sock.setblocking(False)
            self._loop_connections[sock] = (peer, _ReceivedStream(sock, self.security.auth))
            self._selector.register(sock, selectors.EVENT_READ)
            # A client sends its request as soon as it is connected: often it is here already.
            self._serve_readable(sock)

    def _make_room(self, peer: str) -> bool:
        """Whether a new connection may be served, after closing the one idle longest if
        that is what it takes."""
        with self._connections_lock:
            if len(self._waiting_since) < self.max_connections:
                return True
            idle = [(since, sock) for sock, since in self._waiting_since.items() if since is not None]
            if not idle:
                self.logger.warning("connection from %s refused: %d connections busy", peer, len(self._waiting_since))
                return False
            _, oldest = min(idle, key=lambda item: item[0])
            self._waiting_since[oldest] = None  # evicted once only
        self.logger.info("at %d connections: closing the one idle longest", self.max_connections)
        if oldest in self._loop_connections:
            self._close_loop_connection(oldest)
        else:
            try:  # its thread sees the end of the stream and closes it
                oldest.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def _close_idle_connections(self, now: float) -> None:
        limit = now - IDLE_TIMEOUT_S
        with self._connections_lock:
            idle = [sock for sock in self._loop_connections if (self._waiting_since.get(sock) or now) < limit]
        for sock in idle:
            self.logger.debug("connection from %s closed: idle for %g s", self._loop_connections[sock][0], IDLE_TIMEOUT_S)
            self._close_loop_connection(sock)

    def _serve_readable(self, sock: socket.socket) -> None:
        peer, stream = self._loop_connections[sock]
        try:
            data = sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.logger.debug("connection from %s ended: %s", peer, exc)
            self._close_loop_connection(sock)
            return
        if not data:
            if stream.received:
                self.logger.warning("bad request from %s: connection closed in the middle of a message", peer)
            self._close_loop_connection(sock, peer_closed=True)
            return
        stream.receive(data)
        try:
            for _ in range(REQUESTS_PER_TURN):
                if not self._answer_received(sock, peer, stream) or not stream.received:
                    return
            # Requests queued up on one connection: they get a thread, the others the loop.
            self._move_to_thread(sock, None, b"")
        except Exception:  # a bug must cost one connection, not the server
            self.logger.exception("unexpected error serving %s", peer)
            if sock in self._loop_connections:
                self._close_loop_connection(sock)

    def _answer_received(self, sock: socket.socket, peer: str, stream: _ReceivedStream) -> bool:
        """Answer the request at the head of what ``sock`` has sent; whether the
        connection is still the loop's."""
        try:
            message = stream.read_whole_request()
        except ProtocolError as exc:
            self.logger.warning("bad request from %s: %s", peer, exc)
            try:  # unsigned: there is nothing to bind it to
                sock.send(encode(error(str(exc)), REPLIES))
            except OSError:
                pass
            self._close_loop_connection(sock)
            return False
        if message is None or message.verb in self.threaded_verbs:
            self._move_to_thread(sock, message, b"")
            return False
        self._set_waiting(sock, False)
        answer = self._answer(message, peer)
        data, _ = stream.frame(encode(answer, REPLIES), message.nonce, signed=message.nonce is not None)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.logger.info("could not reply to %s: %s", peer, exc)
            self._close_loop_connection(sock)
            return False
        if sent < len(data):
            self._move_to_thread(sock, None, data[sent:])
            return False
        self._set_waiting(sock, True)
        return True

    def _answer(self, message: Message, peer: str) -> Message:
        try:
            return self.handle_message(message, peer)
        except Exception:  # a bug must cost one reply, not the connection
            self.logger.exception("error handling %s from %s", message.verb, peer)
            return error("internal error")

    def _leave_loop(self, sock: socket.socket) -> tuple[str, _ReceivedStream]:
        """Stop watching ``sock``; its peer and stream."""
        self._selector.unregister(sock)
        return self._loop_connections.pop(sock)

    def _close_loop_connection(self, sock: socket.socket, peer_closed: bool = False) -> None:
        self._leave_loop(sock)
        self._close(sock, peer_closed)

    def _close(self, sock: socket.socket, peer_closed: bool = False) -> None:
        with self._connections_lock:
            self._waiting_since.pop(sock, None)
        if not peer_closed:  # else there is no one left to tell
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        sock.close()

    def _set_waiting(self, sock: socket.socket, waiting: bool) -> None:
        with self._connections_lock:
            if sock in self._waiting_since:
                self._waiting_since[sock] = time.monotonic() if waiting else None

    # --- connections served by threads ------------------------------------------------

    def _move_to_thread(self, sock: socket.socket, first: Message | None, unsent: bytes) -> None:
        peer, stream = self._leave_loop(sock)
        self._hand_to_thread(sock, peer, MessageStream(sock, stream.auth, stream.received), first, unsent)

    def _hand_to_thread(
        self, sock: socket.socket, peer: str, stream: MessageStream | None, first: Message | None, unsent: bytes
    ) -> None:
        work = (sock, peer, stream, first, unsent)
        with self._pool_lock:
            if self._idle_threads:
                self._idle_threads -= 1
                self._handovers.put(work)
                return
        threading.Thread(target=self._pool_thread, args=(work,), name="connection", daemon=True).start()

    def _pool_thread(self, work: tuple) -> None:
        while True:
            try:
                self._serve_blocking(*work)
            except Exception:  # a bug must cost one connection, not the thread
                self.logger.exception("unexpected error serving %s", work[1])
            with self._pool_lock:
                self._idle_threads += 1
            try:
                work = self._handovers.get(timeout=THREAD_IDLE_S)
            except queue.Empty:
                with self._pool_lock:
                    # A connection may have been handed over between the timeout and
                    # the lock: serve it rather than leave it waiting.
                    try:
                        work = self._handovers.get_nowait()
                    except queue.Empty:
                        self._idle_threads -= 1
                        return

    def _serve_blocking(
        self, sock: socket.socket, peer: str, stream: MessageStream | None, message: Message | None, unsent: bytes
    ) -> None:
        """Serve one connection until it closes: ``message`` is a request already read
        from ``stream``, ``unsent`` the rest of a reply; no stream: a new TLS connection."""
        try:
            if stream is None:
                sock, stream = self._start_tls(sock, peer)
                if stream is None:
                    return
            if unsent:
                try:
                    sock.settimeout(IO_TIMEOUT_S)
                    sock.sendall(unsent)
                except OSError as exc:
                    self.logger.info("could not reply to %s: %s", peer, exc)
                    return
            while True:
                if message is None:
                    self._set_waiting(sock, True)
                    try:
                        message = stream.read_message(REQUESTS, first_byte_timeout=IDLE_TIMEOUT_S)
                    except ProtocolError as exc:
                        self.logger.warning("bad request from %s: %s", peer, exc)
                        # An unauthentic request gets an unsigned answer: there is nothing to bind it to.
                        self._send(stream, error(str(exc)), peer, None)
                        return
                    except (OSError, TimeoutError) as exc:
                        self.logger.debug("connection from %s ended: %s", peer, exc)
                        return
                    if message is None:
                        return
                self._set_waiting(sock, False)
                if not self._send(stream, self._answer(message, peer), peer, message.nonce):
                    return
                message = None
        finally:
            self._close(sock)

    def _start_tls(self, sock: socket.socket, peer: str) -> tuple[socket.socket, MessageStream | None]:
        """The socket that now holds the connection (TLS over ``sock`` once wrapped) and,
        if the handshake succeeded, a stream on it; the caller closes the socket."""
        try:
            tls = self.security.server_tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            self.logger.warning("TLS with %s failed: %s", peer, exc)
            return sock, None
        with self._connections_lock:
            # ``sock`` has handed its descriptor to ``tls``: eviction must shut the new one.
            if sock in self._waiting_since:
                self._waiting_since[tls] = self._waiting_since.pop(sock)
        try:
            tls.settimeout(IO_TIMEOUT_S)
            tls.do_handshake()
        except OSError as exc:  # ssl.SSLError included
            self.logger.warning("TLS handshake with %s failed: %s", peer, exc)
            return tls, None
        return tls, MessageStream(tls, self.security.auth)

    def _send(self, stream: MessageStream, answer: Message, peer: str, request_nonce: str | None) -> bool:
        try:
            stream.write_message(answer, REPLIES, request_nonce=request_nonce, signed=request_nonce is not None)
            return True
        except OSError as exc:
            self.logger.info("could not reply to %s: %s", peer, exc)
            return False


def _refuse(sock: socket.socket, reason: str) -> None:
    try:
        sock.settimeout(0.2)
        sock.sendall(encode(error(reason), REPLIES))
    except OSError:
        pass


def serve_in_thread(server: ProtocolServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True)
    thread.start()
    return thread


# --- Files, logging, signals ---------------------------------------------------------


def _read_umask() -> int:
    # Read once, at import (before any thread): os.umask can only be read by setting it.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: What a file made with open() gets; mkstemp's files are private (0600) instead.
NEW_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never part.

    The data goes to a temporary file in the same folder, is flushed (and, with
    ``durable``, fsync'ed), then renamed over ``path``. The file gets the mode
    open() would give it (0644 under the usual umask): results are for others
    to read, a web server for one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    import tempfile

    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), NEW_FILE_MODE)
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
    # The format above uses none of these, and finding them costs about half of a
    # line's 30 us, on the path of every request (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # GitPython logs every git call at DEBUG; that drowns the daemon's own lines.
    logging.getLogger("git").setLevel(logging.INFO)


def install_stop_signals(stop: threading.Event, logger: logging.Logger,
                         signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """``signals`` (SIGTERM and SIGINT) set ``stop``; a second one exits at once.

    The handler only records: the main thread notices ``stop`` and shuts down in
    order. Must be called from the main thread.
    """

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        signal.signal(signum, on_signal)


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
