"""Who may talk to whom: keys, the ``auth`` line's tag, TLS, and the security options
every daemon shares.

* ``Key``: what signs and checks messages -- the shared secret (one key for every
  role, for small set-ups), or a named key of one role (runner, observer, operator)
  that the dispatcher keeps in its keys file (keys.py); a daemon holds one, given as
  a key token (``ci-key:NAME:SECRET``, what ``ci-ctl key add`` prints) or a shared
  secret, in its secret file or the environment (never the command line);
* ``Authenticator``: HMAC-SHA256 over every message with a key, its freshness and
  replay checks (the ``auth`` line that wire.Stream puts before a message and reads
  back);
* TLS contexts for serving and for connecting;
* ``Security``: what one daemon uses of all that, built from its command line
  (``add_security_arguments``, ``security_from_arguments``), with ``check_bind``,
  which refuses to listen beyond this machine without a secret.

The push trigger's hook imports this module on every push, so its top imports only os
and time (and ``_thread`` for a lock, which is all ``threading.Lock`` is); hmac and
hashlib are imported when a secret is in use, ssl when TLS is, ipaddress when a bind
address is checked, keys.py (the dispatcher's keys file) by the dispatcher alone.
docs/security.md says what this protects and what it does not.
"""

import os
import time
from _thread import allocate_lock

from commit_ci.wire import ProtocolError, Refused, is_name

# For annotations alone (type checkers take the branch; ssl is imported where it is used).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

    from commit_ci.keys import Keyring

#: A message stamped further than this from the receiver's clock is refused, and
#: nonces are remembered for twice as long, so a replay is refused either way.
MAX_CLOCK_SKEW_S = 60.0
#: Shorter secrets are refused: they could be guessed offline from one tagged message.
MIN_SECRET_BYTES = 16
SECRET_ENV = "CI_SECRET"

#: The roles a named key may have (docs/security.md says what each may send).
RUNNER, OBSERVER, OPERATOR = "runner", "observer", "operator"
ROLES = (RUNNER, OBSERVER, OPERATOR)
#: What a key token starts with: ``ci-key:NAME:SECRET``. A secret file that does not
#: start so holds the shared secret.
KEY_TOKEN_PREFIX = "ci-key:"
#: Bytes of a named key's secret (64 hex digits in a token and in the keys file).
KEY_SECRET_BYTES = 32

# Checked with sets, not regular expressions: importing re costs the hook milliseconds.
_HEX = frozenset("0123456789abcdef")
_HEX_BYTES = frozenset(b"0123456789abcdef")


# --- Keys ----------------------------------------------------------------------------


class Key:
    """A secret that signs and checks messages.

    ``name`` None: the shared secret, which every daemon of a small set-up holds and
    which may send everything. Otherwise a named key: its name goes into the ``auth``
    line, and its ``role`` (known to the dispatcher, from its keys file) says what it
    may send. A daemon given a key token knows its key's name, not its role.
    """

    __slots__ = ("secret", "name", "role")

    def __init__(self, secret: bytes, name: str | None = None, role: str | None = None):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError("the shared secret must be at least %d bytes" % MIN_SECRET_BYTES)
        if name is not None and not is_name(name):
            raise ValueError("invalid key name %r (want 1 to 128 characters of A-Z a-z 0-9 . _ : @ -)" % name[:140])
        if role is not None and role not in ROLES:
            raise ValueError("invalid role %r (want one of %s)" % (role, ", ".join(ROLES)))
        self.secret, self.name, self.role = secret, name, role

    @property
    def shared(self) -> bool:
        return self.name is None

    @property
    def token(self) -> str:
        """What a daemon is given to hold this named key: ``ci-key:NAME:SECRET``."""
        return "%s%s:%s" % (KEY_TOKEN_PREFIX, self.name, self.secret.hex())

    def lookup(self, name: str | None) -> "Key | None":
        """This key if ``name`` is its name (None: the shared secret): a daemon that holds
        one key accepts messages signed with it alone."""
        return self if name == self.name else None

    def describe(self) -> str:
        """For log lines: never the secret."""
        return "the shared secret" if self.name is None else "key %s" % self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and (self.secret, self.name, self.role) == (other.secret, other.name, other.role)

    def __hash__(self) -> int:
        return hash((self.secret, self.name, self.role))

    def __repr__(self) -> str:
        return "Key(name=%r, role=%r)" % (self.name, self.role)


