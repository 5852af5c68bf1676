"""Flaky tests without daemons: node ids from pytest's own JUnit XML, the checks every
id passes, what a rerun decides, the results a runner sends and keeps, the store's
rounds and flaky tests, and the schema migration that added them."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from commit_ci import flaky, junit
from commit_ci.flaky import Step, decode_test_ids, encode_test_ids, first_step, is_test_id, next_step, node_id
from commit_ci.outbox import decode, encode
from commit_ci.protocol import Message
from commit_ci.result import Result
from commit_ci.states import JobState, Outcome
from commit_ci.store import SCHEMA_VERSION, JobStore

A = "a" * 40
B = "b" * 40

SUITE = {
    "tests/__init__.py": "",
    "tests/test_a.py": """import pytest


class TestX:
    @pytest.mark.parametrize("value", [1, 2, "a b", "x::y", "1.5"])
    def test_y(self, value):
        assert value not in (2, "x::y", "1.5")


def test_plain():
    assert False


def test_fine():
    pass


@pytest.mark.skip
def test_skipped():
    assert False
""",
    "test_top.py": "def test_top():\n    raise RuntimeError('boom')\n",
}
EXPECTED_FAILING = ("tests/test_a.py::TestX::test_y[2]", "tests/test_a.py::TestX::test_y[x::y]",
                    "tests/test_a.py::TestX::test_y[1.5]", "tests/test_a.py::test_plain", "test_top.py::test_top")


def run_pytest(folder, *args: str) -> junit.ElementTree.Element:
    """pytest's JUnit XML (its default family) of running the suite in ``folder``."""
    report = folder / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(report), *args],
                   cwd=folder, capture_output=True, timeout=120, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    return junit.parse(report.read_bytes())


@pytest.fixture
def suite(tmp_path):
    folder = tmp_path / "checkout"
    for name, text in SUITE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_the_failing_tests_of_real_junit_xml_become_node_ids_that_pytest_runs_alone(suite):
    is_file = lambda path: (suite / path).is_file()  # noqa: E731
    root = run_pytest(suite)
    assert sorted(flaky.failing_ids(root, is_file)) == sorted(EXPECTED_FAILING)
    # Run again by those ids, only they run, and none of them passes.
    again = run_pytest(suite, *EXPECTED_FAILING)
    assert sorted((classname, name) for classname, name, _ in junit.cases(again)) == sorted([
        ("tests.test_a.TestX", "test_y[2]"), ("tests.test_a.TestX", "test_y[x::y]"),
        ("tests.test_a.TestX", "test_y[1.5]"), ("tests.test_a", "test_plain"), ("test_top", "test_top")])
    assert flaky.still_failing(EXPECTED_FAILING, again, is_file) == EXPECTED_FAILING
    # A test that was skipped, or did not run, proves nothing; one that passed does.
    asked = ("tests/test_a.py::test_fine", "tests/test_a.py::test_skipped", "tests/test_a.py::test_missing")
    assert flaky.still_failing(asked, root, is_file) == asked[1:]


def test_a_name_that_fits_no_file_or_two_has_no_node_id(tmp_path):
    files = {"a/b.py", "a/b/c.py", "pkg/mod.py"}
    is_file = files.__contains__
    assert node_id("pkg.mod.TestK", "test_x[p.q]", is_file) == "pkg/mod.py::TestK::test_x[p.q]"
    assert node_id("pkg.mod", "test_x", is_file) == "pkg/mod.py::test_x"
    assert node_id("", "pkg.mod", is_file) == "pkg/mod.py"  # a module that failed to import
    assert node_id("a.b.c", "test", is_file) is None  # a/b.py with class c, or a/b/c.py
    assert node_id("nowhere.mod", "test_x", is_file) is None
    for classname in ("..pkg.mod", "pkg..mod", "pkg/x.mod", "pkg\\x.mod"):
        assert node_id(classname, "test_x", lambda path: True) is None
    assert node_id("-rf.mod", "test_x", lambda path: True) is None  # would be an option
    assert node_id("@args", "test_x", lambda path: True) is None  # would be an arguments file


