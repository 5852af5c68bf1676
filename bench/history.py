"""History: does the dispatcher's cost per job or its memory grow as jobs pile up?

Two dispatchers, each with a fake runner that passes every job at once
(bench/fake_runner.py), so that what is timed is the dispatcher's own work per
job: the ``dispatch``, the scheduling, ``runtest``, the ``results``, the two result
files and the database. The large one is given 49,000 jobs first, untimed. Then
the fresh one's first 1,000 jobs (the measurement "at 1,000") and the large one's
last 1,000 ("at 50,000") are timed in turn, a chunk of 200 on one and then on the
other, so that both figures come from the same minutes of the machine: measured
minutes apart, a slow spell of a shared machine moved the ratio by a factor of
two either way. A chunk is dispatched over one connection and waited for
(``status`` says nothing is queued or running); its time divided by its size is
the cost per job, and each figure is the median of 5 chunks. Then each
dispatcher's resident memory (VmRSS) is read and ``status`` is timed (200 of each,
in turn, medians). Each figure at 50,000 is compared with the same figure at 1,000.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.common import (
    ROOT,
    BenchError,
    Daemon,
    Daemons,
    Row,
    median,
    rss_kib,
    start_dispatcher,
    verdict,
    wait_runners_ready,
    wait_until,
)

TARGET_GROWTH = 1.20
STATUS_SAMPLES = 200
#: Jobs are dispatched this many at a time while the history grows.
FILL_CHUNK = 1_000
#: Each measurement is the median of this many chunks (of 200 jobs at full size).
MEASURE_CHUNKS = 5


def run(work: Path, quick: bool) -> list[Row]:
    from commit_ci.client import Connection
    from commit_ci.protocol import request

    total, early = (300, 100) if quick else (50_000, 1_000)
    with Daemons(work / "large") as large_daemons, Daemons(work / "fresh") as fresh_daemons:
        large, large_address = start_with_fake_runner(large_daemons, work / "large")
        fresh, fresh_address = start_with_fake_runner(fresh_daemons, work / "fresh")
        with Connection(large_address) as large_connection:
            large_jobs = Jobs(large_connection, request)
            started = time.monotonic()
            while large_jobs.dispatched < total - early:
                large_jobs.run(min(FILL_CHUNK, total - early - large_jobs.dispatched))
                if large_jobs.dispatched % (10 * FILL_CHUNK) == 0:
                    print("  history: %d jobs done, %.0f s so far" % (large_jobs.dispatched, time.monotonic() - started),
                          flush=True)
            # Connected only now: a connection idle for the whole fill would have been closed.
            with Connection(fresh_address) as fresh_connection:
                fresh_jobs = Jobs(fresh_connection, request)
                low, high = measure_in_turn([(fresh_jobs, fresh.pid), (large_jobs, large.pid)], early)
    rows = []
    for key, what, unit, scale in (
        ("per_job", "cost per job (dispatch to result, fake runner)", "ms", 1000.0),
        ("rss", "dispatcher memory (VmRSS)", "MiB", 1 / 1024),
        ("status", "status request, median of %d" % STATUS_SAMPLES, "ms", 1000.0),
    ):
        growth = high[key] / low[key]
        rows.append(Row(
            "history",
            "%s at %s jobs" % (what, format(total, ",")),
            "%.2f %s (x%.2f)" % (high[key] * scale, unit, growth),
            "%.2f %s at %s jobs" % (low[key] * scale, unit, format(early, ",")),
            "<= x%.2f" % TARGET_GROWTH,
            verdict(growth <= TARGET_GROWTH),
        ))
    return rows


class Jobs:
    """Dispatches numbered jobs over one connection and waits for them to be done."""

    def __init__(self, connection, request):
        self.connection = connection
        self.request = request
        self.dispatched = 0

    def status(self) -> dict:
        answer = self.connection.request(self.request("status"))
        if answer.verb != "OK":
            raise BenchError("status refused: %s" % answer.get("reason"))
        return answer.fields

    def run(self, count: int) -> float:
        """Dispatch ``count`` new jobs and wait until all are done; returns seconds per job."""
        started = time.perf_counter()
        for _ in range(count):
            self.dispatched += 1
            answer = self.connection.request(self.request("dispatch", commit="%040x" % self.dispatched))
            if answer.verb != "OK" or answer.get("new") != 1:
                raise BenchError("dispatch of job %d answered %s" % (self.dispatched, answer))
        wait_until(lambda: (lambda s: s["queued"] == 0 and s["running"] == 0)(self.status()),
                   600, 0.005, "jobs up to %d to be done" % self.dispatched)
        return (time.perf_counter() - started) / count


def start_with_fake_runner(daemons: Daemons, folder: Path) -> tuple[Daemon, tuple[str, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    dispatcher, address, _ = start_dispatcher(daemons, folder)
    fake = daemons.start("fake-runner", [sys.executable, str(ROOT / "bench" / "fake_runner.py"),
                                         "%s:%d" % address, "fake-1"])
    fake.wait_for_log("registered with dispatcher")
    wait_runners_ready(address, 1)
    return dispatcher, address


def measure_in_turn(subjects: list[tuple[Jobs, int]], count: int) -> list[dict]:
    """Run ``count`` jobs on each of the (jobs, dispatcher pid) ``subjects`` in
    MEASURE_CHUNKS chunks, one chunk on each in turn (the order swapped every round),
    then time STATUS_SAMPLES ``status`` requests on each in turn. For each: the median
    cost per job, the dispatcher's memory and the median time of a ``status``."""
    per_job: list[list[float]] = [[] for _ in subjects]
    status: list[list[float]] = [[] for _ in subjects]
    order = list(range(len(subjects)))
    for _ in range(MEASURE_CHUNKS):
        for index in order:
            per_job[index].append(subjects[index][0].run(count // MEASURE_CHUNKS))
        order.reverse()
    for _ in range(STATUS_SAMPLES):
        for index in order:
            before = time.perf_counter()
            subjects[index][0].status()
            status[index].append(time.perf_counter() - before)
        order.reverse()
    return [{"per_job": median(per_job[index]), "rss": rss_kib(pid), "status": median(status[index])}
            for index, (_, pid) in enumerate(subjects)]
