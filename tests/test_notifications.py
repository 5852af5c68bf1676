"""Notifications with real daemons and real receivers: a webhook receiver (http.server)
that checks every signature, a notify command, a commit status receiver, an SMTP server
(aiosmtpd); one notification per change of a branch's state, none lost and none sent
twice when the dispatcher is killed between the verdict and the delivery."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import re
import threading
from email import message_from_bytes
from email.policy import default as default_policy

import pytest
from test_ctl import ctl
from test_http import ctl_json, get, metrics, start_with_http
from test_security import certificates  # noqa: F401 - a fixture

from conftest import FAILING_TEST, JOBS_AS_RUNNER, LOOPBACK, PASSING_TEST, free_port, git, wait_until

SECRET = b"webhook-secret-of-at-least-32-bytes!"
TOKEN = "status-token-123"
#: Fails the first time it runs (it leaves the file ``%r`` behind), passes after: flaky.
FLAKY_ONCE_TEST = """import os

MARK = %r


def test_flaky_once():
    if not os.path.exists(MARK):
        open(MARK, "w").close()
        raise AssertionError("fails the first time")
"""
#: Every bound in these tests: only reached when something is broken.
WAIT_S = 60.0


class Receiver:
    """A local HTTP server that records every POST; ``accept`` False answers 503."""

    def __init__(self, tls_context=None):
        self.requests: list[dict] = []
        self.accept = True
        self.refuse_with = 503  # the status of a refusal
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # every socket a timeout

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                if length > 1_000_000:
                    self.send_error(413)
                    return
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": {name.lower(): value for name, value in self.headers.items()}, "body": body,
                                              "accepted": receiver.accept})
                    accepted = receiver.accept
                self.send_response(200 if accepted else receiver.refuse_with)
                self.send_header("Content-Length", "0")
                self.send_header("Location", receiver.url + "/elsewhere")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = "%s://%s:%d" % ("https" if tls_context else "http", LOOPBACK, self.server.server_address[1])

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def accepted(self, path_prefix: str) -> list[dict]:
        with self.lock:
            return [request for request in self.requests if request["accepted"] and request["path"].startswith(path_prefix)]

    def tried(self, path_prefix: str) -> list[dict]:
        with self.lock:
            return [request for request in self.requests if request["path"].startswith(path_prefix)]


@pytest.fixture
def receiver():
    started = Receiver()
    yield started
    started.close()


def webhooks(receiver: Receiver) -> list[dict]:
    """The documents of the webhooks accepted, each signature checked."""
    documents = []
    for request in receiver.accepted("/hook"):
        expected = "sha256=" + hmac.new(SECRET, request["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request["headers"]["x-commit-ci-signature"], expected)
        document = json.loads(request["body"])
        assert request["headers"]["x-commit-ci-delivery"] == document["delivery"]
        documents.append(document)
    return documents


def changes(documents: list[dict]) -> list[tuple[str, str, str, str]]:
    return [(doc["branch"], doc["old_state"], doc["new_state"], doc["commit"]["id"]) for doc in documents]


def webhook_options(receiver: Receiver, tmp_path) -> list[str]:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    return ["--webhook", receiver.url + "/hook", "--webhook-secret-file", str(secret_file),
            "--notify-retry-cap", "1"]


def delivered_lines(ci) -> int:
    return ci.dispatcher.log().count(": delivered (try")


def test_one_signed_webhook_command_run_and_status_per_change_over_pass_fail_pass_flaky_pass(ci, upstream, receiver,
                                                                                              tmp_path):
    token_file = tmp_path / "status.token"
    token_file.write_text(TOKEN + "\n")
    outbox = tmp_path / "command-out"
    outbox.mkdir()
    command = 'cat > %s/"$COMMIT_CI_DELIVERY".json' % outbox
    ci.start_dispatcher(*webhook_options(receiver, tmp_path), "--notify-command", command,
                        "--status-url", receiver.url + "/statuses/{sha}", "--status-token-file", str(token_file),
                        "--results-url", "https://ci.example/results/", "--flaky-reruns", "1")
    ci.start_runner(*JOBS_AS_RUNNER)
    ci.start_observer()
    base = upstream.head()
    assert ci.wait_result(base)["status"] == "passed"
    commits = {"base": base}
    steps = [("fail", {"test_fails.py": FAILING_TEST}, "failed"),
             ("pass", {"test_fails.py": None}, "passed"),
             ("flaky", {"test_flaky.py": FLAKY_ONCE_TEST % str(tmp_path / "flaky-mark")}, "flaky"),
             ("again", {"test_more.py": PASSING_TEST.replace("passes", "more")}, "passed")]
    for name, files, verdict in steps:
        commits[name] = upstream.commit(files, name)
        assert ci.wait_result(commits[name])["status"] == verdict, name

    expected = [("main", "green", "red", commits["fail"]), ("main", "red", "green", commits["pass"]),
                ("main", "green", "flaky", commits["flaky"]), ("main", "flaky", "green", commits["again"])]
    wait_until(lambda: len(webhooks(receiver)) >= 4, WAIT_S, message="4 webhooks")
    # Every status too (pending and verdict of 5 commits), then stop: nothing more comes after.
    wait_until(lambda: len(receiver.accepted("/statuses/")) >= 10, WAIT_S, message="10 statuses")
    wait_until(lambda: len(list(outbox.iterdir())) >= 4, WAIT_S, message="4 command runs")
    ci.dispatcher.terminate()
    documents = webhooks(receiver)
    assert changes(documents) == expected
    assert len({doc["delivery"] for doc in documents}) == 4
    red = documents[0]
    assert red["failing_tests"] == ["test_fails.py::test_fails"] and red["commit"]["status"] == "failed"
    assert red["links"]["report"] == "https://ci.example/results/" + commits["fail"]
    assert documents[2]["flaky_tests"] == ["test_flaky.py::test_flaky_once"]

    # The command got the same documents on its stdin, one run per change.
    ran = sorted((json.loads(path.read_text()) for path in outbox.iterdir()), key=lambda doc: documents.index(
        next(other for other in documents if other["new_state"] == doc["new_state"] and
             other["commit"]["id"] == doc["commit"]["id"])))
    assert changes(ran) == expected
    assert {path.name for path in outbox.iterdir()} == {doc["delivery"] + ".json" for doc in ran}

    # A status per commit: pending when it started, then its verdict, as Gitea names them.
    statuses: dict[str, list[str]] = {}
    for request in receiver.accepted("/statuses/"):
        assert request["headers"]["authorization"] == "token " + TOKEN
        body = json.loads(request["body"])
        assert body["context"] == "commit-ci"
        statuses.setdefault(request["path"].rsplit("/", 1)[1], []).append(body["state"])
    assert statuses == {commits["base"]: ["pending", "success"], commits["fail"]: ["pending", "failure"],
                        commits["pass"]: ["pending", "success"], commits["flaky"]: ["pending", "success"],
                        commits["again"]: ["pending", "success"]}


def test_a_dispatcher_killed_between_the_verdict_and_the_delivery_sends_it_once_after_the_restart(ci, upstream,
                                                                                                   receiver, tmp_path):
    port = start_with_http(ci, *webhook_options(receiver, tmp_path))
    ci.start_runner()
    ci.start_observer()
    assert ci.wait_result(upstream.head())["status"] == "passed"
    receiver.accept = False
    failing = upstream.commit({"test_fails.py": FAILING_TEST}, "breaks main")
    assert ci.wait_result(failing)["status"] == "failed"
    ci.dispatcher.wait_for_log(r"notification \w+ \(commit %s: branch main green -> red\) to webhook .*: try 1 failed: "
                               r"HTTP 503" % failing)
    assert metrics(port)[("ci_notifications_pending", ())] == 1
    # The operator sees what waits, and why: ci-ctl, not the unauthenticated HTTP port.
    outbox = ctl_json(ci, "notifications")
    assert outbox["pending"] == 1
    waiting = outbox["notifications"][0]
    assert (waiting["state"], waiting["event"], waiting["branch"], waiting["old_state"], waiting["new_state"],
            waiting["commit"]) == ("waiting", "branch", "main", "green", "red", failing)
    assert waiting["channel"].startswith("webhook ") and waiting["tries"] >= 1 and waiting["next_try_at"]
    assert waiting["last_error"].startswith("HTTP 503") and waiting["done_at"] is None
    listed = ctl(ci.address, "notifications").stdout
    assert listed.startswith("1 notification waiting to be sent\n"), listed
    assert re.search(r"waiting +webhook \w+ +branch main green -> red \(commit %s\) +\d+ tr(y|ies), next try "
                     r"(in \d+ s|now), last error: HTTP 503" % failing[:12], listed), listed
    assert get(port, "/api/notifications")[0] == 404
    ci.dispatcher.kill()
    receiver.accept = True
    offset = len(ci.dispatcher.log())
    ci.restart_dispatcher()
    wait_until(lambda: len(webhooks(receiver)) == 1, WAIT_S, message="the webhook, after the restart")
    port = int(ci.dispatcher.wait_for_log(r"HTTP on http://127\.0\.0\.1:(\d+)/", after=offset).group(1))
    wait_until(lambda: metrics(port)[("ci_notifications_pending", ())] == 0, WAIT_S,
               message="no notification pending once delivered")
    outbox = ctl_json(ci, "notifications")
    assert outbox["pending"] == 0
    assert [(entry["state"], entry["delivery"], entry["next_try_at"] is None, entry["done_at"] is not None)
            for entry in outbox["notifications"]] == [("delivered", waiting["delivery"], True, True)]

    fixed = upstream.commit({"test_fails.py": None}, "fixes main")
    assert ci.wait_result(fixed)["status"] == "passed"
    wait_until(lambda: len(webhooks(receiver)) == 2, WAIT_S, message="the second webhook")
    ci.dispatcher.terminate()
    documents = webhooks(receiver)
    assert changes(documents) == [("main", "green", "red", failing), ("main", "red", "green", fixed)]
    # Every try of the first change carried the one delivery id it was sent with at last.
    tried = {request["headers"]["x-commit-ci-delivery"] for request in receiver.tried("/hook")}
    assert tried == {doc["delivery"] for doc in documents}


def test_a_real_smtp_server_gets_the_mail_with_the_commits_subject(ci, upstream, tmp_path):
    controller_module = pytest.importorskip("aiosmtpd.controller")
    received: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    port = free_port()
    controller = controller_module.Controller(Handler(), hostname=LOOPBACK, port=port)
    controller.start()
    try:
        clone = upstream.clone(tmp_path / "dispatcher-clone")
        ci.start_dispatcher("--smtp-host", LOOPBACK, "--smtp-port", str(port), "--smtp-tls", "off",
                            "--mail-from", "ci@example.invalid", "--mail-to", "team@example.invalid",
                            "--mail-to", "lead@example.invalid", "--repo", str(clone), "--flaky-reruns", "0")
        ci.start_runner()
        ci.start_observer()
        assert ci.wait_result(upstream.head())["status"] == "passed"
        failing = upstream.commit({"test_fails.py": FAILING_TEST}, "Break <the> build\u00e9", author="Ann <ann@x.invalid>")
        assert ci.wait_result(failing)["status"] == "failed"
        wait_until(lambda: received, WAIT_S, message="the mail")
        ci.dispatcher.wait_for_log(r"to mail to .*: delivered")
    finally:
        controller.stop()
    [(sender, recipients, content)] = received
    assert sender == "ci@example.invalid" and recipients == ["team@example.invalid", "lead@example.invalid"]
    mail = message_from_bytes(content, policy=default_policy)
    # (Folded for its encoded word: compared with its white space made single.)
    assert " ".join(mail["Subject"].split()) == "[commit-ci] main is red (was green) at %s Break <the> build\u00e9" % failing[:12]
    body = mail.get_content()
    assert "commit:        %s" % failing in body and "author:        Ann" in body
    assert "test_fails.py::test_fails" in body
    delivery = mail["X-Commit-CI-Delivery"]
    assert mail["Message-ID"] == "<%s@commit-ci>" % delivery
    assert git(upstream.path, "log", "-1", "--format=%s") == "Break <the> build\u00e9"


# --- the channels alone ------------------------------------------------------------------

STATUS_DOCUMENT = {"event": "status", "state": "failed", "delivery": "d1",
                   "commit": {"id": "a" * 40, "failed": 2, "passed": 3},
                   "links": {"report": "https://ci.example/results/" + "a" * 40}}


@pytest.mark.parametrize("style, state, auth", [
    ("gitea", "failure", ("authorization", "token t0k")),
    ("github", "failure", ("authorization", "Bearer t0k")),
    ("gitlab", "failed", ("private-token", "t0k")),
])
def test_a_commit_status_speaks_each_apis_body(receiver, style, state, auth):
    from commit_ci.notify import StatusChannel

    StatusChannel(receiver.url + "/api/{sha}/statuses", "t0k", style, "ci/tests", 5).send(STATUS_DOCUMENT, "d1")
    [request] = receiver.accepted("/api/")
    assert request["path"] == "/api/%s/statuses" % ("a" * 40)
    assert request["headers"][auth[0]] == auth[1]
    body = json.loads(request["body"])
    assert body["state"] == state and body["target_url"] == STATUS_DOCUMENT["links"]["report"]
    assert body["context" if style != "gitlab" else "name"] == "ci/tests"
    assert body["description"] == "failed: 3 passed, 2 failed"


def test_a_refused_or_redirected_post_and_a_failing_or_slow_command_are_not_delivered(receiver, tmp_path, monkeypatch):
    from commit_ci.notify import CommandChannel, DeliveryError, WebhookChannel

    receiver.accept = False
    with pytest.raises(DeliveryError, match="HTTP 503"):
        WebhookChannel(receiver.url + "/hook", SECRET, 5).send({"event": "branch"}, "d2")
    receiver.refuse_with = 307
    with pytest.raises(DeliveryError, match="HTTP 307"):
        WebhookChannel(receiver.url + "/hook", SECRET, 5).send({"event": "branch"}, "d2")
    assert [request["path"] for request in receiver.tried("/")] == ["/hook", "/hook"], "the redirect not followed"
    with pytest.raises(DeliveryError, match="exited with 3: no"):
        CommandChannel("cat >/dev/null; echo no; exit 3", 5).send({"event": "branch"}, "d3")
    with pytest.raises(DeliveryError, match="ran over 0 s: killed"):
        CommandChannel("sleep 30", 0.3).send({"event": "branch"}, "d4")
    out = tmp_path / "stdin.json"
    monkeypatch.setenv("CI_SECRET", "the dispatcher's own")
    CommandChannel('cat > %s; test "$COMMIT_CI_DELIVERY" = d5 && test -z "$CI_SECRET"' % out, 5).send(
        {"event": "branch", "n": 1}, "d5")
    assert json.loads(out.read_text()) == {"event": "branch", "n": 1}


def test_backoff_doubles_up_to_its_cap_and_bad_set_ups_are_refused(tmp_path):
    from commit_ci import dispatcher, notify

    assert [notify.backoff(tries, 10) for tries in (1, 2, 3, 4, 5, 50)] == [1, 2, 4, 8, 10, 10]
    short = tmp_path / "short"
    short.write_text("too short")
    for argv, message in [(["--webhook", "http://127.0.0.1:1/"], "--webhook needs --webhook-secret-file"),
                          (["--webhook", "ftp://x/", "--webhook-secret-file", str(short)], "at least"),
                          (["--smtp-host", "localhost"], "both --smtp-host and --mail-to"),
                          (["--status-url", "https://x.example/statuses"], "--status-url needs"),
                          (["--status-url", "https://x.example/s", "--status-token-file", str(short)], "{sha}")]:
        with pytest.raises(ValueError, match=message):
            notify.channels_from_arguments(dispatcher.build_parser().parse_args(argv))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with pytest.raises(ValueError, match="no user or password in the URL"):
        notify.channels_from_arguments(dispatcher.build_parser().parse_args(
            ["--webhook", "https://u:p@x.example/", "--webhook-secret-file", str(secret)]))


def test_mail_over_starttls_with_a_login(certificates):  # noqa: F811 - the fixture imported above
    """STARTTLS to a server whose certificate the CA file vouches for, then AUTH: as a team's server wants."""
    import ssl

    from commit_ci.notify import DeliveryError, MailChannel

    controller_module = pytest.importorskip("aiosmtpd.controller")
    smtp_module = pytest.importorskip("aiosmtpd.smtp")
    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            received.append((session.authenticated, envelope.content))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, smtp_module.LoginPassword) and (auth_data.login, auth_data.password) == (b"ci", b"pw")
        return smtp_module.AuthResult(success=ok)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificates["cert"]), str(certificates["key"]))
    port = free_port()
    controller = controller_module.Controller(Handler(), hostname=LOOPBACK, port=port, tls_context=context,
                                              require_starttls=True, authenticator=authenticator, auth_required=True)
    controller.start()
    try:
        document = {"event": "branch", "branch": "main", "old_state": "green", "new_state": "red",
                    "commit": {"id": "b" * 40}}
        MailChannel(LOOPBACK, port, "starttls", "ci", "pw", "ci@example.invalid", ["team@example.invalid"], 10,
                    str(certificates["ca"])).send(document, "d6")
        # (aiosmtpd answers a wrong password by never answering: a short timeout.)
        with pytest.raises(DeliveryError, match="SMTP"):
            MailChannel(LOOPBACK, port, "starttls", "ci", "wrong", "ci@example.invalid", ["team@example.invalid"], 1,
                        str(certificates["ca"])).send(document, "d7")
        with pytest.raises(OSError):  # ssl.SSLCertVerificationError: the system's CAs do not know ours
            MailChannel(LOOPBACK, port, "starttls", "ci", "pw", "ci@example.invalid", ["team@example.invalid"], 10,
                        None).send(document, "d8")
    finally:
        controller.stop()
    [(authenticated, content)] = received
    assert authenticated and b"main is red (was green)" in content


def test_an_https_webhook_trusts_the_ca_file_it_is_given(certificates):  # noqa: F811 - the fixture imported above
    import ssl

    from commit_ci.notify import DeliveryError, WebhookChannel

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificates["cert"]), str(certificates["key"]))
    receiver = Receiver(context)
    try:
        WebhookChannel(receiver.url + "/hook", SECRET, 5, str(certificates["ca"])).send({"event": "branch"}, "d9")
        with pytest.raises(DeliveryError, match="cannot reach https://127.0.0.1:%d: .*CERTIFICATE_VERIFY_FAILED"
                           % receiver.server.server_address[1]):
            WebhookChannel(receiver.url + "/hook", SECRET, 5).send({"event": "branch"}, "d10")
        [request] = receiver.accepted("/hook")
        assert request["headers"]["x-commit-ci-delivery"] == "d9"
        assert request["headers"]["x-commit-ci-signature"] == "sha256=" + hmac.new(
            SECRET, request["body"], hashlib.sha256).hexdigest()
    finally:
        receiver.close()
