"""ci-ctl, the operator's command, against a live dispatcher and runner."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from commit_ci import client, protocol, wire

from conftest import PASSING_TEST, ROOT, WAITS_FOR_FLAG_TEST, free_port, module_argv, wait_until


def ctl(address: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(module_argv("ctl", "--dispatcher-server", address, *args),
                          capture_output=True, text=True, timeout=60, env=env)


def test_ctl_reports_what_the_dispatcher_reports(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    ci.start_dispatcher()
    ci.start_runner("--name", "builder")
    sha = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "a test that waits")
    queued_behind = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "queued behind it")

    assert ctl(ci.address, "dispatch", sha).stdout.strip() == "%s: queued" % sha
    assert ctl(ci.address, "dispatch", queued_behind).returncode == 0
    assert ctl(ci.address, "dispatch", sha).stdout.startswith("%s: already known" % sha)
    ci.runners[0].wait_for_log(r"commit %s attempt \d+: testing" % sha)

    status = ctl(ci.address, "status")
    assert status.returncode == 0
    assert "dispatcher %s: up" % ci.address in status.stdout
    assert "queue: 1 queued, 1 running" in status.stdout
    assert re.search(r"builder +busy with %s +since" % sha[:12], status.stdout)

    queue = json.loads(ctl(ci.address, "--json", "queue").stdout)
    assert [job["commit"] for job in queue["running"]] == [sha]
    assert queue["running"][0]["runner"] == "builder"
    assert [job["commit"] for job in queue["queued"]] == [queued_behind]
    runners = json.loads(ctl(ci.address, "--json", "runners").stdout)["runners"]
    assert [(r["name"], r["state"], r["commit"]) for r in runners] == [("builder", "busy", sha)]
    assert json.loads(ctl(ci.address, "runners", "--json").stdout)["runners"] == runners, "--json after the command"
    assert ctl(ci.address, "results", sha).stdout.startswith("%s: running on builder" % sha)

    flag.touch()
    ci.wait_results([sha, queued_behind])
    shown = ctl(ci.address, "results", sha)
    assert shown.returncode == 0
    assert shown.stdout.startswith("%s: passed\n" % sha)
    assert "report:   %s" % (ci.results_dir / sha) in shown.stdout
    as_json = json.loads(ctl(ci.address, "--json", "results", sha).stdout)
    assert as_json["summary"] == ci.result(sha), "the CLI says what the result file says"
    recent = json.loads(ctl(ci.address, "--json", "status").stdout)
    assert [summary["commit"] for summary in recent["recent"]] == [queued_behind, sha]
    assert recent["queued"] == 0 and recent["up"] is True


def test_ctl_errors_are_clear(ci, upstream):
    nowhere = "127.0.0.1:%d" % free_port()
    down = ctl(nowhere, "status")
    assert down.returncode == 1
    assert "ci-ctl: cannot reach the dispatcher at %s" % nowhere in down.stderr

    ci.start_dispatcher()
    unknown = ctl(ci.address, "results", "abcdef12")
    assert unknown.returncode == 1
    assert "refused lookup: unknown commit abcdef12" in unknown.stderr
    bad = ctl(ci.address, "results", "../../etc")
    assert bad.returncode == 2
    assert "invalid commit id" in bad.stderr


def test_dispatch_of_an_abbreviated_id_is_refused_and_queues_nothing(ci, upstream):
    """An abbreviated id is a second name for a commit: taking it would test and record
    the commit a second time, under a second set of result files."""
    ci.start_dispatcher()
    ci.start_runner()
    sha = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "a commit to test once")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    ci.wait_result(sha)
    files = ci.result_files()
    assert files == ci.expected_files([sha])
    address = wire.parse_address(ci.address)

    for short in (sha[:7], sha[:8], sha[:12], sha[:39], sha.upper()[:12]):
        refused = ctl(ci.address, "dispatch", short)
        assert refused.returncode == 2, refused
        assert "%s is not a full commit id" % short in refused.stderr
        assert "give the full id, for example from `git rev-parse %s`" % short in refused.stderr
        assert "ci-ctl: cannot reach" not in refused.stderr, "refused before asking the dispatcher"
        # The dispatcher refuses it too, from any other client.
        answer = client.communicate(address, protocol.request("dispatch", commit=short), timeout=10)
        assert (answer.verb, answer.get("reason")) == ("ERR", "invalid commit id (want the full id: 40 or 64 hex digits)")

    status = json.loads(ctl(ci.address, "--json", "status").stdout)
    assert (status["queued"], status["running"]) == (0, 0)
    assert [summary["commit"] for summary in status["recent"]] == [sha]
    assert re.findall(r"commit (\w+) queued \(from", ci.dispatcher.log()) == [sha]
    assert ci.result_files() == files, "no second set of result files"


def test_results_takes_the_short_id_that_status_shows(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    sha = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "a commit to look up")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    ci.wait_result(sha)
    shown_in_status = re.search(r"last results:\n  (\w+) ", ctl(ci.address, "status").stdout).group(1)
    assert shown_in_status == sha[:12]

    for prefix in (shown_in_status, sha[:7], sha.upper()[:12], sha):
        shown = ctl(ci.address, "results", prefix)
        assert shown.returncode == 0, shown
        assert shown.stdout.startswith("%s: passed\n" % sha), "the full id, whatever was typed"
        assert "report:   %s" % (ci.results_dir / sha) in shown.stdout
    as_json = json.loads(ctl(ci.address, "--json", "results", sha[:12]).stdout)
    assert as_json["commit"] == sha
    assert as_json["summary"] == ci.result(sha)
    assert as_json["files"]["json"] == str(ci.results_dir / (sha + ".json"))


def test_results_says_when_a_prefix_is_ambiguous_or_unknown(ci):
    ci.start_dispatcher()  # no runner: the made-up commits below stay queued
    address = wire.parse_address(ci.address)
    twins = ["0fe6b0ed1b3d" + "0" * 28, "0fe6b0ed1b3d" + "f" * 28]
    other = "0fe6b0ef" + "1" * 32
    for commit in twins + [other]:
        # The dispatcher queues a full id without checking that the commit exists.
        answer = client.communicate(address, protocol.request("dispatch", commit=commit), timeout=10)
        assert (answer.verb, answer.get("new")) == ("OK", 1)

    for prefix in ("0fe6b0e", "0fe6b0ed", "0fe6b0ed1b3d"):
        shown = ctl(ci.address, "results", prefix)
        assert shown.returncode == 1 and shown.stdout == ""
        assert ("refused lookup: ambiguous commit prefix %s: more than one commit starts with it; give more digits"
                % prefix) in shown.stderr
        answer = client.communicate(address, protocol.request("lookup", commit=prefix), timeout=10)
        assert answer.verb == "ERR" and answer.get("reason").startswith("ambiguous commit prefix %s:" % prefix)

    for prefix, commit in ((twins[0][:13], twins[0]), (twins[1][:13], twins[1]), ("0fe6b0ef", other), (twins[0], twins[0])):
        shown = ctl(ci.address, "results", prefix)
        assert shown.returncode == 0, shown
        assert shown.stdout.startswith("%s: queued, queued " % commit)
        assert json.loads(ctl(ci.address, "--json", "results", prefix).stdout)["commit"] == commit

    unknown = ctl(ci.address, "results", "0fe6b0ee")
    assert unknown.returncode == 1 and "refused lookup: unknown commit 0fe6b0ee" in unknown.stderr
    too_short = ctl(ci.address, "results", "0fe6b0")
    assert too_short.returncode == 2 and "invalid commit id or prefix (want 7 to 64 hex digits)" in too_short.stderr


def test_ctl_with_a_secret(processes, upstream, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("ctl-test-secret-0123456789abcdef\n")
    dispatcher = processes.start("dispatcher", [sys.executable, str(ROOT / "dispatcher.py"), "--port", "0",
                                                "--results-dir", str(tmp_path / "results"), "--secret-file", str(secret)])
    address = "127.0.0.1:%s" % dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    refused = ctl(address, "status", env={k: v for k, v in os.environ.items() if k != "CI_SECRET"})
    assert refused.returncode == 1 and "authentication required" in refused.stderr
    assert ctl(address, "--secret-file", str(secret), "status").returncode == 0
    by_env = ctl(address, "status", env={**os.environ, "CI_SECRET": secret.read_text().strip()})
    assert by_env.returncode == 0
    wait_until(lambda: "bad request" in dispatcher.log(), timeout=10, message="the refusal logged")
