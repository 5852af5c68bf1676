"""The wire protocol (commit_ci: wire, protocol, client, server): codec, framing, limits, and daemons facing bad input.

The codec and MessageStream are exercised in-process (over socket.socketpair() or a
fake socket whose clock the test controls); the last part sends malformed input to
a real dispatcher and a real runner on 127.0.0.1 and checks that each gets ``ERR``,
a log line, and keeps serving (design invariants 4 and 5).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import commit_ci.server
from commit_ci import client, protocol, security, wire
from commit_ci.protocol import (
    MAX_SECTION_ON_WIRE_BYTES,
    REPLIES,
    REQUESTS,
    Message,
    MessageStream,
    Section,
    decode_header,
    encode,
    encode_header,
)
from commit_ci.server import REQUESTS_PER_TURN, ProtocolServer, serve_in_thread
from commit_ci.wire import MAX_LINE_BYTES, ProtocolError

from conftest import wait_until

SHA = "0123456789abcdef0123456789abcdef01234567"

#: A valid value for every field name used in the verb tables, and what it decodes to.
SAMPLE_VALUES: dict[str, object] = {
    "commit": SHA,
    "host": "runner-1.example.org",
    "port": 65535,
    "name": "runner@box:1",
    "attempt": 7,
    "status": "failed",
    "passed": 12,
    "failed": 3,
    "errors": 0,
    "skipped": 1,
    "duration": 12.345,
    "reason": "two words = 100% \u00fcn\u00efc\u00f8d\u00e9 \u20ac a+b/c",
    "state": "busy",
    "job": "running",
    "new": 1,
    "queued": 40,
    "running": 2,
    "runners": 3,
    "idle": 1,
    "runner": "127.0.0.1:4242",
    "heartbeat": 0.5,
    "recorded": 1,
    "run": 2,
    "stopped": 1,
    "limit": 50,
    "pythons": ("3.10", "3.12"),
    "hash_seed": 4294967295,
    "requires": "python3.12",
    "role": "observer",
    "branch": "release/1.0-\u00fc+x",
    "tip": "b" * 40,
    "retry": "tests",
    "window": 100,
    "shard": 2,
    "shards": 4,
    "offset": 65536,
}
ERR_REASON = "unknown commit or attempt: 100% sure = yes"
SAMPLE_SECTIONS = {
    "log": b"collected 3 items\n\x00\xff\xfe binary \r\n tail\n",
    "junit": b'<?xml version="1.0"?><testsuites><testsuite tests="1"/></testsuites>',
    "json": b'{"queued": ["abc"], "note": "\\u20ac"}',
    "tests": b"tests/test_a.py::TestX::test_y[a b]\ntest_b.py::test_z\n",
    "failing": b"tests/test_a.py::TestX::test_y[a b]\n",
    "plan": b'{"tests/test_a.py":1,"tests/test_b.py":2}',
    "durations": b"1.250 tests/test_a.py\n0.010 tests/test_b.py\n",
    "chunk": b"LIVE step one\n\x00\xff partial",
}


def all_verbs():
    for table_name, table in (("REQUESTS", REQUESTS), ("REPLIES", REPLIES)):
        for name in table:
            yield pytest.param(table, name, id="%s.%s" % (table_name, name))


def sample_message(table, name: str, with_options: bool, with_sections: bool) -> Message:
    verb = table[name]
    message = Message(name)
    for field_name, _parser in verb.positional:
        message.fields[field_name] = ERR_REASON if name == "ERR" else SAMPLE_VALUES[field_name]
    if with_options:
        for field_name, _parser in verb.options:
            message.fields[field_name] = SAMPLE_VALUES[field_name]
    if with_sections:
        for section in verb.sections:
            message.sections[section.name] = SAMPLE_SECTIONS[section.name]
    return message


def stream_round_trip(message: Message, table) -> Message:
    """Send ``message`` through a MessageStream over a socketpair and read it back."""
    left, right = socket.socketpair()
    with left, right:
        MessageStream(left).write_message(message, table)
        left.shutdown(socket.SHUT_WR)
        reader = MessageStream(right)
        decoded = reader.read_message(table, first_byte_timeout=5)
        assert reader.read_message(table, first_byte_timeout=5) is None, "nothing after the message"
    return decoded


# --- encode / decode round trips ---------------------------------------------------------


@pytest.mark.parametrize("table, name", list(all_verbs()))
@pytest.mark.parametrize("with_options", [False, True], ids=["bare", "options"])
def test_every_verb_round_trips(table, name, with_options):
    verb = table[name]
    message = sample_message(table, name, with_options, with_sections=with_options)

    decoded = stream_round_trip(message, table)

    assert decoded.verb == name
    assert decoded.fields == message.fields
    assert decoded.sections == message.sections
    assert decoded.truncated == set()
    line, _, _ = encode(message, table).partition(b"\n")
    header, pending = decode_header(line, table)
    assert header.fields == message.fields
    assert [(section.name, length) for section, length in pending] == [
        (section.name, len(message.sections[section.name])) for section in verb.sections if section.name in message.sections
    ]


def test_sample_values_are_valid_for_every_field_of_every_verb():
    # If a verb gains a field, the round trip above must learn a valid value for it.
    for table in (REQUESTS, REPLIES):
        for verb in table.values():
            if verb.name == "ERR":
                continue
            for field_name, parser in verb.positional + verb.options:
                value = SAMPLE_VALUES[field_name]
                text = ",".join(value) if isinstance(value, tuple) else str(value)
                assert parser(text) == value, (verb.name, field_name)


def test_results_with_log_and_junit_sections():
    message = protocol.request(
        "results", commit=SHA, attempt=3, status="passed", passed=5, failed=0, errors=0, skipped=2,
        duration=1.5, reason=None, log=SAMPLE_SECTIONS["log"], junit=SAMPLE_SECTIONS["junit"],
    )
    data = encode(message, REQUESTS)
    header = data.split(b"\n", 1)[0].decode("ascii")
    assert header == (
        "results %s 3 passed passed=5 failed=0 errors=0 skipped=2 duration=1.5 log=%d junit=%d"
        % (SHA, len(SAMPLE_SECTIONS["log"]), len(SAMPLE_SECTIONS["junit"]))
    )
    assert data.endswith(SAMPLE_SECTIONS["log"] + SAMPLE_SECTIONS["junit"])

    decoded = stream_round_trip(message, REQUESTS)

    assert decoded.sections == {"log": SAMPLE_SECTIONS["log"], "junit": SAMPLE_SECTIONS["junit"]}
    assert "reason" not in decoded.fields, "a None value is left out"
    assert decoded.get("skipped") == 2 and decoded.get("duration") == 1.5


def test_ok_with_a_json_section():
    message = protocol.reply("OK", queued=2, running=1, json=SAMPLE_SECTIONS["json"])
    decoded = stream_round_trip(message, REPLIES)
    assert decoded.verb == "OK"
    assert decoded.fields == {"queued": 2, "running": 1}
    assert decoded.sections == {"json": SAMPLE_SECTIONS["json"]}


def test_sections_are_read_in_table_order_whatever_the_header_order():
    line = b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed junit=3 log=2"
    left, right = socket.socketpair()
    with left, right:
        left.sendall(line + b"\nLLJJJ")
        decoded = MessageStream(right).read_message(REQUESTS, first_byte_timeout=5)
    assert decoded.sections == {"log": b"LL", "junit": b"JJJ"}


def test_pipelined_messages_with_sections_stay_in_step():
    first = protocol.request("results", commit=SHA, attempt=1, status="failed", log=b"one\n" * 100)
    second = protocol.request("dispatch", commit="abcdef12abcdef12abcdef12abcdef12abcdef12")
    third = protocol.request("results", commit=SHA, attempt=2, status="passed", junit=b"<x/>")
    left, right = socket.socketpair()
    with left, right:
        left.sendall(encode(first, REQUESTS) + encode(second, REQUESTS) + encode(third, REQUESTS))
        left.shutdown(socket.SHUT_WR)
        reader = MessageStream(right)
        got = [reader.read_message(REQUESTS, first_byte_timeout=5) for _ in range(4)]
    assert [m.verb if m else None for m in got] == ["results", "dispatch", "results", None]
    assert got[0].sections == {"log": b"one\n" * 100}
    assert got[1].fields == {"commit": "abcdef12abcdef12abcdef12abcdef12abcdef12"}
    assert got[2].fields["attempt"] == 2 and got[2].sections == {"junit": b"<x/>"}


@pytest.mark.parametrize(
    "reason",
    [
        "two words",
        "\u00fcn\u00efc\u00f8d\u00e9 \u2603 \U0001f600",
        "key=value",
        "100% done %41 %zz %",
        "a+b/c,d:e@f",
        "tab\there",
        " leading and trailing ",
        "",
    ],
)
def test_free_text_is_percent_encoded_and_comes_back_unchanged(reason):
    message = protocol.request("results", commit=SHA, attempt=1, status="error", reason=reason)
    header = encode_header(message, REQUESTS)
    assert header.isascii()
    tokens = header.split(" ")
    assert len(tokens) == 5, "free text must not add fields: %r" % header
    assert tokens[4].startswith("reason=") and tokens[4].count("=") == 1
    decoded, pending = decode_header(header.encode("ascii"), REQUESTS)
    assert decoded.fields["reason"] == reason
    assert pending == []


def test_err_reason_is_the_rest_of_the_line():
    decoded, _ = decode_header(b"ERR invalid commit id (want the full id: 40 or 64 hex digits) = 100%", REPLIES)
    assert decoded.fields == {"reason": "invalid commit id (want the full id: 40 or 64 hex digits) = 100%"}
    decoded, _ = decode_header(b"ERR", REPLIES)
    assert decoded.fields == {"reason": ""}


def test_error_keeps_the_reply_on_one_line():
    assert protocol.error("bad\nthing\r\x00here").fields["reason"] == "bad thing  here"
    assert protocol.error("").fields["reason"] == "error"
    assert len(protocol.error("x" * 5000).fields["reason"]) == 1000
    data = encode(protocol.error("line one\nline two"), REPLIES)
    assert data == b"ERR line one line two\n"


def test_encode_refuses_unknown_verbs_and_overlong_headers():
    with pytest.raises(ValueError):
        encode(Message("frobnicate"), REQUESTS)
    with pytest.raises(ValueError):
        encode(Message("OK"), REQUESTS)  # a reply is not a request
    huge = protocol.request("results", commit=SHA, attempt=1, status="error", reason="\u20ac" * 1000)
    with pytest.raises(ValueError, match="exceeds"):
        encode(huge, REQUESTS)


def test_request_builder_leaves_out_none_and_turns_bytes_into_sections():
    message = protocol.request("register", host="h", port=1, name=None, commit=None, attempt=None)
    assert message.fields == {"host": "h", "port": 1} and message.sections == {}
    message = protocol.request("results", commit=SHA, attempt=1, status="passed", log=bytearray(b"xy"))
    assert message.sections == {"log": b"xy"} and isinstance(message.sections["log"], bytes)
    assert str(message) == "results %s 1 passed log=2" % SHA


# --- commit ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (SHA, SHA),
        (SHA.upper(), SHA),
        ("a" * 64, "a" * 64),  # SHA-256
        ("0123456789ABCDEFabcdef0123456789" * 2, "0123456789abcdefabcdef0123456789" * 2),
    ],
)
def test_full_commit_ids_are_accepted_in_lower_case(text, expected):
    for line in ("dispatch %s", "runtest %s 1", "results %s 1 passed", "register h 1 commit=%s attempt=1", "lookup %s"):
        decoded, _ = decode_header((line % text).encode(), REQUESTS)
        assert decoded.fields["commit"] == expected, line
    decoded, _ = decode_header(("OK state=busy commit=%s attempt=1" % text).encode(), REPLIES)
    assert decoded.fields["commit"] == expected


#: Hex digits, but not a whole commit id: the start of one, or too long for SHA-1.
ABBREVIATED_IDS = ["abcdef1", SHA[:12], SHA[:39], SHA + "a", ("a" * 64)[:63]]


@pytest.mark.parametrize(
    "text",
    [
        "../../x",
        "..%2f..%2fx",
        "..%2F" + "a" * 10,
        "%2e%2e%2fabcdef12abcdef12abcdef12abcdef12abcdef12",
        "xyz1234",
        "abcdef",  # 6 hex digits: too short
        "a" * 65,  # too long
        "abcdef12abcdef12abcdef12abcdef12abcdef12%00",
        "abcdef12abcdef12abcdef12abcdef12abcdef12%0A",
        "abcdef12abcdef12abcdef12abcdef12abcdef12/",
        "abc def1".replace(" ", "%20"),
        "g" * 40,
        "\uff10" * 40,  # full-width digits are not hex
        *ABBREVIATED_IDS,
    ],
)
def test_invalid_and_abbreviated_commit_ids_are_refused(text):
    """An abbreviated id would be a second name for a commit: a second job, a second
    set of result files. Every verb but the ``lookup`` query wants the full id."""
    for line in ("dispatch %s", "runtest %s 1", "results %s 1 passed", "register h 1 commit=%s attempt=1"):
        with pytest.raises(ProtocolError, match=re.escape("invalid commit id (want the full id: 40 or 64 hex digits)")):
            decode_header((line % text).encode(), REQUESTS)
    with pytest.raises(ProtocolError, match="invalid commit id"):
        decode_header(("OK state=busy commit=%s attempt=1" % text).encode(), REPLIES)


@pytest.mark.parametrize("text", ABBREVIATED_IDS + ["ABCDEF1234"])
def test_the_result_query_takes_a_prefix_of_7_to_64_hex_digits(text):
    decoded, _ = decode_header(("lookup %s" % text).encode(), REQUESTS)
    assert decoded.fields["commit"] == text.lower()


@pytest.mark.parametrize("text", ["abcdef", "a" * 65, "xyz1234", "../../x", "abcdef1/", "\uff10" * 7])
def test_the_lookup_query_refuses_what_is_no_commit_prefix(text):
    with pytest.raises(ProtocolError, match=re.escape("invalid commit id or prefix (want 7 to 64 hex digits)")):
        decode_header(("lookup %s" % text).encode(), REQUESTS)


# --- malformed headers ---------------------------------------------------------------------


MALFORMED = [
    # (header line, table, expected text in the error)
    (b"", REQUESTS, "empty line"),
    (b"   ", REQUESTS, "empty line"),
    (b"frobnicate", REQUESTS, "unknown verb 'frobnicate'"),
    (b"STATUS", REQUESTS, "unknown verb"),
    (b"OK", REQUESTS, "unknown verb 'OK'"),
    (b"dispatch", REPLIES, "unknown verb 'dispatch'"),
    (b" status", REQUESTS, "unknown verb ''"),
    (b"x" * 100, REQUESTS, "unknown verb 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'"),
    (b"dispatch", REQUESTS, "dispatch needs <commit>"),
    (b"register 127.0.0.1", REQUESTS, "register needs <host> <port>"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1", REQUESTS, "results needs <commit> <attempt> <status>"),
    (b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12", REQUESTS, "runtest needs <commit> <attempt>"),
    (b"status extra", REQUESTS, "unexpected field 'extra'"),
    (b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12 extra", REQUESTS, "unexpected field 'extra'"),
    (b"BUSY now", REPLIES, "unexpected field"),
    (b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12 colour=red", REQUESTS, "unknown option 'colour' for dispatch"),
    (b"status =1", REQUESTS, "unknown option ''"),
    (b"OK log=3", REPLIES, "unknown option 'log'"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed json=3", REQUESTS, "unknown option 'json'"),
    (b"register h 1 name=a name=b", REQUESTS, "duplicate option 'name'"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=1 log=1", REQUESTS, "duplicate option 'log'"),
    (b"OK state=idle state=busy", REPLIES, "duplicate option 'state'"),
    (b"dispatch  abcdef12abcdef12abcdef12abcdef12abcdef12", REQUESTS, "single spaces"),
    (b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12  1", REQUESTS, "single spaces"),
    (b"status\x00", REQUESTS, "control character"),
    (b"dispatch\tabcdef12abcdef12abcdef12abcdef12abcdef12", REQUESTS, "control character"),
    (b"dispatch abc\x1bdef1", REQUESTS, "control character"),
    (b"status\x7f", REQUESTS, "control character"),
    (b"status\r", REQUESTS, "control character"),
    (b"ERR bad\x01thing", REPLIES, "control character"),
    (b"\xff\xfestatus", REQUESTS, "not UTF-8"),
    (b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12\xc3", REQUESTS, "not UTF-8"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 error reason=%ff", REQUESTS, "'reason' is not UTF-8"),
    # ports
    (b"register h 0", REQUESTS, "invalid port"),
    (b"register h 65536", REQUESTS, "invalid port"),
    (b"register h -1", REQUESTS, "invalid port"),
    (b"register h http", REQUESTS, "invalid port"),
    (b"register h 80.5", REQUESTS, "invalid port"),
    (b"register h 1e3", REQUESTS, "invalid port"),
    (b"register bad/host 80", REQUESTS, "invalid host"),
    (b"register h 80 name=a%20b", REQUESTS, "invalid name"),
    # attempts and counts
    (b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 0", REQUESTS, "invalid attempt id"),
    (b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 -1", REQUESTS, "invalid count"),
    (b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 x", REQUESTS, "invalid count"),
    (b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 1111111111111", REQUESTS, "invalid count"),
    (b"register h 80 attempt=0", REQUESTS, "invalid attempt id"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed passed=-1", REQUESTS, "invalid count"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed passed=1.5", REQUESTS, "invalid count"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed passed=", REQUESTS, "invalid count"),
    (b"OK queued=many", REPLIES, "invalid count"),
    # other field types
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 exploded", REQUESTS, "invalid status"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed duration=nan", REQUESTS, "invalid duration"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed duration=inf", REQUESTS, "invalid duration"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed duration=-1", REQUESTS, "invalid duration"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed duration=soon", REQUESTS, "invalid duration"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed duration=1e9", REQUESTS, "invalid duration"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 error reason=" + b"x" * 1001, REQUESTS, "invalid text"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 error reason=two%0Alines", REQUESTS, "invalid text"),
    (b"OK state=sleeping", REPLIES, "invalid state"),
    (b"OK job=lost", REPLIES, "invalid job state"),
    # sections
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=%d" % (MAX_SECTION_ON_WIRE_BYTES + 1), REQUESTS, "section 'log' too large"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed junit=99999999999", REQUESTS, "section 'junit' too large"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=-1", REQUESTS, "invalid count"),
    (b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=lots", REQUESTS, "invalid count"),
    (b"OK json=1111111111111", REPLIES, "invalid count"),
]


@pytest.mark.parametrize("line, table, expected", MALFORMED, ids=[repr(case[0][:40]) for case in MALFORMED])
def test_malformed_header_gives_protocol_error(line, table, expected):
    with pytest.raises(ProtocolError) as caught:
        decode_header(line, table)
    assert expected in str(caught.value)
    # The reason goes back to the peer after ERR: it must fit on one line.
    assert "\n" not in str(caught.value)
    assert encode(protocol.error(str(caught.value)), REPLIES).count(b"\n") == 1


def test_section_length_at_the_wire_limit_is_accepted():
    _, pending = decode_header(b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=%d" % MAX_SECTION_ON_WIRE_BYTES, REQUESTS)
    assert [(section.name, length) for section, length in pending] == [("log", MAX_SECTION_ON_WIRE_BYTES)]


@pytest.mark.parametrize("line", [b"dispatch %ff", b"runtest %c3 1", b"register h%ff 80"])
def test_invalid_percent_escape_in_a_positional_field_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        decode_header(line, REQUESTS)


@pytest.mark.parametrize(
    "line",
    [
        "register h \u00b2".encode(),
        b"register h %C2%B2",
        "runtest abcdef12abcdef12abcdef12abcdef12abcdef12 \u00b9".encode(),
        b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed passed=%C2%B3",
        "results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=\u00b2".encode(),
    ],
)
def test_non_ascii_digits_are_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        decode_header(line, REQUESTS)


# --- MessageStream over a socketpair ---------------------------------------------------------


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_line_at_the_limit_is_read_and_one_byte_more_is_refused(pair):
    left, right = pair
    reader = MessageStream(right)
    left.sendall(b"x" * (MAX_LINE_BYTES - 1) + b"\n")
    assert reader.read_line(first_byte_timeout=5) == b"x" * (MAX_LINE_BYTES - 1)
    left.sendall(b"y" * MAX_LINE_BYTES + b"\n")
    with pytest.raises(ProtocolError, match="line too long"):
        reader.read_line(first_byte_timeout=5)


def test_line_over_the_limit_without_newline_is_refused(pair):
    left, right = pair
    left.sendall(b"z" * (MAX_LINE_BYTES + 100))  # and no newline ever comes
    with pytest.raises(ProtocolError, match="line too long"):
        MessageStream(right).read_message(REQUESTS, first_byte_timeout=5)


def test_crlf_line_end_is_accepted(pair):
    left, right = pair
    left.sendall(b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12\r\n")
    assert MessageStream(right).read_message(REQUESTS, first_byte_timeout=5).fields == {"commit": "abcdef12abcdef12abcdef12abcdef12abcdef12"}


def small_table(log_keep: int, junit_keep: int) -> dict:
    """REQUESTS, but with small keep limits on the results sections."""
    results = dataclasses.replace(
        REQUESTS["results"],
        sections=(Section("log", log_keep, truncate=True), Section("junit", junit_keep, truncate=False)),
    )
    return {**REQUESTS, "results": results}


def test_long_log_is_truncated_with_a_marker_and_the_stream_stays_in_step(pair):
    left, right = pair
    output = bytes(range(256)) * 4  # 1024 bytes, binary
    message = protocol.request("results", commit=SHA, attempt=1, status="failed", log=output, junit=b"<ok/>")
    left.sendall(encode(message, REQUESTS) + encode(protocol.request("status"), REQUESTS))
    reader = MessageStream(right)

    decoded = reader.read_message(small_table(log_keep=100, junit_keep=1000), first_byte_timeout=5)

    assert decoded.truncated == {"log"}
    assert decoded.sections["log"].startswith(output[:100])
    marker = decoded.sections["log"][100:]
    assert marker == b"\n[... 924 more bytes cut off: output limit is 100 bytes ...]\n"
    assert decoded.sections["junit"] == b"<ok/>"
    follow_up = reader.read_message(REQUESTS, first_byte_timeout=5)
    assert follow_up is not None and follow_up.verb == "status", "the cut bytes were consumed"


def test_log_exactly_at_its_limit_is_kept_whole(pair):
    left, right = pair
    message = protocol.request("results", commit=SHA, attempt=1, status="passed", log=b"a" * 100)
    left.sendall(encode(message, REQUESTS))
    decoded = MessageStream(right).read_message(small_table(100, 100), first_byte_timeout=5)
    assert decoded.sections["log"] == b"a" * 100 and decoded.truncated == set()


def test_junit_over_its_limit_is_dropped(pair):
    left, right = pair
    message = protocol.request("results", commit=SHA, attempt=1, status="passed", log=b"fine\n", junit=b"<x>" + b"y" * 500 + b"</x>")
    left.sendall(encode(message, REQUESTS) + encode(protocol.request("ping"), REQUESTS))
    reader = MessageStream(right)
    decoded = reader.read_message(small_table(log_keep=1000, junit_keep=100), first_byte_timeout=5)
    assert decoded.truncated == {"junit"}
    assert decoded.sections == {"log": b"fine\n", "junit": b""}
    assert reader.read_message(REQUESTS, first_byte_timeout=5).verb == "ping"


def test_real_section_limits_are_the_documented_ones():
    sections = {section.name: section for section in REQUESTS["results"].sections}
    assert (sections["log"].keep, sections["log"].truncate) == (protocol.MAX_LOG_BYTES, True)
    assert (sections["junit"].keep, sections["junit"].truncate) == (protocol.MAX_JUNIT_BYTES, False)
    assert REPLIES["OK"].sections == (Section("json", protocol.MAX_JSON_BYTES, False),
                                      Section("chunk", protocol.MAX_LIVE_CHUNK_BYTES, False))
    assert REQUESTS["live-log"].sections == (Section("chunk", protocol.MAX_LIVE_CHUNK_BYTES, False),)


def test_close_in_the_middle_of_a_line_is_an_error(pair):
    left, right = pair
    left.sendall(b"dispatch abc")
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="middle of a line"):
        MessageStream(right).read_message(REQUESTS, first_byte_timeout=5)


def test_close_in_the_middle_of_a_section_is_an_error(pair):
    left, right = pair
    left.sendall(b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=100\n" + b"only ten b")
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="middle of a section"):
        MessageStream(right).read_message(REQUESTS, first_byte_timeout=5)


def test_clean_close_before_a_message_returns_none(pair):
    left, right = pair
    left.shutdown(socket.SHUT_WR)
    assert MessageStream(right).read_message(REQUESTS, first_byte_timeout=5) is None


def test_silent_peer_times_out_within_the_first_byte_timeout(pair):
    _left, right = pair
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        MessageStream(right).read_message(REQUESTS, first_byte_timeout=0.2)
    assert time.monotonic() - started < 5


def test_peer_that_stops_mid_line_times_out(pair, monkeypatch):
    monkeypatch.setattr(wire, "IO_TIMEOUT_S", 0.2)
    left, right = pair
    left.sendall(b"dispatch abc")  # then nothing, but the connection stays open
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        MessageStream(right).read_message(REQUESTS, first_byte_timeout=5)
    assert time.monotonic() - started < 5


def test_peer_that_stops_mid_section_times_out(pair, monkeypatch):
    monkeypatch.setattr(wire, "IO_TIMEOUT_S", 0.2)
    left, right = pair
    left.sendall(b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=100\nsome")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        MessageStream(right).read_message(REQUESTS, first_byte_timeout=5)
    assert time.monotonic() - started < 5


class TricklingSocket:
    """A socket stand-in that hands out one chunk per recv; each recv costs ``step``
    seconds on a fake clock, so deadlines are tested without real waiting."""

    def __init__(self, chunks: list[bytes], step: float):
        self.chunks = list(chunks)
        self.step = step
        self.now = 0.0
        self.timeouts: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def settimeout(self, value: float) -> None:
        assert value > 0
        self.timeouts.append(value)

    def recv(self, _size: int) -> bytes:
        self.now += self.step
        return self.chunks.pop(0) if self.chunks else b""


def trickle(monkeypatch, chunks: list[bytes], step: float) -> TricklingSocket:
    sock = TricklingSocket(chunks, step)
    monkeypatch.setattr(wire, "time", types.SimpleNamespace(monotonic=sock.monotonic))
    monkeypatch.setattr(wire, "MESSAGE_DEADLINE_S", 1.0)
    return sock


def test_trickling_header_is_cut_off_at_the_message_deadline(monkeypatch):
    # Each chunk takes 0.4 s: the fifth is due 1.6 s after the first byte, past the 1 s deadline.
    sock = trickle(monkeypatch, [b"dis", b"pat", b"ch ", b"abc", b"def1\n"], step=0.4)
    with pytest.raises(TimeoutError):
        MessageStream(sock).read_message(REQUESTS, first_byte_timeout=10)
    assert all(value <= 1.0 for value in sock.timeouts[1:]), "each recv waits at most until the deadline"


def test_slow_but_timely_header_is_read(monkeypatch):
    sock = trickle(monkeypatch, [b"dis", b"pat", b"ch ", b"abcdef12abcdef12abcdef12abcdef12abcdef12\n"], step=0.4)
    assert MessageStream(sock).read_message(REQUESTS, first_byte_timeout=10).fields == {"commit": "abcdef12abcdef12abcdef12abcdef12abcdef12"}


def test_whole_message_header_and_sections_must_arrive_within_the_deadline(monkeypatch):
    # First byte at 0.4 s; the header ends at 0.8 s and the section at 2.0 s: 1.6 s > 1 s.
    chunks = [b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed l", b"og=6\n", b"ab", b"cd", b"ef"]
    sock = trickle(monkeypatch, chunks, step=0.4)
    with pytest.raises((TimeoutError, ProtocolError)):
        MessageStream(sock).read_message(REQUESTS, first_byte_timeout=10)


# --- ProtocolServer and communicate(), in-process -------------------------------------------


@pytest.fixture
def server_factory():
    started = []

    def start(handle_message, **options):
        server = ProtocolServer(("127.0.0.1", 0), handle_message, logging.getLogger("test.server"), **options)
        thread = serve_in_thread(server, "test-server")
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_server_answers_several_requests_on_one_connection_and_survives_a_handler_bug(server_factory, caplog):
    def handle(message, peer):
        if message.verb == "dispatch" and message.fields["commit"].startswith("dead"):
            raise RuntimeError("handler bug")
        return protocol.reply("OK", new=1) if message.verb == "dispatch" else protocol.reply("OK", state="idle")

    server = server_factory(handle)
    with caplog.at_level(logging.INFO, logger="test.server"):
        with client.Connection(server.address) as connection:
            assert connection.request(protocol.request("ping")).fields == {"state": "idle"}
            failed = connection.request(protocol.request("dispatch", commit="deadbeef" * 5))
            assert (failed.verb, failed.fields) == ("ERR", {"reason": "internal error"})
            assert connection.request(protocol.request("dispatch", commit="abcdef12abcdef12abcdef12abcdef12abcdef12")).fields == {"new": 1}
    assert any("error handling dispatch" in record.getMessage() and record.exc_info for record in caplog.records)


def test_server_closes_an_idle_connection(server_factory, monkeypatch):
    monkeypatch.setattr(commit_ci.server, "IDLE_TIMEOUT_S", 0.2)
    server = server_factory(lambda message, peer: protocol.reply("OK"))
    with socket.create_connection(server.address, timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b"", "the server hangs up on a silent client"
        assert time.monotonic() - started < 10


def test_server_answers_a_framing_error_then_hangs_up(server_factory):
    server = server_factory(lambda message, peer: protocol.reply("OK"))
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"dispatch nothex\nping\n")
        received = read_until_closed(sock)
    assert received == b"ERR invalid commit id (want the full id: 40 or 64 hex digits)\n"


def test_server_answers_a_request_that_arrives_in_pieces(server_factory):
    server = server_factory(lambda message, peer: protocol.reply("OK", new=1))
    data = protocol.encode(protocol.request("dispatch", commit="abcdef12abcdef12abcdef12abcdef12abcdef12"), REQUESTS)
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(data[:6])
        # The event loop cannot answer half a request: the connection goes to a thread.
        wait_until(lambda: not server._loop_connections and server._waiting_since, 10,
                   message="the connection handed to a thread")
        sock.sendall(data[6:])
        stream = MessageStream(sock)
        assert stream.read_message(REPLIES, first_byte_timeout=10).fields == {"new": 1}
        sock.sendall(data)  # and the thread serves the connection from then on
        assert stream.read_message(REPLIES, first_byte_timeout=10).fields == {"new": 1}


def test_server_answers_requests_sent_together_in_order(server_factory):
    calls = []

    def handle(message, peer):
        calls.append(message.fields["commit"])
        return protocol.reply("OK", new=len(calls))

    server = server_factory(handle)
    commits = ["%040x" % (0xabc0000 + index) for index in range(3 * REQUESTS_PER_TURN)]
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"".join(protocol.encode(protocol.request("dispatch", commit=commit), REQUESTS) for commit in commits))
        stream = MessageStream(sock)
        answers = [stream.read_message(REPLIES, first_byte_timeout=10).fields["new"] for _ in commits]
    assert answers == list(range(1, len(commits) + 1))
    assert calls == commits


def test_a_threaded_verb_holds_up_no_other_request(server_factory):
    entered, release = threading.Event(), threading.Event()

    def handle(message, peer):
        if message.verb == "results":
            entered.set()
            release.wait(30)
            return protocol.reply("OK", recorded=1)
        return protocol.reply("OK", state="idle")

    server = server_factory(handle, threaded_verbs={"results"})
    answers = []
    results = protocol.request("results", commit="abcdef12abcdef12abcdef12abcdef12abcdef12", attempt=1, status="passed", log=b"output\n")
    sender = threading.Thread(target=lambda: answers.append(client.communicate(server.address, results, timeout=30)))
    sender.start()
    try:
        assert entered.wait(10)
        # The results handler is still busy; the event loop answers everyone else.
        assert client.communicate(server.address, protocol.request("ping"), timeout=5).fields == {"state": "idle"}
        assert not answers
    finally:
        release.set()
        sender.join(timeout=30)
    assert [answer.fields for answer in answers] == [{"recorded": 1}]


def test_a_client_that_does_not_read_its_large_reply_holds_up_no_one(server_factory):
    document = b'{"pad": "%s"}' % (b"x" * (15 * 1024 * 1024))  # far more than a socket buffer holds

    def handle(message, peer):
        return protocol.reply("OK", json=document) if message.verb == "queue" else protocol.reply("OK", state="idle")

    server = server_factory(handle)
    with socket.create_connection(server.address, timeout=10) as slow:
        slow.sendall(protocol.encode(protocol.request("queue"), REQUESTS))
        # Not read yet: the rest of the reply waits on a thread, not in the event loop.
        wait_until(lambda: not server._loop_connections and server._waiting_since, 10,
                   message="the connection handed to a thread")
        assert client.communicate(server.address, protocol.request("ping"), timeout=5).fields == {"state": "idle"}
        answer = MessageStream(slow).read_message(REPLIES, first_byte_timeout=10)
    assert answer.sections["json"] == document


def test_communicate_times_out_when_the_peer_never_answers():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections complete in the backlog; nobody ever answers
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.communicate(listener.getsockname(), protocol.request("ping"), timeout=0.3)
        assert time.monotonic() - started < 5


def test_communicate_to_a_closed_port_is_an_oserror():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()
    with pytest.raises(OSError):
        client.communicate(address, protocol.request("ping"), timeout=1, connect_timeout=1)


def test_communicate_refuses_an_answer_that_is_not_a_reply():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def answer_nonsense():
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(10)
                connection.recv(100)
                connection.sendall(b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12\n")

        thread = threading.Thread(target=answer_nonsense, daemon=True)
        thread.start()
        with pytest.raises(ProtocolError, match="unknown verb 'dispatch'"):
            client.communicate(listener.getsockname(), protocol.request("ping"), timeout=5)
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:8888", ("127.0.0.1", 8888)), ("localhost:1", ("localhost", 1)),
     ("host", None), (":80", None), ("host:0", None), ("host:port", None), ("a/b:80", None)],
)
def test_parse_address(text, expected):
    if expected is None:
        with pytest.raises(ValueError):
            wire.parse_address(text)
    else:
        assert wire.parse_address(text) == expected


# wire.py checks values with sets instead of regular expressions (importing re
# would cost the push trigger's hook milliseconds); they must accept exactly what these
# expressions do (those helpers.py used before, and the full commit id's rule).
REFERENCE_PATTERNS = {
    "commit id": (wire.is_commit_id, re.compile(r"(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")),
    "commit prefix": (wire.is_commit_prefix, re.compile(r"[0-9a-f]{7,64}\Z")),
    "decimal": (wire.is_decimal, re.compile(r"[0-9]{1,12}\Z")),
    "host": (lambda text: _accepts(wire.parse_host, text), re.compile(r"[A-Za-z0-9._:\-]{1,253}\Z")),
    "name": (wire.is_name, re.compile(r"[A-Za-z0-9._:@\-]{1,128}\Z")),
}
AUTH_LINE_PATTERN = re.compile(rb"auth ([0-9]{1,16}) ([0-9a-f]{32}) ([0-9a-f]{64})\Z")


def _accepts(parser, text) -> bool:
    try:
        parser(text)
        return True
    except ProtocolError:
        return False


def _near_valid_text(alphabet: str, low: int, high: int):
    return st.one_of(st.text(max_size=high + 2), st.text(alphabet=alphabet + "AFgG:/ \n\u00b2\u0663", max_size=high + 2),
                     st.text(alphabet=alphabet, min_size=max(low - 1, 0), max_size=high + 1))


@pytest.mark.parametrize("name", list(REFERENCE_PATTERNS))
def test_set_checks_accept_what_the_regular_expressions_did(name):
    check, pattern = REFERENCE_PATTERNS[name]
    alphabet, low, high = {"commit id": ("0123456789abcdef", 40, 64), "commit prefix": ("0123456789abcdef", 7, 64),
                           "decimal": ("0123456789", 1, 12),
                           "host": ("aZ09._:-", 1, 253), "name": ("aZ09._:@-", 1, 128)}[name]

    @settings(max_examples=1000, deadline=None)
    @given(_near_valid_text(alphabet, low, high))
    def agree(text):
        assert check(text) == bool(pattern.match(text)), repr(text)

    agree()
    for length in (low - 1, low, high, high + 1):
        text = alphabet[0] * length
        assert check(text) == bool(pattern.match(text)), length


def _auth_line_cases() -> list[bytes]:
    """Every combination of a field that is right, one character short or long, or has
    a character the expression refuses."""
    stamps = [b"", b"1", b"9" * 16, b"9" * 17, b"1\xc2\xb2", b"1a", b" 1"]
    nonces = [b"0" * 32, b"0" * 31, b"0" * 33, b"A" * 32, b"0" * 31 + b"g", b"0" * 31 + b"\n"]
    tags = [b"f" * 64, b"f" * 63, b"f" * 65, b"F" * 64, b"f" * 63 + b" "]
    return [b" ".join((verb, stamp, nonce, tag))
            for verb in (b"auth", b"Auth", b"auth ") for stamp in stamps for nonce in nonces for tag in tags]


def _auth_line_disagreements(lines) -> list[bytes]:
    def expected(line):
        match = AUTH_LINE_PATTERN.match(line)
        # The four-field form is the shared secret's: no key name.
        return None if match is None else (*(group.decode() for group in match.groups()), None)

    return [line for line in lines if security.parse_auth_line(line) != expected(line)]


def test_auth_line_check_accepts_what_the_regular_expression_did():
    cases = _auth_line_cases()
    # Only the stamps "1" and "9" * 16, with the right nonce and tag after "auth", are valid.
    assert sum(1 for line in cases if AUTH_LINE_PATTERN.match(line)) == 2
    assert _auth_line_disagreements([b"", *cases]) == []


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_auth_line_check_refuses_arbitrary_bytes_as_the_expression_did(line):
    assert _auth_line_disagreements([line]) == []


# --- real daemons facing bad input ------------------------------------------------------------


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def first_reply_line(address: tuple[str, int], data: bytes, half_close: bool = False) -> bytes:
    """Send raw bytes, return the first line that comes back (b'' if the peer hung up)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received.partition(b"\n")[0]


