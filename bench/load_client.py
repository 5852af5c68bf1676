"""One load-generating process for the capacity benchmark (bench/capacity.py).

    python bench/load_client.py HOST:PORT VERB MODE THREADS DURATION START_AT PREFIX [RATE]

Runs THREADS client threads that send VERB (``status`` or ``dispatch``) to the
dispatcher from START_AT (a time.time() value, so that every process starts
together) for DURATION seconds, then prints one JSON line: requests answered
``OK``, errors, and every latency in milliseconds. MODE ``persistent`` keeps one
``commit_ci.client.Connection`` per thread; ``per-request`` opens a connection for each
request (``commit_ci.client.communicate``), as the observer and the runners do. ``dispatch``
sends commit ids made from PREFIX, the thread and a counter, all new.

Without RATE each thread sends its next request as soon as it has the answer to
the last (a closed loop: the rate found is the most the dispatcher answers). With
RATE (requests per second for the whole process) each thread sends on a fixed
schedule, RATE / THREADS a second, the threads staggered; a request's latency is
counted from the moment it was due, not from when it was sent, so that a stalled
dispatcher is charged for the requests it kept waiting (no "coordinated
omission"); a thread that falls behind sends at once until it has caught up.

The process stops by itself: every request has the protocol's timeouts and the
loop ends DURATION seconds after START_AT.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from commit_ci.client import Connection, communicate
from commit_ci.protocol import request
from commit_ci.wire import parse_address


def client(address, verb: str, mode: str, start_at: float, stop_at: float, prefix: str, out: dict,
           interval: float | None = None, offset: float = 0.0) -> None:
    latencies: list[float] = []
    errors = 0
    ok = 0
    counter = 0
    connection = Connection(address) if mode == "persistent" else None
    try:
        time.sleep(max(0.0, start_at - time.time()))
        # The schedule runs on the monotonic clock from the common start.
        schedule_origin = time.perf_counter() - max(0.0, time.time() - start_at) + offset
        while time.time() < stop_at:
            counter += 1
            if verb == "dispatch":
                # A full commit id (the dispatcher takes no other): the client's 12-digit prefix, then the count.
                message = request("dispatch", commit="%s%028x" % (prefix, counter))
            else:
                message = request("status")
            if interval is None:
                started = time.perf_counter()
            else:
                started = schedule_origin + (counter - 1) * interval
                time.sleep(max(0.0, started - time.perf_counter()))
            try:
                if connection is not None:
                    answer = connection.request(message)
                else:
                    answer = communicate(address, message)
            except OSError:
                errors += 1
                if connection is not None:
                    connection.close()
                    connection = Connection(address)
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if answer.verb == "OK":
                ok += 1
            else:
                errors += 1
    finally:
        if connection is not None:
            connection.close()
    out["latencies"] = latencies
    out["errors"] = errors
    out["ok"] = ok


def main(argv: list[str]) -> int:
    address_text, verb, mode, threads, duration, start_at, prefix = argv[:7]
    rate = float(argv[7]) if len(argv) > 7 else None
    address = parse_address(address_text)
    start = float(start_at)
    stop_at = start + float(duration)
    count = int(threads)
    interval = count / rate if rate else None
    outputs = [dict() for _ in range(count)]
    workers = [
        threading.Thread(
            target=client,
            args=(address, verb, mode, start, stop_at, "%s%04x" % (prefix, index), out, interval,
                  (interval or 0.0) * index / count),
            daemon=True,
        )
        for index, out in enumerate(outputs)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=stop_at - time.time() + 60)
    latencies = [value for out in outputs for value in out.get("latencies", [])]
    errors = sum(out.get("errors", 0) for out in outputs) + sum(1 for out in outputs if "latencies" not in out)
    ok = sum(out.get("ok", 0) for out in outputs)
    print(json.dumps({"ok": ok, "errors": errors, "latencies_ms": [round(v, 3) for v in latencies]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
