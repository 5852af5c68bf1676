"""Culprit finding with real daemons: 32 commits pushed at once to 2 runners, commit 13
breaking a test for good. Every verdict right and first_failing naming commit 13
before the queue drains; with --coalesce, named after at most 7 runs, the commits not
tested ``skipped`` (not queued); first_failing kept across a dispatcher SIGKILL."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys

from commit_ci import client, protocol, wire

from conftest import FAILING_TEST, PASSING_TEST, ROOT, wait_until
from test_end_to_end import push_at_once

BURST = 32
#: Commit 13 of the burst (index 12) adds a failing test, which stays.
BREAKS = 12


def ask(ci, verb: str, **fields) -> dict:
    answer = client.communicate(wire.parse_address(ci.address), protocol.request(verb, **fields), timeout=10)
    assert answer.verb == "OK", answer
    return json.loads(answer.sections["json"])


def burst_commit(index: int):
    files = {"test_step.py": PASSING_TEST.replace("test_passes", "test_step_%d" % index)}
    if index == BREAKS:
        files["test_broken.py"] = FAILING_TEST
    return files, "failed" if index >= BREAKS else "passed"


def start(ci, upstream, *options: str, runners: int = 2) -> None:
    # No reruns of the failing test: it fails every time, and 20 failing commits would
    # each run it twice more.
    ci.start_dispatcher("--flaky-reruns", "0", *options)
    for _ in range(runners):
        ci.start_runner()
    ci.start_observer()
    assert ci.wait_result(upstream.head())["status"] == "passed"


def started(ci) -> list[str]:
    return re.findall(r"commit ([0-9a-f]{40}) attempt \d+: running on runner", ci.dispatcher.log())


def test_every_commit_mode_names_commit_13_before_the_queue_drains(ci, upstream):
    start(ci, upstream)
    made = push_at_once(upstream, BURST, burst_commit)
    culprit = made[BREAKS][0]
    results = ci.wait_results([sha for sha, _ in made], timeout=300)

    assert {sha: results[sha]["status"] for sha, _ in made} == dict(made), "every verdict right"
    for sha, verdict in made:
        expected = culprit if verdict == "failed" else None
        assert results[sha].get("first_failing") == expected, sha
    assert "broken by: %s" % culprit in ci.report(made[-1][0])
    log = ci.dispatcher.log()
    named = log.index("first failing commit %s" % culprit)
    last_start = max(log.rindex("commit %s attempt" % sha) for sha in started(ci))
    assert named < last_start, "named while commits were still to run"
    assert len(set(started(ci))) == len(started(ci)), "each commit run once"
    wait_until(lambda: 'data-first-failing="%s"' % culprit in ci.page(), 30, message="broken by on the page")
    lookup = subprocess.run([sys.executable, "-m", "commit_ci.ctl", "--dispatcher-server", ci.address, "results",
                             made[-1][0][:12]], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert "broken by: %s" % culprit in lookup.stdout, lookup.stdout


#: Order-dependent: ``test_second`` fails when ``test_first`` ran before it in the same
#: session (the whole suite), and passes when it runs alone (the rerun of the failing
#: tests): a flaky test whose flakiness is known in advance.
ORDER_DEPENDENT_TEST = """import sys

def test_first():
    sys.modules[__name__].touched = True

def test_second():
    assert not getattr(sys.modules[__name__], "touched", False), "test_first ran before me"