def all_files(folder) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def runner_address(runner) -> tuple[str, int]:
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", runner.log())
    return ("127.0.0.1", int(match.group(1)))


GARBAGE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"

BAD_FOR_DISPATCHER = [
    # (name, bytes, half-close after sending, expected text in the ERR line)
    ("binary garbage", GARBAGE, False, b"not UTF-8"),
    ("garbage without newline, then EOF", b"\x00\x01\x02 junk", True, b"middle of a line"),
    ("empty line", b"\n", False, b"empty line"),
    ("whitespace line", b"  \t \n", False, b"control character"),
    ("unknown verb", b"frobnicate now\n", False, b"unknown verb"),
    ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, b"unknown verb 'GET'"),
    ("line too long", b"dispatch " + b"a" * (MAX_LINE_BYTES + 10), False, b"line too long"),
    ("ping is for runners", b"ping\n", False, b"ping is not a dispatcher request"),
    ("runtest is for runners", b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 1\n", False, b"runtest is not a dispatcher request"),
    ("results for an unknown commit", b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=5\nhello", False, b"unknown commit"),
    ("dispatch a path", b"dispatch ../../x\n", False, b"invalid commit id"),
    ("dispatch an escaped path", b"dispatch ..%2f..%2fabcdef12abcdef12abcdef12abcdef12abcdef12\n", False, b"invalid commit id"),
    ("dispatch an abbreviated id", b"dispatch abcdef12abcd\n", False, b"invalid commit id (want the full id"),
    ("dispatch on a branch git refuses", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12 branch=a..b\n", False,
     b"invalid branch name"),
    ("dispatch on a branch too long", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12 branch=" + b"b" * 201 + b"\n",
     False, b"invalid branch name (want a git branch name of at most 200 bytes)"),
    ("dispatch with an abbreviated tip", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12 tip=abcdef1\n", False,
     b"invalid commit id"),
    ("results for an abbreviated id", b"results abcdef12abcd 1 passed log=5\nhello", False, b"invalid commit id (want the full id"),
    ("register without port", b"register 127.0.0.1\n", False, b"needs"),
    ("oversized section", b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=999999999999\n", False, b"too large"),
]


def test_dispatcher_answers_bad_input_with_err_and_keeps_serving(ci, tmp_path):
    dispatcher = ci.start_dispatcher()
    address = wire.parse_address(ci.address)
    before = all_files(tmp_path)

    for name, data, half_close, expected in BAD_FOR_DISPATCHER:
        offset = len(dispatcher.log())
        line = first_reply_line(address, data, half_close)
        assert line.startswith(b"ERR "), "%s: got %r" % (name, line)
        assert expected in line, "%s: got %r" % (name, line)
        wait_until(lambda: " WARNING " in dispatcher.log()[offset:], timeout=10, message="warning for %s" % name)
        status = client.communicate(address, protocol.request("status"), timeout=10)
        assert (status.verb, status.fields) == ("OK", {"queued": 0, "running": 0, "runners": 0, "idle": 0}), name

    assert dispatcher.running()
    assert all_files(tmp_path) - before == set(), "no file was created"
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()
    assert " ERROR " not in dispatcher.log() and "Traceback" not in dispatcher.log()


BAD_FOR_RUNNER = [
    ("binary garbage", GARBAGE, False, b"not UTF-8"),
    ("garbage without newline, then EOF", b"\xde\xad\xbe\xef", True, b"middle of a line"),
    ("empty line", b"\n", False, b"empty line"),
    ("unknown verb", b"frobnicate\n", False, b"unknown verb"),
    ("dispatch is for the dispatcher", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12\n", False, b"dispatch is not a runner request"),
    ("register is for the dispatcher", b"register 127.0.0.1 9\n", False, b"register is not a runner request"),
    ("status is for the dispatcher", b"status\n", False, b"status is not a runner request"),
    ("results is for the dispatcher", b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed\n", False, b"results is not a runner request"),
    ("runtest a path", b"runtest ../../x 1\n", False, b"invalid commit id"),
    ("runtest an abbreviated id", b"runtest abcdef12abcd 1\n", False, b"invalid commit id (want the full id"),
    ("runtest attempt zero", b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 0\n", False, b"invalid attempt id"),
]


def test_runner_answers_bad_input_with_err_and_keeps_serving(ci, tmp_path):
    ci.start_dispatcher()
    runner = ci.start_runner()
    address = runner_address(runner)
    before = all_files(tmp_path)

    for name, data, half_close, expected in BAD_FOR_RUNNER:
        offset = len(runner.log())
        line = first_reply_line(address, data, half_close)
        assert line.startswith(b"ERR "), "%s: got %r" % (name, line)
        assert expected in line, "%s: got %r" % (name, line)
        wait_until(lambda: " WARNING " in runner.log()[offset:], timeout=10, message="warning for %s" % name)
        pong = client.communicate(address, protocol.request("ping"), timeout=10)
        assert (pong.verb, pong.fields) == ("OK", {"state": "idle"}), name

    assert runner.running()
    assert "testing" not in runner.log(), "no job was started"
    assert all_files(tmp_path) - before == set(), "no file was created"
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("data", [b"dispatch %ff\n", b"register 127.0.0.1 %C2%B2\n"], ids=["bad-escape", "superscript-port"])
def test_dispatcher_answers_err_to_undecodable_fields(ci, data):
    dispatcher = ci.start_dispatcher()
    address = wire.parse_address(ci.address)
    offset = len(dispatcher.log())
    line = first_reply_line(address, data)
    # Still serving, whatever happened.
    assert client.communicate(address, protocol.request("status"), timeout=10).verb == "OK"
    assert line.startswith(b"ERR "), "got %r" % line
    wait_until(lambda: " WARNING " in dispatcher.log()[offset:], timeout=10, message="a warning")
    assert "Traceback" not in dispatcher.log()


@pytest.mark.parametrize("line", [b"status ", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12 ", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12   "])
def test_trailing_spaces_are_tolerated(line):
    """People type requests by hand (nc); a trailing space is not worth an error."""
    message, _ = decode_header(line, REQUESTS)
    assert message.verb == line.split()[0].decode()


def test_a_reply_given_a_byte_at_a_time_is_cut_off_at_the_callers_total_timeout():
    """A peer that starts its reply at once and then trickles it would hold a caller
    for MESSAGE_DEADLINE_S (120 s); with total_timeout the whole exchange is bounded."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickling_peer():
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            for byte in b"OK state=idle":
                if stop.wait(0.3):
                    return
                conn.sendall(bytes([byte]))

    peer = threading.Thread(target=trickling_peer, daemon=True)
    peer.start()
    outcome = []

    def ask():
        try:
            outcome.append(client.communicate(listener.getsockname(), protocol.request("ping"), timeout=1,
                                               total_timeout=1.5))
        except (OSError, ProtocolError) as exc:
            outcome.append(exc)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    try:
        asking.join(30)
        assert not asking.is_alive(), "still waiting: the total timeout did not hold"
        assert isinstance(outcome[0], TimeoutError), outcome
    finally:
        stop.set()
        peer.join(10)
        listener.close()
