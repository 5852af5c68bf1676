"""A runner's link to its dispatcher: registering, delivering results, giving up.

The runner registers when it starts, and again whenever the dispatcher's pings stop
coming (it restarted, or dropped this runner): the runner's request handler tells the
link of every ping. Results go out from the outbox (outbox.py), oldest first, before
each registration (so that a job they settle is not handed out again) and whenever a
job ends; what cannot be delivered stays there and is tried again every few seconds.
After ``dispatcher_timeout`` seconds without reaching the dispatcher, an idle runner
exits, to free its machine.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from commit_ci.client import communicate
from commit_ci.outbox import Outbox
from commit_ci.protocol import UNKNOWN_ATTEMPT, request
from commit_ci.result import Result
from commit_ci.security import Security
from commit_ci.wire import ProtocolError, Refused, format_address

log = logging.getLogger("runner")

#: Pause between attempts to register while the dispatcher is unreachable.
REGISTER_RETRY_S = 1.0
#: No ping for this many of the dispatcher's heartbeat intervals: it restarted or
#: dropped this runner (it drops after 3 missed pings), so register again.
CONTACT_HEARTBEATS = 3
#: Pause between delivery rounds of results kept on disk.
DELIVERY_RETRY_S = 2.0
#: Wait for the dispatcher's answer to ``results`` (it writes files before answering).
RESULTS_TIMEOUT_S = 30.0
#: The runner's exit status when it gave up on an unreachable dispatcher.
EXIT_DISPATCHER_GONE = 3


class DispatcherLink:
    """Registration and delivery for one runner; see the module docstring.

    ``host``, ``port`` and ``name`` are what the runner registers as, ``pythons`` the
    interpreter versions it offers; ``current_job()``
    says which job it holds, as (commit, attempt) or None, so that a registration names
    it; ``stop`` is the runner's, set here too when the link gives up (``exit_code``).
    """

    def __init__(self, dispatcher: tuple[str, int], security: Security, outbox: Outbox, host: str, port: int,
                 name: str, current_job: Callable[[], tuple[str, int] | None], stop: threading.Event,
                 dispatcher_timeout: float, pythons: tuple[str, ...] = ()):
        self.dispatcher = dispatcher
        self.security = security
        self.outbox = outbox
        self.host, self.port, self.name = host, port, name
        self.pythons = pythons
        self.current_job = current_job
        self.stop = stop
        self.dispatcher_timeout = dispatcher_timeout
        self.exit_code = 0
        self._lock = threading.Lock()
        self._last_contact = time.monotonic()
        self._contact_timeout = CONTACT_HEARTBEATS * 1.0
        self._delivery_wake = threading.Event()
        self._delivery_lock = threading.Lock()  # one delivery round at a time
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for name, target in (("contact", self._contact_loop), ("delivery", self._delivery_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self) -> None:
        """Wake the loops so that they see the runner's stop event."""
        self._delivery_wake.set()

    def heard_from_dispatcher(self) -> None:
        """The dispatcher has just talked to this runner (a ping, an offered job)."""
        with self._lock:
            self._last_contact = time.monotonic()

    def wake_delivery(self) -> None:
        """Try to deliver the kept results now rather than at the next round."""
        self._delivery_wake.set()

    # --- results -------------------------------------------------------------------

    def deliver(self, result: Result) -> bool:
        """Send one result. True when the dispatcher has it (or will never want it)."""
        try:
            answer = communicate(self.dispatcher, result.to_message(), timeout=RESULTS_TIMEOUT_S, security=self.security)
        except (OSError, ProtocolError) as exc:
            log.info("commit %s attempt %d: could not deliver result: %s", result.commit, result.attempt, exc)
            return False
        if answer.verb == "OK":
            log.info("commit %s attempt %d: result delivered", result.commit, result.attempt)
            return True
        reason = answer.get("reason")
        if reason == UNKNOWN_ATTEMPT:
            # The dispatcher never gave out this attempt (its database was replaced):
            # the result can never be recorded, so keeping it would only retry forever.
            log.error("commit %s attempt %d: dispatcher refused the result: %s; discarded",
                      result.commit, result.attempt, reason)
            return True
        # Anything else (it could not write the result, had too many connections...)
        # may pass: the result is kept and sent again.
        log.warning("commit %s attempt %d: dispatcher could not take the result: %s",
                    result.commit, result.attempt, reason)
        return False

    def deliver_kept(self) -> bool:
        """Deliver every kept result, oldest first. False if the dispatcher is unreachable."""
        with self._delivery_lock:
            for path, result in self.outbox.results():
                if not self.deliver(result):
                    return False
                self.outbox.remove(path)
        return True

    def _delivery_loop(self) -> None:
        while not self.stop.is_set():
            self._delivery_wake.wait(DELIVERY_RETRY_S)
            self._delivery_wake.clear()
            if self.outbox.oldest() is not None:
                self.deliver_kept()

    # --- registration ----------------------------------------------------------------

    def _register(self) -> bool:
        job = self.current_job()
        message = request("register", host=self.host, port=self.port, name=self.name,
                          commit=job[0] if job else None, attempt=job[1] if job else None,
                          pythons=self.pythons or None)
        try:
            answer = communicate(self.dispatcher, message, security=self.security)
        except Refused as exc:  # it heard us, but not our key (revoked?) or our clock
            log.error("dispatcher refused registration: %s", str(exc).partition("refused: ")[2])
            return False
        except (OSError, ProtocolError) as exc:
            log.debug("register with %s failed: %s", format_address(self.dispatcher), exc)
            return False
        if answer.verb != "OK":
            log.error("dispatcher refused registration: %s", answer.get("reason"))
            return False
        heartbeat = answer.get("heartbeat") or 1.0
        with self._lock:
            self._contact_timeout = max(CONTACT_HEARTBEATS * heartbeat, 2.0)
            self._last_contact = time.monotonic()
        log.info("registered with dispatcher %s as %s", format_address(self.dispatcher), self.name)
        return True

    def _contact_loop(self) -> None:
        registered = False
        unreachable_since: float | None = None
        while not self.stop.is_set():
            with self._lock:
                silent_for = time.monotonic() - self._last_contact
                contact_timeout = self._contact_timeout
            if not registered or silent_for > contact_timeout:
                if registered:
                    log.warning("no ping from the dispatcher for %.1f s: registering again", silent_for)
                # Results kept from before go first: a job settled by them is not handed
                # out again, to this runner or another, once the runner is registered.
                registered = self.deliver_kept() and self._register()
                if registered:
                    unreachable_since = None
                else:
                    now = time.monotonic()
                    if unreachable_since is None:
                        unreachable_since = now
                        log.warning("dispatcher %s unreachable; retrying", format_address(self.dispatcher))
                    gone_for = now - unreachable_since
                    if self.dispatcher_timeout and gone_for > self.dispatcher_timeout and self.current_job() is None:
                        log.error("dispatcher unreachable for %.0f s: exiting", gone_for)
                        self.exit_code = EXIT_DISPATCHER_GONE
                        self.stop.set()
                        return
            self.stop.wait(REGISTER_RETRY_S)
