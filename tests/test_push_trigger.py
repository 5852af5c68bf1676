"""The push trigger: git hooks that report new commits to the dispatcher at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import push_trigger
from conftest import FAILING_TEST, GIT_ENV, PASSING_TEST, ROOT, CISystem, free_port, git

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


def install_hooks(repo: Path, dispatcher: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "push_trigger.py"), "install", "--repo", str(repo), "--dispatcher-server", dispatcher,
         *extra],
        capture_output=True, text=True, timeout=60,
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
    # The hook ran before the push returned, so both are queued already, oldest first.
    queued = re.findall(r"commit ([0-9a-f]{40}) queued", ci.dispatcher.log())
    assert queued[-2:] == [first, second]
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
