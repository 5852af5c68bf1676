"""Culprit finding: 32 commits pushed at once to 2 runners, commit 13 breaking a test
for good. How soon is commit 13 named (``first_failing``)?

A bare upstream, a developer's clone that pushes to it, an observer polling it
(``--interval 0.2``), a dispatcher (``--flaky-reruns 0``: the failure is real, and
its reruns would only add runs) and two real runners. Each commit's suite has one
test that takes ``TEST_SECONDS``. Twice, on a fresh installation each:

* every-commit mode (the default): the 32 verdicts, each checked against what the
  commit holds, and how many of the 32 runs had ended (result files written) when
  commit 13's ``<sha>.json`` first named itself as ``first_failing`` -- it must be
  fewer than 32: named before the queue drains;
* ``--coalesce``: how many runs (result files of the burst) it took to name commit
  13; the issue's target is at most 7.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import (
    Daemons,
    Row,
    clone,
    commit,
    first_tip,
    git,
    start_dispatcher,
    start_observer,
    start_runner,
    verdict,
    wait_runners_ready,
    wait_until,
)
from bench.detection import make_upstream
from bench.tip_first import suite as timed_suite

BURST = 32
#: Commit 13 (index 12) adds a test that fails, and it stays.
BREAKS = 12
RUNNERS = 2
INTERVAL_S = 0.2
POLL_S = 0.01
MAX_RUNS_COALESCE = 7
RESULT_TIMEOUT_S = 300.0


def suite(index: int, seconds: float) -> dict[str, str]:
    files = timed_suite(index, seconds)
    if index == BREAKS:
        files["test_broken.py"] = "def test_broken():\n    assert 1 + 1 == 3\n"
    return files


def read(results: Path, sha: str) -> dict | None:
    try:
        return json.loads((results / (sha + ".json")).read_text())
    except (FileNotFoundError, ValueError):
        return None


def one(work: Path, seconds: float, *options: str) -> tuple[int, float, dict[str, str], list[str], Path]:
    """One installation, one burst: (runs ended when commit 13 was named, seconds from
    the push, each commit's verdict so far, the burst, the results folder)."""
    upstream, developer = make_upstream(work)
    (work / "daemons").mkdir()
    with Daemons(work / "daemons") as daemons:
        _, address, results = start_dispatcher(daemons, work, "--flaky-reruns", "0", *options)
        for index in range(RUNNERS):
            start_runner(daemons, "runner-%d" % (index + 1), clone(upstream, work / ("runner-%d" % index)), address)
        wait_runners_ready(address, RUNNERS)
        observer = start_observer(daemons, clone(upstream, work / "observer-clone"), address, INTERVAL_S)
        first = first_tip(observer)
        wait_until(lambda: read(results, first), RESULT_TIMEOUT_S, POLL_S, "result of the first commit")
        shas = [commit(developer, suite(index, seconds), "burst %d" % index) for index in range(BURST)]
        git(developer, "push", "--quiet", "origin", "main")
        pushed = time.perf_counter()
        culprit = shas[BREAKS]
        wait_until(lambda: (read(results, culprit) or {}).get("first_failing") == culprit, RESULT_TIMEOUT_S, POLL_S,
                   "commit 13 named")
        elapsed = time.perf_counter() - pushed
        runs = sum(1 for sha in shas if read(results, sha))
        if "--coalesce" not in options:
            wait_until(lambda: all(read(results, sha) for sha in shas), RESULT_TIMEOUT_S, POLL_S, "every verdict")
        verdicts = {sha: (read(results, sha) or {}).get("status") for sha in shas}
        return runs, elapsed, verdicts, shas, results


def run(work: Path, quick: bool) -> list[Row]:
    seconds = 0.1 if quick else 0.5
    (work / "every").mkdir()
    runs, elapsed, verdicts, shas, results = one(work / "every", seconds)
    right = sum(1 for index, sha in enumerate(shas) if verdicts[sha] == ("failed" if index >= BREAKS else "passed"))
    named = sum(1 for index, sha in enumerate(shas)
                if index >= BREAKS and (read(results, sha) or {}).get("first_failing") == shas[BREAKS])
    (work / "coalesce").mkdir()
    c_runs, c_elapsed, c_verdicts, c_shas, _ = one(work / "coalesce", seconds, "--coalesce")
    c_right = all(status == ("failed" if index >= BREAKS else "passed")
                  for index, status in enumerate(c_verdicts[sha] for sha in c_shas) if status is not None)
    print("culprit: every-commit mode named commit 13 after %d of %d runs; --coalesce after %d runs"
          % (runs, BURST, c_runs))
    return [
        Row("culprit",
            "%d commits pushed at once, %d runners, commit 13 breaks a test for good (%.1f s suite): runs ended "
            "when first_failing names commit 13" % (BURST, RUNNERS, seconds),
            "%d of %d runs (%.2f s after the push); verdicts right %d of %d; failed commits naming it %d of %d"
            % (runs, BURST, elapsed, right, BURST, named, BURST - BREAKS),
            "the queue drained: %d runs" % BURST,
            "< %d runs, every verdict right" % BURST,
            verdict(runs < BURST and right == BURST and named == BURST - BREAKS)),
        Row("culprit",
            "the same with --coalesce: test runs until first_failing names commit 13",
            "%d runs (%.2f s after the push); verdicts of the runs right: %s" % (c_runs, c_elapsed,
                                                                               "yes" if c_right else "no"),
            "every-commit mode: %d runs" % runs,
            "<= %d runs" % MAX_RUNS_COALESCE,
            verdict(c_runs <= MAX_RUNS_COALESCE and c_right)),
    ]
