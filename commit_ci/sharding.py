"""Sharding: one commit's tests split over idle runners, balanced by how long they took.

When more runners are idle than commits wait, the dispatcher splits the next commit's
tests into K *shards* (K at most the idle runners, at most ``--max-shards``, at most the
test files it knows), each run by another runner at the same commit, and merges their
results into the commit's one result. The unit is a test file. Durations come from the
JUnit XML of earlier runs: the runner that ran them adds up, per test file, the time of
its test cases (``file_durations``; it has the checkout to tell a file from a class) and
sends them with its result (``durations``); the dispatcher keeps the newest per file in
its store, bounded (store.MAX_DURATION_FILES). ``plan`` deals the known files out
longest first, each to the shard with the least expected time so far (LPT). Before the
dispatcher knows two files, a commit runs unsharded: its result teaches the durations.

What a shard runs is decided at collection time, inside pytest, by a plugin of ours
(pytest_shard/commit_ci_shard_select.py, which has the rule): a file the plan names
goes to its shard, a file it does not know to the shard a stable hash of its path
gives. Every shard applies the same rule to the same commit, so the shards together
run exactly the tests an unsharded run would, each once (tests/test_sharding.py proves
it on a real project). A commit whose tests cannot be split -- a test command of its
own (``test`` in .commit-ci.toml, or the runner's ``--test-command``), or ``shard =
false`` in .commit-ci.toml -- is run whole by shard 1, and the other shards run nothing
(``UNSPLIT``): each runner reads the same config at the same commit, so they agree.

``merge`` makes the commit's result of its shards' results: the verdict failed if one
failed, the counts summed, the duration the longest shard's, the JUnit XML's suites
together, the output in a section per shard (``==== shard I of K ...``), and
``shards`` in ``<sha>.json``: one entry per shard. Its failing tests, with their ids,
then run again as any run's do (flaky.py).

Everything here is pure: the dispatcher, the runner and the store call it.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from commit_ci import flaky, junit
from commit_ci.protocol import MAX_PLAN_BYTES
from commit_ci.result import Result

#: Most shards of one commit when ``--max-shards`` is not given.
DEFAULT_MAX_SHARDS = 8
#: The most ``--max-shards`` may say (and a shard number on the wire).
MAX_SHARDS = 64
#: Most files a plan names: the others go by the hash of their path. It keeps the plan
#: within MAX_PLAN_BYTES, which must fit one environment variable (Linux: 128 KiB).
MAX_PLAN_FILES = 1000
#: What a test file is expected to take at least (its import, its collection): files
#: whose tests took no time are dealt out evenly, not all to the first shard.
MIN_FILE_SECONDS = 0.01
#: Most test files whose durations one result carries (the sections' sizes, with
#: MAX_PLAN_BYTES, are protocol.py's).
MAX_DURATION_FILES = 5000
#: The reason a shard that ran nothing gives, then why: shard 1 ran the whole suite.
UNSPLIT = "not split"
#: Where the pytest plugin is (a folder that holds it alone), and its module name.
PLUGIN_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytest_shard")
PLUGIN_MODULE = "commit_ci_shard_select"


def is_test_path(text: str) -> bool:
    """A test file's path as plans and durations name it: a relative ``.py`` path
    (flaky.is_test_id's rules, without the ``::`` part)."""
    return "::" not in text and flaky.is_test_id(text)


# --- durations (runner: from JUnit XML; dispatcher: checked, kept) --------------------


def file_durations(root, is_file: Callable[[str], bool]) -> dict[str, float]:
    """Seconds per test file, the sum of its cases' times in the JUnit XML ``root``;
    a case whose file cannot be told (flaky.node_id) is left out."""
    found: dict[str, float] = {}
    for classname, name, seconds in junit.case_times(root):
        node = flaky.node_id(classname, name, is_file)
        if node is None:
            continue
        path = node.split("::", 1)[0]
        if path in found or len(found) < MAX_DURATION_FILES:
            found[path] = found.get(path, 0.0) + seconds
    return found


def encode_durations(durations: dict[str, float]) -> bytes:
    """Durations as a section of the wire: ``SECONDS PATH`` per line."""
    return "".join("%.3f %s\n" % (seconds, path) for path, seconds in sorted(durations.items())).encode("ascii")


def decode_durations(data: bytes) -> dict[str, float]:
    """The durations of a section; ValueError unless every line is ``SECONDS PATH`` with
    a test path and a plain number of seconds (0 to a day), at most MAX_DURATION_FILES."""
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError("durations are not ASCII") from None
    if len(lines) > MAX_DURATION_FILES:
        raise ValueError("more than %d durations" % MAX_DURATION_FILES)
    durations = {}
    for line in lines:
        seconds, _, path = line.partition(" ")
        try:
            value = float(seconds)
        except ValueError:
            raise ValueError("not a number of seconds: %r" % seconds[:40]) from None
        if not (0.0 <= value <= junit.MAX_CASE_SECONDS) or not is_test_path(path):
            raise ValueError("not a duration of a test file: %r" % line[:80])
        durations[path] = value
    return durations


# --- the plan (dispatcher) ----------------------------------------------------------


def plan(durations: dict[str, float], shards: int) -> tuple[dict[str, int], list[float]]:
    """The known files dealt out to ``shards`` shards, longest first, each to the shard
    with the least expected time so far (ties: the lowest number): (file -> shard 1..K,
    each shard's expected seconds). At most MAX_PLAN_FILES files, the longest, and no
    more than fit in MAX_PLAN_BYTES."""
    loads = [0.0] * shards
    assigned: dict[str, int] = {}
    size = 2  # the plan's JSON: {}, then "path":K, per file
    for path, seconds in sorted(durations.items(), key=lambda item: (-item[1], item[0]))[:MAX_PLAN_FILES]:
        size += len(json.dumps(path)) + 2 + len(str(shards))
        if size > MAX_PLAN_BYTES:
            break  # the shorter files left go by the hash of their path
        shard = min(range(shards), key=lambda index: (loads[index], index))
        loads[shard] += max(seconds, MIN_FILE_SECONDS)
        assigned[path] = shard + 1
    return assigned, loads


def encode_plan(assigned: dict[str, int]) -> bytes:
    """A plan as the ``plan`` section of ``runtest`` (and CI_SHARD_PLAN): a JSON object."""
    data = json.dumps(assigned, sort_keys=True, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_PLAN_BYTES:
        raise ValueError("plan of %d bytes is over %d" % (len(data), MAX_PLAN_BYTES))
    return data


def decode_plan(data: bytes, shards: int) -> dict[str, int]:
    """The plan of a section; ValueError unless it is a JSON object of at most
    MAX_PLAN_FILES test paths, each to a shard from 1 to ``shards``."""
    if len(data) > MAX_PLAN_BYTES:
        raise ValueError("plan larger than %d bytes" % MAX_PLAN_BYTES)
    try:
        assigned = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("plan is not ASCII JSON") from None
    if not isinstance(assigned, dict) or len(assigned) > MAX_PLAN_FILES:
        raise ValueError("plan is not an object of at most %d files" % MAX_PLAN_FILES)
    for path, shard in assigned.items():
        if not is_test_path(path) or isinstance(shard, bool) or not isinstance(shard, int) or not 1 <= shard <= shards:
            raise ValueError("not a file and its shard: %r" % str(path)[:80])
    return assigned


def shard_count(idle: int, waiting_after: int, max_shards: int, known_files: int) -> int:
    """How many shards a commit gets: the idle runners the commits waiting after it
    do not need, at most ``max_shards`` and the files known; 1 means unsharded."""
    return max(1, min(idle - waiting_after, max_shards, known_files))


# --- the merge (dispatcher) ---------------------------------------------------------


def heading(entry: dict, shards: int) -> str:
    """The line that starts a shard's section in the report and the log."""
    return "==== shard %s of %d: runner %s, attempt %s: %s, %s passed, %s failed, %s errors, %s skipped, %s s%s ====" % (
        entry.get("shard"), shards, entry.get("runner"), entry.get("attempt"), entry.get("status"),
        entry.get("passed"), entry.get("failed"), entry.get("errors"), entry.get("skipped"), entry.get("duration_s"),
        " (%s)" % entry["reason"] if entry.get("reason") else "")


def entry(shard: int, result: Result, runner: str) -> dict:
    """What ``shards`` in ``<sha>.json`` says of one shard's result (and the store keeps)."""
    return {"shard": shard, "runner": runner, "attempt": result.attempt, "status": result.status,
            "passed": result.passed, "failed": result.failed, "errors": result.errors, "skipped": result.skipped,
            "duration_s": result.duration_s, "reason": result.reason, "hash_seed": result.hash_seed,
            "retry": result.retry, "failing": None if result.failing is None else list(result.failing)}


def merge(commit: str, shards: list[tuple[dict, bytes, bytes | None]]) -> Result:
    """One result of the results of every shard of a commit, in shard order: each
    (its ``entry``, its output, its JUnit XML). See the module docstring."""
    count = len(shards)
    entries = [shard_entry for shard_entry, _, _ in shards]
    failed = [item for item in entries if item.get("status") != "passed"]
    result = Result(commit, "failed" if failed else "passed")
    for name in ("passed", "failed", "errors", "skipped"):
        values = [item.get(name) for item in entries]
        setattr(result, name, None if any(value is None for value in values) else sum(values))
    durations = [item.get("duration_s") for item in entries if isinstance(item.get("duration_s"), (int, float))]
    result.duration_s = max(durations) if durations else None
    result.hash_seed = entries[0].get("hash_seed") if entries else None
    unsplit = [item for item in entries if (item.get("reason") or "").startswith(UNSPLIT)]
    total = sum(result.counts()[name] or 0 for name in ("passed", "failed", "errors", "skipped"))
    if failed:
        reasons = sorted({item.get("reason") for item in failed if item.get("reason")})
        result.reason = "failed in shard%s %s of %d%s" % (
            "" if len(failed) == 1 else "s", ", ".join(str(item.get("shard")) for item in failed), count,
            ": %s" % "; ".join(reasons) if reasons else "")
    elif total == 0 and not unsplit and all(item.get("passed") is not None for item in entries):
        # Each shard skipped the others' files and exited 0; unsharded, pytest says 5.
        result.status, result.reason = "failed", "no tests collected"
    elif unsplit:
        result.reason = unsplit[0].get("reason")
    # What may run again: the failing tests of every failed shard when each named its
    # own; else the whole command, when every failed shard allows that much.
    retries = [item.get("retry") for item in failed]
    if failed and all(retry == flaky.Retry.TESTS for retry in retries):
        ids = list(dict.fromkeys(test for item in failed for test in item.get("failing") or ()))
        if 0 < len(ids) <= flaky.MAX_TESTS:
            result.retry, result.failing = flaky.Retry.TESTS.value, tuple(ids)
    elif failed and all(retry is not None for retry in retries):
        result.retry = flaky.Retry.COMMAND.value
    log = b""
    for shard_entry, output, _ in shards:
        log += heading(shard_entry, count).encode("utf-8", "replace") + b"\n" + output.rstrip(b"\n") + b"\n\n"
    result.log = log
    xml = [data for _, _, data in shards if data]
    if xml:
        try:
            result.junit = junit.merge(xml)
        except junit.JUnitError:
            result.junit = None
    result.shards = [{key: value for key, value in item.items() if key not in ("retry", "failing")}
                     for item in entries]
    return result
