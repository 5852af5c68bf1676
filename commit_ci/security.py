"""Who may talk to whom: the shared secret, the ``auth`` line's tag, TLS, and the
security options every daemon shares.

* ``Authenticator``: HMAC-SHA256 over every message with the shared secret, its
  freshness and replay checks (the ``auth`` line that wire.Stream puts before a
  message and reads back);
* the secret, read from its file or the environment (never the command line);
* TLS contexts for serving and for connecting;
* ``Security``: what one daemon uses of all that, built from its command line
  (``add_security_arguments``, ``security_from_arguments``), with ``check_bind``,
  which refuses to listen beyond this machine without a secret.

The push trigger's hook imports this module on every push, so its top imports only os
and time (and ``_thread`` for a lock, which is all ``threading.Lock`` is); hmac and
hashlib are imported when a secret is in use, ssl when TLS is, ipaddress when a bind
address is checked. docs/security.md says what this protects and what it does not.
"""

import os
import time
from _thread import allocate_lock

from commit_ci.wire import ProtocolError

# For annotations alone (type checkers take the branch; ssl is imported where it is used).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

#: A message stamped further than this from the receiver's clock is refused, and
#: nonces are remembered for twice as long, so a replay is refused either way.
MAX_CLOCK_SKEW_S = 60.0
#: Shorter secrets are refused: they could be guessed offline from one tagged message.
MIN_SECRET_BYTES = 16
SECRET_ENV = "CI_SECRET"


# --- Authentication ------------------------------------------------------------------


def parse_auth_line(line: bytes) -> tuple[str, str, str] | None:
    """``auth <time> <nonce> <tag>``: the time (1 to 16 digits), the nonce (32 hex digits)
    and the tag (64 hex digits) as text, or None if the line is not exactly that."""
    parts = line.split(b" ")
    if len(parts) != 4 or parts[0] != b"auth":
        return None
    stamp, nonce, tag = parts[1:]
    # bytes.isdigit() is ASCII only; the sets hold ints, as iterating bytes gives.
    if not (1 <= len(stamp) <= 16 and stamp.isdigit()):
        return None
    if len(nonce) != 32 or len(tag) != 64 or not _HEX_BYTES.issuperset(nonce) or not _HEX_BYTES.issuperset(tag):
        return None
    return stamp.decode("ascii"), nonce.decode("ascii"), tag.decode("ascii")


_HEX_BYTES = frozenset(b"0123456789abcdef")


