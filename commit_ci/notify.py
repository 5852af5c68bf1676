"""Sending notifications: a command, webhooks, mail, commit statuses, from the store's outbox.

What is told and when is notices.py's: the store adds the notifications, one row per
channel, in the transaction that records a verdict (store.JobStore._notice). Here each
configured channel has a thread of its own that sends its rows, oldest first, and
marks each delivered; so a channel that fails never holds up another, nor makes it
send again. A try that fails is kept with the error and its count, logged, and tried
again after an exponential backoff (``BACKOFF_FIRST_S``, doubled each time, at most
``--notify-retry-cap``) -- for as long as it takes: nothing is dropped, but the rows of a
channel that is no longer configured when the dispatcher starts (logged). After a
start, what waits is tried at once.

Delivery is at least once. A dispatcher killed at any moment loses nothing (the rows
are on disk before the verdict's ``OK``), and one killed after a send and before its
row is marked delivered -- a window of one small SQLite transaction -- sends it again
after the restart: with the same delivery id, which every channel carries
(``X-Commit-CI-Delivery``, the document's ``delivery``, the mail's Message-ID, the
command's ``COMMIT_CI_DELIVERY``), so that a receiver can drop the repeat.

The channels:

* ``--notify-command CMD``: run by the shell, with the JSON document on its stdin;
  exit status 0 is delivered; killed after ``--notify-timeout``.
* ``--webhook URL`` (repeatable): a JSON POST, signed: ``X-Commit-CI-Signature:
  sha256=<hex>``, the HMAC-SHA256 of the body with the secret of
  ``--webhook-secret-file``; any 2xx is delivered, a redirect is not followed.
* mail (``--smtp-host``, ``--mail-to``...): one message to every recipient.
* commit status (``--status-url TEMPLATE``): each judged commit's state, and pending when
  its run starts, in the body of the Gitea, GitHub or GitLab API.

The threads wait on a condition the dispatcher wakes when it adds rows (``wake``),
with bounded waits (a safety net, and the next try of a row in backoff), and stop
on an event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Callable

from commit_ci.processes import run_step
from commit_ci.security import MIN_SECRET_BYTES, SECRET_ENV, client_tls_context, read_secret

if TYPE_CHECKING:
    from commit_ci.commit_metadata import CommitMetadata
    from commit_ci.store import JobStore, Notification

log = logging.getLogger("dispatcher.notify")

#: The first retry of a failed try comes after this long, each next one after twice as long...
BACKOFF_FIRST_S = 1.0
#: ... up to this (``--notify-retry-cap``).
DEFAULT_BACKOFF_CAP_S = 300.0
#: How long a command may run, a webhook or status request or a mail take (``--notify-timeout``).
DEFAULT_TIMEOUT_S = 30.0
#: A channel's thread looks at its rows at least this often even without a wake-up.
RECHECK_S = 5.0
#: After an error of the store itself (a full disk), a channel's thread waits this long.
STORE_RETRY_S = 1.0
#: Most bytes of an answer read (a receiver's answer is only looked at for its status).
ANSWER_BYTES = 64 * 1024
#: An error kept and logged is cut to this length.
ERROR_CHARS = 300
#: The header names of a webhook and a status request.
SIGNATURE_HEADER = "X-Commit-CI-Signature"
DELIVERY_HEADER = "X-Commit-CI-Delivery"
EVENT_HEADER = "X-Commit-CI-Event"
USER_AGENT = "commit-ci-notify/1"
#: The commit status APIs whose body we speak, and how each names a verdict.
STATUS_STYLES = ("gitea", "github", "gitlab")
_STATUS_STATES = {
    "gitea": {"pending": "pending", "passed": "success", "flaky": "success", "failed": "failure", "error": "error",
              "cancelled": "error"},
    "gitlab": {"pending": "running", "passed": "success", "flaky": "success", "failed": "failed", "error": "failed",
               "cancelled": "canceled"},
}
_STATUS_STATES["github"] = _STATUS_STATES["gitea"]
#: Characters never put in a mail header (a commit's subject is anyone's text).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class DeliveryError(Exception):
    """A try that did not deliver: why, in a line."""


class Channel:
    """Where notifications go. ``name`` is stable across restarts (the store keys rows by
    it) and holds no secret; ``status``: it takes commit statuses, not branch changes."""

    name = ""
    status = False

    def describe(self) -> str:
        return self.name

    def send(self, document: dict, delivery: str) -> None:
        """Deliver ``document`` or raise DeliveryError (or OSError)."""
        raise NotImplementedError


class CommandChannel(Channel):
    name = "command"

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout

    def describe(self) -> str:
        return "command %r" % self.command[:80]

    def send(self, document: dict, delivery: str) -> None:
        # The dispatcher's own secret, if it came from the environment, is not the command's.
        env = {name: value for name, value in os.environ.items() if name != SECRET_ENV}
        env.update(COMMIT_CI_DELIVERY=delivery, COMMIT_CI_EVENT=document.get("event", ""))
        ended = run_step(self.command, timeout=self.timeout, env=env, stdin_data=_body(document))
        if ended.killed:
            raise DeliveryError("the command ran over %.0f s: killed" % self.timeout)
        if not ended.succeeded:
            raise DeliveryError("the command exited with %d: %s" % (ended.status, ended.last_line()))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer that did not deliver (urllib would turn a POST into a GET)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def tls_context(ca_file: str | None):
    """What https and SMTP over TLS trust: the CAs of ``ca_file`` (``--notify-ca-file``),
    else the system's; the host name checked either way."""
    import ssl  # noqa: PLC0415 - only a dispatcher that notifies over TLS pays for it

    return client_tls_context(ca_file) if ca_file else ssl.create_default_context()


