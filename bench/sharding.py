"""Sharding: one commit's tests split over 4 idle runners; push -> result against by hand.

A bare upstream, a developer's clone that pushes to it, an observer polling it
(``--interval 0.2``), a dispatcher and four real runners. The repository has
``FILES`` test files of one test each, each sleeping ``TEST_SECONDS``: about 20 s by
hand. The benchmark pushes a first commit of them (run whole: the dispatcher knows no
durations yet, and learns them from it), then a second that changes every file, and
times it from the moment ``git push`` returns to its ``<sha>.json`` (polled every
2 ms). The baseline, measured in the same run: a clean checkout of that commit and
its tests run by hand, as the runner's default command runs them. The issue's target
is 0.35 times by hand, with the result counting every test passed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import (
    BenchError,
    Daemons,
    Row,
    clone,
    commit,
    first_tip,
    git,
    result_exists,
    run_by_hand,
    start_dispatcher,
    start_observer,
    start_runner,
    verdict,
    wait_runners_ready,
    wait_until,
)
from bench.detection import make_upstream

TARGET_RATIO = 0.35
FILES = 40
TEST_SECONDS = 0.5
RUNNERS = 4
INTERVAL_S = 0.2
POLL_S = 0.002
RESULT_TIMEOUT_S = 180.0


def suite(files: int, seconds: float, version: int) -> dict[str, str]:
    """``files`` test files of one test that takes ``seconds``; ``version`` makes each commit differ."""
    return {"tests/test_file%02d.py" % index: "import time\n\nVERSION = %d\n\n\ndef test_sleeps():\n    time.sleep(%r)\n"
            % (version, seconds) for index in range(files)}


def push_and_wait(developer: Path, results: Path, sha: str) -> tuple[float, dict]:
    git(developer, "push", "--quiet", "origin", "main")
    pushed = time.perf_counter()
    wait_until(lambda: result_exists(results, sha), RESULT_TIMEOUT_S, POLL_S, "result of %s" % sha[:12])
    elapsed = time.perf_counter() - pushed
    return elapsed, json.loads((results / (sha + ".json")).read_text())


def run(work: Path, quick: bool) -> list[Row]:
    files, seconds, runners = (8, 0.1, 2) if quick else (FILES, TEST_SECONDS, RUNNERS)
    upstream, developer = make_upstream(work)
    with Daemons(work / "daemons") as daemons:
        (work / "daemons").mkdir()
        _, address, results = start_dispatcher(daemons, work / "daemons")
        for index in range(runners):
            start_runner(daemons, "runner-%d" % (index + 1), clone(upstream, work / ("runner-%d" % index)), address)
        wait_runners_ready(address, runners)
        observer = start_observer(daemons, clone(upstream, work / "observer-clone"), address, INTERVAL_S)
        tip = first_tip(observer)
        wait_until(lambda: result_exists(results, tip), RESULT_TIMEOUT_S, POLL_S, "result of %s" % tip[:12])
        git(developer, "rm", "--quiet", "test_base.py")
        first_sha = commit(developer, suite(files, seconds, 1), "the suite: teaches the durations")
        first, first_summary = push_and_wait(developer, results, first_sha)
        sha = commit(developer, suite(files, seconds, 2), "every file changed")
        elapsed, summary = push_and_wait(developer, results, sha)
    if summary["status"] != "passed" or first_summary["status"] != "passed":
        raise BenchError("commit %s: %s (%s); see %s" % (sha[:12], summary["status"], summary["reason"], results / sha))
    by_hand_folder = work / "by-hand"
    by_hand_folder.mkdir()
    by_hand = run_by_hand(clone(upstream, by_hand_folder / "clone"), sha, by_hand_folder)
    ratio = elapsed / by_hand
    shards = len(summary.get("shards") or [])
    return [
        Row(
            "sharding",
            "%d files of one %g s test, %d idle runners, push -> result, durations learned" % (files, seconds, runners),
            "%.2f s (x%.2f by hand; %d passed, %d shards)" % (elapsed, ratio, summary["passed"], shards),
            "by hand: %.2f s" % by_hand,
            "<= x%.2f, %d passed" % (TARGET_RATIO, files),
            verdict(ratio <= TARGET_RATIO and summary["passed"] == files and shards > 1),
        ),
        Row(
            "sharding",
            "the commit before, nothing learned yet (run whole), push -> result",
            "%.2f s (x%.2f by hand; %d shards)" % (first, first / by_hand, len(first_summary.get("shards") or [])),
            "by hand: %.2f s" % by_hand,
            "-",
            "-",
        ),
    ]
