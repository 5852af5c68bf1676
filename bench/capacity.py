"""Dispatcher capacity: ``dispatch`` and ``status`` from 32 concurrent clients on loopback.

A dispatcher alone (no runner: every dispatched commit is a new job that stays
queued). 32 client threads, spread over 4 load processes (bench/load_client.py) so
that the clients are not all behind one interpreter lock, send one verb for a few
seconds, each thread on one persistent connection (``commit_ci.client.Connection``), then
with a new connection per request (``commit_ci.client.communicate``, what the observer and
runners do), and each of those two ways twice:

* at the target rate, 2,000 requests a second in all, each client on a fixed
  schedule: does the dispatcher answer them all, and how long does a request wait
  (from the moment it was due, so a stall is charged for every request it holds
  up)? This is the target's question: 2,000 a second from 32 clients, p99 under
  20 ms.
* as fast as answered, each client sending its next request when it has the
  answer to the last: the most the dispatcher answers. With 32 requests always
  outstanding a request waits for the 31 others, so the latency there is about
  32 / rate by construction (Little's law) and is shown, not judged.

The rate is requests answered ``OK`` per second of the run; the latency is each
request's round trip seen by its client. On 2 cores the clients and the
dispatcher share the CPU, so the figures are a floor for the dispatcher on its own
machine.

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
#: At the target rate, the share of the requests that must be answered within the
#: run (those due in its last moments may still be on their way).
ANSWERED_SHARE = 0.99
#: The load processes start together this long after they are launched.
START_DELAY_S = 2.0


def run_load(address: tuple[str, int], verb: str, mode: str, duration: float, tag: int, delay: float,
             rate: float | None = None) -> dict:
    """Run the load processes; ``rate`` (requests a second in all) puts the clients on
    a schedule, None lets them send as fast as they are answered."""
    start_at = time.time() + delay
    per_process = [] if rate is None else [repr(rate / PROCESSES)]
    clients: list[subprocess.Popen] = []
    try:
        for index in range(PROCESSES):
            prefix = "%02x%02x%02x%02x" % (tag, index, 0xca, 0xfe)
            clients.append(subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "load_client.py"), "%s:%d" % address, verb, mode,
                 str(CLIENTS // PROCESSES), str(duration), repr(start_at), prefix, *per_process],
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
                for rate in (TARGET_RATE, None):
                    tag += 1
                    found = run_load(address, verb, mode, duration, tag, START_DELAY_S / 2 if quick else START_DELAY_S,
                                     rate)
                    measured = "%.0f/s, p50 %.1f ms, p99 %.1f ms%s" % (
                        found["rate"], found["p50"], found["p99"],
                        ", %d errors" % found["errors"] if found["errors"] else "")
                    if rate is None:
                        how, target = "as fast as answered", ">= %.0f/s" % TARGET_RATE
                        ok = found["rate"] >= TARGET_RATE and not found["errors"]
                    else:
                        how, target = "%.0f/s offered" % rate, "all answered, p99 < %.0f ms" % TARGET_P99_MS
                        ok = found["rate"] >= ANSWERED_SHARE * rate and found["p99"] < TARGET_P99_MS and not found["errors"]
                    rows.append(Row(
                        "capacity",
                        "%s, %d clients, %s connections, %s" % (verb, CLIENTS, mode, how),
                        measured,
                        "-",
                        target,
                        verdict(ok),
                    ))
    return rows
