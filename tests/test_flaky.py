"""Flaky tests (issue 12), on a real cluster: failing tests run again alone, the
verdicts ``flaky`` and ``failed`` they lead to, the result files, ci-ctl flaky, the
page, and a dispatcher or a runner killed between a failure and its rerun.

A test "fails at random" here with a coin seeded by its commit (``SEED`` in the test
file) and by the attempt it runs in (``CI_ATTEMPT``, which the dispatcher numbers 1,
2, 3... in a fresh cluster): the test picks the seed that gives the throws it wants,
so every outcome is random in form and known in advance.
"""

from __future__ import annotations

import json
import random
import re

from test_ctl import ctl

from conftest import FAILING_TEST, PASSING_TEST, page_rows, wait_until

#: A test that fails on the throws of a coin: heads (>= 0.5) passes.
COIN_TEST = """import os, random

SEED = %d


def test_coin():
    throw = random.Random("%%d:%%s" %% (SEED, os.environ["CI_ATTEMPT"])).random()
    assert throw >= 0.5, "tails (%%.3f)" %% throw


def test_steady():
    assert True
"""
#: Fails on attempt 1; on any other, waits (at most 120 s) for the file ``%r``, then passes.
FAILS_FIRST_THEN_WAITS_TEST = """import os, time


def test_first_attempt_fails():
    if os.environ["CI_ATTEMPT"] == "1":
        raise AssertionError("the first attempt fails")
    deadline = time.monotonic() + 120
    while not os.path.exists(%r) and time.monotonic() < deadline:
        time.sleep(0.05)
"""
COIN = "test_coin.py::test_coin"


def heads(seed: int, attempt: int) -> bool:
    """Whether the coin of COIN_TEST passes for ``seed`` on ``attempt``."""
    return random.Random("%d:%s" % (seed, attempt)).random() >= 0.5


def seed_for(throws: list[bool], first_attempt: int = 1) -> int:
    """A seed whose coin passes or fails as ``throws`` says on the attempts from ``first_attempt`` on."""
    return next(seed for seed in range(100000)
                if [heads(seed, first_attempt + index) for index in range(len(throws))] == throws)


def settled_lines(ci, sha: str) -> list[str]:
    """The dispatcher's lines saying the commit's verdict, once there is one: the line
    comes after the result files, so it may be a moment behind ``wait_result``."""

    def lines() -> list[str]:
        return re.findall(r"commit %s: (?:passed|failed|flaky|error|cancelled) \(attempt" % sha, ci.dispatcher.log())

    wait_until(lines, 10, message="the dispatcher's line with the verdict of %s" % sha[:12])
    return lines()


def test_a_test_that_fails_then_passes_is_flaky_and_only_it_ran_again_on_the_other_runner(ci, upstream):
    ci.start_dispatcher()
    first, second = ci.start_runner("--name", "first"), ci.start_runner("--name", "second")
    sha = upstream.commit({"test_coin.py": COIN_TEST % seed_for([False, True])}, "a flaky coin")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    result = ci.wait_result(sha)

    assert result["status"] == "flaky"
    assert result["flaky_tests"] == [COIN]
    # The counts, the runner and the attempts are the whole suite's run, which failed.
    assert (result["passed"], result["failed"], result["attempts"], result["run"]) == (2, 1, 1, 1)
    assert result["reason"] == "passed when run again: %s" % COIN
    [rerun] = result["reruns"]
    assert (rerun["rerun"], rerun["tests"], rerun["status"], rerun["failing"]) == (1, [COIN], "passed", [])
    # Only the failing test ran again, on the runner that did not run the suite.
    assert (rerun["passed"], rerun["failed"], rerun["attempts"]) == (1, 0, 1)
    assert {result["runner"], rerun["runner"]} == {"first", "second"}
    assert ci.result_files() == ci.expected_files([sha])
    report = ci.report(sha)
    assert report.startswith("commit:    %s\nverdict:   flaky\n" % sha)
    assert "flaky:     %s" % COIN in report
    suite, _, again = report.partition("==== rerun 1 of 2: 1 failing test, runner %s, attempt 2: passed ====\n"
                                       % rerun["runner"])
    assert "tails" in suite and "1 failed, 2 passed" in suite
    assert again and "1 passed" in again and "failed" not in again and "test_steady" not in again
    assert (ci.results_dir / (sha + ".log")).read_text().endswith(again)
    assert 'classname="test_coin" name="test_steady"' in (ci.results_dir / (sha + ".xml")).read_text()
    runner_of_rerun = first if rerun["runner"] == "first" else second
    runner_of_rerun.wait_for_log(r"commit %s attempt 2 accepted .*: a rerun of 1 failing test" % sha)
    assert settled_lines(ci, sha) == ["commit %s: flaky (attempt" % sha]

    listed = ctl(ci.address, "flaky")
    assert listed.returncode == 0, listed.stderr
    assert "in the last 1 run that ran tests" in listed.stdout
    assert re.search(r"100\.0%%  1 of 1  test_coin\.py::test_coin  \(last: %s run 1, failed passed" % sha[:12],
                     listed.stdout), listed.stdout
    document = json.loads(ctl(ci.address, "--json", "flaky").stdout)
    assert (document["window"], document["runs"]) == (100, 1)
    assert [(test["test"], test["flaky"], test["rate"], test["commit"], test["outcomes"])
            for test in document["tests"]] == [(COIN, 1, 1.0, sha, ["failed", "passed"])]
    shown = ctl(ci.address, "results", sha[:12]).stdout
    assert shown.startswith("%s: flaky" % sha) and "flaky:    %s" % COIN in shown

    page = wait_until(lambda: (sha, "flaky") in page_rows(ci.page()) and ci.page(), 30, message="the flaky row")
    assert 'class="count flaky" data-count="flaky">1 flaky' in page
    assert re.search(r'<tr class="flaky-test" data-test="%s"><td class="num">100.0%%</td><td class="num">1 of 1</td>'
                     % re.escape(COIN), page)
    assert "flaky (passed when run again, 1 rerun): <code>%s</code>" % COIN in page


