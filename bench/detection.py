"""Detection: from a commit pushed upstream to its job queued in the dispatcher.

A bare upstream repository, a developer's clone that pushes to it, and an observer
(its own clone) polling with ``--interval 0.2``; a dispatcher with no runner, so a
job stays queued once it is there. For each sample the benchmark commits in the
developer's clone (untimed), pushes, and from the moment ``git push`` returns polls
``status`` every 2 ms over one connection until ``queued`` has grown. Samples are
spread at random over the observer's cycle. The target is the worst sample: at
most the interval plus 0.1 s.

With the push trigger (push_trigger.py: a post-receive hook that tells the
dispatcher at once, instead of waiting for the next poll) there is no observer;
see ``detect_with_push_trigger`` for how that is timed. What the hook's own start
costs every push (its interpreter and its imports, against a bare interpreter) is
``hook_start``.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    BenchError,
    Daemons,
    Row,
    clone,
    commit,
    git,
    median,
    start_dispatcher,
    start_observer,
    verdict,
    wait_until,
)

INTERVAL_S = 0.2
TARGET_SLACK_S = 0.1
#: With the push trigger the target is absolute.
TRIGGER_TARGET_S = 0.1
POLL_S = 0.002
DETECT_TIMEOUT_S = 30.0


def make_upstream(work: Path) -> tuple[Path, Path]:
    """A bare upstream with one commit on main, and a developer's clone that pushes to it."""
    upstream = work / "upstream.git"
    upstream.mkdir()
    git(upstream, "init", "--quiet", "--bare", "--initial-branch=main")
    developer = work / "developer"
    developer.mkdir()
    git(developer, "init", "--quiet", "--initial-branch=main")
    commit(developer, {"test_base.py": "def test_base():\n    pass\n"}, "initial commit")
    git(developer, "remote", "add", "origin", str(upstream))
    git(developer, "push", "--quiet", "origin", "main")
    return upstream, developer


def time_detections(developer: Path, address: tuple[str, int], samples: int, spread: float) -> list[float]:
    """Push ``samples`` commits one at a time; seconds from each push to its job queued."""
    from commit_ci.client import Connection
    from commit_ci.protocol import request

    delays = []
    with Connection(address) as connection:

        def queued() -> int:
            answer = connection.request(request("status"))
            if answer.verb != "OK":
                raise BenchError("status refused: %s" % answer.get("reason"))
            return answer.get("queued")

        for index in range(samples):
            # A random pause, so that pushes land at every phase of the observer's cycle.
            time.sleep(random.uniform(0, spread))
            before = queued()
            commit(developer, {"test_base.py": "def test_base():\n    assert %d\n" % (index + 1)}, "push %d" % index)
            git(developer, "push", "--quiet", "origin", "main")
            pushed = time.perf_counter()
            wait_until(lambda: queued() > before, DETECT_TIMEOUT_S, POLL_S, "push %d to be queued" % index)
            delays.append(time.perf_counter() - pushed)
    return delays


def detect_with_observer(work: Path, samples: int) -> Row:
    upstream, developer = make_upstream(work)
    observer_clone = clone(upstream, work / "observer-clone")
    with Daemons(work) as daemons:
        dispatcher, address, _ = start_dispatcher(daemons, work)
        observer = start_observer(daemons, observer_clone, address, INTERVAL_S)
        observer.wait_for_log(r"watching origin/main")
        # Its first round reports the current tip; start once that job is queued.
        wait_until(lambda: "queued" in dispatcher.log(), 30, 0.02, "the observer's first round")
        delays = time_detections(developer, address, samples, spread=INTERVAL_S * 1.5)
    target = INTERVAL_S + TARGET_SLACK_S
    worst = max(delays)
    return Row(
        "detection",
        "push -> job queued, observer --interval %g, worst of %d" % (INTERVAL_S, samples),
        "%.3f s (median %.3f s)" % (worst, median(delays)),
        "interval %.1f s" % INTERVAL_S,
        "<= %.1f s" % target,
        verdict(worst <= target),
    )


