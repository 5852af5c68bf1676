"""The dispatcher's request handlers in this process, on a real store, with no
network: for what a test cannot hold still from the outside."""

from __future__ import annotations

import logging
import threading

from commit_ci import dispatcher, result_files
from commit_ci.protocol import request
from commit_ci.states import JobState
from commit_ci.store import JobStore

SHA = "ab" * 20


def test_a_verdict_is_written_without_holding_everyone_up(tmp_path, monkeypatch):
    """Writing a verdict's files (megabytes of output, fsync'ed) happens outside the
    dispatcher's lock, which every request and the scheduler take; another verdict
    for the same commit meanwhile waits its turn (ERR: the runner sends it again)."""
    store = JobStore(str(tmp_path / "queue.sqlite3"))
    (tmp_path / "results").mkdir()
    handler = dispatcher.Dispatcher(store, str(tmp_path / "results"))
    store.enqueue(SHA, 1.0)
    attempt = store.assign(SHA, "r1", 2.0)
    writing, release = threading.Event(), threading.Event()
    real_write = result_files.write_result

    def slow_write(*args, **kwargs):
        writing.set()
        assert release.wait(30), "never released"
        real_write(*args, **kwargs)

    monkeypatch.setattr(result_files, "write_result", slow_write)
    verdict = request("results", commit=SHA, attempt=attempt, status="passed", passed=1, log=b"1 passed\n")
    answers = []
    recording = threading.Thread(target=lambda: answers.append(handler.handle(verdict, "r1")))
    recording.start()
    try:
        assert writing.wait(30)
        assert handler._cond.acquire(timeout=5), "the lock is free while the files are written"
        handler._cond.release()
        assert handler.handle(request("status"), "ctl").verb == "OK"
        again = handler.handle(verdict, "r1")
        assert (again.verb, again.get("reason")[:5]) == ("ERR", "busy:")
    finally:
        release.set()
        recording.join(30)
    assert (answers[0].verb, answers[0].get("recorded")) == ("OK", 1)
    assert store.job(SHA).state is JobState.PASSED
    assert (tmp_path / "results" / (SHA + ".json")).exists()
    late = handler.handle(verdict, "r1")
    assert (late.verb, late.get("recorded")) == ("OK", 0), "once recorded, the same verdict again is old news"
    store.close()


def test_junit_xml_a_browser_would_run_scripts_from_is_not_kept_whoever_sends_it(tmp_path, caplog):
    """Runners do not send such a file, but a result does not have to come from ours."""
    store = JobStore(str(tmp_path / "queue.sqlite3"))
    (tmp_path / "results").mkdir()
    handler = dispatcher.Dispatcher(store, str(tmp_path / "results"))
    store.enqueue(SHA, 1.0)
    attempt = store.assign(SHA, "r1", 2.0)
    hostile = b'<testsuites><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg></testsuites>'
    verdict = request("results", commit=SHA, attempt=attempt, status="failed", log=b"1 failed\n", junit=hostile)
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        answer = handler.handle(verdict, "r1")
    assert (answer.verb, answer.get("recorded")) == ("OK", 1)
    assert store.job(SHA).state is JobState.FAILED
    assert not (tmp_path / "results" / (SHA + ".xml")).exists()
    assert (tmp_path / "results" / (SHA + ".log")).read_text() == "1 failed\n"
    assert any("JUnit XML not kept: it uses XML namespaces" in record.getMessage() for record in caplog.records)
    store.close()


def test_a_late_verdict_of_a_run_before_a_rerun_judges_nothing(tmp_path):
    """An attempt of run 1 that was presumed lost reports after the commit was judged and
    run again: it must not settle run 2, nor move run 1's files."""
    store = JobStore(str(tmp_path / "queue.sqlite3"))
    results = tmp_path / "results"
    results.mkdir()
    handler = dispatcher.Dispatcher(store, str(results))
    store.enqueue(SHA, 1.0)
    lost = store.assign(SHA, "r1", 2.0)
    store.requeue(SHA, lost, dispatcher.Outcome.LOST, 3.0)
    settling = store.assign(SHA, "r2", 4.0)
    first = handler.handle(request("results", commit=SHA, attempt=settling, status="failed", log=b"1 failed\n"), "r2")
    assert (first.verb, first.get("recorded")) == ("OK", 1)
    assert handler.handle(request("rerun", commit=SHA), "ctl").get("run") == 2
    late = handler.handle(request("results", commit=SHA, attempt=lost, status="passed", log=b"1 passed\n"), "r1")
    assert (late.verb, late.get("recorded")) == ("OK", 0)
    job = store.job(SHA)
    assert (job.state, job.run) == (JobState.QUEUED, 2)
    assert result_files.read_result(str(results), SHA).status == "failed"
    assert not (results / "runs").exists()
    # Run 2's own verdict moves run 1's files aside.
    second = store.assign(SHA, "r2", 5.0)
    handler.handle(request("results", commit=SHA, attempt=second, status="passed", log=b"1 passed\n"), "r2")
    assert result_files.read_result(str(results), SHA).run == 2
    assert (results / "runs" / SHA / "1" / (SHA + ".log")).read_text() == "1 failed\n"
    assert '"run": 1' in (results / "runs" / SHA / "1" / (SHA + ".json")).read_text()
    store.close()