class Authenticator:
    """HMAC-SHA256 over every message, in both directions, with a shared secret.

    A sender puts ``auth <unix time in ms> <nonce> <tag>`` on the line before the
    message; the tag covers a label (``request`` or ``reply``), the time, the
    nonce, for a reply the nonce of its request, and every byte of the message,
    sections included. The secret itself never crosses the wire. A receiver
    refuses a missing or wrong tag, a time more than ``MAX_CLOCK_SKEW_S`` away from
    its own clock, and a request nonce it has already seen (a replay); a reply
    must name the nonce of the request it answers, so an old reply cannot be
    passed off as a new one.
    """

    def __init__(self, secret: bytes, max_skew: float = MAX_CLOCK_SKEW_S, clock=time.time):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError("the shared secret must be at least %d bytes" % MIN_SECRET_BYTES)
        self._key = secret
        self.max_skew = max_skew
        self._clock = clock
        self._lock = allocate_lock()
        #: Request nonces seen, with when each may be forgotten, oldest first.
        self._seen: dict[str, float] = {}

    def _mac(self, kind: str, stamp: str, nonce: str, request_nonce: str | None):
        # Imported here, not at the top: a hook without a secret never needs them (~6 ms).
        import hashlib
        import hmac

        prefix = "ci-auth-1|%s|%s|%s|%s|" % (kind, stamp, nonce, request_nonce or "-")
        return hmac.new(self._key, prefix.encode("ascii"), hashlib.sha256)

    def sign(self, kind: str, data: bytes, request_nonce: str | None = None) -> tuple[bytes, str]:
        stamp = str(int(self._clock() * 1000))
        nonce = os.urandom(16).hex()  # what secrets.token_hex does, without importing random
        mac = self._mac(kind, stamp, nonce, request_nonce)
        mac.update(data)
        return ("auth %s %s %s\n" % (stamp, nonce, mac.hexdigest())).encode("ascii"), nonce

    def begin(self, kind: str, line: bytes, request_nonce: str | None) -> "_Verification":
        parsed = parse_auth_line(line)
        if parsed is None:
            if kind == "reply" and line.startswith(b"ERR "):
                # The peer refused the request before it could sign anything.
                raise ProtocolError("refused: %s" % line[4:200].decode("utf-8", "replace"))
            raise ProtocolError("authentication required" if not line.startswith(b"auth ") else "malformed auth line")
        stamp, nonce, tag = parsed
        return _Verification(self, kind, stamp, nonce, tag, self._mac(kind, stamp, nonce, request_nonce))

    def _accept(self, kind: str, stamp: str, nonce: str) -> None:
        now = self._clock()
        if abs(now - int(stamp) / 1000) > self.max_skew:
            raise ProtocolError("stale or future timestamp (clocks more than %g s apart?)" % self.max_skew)
        if kind != "request":
            return
        with self._lock:
            # Forget nonces too old to pass the timestamp check anyway.
            while self._seen:
                oldest = next(iter(self._seen))
                if self._seen[oldest] > now:
                    break
                del self._seen[oldest]
            if nonce in self._seen:
                raise ProtocolError("replayed message")
            self._seen[nonce] = now + 2 * self.max_skew


class _Verification:
    """The tag of one incoming message, computed as its bytes arrive."""

    def __init__(self, auth: Authenticator, kind: str, stamp: str, nonce: str, tag: str, mac):
        self._auth, self._kind, self._stamp, self.nonce, self._tag, self._mac = auth, kind, stamp, nonce, tag, mac

    def update(self, data: bytes) -> None:
        self._mac.update(data)

    def finish(self) -> str:
        import hmac  # already loaded by the Authenticator that made this

        if not hmac.compare_digest(self._mac.hexdigest(), self._tag):
            raise ProtocolError("authentication failed")
        self._auth._accept(self._kind, self._stamp, self.nonce)
        return self.nonce


# --- The secret and TLS ----------------------------------------------------------------------


def read_secret(secret_file: str | None) -> bytes | None:
    """The shared secret: from ``secret_file`` if given, else from the environment
    variable CI_SECRET, else None; surrounding white space is dropped. ValueError if
    the file cannot be read."""
    if secret_file:
        try:
            with open(secret_file, "rb") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise ValueError("cannot read the secret file: %s" % exc) from None
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].strip().encode("utf-8")
    return None


def client_tls_context(ca_file: str):
    """An ssl.SSLContext that connects with TLS 1.2 or later, trusting certificates signed
    by ``ca_file`` and checking the host name."""
    import ssl  # here: only a TLS client pays for it (~15 ms)

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# --- TLS and the security settings of a daemon -----------------------------------------


class Security:
    """How a daemon talks: the shared secret's authenticator and TLS contexts, each
    optional. (A plain class: dataclasses would cost the push hook its import.)"""

    def __init__(self, auth: Authenticator | None = None, server_tls: "ssl.SSLContext | None" = None,
                 client_tls: "ssl.SSLContext | None" = None):
        self.auth = auth
        #: Serve with TLS (this daemon's certificate and key).
        self.server_tls = server_tls
        #: Connect with TLS, trusting the peers' certificates through this CA file.
        self.client_tls = client_tls


def server_tls_context(certificate: str, key: str) -> "ssl.SSLContext":
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
    """Read the secret and TLS files named by ``add_security_arguments``; ValueError if
    they are wrong, or (for a server) if ``args.host`` may not be listened on
    (``check_bind``)."""
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
    if serves:
        check_bind(args.host, security, args.insecure)
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
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    import ipaddress

    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