def _opener(ca_file: str | None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoRedirects, urllib.request.HTTPSHandler(context=tls_context(ca_file)))


def _post(opener: urllib.request.OpenerDirector, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST ``body`` to ``url``; its status if 2xx, else DeliveryError (OSError when unreachable)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers})
    try:
        with opener.open(request, timeout=timeout) as answer:
            answer.read(ANSWER_BYTES)
            status = answer.status
    except urllib.error.HTTPError as exc:
        with exc:
            raise DeliveryError("HTTP %d %s" % (exc.code, _line(exc.reason))) from None
    except urllib.error.URLError as exc:
        raise DeliveryError("cannot reach %s: %s" % (_where(url), _line(exc.reason))) from None
    if not 200 <= status < 300:
        raise DeliveryError("HTTP %d" % status)
    return status


def _where(url: str) -> str:
    """Scheme, host and port of ``url``: what a log line may show (a path may hold a token)."""
    parts = urllib.parse.urlsplit(url)
    return "%s://%s" % (parts.scheme, parts.hostname + (":%d" % parts.port if parts.port else ""))


def _check_url(url: str, option: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("%s must be an http:// or https:// URL, not %r" % (option, url[:100]))
    if parts.username or parts.password:
        raise ValueError("%s: no user or password in the URL (the secret or token comes from a file)" % option)


class WebhookChannel(Channel):
    def __init__(self, url: str, secret: bytes, timeout: float, ca_file: str | None = None):
        _check_url(url, "--webhook")
        self.url, self.secret, self.timeout = url, secret, timeout
        self.opener = _opener(ca_file)
        # Stable for the same URL, and no part of it (a path may be a token) in the database or the log.
        self.name = "webhook " + hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        return "webhook to %s (%s)" % (_where(self.url), self.name.split()[1])

    def send(self, document: dict, delivery: str) -> None:
        body = _body(document)
        _post(self.opener, self.url, body, {SIGNATURE_HEADER: "sha256=" + sign(self.secret, body), DELIVERY_HEADER: delivery,
                               EVENT_HEADER: document.get("event", "")}, self.timeout)


def sign(secret: bytes, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``body`` with ``secret``: what SIGNATURE_HEADER carries after ``sha256=``."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


class MailChannel(Channel):
    name = "mail"

    def __init__(self, host: str, port: int, tls: str, user: str | None, password: str | None, sender: str,
                 recipients: list[str], timeout: float, ca_file: str | None = None):
        self.host, self.port, self.tls, self.user, self.password = host, port, tls, user, password
        self.sender, self.recipients, self.timeout, self.ca_file = sender, recipients, timeout, ca_file

    def describe(self) -> str:
        return "mail to %s through %s:%d (%s)" % (", ".join(self.recipients), self.host, self.port, self.tls)

    def send(self, document: dict, delivery: str) -> None:
        import smtplib  # noqa: PLC0415 - only a dispatcher that sends mail needs it

        message = mail_message(document, delivery, self.sender, self.recipients)
        try:
            if self.tls == "ssl":
                connection = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout,
                                              context=tls_context(self.ca_file))
            else:
                connection = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            try:
                if self.tls == "starttls":
                    connection.starttls(context=tls_context(self.ca_file))
                if self.user:
                    connection.login(self.user, self.password or "")
                refused = connection.send_message(message)
                connection.quit()
            finally:
                # Not a QUIT after a failure: after a failed TLS handshake, it would wait
                # the whole timeout for an answer that never comes.
                connection.close()
        except smtplib.SMTPException as exc:
            raise DeliveryError("SMTP: %s" % _line(exc)) from None
        if refused:
            # Some took it: a retry would send it to them again. Logged, not retried.
            log.warning("notification %s: mail refused for %s", delivery, ", ".join(sorted(refused)))


def mail_message(document: dict, delivery: str, sender: str, recipients: list[str]):
    """The mail of ``document``: a line of a subject, the facts, the links, the JSON."""
    from email.message import EmailMessage  # noqa: PLC0415
    from email.utils import formatdate  # noqa: PLC0415

    commit = document.get("commit") or {}
    sha = str(commit.get("id") or "")[:12]
    title = commit.get("subject") or ""
    if document.get("event") == "branch":
        subject = "[commit-ci] %s is %s (was %s) at %s" % (document["branch"], document["new_state"],
                                                          document["old_state"], sha)
    else:
        subject = "[commit-ci] %s: %s" % (sha, document.get("state"))
    subject = _CONTROL.sub(" ", "%s %s" % (subject, title)).strip()[:250]
    lines = [subject, ""]
    for label, value in (("branch", document.get("branch")), ("commit", commit.get("id")), ("subject", title),
                         ("author", commit.get("author")), ("verdict", commit.get("status")),
                         ("first failing", document.get("first_failing")), ("reason", commit.get("reason"))):
        if value:
            lines.append("%-14s %s" % (label + ":", _CONTROL.sub(" ", str(value))))
    for label, key in (("failing tests", "failing_tests"), ("flaky tests", "flaky_tests")):
        if document.get(key):
            lines.append("%s (%d):" % (label, document.get(key + "_total", len(document[key]))))
            lines += ["  " + _CONTROL.sub(" ", test) for test in document[key]]
    for label, link in (document.get("links") or {}).items():
        lines.append("%-14s %s" % (label + ":", link))
    lines += ["", "delivery: %s" % delivery, "", json.dumps(document, indent=2)]
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(localtime=False)
    # The same on a repeat (a restart between a send and its mark): mail readers drop it.
    message["Message-ID"] = "<%s@commit-ci>" % delivery
    message[DELIVERY_HEADER] = delivery
    message.set_content("\n".join(lines) + "\n")
    return message


class StatusChannel(Channel):
    name = "status"
    status = True

    def __init__(self, template: str, token: str, style: str, context: str, timeout: float, ca_file: str | None = None):
        if "{sha}" not in template:
            raise ValueError("--status-url must hold {sha}, where the commit id goes")
        _check_url(template.replace("{sha}", "0" * 40), "--status-url")
        self.template, self.token, self.style, self.context, self.timeout = template, token, style, context, timeout
        self.opener = _opener(ca_file)

    def describe(self) -> str:
        return "commit status to %s (%s)" % (_where(self.template.replace("{sha}", "0")), self.style)

    def send(self, document: dict, delivery: str) -> None:
        commit = document["commit"]["id"]
        state = document["state"]
        link = (document.get("links") or {}).get("report")
        description = _status_description(document)
        if self.style == "gitlab":
            body = {"state": _STATUS_STATES["gitlab"][state], "name": self.context, "description": description}
            headers = {"PRIVATE-TOKEN": self.token}
        else:
            body = {"state": _STATUS_STATES[self.style][state], "context": self.context, "description": description}
            scheme = "Bearer" if self.style == "github" else "token"
            headers = {"Authorization": "%s %s" % (scheme, self.token)}
            if self.style == "github":
                headers["Accept"] = "application/vnd.github+json"
        if link and link.startswith(("http://", "https://")):
            body["target_url"] = link
        headers[DELIVERY_HEADER] = delivery
        _post(self.opener, self.template.replace("{sha}", urllib.parse.quote(commit)), json.dumps(body).encode("utf-8"), headers,
              self.timeout)


def _status_description(document: dict) -> str:
    commit = document.get("commit") or {}
    state = document.get("state")
    if state == "pending":
        return "being tested"
    counts = ", ".join("%s %s" % (commit[name], name) for name in ("passed", "failed", "errors", "skipped")
                       if commit.get(name))
    return ("%s%s" % (state, ": " + counts if counts else ""))[:140]


def _body(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True).encode("utf-8")


def _line(text: object) -> str:
    return _CONTROL.sub(" ", str(text))[:ERROR_CHARS]


def backoff(tries: int, cap: float) -> float:
    """Seconds before the next try after ``tries`` failed ones."""
    return min(cap, BACKOFF_FIRST_S * 2 ** min(tries - 1, 30))


class Notifier:
    """The channels' threads (see the module docstring). ``wake`` after adding rows."""

    def __init__(self, store: JobStore, channels: list[Channel], results_dir: str, results_url: str | None = None,
                 metadata: CommitMetadata | None = None, backoff_cap: float = DEFAULT_BACKOFF_CAP_S,
                 clock: Callable[[], float] = time.time):
        self.store, self.channels, self.results_dir = store, channels, results_dir
        self.results_url = results_url.rstrip("/") + "/" if results_url else None
        self.metadata, self.backoff_cap, self.clock = metadata, backoff_cap, clock
        self._metadata_lock = threading.Lock()  # CommitMetadata is not thread-safe
        self._cond = threading.Condition()
        self._generation = 0  # raised by every wake: a thread never sleeps through one
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        keep = [channel.name for channel in self.channels]
        for channel, count in self.store.drop_notifications(keep, self.clock()).items():
            log.warning("%d notification(s) for %s, which is not configured any more: given up", count, channel)
        for channel in self.channels:
            log.info("notifications: %s", channel.describe())
            thread = threading.Thread(target=self._loop, args=(channel,), name="notify-%s" % channel.name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)  # one in the middle of a send ends with it (bounded by its timeout)
        if self.metadata is not None:
            with self._metadata_lock:
                self.metadata.close()

    def _wait(self, seen: int, timeout: float) -> None:
        with self._cond:
            if self._generation == seen and not self._stop.is_set():
                self._cond.wait(max(0.0, timeout))

    def _loop(self, channel: Channel) -> None:
        started = True  # after a start, what waits is tried at once, backoff or not
        while not self._stop.is_set():
            with self._cond:
                seen = self._generation
            try:
                row = self.store.next_notification(channel.name)
            except sqlite3.Error as exc:
                log.error("notifications of %s: cannot read the store: %s", channel.name, exc)
                self._stop.wait(STORE_RETRY_S)
                continue
            if row is None:
                started = False
                self._wait(seen, RECHECK_S)
                continue
            delay = row.next_at - self.clock()
            if delay > 0 and not started:
                self._wait(seen, min(delay, RECHECK_S))
                continue
            started = False
            try:
                self._send(channel, row)
            except Exception:  # noqa: BLE001 - a bug in one channel must not end its thread for good
                log.exception("notification %s to %s: unexpected error; tried again in %g s", row.delivery,
                              channel.name, STORE_RETRY_S)
                self._stop.wait(STORE_RETRY_S)

    def _send(self, channel: Channel, row: Notification) -> None:
        document = self.complete(row)
        what = _what(document)
        try:
            channel.send(document, row.delivery)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the try failed: kept for the next
            if not isinstance(exc, (DeliveryError, OSError)):
                log.exception("notification %s (%s) to %s: unexpected error", row.delivery, what, channel.name)
            error = _line(exc) or exc.__class__.__name__
            try:
                tries = self.store.notification_failed(row.id, error, self.clock() + backoff(row.attempts + 1,
                                                                                            self.backoff_cap))
            except sqlite3.Error as store_error:
                log.error("notification %s (%s) to %s: try failed (%s), and not recorded: %s", row.delivery, what,
                          channel.name, error, store_error)
                self._stop.wait(STORE_RETRY_S)
                return
            log.warning("notification %s (%s) to %s: try %d failed: %s; next in %.0f s", row.delivery, what,
                        channel.describe(), tries, error, backoff(tries, self.backoff_cap))
            return
        try:
            self.store.notification_delivered(row.id, self.clock())
        except sqlite3.Error as exc:
            # Sent, not marked: it is sent again, with the same delivery id (the module docstring).
            log.error("notification %s (%s) to %s: delivered, but not recorded (%s): it will be sent again",
                      row.delivery, what, channel.name, exc)
            self._stop.wait(STORE_RETRY_S)
            return
        log.info("notification %s (%s) to %s: delivered (try %d)", row.delivery, what, channel.describe(),
                 row.attempts + 1)

    def complete(self, row: Notification) -> dict:
        """The document as sent: the store's, with its delivery id, the links to the
        commit's result files and, with a clone (``--repo``), its subject and author."""
        document = dict(row.document, delivery=row.delivery)
        commit = dict(document.get("commit") or {})
        sha = str(commit.get("id") or "")
        if self.metadata is not None and sha:
            with self._metadata_lock:
                info = self.metadata.lookup([sha]).get(sha)
            if info is not None:
                commit.update(subject=info.subject, author=info.author)
        document["commit"] = commit
        if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
            base = self.results_url or os.path.join(self.results_dir, "")
            document["links"] = {"report": base + sha, "json": base + sha + ".json", "log": base + sha + ".log"}
        return document


def _what(document: dict) -> str:
    """A notification for a log line: its commit, and what it tells."""
    sha = str((document.get("commit") or {}).get("id"))
    if document.get("event") == "branch":
        return "commit %s: branch %s %s -> %s" % (sha, document.get("branch"), document.get("old_state"),
                                                  document.get("new_state"))
    return "commit %s: status %s" % (sha, document.get("state"))


# --- command line ----------------------------------------------------------------------


def add_arguments(parser) -> None:
    group = parser.add_argument_group("notifications", "tell people when a branch's state changes (README, Notifications)")
    group.add_argument("--notify-command", metavar="CMD",
                       help="run CMD (with the shell) for each change, the JSON document on its stdin; exit 0 = delivered")
    group.add_argument("--webhook", metavar="URL", action="append", default=[],
                       help="POST the JSON document of each change to URL (http or https; repeatable), signed "
                       "with %s: sha256=HMAC-SHA256(body)" % SIGNATURE_HEADER)
    group.add_argument("--webhook-secret-file", metavar="FILE", help="the secret webhooks are signed with (needed by --webhook)")
    group.add_argument("--smtp-host", metavar="HOST", help="send each change by mail through this SMTP server")
    group.add_argument("--smtp-port", type=int, metavar="PORT",
                       help="its port (default: 465 with --smtp-tls ssl, 587 with starttls, 25 with off)")
    group.add_argument("--smtp-tls", choices=("starttls", "ssl", "off"), default="starttls",
                       help="how the SMTP connection is encrypted (default: %(default)s)")
    group.add_argument("--smtp-user", metavar="USER", help="log in to the SMTP server as USER")
    group.add_argument("--smtp-password-file", metavar="FILE", help="the SMTP password (with --smtp-user)")
    group.add_argument("--mail-from", metavar="ADDRESS", help="the sender (default: commit-ci@<this host>)")
    group.add_argument("--mail-to", metavar="ADDRESS", action="append", default=[], help="a recipient (repeatable)")
    group.add_argument("--status-url", metavar="TEMPLATE",
                       help="post each commit's status to this URL, {sha} replaced by the commit id "
                       "(https://gitea.example/api/v1/repos/OWNER/REPO/statuses/{sha})")
    group.add_argument("--status-token-file", metavar="FILE", help="the API token for --status-url")
    group.add_argument("--status-style", choices=STATUS_STYLES, default="gitea",
                       help="the API whose body --status-url takes (default: %(default)s)")
    group.add_argument("--status-context", default="commit-ci", help="the status's name (default: %(default)s)")
    group.add_argument("--results-url", metavar="URL",
                       help="where the results folder is served: links in notifications point there "
                       "(default: the files' paths)")
    group.add_argument("--notify-ca-file", metavar="FILE",
                       help="CA certificates that https webhooks, statuses and SMTP over TLS trust (default: the system's)")
    group.add_argument("--notify-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help="longest a command, a request or a mail may take (default: %(default)s)")
    group.add_argument("--notify-retry-cap", type=float, default=DEFAULT_BACKOFF_CAP_S, metavar="SECONDS",
                       help="longest wait between tries of a notification that failed (default: %(default)s)")


def _read_file_secret(path: str | None, option: str, needed_by: str) -> bytes:
    if not path:
        raise ValueError("%s needs %s" % (needed_by, option))
    secret = read_secret(path)
    if not secret:
        raise ValueError("%s %s is empty" % (option, path))
    return secret


def channels_from_arguments(args) -> list[Channel]:
    """The channels the options configure; ValueError for a set-up that cannot work."""
    if args.notify_timeout <= 0 or args.notify_retry_cap < BACKOFF_FIRST_S:
        raise ValueError("--notify-timeout must be positive and --notify-retry-cap at least %g" % BACKOFF_FIRST_S)
    channels: list[Channel] = []
    if args.notify_ca_file and not os.path.isfile(args.notify_ca_file):
        raise ValueError("--notify-ca-file %s: no such file" % args.notify_ca_file)
    if args.notify_command:
        channels.append(CommandChannel(args.notify_command, args.notify_timeout))
    if args.webhook:
        secret = _read_file_secret(args.webhook_secret_file, "--webhook-secret-file", "--webhook")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError("the webhook secret must be at least %d bytes" % MIN_SECRET_BYTES)
        for url in dict.fromkeys(args.webhook):
            channels.append(WebhookChannel(url, secret, args.notify_timeout, args.notify_ca_file))
    if args.smtp_host or args.mail_to:
        if not (args.smtp_host and args.mail_to):
            raise ValueError("mail needs both --smtp-host and --mail-to")
        password = None
        if args.smtp_user:
            password = _read_file_secret(args.smtp_password_file, "--smtp-password-file", "--smtp-user").decode("utf-8")
        port = args.smtp_port or {"ssl": 465, "starttls": 587, "off": 25}[args.smtp_tls]
        sender = args.mail_from or "commit-ci@%s" % socket.getfqdn()
        channels.append(MailChannel(args.smtp_host, port, args.smtp_tls, args.smtp_user, password, sender,
                                    list(dict.fromkeys(args.mail_to)), args.notify_timeout, args.notify_ca_file))
    if args.status_url:
        token = _read_file_secret(args.status_token_file, "--status-token-file", "--status-url").decode("utf-8")
        channels.append(StatusChannel(args.status_url, token, args.status_style, args.status_context, args.notify_timeout,
                                      args.notify_ca_file))
    if args.results_url:
        _check_url(args.results_url, "--results-url")
    return channels
