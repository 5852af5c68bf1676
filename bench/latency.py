"""Latency: one commit, from ``dispatch`` to its result file, against the same work by hand.

A generated repository with a small passing pytest suite; a dispatcher and one real
runner. For each commit the benchmark times two things, one right after the other,
alternating which goes first:

* by hand, in a clone of its own: ``git reset --hard``, ``git clean -xdf``, then the
  runner's pytest command with the runner's environment;
* through the system: ``dispatch`` sent to the dispatcher until ``<sha>.json`` is
  in the results folder (polled every 2 ms: that is the resolution).

Both clones already hold the commit (the benchmark fetches it into both before
timing), so the two sides do the same git work: the ratio is what the system adds
to the bare cost of testing. The first commit only warms the caches. The row also gives the system's time outside
the test command (dispatch to result file, less the test run the runner timed): a
figure that other load on the machine barely moves, unlike the ratio.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import (
    Daemons,
    Row,
    clone,
    commit,
    dispatch_and_wait,
    git,
    median,
    new_repo,
    run_by_hand,
    start_dispatcher,
    start_runner,
    verdict,
    wait_runners_ready,
)

TARGET_RATIO = 1.10
RESULT_TIMEOUT_S = 60.0
MODULES = 5
TESTS_PER_MODULE = 4


def suite(variant: int) -> dict[str, str]:
    """A small passing suite; ``variant`` changes one constant so each commit differs."""
    files = {}
    for module in range(MODULES):
        tests = ["VARIANT = %d\n" % variant] if module == 0 else []
        for index in range(TESTS_PER_MODULE):
            tests.append("\ndef test_%d_%d():\n    assert sum(range(%d)) == %d\n"
                         % (module, index, index + 10, sum(range(index + 10))))
        files["tests/test_module_%d.py" % module] = "".join(tests)
    return files


def through_ci(address: tuple[str, int], results: Path, sha: str) -> tuple[float, float]:
    """Seconds from ``dispatch`` to the result file, and of those the seconds the
    runner measured its test command to take (``duration_s`` of the result)."""
    elapsed, summary = dispatch_and_wait(address, results, sha, RESULT_TIMEOUT_S)
    return elapsed, summary["duration_s"]


def run(work: Path, quick: bool) -> list[Row]:
    samples = 3 if quick else 9
    upstream = new_repo(work / "upstream", suite(0))
    runner_clone = clone(upstream, work / "runner-clone")
    hand_clone = clone(upstream, work / "by-hand-clone")
    ratios, system_times, hand_times, outside = [], [], [], []
    with Daemons(work) as daemons:
        _, address, results = start_dispatcher(daemons, work)
        start_runner(daemons, "runner-1", runner_clone, address)
        wait_runners_ready(address, 1)
        for index in range(samples + 1):
            sha = commit(upstream, suite(index + 1), "change %d" % index)
            for repo in (runner_clone, hand_clone):
                git(repo, "fetch", "--quiet", "origin")
            if index % 2:
                hand = run_by_hand(hand_clone, sha, work)
                system, tests = through_ci(address, results, sha)
            else:
                system, tests = through_ci(address, results, sha)
                hand = run_by_hand(hand_clone, sha, work)
            if index == 0:
                continue  # warm-up
            system_times.append(system)
            hand_times.append(hand)
            ratios.append(system / hand)
            outside.append(system - tests)
    ratio = median(ratios)
    return [
        Row(
            "latency",
            "dispatch -> result file, 1 runner, median ratio of %d commits" % samples,
            "%.3f (%.0f ms, of which %.0f ms outside the test command; ratios %.2f-%.2f)"
            % (ratio, median(system_times) * 1000, median(outside) * 1000, min(ratios), max(ratios)),
            "%.0f ms by hand" % (median(hand_times) * 1000),
            "<= %.2f" % TARGET_RATIO,
            verdict(ratio <= TARGET_RATIO),
        )
    ]
