"""Only trusted peers: message authentication, TLS, safe binding, hostile input.

The hostile-input battery runs against one live dispatcher and one live runner,
both with a shared secret, and after every case checks that each still answers,
that no file appeared outside the results folder, and that no job was lost or
changed.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commit_ci import protocol, security, wire
from commit_ci.client import communicate
from commit_ci.protocol import REPLIES, REQUESTS, MessageStream, decode_header, encode, request
from commit_ci.security import Authenticator, Security
from commit_ci.server import ProtocolServer, serve_in_thread
from commit_ci.wire import ProtocolError

from conftest import (
    PASSING_TEST,
    ROOT,
    RUNNER_ENV,
    Processes,
    Upstream,
    free_port,
    let_the_job_user_in,
    page_rows,
    wait_until,
)

SECRET = b"a-shared-secret-for-the-tests-0123456789"
SECRET_ENV = {**RUNNER_ENV, "CI_SECRET": SECRET.decode()}


# --- the authenticator on its own ------------------------------------------------------


def signed(auth: Authenticator, message, request_nonce=None) -> bytes:
    data = encode(message, REPLIES if request_nonce else REQUESTS)
    line, _ = auth.sign("reply" if request_nonce else "request", data, request_nonce)
    return line + data


def read_from(data: bytes, auth: Authenticator, table=REQUESTS, request_nonce=None):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        return MessageStream(right, auth).read_message(table, first_byte_timeout=5, request_nonce=request_nonce)


def test_signed_message_round_trip_covers_sections():
    sender, receiver = Authenticator(SECRET), Authenticator(SECRET)
    message = request("results", commit="abcdef12abcdef12abcdef12abcdef12abcdef12", attempt=3, status="passed", log=b"output \x00\xff", junit=b"<x/>")
    received = read_from(signed(sender, message), receiver)
    assert received.sections == {"log": b"output \x00\xff", "junit": b"<x/>"}
    assert received.nonce


@pytest.mark.parametrize("position", ["header", "section"])
def test_any_changed_byte_fails_authentication(position):
    data = bytearray(signed(Authenticator(SECRET), request("results", commit="abcdef12abcdef12abcdef12abcdef12abcdef12", attempt=3, status="failed",
                                                           log=b"1 failed")))
    target = data.index(b"failed") if position == "header" else data.rindex(b"1 failed")
    data[target] ^= 0x01
    with pytest.raises(ProtocolError, match="authentication failed|invalid status"):
        read_from(bytes(data), Authenticator(SECRET))


def test_wrong_secret_missing_tag_replay_and_stale_time_are_refused():
    message = request("dispatch", commit="abcdef12abcdef12abcdef12abcdef12abcdef12")
    with pytest.raises(ProtocolError, match="authentication failed"):
        read_from(signed(Authenticator(b"another-secret-of-enough-length"), message), Authenticator(SECRET))
    with pytest.raises(ProtocolError, match="authentication required"):
        read_from(encode(message, REQUESTS), Authenticator(SECRET))
    receiver = Authenticator(SECRET)
    captured = signed(Authenticator(SECRET), message)
    assert read_from(captured, receiver).verb == "dispatch"
    with pytest.raises(ProtocolError, match="replayed"):
        read_from(captured, receiver)
    an_hour_ago = Authenticator(SECRET, clock=lambda: time.time() - 3600)
    with pytest.raises(ProtocolError, match="stale"):
        read_from(signed(an_hour_ago, message), Authenticator(SECRET))


def test_reply_must_answer_this_request():
    auth = Authenticator(SECRET)
    answer = signed(auth, protocol.reply("OK", new=1), request_nonce="0" * 32)
    assert read_from(answer, auth, REPLIES, request_nonce="0" * 32).verb == "OK"
    with pytest.raises(ProtocolError, match="authentication failed"):
        read_from(answer, auth, REPLIES, request_nonce="1" * 32)


def test_secret_is_never_on_the_wire_and_short_secrets_are_refused():
    data = signed(Authenticator(SECRET), request("dispatch", commit="abcdef12abcdef12abcdef12abcdef12abcdef12"))
    assert SECRET not in data and SECRET.hex().encode() not in data
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Authenticator(b"short")


def test_bind_check():
    nothing = Security()
    security.check_bind("127.0.0.1", nothing, insecure=False)
    security.check_bind("localhost", nothing, insecure=False)
    with pytest.raises(ValueError, match="without a shared secret"):
        security.check_bind("0.0.0.0", nothing, insecure=False)
    security.check_bind("0.0.0.0", nothing, insecure=True)
    security.check_bind("0.0.0.0", Security(auth=Authenticator(SECRET)), insecure=False)


@pytest.mark.parametrize("daemon", ["dispatcher.py", "test_runner.py"])
def test_daemons_refuse_to_listen_beyond_loopback_without_a_secret(daemon, upstream):
    argv = [sys.executable, str(ROOT / daemon), "--host", "0.0.0.0", "--port", str(free_port())]
    if daemon == "test_runner.py":
        argv.append(str(upstream.path))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "CI_SECRET"})
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a shared secret" in done.stderr


# --- a live system with a secret -------------------------------------------------------


def start_secured(ci, extra_dispatcher=(), extra_runner=(), extra_observer=()):
    ci.dispatcher = ci.processes.start("dispatcher", ci._dispatcher_argv(0, tuple(extra_dispatcher)), env=SECRET_ENV)
    ci.port = int(ci.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    clone = ci.upstream.clone(ci.folder / "runner1-clone")
    runner = ci.processes.start("runner1", [sys.executable, str(ROOT / "test_runner.py"), "--host", "127.0.0.1",
                                            "--dispatcher-server", ci.address, *extra_runner, str(clone)], env=SECRET_ENV)
    runner.wait_for_log(r"registered with dispatcher")
    ci.runners.append(runner)
    observer_clone = ci.upstream.clone(ci.folder / "observer-clone")
    ci.observer = ci.processes.start("observer", [sys.executable, str(ROOT / "repo_observer.py"), "--dispatcher-server",
                                                  ci.address, "--interval", "0.2", *extra_observer, str(observer_clone)],
                                     env=SECRET_ENV)
    return runner


def test_authenticated_system_tests_commits_and_keeps_the_secret_out_of_ps(ci, upstream):
    runner = start_secured(ci)
    assert "messages authenticated" in ci.dispatcher.log()
    sha = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "more")
    assert ci.wait_result(sha)["status"] == "passed"
    for process in (ci.dispatcher, runner, ci.observer):
        with open("/proc/%d/cmdline" % process.pid, "rb") as handle:
            assert SECRET not in handle.read()


def test_strangers_cannot_dispatch_register_post_results_or_run_tests(ci, upstream):
    runner = start_secured(ci)
    ci.wait_result(upstream.head())
    address = wire.parse_address(ci.address)
    runner_address = ("127.0.0.1", int(re.search(r"listening on 127\.0\.0\.1:(\d+)", runner.log()).group(1)))
    forged = {"no tag": None, "wrong secret": Security(auth=Authenticator(b"not-the-shared-secret-at-all"))}
    stranger_job = "feedc0de" * 5
    for label, forged_security in forged.items():
        for target, message in [
            (address, request("dispatch", commit=stranger_job)),
            (address, request("register", host="127.0.0.1", port=1, name="intruder")),
            (address, request("results", commit=upstream.head(), attempt=1, status="failed", log=b"forged")),
            (address, request("status")),
            (runner_address, request("runtest", commit=upstream.head(), attempt=999)),
            (runner_address, request("ping")),
        ]:
            try:
                answer = communicate(target, message, security=forged_security)
                reason = answer.get("reason") if answer.verb == "ERR" else "accepted: %s" % answer
            except ProtocolError as exc:  # a client with a secret refuses an unsigned reply
                reason = str(exc)
            assert re.search("authentication (required|failed)", reason), (label, message.verb, reason)
    assert ci.result(stranger_job) is None
    assert ci.result(upstream.head())["status"] == "passed"
    assert "intruder" not in ci.dispatcher.log()
    assert "attempt 999" not in runner.log()
    assert len(re.findall(r"bad request from .*: authentication (required|failed)", ci.dispatcher.log())) == 8
    # The real peers are unaffected.
    trusted = Security(auth=Authenticator(SECRET))
    assert communicate(address, request("status"), security=trusted).get("runners") == 1


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path) -> dict[str, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it."""
    folder = tmp_path / "tls"
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=CI test CA")
    openssl("req", *curve, "-keyout", "host.key", "-out", "host.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "host.pem", "-days", "2", "-extfile", "san.ext")
    return {"ca": folder / "ca.pem", "cert": folder / "host.pem", "key": folder / "host.key"}


def test_tls_with_authentication_end_to_end(ci, upstream, certificates):
    tls = ["--tls-ca", str(certificates["ca"]), "--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"])]
    start_secured(ci, extra_dispatcher=tls, extra_runner=tls, extra_observer=["--tls-ca", str(certificates["ca"])])
    assert ", TLS)" in ci.dispatcher.log()
    sha = upstream.commit({"test_tls.py": PASSING_TEST.replace("passes", "over_tls")}, "over TLS")
    assert ci.wait_result(sha)["status"] == "passed"

    address = wire.parse_address(ci.address)
    trusted = Security(auth=Authenticator(SECRET), client_tls=security.client_tls_context(str(certificates["ca"])))
    assert communicate(address, request("status"), security=trusted).verb == "OK"
    # A plain-text client gets nothing; the dispatcher logs it and goes on serving.
    with pytest.raises((OSError, ProtocolError)):
        communicate(address, request("status"), security=Security(auth=Authenticator(SECRET)), timeout=3)
    ci.dispatcher.wait_for_log(r"TLS handshake with .* failed")
    # A client that does not trust the certificate refuses to talk.
    with pytest.raises(OSError):
        import ssl

        communicate(address, request("status"), security=Security(auth=Authenticator(SECRET),
                                                                   client_tls=ssl.create_default_context()))
    assert communicate(address, request("status"), security=trusted).verb == "OK"


