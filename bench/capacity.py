"""Dispatcher capacity: ``dispatch`` and ``status`` from 32 concurrent clients on loopback.

A dispatcher alone (no runner: every dispatched commit is a new job that stays
queued). 32 client threads, spread over 4 load processes (bench/load_client.py) so
that the clients are not all behind one interpreter lock, send one verb as fast as
they get answers, for a few seconds, in two ways: each thread on one persistent
connection (``helpers.Connection``), and a new connection per request
(``helpers.communicate``, what the observer and runners do). The rate is requests
answered ``OK`` per second of the run; the latency is each request's round trip
seen by its client. On 2 cores the clients and the dispatcher share the CPU, so
the figures are a floor for the dispatcher on its own machine.

``dispatch`` runs first, so that ``status`` is then asked of a queue that holds
every job just dispatched (thousands), as it would be on a busy day.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    ROOT,
    BenchError,
    Daemons,
    Row,
    percentile,
    start_dispatcher,
    verdict,
)

CLIENTS = 32
PROCESSES = 4
TARGET_RATE = 2000.0
TARGET_P99_MS = 20.0
#: The load processes start together this long after they are launched.
START_DELAY_S = 2.0


def run_load(address: tuple[str, int], verb: str, mode: str, duration: float, tag: int, delay: float) -> dict:
    start_at = time.time() + delay
    clients: list[subprocess.Popen] = []
    try:
        for index in range(PROCESSES):
            prefix = "%02x%02x%02x%02x" % (tag, index, 0xca, 0xfe)
            clients.append(subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "load_client.py"), "%s:%d" % address, verb, mode,
                 str(CLIENTS // PROCESSES), str(duration), repr(start_at), prefix],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            ))
        outputs = []
        for client in clients:
            out, err = client.communicate(timeout=delay + duration + 90)
            if client.returncode != 0:
                raise BenchError("load client failed: %s" % err.decode(errors="replace")[-500:])
            outputs.append(json.loads(out))
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=10)
    latencies = [value for out in outputs for value in out["latencies_ms"]]
    return {
        "rate": sum(out["ok"] for out in outputs) / duration,
        "errors": sum(out["errors"] for out in outputs),
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


def run(work: Path, quick: bool) -> list[Row]:
    duration = 0.5 if quick else 5.0
    rows = []
    with Daemons(work) as daemons:
        _, address, _ = start_dispatcher(daemons, work)
        tag = 0
        for mode in ("persistent", "per-request"):
            for verb in ("dispatch", "status"):
                tag += 1
                found = run_load(address, verb, mode, duration, tag, START_DELAY_S / 2 if quick else START_DELAY_S)
                ok = found["rate"] >= TARGET_RATE and found["p99"] < TARGET_P99_MS and not found["errors"]
                rows.append(Row(
                    "capacity",
                    "%s, %d clients, %s connections" % (verb, CLIENTS, mode),
                    "%.0f/s, p50 %.1f ms, p99 %.1f ms%s" % (
                        found["rate"], found["p50"], found["p99"],
                        ", %d errors" % found["errors"] if found["errors"] else ""),
                    "-",
                    ">= %.0f/s, p99 < %.0f ms" % (TARGET_RATE, TARGET_P99_MS),
                    verdict(ok),
                ))
    return rows
