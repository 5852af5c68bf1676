"""One load-generating process for the capacity benchmark (bench/capacity.py).

    python bench/load_client.py HOST:PORT VERB MODE THREADS DURATION START_AT PREFIX

Runs THREADS client threads that send VERB (``status`` or ``dispatch``) to the
dispatcher from START_AT (a time.time() value, so that every process starts
together) for DURATION seconds, then prints one JSON line: requests answered
``OK``, errors, and every latency in milliseconds. MODE ``persistent`` keeps one
``helpers.Connection`` per thread; ``per-request`` opens a connection for each
request (``helpers.communicate``), as the observer and the runners do. ``dispatch``
sends commit ids made from PREFIX, the thread and a counter, all new.

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

from helpers import Connection, communicate, parse_address, request  # noqa: E402


def client(address, verb: str, mode: str, start_at: float, stop_at: float, prefix: str, out: dict) -> None:
    latencies: list[float] = []
    errors = 0
    ok = 0
    counter = 0
    connection = Connection(address) if mode == "persistent" else None
    try:
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            counter += 1
            if verb == "dispatch":
                message = request("dispatch", commit="%s%024x" % (prefix, counter))
            else:
                message = request("status")
            started = time.perf_counter()
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
    address_text, verb, mode, threads, duration, start_at, prefix = argv
    address = parse_address(address_text)
    start = float(start_at)
    stop_at = start + float(duration)
    outputs = [dict() for _ in range(int(threads))]
    workers = [
        threading.Thread(target=client, args=(address, verb, mode, start, stop_at, "%s%04x" % (prefix, index), out),
                         daemon=True)
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