def test_a_failed_tls_handshake_is_a_log_line_and_a_closed_connection(certificates, caplog):
    import logging

    serving = Security(server_tls=security.server_tls_context(str(certificates["cert"]), str(certificates["key"])))
    server = ProtocolServer(("127.0.0.1", 0), lambda message, peer: protocol.reply("OK"), logging.getLogger("test.tls"),
                            serving)
    thread = serve_in_thread(server, "test-tls")
    try:
        with caplog.at_level(logging.INFO, logger="test.tls"):
            with socket.create_connection(server.address, timeout=10) as sock:
                sock.sendall(b"status\n")
                assert sock.recv(100) == b"", "the server hangs up on a client that does not speak TLS"
            # Its thread is back in the pool once it is done with the connection, log included.
            wait_until(lambda: server._idle_threads == 1, 10, message="the connection's thread done")
        assert not server._waiting_since
        messages = [record.getMessage() for record in caplog.records]
        assert any("TLS handshake with" in message for message in messages)
        assert not any(record.exc_info for record in caplog.records), messages
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_trigger_hook_reports_over_tls_with_the_secret(processes, upstream, tmp_path, certificates):
    from test_push_trigger import install_hooks

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    dispatcher = processes.start("dispatcher", [
        sys.executable, str(ROOT / "dispatcher.py"), "--port", "0", "--results-dir", str(tmp_path / "results"),
        "--secret-file", str(secret), "--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"])])
    address = "127.0.0.1:%s" % dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    installed = install_hooks(upstream.path, address, "--branch", "main", "--secret-file", str(secret),
                              "--tls-ca", str(certificates["ca"]))
    assert installed.returncode == 0, installed.stderr

    sha = upstream.commit({}, "reported over TLS")  # the post-commit hook runs inside

    dispatcher.wait_for_log(r"commit %s queued" % sha)
    assert "bad request" not in dispatcher.log() and "TLS handshake" not in dispatcher.log()