@pytest.mark.parametrize("text", [
    "-x", "--co", "@file", "/etc/passwd.py", "../up.py::t", "a/../b.py::t", "a//b.py::t", "a.txt::t", "t.py::\x00",
    "t.py::t\n", "t.py::\u00e9", "a\\b.py::t", "x" * 498 + ".py", "", " t.py",
])
def test_what_is_no_test_id(text):
    assert not is_test_id(text)


def test_test_ids_on_the_wire_are_checked_and_bounded():
    ids = ("t.py::test_a[x y]", "dir/t.py::TestC::test_b[1.5]")
    assert decode_test_ids(encode_test_ids(ids)) == ids
    assert decode_test_ids(b"") == ()
    for data, why in ((b"-x\n", "not a test id"), (b"t.py\nt.py\n", "twice"), (b"\xff.py\n", "ASCII"),
                      (b"".join(b"t%d.py\n" % index for index in range(flaky.MAX_TESTS + 1)), "more than")):
        with pytest.raises(ValueError, match=why):
            decode_test_ids(data)


def test_a_result_with_bad_test_ids_keeps_its_verdict_and_names_no_test():
    message = Message("results", {"commit": A, "attempt": 3, "status": "failed", "retry": "tests"},
                      {"failing": b"--collect-only\n"})
    result = Result.from_message(message)
    assert (result.status, result.retry, result.failing) == ("failed", "tests", None)
    # A rerun that named no valid test proves none passed.
    assert next_step(1, 2, ("t.py::a",), ("t.py::a",), "passed", result.retry, result.failing) == Step(
        True, tests=("t.py::a",), failing=("t.py::a",))


def test_a_kept_result_keeps_its_failing_tests():
    result = Result(A, "failed", attempt=4, retry="tests", failing=("t.py::a", "t.py::b"), log=b"out")
    again = decode(encode(result))
    assert (again.retry, again.failing, again.log) == ("tests", ("t.py::a", "t.py::b"), b"out")
    assert decode(encode(Result(A, "passed", attempt=5))).failing is None


def test_what_each_round_decides():
    ids = ("t.py::a", "t.py::b")
    assert first_step("passed", None, None, 2) == Step(False, status="passed")
    assert first_step("failed", "tests", ids, 0) == Step(False, status="failed")  # --flaky-reruns 0
    assert first_step("failed", None, None, 2) == Step(False, status="failed")  # a time-out, a collection error
    assert first_step("failed", "tests", ids, 2) == Step(True, tests=ids)
    assert first_step("failed", "command", None, 2) == Step(True, tests=None)
    # Both pass in rerun 1: flaky.
    assert next_step(1, 2, ids, ids, "passed", "tests", ()) == Step(False, status="flaky", flaky=ids, failing=())
    # One fails in every rerun: failed, and the other one is named flaky.
    assert next_step(1, 2, ids, ids, "failed", "tests", ("t.py::a",)) == Step(
        True, tests=("t.py::a",), failing=("t.py::a",))
    assert next_step(2, 2, ids, ("t.py::a",), "failed", "tests", ("t.py::a",)) == Step(
        False, status="failed", flaky=("t.py::b",), failing=("t.py::a",))
    # A whole test command: passed or not, nothing else to know.
    assert next_step(1, 2, None, None, "passed", None, None) == Step(
        False, status="flaky", flaky=(flaky.WHOLE_COMMAND,), failing=())
    assert next_step(2, 2, None, None, "failed", "command", None) == Step(False, status="failed", failing=None)
    # A runner that cannot name tests (a test command) and fails: all still failing.
    assert next_step(1, 1, ids, ids, "failed", None, None) == Step(False, status="failed", failing=ids)


def test_the_outcomes_kept_for_a_flaky_test():
    summary = {"flaky_tests": ["t.py::a", "t.py::b"], "reruns": [
        {"tests": ["t.py::a", "t.py::b"], "failing": ["t.py::a"], "status": "failed"},
        {"tests": ["t.py::a"], "failing": [], "status": "passed"}]}
    assert flaky.records(summary) == [("t.py::a", ["failed", "failed", "passed"]), ("t.py::b", ["failed", "passed"])]
    assert flaky.records({"flaky_tests": None}) == []


