"""Sharding (issue 13), on a real cluster: one commit's tests split over idle runners by
the durations an earlier run taught, merged into one result; a shard lost with its
runner runs again alone; a failing test in one shard gets the flaky reruns; a
repository that turns sharding off; and, on a real project, the proof that the shards
together run exactly the tests of an unsharded run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from test_ctl import ctl

from commit_ci import sharding
from conftest import FAILING_TEST, ROOT, wait_until

#: A test file of one test that takes ``%r`` seconds; ``%d`` makes each file differ.
SLEEPING_TEST = "import time\n\nFILE = %d\n\n\ndef test_sleeps():\n    time.sleep(%r)\n"
#: Waits (at most 120 s) for the file ``%r`` to exist, then passes.
WAITS_TEST = """import os, time


def test_waits():
    deadline = time.monotonic() + 120
    while not os.path.exists(%r) and time.monotonic() < deadline:
        time.sleep(0.05)
"""


def suite(files: int, seconds: float = 0.05, version: int = 0) -> dict[str, str]:
    return {"tests/test_f%02d.py" % index: SLEEPING_TEST % (index + 100 * version, seconds) for index in range(files)}


def dispatch(ci, sha: str) -> None:
    assert ctl(ci.address, "dispatch", sha).returncode == 0


def teach(ci, upstream, files: dict[str, str]) -> str:
    """Commit ``files`` and run that commit (unsharded: nothing known yet), so that the
    dispatcher learns the durations of its test files."""
    sha = upstream.commit(files, "teaches the durations")
    dispatch(ci, sha)
    result = ci.wait_result(sha)
    assert result["status"] == "passed" and result["shards"] == [], result
    return sha


def junit_ids(data: bytes) -> list[str]:
    root = ElementTree.fromstring(data)
    return ["%s::%s" % (case.get("classname"), case.get("name")) for case in root.iter("testcase")]


def test_a_commit_is_split_over_idle_runners_and_merged_into_one_result(ci, upstream):
    ci.start_dispatcher()
    for index in range(3):
        ci.start_runner("--name", "r%d" % index)
    first = teach(ci, upstream, suite(6))
    sha = upstream.commit(suite(6, version=1), "the next commit")
    dispatch(ci, sha)
    result = ci.wait_result(sha)

    assert result["status"] == "passed", result
    # test_base.py and the 6 files: 7 tests, each run once, the counts summed.
    assert (result["passed"], result["failed"], result["errors"], result["skipped"]) == (7, 0, 0, 0)
    assert [entry["shard"] for entry in result["shards"]] == [1, 2, 3]
    assert sum(entry["passed"] for entry in result["shards"]) == 7
    assert {entry["runner"] for entry in result["shards"]} == {"r0", "r1", "r2"}
    assert set(result["runner"].split(", ")) == {"r0", "r1", "r2"}
    assert "commit %s: split in 3 shards" % sha in ci.dispatcher.log()
    # One result: its four files, merged.
    assert ci.result_files() == ci.expected_files([first, sha])
    report = ci.report(sha)
    for shard in (1, 2, 3):
        assert "==== shard %d of 3: runner " % shard in report
        assert re.search(r"^  shard %d: passed on runner r\d" % shard, report, re.M)
    log = (ci.results_dir / (sha + ".log")).read_text()
    assert log.count("==== shard ") == 3
    ids = junit_ids((ci.results_dir / (sha + ".xml")).read_bytes())
    assert sorted(ids) == sorted(["test_base::test_passes"] + ["tests.test_f%02d::test_sleeps" % i for i in range(6)])
    assert len(re.findall(r"commit %s: passed \(attempt" % sha, ci.dispatcher.log())) == 1


def test_a_shard_whose_runner_is_killed_runs_again_alone_and_the_commit_has_one_result(ci, upstream, tmp_path):
    ci.start_dispatcher("--heartbeat-interval", "0.3")
    runners = [ci.start_runner("--name", "r%d" % index) for index in range(3)]
    flag = tmp_path / "release"
    waiting = {"tests/test_w%d.py" % index: "FILE = %d\n" % index + WAITS_TEST % str(flag) for index in range(6)}
    teach(ci, upstream, {path: "FILE = 0\n" + WAITS_TEST % "/" for path in waiting})
    sha = upstream.commit(waiting, "every test waits for the flag")
    dispatch(ci, sha)
    for runner in runners:
        runner.wait_for_log(r"commit %s attempt \d+ accepted from .*: shard \d of 3" % sha)
    victim = runners[0]
    victim.kill()  # SIGKILL, its job's processes with it
    log_size = len(ci.dispatcher.log())
    ci.dispatcher.wait_for_log(r"runner r0 dropped", timeout=30, after=log_size)
    flag.write_text("go")
    result = ci.wait_result(sha, timeout=90)

    assert result["status"] == "passed", result
    assert result["passed"] == 7
    assert len(result["shards"]) == 3 and {entry["runner"] for entry in result["shards"]} == {"r1", "r2"}
    log = ci.dispatcher.log()
    assert re.search(r"commit %s attempt \d+ \(runner r0\): shard \d: .*that shard alone waits" % sha, log)
    # Every shard ran once but the lost one, which ran twice: K + 1 attempts in all.
    assert len(re.findall(r"commit %s attempt \d+: running on runner" % sha, log)) == 4
    assert len(re.findall(r"commit %s: passed \(attempt" % sha, log)) == 1


def test_a_failing_test_in_one_shard_fails_the_commit_and_only_it_runs_again(ci, upstream):
    ci.start_dispatcher("--flaky-reruns", "1")
    for index in range(3):
        ci.start_runner("--name", "r%d" % index)
    teach(ci, upstream, dict(suite(5), **{"tests/test_broken.py": SLEEPING_TEST % (99, 0.05)}))
    sha = upstream.commit({"tests/test_broken.py": FAILING_TEST}, "one test fails")
    dispatch(ci, sha)
    result = ci.wait_result(sha)

    assert result["status"] == "failed", result
    assert (result["passed"], result["failed"]) == (6, 1)
    assert len(result["shards"]) == 3
    assert [entry["status"] for entry in result["shards"]].count("failed") == 1
    [rerun] = result["reruns"]
    assert rerun["tests"] == ["tests/test_broken.py::test_fails"]
    assert (rerun["passed"], rerun["failed"]) == (0, 1)


def test_a_repository_that_turns_sharding_off_runs_unsplit(ci, upstream):
    ci.start_dispatcher()
    for index in range(3):
        ci.start_runner("--name", "r%d" % index)
    teach(ci, upstream, suite(6))
    sha = upstream.commit(dict(suite(6, version=1), **{".commit-ci.toml": "shard = false\n"}), "no sharding")
    dispatch(ci, sha)
    result = ci.wait_result(sha)

    assert result["status"] == "passed", result
    assert result["passed"] == 7
    # Split by the dispatcher, which cannot know: shard 1 ran the suite, the others nothing.
    assert [entry["passed"] for entry in result["shards"]] == [7, 0, 0]
    assert result["reason"].startswith("not split: shard = false in .commit-ci.toml")


def test_max_shards_1_never_splits(ci, upstream):
    ci.start_dispatcher("--max-shards", "1")
    for index in range(2):
        ci.start_runner("--name", "r%d" % index)
    teach(ci, upstream, suite(4))
    sha = upstream.commit(suite(4, version=1), "the next commit")
    dispatch(ci, sha)
    result = ci.wait_result(sha)
    assert result["status"] == "passed" and result["shards"] == [] and result["passed"] == 5
