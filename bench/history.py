"""History: does the dispatcher's cost per job or its memory grow as jobs pile up?

A dispatcher and one fake runner that passes every job at once (bench/fake_runner.py),
so that what is timed is the dispatcher's own work per job: the ``dispatch``, the
scheduling, ``runtest``, the ``results``, the two result files and the database.
The benchmark dispatches jobs over one connection in chunks and waits for each
chunk to be done (``status`` says nothing is queued or running); a chunk's time
divided by its size is the cost per job at that point of the history. The first
1,000 jobs are the measurement "at 1,000" (5 chunks of 200, the median); the
history then grows untimed, 1,000 jobs at a time, to 49,000, and the last 1,000
jobs are measured the same way, "at 50,000". After each measurement it reads the
dispatcher's resident memory (VmRSS) and times ``status`` (median of 200). Each
figure at 50,000 is compared with the same figure at 1,000 of the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.common import (
    ROOT,
    BenchError,
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
    from helpers import Connection, request

    total, early = (300, 100) if quick else (50_000, 1_000)
    figures: dict[int, dict] = {}
    with Daemons(work) as daemons:
        dispatcher, address, _ = start_dispatcher(daemons, work)
        fake = daemons.start("fake-runner", [sys.executable, str(ROOT / "bench" / "fake_runner.py"),
                                             "%s:%d" % address, "fake-1"])
        fake.wait_for_log("registered with dispatcher")
        wait_runners_ready(address, 1)
        with Connection(address) as connection:
            jobs = Jobs(connection, request)
            started = time.monotonic()
            # The first `early` jobs are the measurement "at 1,000"; then the history
            # grows to total - early untimed, and the last `early` jobs are the one "at 50,000".
            figures[early] = measure(jobs, dispatcher.pid, early)
            while jobs.dispatched < total - early:
                jobs.run(min(FILL_CHUNK, total - early - jobs.dispatched))
                if jobs.dispatched % (10 * FILL_CHUNK) == 0:
                    print("  history: %d jobs done, %.0f s so far" % (jobs.dispatched, time.monotonic() - started),
                          flush=True)
            figures[total] = measure(jobs, dispatcher.pid, early)
    low, high = figures[early], figures[total]
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


def measure(jobs: Jobs, pid: int, count: int) -> dict:
    """Run ``count`` jobs in MEASURE_CHUNKS chunks: the median cost per job, then the
    dispatcher's memory and the median time of a ``status``."""
    per_job = median([jobs.run(count // MEASURE_CHUNKS) for _ in range(MEASURE_CHUNKS)])
    timings = []
    for _ in range(STATUS_SAMPLES):
        before = time.perf_counter()
        jobs.status()
        timings.append(time.perf_counter() - before)
    return {"per_job": per_job, "rss": rss_kib(pid), "status": median(timings)}
