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
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from test_ctl import ctl

from commit_ci import sharding

from conftest import FAILING_TEST, ROOT, RUNNER_ENV, git, wait_until

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


def three_shards_waiting(ci, upstream, flag: Path, *dispatcher_options: str) -> tuple[list, dict[str, str], str]:
    """A dispatcher and runners r0, r1, r2, the durations of 6 test files taught, then a
    commit of those files whose every test waits for ``flag``, running in 3 shards:
    (the runners, the files, the commit)."""
    ci.start_dispatcher(*dispatcher_options)
    runners = [ci.start_runner("--name", "r%d" % index) for index in range(3)]
    waiting = {"tests/test_w%d.py" % index: "FILE = %d\n" % index + WAITS_TEST % str(flag) for index in range(6)}
    teach(ci, upstream, {path: "FILE = 0\n" + WAITS_TEST % "/" for path in waiting})
    sha = upstream.commit(waiting, "every test waits for the flag")
    dispatch(ci, sha)
    for runner in runners:
        runner.wait_for_log(r"commit %s attempt \d+ accepted from .*: shard \d of 3" % sha)
    return runners, waiting, sha


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
    shown = ctl(ci.address, "results", sha).stdout
    assert re.search(r"^  shard 2:  passed on r\d, \d passed, 0 failed", shown, re.M), shown