def detect_with_push_trigger(work: Path, samples: int) -> Row:
    """The same pushes with the push trigger's post-receive hook in the upstream and
    no observer at all. The hook runs inside ``git push``, so the clock starts when
    the push starts; the baseline is the same push to a copy of the upstream without
    the hook, alternating with it, so the figure is what detection adds to a push."""
    from commit_ci import push_trigger
    from commit_ci.client import Connection
    from commit_ci.protocol import request

    upstream, developer = make_upstream(work)
    plain = work / "plain.git"
    git(work, "clone", "--quiet", "--bare", str(upstream), str(plain))
    git(developer, "remote", "add", "plain", str(plain))
    with Daemons(work) as daemons:
        _, address, _ = start_dispatcher(daemons, work)
        push_trigger.install(str(upstream), "%s:%d" % address, "main", force=False)
        added, totals = [], []
        with Connection(address) as connection:

            def queued() -> int:
                return connection.request(request("status")).get("queued")

            for index in range(samples):
                before = queued()
                commit(developer, {"test_base.py": "def test_base():\n    assert %d\n" % (index + 1)}, "push %d" % index)
                started = time.perf_counter()
                git(developer, "push", "--quiet", "plain", "main")
                plain_push = time.perf_counter() - started
                started = time.perf_counter()
                git(developer, "push", "--quiet", "origin", "main")
                wait_until(lambda: queued() > before, DETECT_TIMEOUT_S, POLL_S, "push %d to be queued" % index)
                total = time.perf_counter() - started
                totals.append(total)
                added.append(total - plain_push)
    worst = max(added)
    return Row(
        "detection",
        "push -> job queued, with the push trigger (time added to the push), worst of %d" % samples,
        "%.3f s (median %.3f s; push and queue %.3f s median)" % (worst, median(added), median(totals)),
        "the same push without the hook",
        "< %.1f s" % TRIGGER_TARGET_S,
        verdict(worst < TRIGGER_TARGET_S),
    )


#: The hook's start may cost at most this many times a bare ``python -S -E``.
HOOK_START_TARGET_RATIO = 2.0


def hook_start(work: Path, samples: int) -> Row:
    """The push hook as git runs it (``python -S -E .../push_hook.py``), in a repository
    where it finds nothing to report, against ``python -S -E -c pass``, alternating:
    wall time per run, and what ``-X importtime`` counts for the hook's imports."""
    from commit_ci import push_hook

    repo = work / "hook-start"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit(repo, {"README": "x\n"}, "initial commit")
    hook = [sys.executable, "-S", "-E", push_hook.__file__, "post-commit", "--dispatcher-server", "127.0.0.1:1",
            "--branch", "not-this-one"]
    bare = [sys.executable, "-S", "-E", "-c", "pass"]
    hook_times, bare_times, imports = [], [], []
    for _ in range(samples):
        for command, times in ((hook, hook_times), (bare, bare_times)):
            started = time.perf_counter()
            subprocess.run(command, cwd=repo, check=True, capture_output=True, timeout=30)
            times.append(time.perf_counter() - started)
        traced = subprocess.run([hook[0], "-X", "importtime", *hook[1:]], cwd=repo, capture_output=True, text=True,
                                timeout=30)
        # Top-level lines only (one space after the bar): their cumulative times add up.
        imports.append(sum(int(match.group(1)) for match in re.finditer(r"\| +(\d+) \| \S", traced.stderr)) / 1e6)
    ratio = median(hook_times) / median(bare_times)
    return Row(
        "detection",
        "push hook start: python -S -E push_hook.py, median of %d" % samples,
        "%.1f ms (imports %.1f ms; %.2fx bare)" % (median(hook_times) * 1000, median(imports) * 1000, ratio),
        "bare python -S -E: %.1f ms" % (median(bare_times) * 1000),
        "< %gx bare" % HOOK_START_TARGET_RATIO,
        verdict(ratio < HOOK_START_TARGET_RATIO),
    )


def run(work: Path, quick: bool) -> list[Row]:
    samples = 3 if quick else 20
    (work / "observer").mkdir()
    (work / "trigger").mkdir()
    return [detect_with_observer(work / "observer", samples), detect_with_push_trigger(work / "trigger", samples),
            hook_start(work, 5 if quick else 40)]


