"""History: does the dispatcher's cost per job or its memory grow as jobs pile up?

A dispatcher and one fake runner that passes every job at once (bench/fake_runner.py),
so that what is timed is the dispatcher's own work per job: the ``dispatch``, the
scheduling, ``runtest``, the ``results``, the two result files and the database.
The benchmark dispatches jobs in chunks of 1,000 over one connection and waits for
each chunk to be done (``status`` says nothing is queued or running); a chunk's
time divided by its size is the per-job cost at that point of the history. At
1,000 jobs and at 50,000 it also reads the dispatcher's resident memory (VmRSS)
and the median time of a ``status`` request. Each figure at 50,000 is compared
with the same figure at 1,000, measured in the same run.
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
STATUS_SAMPLES = 20


def run(work: Path, quick: bool) -> list[Row]:
    from helpers import Connection, request

    total, early = (300, 100) if quick else (50_000, 1_000)
    chunk = early
    figures: dict[int, dict] = {}
    with Daemons(work) as daemons:
        dispatcher, address, _ = start_dispatcher(daemons, work)
        fake = daemons.start("fake-runner", [sys.executable, str(ROOT / "bench" / "fake_runner.py"),
                                             "%s:%d" % address, "fake-1"])
        fake.wait_for_log("registered with dispatcher")
        wait_runners_ready(address, 1)
        with Connection(address) as connection:

            def ask_status() -> dict:
                answer = connection.request(request("status"))
                if answer.verb != "OK":
                    raise BenchError("status refused: %s" % answer.get("reason"))
                return answer.fields

            started_all = time.monotonic()
            for done in range(0, total, chunk):
                started = time.perf_counter()
                for index in range(done + 1, done + chunk + 1):
                    answer = connection.request(request("dispatch", commit="%040x" % index))
                    if answer.verb != "OK" or answer.get("new") != 1:
                        raise BenchError("dispatch of job %d answered %s" % (index, answer))
                wait_until(lambda: (lambda s: s["queued"] == 0 and s["running"] == 0)(ask_status()),
                           600, 0.005, "chunk of jobs %d-%d to be done" % (done + 1, done + chunk))
                per_job = (time.perf_counter() - started) / chunk
                reached = done + chunk
                if reached in (early, total):
                    timings = []
                    for _ in range(STATUS_SAMPLES):
                        before = time.perf_counter()
                        ask_status()
                        timings.append(time.perf_counter() - before)
                    figures[reached] = {"per_job": per_job, "rss": rss_kib(dispatcher.pid), "status": median(timings)}
                if reached % (10 * chunk) == 0 or reached == total:
                    print("  history: %d jobs done, %.2f ms per job in the last chunk, %.0f s so far"
                          % (reached, per_job * 1000, time.monotonic() - started_all), flush=True)
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