def key_from_secret(secret: bytes) -> Key:
    """The key a secret file (or CI_SECRET) holds: a key token ``ci-key:NAME:SECRET``
    (SECRET: 64 lowercase hex digits), or else the shared secret. ValueError if it is
    neither."""
    if not secret.startswith(KEY_TOKEN_PREFIX.encode("ascii")):
        return Key(secret)
    try:
        text = secret.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("a key token is ASCII text: ci-key:NAME:SECRET") from None
    name, _, digits = text[len(KEY_TOKEN_PREFIX):].rpartition(":")
    if len(digits) != 2 * KEY_SECRET_BYTES or not _HEX.issuperset(digits):
        raise ValueError("invalid key token: want ci-key:NAME:SECRET with a SECRET of %d lowercase hex digits"
                         % (2 * KEY_SECRET_BYTES))
    return Key(bytes.fromhex(digits), name)


def wrap_secret(key: Key, salt: str, secret: bytes) -> str:
    """``secret`` (at most 32 bytes) as hex, hidden from all but the holders of ``key``:
    XORed with HMAC-SHA256(key, "ci-key-wrap-1|" + salt). It is how the dispatcher sends
    a new key to the operator who asked for it; ``salt`` must never repeat. Unwrapping
    is the same operation on the bytes of the hex."""
    import hashlib
    import hmac

    pad = hmac.new(key.secret, ("ci-key-wrap-1|%s" % salt).encode("ascii"), hashlib.sha256).digest()
    if len(secret) > len(pad):
        raise ValueError("cannot wrap more than %d bytes" % len(pad))
    return bytes(a ^ b for a, b in zip(secret, pad)).hex()


def unwrap_secret(key: Key, salt: str, wrapped: str) -> bytes:
    """The secret ``wrap_secret`` hid; ValueError if ``wrapped`` is not hex."""
    return bytes.fromhex(wrap_secret(key, salt, bytes.fromhex(wrapped)))


# --- Authentication ------------------------------------------------------------------


def parse_auth_line(line: bytes) -> tuple[str, str, str, str | None] | None:
    """``auth [<key name>] <time> <nonce> <tag>``: the time (1 to 16 digits), the nonce
    (32 hex digits), the tag (64 hex digits) and the key's name (None for the shared
    secret's four fields) as text, or None if the line is not exactly that."""
    parts = line.split(b" ")
    if len(parts) not in (4, 5) or parts[0] != b"auth":
        return None
    name = None
    if len(parts) == 5:
        # Latin-1 decodes any byte; a name's characters are all ASCII, so no other gets through.
        name = parts.pop(1).decode("latin-1")
        if not is_name(name):
            return None
    stamp, nonce, tag = parts[1:]
    # bytes.isdigit() is ASCII only; the sets hold ints, as iterating bytes gives.
    if not (1 <= len(stamp) <= 16 and stamp.isdigit()):
        return None
    if len(nonce) != 32 or len(tag) != 64 or not _HEX_BYTES.issuperset(nonce) or not _HEX_BYTES.issuperset(tag):
        return None
    return stamp.decode("ascii"), nonce.decode("ascii"), tag.decode("ascii"), name


