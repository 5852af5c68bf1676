"""Tip first: 32 commits pushed at once, 2 runners; how soon is the tip's verdict there?

A bare upstream, a developer's clone that pushes to it, an observer polling it
(``--interval 0.2``), a dispatcher and two real runners. Each commit's suite has one
test that takes ``TEST_SECONDS``, so that a commit waiting behind another shows. In
each round the benchmark, alternating which goes first:

* pushes one commit to the idle system and times it from the moment ``git push``
  returns to its ``<sha>.json`` (polled every 2 ms): the lone commit's latency, the
  baseline;
* makes 32 commits in the developer's clone (untimed), pushes them in one push and
  times the same for the newest of them, the tip; then waits for all 32 verdicts, so
  that the next round starts idle.

The figure is the median tip latency over the median lone latency; the issue's
target is 1.5. The same burst is then pushed once to a second system whose
dispatcher runs ``--order fifo`` (oldest first, the order before tips), with its own
lone commit, to show what the order changes.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    Daemons,
    Row,
    clone,
    commit,
    first_tip,
    git,
    median,
    result_exists,
    start_dispatcher,
    start_observer,
    start_runner,
    verdict,
    wait_runners_ready,
    wait_until,
)
from bench.detection import make_upstream

TARGET_RATIO = 1.5
BURST = 32
RUNNERS = 2
INTERVAL_S = 0.2
POLL_S = 0.002
#: Longest a lone commit or a tip may take; a whole burst gets one per commit.
RESULT_TIMEOUT_S = 120.0


def suite(index: int, seconds: float) -> dict[str, str]:
    """One test that takes ``seconds``; ``index`` makes each commit differ."""
    return {"test_step.py": "import time\n\nSTEP = %d\n\ndef test_step():\n    time.sleep(%r)\n" % (index, seconds)}


class System:
    """One CI installation on the upstream: dispatcher, runners and observer."""

    def __init__(self, daemons: Daemons, work: Path, upstream: Path, order: str):
        self.work = work
        _, self.address, self.results = start_dispatcher(daemons, work, "--order", order)
        for index in range(RUNNERS):
            start_runner(daemons, "%s-runner-%d" % (order, index + 1), clone(upstream, work / ("runner-%d" % index)),
                         self.address)
        wait_runners_ready(self.address, RUNNERS)
        observer = start_observer(daemons, clone(upstream, work / "observer-clone"), self.address, INTERVAL_S)
        self.wait(first_tip(observer))

    def wait(self, sha: str, timeout: float = RESULT_TIMEOUT_S) -> None:
        wait_until(lambda: result_exists(self.results, sha), timeout, POLL_S, "result of %s" % sha[:12])


def push(developer: Path) -> float:
    git(developer, "push", "--quiet", "origin", "main")
    return time.perf_counter()


def lone(system: System, developer: Path, index: int, seconds: float) -> float:
    sha = commit(developer, suite(index, seconds), "lone %d" % index)
    pushed = push(developer)
    system.wait(sha)
    return time.perf_counter() - pushed


def burst(system: System, developer: Path, index: int, size: int, seconds: float) -> float:
    shas = [commit(developer, suite(index + step, seconds), "burst %d" % (index + step)) for step in range(size)]
    pushed = push(developer)
    system.wait(shas[-1])
    elapsed = time.perf_counter() - pushed
    for sha in shas:
        system.wait(sha, RESULT_TIMEOUT_S * size)
    return elapsed


def run(work: Path, quick: bool) -> list[Row]:
    rounds, size, seconds = (1, 4, 0.2) if quick else (3, BURST, 1.0)
    upstream, developer = make_upstream(work)
    tips, lones = [], []
    with Daemons(work / "tip") as daemons:
        (work / "tip").mkdir()
        system = System(daemons, work / "tip", upstream, "tip")
        for number in range(rounds):
            first = 1000 * (number + 1)
            if number % 2:
                tips.append(burst(system, developer, first, size, seconds))
                lones.append(lone(system, developer, first + 999, seconds))
            else:
                lones.append(lone(system, developer, first + 999, seconds))
                tips.append(burst(system, developer, first, size, seconds))
    with Daemons(work / "fifo") as daemons:
        (work / "fifo").mkdir()
        system = System(daemons, work / "fifo", upstream, "fifo")
        fifo_lone = lone(system, developer, 90_999, seconds)
        fifo_tip = burst(system, developer, 90_000, size, seconds)
    ratio = median(tips) / median(lones)
    return [
        Row(
            "tip_first",
            "tip of %d commits pushed at once, %d runners, push -> verdict, median of %d" % (size, RUNNERS, rounds),
            "%.2f s (x%.2f a lone commit; tips %s s)" % (median(tips), ratio, ", ".join("%.2f" % t for t in tips)),
            "lone commit, idle system: %.2f s (%s s)" % (median(lones), ", ".join("%.2f" % t for t in lones)),
            "<= x%.1f" % TARGET_RATIO,
            verdict(ratio <= TARGET_RATIO),
        ),
        Row(
            "tip_first",
            "tip of %d commits pushed at once with --order fifo, push -> verdict" % size,
            "%.2f s (x%.2f a lone commit)" % (fifo_tip, fifo_tip / fifo_lone),
            "lone commit, idle system: %.2f s" % fifo_lone,
            "-",
            "-",
        ),
    ]
