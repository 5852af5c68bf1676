"""Recovery: how long the system takes to get back to work after a process dies.

* Runner death: a dispatcher (default heartbeat, 1 s) and two real runners; a commit
  whose test waits is running on one runner when that runner and its tests are
  SIGKILLed (as if its machine died). Timed from the kill until the ``queue`` answer
  shows the job running on the other runner, polled every 5 ms. The baseline is the
  heartbeat interval: the dispatcher drops a runner after 3 unanswered pings.
* Dispatcher restart: the dispatcher is SIGKILLed while two runners are idle, jobs
  are added to its queue file while it is down, and it is started again. Timed from
  the restart until a job is running; the baseline is the time the same restart
  takes to answer ``status`` (the process starting, importing, opening its files).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from bench.common import (
    Daemons,
    Row,
    clone,
    commit,
    descendants,
    median,
    new_repo,
    start_dispatcher,
    start_runner,
    wait_runners_ready,
    wait_until,
)

POLL_S = 0.005
TIMEOUT_S = 60.0
HEARTBEAT_S = 1.0

WAITING_TEST = """import os, time

def test_waits():
    deadline = time.monotonic() + 120
    while not os.path.exists(%r) and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def _ask(address, verb, **fields):
    import json

    from commit_ci.client import communicate
    from commit_ci.protocol import request

    answer = communicate(address, request(verb, **fields), timeout=5)
    return json.loads(answer.sections["json"]) if "json" in answer.sections else answer.fields


def _running_on(address, commit_id: str) -> str | None:
    for job in _ask(address, "queue")["running"]:
        if job["commit"] == commit_id:
            return job["runner"]
    return None


def _kill_tree(pid: int) -> None:
    for victim in [pid] + descendants(pid):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def runner_death(work: Path, samples: int) -> Row:
    flag = work / "release"
    upstream = new_repo(work / "upstream", {"test_base.py": "def test_base():\n    pass\n"})
    delays = []
    with Daemons(work) as daemons:
        dispatcher, address, results = start_dispatcher(daemons, work)
        runners = {}
        for name in ("runner-a", "runner-b"):
            runners[name] = start_runner(daemons, name, clone(upstream, work / (name + "-clone")), address)
        wait_runners_ready(address, 2)
        for index in range(samples):
            flag.unlink(missing_ok=True)
            sha = commit(upstream, {"test_wait.py": WAITING_TEST % str(flag), "n.txt": str(index)}, "sample %d" % index)
            _ask(address, "dispatch", commit=sha)
            first = wait_until(lambda: _running_on(address, sha), TIMEOUT_S, POLL_S, "the job to start")
            victim = runners[first]
            victim.wait_for_log(r"commit %s attempt \d+: testing" % sha)
            _kill_tree(victim.pid)
            killed = time.perf_counter()
            victim.popen.wait(timeout=10)
            wait_until(lambda: _running_on(address, sha) not in (None, first), TIMEOUT_S, POLL_S,
                       "the job to move to the other runner")
            delays.append(time.perf_counter() - killed)
            flag.touch()
            wait_until(lambda: (results / (sha + ".json")).exists(), TIMEOUT_S, 0.05, "the result")
            # The dead runner comes back, as a supervisor would restart it.
            runners[first] = daemons.start(first + "-%d" % index, victim.argv)
            wait_runners_ready(address, 2)
    return Row(
        "recovery",
        "runner SIGKILLed mid-job -> job running on another runner, worst of %d" % samples,
        "%.2f s (median %.2f s)" % (max(delays), median(delays)),
        "heartbeat %.1f s" % HEARTBEAT_S,
        "-",
        "-",
    )


def dispatcher_restart(work: Path, samples: int) -> Row:
    from commit_ci.store import JobStore

    upstream = new_repo(work / "upstream", {"test_base.py": "def test_base():\n    pass\n"})
    to_first_job, to_status = [], []
    with Daemons(work) as daemons:
        dispatcher, address, results = start_dispatcher(daemons, work)
        # Later starts must come back on the same port, where the runners look for it.
        argv = list(dispatcher.argv)
        argv[argv.index("--port") + 1] = str(address[1])
        for name in ("runner-a", "runner-b"):
            start_runner(daemons, name, clone(upstream, work / (name + "-clone")), address)
        wait_runners_ready(address, 2)
        for index in range(samples):
            _kill_tree(dispatcher.pid)
            dispatcher.popen.wait(timeout=10)
            sha = commit(upstream, {"n.txt": str(index)}, "sample %d" % index)
            store = JobStore(str(results) + ".queue.sqlite3")
            store.enqueue(sha, time.time())
            store.close()
            restarted = time.perf_counter()
            dispatcher = daemons.start("dispatcher-%d" % index, argv)
            answered = wait_until(lambda: _status_answers(address), TIMEOUT_S, POLL_S, "the dispatcher to answer")
            to_status.append(answered - restarted)
            wait_until(lambda: _running_on(address, sha) or (results / (sha + ".json")).exists(),
                       TIMEOUT_S, POLL_S, "the first job to start")
            to_first_job.append(time.perf_counter() - restarted)
            wait_until(lambda: (results / (sha + ".json")).exists(), TIMEOUT_S, 0.05, "the result")
    return Row(
        "recovery",
        "dispatcher SIGKILLed, restarted with a queued job -> job running, worst of %d" % samples,
        "%.2f s (median %.2f s)" % (max(to_first_job), median(to_first_job)),
        "%.2f s to answer status" % median(to_status),
        "-",
        "-",
    )


def _status_answers(address) -> float | None:
    try:
        _ask(address, "status")
    except OSError:
        return None
    return time.perf_counter()


def run(work: Path, quick: bool) -> list[Row]:
    samples = 1 if quick else 5
    (work / "runner").mkdir()
    (work / "dispatcher").mkdir()
    return [runner_death(work / "runner", samples), dispatcher_restart(work / "dispatcher", samples)]


if __name__ == "__main__":  # pragma: no cover - use bench/run_all.py
    sys.exit("run it with: python bench/run_all.py --only recovery")
