"""Keys per role and per runner: the five-field ``auth`` line, the keys file, the roles
the dispatcher enforces, ``ci-ctl key``, revocation.

The first half checks the pieces on their own (sockets in pairs, files in tmp_path);
the second runs a real dispatcher with a keys file, real runners holding keys of
their own, and clients holding keys stolen from them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time

import pytest
from test_ctl import ctl

from commit_ci import keys as keys_module
from commit_ci import protocol, security
from commit_ci.client import communicate
from commit_ci.keys import Keyring, KeysFileError, key_line, new_key, parse_keys
from commit_ci.protocol import REPLIES, REQUESTS, MessageStream, encode, may_send, reply, request
from commit_ci.security import Authenticator, Key, Security, key_from_secret
from commit_ci.wire import ProtocolError, Refused, parse_address

from conftest import ROOT, WAITS_FOR_FLAG_TEST, make_keys, wait_until

SHA = "abcdef12" * 5
SHARED = b"the-shared-secret-of-a-small-set-up"


# --- the auth line with a key's name -----------------------------------------------------


def signed(auth: Authenticator, message, request_nonce=None, key=None) -> bytes:
    data = encode(message, REPLIES if request_nonce else REQUESTS)
    line, _ = auth.sign("reply" if request_nonce else "request", data, request_nonce, key)
    return line + data


def read_from(data: bytes, auth: Authenticator, table=REQUESTS, request_nonce=None):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        return MessageStream(right, auth).read_message(table, first_byte_timeout=5, request_nonce=request_nonce)


@pytest.fixture
def keyring(tmp_path) -> Keyring:
    """A keyring with the shared secret and a key of each role."""
    path = tmp_path / "keys"
    path.write_text("".join(key_line(new_key(name, role)) for name, role in
                            (("build-box:8900", "runner"), ("watcher", "observer"), ("admin", "operator"))))
    ring = Keyring(str(path), shared=Key(SHARED))
    ring.load()
    return ring


def test_a_named_key_signs_with_five_fields_and_its_tag_is_the_hmac_docs_protocol_md_describes(monkeypatch):
    monkeypatch.setattr(security.os, "urandom", lambda size: bytes(range(size)))
    key = Key(bytes(range(32)), "build-box:8900")
    line, nonce = Authenticator(key, clock=lambda: 1700000000.5).sign("request", b"status\n")
    tag = hmac.new(bytes(range(32)), b"ci-auth-2|build-box:8900|request|1700000000500|%s|-|status\n" % nonce.encode(),
                   hashlib.sha256).hexdigest()
    assert line == b"auth build-box:8900 1700000000500 %s %s\n" % (nonce.encode(), tag.encode())
    assert security.parse_auth_line(line[:-1]) == ("1700000000500", nonce, tag, "build-box:8900")


@pytest.mark.parametrize("line", [
    b"auth  1 " + b"0" * 32 + b" " + b"f" * 64,  # an empty name
    b"auth bad/name 1 " + b"0" * 32 + b" " + b"f" * 64,
    b"auth " + b"n" * 129 + b" 1 " + b"0" * 32 + b" " + b"f" * 64,
    b"auth caf\xc3\xa9 1 " + b"0" * 32 + b" " + b"f" * 64,
    b"auth a b 1 " + b"0" * 32 + b" " + b"f" * 64,
])
def test_auth_lines_with_a_bad_key_name_are_malformed(line):
    assert security.parse_auth_line(line) is None
    with pytest.raises(ProtocolError, match="malformed auth line"):
        Authenticator(SHARED).begin("request", line, None)


def test_the_tag_binds_the_key_name(tmp_path):
    # Two keys with the same secret: only the name tells them apart, and the tag covers it.
    secret = bytes(range(32))
    path = tmp_path / "keys"
    path.write_text("alice observer %s\nmallory operator %s\n" % (secret.hex(), secret.hex()))
    ring = Keyring(str(path))
    ring.load()
    data = signed(Authenticator(Key(secret, "alice")), request("dispatch", commit=SHA))
    assert read_from(data, Authenticator(ring)).key.name == "alice"
    renamed = data.replace(b"auth alice ", b"auth mallory ", 1)
    with pytest.raises(ProtocolError, match="authentication failed"):
        read_from(renamed, Authenticator(ring))


def test_an_unknown_key_is_refused_and_the_four_field_form_still_means_the_shared_secret(keyring):
    receiver = Authenticator(keyring)
    message = request("dispatch", commit=SHA)
    with pytest.raises(ProtocolError, match="unknown key stranger"):
        read_from(signed(Authenticator(Key(bytes(32), "stranger")), message), receiver)
    shared = read_from(signed(Authenticator(SHARED), message), receiver)
    assert shared.verb == "dispatch" and shared.key.shared
    watcher = read_from(signed(Authenticator(keyring.lookup("watcher")), message), receiver)
    assert (watcher.key.name, watcher.key.role) == ("watcher", "observer")
    # Without a shared secret, the four-field form is refused.
    only_keys = Keyring(keyring.path)
    only_keys.load()
    with pytest.raises(ProtocolError, match="shared secret is not accepted here"):
        read_from(signed(Authenticator(SHARED), message), Authenticator(only_keys))


def test_a_daemon_holding_a_key_accepts_that_key_alone(keyring):
    own = keyring.lookup("build-box:8900")
    runner = Authenticator(Key(own.secret, own.name))  # as the runner reads it from its token
    ping = request("ping")
    assert read_from(signed(Authenticator(keyring), ping, key=own), runner).key.name == own.name
    for other in (Authenticator(SHARED), Authenticator(keyring.lookup("admin"))):
        with pytest.raises(ProtocolError, match="unknown key admin|shared secret is not accepted"):
            read_from(signed(other, ping), runner)


def test_a_reply_is_signed_with_the_key_of_its_request_and_checked_for_it(keyring):
    watcher = keyring.lookup("watcher")
    client = Authenticator(watcher)
    server = Authenticator(keyring)
    left, right = socket.socketpair()
    with left, right:
        client_side, server_side = MessageStream(left, client), MessageStream(right, server)
        nonce = client_side.write_message(request("dispatch", commit=SHA), REQUESTS)
        received = server_side.read_message(REQUESTS, first_byte_timeout=5)
        server_side.write_message(reply("OK", new=1), REPLIES, request_nonce=received.nonce, key=received.key)
        answer = client_side.read_message(REPLIES, first_byte_timeout=5, request_nonce=nonce)
    assert answer.verb == "OK" and answer.key == watcher
    # The same reply signed with another key the server has is refused.
    for other in (keyring.lookup("admin"), keyring.shared):
        with pytest.raises(ProtocolError, match="unknown key admin|shared secret is not accepted"):
            read_from(signed(server, reply("OK", new=1), request_nonce="0" * 32, key=other), client, REPLIES,
                      request_nonce="0" * 32)


def test_key_tokens():
    key = new_key("build-box:8900", "runner")
    token = key.token
    assert token == "ci-key:build-box:8900:" + key.secret.hex()
    assert key_from_secret(token.encode()) == Key(key.secret, "build-box:8900")
    assert key_from_secret(b"an-old-shared-secret-of-some-length").shared
    for bad in (b"ci-key:" + b"n" * 129 + b":" + b"0" * 64, b"ci-key:a/b:" + b"0" * 64, b"ci-key::" + b"0" * 64,
                b"ci-key:box:" + b"0" * 63, b"ci-key:box:" + b"A" * 64, b"ci-key:box", b"ci-key:b\xc3\xa9:" + b"0" * 64):
        with pytest.raises(ValueError):
            key_from_secret(bad)
    assert "secret" not in repr(key) and key.secret.hex() not in repr(key)


def test_a_new_secret_travels_hidden_with_the_askers_key():
    asker, other = Key(bytes(range(32)), "admin"), Key(bytes(range(1, 33)), "admin")
    secret = os.urandom(32)
    wrapped = security.wrap_secret(asker, "salt-1", secret)
    assert secret.hex() not in wrapped
    assert security.unwrap_secret(asker, "salt-1", wrapped) == secret
    assert security.unwrap_secret(other, "salt-1", wrapped) != secret
    assert security.wrap_secret(asker, "salt-2", secret) != wrapped


def test_every_dispatcher_verb_says_which_roles_may_send_it():
    runner_verbs = {"ping", "runtest", "stop", "fetch"}
    for name, verb in REQUESTS.items():
        assert bool(verb.roles) == (name not in runner_verbs), name
    runner, observer, operator = (Key(bytes(32), "k", role) for role in security.ROLES)
    assert [verb for verb in REQUESTS if verb not in runner_verbs and may_send(runner, verb)] == [
        "register", "results", "live-log"]
    assert [verb for verb in REQUESTS if verb not in runner_verbs and may_send(observer, verb)] == ["dispatch"]
    assert {verb for verb in REQUESTS if may_send(operator, verb)} == {
        "status", "dispatch", "queue", "branches", "runners", "recent", "lookup", "flaky", "notifications", "tail",
        "key-add", "key-revoke", "key-list", "rerun", "cancel"}
    assert all(may_send(Key(SHARED), verb) and may_send(None, verb) for verb in REQUESTS)


# --- the keys file -------------------------------------------------------------------------


def test_keys_file_lines_bad_lines_and_names_given_twice():
    good, twice = new_key("r1", "runner"), new_key("dup", "observer")
    text = "# a comment\n\n" + key_line(good) + key_line(twice) + key_line(twice) + (
        "r2 runner\nr3 admin %s\nr4 runner %s\nr5 runner %s\n" % ("0" * 64, "0" * 62, "A" * 64))
    keys, problems = parse_keys(text, "keys")
    assert keys == {"r1": good}
    assert [problem.split(":")[0] for problem in problems] == [
        "keys line 5", "keys line 6", "keys line 7", "keys line 8", "keys line 9"]
    assert "dup is there twice" in problems[0] and "invalid role 'admin'" in problems[2]


def test_the_keyring_writes_the_file_whole_with_mode_0600_and_keeps_hand_written_lines(tmp_path):
    path = tmp_path / "keys"
    ring = Keyring(str(path))
    ring.load()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and ring.keys() == []
    with path.open("a") as handle:
        handle.write("# added by hand: the build farm\n")
    runner = ring.add("farm-1", "runner")
    operator = ring.add("admin", "operator")
    with pytest.raises(ValueError, match="exists already"):
        ring.add("farm-1", "observer")
    text = path.read_text()
    assert "# added by hand: the build farm\n" in text and key_line(runner) in text and key_line(operator) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [key.name for key in ring.keys()] == ["admin", "farm-1"]
    assert ring.revoke("farm-1") == runner
    with pytest.raises(KeyError):
        ring.revoke("farm-1")
    assert ring.lookup("farm-1") is None and key_line(runner) not in path.read_text()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]

    # A hand edit is read at the next look, a bad line costs that line alone.
    generation = ring.generation
    path.write_text(path.read_text() + key_line(new_key("late", "observer")) + "broken line\n")
    ring.refresh(wait=True)
    assert [key.name for key in ring.keys()] == ["admin", "late"] and ring.generation == generation + 1
    # At start-up a bad line is an error: better not to start than to start without keys.
    with pytest.raises(KeysFileError, match="line .*: want NAME ROLE SECRET"):
        Keyring(str(path)).load()
    path.unlink()
    ring.refresh(wait=True)
    assert ring.lookup("admin") is None, "a keys file that is gone holds no keys"


# --- a live dispatcher with a keys file ---------------------------------------------------


def holding(key_file) -> Security:
    """What a client holding the key in ``key_file`` talks with."""
    return Security(auth=Authenticator(security.read_key(str(key_file))))


def send(address, key_file, message) -> tuple[str, str]:
    """The verb and reason of the dispatcher's answer to ``message`` signed with the key in
    ``key_file``; a refusal before authentication (an unknown key) counts as ERR."""
    try:
        answer = communicate(address, message, security=holding(key_file), timeout=5)
    except Refused as exc:
        return "ERR", str(exc)
    return answer.verb, answer.get("reason") or ""


def query(address, key_file, verb, **fields) -> dict:
    answer = communicate(address, request(verb, **fields), security=holding(key_file), timeout=5)
    assert answer.verb == "OK", answer
    return json.loads(answer.sections["json"])


def refused_within(limit: float, probe) -> float:
    """Seconds until ``probe()`` (a (verb, reason) pair) is an ERR; fails past ``limit``."""
    started = time.monotonic()
    wait_until(lambda: probe()[0] == "ERR", limit, interval=0.02, message="a refusal")
    return time.monotonic() - started


@pytest.fixture
def keyed(ci, tmp_path):
    """A dispatcher with a keys file and no shared secret; the files of its keys."""
    keys_file, files = make_keys(tmp_path / "keys", {"admin": "operator", "watcher": "observer", "r1": "runner",
                                                    "r2": "runner"})
    ci.start_dispatcher("--keys-file", str(keys_file), "--heartbeat-interval", "0.5")
    return keys_file, files


def test_a_stolen_runner_key_speaks_for_its_own_runner_alone(ci, upstream, keyed, tmp_path):
    keys_file, files = keyed
    address = parse_address(ci.address)
    assert "messages authenticated with the keys of %s" % keys_file in ci.dispatcher.log()
    runner = ci.start_runner("--secret-file", str(files["r2"]))
    runner.wait_for_log(r"registered with dispatcher \S+ as r2")
    flag = tmp_path / "release"
    sha = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "a test that waits")
    assert send(address, files["watcher"], request("dispatch", commit=sha)) == ("OK", "")
    runner.wait_for_log(r"commit %s attempt \d+: testing" % sha)
    [running] = query(address, files["admin"], "queue")["running"]
    assert (running["commit"], running["runner"]) == (sha, "r2")
    attempt = running["attempt"]

    # The thief holds r1's key: a result for r2's attempt is refused and logged.
    offset = len(ci.dispatcher.log())
    stolen = files["r1"]
    forged = request("results", commit=sha, attempt=attempt, status="failed", failed=1, log=b"forged")
    assert send(address, stolen, forged) == (
        "ERR", "attempt %d of commit %s was given to another runner, not to r1" % (attempt, sha))
    ci.dispatcher.wait_for_log(r"commit %s attempt %d: failed result from \S+ \(key r1\) refused: the attempt is "
                               r"runner r2's" % (sha, attempt), after=offset)
    # Nor may it dispatch, register under another name, or use an operator's verbs.
    stranger = upstream.commit({}, "never dispatched")
    for message, reason in [
        (request("dispatch", commit=stranger), "key r1 (role runner) may not send dispatch"),
        (request("register", host="127.0.0.1", port=1, name="r2"), "key r1 may register only as the runner named r1"),
        (request("register", host="127.0.0.1", port=1), "key r1 may register only as the runner named r1"),
        (request("status"), "may not send status"),
        (request("queue"), "may not send queue"),
        (request("runners"), "may not send runners"),
        (request("recent"), "may not send recent"),
        (request("lookup", commit=sha), "may not send lookup"),
        (request("key-list"), "may not send key-list"),
        (request("key-add", name="r1-admin", role="operator"), "may not send key-add"),
        (request("key-revoke", name="r2"), "may not send key-revoke"),
    ]:
        verb, answer = send(address, stolen, message)
        assert verb == "ERR" and reason in answer, (message.verb, answer)
    # Nothing changed: the job still runs on r2, no result, no new job, r2 still registered.
    job = query(address, files["admin"], "lookup", commit=sha)
    assert (job["state"], job["runner"], job["attempt"]) == ("running", "r2", attempt)
    assert ci.result(sha) is None
    assert send(address, files["admin"], request("lookup", commit=stranger)) == ("ERR", "unknown commit %s" % stranger)
    assert [(r["name"], r["state"]) for r in query(address, files["admin"], "runners")["runners"]] == [("r2", "busy")]
    assert [key["name"] for key in query(address, files["admin"], "key-list")["keys"]] == ["admin", "r1", "r2",
                                                                                          "watcher"]

    # The real runner's result is accepted.
    flag.touch()
    result = ci.wait_result(sha)
    assert (result["status"], result["runner"], result["attempts"]) == ("passed", "r2", 1)
    assert "forged" not in ci.report(sha)


def test_an_observer_key_dispatches_and_an_operator_key_reads_and_manages_keys(ci, upstream, keyed):
    keys_file, files = keyed
    address = parse_address(ci.address)
    sha = upstream.head()
    observer, operator = files["watcher"], files["admin"]

    assert send(address, observer, request("dispatch", commit=sha)) == ("OK", "")
    for message in [request("status"), request("queue"), request("runners"), request("recent"),
                    request("lookup", commit=sha), request("register", host="127.0.0.1", port=1, name="watcher"),
                    request("results", commit=sha, attempt=1, status="passed"), request("key-list"),
                    request("key-add", name="w2", role="observer"), request("key-revoke", name="admin")]:
        verb, reason = send(address, observer, message)
        assert (verb, reason) == ("ERR", "key watcher (role observer) may not send %s" % message.verb), reason

    assert send(address, operator, request("status"))[0] == "OK"
    assert [job["commit"] for job in query(address, operator, "queue")["queued"]] == [sha]
    assert query(address, operator, "runners") == {"runners": []}
    assert query(address, operator, "recent") == {"results": []}
    assert query(address, operator, "lookup", commit=sha[:12])["state"] == "queued"
    assert send(address, operator, request("dispatch", commit=upstream.commit({}, "by hand")))[0] == "OK"
    listed = query(address, operator, "key-list")
    assert listed == {"shared_secret": False, "keys": [{"name": "admin", "role": "operator"},
                                                       {"name": "r1", "role": "runner"},
                                                       {"name": "r2", "role": "runner"},
                                                       {"name": "watcher", "role": "observer"}]}
    for message in [request("register", host="127.0.0.1", port=1, name="admin"),
                    request("results", commit=sha, attempt=1, status="passed")]:
        assert send(address, operator, message) == ("ERR", "key admin (role operator) may not send %s" % message.verb)

    # A key made by the dispatcher comes back hidden with the operator's key, and works.
    made = query(address, operator, "key-add", name="w2", role="observer")
    assert (made["name"], made["role"]) == ("w2", "observer")
    secret = security.unwrap_secret(security.read_key(str(operator)), made["salt"], made["wrapped"])
    assert secret.hex() in keys_file.read_text() and made["wrapped"] not in keys_file.read_text()
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    w2 = keys_file.parent / "w2.key"
    w2.write_text(Key(secret, "w2").token)
    assert send(address, w2, request("dispatch", commit=upstream.commit({}, "by w2")))[0] == "OK"
    assert send(address, operator, request("key-add", name="w2", role="runner")) == (
        "ERR", "a key named w2 exists already (revoke it first)")
    assert send(address, operator, request("key-revoke", name="w2")) == ("OK", "")
    assert send(address, w2, request("dispatch", commit=sha)) == (
        "ERR", "%s: refused: unknown key w2 (never added, or revoked)" % ci.address)
    assert send(address, operator, request("key-revoke", name="w2")) == ("ERR", "no key named w2")
    ci.dispatcher.wait_for_log(r"key w2 \(role observer\) revoked by \S+ \(key admin\)")


def test_ctl_key_add_makes_a_key_a_runner_tests_with_and_revoking_it_drops_the_runner(ci, upstream, tmp_path):
    keys_file, files = make_keys(tmp_path / "keys", {"admin": "operator"})
    ci.start_dispatcher("--keys-file", str(keys_file), "--heartbeat-interval", "0.5")
    admin = ("--secret-file", str(files["admin"]))
    address = parse_address(ci.address)

    added = ctl(ci.address, *admin, "key", "add", "build-7", "--role", "runner")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert re.fullmatch(r"ci-key:build-7:[0-9a-f]{64}", token)
    key_file = tmp_path / "build-7.key"
    key_file.write_text(added.stdout)
    listed = ctl(ci.address, *admin, "key", "list")
    assert listed.stdout.split() == ["admin", "operator", "build-7", "runner"]
    assert token.rpartition(":")[2] not in listed.stdout + ctl(ci.address, *admin, "--json", "key", "list").stdout

    # Given another name, a runner holding the key refuses to start.
    wrong = subprocess.run([sys.executable, str(ROOT / "test_runner.py"), "--name", "other", "--secret-file",
                            str(key_file), "--dispatcher-server", ci.address, str(upstream.path)],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2
    assert "--name other differs from the name of this runner's key, build-7" in wrong.stderr

    runner = ci.start_runner("--secret-file", str(key_file))
    runner.wait_for_log(r"registered with dispatcher \S+ as build-7")
    sha = upstream.head()
    assert ctl(ci.address, *admin, "dispatch", sha).returncode == 0
    result = ci.wait_result(sha)
    assert (result["status"], result["runner"]) == ("passed", "build-7")

    # Revoked while it runs a job: the job goes back to the queue, the key is refused.
    flag = tmp_path / "release"
    slow = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "a test that waits")
    assert ctl(ci.address, *admin, "dispatch", slow).returncode == 0
    runner.wait_for_log(r"commit %s attempt \d+: testing" % slow)
    probe = request("results", commit=sha, attempt=999999, status="passed")  # harmless: an unknown attempt
    assert send(address, key_file, probe) == ("ERR", protocol.UNKNOWN_ATTEMPT)
    revoked = ctl(ci.address, *admin, "key", "revoke", "build-7")
    assert (revoked.returncode, revoked.stdout) == (0, "key build-7 revoked\n")
    assert refused_within(1.0, lambda: send(address, key_file, probe)) < 1.0
    assert "unknown key build-7" in send(address, key_file, probe)[1]
    ci.dispatcher.wait_for_log(r"runner build-7 dropped: its key build-7 was revoked")
    queue = query(address, files["admin"], "queue")
    assert (queue["running"], [job["commit"] for job in queue["queued"]]) == ([], [slow])
    assert query(address, files["admin"], "runners") == {"runners": []}
    assert ctl(ci.address, *admin, "key", "revoke", "build-7").returncode == 1
    flag.touch()
    runner.wait_for_log(r"commit %s attempt \d+: could not deliver result: .*unknown key build-7" % slow)
    assert ci.result(slow) is None


def test_a_key_removed_from_the_keys_file_by_hand_is_refused_within_a_second(ci, upstream, keyed):
    keys_file, files = keyed
    address = parse_address(ci.address)
    runner = ci.start_runner("--secret-file", str(files["r2"]))
    runner.wait_for_log(r"registered with dispatcher \S+ as r2")
    ci.dispatcher.wait_for_log(r"runner r2 answers")
    probe = request("dispatch", commit=upstream.head())
    assert send(address, files["watcher"], probe)[0] == "OK"

    # Edited in place (same file, new contents), as `cat > keys` would.
    kept = [line for line in keys_file.read_text().splitlines(keepends=True)
            if line.split()[:1] not in (["watcher"], ["r2"])]
    added = new_key("late", "observer")
    late = keys_file.parent / "late.key"
    late.write_text(added.token)
    with keys_file.open("r+") as handle:
        handle.truncate(0)
        handle.write("".join(kept) + key_line(added))
    elapsed = refused_within(1.0, lambda: send(address, files["watcher"], probe))
    print("a key removed by hand was refused after %.3f s" % elapsed)
    assert send(address, late, probe)[0] == "OK", "a key added by hand is accepted"
    ci.dispatcher.wait_for_log(r"keys file \S+ changed: 3 key\(s\); removed: r2 watcher; added: late")
    ci.dispatcher.wait_for_log(r"runner r2 dropped: its key r2 was revoked", timeout=2)


def test_the_dispatcher_refuses_to_start_on_a_bad_keys_file_or_with_a_key_for_its_secret(ci, tmp_path):
    keys_file, files = make_keys(tmp_path / "keys", {"admin": "operator"})
    with keys_file.open("a") as handle:
        handle.write("half-a-line runner\n")
    for extra, expected in [(["--keys-file", str(keys_file)], "line 6: want NAME ROLE SECRET, got 2 field(s)"),
                            (["--secret-file", str(files["admin"])], "holds a key of its own (admin)")]:
        done = subprocess.run([sys.executable, str(ROOT / "dispatcher.py"), "--port", "0", "--results-dir",
                               str(tmp_path / "results"), *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_ctl_makes_the_first_operator_key_in_the_keys_file_itself(tmp_path):
    keys_file = tmp_path / "keys"
    out = tmp_path / "admin.key"
    made = ctl("127.0.0.1:1", "key", "add", "admin", "--role", "operator", "--keys-file", str(keys_file),
               "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert made.stdout == "key admin (role operator) written to %s: give it to the daemon with --secret-file %s\n" % (
        out, out)
    key = security.read_key(str(out))
    assert (key.name, stat.S_IMODE(out.stat().st_mode), stat.S_IMODE(keys_file.stat().st_mode)) == (
        "admin", 0o600, 0o600)
    assert parse_keys(keys_file.read_text(), "keys")[0] == {"admin": Key(key.secret, "admin", "operator")}
    assert ctl("127.0.0.1:1", "key", "list", "--keys-file", str(keys_file)).stdout.split() == ["admin", "operator"]
    assert ctl("127.0.0.1:1", "key", "add", "bad/name", "--role", "runner", "--keys-file", str(keys_file)).returncode == 2
    assert ctl("127.0.0.1:1", "key", "revoke", "admin", "--keys-file", str(keys_file)).returncode == 0
    assert parse_keys(keys_file.read_text(), "keys")[0] == {}
    assert keys_module.HEADER in keys_file.read_text()