def test_a_deterministic_failure_stays_failed_rerun_each_time_and_a_flaky_test_beside_it_is_named(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    # Attempt 1: both fail; attempt 2 (rerun 1): the coin passes; attempt 3 (rerun 2): test_bad alone.
    sha = upstream.commit({"test_bad.py": FAILING_TEST, "test_coin.py": COIN_TEST % seed_for([False, True])},
                          "a real failure and a flaky test")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    result = ci.wait_result(sha)
    assert result["status"] == "failed"
    assert result["flaky_tests"] == [COIN]
    assert result["reason"] == "failed again in 2 reruns; flaky: %s" % COIN
    bad = "test_bad.py::test_fails"
    assert [(rerun["rerun"], rerun["tests"], rerun["status"], rerun["failing"]) for rerun in result["reruns"]] == [
        (1, [bad, COIN], "failed", [bad]), (2, [bad], "failed", [bad])]
    assert [(rerun["passed"], rerun["failed"]) for rerun in result["reruns"]] == [(1, 1), (0, 1)]
    assert settled_lines(ci, sha) == ["commit %s: failed (attempt" % sha]
    ci.dispatcher.wait_for_log(r"rerun 2 of 2 queued: 1 failing test\(s\): %s" % re.escape(bad))

    # A coin that fails every time: failed, after the same two reruns.
    steady = upstream.commit({"test_bad.py": None, "test_coin.py": COIN_TEST % seed_for([False] * 3, 4)},
                             "a coin that always fails")
    assert ctl(ci.address, "dispatch", steady).returncode == 0
    result = ci.wait_result(steady)
    assert (result["status"], result["flaky_tests"]) == ("failed", [])
    assert [(rerun["tests"], rerun["failing"], rerun["attempt"]) for rerun in result["reruns"]] == [
        ([COIN], [COIN], 5), ([COIN], [COIN], 6)]
    assert json.loads(ctl(ci.address, "--json", "flaky").stdout)["tests"][0]["test"] == COIN


def test_flaky_reruns_0_turns_reruns_off(ci, upstream):
    ci.start_dispatcher("--flaky-reruns", "0")
    ci.start_runner()
    sha = upstream.commit({"test_coin.py": COIN_TEST % seed_for([False, True])}, "a flaky coin")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    result = ci.wait_result(sha)
    assert (result["status"], result["reruns"], result["flaky_tests"], result["reason"]) == ("failed", [], [], None)
    assert "queued: " not in ci.dispatcher.log() and "==== rerun" not in ci.report(sha)


def test_a_test_command_is_run_again_whole(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner("--test-command", 'test "$CI_ATTEMPT" != 1')
    sha = upstream.commit({"test_base.py": PASSING_TEST}, "tested by a command that fails once")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    result = ci.wait_result(sha)
    assert (result["status"], result["flaky_tests"]) == ("flaky", ["(test command)"])
    [rerun] = result["reruns"]
    assert (rerun["tests"], rerun["status"], rerun["failing"]) == (None, "passed", [])
    assert "==== rerun 1 of 2: the whole test command, runner" in ci.report(sha)


def test_a_dispatcher_killed_between_a_failure_and_its_rerun_loses_nothing(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    ci.start_dispatcher()
    runner = ci.start_runner()
    sha = upstream.commit({"test_once.py": FAILS_FIRST_THEN_WAITS_TEST % str(flag)}, "fails once")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    ci.dispatcher.wait_for_log(r"commit %s attempt 1 .*tests failed; rerun 1 of 2 queued" % sha)
    ci.dispatcher.kill()
    # The failure is recorded (the runner has its answer): the rerun is queued or out.
    ci.restart_dispatcher()
    runner.wait_for_log(r"commit %s attempt 2: testing again: 1 failing test\(s\) alone" % sha)
    flag.write_text("go")
    result = ci.wait_result(sha)
    assert (result["status"], result["flaky_tests"]) == ("flaky", ["test_once.py::test_first_attempt_fails"])
    assert [(rerun["attempt"], rerun["status"]) for rerun in result["reruns"]] == [(2, "passed")]
    assert "the first attempt fails" in ci.report(sha)
    assert ci.result_files() == ci.expected_files([sha])
    assert settled_lines(ci, sha) == ["commit %s: flaky (attempt" % sha]
    assert json.loads(ctl(ci.address, "--json", "flaky").stdout)["tests"][0]["commit"] == sha


def test_a_runner_killed_mid_rerun_hands_it_to_another_within_the_same_run(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    ci.start_dispatcher("--heartbeat-interval", "0.3")
    ci.start_runner("--name", "one")
    sha = upstream.commit({"test_once.py": FAILS_FIRST_THEN_WAITS_TEST % str(flag)}, "fails once")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    ci.runners[0].wait_for_log(r"commit %s attempt 2: testing again" % sha)
    ci.start_runner("--name", "two")
    ci.runners[0].kill()
    ci.runners[1].wait_for_log(r"commit %s attempt 3: testing again" % sha, timeout=30)
    flag.write_text("go")
    result = ci.wait_result(sha)
    assert (result["status"], result["run"], result["attempts"]) == ("flaky", 1, 1)
    [rerun] = result["reruns"]
    assert (rerun["attempt"], rerun["attempts"], rerun["runner"]) == (3, 2, "two")
    assert settled_lines(ci, sha) == ["commit %s: flaky (attempt" % sha]
    assert ci.result_files() == ci.expected_files([sha])