class Authenticator:
    """HMAC-SHA256 over every message, in both directions, with a key.

    A sender puts ``auth [<key name>] <unix time in ms> <nonce> <tag>`` on the line
    before the message (the name for a named key; four fields for the shared secret);
    the tag covers a label (``request`` or ``reply``), the key's name, the time, the
    nonce, for a reply the nonce of its request, and every byte of the message,
    sections included. The secret itself never crosses the wire. A receiver refuses
    an unknown key, a missing or wrong tag, a time more than ``MAX_CLOCK_SKEW_S`` away
    from its own clock, and a request nonce it has already seen (a replay); a reply
    must be signed with the key of its request and name that request's nonce, so an
    old reply cannot be passed off as a new one.

    ``keys`` is what a receiver checks requests with: a ``Key`` (or the bytes of a
    shared secret), which signs too -- a daemon holds one key and accepts messages
    signed with it alone -- or the dispatcher's ``Keyring`` (keys.py): its keys file
    and the shared secret, if any; a reply is signed with the key of its request.
    """

    def __init__(self, keys: "bytes | Key | Keyring", max_skew: float = MAX_CLOCK_SKEW_S, clock=time.time):
        if isinstance(keys, (bytes, bytearray)):
            keys = Key(bytes(keys))
        self.keys = keys
        #: What this side signs its requests with; replies to them must be signed with it too.
        self.key: Key | None = keys if isinstance(keys, Key) else keys.shared
        self.max_skew = max_skew
        self._clock = clock
        self._lock = allocate_lock()
        #: Request nonces seen, with when each may be forgotten, oldest first.
        self._seen: dict[str, float] = {}

    def _mac(self, key: Key, kind: str, stamp: str, nonce: str, request_nonce: str | None):
        # Imported here, not at the top: a hook without a secret never needs them (~6 ms).
        import hashlib
        import hmac

        if key.name is None:
            prefix = "ci-auth-1|%s|%s|%s|%s|" % (kind, stamp, nonce, request_nonce or "-")
        else:
            prefix = "ci-auth-2|%s|%s|%s|%s|%s|" % (key.name, kind, stamp, nonce, request_nonce or "-")
        return hmac.new(key.secret, prefix.encode("ascii"), hashlib.sha256)

    def sign(self, kind: str, data: bytes, request_nonce: str | None = None,
             key: Key | None = None) -> tuple[bytes, str]:
        """The ``auth`` line for ``data`` and its nonce, signed with ``key`` (a reply: its
        request's) or else this side's own key."""
        key = key or self.key
        if key is None:
            raise ValueError("no key to sign with")
        stamp = str(int(self._clock() * 1000))
        nonce = os.urandom(16).hex()  # what secrets.token_hex does, without importing random
        mac = self._mac(key, kind, stamp, nonce, request_nonce)
        mac.update(data)
        named = "" if key.name is None else key.name + " "
        return ("auth %s%s %s %s\n" % (named, stamp, nonce, mac.hexdigest())).encode("ascii"), nonce

    def begin(self, kind: str, line: bytes, request_nonce: str | None) -> "_Verification":
        parsed = parse_auth_line(line)
        if parsed is None:
            if kind == "reply" and line.startswith(b"ERR "):
                # The peer refused the request before it could sign anything.
                raise Refused("refused: %s" % line[4:200].decode("utf-8", "replace"))
            raise ProtocolError("authentication required" if not line.startswith(b"auth ") else "malformed auth line")
        stamp, nonce, tag, name = parsed
        # A reply must come signed with the key its request was signed with: this side's.
        key = self.keys.lookup(name) if kind == "request" else self.key and self.key.lookup(name)
        if key is None:
            if name is None:
                raise ProtocolError("the shared secret is not accepted here: sign with a key")
            raise ProtocolError("unknown key %s (never added, or revoked)" % name)
        return _Verification(self, kind, key, stamp, nonce, tag, self._mac(key, kind, stamp, nonce, request_nonce))

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
    """The tag of one incoming message, computed as its bytes arrive; ``key`` is the key
    it claims to be signed with, to be believed once ``finish()`` has returned."""

    def __init__(self, auth: Authenticator, kind: str, key: Key, stamp: str, nonce: str, tag: str, mac):
        self._auth, self._kind, self.key, self._stamp, self.nonce, self._tag, self._mac = (
            auth, kind, key, stamp, nonce, tag, mac)

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
    """The secret a daemon holds (a shared secret or a key token): from ``secret_file``
    if given, else from the environment variable CI_SECRET, else None; surrounding
    white space is dropped. ValueError if the file cannot be read."""
    if secret_file:
        try:
            with open(secret_file, "rb") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise ValueError("cannot read the secret file: %s" % exc) from None
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].strip().encode("utf-8")
    return None


def read_key(secret_file: str | None) -> Key | None:
    """The key a daemon holds (``read_secret``, then ``key_from_secret``), or None;
    ValueError if the file cannot be read or holds neither a key nor a shared secret."""
    secret = read_secret(secret_file)
    return None if secret is None else key_from_secret(secret)


def client_tls_context(ca_file: str):
    """An ssl.SSLContext that connects with TLS 1.2 or later, trusting certificates signed
    by ``ca_file`` and checking the host name."""
    import ssl  # here: only a TLS client pays for it (~15 ms)

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# --- TLS and the security settings of a daemon -----------------------------------------