# --- the hostile-input battery -----------------------------------------------------------


class LiveSystem:
    """One dispatcher and one runner with a secret, shared by the hostile cases."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes = Processes(folder)
        self.upstream = Upstream(folder / "upstream")
        self.results_dir = folder / "test_results"
        self.db = str(self.results_dir) + ".queue.sqlite3"
        self.dispatcher = self.processes.start("dispatcher", [
            sys.executable, str(ROOT / "dispatcher.py"), "--port", "0", "--results-dir", str(self.results_dir),
            "--heartbeat-interval", "0.5"], env=SECRET_ENV)
        port = int(self.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        self.address = ("127.0.0.1", port)
        clone = self.upstream.clone(folder / "runner-clone")
        self.runner = self.processes.start("runner", [
            sys.executable, str(ROOT / "test_runner.py"), "--dispatcher-server", "127.0.0.1:%d" % port,
            "--name", "honest", str(clone)], env=SECRET_ENV)
        self.runner_address = ("127.0.0.1", int(self.runner.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1)))
        self.runner.wait_for_log(r"registered with dispatcher")
        self.trusted = Security(auth=Authenticator(SECRET))
        self.job = self.upstream.head()
        communicate(self.address, request("dispatch", commit=self.job), security=self.trusted)
        wait_until(lambda: (self.results_dir / (self.job + ".json")).exists(), timeout=60, message="first result")
        # The results page is rebuilt up to a second after a result: until it lists the
        # job, a snapshot could catch it changing and blame the case under test.
        page = self.results_dir / "index.html"
        wait_until(lambda: page.exists() and self.job in dict(page_rows(page.read_text())), timeout=30,
                   message="the results page to list the first result")

    def snapshot(self):
        jobs = sqlite3.connect(self.db).execute("SELECT commit_id, state, summary FROM jobs ORDER BY seq").fetchall()
        files = sorted(str(path.relative_to(self.folder)) for path in self.folder.rglob("*")
                       if ".git" not in path.parts and not path.name.endswith(".log")
                       and "sqlite3" not in path.name and "clone" not in path.parts[0])
        results = {path.name: path.read_bytes() for path in self.results_dir.iterdir()}
        return jobs, files, results

    def still_serving(self) -> None:
        assert communicate(self.address, request("status"), security=self.trusted, timeout=5).verb == "OK"
        answer = communicate(self.runner_address, request("ping"), security=self.trusted, timeout=5)
        assert answer.get("state") in ("idle", "busy")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    system = LiveSystem(let_the_job_user_in(tmp_path_factory.mktemp("hostile")))
    yield system
    system.processes.stop_all()
    assert "Traceback" not in system.dispatcher.log()
    assert "Traceback" not in system.runner.log()


def raw_exchange(address, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, then read whatever comes back until the server closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on us mid-send (a 10 MB line)
        received = b""
        try:
            while len(received) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
        return received


RAW_CASES = {
    "garbage bytes": b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage\n",
    "empty line": b"\n",
    "whitespace line": b"   \t  \n",
    "unknown verb": b"launch missiles\n",
    "10 MB line": b"dispatch " + b"a" * (10 * 1024 * 1024) + b"\n",
    "unsigned dispatch": b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12\n",
    "unsigned path commit": b"dispatch ../../x\n",
    "bad auth line": b"auth 1 2 3\ndispatch abcdef12abcdef12abcdef12abcdef12abcdef12\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RAW_CASES))
@pytest.mark.parametrize("target", ["dispatcher", "runner"])
def test_raw_hostile_input_gets_err_and_changes_nothing(live, case, target):
    before = live.snapshot()
    address = live.address if target == "dispatcher" else live.runner_address
    answer = raw_exchange(address, RAW_CASES[case])
    assert answer.startswith(b"ERR "), answer[:200]
    live.still_serving()
    assert live.snapshot() == before


SIGNED_CASES = {
    # Authentic, but nonsense: these reach the parser and the handlers.
    "path commit": b"dispatch ../../x",
    "encoded path commit": b"dispatch ..%2f",
    "commit with slash": b"dispatch abc/def1",
    "results for unknown commit": b"results 0123456789abcdef0123456789abcdef01234567 1 passed",
    "results for unknown attempt": None,  # filled in from the live job
    "runner verb to dispatcher": b"runtest abcdef12abcdef12abcdef12abcdef12abcdef12 1",
    "huge section": b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=999999999999",
    "unknown verb": b"exec rm -rf /",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SIGNED_CASES))
def test_authentic_nonsense_gets_err_and_changes_nothing(live, case):
    header = SIGNED_CASES[case] or b"results %s 99999 failed" % live.job.encode()
    before = live.snapshot()
    line, _ = live.trusted.auth.sign("request", header + b"\n")
    answer = raw_exchange(live.address, line + header + b"\n")
    assert answer.startswith(b"auth ") or answer.startswith(b"ERR "), answer[:200]
    assert b"\nERR " in answer or answer.startswith(b"ERR "), answer[:200]
    live.still_serving()
    assert live.snapshot() == before
    assert not (live.folder.parent / "x").exists() and not (live.results_dir / ".." / "x").exists()


@pytest.mark.slow
def test_forged_replayed_and_stale_messages_are_refused(live):
    before = live.snapshot()
    offset = len(live.dispatcher.log())
    forged_result = b"results %s 1 failed failed=1\n" % live.job.encode()
    cases = {
        "no tag": forged_result,
        "wrong tag": b"auth %d %s %s\n" % (int(time.time() * 1000), b"0" * 32, b"f" * 64) + forged_result,
    }
    captured_line, _ = live.trusted.auth.sign("request", b"status\n")
    captured = captured_line + b"status\n"
    stale_auth = Authenticator(SECRET, clock=lambda: time.time() - 600)
    stale_line, _ = stale_auth.sign("request", forged_result)
    cases["stale timestamp"] = stale_line + forged_result
    assert raw_exchange(live.address, captured).startswith(b"auth "), "the original goes through"
    cases["replayed"] = captured
    for label, data in cases.items():
        answer = raw_exchange(live.address, data)
        assert answer.startswith(b"ERR "), (label, answer[:200])
    log = live.dispatcher.log()[offset:]
    for reason in ("authentication required", "authentication failed", "stale or future timestamp", "replayed message"):
        assert reason in log
    live.still_serving()
    assert live.snapshot() == before


@pytest.mark.slow
def test_register_for_an_address_that_does_not_answer_is_never_used(live):
    offset = len(live.dispatcher.log())
    ghost_port = free_port()
    answer = communicate(live.address, request("register", host="127.0.0.1", port=ghost_port, name="ghost"),
                         security=live.trusted)
    assert answer.verb == "OK"
    live.dispatcher.wait_for_log(r"runner ghost dropped: 3 pings unanswered", after=offset, timeout=30)
    assert "runner ghost answers" not in live.dispatcher.log()[offset:]
    assert not re.search(r"running on runner ghost", live.dispatcher.log())
    live.still_serving()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["dispatcher", "runner"])
def test_five_hundred_idle_connections_do_not_starve_a_real_client(live, target):
    address = live.address if target == "dispatcher" else live.runner_address
    idle = []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(address, timeout=5))
        verb = "status" if target == "dispatcher" else "ping"
        # Within a second, while all 500 are still connected.
        answer = communicate(address, request(verb), security=live.trusted, timeout=1.0, connect_timeout=1.0)
        assert answer.verb == "OK"
    finally:
        for sock in idle:
            sock.close()
    live.still_serving()
    assert "runner honest dropped" not in live.dispatcher.log()


# --- property test of the parser -----------------------------------------------------------


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_header_bytes_only_give_protocol_errors(data):
    for table in (REQUESTS, REPLIES):
        try:
            decode_header(data, table)
        except ProtocolError:
            pass


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"\n", b"results abcdef12abcdef12abcdef12abcdef12abcdef12 1 passed log=5 junit=3\n", b"auth 1 ", b"dispatch abcdef12abcdef12abcdef12abcdef12abcdef12\n",
                     b"OK json=4\n", b"log=", b"%ff", b"\r\n"]),
), max_size=8), st.booleans())
def test_arbitrary_streams_only_give_messages_or_protocol_errors(chunks, with_auth):
    data = b"".join(chunks)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        stream = MessageStream(right, Authenticator(SECRET) if with_auth else None)
        for _ in range(20):
            try:
                message = stream.read_message(REQUESTS, first_byte_timeout=1)
            except ProtocolError:
                break
            if message is None:
                break
            assert message.verb in REQUESTS


def test_section_bytes_arriving_at_once_are_capped_before_authentication(monkeypatch):
    """Until its last byte, a message is not authenticated: the bytes held for
    messages still arriving are capped for the whole server, and a message past the
    cap is refused at once instead of held."""
    import logging

    monkeypatch.setattr(protocol, "SECTION_BUDGET_BYTES", 1_000_000)
    server = ProtocolServer(("127.0.0.1", 0), lambda message, peer: protocol.reply("OK"), logging.getLogger("test.budget"))
    thread = serve_in_thread(server, "test-budget")
    header = b"results %s 1 passed log=600000\n" % (b"ab" * 20)
    try:
        with socket.create_connection(server.address, timeout=10) as slow:
            slow.sendall(header + b"x" * 1000)  # and the rest later
            wait_until(lambda: protocol._sections_arriving.in_use == 600_000, 10, message="the first one held")
            with socket.create_connection(server.address, timeout=10) as second:
                second.sendall(header)
                assert second.recv(200).startswith(b"ERR busy"), "refused, not held"
            slow.sendall(b"x" * 599_000)
            assert slow.recv(200).startswith(b"OK")
        wait_until(lambda: protocol._sections_arriving.in_use == 0, 10, message="given back")
        with socket.create_connection(server.address, timeout=10) as third:
            third.sendall(header + b"x" * 600_000)
            assert third.recv(200).startswith(b"OK"), "room again once the first was whole"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
