"""Scaling: M = 10 x R commits on R runners, against the tests' own time.

Each generated commit has a test that sleeps 2 s: mostly waiting, so on 2 cores
the runners can overlap. With R runners registered and idle, the benchmark
dispatches M = 10 x R new commits at once and waits for their M result files; the
efficiency is the tests' own time (the test cases' times in the commits' JUnit XML,
summed) / R / wall time: 1.0 is the physical limit, every runner running test code
all the time. The overhead row (at R = 1) is what a job costs outside its test
command: wall time / M less the mean time the runners measured the test command to
run (``duration_s``). For reference the rows also give one such commit checked out
and tested by hand (reset, clean, the same test command), measured twice right
before each level.

Both sides run the runner's default pytest command with plugin auto-loading off
(``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` in the environment of the runners and of the
by-hand run): on this machine the installed plugins (hypothesis) cost about 1
CPU-second per run, which would turn "tests that mostly wait" into tests that need
more than 2 cores at R = 8, and measure the machine rather than the system. By
hand, pytest starts in a new Python each time; a runner forks each job's from a warm
pytest (warm_pytest.py) where it can: as root, with its jobs run as another user in
a sandbox (isolation.py, what a runner started with no options gets), one started
between jobs and frozen while the runner checks out; as its own user, one started
while the job before runs. Without cgroup v2 a root runner's jobs start a fresh
Python, and the cost of that is in the numbers.

One dispatcher serves every level; runners are added as R grows (1, 2, 4, 8), each
with its own clone, which already holds the commits (so, as by hand, no fetch).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.common import (
    BenchError,
    Daemons,
    Row,
    clone,
    commit,
    median,
    new_repo,
    result_exists,
    run_by_hand,
    start_dispatcher,
    start_runner,
    verdict,
    wait_runners_ready,
    wait_until,
)

#: Efficiency against the tests' own time: up to 2 runners, and beyond (issue 13).
TARGET_EFFICIENCY_FEW = 0.90
TARGET_EFFICIENCY_MANY = 0.80
#: Seconds a job may cost outside its test command, at one runner.
TARGET_OVERHEAD_S = 0.15
JOBS_PER_RUNNER = 10
SLEEP_S = 2.0
POLL_S = 0.02

#: pytest without installed plugins (hypothesis, ...), on both sides.
NO_PLUGINS = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

SLEEPING_TEST = "import time\n\nCOMMIT = %d\n\ndef test_sleeps():\n    time.sleep(%s)\n"


def run(work: Path, quick: bool) -> list[Row]:
    levels = (1, 2, 4, 8)
    per_runner = 1 if quick else JOBS_PER_RUNNER
    sleep = 0.2 if quick else SLEEP_S
    upstream = new_repo(work / "upstream", {"test_sleep.py": SLEEPING_TEST % (0, sleep)})
    commits = [commit(upstream, {"test_sleep.py": SLEEPING_TEST % (index + 1, sleep)}, "sleepy %d" % index)
               for index in range(per_runner * sum(levels) + 1)]
    hand_clone = clone(upstream, work / "by-hand-clone")
    clones = [clone(upstream, work / ("runner-%d-clone" % (index + 1))) for index in range(max(levels))]
    # The last commit is the by-hand one; the others go through the system.
    queue = iter(commits[:-1])
    rows = []
    with Daemons(work) as daemons:
        _, address, results = start_dispatcher(daemons, work)
        started = 0
        for runners in levels:
            while started < runners:
                started += 1
                runner = start_runner(daemons, "runner-%d" % started, clones[started - 1], address,
                                      env=dict(os.environ, **NO_PLUGINS))
                # A runner is started once and serves for long: time it once it is ready
                # (with its warm pytest, or knowing it has none).
                runner.wait_for_log(r"registered with dispatcher")
                runner.wait_for_log(r"warm pytest ready|fresh Python")
            wait_runners_ready(address, runners)
            baseline = median([run_by_hand(hand_clone, commits[-1], work, extra_env=NO_PLUGINS) for _ in range(2)])
            batch = [next(queue) for _ in range(per_runner * runners)]
            wall = run_batch(address, results, batch)
            own = sum(tests_own_time(results, sha) for sha in batch)
            efficiency = own / runners / wall
            target = TARGET_EFFICIENCY_FEW if runners <= 2 else TARGET_EFFICIENCY_MANY
            rows.append(Row(
                "scaling",
                "R=%d runners, M=%d commits of a %g s test: efficiency against the tests' own time"
                % (runners, len(batch), sleep),
                "%.3f (wall %.1f s, tests %.1f s)" % (efficiency, wall, own),
                "%.2f s per commit by hand (x%.3f)" % (baseline, len(batch) * baseline / runners / wall),
                ">= %.2f" % target,
                verdict(efficiency >= target),
            ))
            if runners == 1:
                command = sum(test_command_time(results, sha) for sha in batch) / len(batch)
                overhead = wall / len(batch) - command
                rows.append(Row(
                    "scaling",
                    "per-job overhead outside the test command, 1 runner",
                    "%.3f s (%.3f s per job, test command %.3f s)" % (overhead, wall / len(batch), command),
                    "tests' own %.3f s per job" % (own / len(batch)),
                    "<= %.2f s" % TARGET_OVERHEAD_S,
                    verdict(overhead <= TARGET_OVERHEAD_S),
                ))
    return rows


def tests_own_time(results: Path, sha: str) -> float:
    """Seconds the test cases of ``sha``'s JUnit XML say they took."""
    from commit_ci import junit

    report = junit.read(str(results / (sha + ".xml")))
    if report is None:
        raise BenchError("%s has no JUnit XML" % sha[:12])
    return sum(float(case.get("time") or 0) for case in report[1].iter("testcase"))


def test_command_time(results: Path, sha: str) -> float:
    """Seconds the runner measured ``sha``'s test command to run (its ``duration_s``)."""
    return float(json.loads((results / (sha + ".json")).read_text())["duration_s"])


def run_batch(address: tuple[str, int], results: Path, batch: list[str]) -> float:
    """Dispatch every commit of ``batch`` over one connection; seconds until all have results."""
    from commit_ci.client import Connection
    from commit_ci.protocol import request

    started = time.perf_counter()
    with Connection(address) as connection:
        for sha in batch:
            answer = connection.request(request("dispatch", commit=sha))
            if answer.verb != "OK" or answer.get("new") != 1:
                raise BenchError("dispatch of %s answered %s" % (sha[:12], answer))
    timeout = 60 + len(batch) * 30
    wait_until(lambda: all(result_exists(results, sha) for sha in batch), timeout, POLL_S,
               "results of %d commits" % len(batch))
    return time.perf_counter() - started