class Security:
    """How a daemon talks: its authenticator and TLS contexts, each optional, and
    the dispatcher's keyring. (A plain class: dataclasses would cost the push hook
    its import.)"""

    def __init__(self, auth: Authenticator | None = None, server_tls: "ssl.SSLContext | None" = None,
                 client_tls: "ssl.SSLContext | None" = None, keyring: "Keyring | None" = None):
        self.auth = auth
        #: Serve with TLS (this daemon's certificate and key).
        self.server_tls = server_tls
        #: Connect with TLS, trusting the peers' certificates through this CA file.
        self.client_tls = client_tls
        #: The dispatcher's keys (its keys file), which ``auth`` checks requests with.
        self.keyring = keyring

    @property
    def key_name(self) -> str | None:
        """The name of the key this daemon holds; None for the shared secret or none."""
        key = self.auth.key if self.auth is not None else None
        return None if key is None else key.name

    def signing_with(self, key: Key | None) -> "Security":
        """The same settings, signing requests with ``key`` (and trusting replies signed
        with it alone): how the dispatcher talks to a runner, with that runner's key."""
        if self.auth is None or key is None or key is self.auth.key:
            return self
        return Security(Authenticator(key, self.auth.max_skew, self.auth._clock), client_tls=self.client_tls)


def server_tls_context(certificate: str, key: str) -> "ssl.SSLContext":
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    return context


def add_security_arguments(parser, serves: bool, keys: bool = False) -> None:
    """The options every daemon shares for the secret, TLS and (for servers) binding;
    ``keys``: the dispatcher's keys file too."""
    group = parser.add_argument_group("security")
    if keys:
        group.add_argument("--secret-file", metavar="FILE",
                           help="file holding the shared secret (at least %d bytes) that every daemon may use, "
                           "for any role; or set it in the environment variable %s. Never on the command line, "
                           "where ps shows it" % (MIN_SECRET_BYTES, SECRET_ENV))
        group.add_argument("--keys-file", metavar="FILE",
                           help="file of named keys, one per runner, observer or operator (made if missing, "
                           "mode 0600; ci-ctl key add/revoke/list manage it, and hand edits are read within a "
                           "second)")
    else:
        group.add_argument("--secret-file", metavar="FILE",
                           help="file holding this daemon's key (as `ci-ctl key add` prints it) or the shared "
                           "secret (at least %d bytes) that authenticates every message; or set it in the "
                           "environment variable %s. Never on the command line, where ps shows it"
                           % (MIN_SECRET_BYTES, SECRET_ENV))
    group.add_argument("--tls-ca", metavar="FILE",
                       help="connect to peers with TLS, trusting certificates signed by this CA file")
    if serves:
        group.add_argument("--tls-cert", metavar="FILE", help="serve with TLS: this daemon's certificate (PEM)")
        group.add_argument("--tls-key", metavar="FILE", help="serve with TLS: the certificate's private key (PEM)")
        group.add_argument("--insecure", action="store_true",
                           help="allow listening on a non-loopback address without a shared secret")


def security_from_arguments(args, serves: bool, keys: bool = False) -> Security:
    """Read the secret (or key), the keys file (``keys``: the dispatcher's) and the TLS
    files named by ``add_security_arguments``; ValueError if they are wrong, or (for a
    server) if ``args.host`` may not be listened on (``check_bind``)."""
    key = read_key(args.secret_file)
    security = Security()
    if keys:
        if key is not None and not key.shared:
            raise ValueError("the dispatcher's --secret-file (or %s) holds a key of its own (%s): the dispatcher "
                             "takes the shared secret there, and the keys it accepts in --keys-file"
                             % (SECRET_ENV, key.name))
        if args.keys_file:
            from commit_ci.keys import Keyring  # the dispatcher's alone: files, logging

            security.keyring = Keyring(args.keys_file, shared=key)
            security.keyring.load()
    if security.keyring is not None:
        security.auth = Authenticator(security.keyring)
    elif key is not None:
        security.auth = Authenticator(key)
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


def runner_name(security: Security, name: str | None) -> str | None:
    """The name a runner registers under: its key's, when it holds a named key (the
    dispatcher takes a runner key's results, and its registration, under that name
    alone), else ``name``. ValueError if ``name`` is another."""
    key_name = security.key_name
    if key_name is None:
        return name
    if name is not None and name != key_name:
        raise ValueError("--name %s differs from the name of this runner's key, %s: a runner registers under its "
                         "key's name; leave --name out, or give the key's name" % (name, key_name))
    return key_name


def check_bind(host: str, security: Security, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a secret (or keys), unless told to."""
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
