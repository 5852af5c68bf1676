"""The server side of the protocol: ``ProtocolServer``, which both the dispatcher and
every runner serve their requests with.

An event loop answers the requests that arrive whole on a fresh connection; a pool of
threads serves the connections that have to be waited on (TLS, a request arriving
in pieces, a verb that writes files). A bad peer costs its own connection, never the
server: malformed or unauthentic input gets ``ERR <reason>``, a log line and a closed
connection. See ``ProtocolServer`` for the details and docs/protocol.md for the limits.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from typing import Callable, Iterable

from commit_ci.protocol import REPLIES, REQUESTS, Message, MessageStream, encode, error
from commit_ci.security import Key, Security
from commit_ci.wire import IO_TIMEOUT_S, ProtocolError

#: A server closes a connection on which no new request starts within this time.
IDLE_TIMEOUT_S = 15.0
#: A server thread left without a connection for this long exits.
THREAD_IDLE_S = 30.0
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
    connection (after a framing error the stream cannot be trusted). A reply is
    signed with the key its request was signed with; an exception in
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
        data, _ = stream.frame(encode(answer, REPLIES), message.nonce, signed=message.nonce is not None, key=message.key)
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
                        self._send(stream, error(str(exc)), peer, None, None)
                        return
                    except (OSError, TimeoutError) as exc:
                        self.logger.debug("connection from %s ended: %s", peer, exc)
                        return
                    if message is None:
                        return
                self._set_waiting(sock, False)
                if not self._send(stream, self._answer(message, peer), peer, message.nonce, message.key):
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

    def _send(self, stream: MessageStream, answer: Message, peer: str, request_nonce: str | None,
              key: Key | None) -> bool:
        """Send ``answer`` signed with ``key``, the key of its request (unsigned without one)."""
        try:
            stream.write_message(answer, REPLIES, request_nonce=request_nonce, signed=request_nonce is not None, key=key)
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
