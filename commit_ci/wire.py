"""The bottom layer of the protocol: bytes on a socket, and the values a client sends.

The push trigger's git hook (push_hook.py) is a new Python process on every push; each
module it imports is paid for on every push (docs/performance.md, detection). So what
both the hook and the daemons' codec (protocol.py) need lives here, once, cheap to
import:

* ``ProtocolError``, the one error for input that does not follow the protocol;
* commit ids (full, or a prefix to look one up), names (of runners and keys), branch
  names and ``host:port`` addresses, checked, and a field's value percent-encoded;
* header lines: their size cap, and the first split of one into verb and the rest;
* ``Stream``: lines and byte runs read from a socket, every read under a deadline, and
  messages written and read behind an ``auth`` line when a secret or key is in use
  (the tag itself is security.py's ``Authenticator``);
* ``connect()``: a TCP connection, with TLS when given a context.

It imports only _socket (see ``connect``) and time. Nothing here may import re, logging, dataclasses
or typing: each costs the hook milliseconds. docs/protocol.md describes the bytes.
"""

import _socket
import time

# For annotations alone (type checkers take the branch; nothing is imported at run time).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from commit_ci.security import Authenticator, Key, _Verification

#: Longest header line accepted, newline included. Headers carry ids and small
#: numbers; anything longer is garbage or an attack.
MAX_LINE_BYTES = 8 * 1024
#: How long connect() may take before the peer is considered unreachable.
CONNECT_TIMEOUT_S = 3.0
#: Longest wait for any single read or write to make progress.
IO_TIMEOUT_S = 10.0
#: A whole message (header and sections) must arrive within this time.
MESSAGE_DEADLINE_S = 120.0


class ProtocolError(Exception):
    """Input that does not follow the protocol. The text is sent back after ``ERR``."""


class Refused(ProtocolError):
    """An unsigned ``ERR`` where a signed reply was due: the peer refused the request
    before it could authenticate it (an unknown key, a stale time...)."""


# --- Values a client sends ------------------------------------------------------------
# Checked with sets, not regular expressions: importing re costs the hook more than
# everything here.

_HEX = frozenset("0123456789abcdef")
_DECIMAL = frozenset("0123456789")
_HOST_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_NAME_CHARACTERS = _HOST_CHARACTERS | {"@"}
#: Longest name of a runner or a key. A runner's name defaults to ``host:port``, hence
#: the ':' among the characters a name may have.
MAX_NAME_LENGTH = 128


#: Hex digits of a full commit id: SHA-1 and SHA-256 object names.
FULL_COMMIT_LENGTHS = (40, 64)
#: Fewest hex digits of a commit id prefix (git's own shortest abbreviation).
MIN_COMMIT_PREFIX = 7


def is_commit_id(text: str) -> bool:
    """Whether ``text`` is a full commit id, 40 or 64 lower-case hex digits, as every
    commit id on the wire is (but the prefix a ``lookup`` query may give)."""
    return len(text) in FULL_COMMIT_LENGTHS and _HEX.issuperset(text)


def is_commit_prefix(text: str) -> bool:
    """Whether ``text`` is 7 to 64 lower-case hex digits: the start of a commit id, or all of it."""
    return MIN_COMMIT_PREFIX <= len(text) <= 64 and _HEX.issuperset(text)


def is_decimal(text: str) -> bool:
    """Whether ``text`` is 1 to 12 ASCII digits (str.isdigit() would let through '²',
    which int() refuses)."""
    return 1 <= len(text) <= 12 and _DECIMAL.issuperset(text)


def is_name(text: str) -> bool:
    """Whether ``text`` is a name (of a runner, of a key): 1 to 128 characters of
    ``A-Z a-z 0-9 . _ : @ -``."""
    return 1 <= len(text) <= MAX_NAME_LENGTH and _NAME_CHARACTERS.issuperset(text)


def parse_commit(text: str) -> str:
    """A full commit id: 40 or 64 hex digits, returned in lower case.

    Commit ids become file names and git arguments, so nothing else gets through. An
    abbreviated id is refused too: it would be a second name for a commit already
    known by its full id, and the commit would be tested and recorded twice.
    """
    value = text.lower()
    if not is_commit_id(value):
        raise ProtocolError("invalid commit id (want the full id: 40 or 64 hex digits)")
    return value


def parse_commit_prefix(text: str) -> str:
    """The start of a commit id, 7 to 64 hex digits, returned in lower case: what an
    operator types to look a commit up, never a name to store or test under."""
    value = text.lower()
    if not is_commit_prefix(value):
        raise ProtocolError("invalid commit id or prefix (want 7 to 64 hex digits)")
    return value


def parse_host(text: str) -> str:
    if not 1 <= len(text) <= 253 or not _HOST_CHARACTERS.issuperset(text):
        raise ProtocolError("invalid host")
    return text


#: Longest branch name accepted, in UTF-8 bytes: git allows longer, but a name travels
#: in every ``dispatch`` of its commits and is shown on the results page.
MAX_BRANCH_BYTES = 200
#: What git refuses anywhere in a branch name (git check-ref-format), besides control
#: characters.
_BRANCH_FORBIDDEN = frozenset(" ~^:?*[\\")


