"""Reruns and cancel (issue 12), on a real cluster: ci-ctl against a live dispatcher
and runner, the result files and the page."""

from __future__ import annotations

import json
import re

from test_ctl import ctl

from conftest import PASSING_TEST, WAITS_FOR_FLAG_TEST, wait_until

#: Fails until the file named by ``%r`` exists: a failure that is not the commit's.
FAILS_WITHOUT_FLAG = """import os

def test_needs_the_flag():
    assert os.path.exists(%r)
"""


def wait_run(ci, commit: str, run: int, timeout: float = 60.0) -> dict:
    """The result of ``commit`` once its run ``run`` has one."""
    return wait_until(lambda: (ci.result(commit) or {}).get("run") == run and ci.result(commit), timeout,
                      interval=0.1, message="run %d of %s" % (run, commit[:12]))


def test_a_rerun_gives_the_commit_a_new_verdict_and_keeps_the_earlier_runs(ci, upstream, tmp_path):
    flag = tmp_path / "flag"
    ci.start_dispatcher()
    ci.start_runner()
    sha = upstream.commit({"test_flag.py": FAILS_WITHOUT_FLAG % str(flag)}, "fails without the flag")
    assert ctl(ci.address, "dispatch", sha).returncode == 0
    first = ci.wait_result(sha)
    assert (first["status"], first["run"]) == ("failed", 1)

    flag.write_text("now")
    rerun = ctl(ci.address, "rerun", sha[:10])
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == "%s: run 2 queued" % sha
    second = wait_run(ci, sha, 2)
    assert second["status"] == "passed" and second["failed"] == 0
    assert "run:       2" in ci.report(sha)

    # Run 1's files, all of them, in runs/<sha>/1/.
    earlier = ci.results_dir / "runs" / sha / "1"
    assert sorted(path.name for path in earlier.iterdir()) == sorted([sha, sha + ".json", sha + ".log", sha + ".xml"])
    assert json.loads((earlier / (sha + ".json")).read_text())["status"] == "failed"
    assert "assert False" in (earlier / (sha + ".log")).read_text()

    shown = ctl(ci.address, "results", sha[:12])
    assert shown.stdout.startswith("%s: passed" % sha)
    assert re.search(r"1 +failed .*%s" % re.escape(str(earlier / sha)), shown.stdout), shown.stdout
    assert re.search(r"2 +passed .*%s\n" % re.escape(str(ci.results_dir / sha)), shown.stdout), shown.stdout
    history = json.loads(ctl(ci.address, "--json", "results", sha).stdout)
    assert [(run["run"], run["status"]) for run in history["runs"]] == [(1, "failed"), (2, "passed")]

    page = wait_until(lambda: "other runs" in ci.page() and ci.page(), 30, message="the page to list run 1")
    assert 'href="runs/%s/1/%s"' % (sha, sha) in page

    # Nothing to rerun: a commit not known, or one whose run is not over.
    unknown = ctl(ci.address, "rerun", "0" * 40)
    assert unknown.returncode == 1 and "unknown commit" in unknown.stderr


def test_cancel_stops_a_running_commit_drops_a_queued_one_and_a_rerun_keeps_its_verdict(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    ci.start_dispatcher()
    runner = ci.start_runner()
    running = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "waits for the flag")
    queued = upstream.commit({"test_more.py": PASSING_TEST}, "queued behind it")
    for sha in (running, queued):
        assert ctl(ci.address, "dispatch", sha).returncode == 0
    runner.wait_for_log(r"commit %s attempt \d+: testing" % running)

    dropped = ctl(ci.address, "cancel", queued)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.strip() == "%s: cancelled; now cancelled" % queued
    assert ci.wait_result(queued)["status"] == "cancelled"
    assert ci.result(queued)["reason"] == "cancelled by an operator"

    stopped = ctl(ci.address, "cancel", running)
    assert stopped.stdout.strip() == "%s: cancelled (its runner was told to stop); now cancelled" % running
    assert ci.wait_result(running)["status"] == "cancelled"
    runner.wait_for_log(r"commit %s attempt \d+ cancelled by .*: stopping it" % running)
    # The runner hands it back, and that answer is old news; then it is free again.
    ci.dispatcher.wait_for_log(r"commit %s attempt \d+ \(runner .*\): late aborted result ignored" % running)
    again = ctl(ci.address, "cancel", running)
    assert again.returncode == 1 and "is cancelled already: nothing to cancel" in again.stderr

    flag.write_text("go")
    assert ctl(ci.address, "rerun", running).returncode == 0
    assert wait_run(ci, running, 2)["status"] == "passed"

    # A rerun cancelled while it waits: the commit keeps the verdict it had.
    flag.unlink()
    blocker = upstream.commit({"test_block.py": WAITS_FOR_FLAG_TEST % str(flag)}, "holds the runner")
    assert ctl(ci.address, "dispatch", blocker).returncode == 0
    runner.wait_for_log(r"commit %s attempt \d+: testing" % blocker)
    assert ctl(ci.address, "rerun", running).stdout.strip() == "%s: run 3 queued" % running
    kept = ctl(ci.address, "cancel", running)
    assert kept.stdout.strip() == "%s: cancelled; now passed" % running
    history = json.loads(ctl(ci.address, "--json", "results", running).stdout)
    assert history["state"] == "passed" and history["summary"]["run"] == 2
    assert [(run["run"], run["status"]) for run in history["runs"]] == [(1, "cancelled"), (2, "passed"), (3, "cancelled")]
    assert ci.result(running)["run"] == 2
    flag.write_text("go")
    assert ci.wait_result(blocker)["status"] == "passed"


def test_a_queued_rerun_survives_a_dispatcher_kill(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    ci.start_dispatcher()
    runner = ci.start_runner()
    judged = upstream.commit({"test_ok.py": PASSING_TEST}, "passes")
    assert ctl(ci.address, "dispatch", judged).returncode == 0
    assert ci.wait_result(judged)["run"] == 1
    blocker = upstream.commit({"test_block.py": WAITS_FOR_FLAG_TEST % str(flag)}, "holds the runner")
    assert ctl(ci.address, "dispatch", blocker).returncode == 0
    runner.wait_for_log(r"commit %s attempt \d+: testing" % blocker)
    assert ctl(ci.address, "rerun", judged).returncode == 0

    ci.dispatcher.kill()
    ci.restart_dispatcher()
    # Run 1's file is there on start-up; it is not taken for run 2's.
    assert ci.result(judged)["run"] == 1
    flag.write_text("go")
    assert wait_run(ci, judged, 2)["status"] == "passed"
    assert (ci.results_dir / "runs" / judged / "1" / (judged + ".json")).exists()
