"""The protocol's messages: the verb table, and the codec between bytes and messages.

This module, with wire.py below it, is the only place where bytes become messages
and messages become bytes. A message is one header line -- a verb, its positional
fields, then ``key=value`` options -- optionally followed by binary sections whose
byte lengths the header declares (``log=1234``). Every verb is described once, in
``REQUESTS`` and ``REPLIES``; ``decode_header`` checks a header against that table
and turns each field into a typed value, or raises ``ProtocolError``, which the
server turns into an ``ERR <reason>`` reply and a log line. docs/protocol.md is the
human description of the same table; keep the two in step.

Below it, wire.py holds header lines and their size cap, reading under deadlines,
commit ids and addresses (the push trigger's hook uses that layer alone, because it
is cheap to import); beside it, security.py signs and checks messages. The client
(client.py) and the server (server.py) are built on ``MessageStream``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import quote, unquote

from commit_ci.flaky import MAX_TEST_IDS_BYTES, Retry
from commit_ci.security import OBSERVER, OPERATOR, ROLES, RUNNER, Key
from commit_ci.states import JobState, ReportedStatus, RunnerState, values
from commit_ci.wire import (
    ProtocolError,
    Stream,
    header_bytes,
    is_decimal,
    is_name,
    parse_branch,
    parse_commit,
    parse_commit_prefix,
    parse_host,
    parse_port,
    split_header,
)

# --- Limits (one place, with units; those of a header line and its timing are in wire.py)

#: Test output the dispatcher keeps per result; the rest is cut off with a marker
#: so that a chatty test suite still gets its verdict recorded.
MAX_LOG_BYTES = 8 * 1024 * 1024
#: JUnit XML kept per result; a larger file is dropped (a cut XML file is useless).
MAX_JUNIT_BYTES = 8 * 1024 * 1024
#: JSON document in an ``OK`` reply (operator queries).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: A sharded run's plan (sharding.py: test files to shards, JSON), which a runner
#: hands its tests in one environment variable (Linux allows 128 KiB), and the
#: durations of the test files a result carries (at most 5000 lines of seconds and a path).
MAX_PLAN_BYTES = 96 * 1024
MAX_DURATIONS_BYTES = 5000 * 524
#: A chunk of a running job's live output (``live-log``, live_log.py), and of an
#: answer to ``tail``; a larger one is refused whole.
MAX_LIVE_CHUNK_BYTES = 64 * 1024
#: A declared section larger than this is refused outright: reading and
#: discarding it would tie up a thread for too long.
MAX_SECTION_ON_WIRE_BYTES = 256 * 1024 * 1024

#: Section bytes one process holds at once for messages still arriving. Until its
#: last byte a message is not authenticated, so without this anyone who can connect
#: could make a server hold MAX_CONNECTIONS times 16 MiB; past it, a message with
#: sections is refused with ERR (a runner keeps its result and sends it again).
SECTION_BUDGET_BYTES = 64 * 1024 * 1024

# --- Field types ---------------------------------------------------------------------
# Each parser takes the wire text (already percent-decoded) and returns the typed
# value, or raises ProtocolError with a reason fit for the peer to read. parse_commit,
# parse_commit_prefix, parse_host and parse_port are in wire.py.


def parse_count(text: str) -> int:
    if not is_decimal(text):
        raise ProtocolError("invalid count (want a non-negative integer)")
    return int(text)


def parse_shard(text: str) -> int:
    """A shard number or count: 1 to 64 (sharding.MAX_SHARDS)."""
    value = parse_count(text)
    if not 1 <= value <= 64:
        raise ProtocolError("invalid shard (want 1 to 64)")
    return value


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
    """A runner's or a key's name (wire.is_name)."""
    if not is_name(text):
        raise ProtocolError("invalid name")
    return text


def parse_text(text: str) -> str:
    """Free text (reasons, messages): printable, at most 1000 characters."""
    if len(text) > 1000 or any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
        raise ProtocolError("invalid text field")
    return text


def _one_of(names: tuple[str, ...], what: str) -> Callable[[str], str]:
    """A parser that takes one of ``names``."""

    def parse(text: str) -> str:
        if text not in names:
            raise ProtocolError("invalid %s (want one of %s)" % (what, ", ".join(names)))
        return text

    return parse


#: Most interpreter versions a runner may offer.
MAX_VERSIONS = 16
_VERSION = re.compile(r"3\.\d{1,2}\Z")
_REQUIREMENT = re.compile(r"python3\.\d{1,2}\Z")


def parse_versions(text: str) -> tuple[str, ...]:
    """Python versions, ``3.11,3.12``: what a runner can build environments with."""
    versions = tuple(text.split(",")) if text else ()
    if len(versions) > MAX_VERSIONS or not all(_VERSION.match(version) for version in versions):
        raise ProtocolError("invalid versions (want up to %d of 3.N, separated by commas)" % MAX_VERSIONS)
    return versions


def parse_requirement(text: str) -> str:
    """What a commit asks of the runner that tests it: an interpreter, ``python3.12``."""
    if not _REQUIREMENT.match(text):
        raise ProtocolError("invalid requirement (want python3.N)")
    return text


#: What a runner reports for an attempt, says it is doing, and a job's state (states.py).
parse_status = _one_of(values(ReportedStatus), "status")
parse_runner_state = _one_of(values((RunnerState.IDLE, RunnerState.BUSY)), "state")
parse_job_state = _one_of(values(JobState), "job state")
#: What a runner says may run again after a failed run (flaky.py).
parse_retry = _one_of(values(Retry), "retry")
#: What a named key may do (security.py).
parse_role = _one_of(ROLES, "role")


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
    #: The roles of the named keys that may send it to the dispatcher (the shared
    #: secret may send anything). A runner takes requests signed with its own key alone.
    roles: tuple[str, ...] = ()


LOG_SECTION = Section("log", MAX_LOG_BYTES, truncate=True)
JUNIT_SECTION = Section("junit", MAX_JUNIT_BYTES, truncate=False)
JSON_SECTION = Section("json", MAX_JSON_BYTES, truncate=False)
#: Node ids, one per line (flaky.py): the tests a rerun runs, the tests that failed.
#: A longer list is dropped whole (a cut list would rerun only some of them).
TESTS_SECTION = Section("tests", MAX_TEST_IDS_BYTES, truncate=False)
FAILING_SECTION = Section("failing", MAX_TEST_IDS_BYTES, truncate=False)
#: A shard's plan (``runtest``) and a result's test file durations (sharding.py): dropped whole when longer.
PLAN_SECTION = Section("plan", MAX_PLAN_BYTES, truncate=False)
DURATIONS_SECTION = Section("durations", MAX_DURATIONS_BYTES, truncate=False)
#: Bytes of a running job's output (live_log.py).
CHUNK_SECTION = Section("chunk", MAX_LIVE_CHUNK_BYTES, truncate=False)

#: What a peer may send to a server (dispatcher or runner), and, for the dispatcher,
#: which keys may send it (docs/security.md has the same table).
REQUESTS: dict[str, Verb] = {
    verb.name: verb
    for verb in (
        # to the dispatcher
        Verb("status", roles=(OPERATOR,)),
        # branch: where the commit came from; tip: that branch's newest commit, queued too
        Verb("dispatch", positional=(("commit", parse_commit),),
             options=(("branch", parse_branch), ("tip", parse_commit)), roles=(OBSERVER, OPERATOR)),
        # read-only, for operators (ci-ctl) and the local launcher; answered with JSON
        Verb("queue", options=(("limit", parse_count),), roles=(OPERATOR,)),
        Verb("branches", options=(("limit", parse_count),), roles=(OPERATOR,)),
        Verb("runners", roles=(OPERATOR,)),
        Verb("recent", options=(("limit", parse_count),), roles=(OPERATOR,)),
        # The one verb that takes a commit id prefix: people type ids to look them up.
        Verb("lookup", positional=(("commit", parse_commit_prefix),), roles=(OPERATOR,)),
        Verb("flaky", options=(("limit", parse_count), ("window", parse_count)), roles=(OPERATOR,)),
        # the notifications outbox: what waits to be sent (and why it failed), what went
        Verb("notifications", options=(("limit", parse_count),), roles=(OPERATOR,)),
        # a commit's live output while it runs (then its final log), from a byte offset (ci-ctl log)
        Verb("tail", positional=(("commit", parse_commit_prefix),), options=(("offset", parse_count),),
             roles=(OPERATOR,)),
        Verb(
            "register",
            positional=(("host", parse_host), ("port", parse_port)),
            options=(("name", parse_name), ("commit", parse_commit), ("attempt", parse_attempt),
                     ("pythons", parse_versions)),
            roles=(RUNNER,),
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
                ("hash_seed", parse_count),
                ("requires", parse_requirement),
                ("retry", parse_retry),
            ),
            sections=(LOG_SECTION, JUNIT_SECTION, FAILING_SECTION, DURATIONS_SECTION),
            roles=(RUNNER,),
        ),
        # a running job's output, a chunk at a time, while it runs (live_log.py)
        Verb("live-log", positional=(("commit", parse_commit), ("attempt", parse_attempt), ("offset", parse_count)),
             sections=(CHUNK_SECTION,), roles=(RUNNER,)),
        # the dispatcher's keys file (ci-ctl key ...); key-add answers with the new key, hidden
        Verb("key-add", positional=(("name", parse_name), ("role", parse_role)), roles=(OPERATOR,)),
        Verb("key-revoke", positional=(("name", parse_name),), roles=(OPERATOR,)),
        Verb("key-list", roles=(OPERATOR,)),
        # an operator's: run a judged commit again; stop a queued or running one
        Verb("rerun", positional=(("commit", parse_commit),), roles=(OPERATOR,)),
        Verb("cancel", positional=(("commit", parse_commit),), roles=(OPERATOR,)),
        # to a runner
        Verb("ping"),
        # shard=I shards=K plan=...: run shard I of K alone (sharding.py)
        Verb("runtest", positional=(("commit", parse_commit), ("attempt", parse_attempt)),
             options=(("shard", parse_shard), ("shards", parse_shard)), sections=(TESTS_SECTION, PLAN_SECTION)),
        Verb("stop", positional=(("commit", parse_commit), ("attempt", parse_attempt))),
        Verb("fetch", positional=(("commit", parse_commit),)),
    )
}


def may_send(key: Key | None, verb: str) -> bool:
    """Whether a request signed with ``key`` (None: not signed, authentication is off)
    may be ``verb``: the shared secret may send anything, a named key what its role may."""
    return key is None or key.shared or key.role in REQUESTS[verb].roles


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
                ("run", parse_count),
                ("stopped", parse_count),
                ("offset", parse_count),
            ),
            sections=(JSON_SECTION, CHUNK_SECTION),
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
    #: The key it was signed with, when authenticated; a reply to it is signed with it too.
    key: Key | None = field(default=None, compare=False, repr=False)

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
    elif isinstance(value, (tuple, list)):
        text = ",".join(str(item) for item in value)
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
    """Reads and writes whole messages on one socket: wire.Stream's lines,
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
            message.key = verification.key
        return message

    def write_message(
        self, message: Message, table: Mapping[str, Verb], request_nonce: str | None = None, signed: bool = True,
        key: Key | None = None,
    ) -> str | None:
        """Send ``message`` (behind an ``auth`` line when authenticating and ``signed``,
        signed with ``key``: a reply with its request's, by default this side's own).

        Returns the nonce of that line, which the reply must name, or None.
        """
        return self.send(encode(message, table), request_nonce, signed, key)
