"""Branches and the queue's order, with real daemons: several watched branches, patterns,
each branch's state, the tip first (or oldest first with --order fifo), across a restart."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from commit_ci import client, protocol, wire

from conftest import FAILING_TEST, PASSING_TEST, ROOT, WAITS_FOR_FLAG_TEST, git, wait_until
from test_end_to_end import push_at_once


def ask(ci, verb: str, **fields) -> dict:
    answer = client.communicate(wire.parse_address(ci.address), protocol.request(verb, **fields), timeout=10)
    assert answer.verb == "OK", answer
    return json.loads(answer.sections["json"])


def branch_states(ci) -> dict[str, dict]:
    return {branch["branch"]: branch for branch in ask(ci, "branches")["branches"]}


def wait_branch(ci, name: str, **expected) -> dict:
    def matches():
        found = branch_states(ci).get(name)
        return found if found and all(found[key] == value for key, value in expected.items()) else None

    return wait_until(matches, 30, message="branch %s with %s" % (name, expected))


def passing_commit(index: int):
    return {"test_step.py": PASSING_TEST.replace("test_passes", "test_step_%d" % index)}, "passed"


def started_order(ci, commits: list[str], after: int = 0) -> list[str]:
    """The commits among ``commits`` in the order the dispatcher gave them to runners."""
    started = re.findall(r"commit ([0-9a-f]{40}) attempt \d+: running on runner", ci.dispatcher.log()[after:])
    return [sha for sha in started if sha in commits]


def test_a_commit_pushed_to_two_watched_branches_is_tested_once_and_both_show_it(ci, upstream):
    git(upstream.path, "branch", "feature")
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer("--branch", "main", "--branch", "feature")
    ci.observer.wait_for_log(r"first run on origin/feature: starting from its tip")
    ci.wait_result(upstream.head())

    shared = upstream.commit({"test_shared.py": PASSING_TEST.replace("passes", "shared")}, "on both branches")
    git(upstream.path, "branch", "--force", "feature", shared)

    assert ci.wait_result(shared)["attempts"] == 1
    for name in ("main", "feature"):
        wait_branch(ci, name, state="green", commit=shared, tip=shared, tip_state="passed")
    assert sorted(ask(ci, "lookup", commit=shared)["branches"]) == ["feature", "main"]
    log = ci.dispatcher.log()
    assert len(re.findall(r"commit %s queued" % shared, log)) == 1, "queued once"
    assert len(re.findall(r"commit %s attempt \d+: running on runner" % shared, log)) == 1, "tested once"
    assert re.search(r"commit %s dispatched again by \S+: already \w+ \(branch (main|feature)\)" % shared, log)
    wait_until(lambda: 'data-branch="feature" data-state="green"' in ci.page(), 30, message="feature on the page")


def test_a_pattern_picks_up_a_branch_created_later(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer("--branch", "main", "--branch", "release/*")
    ci.wait_result(upstream.head())
    assert "release" not in json.dumps(branch_states(ci))

    # The branch appears with its commit in one step (made on a detached HEAD).
    git(upstream.path, "checkout", "--quiet", "--detach")
    released = upstream.commit({"test_release.py": PASSING_TEST.replace("passes", "released")}, "release 1.0")
    git(upstream.path, "branch", "release/1.0", released)
    git(upstream.path, "checkout", "--quiet", "main")

    assert ci.wait_result(released)["status"] == "passed"
    wait_branch(ci, "release/1.0", state="green", commit=released)
    ci.observer.wait_for_log(r"first run on origin/release/1\.0: starting from its tip %s" % released)
    assert set(branch_states(ci)) == {"main", "release/1.0"}


@pytest.mark.parametrize("order", ["tip", "fifo"])
def test_with_the_runner_busy_a_burst_runs_tip_first_or_oldest_first(ci, upstream, tmp_path, order):
    flag = tmp_path / "release-the-test"
    ci.start_dispatcher("--order", order)
    runner = ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    waiting = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "waits")
    runner.wait_for_log(r"commit %s attempt \d+: testing" % waiting)

    burst = [sha for sha, _ in push_at_once(upstream, 5, passing_commit)]
    wait_until(lambda: ask(ci, "queue")["queued_total"] == 5, 30, message="the burst queued")
    queued = [job["commit"] for job in ask(ci, "queue")["queued"]]
    flag.touch()
    ci.wait_results(burst, timeout=120)

    expected = list(reversed(burst)) if order == "tip" else burst
    assert queued == expected, "the queue lists the jobs in the order they run"
    assert started_order(ci, burst) == expected


def test_a_branch_goes_green_then_red_since_the_breaking_commit_then_green(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer()
    ci.wait_result(upstream.head())
    wait_branch(ci, "main", state="green", commit=upstream.head())

    broken = upstream.commit({"test_bad.py": FAILING_TEST}, "breaks a test")
    ci.wait_result(broken)
    wait_branch(ci, "main", state="red", since=broken, commit=broken)
    still = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "still broken")
    ci.wait_result(still)
    wait_branch(ci, "main", state="red", since=broken, commit=still)
    status = subprocess.run([sys.executable, "-m", "commit_ci.ctl", "--dispatcher-server", ci.address, "status"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert re.search(r"main +red since %s, tip %s passed|main +red since %s, tip %s failed"
                     % (broken[:12], still[:12], broken[:12], still[:12]), status.stdout), status.stdout
    wait_until(lambda: 'data-branch="main" data-state="red"' in ci.page(), 30, message="main red on the page")

    fixed = upstream.commit({"test_bad.py": None}, "fixes it")
    ci.wait_result(fixed)
    wait_branch(ci, "main", state="green", since=fixed, commit=fixed)


def test_a_dispatcher_restart_keeps_the_queue_order(ci, upstream):
    ci.start_dispatcher()
    ci.start_observer()
    initial = upstream.head()
    wait_until(lambda: ask(ci, "queue")["queued_total"] == 1, 30, message="the first tip queued")
    burst = [sha for sha, _ in push_at_once(upstream, 5, passing_commit)]
    wait_until(lambda: ask(ci, "queue")["queued_total"] == 6, 30, message="the burst queued")
    expected = list(reversed(burst)) + [initial]
    assert [job["commit"] for job in ask(ci, "queue")["queued"]] == expected

    ci.dispatcher.kill()
    offset = len(ci.dispatcher.log())
    ci.restart_dispatcher()
    assert [job["commit"] for job in ask(ci, "queue")["queued"]] == expected
    ci.start_runner()
    ci.wait_results(expected, timeout=120)
    assert started_order(ci, expected, after=offset) == expected
