"""The push trigger: git hooks that report new commits to the dispatcher at once."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from commit_ci import protocol, push_hook, push_trigger, security, wire

from conftest import FAILING_TEST, GIT_ENV, PASSING_TEST, ROOT, CISystem, free_port, git, make_keys, module_argv

#: A push with a hook that cannot reach the dispatcher: connect fails at once on
#: loopback; this bound only matters if the hook hangs.
PUSH_TIMEOUT_S = 30.0


class ServedRepository:
    """A bare repository served from disk (what people push to), and a developer's
    clone that commits and pushes. Stands in for ``Upstream`` in ``CISystem``."""

    def __init__(self, folder: Path):
        self.path = folder / "served.git"
        git(folder, "init", "--quiet", "--bare", "--initial-branch=main", str(self.path))
        self.developer = folder / "developer"
        git(folder, "init", "--quiet", "--initial-branch=main", str(self.developer))
        git(self.developer, "remote", "add", "origin", str(self.path))
        self.commit({"test_base.py": PASSING_TEST}, "initial commit")
        self.push()

    def commit(self, files: dict[str, str], message: str) -> str:
        for name, content in files.items():
            (self.developer / name).write_text(content)
        git(self.developer, "add", "--all")
        git(self.developer, "commit", "--quiet", "--allow-empty", "-m", message)
        return git(self.developer, "rev-parse", "HEAD")

    def push(self, refspec: str = "main") -> subprocess.CompletedProcess:
        """``git push origin <refspec>``; fails the test if the push fails. The hook's
        output comes back on stderr as ``remote: ...`` lines."""
        done = subprocess.run(
            ["git", "push", "--quiet", "origin", refspec], cwd=self.developer, env={**os.environ, **GIT_ENV},
            capture_output=True, text=True, timeout=PUSH_TIMEOUT_S,
        )
        assert done.returncode == 0, "push failed: %s" % done.stderr
        return done

    def head(self) -> str:
        return git(self.path, "rev-parse", "main")

    def clone(self, destination: Path) -> Path:
        git(destination.parent, "clone", "--quiet", str(self.path), str(destination))
        return destination


def install_hooks(repo: Path, dispatcher: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        module_argv("push_trigger", "install", "--repo", str(repo), "--dispatcher-server", dispatcher,
                    *extra),
        capture_output=True, text=True, timeout=60, env=env,
    )


def hook_lines(push: subprocess.CompletedProcess) -> list[str]:
    # git pads "remote:" lines with spaces (to overwrite progress output).
    return [line.rstrip() for line in push.stderr.splitlines() if "ci-trigger" in line]


@pytest.fixture
def served(tmp_path) -> ServedRepository:
    return ServedRepository(tmp_path)


def test_post_receive_reports_pushed_commits_before_the_observer_polls(processes, served, tmp_path):
    ci = CISystem(processes, served, tmp_path)
    ci.start_dispatcher()
    ci.start_runner()
    # The observer reports the branch's tip when it starts, then not for minutes:
    # anything else reported within the test came from the hook.
    ci.start_observer("--interval", "300")
    ci.wait_result(served.head())
    installed = install_hooks(served.path, ci.address)
    assert installed.returncode == 0, installed.stderr
    for kind in ("post-receive", "post-commit"):
        hook = served.path / "hooks" / kind
        assert os.access(hook, os.X_OK) and sys.executable in hook.read_text()

    first = served.commit({"test_one.py": PASSING_TEST.replace("passes", "one")}, "first of a push")
    second = served.commit({"test_two.py": FAILING_TEST}, "second of a push")
    pushed = served.push()

    assert hook_lines(pushed) == ["remote: ci-trigger: 2 commit(s) sent to the CI dispatcher at %s (2 new)" % ci.address]
    # The hook ran before the push returned, so both are queued already: the branch's
    # tip with the first commit, ahead of it.
    queued = re.findall(r"commit ([0-9a-f]{40}) queued \(from \S+, branch main\)", ci.dispatcher.log())
    assert queued[-2:] == [second, first]
    results = ci.wait_results([first, second], timeout=60)
    assert (results[first]["status"], results[second]["status"]) == ("passed", "failed")
    assert not re.search("%s|%s" % (first, second), ci.observer.log()), "the observer has not polled again"

    # Other branches are not reported.
    side = served.commit({}, "on a side branch")
    pushed = served.push("HEAD:refs/heads/side")
    assert hook_lines(pushed) == []
    assert side not in ci.dispatcher.log()


def test_hook_and_observer_reporting_the_same_commit_make_one_job(processes, served, tmp_path):
    ci = CISystem(processes, served, tmp_path)
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer()  # polls every 0.2 s: it reports the same commit as the hook
    ci.wait_result(served.head())
    assert install_hooks(served.path, ci.address).returncode == 0

    sha = served.commit({"test_again.py": PASSING_TEST.replace("passes", "again")}, "reported twice")
    served.push()
    ci.observer.wait_for_log(r"commit %s reported" % sha)
    result = ci.wait_result(sha)

    log = ci.dispatcher.log()
    assert len(re.findall(r"commit %s queued" % sha, log)) == 1
    assert len(re.findall(r"commit %s dispatched again by \S+: already (queued|running|passed)" % sha, log)) == 1
    assert result["attempts"] == 1
    assert [name for name in ci.result_files() if name.startswith(sha)] == [sha, sha + ".json", sha + ".log", sha + ".xml"]


def test_post_commit_reports_commits_on_the_watched_branch_of_a_local_repository(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()  # and no observer at all
    assert install_hooks(upstream.path, ci.address, "--branch", "main").returncode == 0

    (upstream.path / "test_local.py").write_text(PASSING_TEST.replace("passes", "local"))
    git(upstream.path, "add", "--all")
    committed = subprocess.run(["git", "commit", "--quiet", "-m", "a local commit"], cwd=upstream.path,
                               env={**os.environ, **GIT_ENV}, capture_output=True, text=True, timeout=60)
    sha = upstream.head()

    assert committed.returncode == 0
    assert "ci-trigger: 1 commit(s) sent to the CI dispatcher at %s (1 new)" % ci.address in committed.stderr
    assert ci.wait_result(sha)["status"] == "passed"
    git(upstream.path, "checkout", "--quiet", "-b", "elsewhere")
    other = upstream.commit({}, "not on the watched branch")
    assert other not in ci.dispatcher.log()


def test_push_succeeds_with_a_warning_when_the_dispatcher_is_down(served):
    nobody = "127.0.0.1:%d" % free_port()
    assert install_hooks(served.path, nobody).returncode == 0
    sha = served.commit({}, "pushed while the CI is down")

    started = time.monotonic()
    pushed = served.push()

    assert time.monotonic() - started < 15, "the hook held the push up"
    assert served.head() == sha
    lines = hook_lines(pushed)
    assert len(lines) == 1 and lines[0].startswith("remote: ci-trigger: warning: CI dispatcher %s unreachable" % nobody)
    assert "observer will report 1 commit(s) later" in lines[0]


def test_install_leaves_foreign_hooks_alone_unless_forced(served):
    hooks = served.path / "hooks"
    (hooks / "post-commit").write_text("#!/bin/sh\necho someone else's hook\n")

    refused = install_hooks(served.path, "127.0.0.1:8888")

    assert refused.returncode == 2
    assert "not written by ci-trigger: post-commit; nothing changed" in refused.stderr
    assert not (hooks / "post-receive").exists(), "a refusal writes nothing"
    forced = install_hooks(served.path, "127.0.0.1:8888", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (hooks / "post-commit.before-ci-trigger").read_text() == "#!/bin/sh\necho someone else's hook\n"
    assert push_trigger.HOOK_MARKER in (hooks / "post-commit").read_text()
    # Ours may be rewritten without --force, for instance to point at another dispatcher.
    again = install_hooks(served.path, "127.0.0.1:9999")
    assert again.returncode == 0, again.stderr
    assert "127.0.0.1:9999" in (hooks / "post-receive").read_text()
    assert install_hooks(served.path, "127.0.0.1:8888", "--branch", "no..such").returncode == 2
    assert install_hooks(served.path, "nonsense").returncode == 2


def test_install_refuses_a_secret_the_hooks_would_not_have(served, tmp_path):
    secret = "s" * 32
    refused = install_hooks(served.path, "127.0.0.1:8888", env=dict(os.environ, CI_SECRET=secret))
    assert refused.returncode == 2
    assert "give it as a file with --secret-file" in refused.stderr
    assert not (served.path / "hooks" / "post-receive").exists()
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    kept = install_hooks(served.path, "127.0.0.1:8888", "--secret-file", str(secret_file),
                         env=dict(os.environ, CI_SECRET=secret))
    assert kept.returncode == 0, kept.stderr


def test_pushed_commits_reads_post_receive_lines(upstream, monkeypatch):
    monkeypatch.chdir(upstream.path)  # where git runs a post-receive hook
    a = upstream.head()
    b = upstream.commit({}, "b")
    c = upstream.commit({}, "c")
    zero = "0" * 40

    assert push_trigger.pushed_commits(["%s %s refs/heads/main" % (a, c)], "main") == [b, c]
    assert push_trigger.pushed_commits(["%s %s refs/heads/main" % (zero, c)], "main") == [c]  # new branch: its tip
    assert push_trigger.pushed_commits(["%s %s refs/heads/main" % (c, zero)], "main") == []  # deleted
    assert push_trigger.pushed_commits(["%s %s refs/heads/other" % (a, c), "%s %s refs/tags/v1" % (a, c)], "main") == []


def test_hook_authenticates_with_the_shared_secret(processes, upstream, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hook-test-secret-0123456789abcdef\n")
    dispatcher = processes.start("dispatcher", [sys.executable, str(ROOT / "dispatcher.py"), "--port", "0",
                                                "--results-dir", str(tmp_path / "results"), "--secret-file", str(secret)])
    address = "127.0.0.1:%s" % dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    installed = install_hooks(upstream.path, address, "--branch", "main", "--secret-file", str(secret))
    assert installed.returncode == 0
    hook = (upstream.path / ".git" / "hooks" / "post-commit").read_text()
    assert "--secret-file %s" % secret in hook and "hook-test-secret" not in hook, "the path, never the secret"

    sha = upstream.commit({"test_signed.py": PASSING_TEST.replace("passes", "signed")}, "signed")
    dispatcher.wait_for_log(r"commit %s queued" % sha)
    assert "bad request" not in dispatcher.log()


# --- what runs on every push: push_hook.py ------------------------------------------------

#: What the hook must not import: each costs milliseconds on every push, and none is
#: needed on the wire (the daemons' protocol module would bring in most of them;
#: socket.py only adds enums to _socket, and ssl needs it only for TLS).
SLOW_IMPORTS = {"site", "re", "logging", "dataclasses", "typing", "argparse", "subprocess", "threading",
                "commit_ci.protocol", "urllib.parse", "encodings.idna", "socket", "enum", "__future__"}


def hook_command(hooks: Path, kind: str) -> list[str]:
    """The command line an installed hook runs: its ``exec`` line, with the script's
    ``python`` and ``hook`` variables filled in."""
    variables, command = {}, None
    for line in (hooks / kind).read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name in ("python", "hook"):
            variables[name] = shlex.split(value)[0]
        elif line.strip().startswith("exec "):
            command = shlex.split(line.strip())[1:]
    assert command is not None and command[0] == "$python" and command[3] == "$hook", command
    return [variables["python"], *command[1:3], variables["hook"], *command[4:]]


def imported_modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")} - {
        "package"}


@pytest.mark.parametrize("secret", [False, True, "observer key"])
def test_hook_runs_python_with_s_and_e_and_imports_only_what_the_wire_needs(processes, served, tmp_path, secret):
    ci = CISystem(processes, served, tmp_path)
    secret_options = dispatcher_options = []
    if secret == "observer key":
        keys_file, key_files = make_keys(tmp_path / "keys", {"push-hook": "observer"})
        secret_options, dispatcher_options = ["--secret-file", str(key_files["push-hook"])], ["--keys-file", str(keys_file)]
    elif secret:
        (tmp_path / "secret").write_text("a-secret-of-enough-length-0123\n")
        secret_options = dispatcher_options = ["--secret-file", str(tmp_path / "secret")]
    ci.start_dispatcher(*dispatcher_options)
    assert install_hooks(served.path, ci.address, *secret_options).returncode == 0
    command = hook_command(served.path / "hooks", "post-receive")
    assert command[:3] == [sys.executable, "-S", "-E"]
    assert command[3] == str(ROOT / "commit_ci" / "push_hook.py")
    assert command[4:] == ["post-receive", "--dispatcher-server", ci.address, "--branch", "main", *secret_options]

    old = served.head()
    new = served.commit({}, "one more")
    assert hook_lines(served.push()) == ["remote: ci-trigger: 1 commit(s) sent to the CI dispatcher at %s (1 new)" % (
        ci.address)]
    # The same hook again, by hand, to see what it imports.
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], input="%s %s refs/heads/main\n" % (old, new),
                          cwd=served.path, capture_output=True, text=True, timeout=30)

    assert done.returncode == 0
    assert "ci-trigger: 1 commit(s) sent to the CI dispatcher at %s (0 new)" % ci.address in done.stderr
    imported = imported_modules(done.stderr)
    assert {"commit_ci", "commit_ci.wire", "commit_ci.security", "_socket"} <= imported
    assert not imported & SLOW_IMPORTS, "the hook imported %s" % sorted(imported & SLOW_IMPORTS)
    assert ("hmac" in imported) == bool(secret), "hmac only with a secret"
    assert "ssl" not in imported, "ssl only with --tls-ca"
    assert "bad request" not in ci.dispatcher.log()


def test_a_hook_whose_installation_is_gone_says_in_one_line_to_install_it_again(processes, served, tmp_path):
    """Hooks name the Python and the push_hook.py of the copy that wrote them. When that
    copy is moved or removed, a push still succeeds, and says how to mend the hook."""
    ci = CISystem(processes, served, tmp_path)
    ci.start_dispatcher()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "commit_ci", elsewhere / "commit_ci", ignore=shutil.ignore_patterns("__pycache__"))
    boot = "import sys; sys.path[0] = %r; from commit_ci.push_trigger import main; sys.exit(main())" % str(elsewhere)
    installed = subprocess.run([sys.executable, "-c", boot, "install", "--repo", str(served.path),
                                "--dispatcher-server", ci.address], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    assert hook_command(served.path / "hooks", "post-receive")[3] == str(elsewhere / "commit_ci" / "push_hook.py")
    shutil.rmtree(elsewhere)

    served.commit({}, "pushed after commit-ci moved")
    lines = hook_lines(served.push())
    assert len(lines) == 1, lines
    assert "this CI hook cannot run" in lines[0]
    assert "run `ci-trigger install --repo %s --dispatcher-server %s --branch main` again" % (
        served.path, ci.address) in lines[0]
    # Installing again mends it: the next push is reported (the one before is the
    # observer's to find).
    assert install_hooks(served.path, ci.address).returncode == 0
    sha = served.commit({}, "pushed after installing again")
    assert hook_lines(served.push()) == ["remote: ci-trigger: 1 commit(s) sent to the CI dispatcher at %s (1 new)" % (
        ci.address)]
    ci.dispatcher.wait_for_log(r"commit %s queued" % sha)


def test_the_first_versions_hook_command_line_still_reports(processes, served, tmp_path):
    ci = CISystem(processes, served, tmp_path)
    ci.start_dispatcher()
    # What `ci-trigger install` wrote before push_hook.py existed: ci-trigger itself, as a hook.
    old_hook = served.path / "hooks" / "post-receive"
    old_hook.write_text("#!/bin/sh\n%s: tells the CI dispatcher at %s about new commits on main at once.\nexec %s\n" % (
        push_trigger.HOOK_MARKER, ci.address, " ".join(shlex.quote(part) for part in module_argv(
            "push_trigger", "post-receive", "--dispatcher-server", ci.address, "--branch", "main"))))
    old_hook.chmod(0o755)

    sha = served.commit({}, "pushed through an old hook")
    pushed = served.push()

    assert hook_lines(pushed) == ["remote: ci-trigger: 1 commit(s) sent to the CI dispatcher at %s (1 new)" % ci.address]
    ci.dispatcher.wait_for_log(r"commit %s queued" % sha)
    # Installing again replaces it (it carries the marker) with the fast one.
    assert install_hooks(served.path, ci.address).returncode == 0
    assert "push_hook.py" in old_hook.read_text()


def test_hook_command_line_is_parsed_by_hand_like_argparse_did(capsys):
    assert push_hook.parse_arguments(
        ["post-receive", "--dispatcher-server", "h:1", "--branch=main", "--secret-file", "s", "--tls-ca=c"]
    ) == ("post-receive", {"--dispatcher-server": "h:1", "--branch": "main", "--secret-file": "s", "--tls-ca": "c"})
    for wrong in ([], ["pre-receive", "--dispatcher-server", "h:1", "--branch", "main"],
                  ["post-commit", "--branch", "main"], ["post-commit", "--dispatcher-server", "h:1", "--branch"],
                  ["post-commit", "--dispatcher-server", "h:1", "--branch", "main", "--force"],
                  ["post-commit", "--dispatcher-server", "h:1", "--branch", "main", "extra"]):
        with pytest.raises(ValueError):
            push_hook.parse_arguments(wrong)
    # A bad command line is a warning, never a failed push or commit.
    assert push_hook.main(["post-commit", "--nonsense"]) == 0
    assert "ci-trigger: warning: bad hook command line" in capsys.readouterr().err


def test_git_output_reports_failures_and_stops_a_git_that_hangs(upstream, monkeypatch):
    assert push_hook.git_output(["rev-parse", "HEAD"], cwd=str(upstream.path)) == upstream.head()
    with pytest.raises(push_hook.HookError, match=r"git rev-parse --verify no-such-ref failed: fatal"):
        push_hook.git_output(["rev-parse", "--verify", "no-such-ref"], cwd=str(upstream.path))
    monkeypatch.setattr(push_hook, "GIT_TIMEOUT_S", 0.3)
    started = time.monotonic()
    # An alias that runs a shell command stands in for a git that hangs (3 s, so
    # that the shell it leaves behind does not outlive the test run for long).
    with pytest.raises(push_hook.HookError, match="took longer than 0.3 s"):
        push_hook.git_output(["-c", "alias.hang=!sleep 3", "hang"], cwd=str(upstream.path))
    assert time.monotonic() - started < 2.5


SECRET = b"hook-side-secret-0123456789abcdef"


def test_auth_line_is_the_hmac_that_docs_protocol_md_describes(monkeypatch):
    """One fixed message, computed here from the description: any change to the bytes
    the hook or the daemons sign shows up as a failure."""
    monkeypatch.setattr(security.os, "urandom", lambda size: bytes(range(size)))
    auth = security.Authenticator(SECRET, clock=lambda: 1700000000.5)
    data = b"dispatch abcdef1\n"

    line, nonce = auth.sign("request", data)
    reply_line, _ = auth.sign("reply", b"OK new=1 job=queued\n", request_nonce=nonce)

    assert nonce == bytes(range(16)).hex()
    tag = hmac.new(SECRET, b"ci-auth-1|request|1700000000500|%s|-|" % nonce.encode() + data, hashlib.sha256).hexdigest()
    assert line == b"auth 1700000000500 %s %s\n" % (nonce.encode(), tag.encode())
    reply_tag = hmac.new(SECRET, b"ci-auth-1|reply|1700000000500|%s|%s|OK new=1 job=queued\n" % (
        nonce.encode(), nonce.encode()), hashlib.sha256).hexdigest()
    assert reply_line.split()[3] == reply_tag.encode()
    assert security.Authenticator is security.Authenticator, "one implementation for hook and daemons"


def serve_one(sock: socket.socket, secret: bytes | None, answer=None) -> tuple[threading.Thread, list]:
    """Read one request with the daemons' codec on ``sock`` and answer it, in a thread."""
    received = []

    def serve():
        stream = protocol.MessageStream(sock, security.Authenticator(secret) if secret else None)
        message = stream.read_message(protocol.REQUESTS, first_byte_timeout=5)
        received.append(message)
        stream.write_message(answer or protocol.reply("OK", new=1, job="queued"), protocol.REPLIES,
                             request_nonce=message.nonce, signed=message.nonce is not None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, received


@pytest.mark.parametrize("secret", [None, SECRET])
def test_hook_and_daemon_codec_understand_each_other(secret):
    hook_side, daemon_side = socket.socketpair()
    with hook_side, daemon_side:
        thread, received = serve_one(daemon_side, secret)
        stream = wire.Stream(hook_side, security.Authenticator(secret) if secret else None)
        verb, rest = push_hook.dispatch(stream, "abcdef12" * 5)
        thread.join(timeout=10)
    assert (received[0].verb, received[0].fields) == ("dispatch", {"commit": "abcdef12" * 5})
    assert (received[0].nonce is not None) == (secret is not None)
    assert (verb, push_hook.reply_option(rest, "new"), push_hook.reply_option(rest, "job")) == ("OK", "1", "queued")


@pytest.mark.parametrize("signer", [b"another-secret-of-enough-length", None])
def test_hook_refuses_a_reply_signed_with_another_secret_or_not_at_all(signer):
    hook_side, daemon_side = socket.socketpair()

    def answer():
        # Reads the request without checking it; answers naming its nonce.
        stream = wire.Stream(daemon_side, security.Authenticator(signer) if signer else None)
        auth_line = stream.read_line(5)
        stream.read_line(5, continuing=True)
        stream.send(b"OK new=1 job=queued\n", request_nonce=security.parse_auth_line(auth_line)[1])

    with hook_side, daemon_side:
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(wire.ProtocolError, match="authentication (failed|required)"):
            push_hook.dispatch(wire.Stream(hook_side, security.Authenticator(SECRET)), "abcdef1")
        thread.join(timeout=10)