"""
#: Commit 5 of the burst (index 4) has the order-dependent test; commit 6 removes it.
FLAKY_AT = 4


def test_the_issue_setup_with_the_defaults_a_flaky_commit_and_the_culprit(ci, upstream):
    """The issue's setup as one run, with the dispatcher's defaults (failing tests run
    twice more): 32 commits at once, 2 runners, commit 13 breaks a test for good, commit
    5 has a flaky test. Every verdict right (commit 5 flaky), commit 13 named by every
    failing commit before the queue drains, the flaky commit naming no culprit."""
    ci.start_dispatcher()
    for _ in range(2):
        ci.start_runner()
    ci.start_observer()
    assert ci.wait_result(upstream.head())["status"] == "passed"

    def setup_commit(index: int):
        files, verdict = burst_commit(index)
        if index == FLAKY_AT:
            files["test_order.py"] = ORDER_DEPENDENT_TEST
            verdict = "flaky"
        elif index == FLAKY_AT + 1:
            files["test_order.py"] = None
        return files, verdict

    made = push_at_once(upstream, BURST, setup_commit)
    culprit = made[BREAKS][0]
    results = ci.wait_results([sha for sha, _ in made], timeout=400)
    assert {sha: results[sha]["status"] for sha, _ in made} == dict(made), "every verdict right"
    assert results[made[FLAKY_AT][0]]["flaky_tests"] == ["test_order.py::test_second"]
    for sha, verdict in made:
        assert results[sha].get("first_failing") == (culprit if verdict == "failed" else None), sha
    log = ci.dispatcher.log()
    named = log.index("first failing commit %s" % culprit)
    last_start = max(log.rindex("commit %s attempt" % sha) for sha in started(ci))
    assert named < last_start, "named while commits were still to run"


def test_coalesce_names_commit_13_after_at_most_7_runs_and_skips_the_rest(ci, upstream):
    start(ci, upstream, "--coalesce")
    made = push_at_once(upstream, BURST, burst_commit)
    culprit = made[BREAKS][0]
    named = wait_until(lambda: (ci.result(culprit) or {}).get("first_failing"), 120, message="commit 13 named")
    assert named == culprit
    wait_until(lambda: ask(ci, "queue")["queued_total"] == 0 and not ask(ci, "queue")["running"], 60,
               message="nothing queued or running")
    tested = [sha for sha, _ in made if ci.result(sha)]
    print("coalesce: commit 13 named after %d test runs" % len(tested))
    assert len(tested) <= 7, tested
    assert made[-1][0] in tested and culprit in tested
    for sha, verdict in made:
        result = ci.result(sha)
        if result:
            assert result["status"] == verdict
            if verdict == "failed":  # judged before the culprit was known: its files are rewritten after
                result = wait_until(lambda: (ci.result(sha) or {}).get("first_failing") and ci.result(sha), 30,
                                    message="commit %s's files naming the culprit" % sha[:12])
            assert result.get("first_failing") == (culprit if verdict == "failed" else None)
        else:
            assert ask(ci, "lookup", commit=sha)["state"] == "skipped"
    status = client.communicate(wire.parse_address(ci.address), protocol.request("status"), timeout=10)
    assert status.get("queued") == 0 and status.get("running") == 0


def test_first_failing_survives_a_dispatcher_sigkill(ci, upstream):
    start(ci, upstream, runners=1)
    made = push_at_once(upstream, 4, lambda index: burst_commit(index + BREAKS - 1))  # passes, then breaks
    culprit = made[1][0]
    ci.wait_results([sha for sha, _ in made], timeout=120)
    wait_until(lambda: all((ci.result(sha) or {}).get("first_failing") == culprit for sha, _ in made[1:]), 30,
               message="every failing commit names the culprit")
    ci.dispatcher.kill()
    # As if killed between recording it and rewriting the files: the files do not say
    # it, the store says it must still be written.
    tip = made[-1][0]
    path = ci.results_dir / (tip + ".json")
    summary = json.loads(path.read_text())
    summary["first_failing"] = None
    path.write_text(json.dumps(summary))
    with sqlite3.connect(str(ci.results_dir) + ".queue.sqlite3") as db:
        db.execute("UPDATE jobs SET first_failing_pending = 1 WHERE commit_id = ?", (tip,))
    offset = len(ci.dispatcher.log())
    ci.restart_dispatcher()
    ci.dispatcher.wait_for_log(r"commit %s: first failing commit %s named" % (tip, culprit), after=offset)
    assert ci.result(tip)["first_failing"] == culprit
    assert "broken by: %s" % culprit in ci.report(tip)
    assert ask(ci, "lookup", commit=tip)["summary"]["first_failing"] == culprit
