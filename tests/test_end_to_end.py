"""The whole system: observer, dispatcher and runners as real processes on loopback."""

from __future__ import annotations

import re

from conftest import (
    FAILING_TEST,
    HANGING_TEST,
    PASSING_TEST,
    SYNTAX_ERROR_TEST,
    free_port,
    git,
    wait_until,
)

SLOW_PASSING_TEST = "import time\n\ndef test_slow():\n    time.sleep(%s)\n"


def test_each_kind_of_commit_gets_its_verdict(ci, upstream):
    ci.start_dispatcher()
    # The time limit leaves room for a loaded machine: the passing runs take about 1 s.
    ci.start_runner("--timeout", "6")
    ci.start_runner("--timeout", "6")
    ci.start_observer()
    initial = upstream.head()
    # Its first round reports the tip it finds; the commits below must come after it.
    ci.observer.wait_for_log(r"commit %s reported" % initial)
    passing = upstream.commit({"test_more.py": PASSING_TEST}, "add a passing test")
    failing = upstream.commit({"test_bad.py": FAILING_TEST}, "add a failing test")
    broken = upstream.commit({"test_bad.py": None, "test_syntax.py": SYNTAX_ERROR_TEST}, "syntax error")
    hanging = upstream.commit({"test_syntax.py": None, "test_hang.py": HANGING_TEST}, "a test that hangs")

    results = ci.wait_results([initial, passing, failing, broken, hanging], timeout=90)

    assert results[initial]["status"] == "passed"
    assert results[passing]["status"] == "passed"
    assert (results[passing]["passed"], results[passing]["failed"]) == (2, 0)
    assert results[passing]["reason"] is None
    assert results[failing]["status"] == "failed"
    assert (results[failing]["passed"], results[failing]["failed"]) == (2, 1)
    assert results[broken]["status"] == "failed"
    assert results[broken]["errors"] >= 1
    assert results[hanging]["status"] == "failed"
    assert results[hanging]["reason"] == "timeout"
    for commit, result in results.items():
        assert result["commit"] == commit
        assert result["attempts"] == 1
        assert result["runner"].startswith("127.0.0.1:")
        for key in ("duration_s", "queued_at", "started_at", "finished_at"):
            assert result[key] is not None, key
        report = ci.report(commit)
        assert report.startswith("commit:    %s\nverdict:   %s\n" % (commit, result["status"]))
    assert "test_fails" in ci.report(failing) and "assert (1 + 1) == 3" in ci.report(failing)
    assert "SyntaxError" in ci.report(broken) or "invalid syntax" in ci.report(broken)
    assert "time limit" in ci.report(hanging)
    # Only result files: a report, a log and a JSON per commit, JUnit XML where the
    # tests wrote one (not for the run killed at its time limit), nothing half-written.
    expected = [name for commit in results for name in (commit, commit + ".log", commit + ".json")]
    expected += [commit + ".xml" for commit in results if commit != hanging] + ["index.html"]
    assert ci.result_files() == sorted(expected)
    # Once the dispatcher has stopped, not even the page is being rewritten.
    assert ci.dispatcher.terminate() == 0
    assert sorted(path.name for path in ci.results_dir.iterdir()) == sorted(expected)


def push_at_once(upstream, count: int, make_files) -> list[tuple[str, str]]:
    """Make ``count`` commits on a side branch, then move main to them in one step,
    so the observer sees them all in one fetch. Returns [(sha, expected verdict)]."""
    git(upstream.path, "checkout", "--quiet", "-b", "batch")
    made = []
    for index in range(count):
        files, verdict = make_files(index)
        made.append((upstream.commit(files, "commit %d" % index), verdict))
    git(upstream.path, "checkout", "--quiet", "main")
    git(upstream.path, "merge", "--quiet", "--ff-only", "batch")
    git(upstream.path, "branch", "--quiet", "-d", "batch")
    return made


def mixed_commit(index: int, sleep: float = 0.0):
    """Every third commit breaks a test; the next one repairs it."""
    files = {"test_step.py": (SLOW_PASSING_TEST % sleep).replace("test_slow", "test_step_%d" % index)}
    if index % 3 == 0:
        files["test_broken.py"] = FAILING_TEST
        return files, "failed"
    files["test_broken.py"] = PASSING_TEST.replace("test_passes", "test_repaired")
    return files, "passed"