def test_a_shard_whose_runner_is_killed_runs_again_alone_and_the_commit_has_one_result(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    runners, _, sha = three_shards_waiting(ci, upstream, flag, "--heartbeat-interval", "0.3")
    victim = runners[0]
    victim.kill()  # SIGKILL, its job's processes with it
    log_size = len(ci.dispatcher.log())
    ci.dispatcher.wait_for_log(r"runner r0 dropped", timeout=30, after=log_size)
    flag.write_text("go")
    result = ci.wait_result(sha, timeout=90)

    assert result["status"] == "passed", result
    assert result["passed"] == 7
    assert len(result["shards"]) == 3 and {entry["runner"] for entry in result["shards"]} == {"r1", "r2"}
    assert all(entry["passed"] >= 2 for entry in result["shards"]), result["shards"]
    log = ci.dispatcher.log()
    assert re.search(r"commit %s attempt \d+ \(runner r0\): shard \d: .*that shard alone waits" % sha, log)
    # Every shard ran once but the lost one, which ran twice: K + 1 attempts in all.
    assert len(re.findall(r"commit %s attempt \d+: running on runner" % sha, log)) == 4
    assert len(re.findall(r"commit %s: passed \(attempt" % sha, log)) == 1


def test_a_dispatcher_killed_mid_shards_comes_back_to_one_result(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    _, _, sha = three_shards_waiting(ci, upstream, flag, "--heartbeat-interval", "0.3")
    ci.dispatcher.kill()
    ci.restart_dispatcher()
    wait_until(lambda: len(re.findall(r"commit %s attempt \d+: runner r\d is still running it; adopted" % sha,
                                      ci.dispatcher.log())) == 3, 30, message="the three shards adopted")
    # Adopted, each shard is known for what it is (the queue and the live log name it).
    running = json.loads(ctl(ci.address, "--json", "queue").stdout)["running"]
    assert [(out["shard"], out["shards"]) for out in running[0]["shards"]] == [(1, 3), (2, 3), (3, 3)], running
    flag.write_text("go")
    result = ci.wait_result(sha, timeout=90)

    assert result["status"] == "passed", result
    assert result["passed"] == 7 and len(result["shards"]) == 3
    assert all(entry["passed"] >= 2 for entry in result["shards"]), result["shards"]
    ci.dispatcher.wait_for_log(r"commit %s: passed \(attempt" % sha)  # written just after the result files
    log = ci.dispatcher.log()
    assert len(re.findall(r"commit %s: passed \(attempt" % sha, log)) == 1
    assert "Traceback" not in log, log


def test_a_sharded_commit_cancelled_stops_every_shard_and_the_runners_go_on(ci, upstream, tmp_path):
    runners, waiting, sha = three_shards_waiting(ci, upstream, tmp_path / "never")
    # Their output live, in one log, each shard's under its name: pytest's header thrice.
    def live_log_has_every_shard() -> bool:
        shown = ctl(ci.address, "log", sha).stdout
        return (all(re.search(r"^\[shard %d of 3, attempt \d+\]$" % shard, shown, re.M) for shard in (1, 2, 3))
                and shown.count("test session starts") == 3)

    wait_until(live_log_has_every_shard, 60, message="every shard's output in the live log")
    # The queue shows where each shard runs.
    running = json.loads(ctl(ci.address, "--json", "queue").stdout)["running"]
    assert [(job["commit"], [(out["shard"], out["shards"]) for out in job["shards"]]) for job in running] == [
        (sha, [(1, 3), (2, 3), (3, 3)])]
    assert {out["runner"] for out in running[0]["shards"]} == {"r0", "r1", "r2"}
    shown = ctl(ci.address, "queue").stdout
    assert re.search(r"^  %s  in shards, started .*:\n    shard 1 of 3: attempt \d+ on r\d$" % sha[:12], shown, re.M), shown
    assert ctl(ci.address, "cancel", sha).returncode == 0
    assert ci.wait_result(sha)["status"] == "cancelled"
    for runner in runners:
        runner.wait_for_log(r"commit %s attempt \d+ cancelled by .*: stopping it" % sha)
    after = upstream.commit({path: "def test_quick():\n    pass\n" for path in waiting}, "the next one")
    dispatch(ci, after)
    result = ci.wait_result(after, timeout=60)
    assert result["status"] == "passed" and result["passed"] == 7


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


def test_a_runner_from_before_sharding_refuses_one_shard_then_gets_whole_commits_alone(ci, upstream, tmp_path):
    # The dispatcher upgraded first, a runner not yet: it answers a shard as its parser
    # did, "unknown option". The shard goes to a runner that runs shards, once that
    # one is free, and the old runner is not offered a shard again (before, it was,
    # at every plan, for as long as the other was busy).
    ci.start_dispatcher("--heartbeat-interval", "0.3")
    ci.start_runner("--name", "new")
    flag = tmp_path / "release"
    waiting = {"tests/test_w%d.py" % index: "FILE = %d\n" % index + WAITS_TEST % str(flag) for index in range(4)}
    teach(ci, upstream, {path: "FILE = 0\n" + WAITS_TEST % "/" for path in waiting})
    old = ci.processes.start("old-runner", [sys.executable, str(ROOT / "bench" / "fake_runner.py"), ci.address, "old",
                                            "--no-shards"])
    ci.dispatcher.wait_for_log(r"runner old answers at .*: ready")
    sha = upstream.commit(waiting, "every test waits for the flag")
    dispatch(ci, sha)
    old.wait_for_log(r"commit %s attempt \d+: shard refused" % sha)
    refused = ci.dispatcher.wait_for_log(r"runner old does not run shards \(unknown option 'shard' for runtest: ")
    # Pinged again since it refused, so available: the next plan used to offer it the
    # shard again at once.
    ci.dispatcher.wait_for_log(r"runner old answers at .*: ready", after=refused.end())
    runners = json.loads(ctl(ci.address, "--json", "runners").stdout)["runners"]
    assert {runner["name"]: runner["shards"] for runner in runners} == {"new": True, "old": False}
    assert "whole commits only" in ctl(ci.address, "runners").stdout
    flag.write_text("go")
    result = ci.wait_result(sha, timeout=90)

    assert result["status"] == "passed", result
    assert result["passed"] == 5 and len(result["shards"]) == 2
    assert {entry["runner"] for entry in result["shards"]} == {"new"}
    assert len(re.findall(r"shard refused", old.log())) == 1, old.log()


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


# --- the partition: the shards together run exactly an unsharded run's tests ------------

BUNDLE = ROOT.parent / "shared" / "real-repos" / "iniconfig.bundle"


def pytest_ids(folder: Path, junit: Path, shard: tuple[int, int] | None = None, plan: dict | None = None,
               pythonpath: str = "") -> list[str]:
    """The test ids of the JUnit XML of a pytest run in ``folder``: all of it, or, with
    ``shard`` (I, K), that shard alone, as a runner runs it (executor.py: the plugin's
    folder first on PYTHONPATH, ``-p``, CI_SHARD and CI_SHARD_PLAN)."""
    env = dict(RUNNER_ENV, PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(junit)]
    if shard is not None:
        pythonpath = sharding.PLUGIN_FOLDER + (os.pathsep + pythonpath if pythonpath else "")
        env.update(CI_SHARD="%d/%d" % shard, CI_SHARD_PLAN=json.dumps(plan or {}))
        args[3:3] = ["-p", sharding.PLUGIN_MODULE]
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return junit_ids(junit.read_bytes())


def assert_partition(folder: Path, tmp_path: Path, plans: list[dict], shards: int, pythonpath: str = "") -> list:
    whole = pytest_ids(folder, tmp_path / "whole.xml", pythonpath=pythonpath)
    assert len(whole) == len(set(whole)) and whole
    for number, plan in enumerate(plans):
        parts = [pytest_ids(folder, tmp_path / ("plan%d-shard%d.xml" % (number, shard)), (shard, shards), plan,
                            pythonpath) for shard in range(1, shards + 1)]
        union = [test for part in parts for test in part]
        assert len(union) == len(set(union)), "a test ran in two shards"
        assert sorted(union) == sorted(whole), (plan, parts)
    return whole


def test_on_a_real_project_the_shards_together_run_exactly_the_tests_of_an_unsharded_run(tmp_path):
    if not BUNDLE.exists():
        pytest.fail("%s is missing: the real project's history is part of the workplace" % BUNDLE)
    project = tmp_path / "iniconfig"
    git(tmp_path, "clone", "--quiet", str(BUNDLE), str(project))
    tests = sorted(str(path.relative_to(project)) for path in project.rglob("test_*.py"))
    # No plan (every file by the hash of its path), a plan for each shard, a plan of files it does not have.
    plans = [{}] + [{path: shard for path in tests} for shard in (1, 3)] + [{"testing/test_gone.py": 2}]
    whole = assert_partition(project, tmp_path, plans, 3, pythonpath=str(project / "src"))
    assert len(whole) >= 40


def test_files_the_plan_does_not_know_and_new_parametrizations_are_run_once(tmp_path):
    project = tmp_path / "project"
    for index in range(12):
        folder = project / ("pkg%d" % (index % 3)) / "tests"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ("test_m%d.py" % index)).write_text(
            "import pytest\n\n\n@pytest.mark.parametrize('n', range(%d))\ndef test_p(n):\n    pass\n\n\n"
            "class TestC:\n    def test_m(self):\n        pass\n" % (index + 1))
    (project / "pkg0" / "tests" / "conftest.py").write_text("import pytest\n\n\n@pytest.fixture\ndef f():\n    return 1\n")
    (project / "test_top.py").write_text("def test_top():\n    pass\n")
    known = {"pkg0/tests/test_m0.py": 5.0, "pkg1/tests/test_m1.py": 3.0, "pkg2/tests/test_m2.py": 1.0,
             "pkg0/tests/test_m3.py": 1.0, "test_top.py": 0.5, "pkg1/tests/test_gone.py": 9.0}
    plans = [sharding.plan(known, shards)[0] for shards in (4,)] + [{}]
    assert_partition(project, tmp_path, plans, 4)


# --- the store: schema 7 ------------------------------------------------------------------


def test_a_file_of_schema_version_6_opens_and_its_jobs_can_be_split(tmp_path):
    import sqlite3

    from commit_ci.store import SCHEMA_VERSION, JobStore

    path = str(tmp_path / "queue.sqlite3")
    store = JobStore(path)
    queued, running = "a" * 40, "b" * 40
    store.enqueue(queued, 1.0)
    store.enqueue(running, 1.0)
    store.assign(running, "r1", 2.0)
    store.close()
    # Back to version 6: what versions 7 and 8 added, taken away again.
    with sqlite3.connect(path) as db:
        db.executescript("DROP TABLE shards; DROP TABLE test_durations; DROP TABLE notifications; DROP TABLE branch_notices;"
                         " ALTER TABLE jobs DROP COLUMN shards; ALTER TABLE attempts DROP COLUMN shard;"
                         " UPDATE meta SET value = '6' WHERE key = 'schema_version';")
    store = JobStore(path)
    try:
        assert store.recover(3.0) == 1
        assert store.queued(10) == [queued, running]
        store.learn_durations({"tests/test_a.py": 2.0, "tests/test_b.py": 1.0}, 4.0)
        plan, _ = sharding.plan(store.durations(), 2)
        store.split(queued, 2, sharding.encode_plan(plan))
        assert [shard for _, shard in store.waiting_shards(10)] == [1, 2]
        attempt = store.assign_shard(queued, 2, "r1", 5.0)
        assert store.attempt(attempt).shard == 2 and store.job(queued).state.value == "running"
        # A lost shard waits again alone; a result is kept once.
        assert store.requeue_shard(attempt, sharding_outcome("lost"), 6.0)
        assert [shard for _, shard in store.waiting_shards(10)] == [1, 2]
        again = store.assign_shard(queued, 2, "r2", 7.0)
        assert store.keep_shard(again, {"status": "passed"}, b"out", None, 8.0) == (True, None)
        assert store.keep_shard(again, {"status": "passed"}, b"out", None, 8.5) == (False, None)
        # The first attempt's late verdict, for the other shard taken back meanwhile, counts.
        late = store.assign_shard(queued, 1, "r1", 9.0)
        assert store.requeue_shard(late, sharding_outcome("lost"), 9.5)
        newer = store.assign_shard(queued, 1, "r3", 10.0)
        assert store.keep_shard(late, {"status": "passed"}, b"late", None, 11.0) == (True, newer)
        assert store.attempt(newer).outcome.value == "superseded"
        assert [shard.summary for shard in store.shards_of(queued, 1)] == [{"status": "passed"}] * 2
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def sharding_outcome(value: str):
    from commit_ci.states import Outcome

    return Outcome(value)


# --- the pure parts: plan, durations, merge ------------------------------------------------


def test_the_plan_deals_the_longest_files_first_to_the_least_loaded_shard():
    plan, loads = sharding.plan({"a.py": 5.0, "b.py": 4.0, "c.py": 3.0, "d.py": 3.0, "e.py": 1.0}, 2)
    assert plan == {"a.py": 1, "b.py": 2, "c.py": 2, "d.py": 1, "e.py": 2}
    assert loads == [8.0, 8.0]
    # Files whose tests took no time are dealt out evenly.
    plan, _ = sharding.plan({"f%d.py" % index: 0.0 for index in range(6)}, 3)
    assert sorted(plan.values()) == [1, 1, 2, 2, 3, 3]
    assert sharding.shard_count(idle=4, waiting_after=0, max_shards=8, known_files=40) == 4
    assert sharding.shard_count(idle=4, waiting_after=3, max_shards=8, known_files=40) == 1
    assert sharding.shard_count(idle=8, waiting_after=0, max_shards=3, known_files=40) == 3
    # However many and however long the paths, the plan fits its section.
    many = {"tests/%s/test_%04d.py" % ("d" * 400, index): float(index) for index in range(3000)}
    plan, _ = sharding.plan(many, 64)
    assert 0 < len(plan) <= sharding.MAX_PLAN_FILES and max(many[path] for path in plan) == 2999.0
    assert sharding.decode_plan(sharding.encode_plan(plan), 64) == plan


@pytest.mark.parametrize("bad", [b"1.0 ../x.py\n", b"1.0 /abs.py\n", b"nan tests/a.py\n", b"-1 tests/a.py\n",
                                 b"1e9 tests/a.py\n", b"1.0 tests/a.py::test_x\n", b"1.0 tests/a.txt\n",
                                 b"\xff tests/a.py\n"])
def test_durations_from_a_runner_are_checked(bad):
    with pytest.raises(ValueError):
        sharding.decode_durations(bad)
    assert sharding.decode_durations(b"1.250 tests/a.py\n0.000 b.py\n") == {"tests/a.py": 1.25, "b.py": 0.0}


@pytest.mark.parametrize("bad", [b"[]", b'{"a.py": 0}', b'{"a.py": 3}', b'{"a.py": true}', b'{"../a.py": 1}',
                                 b'{"-p.py": 1}', b"not json", b'{"a.py": 1.5}'])
def test_a_plan_from_the_wire_is_checked(bad):
    with pytest.raises(ValueError):
        sharding.decode_plan(bad, 2)
    assert sharding.decode_plan(b'{"a.py": 1, "t/b.py": 2}', 2) == {"a.py": 1, "t/b.py": 2}


def test_the_merge_sums_the_counts_and_the_failing_tests_of_the_failed_shards():
    def entry(shard, status, passed, failed, failing=None):
        return {"shard": shard, "runner": "r%d" % shard, "attempt": shard, "status": status, "passed": passed,
                "failed": failed, "errors": 0, "skipped": 0, "duration_s": float(shard), "reason": None,
                "hash_seed": 1, "retry": "tests" if failing else None, "failing": failing}

    xml = b'<?xml version="1.0"?><testsuites><testsuite tests="1"><testcase classname="a" name="t%d"/></testsuite></testsuites>'
    merged = sharding.merge("c" * 40, [(entry(1, "passed", 3, 0), b"one\n", xml % 1),
                                       (entry(2, "failed", 2, 1, ["b.py::test_x"]), b"two\n", xml % 2)])
    assert (merged.status, merged.passed, merged.failed, merged.duration_s) == ("failed", 5, 1, 2.0)
    assert (merged.retry, merged.failing) == ("tests", ("b.py::test_x",))
    assert merged.reason == "failed in shard 2 of 2"
    assert merged.log.count(b"==== shard ") == 2 and b"one" in merged.log and b"two" in merged.log
    assert junit_ids(merged.junit) == ["a::t1", "a::t2"]
    assert [item["shard"] for item in merged.shards] == [1, 2] and "failing" not in merged.shards[0]


def test_a_file_of_version_8_made_while_7_was_a_placeholder_gets_the_shard_columns(tmp_path):
    import sqlite3

    from commit_ci.store import JobStore

    path = str(tmp_path / "queue.sqlite3")
    JobStore(path).close()
    with sqlite3.connect(path) as db:
        db.executescript("DROP TABLE shards; DROP TABLE test_durations;"
                         " ALTER TABLE jobs DROP COLUMN shards; ALTER TABLE attempts DROP COLUMN shard;")
    store = JobStore(path)
    try:
        store.enqueue("c" * 40, 1.0)
        store.split("c" * 40, 2, b"{}")
        assert store.job("c" * 40).shards == 2
    finally:
        store.close()
