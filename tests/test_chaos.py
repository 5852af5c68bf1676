"""Chaos: runners, the dispatcher and the observer killed and restarted at random.

For about a minute, a seeded random schedule SIGKILLs daemons (runners with the
tests they were running, as if their machine died) and restarts them after a
random pause, while 50 commits with a known mix of passing and failing tests are
pushed in waves. Each runner holds a key of its own, and the observer an observer's
key: restarts and requeues must keep every result with the runner whose key sent it.
Afterwards every commit must have exactly one final result with the verdict its tests
deserve, nothing may be written outside the results folder, and no process may be
left behind. Set CHAOS_SEED to replay a run; CHAOS_SECONDS to make it longer.
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from conftest import FAILING_TEST, PASSING_TEST, git, make_keys

COMMITS = 50
WAVES = 10
RUNNERS = 3


def chaos_commit(rng: random.Random, index: int) -> tuple[dict, str]:
    sleep = rng.choice([0, 0.1, 0.3, 0.6])
    failing = rng.random() < 0.4
    files = {
        "test_chaos.py": "import time\n\ndef test_chaos_%d():\n    time.sleep(%s)\n" % (index, sleep),
        "test_verdict.py": FAILING_TEST if failing else PASSING_TEST,
    }
    return files, "failed" if failing else "passed"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                if text.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_chaos_every_commit_gets_exactly_one_correct_result(ci, upstream, tmp_path):
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    duration = float(os.environ.get("CHAOS_SECONDS", "60"))
    print("\nchaos seed %d (replay with CHAOS_SEED=%d), %g s" % (seed, seed, duration))
    rng = random.Random(seed)

    # Runners are killed mid-job often enough that one job may be hit several times;
    # the attempt limit is about broken infrastructure, not what is tested here.
    runner_names = ["chaos%d" % index for index in range(RUNNERS)]
    keys_file, key_files = make_keys(tmp_path / "keys", {**dict.fromkeys(runner_names, "runner"), "watch": "observer"})
    ci.start_dispatcher("--heartbeat-interval", "0.5", "--max-attempts", "50", "--keys-file", str(keys_file))
    for name in runner_names:
        ci.start_runner("--secret-file", str(key_files[name]))  # named after its key
    ci.start_observer("--secret-file", str(key_files["watch"]))
    initial = upstream.head()
    expected = {initial: "passed"}

    planned = [chaos_commit(rng, index) for index in range(COMMITS)]
    waves = [planned[i::WAVES] for i in range(WAVES)]
    figures = {"runner kills": 0, "dispatcher kills": 0, "observer kills": 0, "restarts": 0}
    down: list[tuple[float, object]] = []  # (when to restart, process)
    daemons = {"dispatcher": [ci.dispatcher], "runner": ci.runners, "observer": [ci.observer]}

    def push_wave():
        for files, verdict in waves.pop(0):
            expected[upstream.commit(files, "chaos %d" % len(expected))] = verdict

    def restart_due(now: float):
        for entry in [entry for entry in down if entry[0] <= now]:
            down.remove(entry)
            entry[1].restart()
            figures["restarts"] += 1

    started = time.monotonic()
    while time.monotonic() - started < duration:
        time.sleep(rng.uniform(0.3, 2.0))
        restart_due(time.monotonic())
        action = rng.random()
        if action < 0.2 and waves:
            push_wave()
            continue
        kind = "runner" if action < 0.7 else "dispatcher" if action < 0.85 else "observer"
        alive = [process for process in daemons[kind] if process.running()]
        if not alive:
            continue
        victim = rng.choice(alive)
        victim.kill()
        figures["%s kills" % kind] += 1
        down.append((time.monotonic() + rng.uniform(0.2, 3.0), victim))
    while waves:
        push_wave()
    restart_due(float("inf"))

    results = ci.wait_results(list(expected), timeout=300)
    mismatches = [sha for sha, verdict in expected.items() if results[sha]["status"] != verdict]
    figures.update(commits=len(expected), mismatches=len(mismatches),
                   attempts=sum(result["attempts"] for result in results.values()))
    print("chaos figures: " + ", ".join("%s %s" % item for item in figures.items()))
    assert not mismatches, {sha: (expected[sha], results[sha]) for sha in mismatches}

    # Exactly one final result each: settled once in the dispatcher's log (across all
    # its lives), one set of result files, no temporary file left over.
    settled = re.findall(r"commit ([0-9a-f]{40}): (?:passed|failed|error) \(attempt", ci.dispatcher.log())
    assert sorted(settled) == sorted(expected)
    assert ci.result_files() == ci.expected_files(expected)
    # A sharded run names each of its shards' runners (README, Results: "a, b").
    assert {name for result in results.values() for name in result["runner"].split(", ")} <= set(runner_names)
    assert not re.search(r"unknown key|may not send|may register only|refused: the attempt is", ci.dispatcher.log()), (
        "no daemon was refused for its key")

    ci.processes.stop_all()
    assert processes_mentioning(str(tmp_path)) == [], "no process left behind"
    expected_entries = {"upstream", "observer-clone", "test_results", "test_results.queue.sqlite3", "keys",
                        *("runner%d-clone" % (i + 1) for i in range(RUNNERS))}
    entries = {path.name for path in tmp_path.iterdir()
               if not path.name.endswith(".log") and not path.name.startswith("test_results.queue.sqlite3-")}
    assert entries == expected_entries, "nothing written outside the results folder"
    assert git(upstream.path, "status", "--porcelain") == ""