def test_rounds_are_kept_until_the_verdict_and_flaky_tests_for_good(tmp_path):
    store = JobStore(str(tmp_path / "queue.sqlite3"))
    try:
        store.enqueue(A, 1.0)
        first = store.assign(A, "r1", 2.0)
        store.keep_round(A, 1, 0, json.dumps({"failing": ["t.py::a"]}), b"log 0", b"<testsuites/>")
        store.keep_round(A, 1, 0, json.dumps({"failing": ["t.py::a"]}), b"log 0", b"<testsuites/>")  # sent twice
        store.next_round(A, first, 1, ("t.py::a",), 3.0)
        job = store.job(A)
        assert (job.state, job.round, job.retest) == (JobState.QUEUED, 1, ("t.py::a",))
        assert store.attempt(first).outcome is Outcome.FAILED
        second = store.assign(A, "r2", 4.0)
        assert (store.attempt(second).round, store.attempt_counts(A, 1), store.attempt_counts(A, 0)) == (1, (1, 0), (1, 0))
        [kept] = store.rounds(A, 1)
        assert (kept.round, kept.summary, kept.log, kept.junit) == (0, {"failing": ["t.py::a"]}, b"log 0", b"<testsuites/>")
        store.finish(A, second, JobState.FLAKY, Outcome.FLAKY, None, '{"status": "flaky"}', 5.0,
                     flaky=[("t.py::a", ["failed", "passed"])])
        assert store.rounds(A, 1) == [] and store.job(A).state is JobState.FLAKY
        store.enqueue(B, 6.0)
        store.finish(B, store.assign(B, "r1", 6.0), JobState.PASSED, Outcome.PASSED, None, '{"status": "passed"}', 7.0)
        runs, tests = store.flakiest(100, 10)
        assert runs == 2
        assert tests == [{"test": "t.py::a", "flaky": 1, "commit": A, "run": 1, "outcomes": ["failed", "passed"],
                          "finished_at": 5.0}]
        assert store.flakiest(1, 10) == (1, [])  # the newest run alone: B's, not flaky
        # A rerun starts again from round 0, the whole suite.
        assert store.rerun(A, 8.0) == 2 and (store.job(A).round, store.job(A).retest) == (0, None)
    finally:
        store.close()


#: The tables of schema version 3, as the version before flaky tests made them.
SCHEMA_3 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '3');
CREATE TABLE jobs (seq INTEGER PRIMARY KEY, commit_id TEXT NOT NULL UNIQUE, state TEXT NOT NULL,
    queued_at REAL NOT NULL, started_at REAL, finished_at REAL, current_attempt INTEGER, runner TEXT,
    reason TEXT, summary TEXT, requires TEXT, run INTEGER NOT NULL DEFAULT 1);
CREATE TABLE attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, commit_id TEXT NOT NULL, runner TEXT NOT NULL,
    assigned_at REAL NOT NULL, ended_at REAL, outcome TEXT, run INTEGER NOT NULL DEFAULT 1);
CREATE TABLE runners (name TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL, registered_at REAL NOT NULL,
    offers TEXT);
CREATE TABLE runs (commit_id TEXT NOT NULL, run INTEGER NOT NULL, status TEXT NOT NULL, finished_at REAL NOT NULL,
    summary TEXT, PRIMARY KEY (commit_id, run));
INSERT INTO jobs (commit_id, state, queued_at, current_attempt, runner) VALUES ('%s', 'running', 1.0, 1, 'r1');
INSERT INTO attempts (commit_id, runner, assigned_at) VALUES ('%s', 'r1', 1.0);
INSERT INTO jobs (commit_id, state, queued_at, finished_at, summary) VALUES ('%s', 'failed', 1.0, 2.0, '{"status": "failed"}');
INSERT INTO runs VALUES ('%s', 1, 'failed', 2.0, '{"status": "failed"}');
""" % (A, A, B, B)


def test_a_file_of_schema_version_3_opens_and_its_running_job_goes_on_in_rounds(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_3)
    store = JobStore(path)
    try:
        assert store.recover(3.0) == 1
        job = store.job(A)
        assert (job.state, job.round, job.retest, store.attempt(1).round) == (JobState.QUEUED, 0, None, 0)
        attempt = store.assign(A, "r2", 4.0)
        store.keep_round(A, 1, 0, "{}", b"", None)
        store.next_round(A, attempt, 1, None, 5.0)
        assert (store.job(A).round, store.job(A).retest) == (1, None)
        assert store.flakiest(10, 10) == (1, [])  # B's run counts; no flaky test yet
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