def test_twenty_commits_two_runners_all_tested_in_order(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_runner()
    ci.start_observer()
    initial = upstream.head()
    ci.wait_result(initial)

    commits = push_at_once(upstream, 20, mixed_commit)
    results = ci.wait_results([sha for sha, _ in commits], timeout=180)

    for sha, verdict in commits:
        assert results[sha]["status"] == verdict, sha
        assert results[sha]["attempts"] == 1
    assert len({result["runner"] for result in results.values()}) == 2, "both runners took jobs"
    assert len(ci.result_files()) == 4 * 21 + 1  # and index.html
    # Reported oldest first: the observer's log lists them in commit order.
    reported = re.findall(r"commit ([0-9a-f]{40}) reported", ci.observer.log())
    assert reported == [initial] + [sha for sha, _ in commits]


def test_runner_killed_mid_job_its_job_finishes_elsewhere(ci, upstream):
    ci.start_dispatcher("--heartbeat-interval", "0.5")
    victim = ci.start_runner()
    ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())

    commits = push_at_once(upstream, 20, lambda index: mixed_commit(index, sleep=0.5))
    # Kill the first runner while it is in the middle of a job of this batch.
    in_flight = victim.wait_for_log(r"commit ([0-9a-f]{40}) attempt \d+: testing", after=len(victim.log()))
    victim_log_offset = len(victim.log())
    killed_job = in_flight.group(1)
    victim.kill()
    assert killed_job in {sha for sha, _ in commits}

    results = ci.wait_results([sha for sha, _ in commits], timeout=180)

    for sha, verdict in commits:
        assert results[sha]["status"] == verdict, sha
    assert results[killed_job]["attempts"] == 2
    assert results[killed_job]["runner"] != victim_name(victim)
    assert re.search(r"commit %s attempt \d+ \(runner [^)]*\): runner \S+ lost" % killed_job, ci.dispatcher.log())
    assert len(ci.result_files()) == 4 * 21 + 1, "exactly one result per commit (and index.html)"
    assert len(victim.log()) == victim_log_offset


def victim_name(runner) -> str:
    return re.search(r"listening on \S+ as (\S+)", runner.log()).group(1)


def test_observer_started_first_and_dispatcher_away_lose_nothing(ci, upstream):
    port = free_port()
    ci.port = port
    ci.start_observer()
    ci.observer.wait_for_log(r"dispatcher 127\.0\.0\.1:%d unreachable" % port)
    early = [upstream.head(), upstream.commit({"test_early.py": PASSING_TEST}, "while nothing listens")]

    ci.start_dispatcher(port=port)
    ci.start_runner()
    ci.wait_results(early, timeout=60)

    # The dispatcher goes away for a while; commits keep coming.
    ci.dispatcher.terminate()
    offset = len(ci.observer.log())
    away = [upstream.commit({"test_away_%d.py" % i: FAILING_TEST if i == 1 else PASSING_TEST}, "away %d" % i) for i in range(3)]
    ci.observer.wait_for_log(r"unreachable", after=offset)
    ci.restart_dispatcher()

    results = ci.wait_results(away, timeout=60)
    assert [results[sha]["status"] for sha in away] == ["passed", "failed", "failed"]
    reported = re.findall(r"commit ([0-9a-f]{40}) reported", ci.observer.log())
    assert reported == early + away, "each commit reported once, in order"


def test_result_kept_by_runner_while_dispatcher_is_down(ci, upstream):
    ci.start_dispatcher()
    runner = ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    slow = upstream.commit({"test_slow.py": SLOW_PASSING_TEST % 2}, "slow test")
    runner.wait_for_log(r"commit %s attempt \d+: testing" % slow)
    ci.dispatcher.kill()

    runner.wait_for_log(r"commit %s attempt \d+: result kept" % slow)
    ci.restart_dispatcher()

    result = ci.wait_result(slow, timeout=30)
    assert result["status"] == "passed"
    assert result["attempts"] == 1, "the kept result was used, not a second run"


def test_runner_gives_up_when_dispatcher_stays_away(processes, upstream, tmp_path):
    import sys

    from conftest import ROOT

    clone = upstream.clone(tmp_path / "clone")
    runner = processes.start(
        "runner",
        [sys.executable, str(ROOT / "test_runner.py"), "--dispatcher-server", "127.0.0.1:%d" % free_port(),
         "--dispatcher-timeout", "1", str(clone)],
    )
    wait_until(lambda: not runner.running(), timeout=20, message="runner to exit")
    assert runner.popen.returncode == 3
    assert "dispatcher unreachable for" in runner.log()


def test_same_commit_twice_is_one_job(ci, upstream):
    from commit_ci.client import communicate
    from commit_ci.protocol import request
    from commit_ci.wire import parse_address

    ci.start_dispatcher()
    sha = upstream.head()
    first = communicate(parse_address(ci.address), request("dispatch", commit=sha))
    second = communicate(parse_address(ci.address), request("dispatch", commit=sha))
    assert (first.verb, first.get("new")) == ("OK", 1)
    assert (second.verb, second.get("new"), second.get("job")) == ("OK", 0, "queued")
    ci.start_runner()
    ci.wait_result(sha)
    third = communicate(parse_address(ci.address), request("dispatch", commit=sha))
    assert third.get("job") == "passed"
    assert ci.result_files() == sorted([sha, sha + ".json", sha + ".log", sha + ".xml", "index.html"])


USES_PYTESTS_CACHE = """def test_remembers(cache):
    cache.set("ci/seen", True)
    assert cache.get("ci/seen", False)
"""


