"""JUnit XML (junit.py), the one reader of what the tests write: only plain JUnit gets
through; counts, failing tests, and the copy the dispatcher keeps."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from commit_ci import junit

from test_result_files import PYTEST_JUNIT

# --- counts ---------------------------------------------------------------------------------


def read_junit_counts(path: str) -> dict | None:
    """The counts the runner sends for the JUnit XML file at ``path``."""
    try:
        found = junit.read(path)
    except junit.JUnitError:
        return None
    return junit.counts(found[1]) if found is not None else None


SAMPLE_TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

def test_one():
    assert True

def test_two():
    assert True

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

def test_errors(broken):
    pass
'''


@pytest.fixture(scope="module")
def pytest_junit(tmp_path_factory):
    """JUnit XML written by a real pytest run: 2 passed, 1 failed, 1 skipped, 1 error."""
    folder = tmp_path_factory.mktemp("junit")
    (folder / "test_sample.py").write_text(SAMPLE_TESTS)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(folder / "junit.xml"), "test_sample.py"],
        cwd=folder, env=env, capture_output=True, timeout=60,
    )
    assert done.returncode == 1, done.stdout.decode()
    return folder / "junit.xml"


def test_junit_counts_from_real_pytest_output(pytest_junit):
    assert read_junit_counts(str(pytest_junit)) == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1}


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def test_junit_counts_with_a_testsuite_root_and_several_suites(tmp_path):
    single = write(tmp_path, "single.xml", '<testsuite tests="4" failures="1" errors="0" skipped="1"/>')
    assert read_junit_counts(single) == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}
    several = write(
        tmp_path, "several.xml",
        '<testsuites><testsuite tests="3" failures="1"/><testsuite tests="5" errors="2" skipped="1"/></testsuites>',
    )
    assert read_junit_counts(several) == {"passed": 4, "failed": 1, "errors": 2, "skipped": 1}
    empty = write(tmp_path, "empty.xml", '<testsuites><testsuite name="pytest" tests="0"/></testsuites>')
    assert read_junit_counts(empty) == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"this is not xml",
        b"\x00\xff\xfe\x89PNG binary",
        b'<testsuites><testsuite tests="3"',  # cut off
        b'<testsuite tests="three" failures="0"/>',
        b'<testsuite tests="3.0"/>',
    ],
    ids=["empty", "text", "binary", "truncated", "words", "float"],
)
def test_junit_counts_of_garbage_is_none(tmp_path, content):
    assert read_junit_counts(write(tmp_path, "junit.xml", content)) is None


def test_junit_counts_of_a_missing_file_or_a_folder_is_none(tmp_path):
    assert read_junit_counts(str(tmp_path / "missing.xml")) is None
    assert read_junit_counts(str(tmp_path)) is None


def test_junit_counts_of_an_oversized_file_is_none(tmp_path, monkeypatch, pytest_junit):
    monkeypatch.setattr(junit, "MAX_BYTES", os.path.getsize(pytest_junit) - 1)
    assert read_junit_counts(str(pytest_junit)) is None
    monkeypatch.setattr(junit, "MAX_BYTES", os.path.getsize(pytest_junit))
    assert read_junit_counts(str(pytest_junit)) is not None


def test_junit_counts_of_xml_that_is_not_junit_is_none(tmp_path):
    assert read_junit_counts(write(tmp_path, "page.xml", "<html><body>hello</body></html>")) is None


def test_junit_counts_refuses_negative_numbers(tmp_path):
    path = write(tmp_path, "junit.xml", '<testsuite tests="2" failures="-1" errors="0" skipped="0"/>')
    counts = read_junit_counts(path)
    assert counts is None or all(value >= 0 for value in counts.values()), counts


# --- plain JUnit only, and the copy kept --------------------------------------------------


def test_clean_junit_keeps_pytest_output_as_it_is():
    cleaned = junit.clean(PYTEST_JUNIT)
    assert cleaned.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    original, kept = ElementTree.fromstring(PYTEST_JUNIT), ElementTree.fromstring(cleaned)
    assert ElementTree.tostring(original) == ElementTree.tostring(kept)


def test_clean_junit_drops_comments_and_processing_instructions():
    hostile = PYTEST_JUNIT.replace(
        b"<testsuites", b'<?xml-stylesheet type="text/xsl" href="evil.xsl"?><!-- hidden --><testsuites', 1
    )
    cleaned = junit.clean(hostile)
    assert b"xml-stylesheet" not in cleaned and b"hidden" not in cleaned
    assert b"test_fails" in cleaned


@pytest.mark.parametrize(
    "data, why",
    [
        (b'<!DOCTYPE x [<!ENTITY a "aaaa">]><testsuites>&a;</testsuites>', "DOCTYPE"),
        (b"<testsuites><testsuite><testcase", "not well-formed"),
        (b"<html><body>hi</body></html>", "root element"),
        (b'<testsuites><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg></testsuites>', "namespaces"),
        (b'<testsuite xmlns:h="http://www.w3.org/1999/xhtml"><h:script>alert(1)</h:script></testsuite>', "namespaces"),
        (b'<testsuite xml:base="file:///etc/"><testcase name="x"/></testsuite>', "namespaces"),
    ],
)
def test_clean_junit_refuses_what_is_not_plain_junit(data, why):
    with pytest.raises(ValueError, match=why):
        junit.clean(data)


# --- failing tests ---------------------------------------------------------------------------


def read_failures(path: str, limit: int = 25):
    try:
        found = junit.read(path)
    except junit.JUnitError:
        return (), 0
    return junit.failures(found[1], limit) if found is not None else ((), 0)


def test_failing_tests_are_read_from_junit_xml(tmp_path):
    path = tmp_path / "result.xml"
    path.write_bytes(PYTEST_JUNIT)
    failures, total = read_failures(str(path))
    assert total == 1
    assert failures[0].name == "test_bad::test_fails" and failures[0].kind == "failure"
    assert failures[0].lines == ("assert (1 + 1) == 3",)

    many = "".join(
        '<testcase classname="t" name="case%d"><error message="boom %d">E   ValueError: %d</error></testcase>' % (i, i, i)
        for i in range(40)
    )
    path.write_text("<testsuites><testsuite>%s</testsuite></testsuites>" % many)
    failures, total = read_failures(str(path), limit=25)
    assert total == 40 and len(failures) == 25
    assert failures[3].kind == "error" and failures[3].lines == ("boom 3", "E   ValueError: 3")

    path.write_text("<testsuites><testsuite")
    assert read_failures(str(path)) == ((), 0)
    assert read_failures(str(tmp_path / "missing.xml")) == ((), 0)
