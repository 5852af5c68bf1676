"""The client side of the protocol: a connection that carries requests and their
replies, and ``communicate()`` for one request.

Everything that talks to a daemon goes through here: the observer, runners (to the
dispatcher), the dispatcher (to runners), ``ci-ctl``, the launcher and the helpers.py
script API. Every wait is bounded: connecting, the start of a reply, and the reply
as a whole.
"""

from __future__ import annotations

import time

from commit_ci.protocol import REPLIES, REQUESTS, Message, MessageStream
from commit_ci.security import Security
from commit_ci.wire import CONNECT_TIMEOUT_S, IO_TIMEOUT_S, ProtocolError, connect, format_address


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
        except ProtocolError as exc:  # Refused stays Refused
            raise exc.__class__("%s: %s" % (format_address(self.address), exc)) from None
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
