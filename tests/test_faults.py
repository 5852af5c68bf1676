"""Fault injection: daemons killed with SIGKILL, stopped, restarted; nothing is lost."""

from __future__ import annotations

import json
import re
import signal
import sqlite3

import pytest

from commit_ci.client import communicate
from commit_ci.protocol import request
from commit_ci.wire import parse_address

from conftest import FAILING_TEST, JOBS_AS_RUNNER, PASSING_TEST, WAITS_FOR_FLAG_TEST, wait_until
from proctools import descendants
from test_end_to_end import SLOW_PASSING_TEST, mixed_commit, push_at_once


def reported_commits(observer) -> list[str]:
    return re.findall(r"commit ([0-9a-f]{40}) reported", observer.log())


def test_dispatcher_killed_with_a_queue_of_twenty_finishes_all_after_restart(ci, upstream):
    ci.start_dispatcher()
    ci.start_observer()
    commits = push_at_once(upstream, 20, mixed_commit)
    wait_until(lambda: len(reported_commits(ci.observer)) == 21, timeout=60, message="21 commits reported")
    status = communicate(parse_address(ci.address), request("status"))
    assert status.get("queued") == 21

    ci.dispatcher.kill()
    ci.restart_dispatcher()
    ci.start_runner()
    ci.start_runner()

    initial = reported_commits(ci.observer)[0]
    results = ci.wait_results([sha for sha, _ in commits] + [initial], timeout=180)
    for sha, verdict in commits:
        assert results[sha]["status"] == verdict
        assert results[sha]["attempts"] == 1
    assert ci.result_files() == ci.expected_files(results)


def test_dispatcher_killed_mid_job_runner_result_is_adopted(ci, upstream, tmp_path):
    """Killed while a job runs: after the restart the runner's job is adopted, not run twice."""
    ci.start_dispatcher()
    runner = ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    flag = tmp_path / "release"  # the job runs until the dispatcher is back, however long that takes
    slow = upstream.commit({"test_slow.py": WAITS_FOR_FLAG_TEST % str(flag)}, "slow")
    runner.wait_for_log(r"commit %s attempt \d+: testing" % slow)
    idle = ci.start_runner()  # free at the restart: it must not get the job
    ci.dispatcher.kill()
    ci.restart_dispatcher()
    ci.dispatcher.wait_for_log(r"commit %s attempt \d+: runner \S+ is still running it; adopted" % slow)
    flag.touch()

    result = ci.wait_result(slow, timeout=60)
    assert result["status"] == "passed"
    assert result["attempts"] == 1
    assert re.search(r"commit %s attempt \d+: runner \S+ is still running it; adopted" % slow, ci.dispatcher.log())
    assert len(re.findall(r"commit %s attempt \d+: testing" % slow, runner.log())) == 1
    assert slow not in idle.log()


def test_observer_killed_while_ten_commits_are_pushed_reports_each_once(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_runner()
    ci.start_observer()
    initial = upstream.head()
    ci.wait_result(initial)
    ci.observer.kill()

    pushed = [upstream.commit({"test_n.py": PASSING_TEST.replace("passes", "passes_%d" % i)}, "n%d" % i) for i in range(10)]
    offset = len(ci.observer.log())
    ci.observer.restart()
    ci.wait_results(pushed, timeout=120)

    assert re.findall(r"commit ([0-9a-f]{40}) reported", ci.observer.log()[offset:]) == pushed
    assert reported_commits(ci.observer) == [initial] + pushed
    assert "already known" not in ci.observer.log()
    assert "dispatched again" not in ci.dispatcher.log()


def test_runner_killed_and_restarted_delivers_its_kept_result(ci, upstream):
    """A result kept on disk survives the runner's death and is delivered when it is back."""
    ci.start_dispatcher()
    runner = ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    slow = upstream.commit({"test_slow.py": SLOW_PASSING_TEST % 2}, "slow")
    runner.wait_for_log(r"commit %s attempt \d+: testing" % slow)
    ci.dispatcher.kill()
    runner.wait_for_log(r"commit %s attempt \d+: result kept" % slow)
    runner.kill()

    ci.restart_dispatcher()
    offset = len(runner.log())
    runner.restart()
    runner.wait_for_log(r"commit %s attempt \d+: result delivered" % slow, after=offset)

    result = ci.wait_result(slow, timeout=30)
    assert result["status"] == "passed"
    assert result["attempts"] == 1


def test_runner_stopped_mid_job_hands_it_back(ci, upstream, tmp_path):
    flag = tmp_path / "release-the-test"
    ci.start_dispatcher()
    leaving = ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    waiting = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "waits")
    leaving.wait_for_log(r"commit %s attempt \d+: testing" % waiting)
    ci.start_runner()

    assert leaving.terminate() == 0, "a clean exit while the test still waits"
    assert re.search(r"commit %s attempt \d+: aborted" % waiting, leaving.log())
    flag.touch()

    result = ci.wait_result(waiting, timeout=90)
    assert result["status"] == "passed"
    assert result["attempts"] == 2
    assert result["runner"] != re.search(r"as (\S+) \(clone", leaving.log()).group(1)
    assert re.search(r"commit %s attempt \d+ \(runner \S+\): runner shutting down; back in the queue" % waiting,
                     ci.dispatcher.log())