def is_branch_name(text: str) -> bool:
    """Whether ``text`` is a name git accepts for a branch (``git check-ref-format
    --branch``), of at most MAX_BRANCH_BYTES bytes: no control character, space or any
    of ``~ ^ : ? * [ \\``; no ``..``, ``//`` or ``@{``; no part (between slashes) that
    starts with a dot or ends with ``.lock``; not starting with ``-`` or ``/``, not
    ending with ``/`` or ``.``; not ``@`` nor ``HEAD``."""
    if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_BRANCH_BYTES or text in ("@", "HEAD"):
        return False
    if any(ord(c) < 32 or ord(c) == 127 or c in _BRANCH_FORBIDDEN for c in text):
        return False
    if ".." in text or "//" in text or "@{" in text or text[0] in "-/" or text[-1] in "/.":
        return False
    return not any(part.startswith(".") or part.endswith(".lock") for part in text.split("/"))


def parse_branch(text: str) -> str:
    """A branch name (``is_branch_name``), as the observer and the push hook send it."""
    if not is_branch_name(text):
        raise ProtocolError("invalid branch name (want a git branch name of at most %d bytes)" % MAX_BRANCH_BYTES)
    return text


#: Characters a field's value carries as they are; everything else is %XX of its UTF-8.
FIELD_SAFE_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@/+,")


def quote_field(text: str) -> str:
    """``text`` percent-encoded as a header's field value (what protocol.py's encoder
    does with urllib, which the push hook does not import)."""
    return "".join(c if c in FIELD_SAFE_CHARACTERS else "".join("%%%02X" % b for b in c.encode("utf-8"))
                   for c in text)


