"""The per-commit result files: report, log, JUnit XML and JSON summary."""

from __future__ import annotations

import json
import stat
import sys
import xml.etree.ElementTree as ElementTree

from commit_ci import junit, result_files
from commit_ci.result import SUMMARY_FIELDS, Result

from conftest import FAILING_TEST, PASSING_TEST

PYTEST_JUNIT = b"""<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" \
errors="0" failures="1" skipped="0" tests="2" time="0.031"><testcase classname="test_bad" name="test_fails" time="0.001">\
<failure message="assert (1 + 1) == 3">def test_fails():
&gt;       assert 1 + 1 == 3
E       assert (1 + 1) == 3

test_bad.py:2: AssertionError</failure></testcase><testcase classname="test_base" name="test_passes" time="0.000" />\
</testsuite></testsuites>"""


def test_failing_commit_gets_its_log_and_junit_xml_beside_the_report(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer()
    failing = upstream.commit({"test_bad.py": FAILING_TEST}, "add a failing test")

    summary = ci.wait_result(failing)

    # <sha>.json is written last: once it is there, so are the others.
    results = ci.results_dir
    assert (results / (failing + ".log")).exists() and (results / (failing + ".xml")).exists()
    assert summary["status"] == "failed"
    junit = ElementTree.parse(results / (failing + ".xml")).getroot()
    cases = {case.get("name"): case for case in junit.iter("testcase")}
    assert set(cases) == {"test_passes", "test_fails"}
    failure = cases["test_fails"].find("failure")
    assert failure is not None and "assert (1 + 1) == 3" in failure.get("message")
    assert cases["test_passes"].find("failure") is None
    suite = junit.find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    log = (results / (failing + ".log")).read_text()
    assert "1 failed, 1 passed" in log and "assert (1 + 1) == 3" in log
    # The log is exactly the output part of the report.
    assert ci.report(failing).endswith(log.rstrip("\n") + "\n")


def test_junit_xml_that_a_browser_would_run_scripts_from_is_not_kept(ci, upstream):
    # The tests of a commit control the file at $CI_JUNIT_XML; here they write JUnit
    # with an SVG script inside, which a browser would run if someone opened <sha>.xml.
    writer = (
        "import os, sys\n"
        "page = '<testsuites><testsuite tests=\"1\" failures=\"1\"><svg xmlns=\"http://www.w3.org/2000/svg\">'\n"
        "page += '<script>alert(1)</script></svg></testsuite></testsuites>'\n"
        "open(os.environ['CI_JUNIT_XML'], 'w').write(page)\n"
        "sys.exit(1)\n"
    )
    ci.start_dispatcher()
    ci.start_runner("--test-command", "%s write_junit.py" % sys.executable)
    ci.start_observer()
    sha = upstream.commit({"write_junit.py": writer}, "tests that write a hostile JUnit file")

    summary = ci.wait_result(sha)

    assert summary["status"] == "failed"
    assert not (ci.results_dir / (sha + ".xml")).exists()
    assert (ci.results_dir / (sha + ".log")).exists()
    ci.runners[0].wait_for_log(r"commit %s attempt \d+: JUnit XML not sent: .*namespaces" % sha)


def test_write_result_writes_every_file_atomically_json_last(tmp_path, monkeypatch):
    written = []
    real_write = result_files.atomic_write

    def recording_write(path, data, durable=True):
        written.append(path.rsplit("/", 1)[1])
        real_write(path, data, durable)

    monkeypatch.setattr(result_files, "atomic_write", recording_write)
    sha = "ab" * 20
    result = Result(sha, "passed", passed=1, failed=0, errors=0, skipped=0, log=PASSING_TEST.encode(),
                    junit=junit.clean(PYTEST_JUNIT))
    result_files.write_result(str(tmp_path), result)
    assert written == [sha, sha + ".log", sha + ".xml", sha + ".json"]
    assert (tmp_path / (sha + ".log")).read_text() == PASSING_TEST
    assert json.loads((tmp_path / (sha + ".json")).read_text()) == result.summary()
    assert list(result.summary()) == list(SUMMARY_FIELDS)
    assert result_files.read_result(str(tmp_path), sha) == Result(sha, "passed", passed=1, failed=0, errors=0,
                                                                   skipped=0)
    written.clear()
    result_files.write_result(str(tmp_path), Result("cd" * 20, "error", reason="checkout failed: gone"))
    assert written == ["cd" * 20, "cd" * 20 + ".log", "cd" * 20 + ".json"]


def test_result_files_get_the_mode_a_plain_file_would(tmp_path):
    """Readable by whoever may read the folder's other files (a web server serving
    test_results/), not private as a temporary file is made."""
    sha = "ab" * 20
    result_files.write_result(str(tmp_path), Result(sha, "passed", passed=1, failed=0, errors=0, skipped=0,
                                                    log=PASSING_TEST.encode(), junit=junit.clean(PYTEST_JUNIT)))
    (tmp_path / "plain").write_text("")
    plain_mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert plain_mode & 0o044, "the usual umask lets others read a plain file"
    for name in (sha, sha + ".log", sha + ".xml", sha + ".json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain_mode, name


def test_a_result_file_that_is_not_a_complete_verdict_is_not_read(tmp_path):
    sha = "ab" * 20
    for text in ("{", "[]", '{"commit": "%s", "status": "queued"}' % sha, '{"commit": "%s", "status": "passed"}' % ("cd" * 20)):
        (tmp_path / (sha + ".json")).write_text(text)
        assert result_files.read_result(str(tmp_path), sha) is None, text
    (tmp_path / (sha + ".json")).write_text('{"commit": "%s", "status": "failed", "a_later_field": 1}' % sha)
    assert result_files.read_result(str(tmp_path), sha) == Result(sha, "failed")