def test_late_and_duplicate_results_never_overwrite(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    sha = upstream.head()
    address = parse_address(ci.address)
    communicate(address, request("dispatch", commit=sha))
    first = ci.wait_result(sha)
    before = (ci.results_dir / (sha + ".json")).read_bytes(), ci.report(sha)

    attempt = sqlite3.connect(str(ci.results_dir) + ".queue.sqlite3").execute(
        "SELECT current_attempt FROM jobs WHERE commit_id = ?", (sha,)).fetchone()[0]
    for status in ("failed", "passed", "error", "aborted"):
        answer = communicate(address, request("results", commit=sha, attempt=attempt, status=status,
                                              log=b"forged output\n"))
        assert (answer.verb, answer.get("recorded")) == ("OK", 0)
    assert ((ci.results_dir / (sha + ".json")).read_bytes(), ci.report(sha)) == before
    assert json.loads(before[0]) == first
    assert len(re.findall(r"late \w+ result ignored, already passed", ci.dispatcher.log())) == 4

    answer = communicate(address, request("results", commit=sha, attempt=attempt + 100, status="passed"))
    assert answer.verb == "ERR"


def test_unreachable_checkout_is_retried_then_an_error(ci, upstream):
    """An infrastructure fault is retried on another runner, and gives up after the limit."""
    ci.start_dispatcher("--max-attempts", "2")
    ci.start_runner()
    ci.start_runner()
    missing = "0123456789abcdef0123456789abcdef01234567"
    communicate(parse_address(ci.address), request("dispatch", commit=missing))

    result = ci.wait_result(missing, timeout=60)
    assert result["status"] == "error"
    assert result["attempts"] == 2
    assert result["reason"].startswith("checkout failed: commit %s is not in the upstream repository" % missing)
    runners = set(re.findall(r"commit %s attempt \d+: running on runner (\S+)" % missing, ci.dispatcher.log()))
    assert len(runners) == 2, "the retry went to the other runner"
    # A failing test, by contrast, is the commit's verdict: not retried.
    failing = upstream.commit({"test_bad.py": FAILING_TEST}, "failing")
    communicate(parse_address(ci.address), request("dispatch", commit=failing))
    assert ci.wait_result(failing)["attempts"] == 1


def test_a_checkout_that_hangs_is_killed_and_the_runner_goes_on(ci, upstream):
    ci.start_dispatcher("--max-attempts", "1")
    in_the_clone = upstream.commit({"test_again.py": PASSING_TEST.replace("passes", "again")}, "needs no fetch")
    # What a fetch runs on the other side: here, a server that does not answer. (In
    # the runner's environment: what a test changes in the clone's .git is put back.)
    hanging_server = ("env", "GIT_CONFIG_COUNT=1", "GIT_CONFIG_KEY_0=remote.origin.uploadpack",
                      "GIT_CONFIG_VALUE_0=sleep 317; git-upload-pack")
    runner = ci.start_runner("--checkout-timeout", "2", launched_by=hanging_server)
    unanswered = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "needs a fetch")
    communicate(parse_address(ci.address), request("dispatch", commit=unanswered))
    result = ci.wait_result(unanswered, timeout=60)
    assert result["status"] == "error"
    assert result["reason"].startswith("checkout failed: took more than 2 s")
    assert not [pid for pid in descendants(runner.pid) if b"317" in open("/proc/%d/cmdline" % pid, "rb").read()]

    communicate(parse_address(ci.address), request("dispatch", commit=in_the_clone))
    assert ci.wait_result(in_the_clone)["status"] == "passed", "the runner still takes jobs"