def parse_port(text: str) -> int:
    if not is_decimal(text) or not 1 <= int(text) <= 65535:
        raise ProtocolError("invalid port (want 1 to 65535)")
    return int(text)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` as given on a command line, checked."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("want HOST:PORT, got %r" % text)
    try:
        return parse_host(host), parse_port(port)
    except ProtocolError as exc:
        raise ValueError("%s in %r" % (exc, text)) from None


def format_address(address: tuple[str, int]) -> str:
    return "%s:%d" % address


# --- Header lines ----------------------------------------------------------------------


def header_bytes(header: str) -> bytes:
    """A header line as it goes on the wire: UTF-8, a newline, at most MAX_LINE_BYTES."""
    line = header.encode("utf-8") + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise ValueError("header of %s exceeds %d bytes" % (header.partition(" ")[0], MAX_LINE_BYTES))
    return line


def split_header(line: bytes) -> tuple[str, str]:
    """A header line (without its newline) as its verb and the rest of it.

    Raises ProtocolError unless the line is UTF-8 without control characters and not
    blank; trailing spaces are dropped (people type requests by hand with nc).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("header is not UTF-8") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ProtocolError("control character in header")
    text = text.rstrip(" ")
    if not text.strip():
        raise ProtocolError("empty line")
    verb, _, rest = text.partition(" ")
    return verb, rest


# --- Reading and writing on a socket ---------------------------------------------------


class Stream:
    """Reads and writes the lines and bytes of messages on one socket, every operation
    under a deadline.

    A hand-rolled buffer rather than ``socket.makefile``: each ``recv`` gets the
    time left until the message's deadline, so a peer that trickles one byte at
    a time cannot hold a thread for longer than ``MESSAGE_DEADLINE_S``. With an
    ``Authenticator``, each message travels behind an ``auth`` line (see there).
    protocol.MessageStream adds the codec (verbs, fields, sections) on top; the
    ``Authenticator`` is security.py's.
    """

    def __init__(self, sock: _socket.socket, auth: "Authenticator | None" = None, buffered: bytes = b""):
        self.sock = sock
        self.auth = auth
        #: Bytes received and not yet read (``buffered``: what an earlier reader received).
        self._buffer = bytearray(buffered)
        #: When the message being read must be complete: set by its first byte.
        self._message_deadline = 0.0
        #: A client's limit for the whole exchange (``time.monotonic()``), or None:
        #: no read goes past it, however the peer trickles its answer.
        self.deadline_cap: float | None = None

    def _capped(self, deadline: float) -> float:
        return deadline if self.deadline_cap is None else min(deadline, self.deadline_cap)

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("message deadline passed")
        self.sock.settimeout(min(remaining, IO_TIMEOUT_S))
        return self.sock.recv(65536)

    def read_line(self, first_byte_timeout: float, continuing: bool = False) -> bytes | None:
        """One line without its newline; None if the peer closed cleanly before it.

        The first line of a message starts the message's deadline; a ``continuing``
        line (the header after an ``auth`` line) is bound by that same deadline.
        """
        started = continuing or bool(self._buffer)
        if continuing:
            deadline = self._message_deadline
        elif started:
            deadline = self._message_deadline = self._capped(time.monotonic() + MESSAGE_DEADLINE_S)
        else:
            deadline = self._capped(time.monotonic() + first_byte_timeout)
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                if newline + 1 > MAX_LINE_BYTES:
                    raise ProtocolError("line too long (limit %d bytes)" % MAX_LINE_BYTES)
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buffer) > MAX_LINE_BYTES:
                raise ProtocolError("line too long (limit %d bytes)" % MAX_LINE_BYTES)
            chunk = self._recv(deadline)
            if not chunk:
                if self._buffer or continuing:
                    raise ProtocolError("connection closed in the middle of a line")
                return None
            if not started:
                started = True
                deadline = self._message_deadline = self._capped(time.monotonic() + MESSAGE_DEADLINE_S)
            self._buffer += chunk

    def read_bytes(self, length: int, keep: int, deadline: float, digest: "_Verification | None" = None) -> bytes:
        """Read ``length`` bytes, keeping the first ``keep`` and discarding the rest
        (all of them still count for the message's tag)."""
        kept = bytearray()
        remaining = length
        while remaining:
            if self._buffer:
                chunk = bytes(self._buffer[:remaining])
                del self._buffer[: len(chunk)]
            else:
                chunk = self._recv(deadline)
                if not chunk:
                    raise ProtocolError("connection closed in the middle of a section")
                if len(chunk) > remaining:
                    self._buffer += chunk[remaining:]
                    chunk = chunk[:remaining]
            if digest is not None:
                digest.update(chunk)
            remaining -= len(chunk)
            room = keep - len(kept)
            if room > 0:
                kept += chunk[:room]
        return bytes(kept)

    def read_header(
        self, first_byte_timeout: float, request_nonce: str | None = None
    ) -> "tuple[bytes, _Verification | None] | None":
        """The next message's header line, or None when the peer closed before starting one.

        With authentication, the ``auth`` line before it is read first, and the
        verification returned must be given the message's section bytes (``read_bytes``)
        and then ``finish()``ed. A reply (``request_nonce`` given) is checked for being
        the answer to that request, a request for freshness and replay.
        """
        line = self.read_line(first_byte_timeout)
        if line is None or self.auth is None:
            return None if line is None else (line, None)
        kind = "reply" if request_nonce is not None else "request"
        verification = self.auth.begin(kind, line, request_nonce)
        line = self.read_line(first_byte_timeout, continuing=True)
        verification.update(line + b"\n")
        return line, verification

    def send(self, data: bytes, request_nonce: str | None = None, signed: bool = True,
             key: "Key | None" = None) -> str | None:
        """Send the bytes of one message (behind an ``auth`` line when authenticating
        and ``signed``). Returns the nonce of that line, which the reply must name, or None.
        """
        data, nonce = self.frame(data, request_nonce, signed, key)
        self.sock.settimeout(IO_TIMEOUT_S)
        self.sock.sendall(data)
        return nonce

    def frame(self, data: bytes, request_nonce: str | None = None, signed: bool = True,
              key: "Key | None" = None) -> tuple[bytes, str | None]:
        """The bytes ``send`` would send for ``data``, and the nonce of their ``auth`` line.

        ``key`` signs it: a reply is signed with the key of its request; by default,
        the authenticator's own key."""
        if self.auth is None or not signed:
            return data, None
        kind = "reply" if request_nonce is not None else "request"
        auth_line, nonce = self.auth.sign(kind, data, request_nonce, key)
        return auth_line + data, nonce


# --- Connecting ---------------------------------------------------------------------------


def connect(address: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S, tls=None) -> _socket.socket:
    """A TCP connection to ``address`` with Nagle off, wrapped in TLS when ``tls`` (an
    SSLContext) is given. Connecting (to each address the host resolves to, in turn,
    as socket.create_connection does) and the TLS handshake run under ``timeout``;
    OSError (ssl.SSLError included) if either fails.

    Without TLS the socket is the C module's own ``_socket.socket``, the base of
    socket.socket, with every method a Stream uses: socket.py adds enums whose
    import would cost the push hook some 4 ms of its 8 (``-X importtime``). ssl needs
    socket.py's class and imports it anyway.
    """
    host, port = address
    # getaddrinfo() passes a str host through the "idna" codec, whose import (with re)
    # costs the hook ~6 ms; an ASCII host given as bytes skips it and resolves the same.
    infos = _socket.getaddrinfo(host.encode("ascii") if host.isascii() else host, port, 0, _socket.SOCK_STREAM)
    failure: OSError = OSError("%s resolves to no address" % host)
    for family, kind, proto, _name, where in infos:
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            return sock if tls is None else _wrap_tls(sock, tls, host, timeout)
        except OSError as exc:
            failure = exc
        except BaseException:
            sock.close()
            raise
        sock.close()
    raise failure


def _wrap_tls(raw: _socket.socket, tls, host: str, timeout: float):
    """``raw`` as a TLS connection to ``host``, handshake done (the socket is closed if it fails)."""
    import socket

    sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    try:
        sock.settimeout(timeout)
        return tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