def test_a_repository_that_uses_pytests_cache_gets_it(ci, upstream):
    """The runner's pytest is the plain one: the cache fixture, and --ff, --lf or
    --sw in the repository's addopts, work as they do by hand."""
    from commit_ci.client import communicate
    from commit_ci.protocol import request
    from commit_ci.wire import parse_address

    ci.start_dispatcher()
    ci.start_runner()
    sha = upstream.commit({"pytest.ini": "[pytest]\naddopts = --ff --sw\n", "test_cache.py": USES_PYTESTS_CACHE},
                          "uses the cache")
    communicate(parse_address(ci.address), request("dispatch", commit=sha))
    result = ci.wait_result(sha)
    assert result["status"] == "passed", ci.report(sha)
    assert "stepwise:" in ci.report(sha), "--sw was on"


def test_a_job_queued_under_an_abbreviated_id_by_an_older_dispatcher_is_retired(ci, upstream, tmp_path):
    """Databases from before abbreviated ids were refused may queue one: no runner takes
    it, so it must not come back to the scheduler (ahead of every other job) forever."""
    from commit_ci.states import JobState
    from commit_ci.store import JobStore

    sha = upstream.commit({"test_more.py": PASSING_TEST}, "dispatched twice by an older ci-ctl")
    database = tmp_path / "queue.sqlite3"
    older = JobStore(str(database))
    older.enqueue(sha[:8], 1.0)
    older.enqueue(sha, 2.0)
    older.close()

    dispatcher = ci.start_dispatcher("--db", str(database))
    dispatcher.wait_for_log(r"commit %s: queued under an abbreviated id before those were refused" % sha[:8])
    runner = ci.start_runner()
    ci.wait_result(sha)
    assert ci.result_files() == ci.expected_files([sha]), "no result files under the abbreviated id"
    assert "invalid commit id" not in runner.log(), "the runner was never offered it"
    ci.dispatcher.terminate()
    store = JobStore(str(database), read_only=True)
    try:
        retired = store.job(sha[:8])
        assert (retired.state, retired.summary, retired.current_attempt) == (JobState.ERROR, None, None)
        assert retired.reason == "abbreviated commit id, refused since; dispatch the full id"
    finally:
        store.close()


def test_a_result_kept_for_an_abbreviated_id_by_an_older_runner_is_dropped(ci, upstream, tmp_path):
    """Its ping would name the abbreviated id, which the dispatcher cannot decode, and
    the dispatcher would refuse to record it: kept, the runner would never get a job."""
    from commit_ci.client import communicate
    from commit_ci.outbox import encode
    from commit_ci.protocol import request
    from commit_ci.result import Result
    from commit_ci.wire import parse_address

    sha = upstream.commit({"test_more.py": PASSING_TEST}, "tested while an old result is kept")
    state = tmp_path / "runner-state"
    (state / "pending").mkdir(parents=True)
    kept = state / "pending" / ("%012d-%s.json" % (7, sha[:8]))
    kept.write_bytes(encode(Result(commit=sha[:8], attempt=7, status="passed")))

    ci.start_dispatcher()
    runner = ci.start_runner("--state-dir", str(state))
    runner.wait_for_log(r"unreadable kept result .*%s.* \(not a full commit id: '%s'\): removed" % (sha[:8], sha[:8]))
    assert not kept.exists()
    assert communicate(parse_address(ci.address), request("dispatch", commit=sha)).verb == "OK"
    assert ci.wait_result(sha)["status"] == "passed"
    assert ci.result_files() == ci.expected_files([sha])


#: Passes once the clone it runs in has fetched a commit newer than its own (the
#: runner fetches while it runs: the job can read the clone's .git, not write it).
WAITS_FOR_A_NEWER_COMMIT_TEST = """import subprocess, time

def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30).stdout.strip()

def test_the_next_commit_is_fetched_while_this_one_runs():
    head = git("rev-parse", "HEAD")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if git("rev-parse", "refs/remotes/origin/main") not in ("", head):
            return
        time.sleep(0.05)
    raise AssertionError("no newer commit was fetched while this job ran")
"""


def test_a_queued_commit_is_fetched_while_the_runner_tests_another(ci, upstream):
    ci.start_dispatcher()
    runner = ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    waiting = upstream.commit({"test_wait.py": WAITS_FOR_A_NEWER_COMMIT_TEST}, "waits for a newer commit")
    runner.wait_for_log(r"commit %s attempt \d+: testing" % waiting)
    queued = upstream.commit({"test_wait.py": None, "test_more.py": PASSING_TEST}, "queued behind it")

    assert ci.wait_result(waiting)["status"] == "passed", ci.report(waiting)
    assert ci.wait_result(queued)["status"] == "passed", ci.report(queued)
    log = runner.log()
    fetched = re.search(r"commit %s: fetched ahead of its job" % queued, log)
    accepted = re.search(r"commit %s attempt \d+ accepted" % queued, log)
    assert fetched and accepted and fetched.start() < accepted.start(), log
    checkout = re.search(r"commit %s attempt \d+: testing" % queued, log)
    assert checkout and "fetch" not in log[accepted.start():checkout.start()]