def test_a_result_the_dispatcher_cannot_record_is_kept_and_sent_again(ci, upstream):
    ci.start_dispatcher()
    runner = ci.start_runner()
    sha = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "more")
    (ci.results_dir / sha).mkdir(parents=True)  # where its report goes: the dispatcher cannot write it
    communicate(parse_address(ci.address), request("dispatch", commit=sha))
    runner.wait_for_log(r"commit %s attempt \d+: dispatcher could not take the result: internal error" % sha)
    assert "discarded" not in runner.log()

    (ci.results_dir / sha).rmdir()
    result = ci.wait_result(sha, timeout=60)
    assert (result["status"], result["attempts"]) == ("passed", 1)


KILLS_ITS_PARENT = """import os, signal

def test_kills_the_process_that_forked_it():
    assert not os.path.exists("left-by-a-run"), "a leftover of an earlier run of this very job"
    open("left-by-a-run", "w").close()
    if not os.path.exists(%(flag)r):
        open(%(flag)r, "w").close()
        os.kill(os.getppid(), signal.SIGKILL)
"""


def test_a_warm_pytest_dying_mid_job_hands_the_job_back_for_a_clean_run(ci, upstream, tmp_path):
    ci.start_dispatcher()
    runner = ci.start_runner(*JOBS_AS_RUNNER)
    runner.wait_for_log(r"warm pytest ready")
    sha = upstream.commit({"test_parent.py": KILLS_ITS_PARENT % {"flag": str(tmp_path / "killed-once")}}, "kills")
    communicate(parse_address(ci.address), request("dispatch", commit=sha))
    result = ci.wait_result(sha, timeout=60)
    assert (result["status"], result["attempts"]) == ("passed", 2), ci.report(sha)
    assert re.search(r"commit %s attempt \d+: warm pytest failed during the tests" % sha, runner.log())


def test_a_lock_file_left_by_a_killed_git_does_not_block_the_next_checkout(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    # What a git killed while writing the index (with its runner) leaves behind.
    (ci.folder / "runner1-clone" / ".git" / "index.lock").write_text("")
    sha = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "more")
    communicate(parse_address(ci.address), request("dispatch", commit=sha))
    result = ci.wait_result(sha, timeout=60)
    assert result["status"] == "passed", result


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_each_daemon_stops_cleanly_on_a_signal(ci, upstream, signum):
    ci.start_dispatcher()
    runner = ci.start_runner()
    observer = ci.start_observer()
    ci.wait_result(upstream.head())
    for process in (observer, runner, ci.dispatcher):
        process.popen.send_signal(signum)
        assert process.popen.wait(timeout=30) == 0, process.name
        assert process.log().rstrip().endswith("INFO stopped"), process.name
        assert "Traceback" not in process.log()


HIDES_A_TEST = """import os, subprocess

def test_changes_the_runners_git_folder():
    subprocess.run(["git", "config", "core.sparseCheckout", "true"], check=True)
    with open(os.path.join(".git", "info", "sparse-checkout"), "w") as patterns:
        patterns.write("/*\\n!/test_hidden.py\\n")
    with open(os.path.join(".git", "hooks", "reference-transaction"), "w") as hook:
        hook.write("#!/bin/sh\\nexit 1\\n")
    os.chmod(os.path.join(".git", "hooks", "reference-transaction"), 0o755)
"""


def test_what_a_test_changes_in_the_clones_git_folder_is_put_back(ci, upstream):
    """A test runs in the runner's clone and can write to its .git: a sparse
    checkout that hides the next commit's failing test, a hook that breaks fetches.
    The next job starts from the .git the runner started with. (A job run as another
    user cannot write there at all: test_isolation.py.)"""
    ci.start_dispatcher()
    runner = ci.start_runner(*JOBS_AS_RUNNER)
    meddling = upstream.commit({"test_meddles.py": HIDES_A_TEST}, "changes .git")
    communicate(parse_address(ci.address), request("dispatch", commit=meddling))
    assert ci.wait_result(meddling)["status"] == "passed", ci.report(meddling)
    failing = upstream.commit({"test_meddles.py": PASSING_TEST, "test_hidden.py": FAILING_TEST}, "a failing test")
    communicate(parse_address(ci.address), request("dispatch", commit=failing))
    result = ci.wait_result(failing)
    assert (result["status"], result["failed"]) == ("failed", 1), ci.report(failing)
    assert re.search(r"put back what changed in the clone's \.git .*: config, hooks/reference-transaction, "
                     r"info/sparse-checkout", runner.log())
