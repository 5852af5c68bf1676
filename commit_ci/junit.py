"""JUnit XML, the report the tests write: read here, and only here.

The file comes from a commit's tests, so it is hostile input wherever it is read:
by the runner (for the counts), by the dispatcher (to keep it as ``<sha>.xml``) and by
the results page (for the failing tests). Every reading goes through ``parse``, which
lets only plain JUnit through:

* at most ``MAX_BYTES``;
* no DOCTYPE, which also rules out entity expansion;
* a ``testsuites`` or ``testsuite`` root;
* no namespaced element or attribute anywhere: a browser runs the scripts of any XHTML
  or SVG element inside an XML file, and people open ``<sha>.xml`` from the page.

``clean`` writes a parsed file out again for keeping, which drops comments and
processing instructions (an ``xml-stylesheet`` would turn the file into a page).
pytest's files pass unchanged in content.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from commit_ci.files import open_untrusted

#: Largest JUnit XML file read or kept; a larger one is dropped (a cut file is useless).
MAX_BYTES = 8 * 1024 * 1024
#: The root elements of the JUnit XML that pytest (and most other tools) write.
ROOTS = ("testsuites", "testsuite")
#: Lines, and characters per line, kept of each failure message.
FAILURE_LINES = 8
FAILURE_LINE_CHARS = 300


class JUnitError(ValueError):
    """The data is not plain JUnit XML; the text says why."""


@dataclass(frozen=True)
class FailedTest:
    """A test case that failed or errored, as the report names and explains it."""

    name: str  # ``classname::name``, or the name alone
    kind: str  # "failure" (an assertion) or "error" (an exception, a collection error)
    lines: tuple[str, ...]  # its message, then pytest's ``E`` lines, at most FAILURE_LINES


def parse(data: bytes) -> ElementTree.Element:
    """The root of ``data`` if it is plain JUnit XML (see the module docstring), else JUnitError."""
    if len(data) > MAX_BYTES:
        raise JUnitError("it is larger than %d bytes" % MAX_BYTES)
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise JUnitError("it has a DOCTYPE")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise JUnitError("it is not well-formed XML (%s)" % exc) from None
    if root.tag not in ROOTS:
        raise JUnitError("its root element is not one of %s" % ", ".join(ROOTS))
    for element in root.iter():
        if element.tag.startswith("{") or any(name.startswith("{") for name in element.attrib):
            raise JUnitError("it uses XML namespaces, which JUnit XML does not")
    return root


def read(path: str) -> tuple[bytes, ElementTree.Element] | None:
    """The JUnit XML file at ``path`` and its root; None when there is no such file;
    JUnitError saying why when there is one that is not plain JUnit within MAX_BYTES."""
    try:
        with open_untrusted(path) as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JUnitError("it cannot be read (%s)" % exc.strerror) from None
    return data, parse(data)


def clean(data: bytes) -> bytes:
    """``data`` parsed and written out again: what is kept as ``<sha>.xml``. JUnitError
    saying what is wrong if it is not plain JUnit."""
    return ElementTree.tostring(parse(data), encoding="utf-8", xml_declaration=True)


def counts(root: ElementTree.Element) -> dict[str, int] | None:
    """passed, failed, errors and skipped, from the suites' own totals; None when a
    total is not a plain number (better no counts than a result the protocol refuses)."""
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            text = suite.get(key, "0")
            if not text.isascii() or not text.isdigit():
                return None
            totals[key] += int(text)
    return {
        "passed": max(0, totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]),
        "failed": totals["failures"],
        "errors": totals["errors"],
        "skipped": totals["skipped"],
    }


#: How a test case ended, as ``cases`` says it.
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


def cases(root: ElementTree.Element) -> list[tuple[str, str, str]]:
    """Every test case as (classname, name, how it ended: PASSED, FAILED -- a failure or
    an error -- or SKIPPED), in the file's order."""
    found = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = FAILED
        elif case.find("skipped") is not None:
            outcome = SKIPPED
        else:
            outcome = PASSED
        found.append((case.get("classname") or "", case.get("name") or "", outcome))
    return found


def failures(root: ElementTree.Element, limit: int) -> tuple[tuple[FailedTest, ...], int]:
    """The test cases that failed or errored: (the first ``limit``, how many there are)."""
    shown: list[FailedTest] = []
    total = 0
    for case in root.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            continue
        total += 1
        if len(shown) >= limit:
            continue
        classname, name = case.get("classname") or "", case.get("name") or "?"
        shown.append(FailedTest("%s::%s" % (classname, name) if classname else name, problem.tag,
                                _failure_lines(problem)))
    return tuple(shown), total


def _failure_lines(problem: ElementTree.Element) -> tuple[str, ...]:
    """The message, then the ``E`` lines of pytest's traceback (where it says what
    went wrong), or the first lines of the text when there are none."""
    message = (problem.get("message") or "").strip()
    text = (problem.text or "").splitlines()
    explained = [line for line in text if line.startswith("E ")]
    lines = message.splitlines()[:2] + (explained or [line for line in text if line.strip()])
    seen, kept = set(), []
    for line in lines:
        line = line.rstrip()
        # pytest's "E   assert x" usually repeats the message: show it once.
        key = line[1:].strip() if line.startswith("E ") else line.strip()
        if key and key not in seen:
            seen.add(key)
            kept.append(line if len(line) <= FAILURE_LINE_CHARS else line[: FAILURE_LINE_CHARS - 1] + "\u2026")
        if len(kept) == FAILURE_LINES:
            break
    return tuple(kept)


#: Longest a test case's ``time`` may say it took and still count (a day): more is not a duration.
MAX_CASE_SECONDS = 86400.0


def case_times(root: ElementTree.Element) -> list[tuple[str, str, float]]:
    """Every test case that says how long it took, as (classname, name, seconds); a
    ``time`` that is not a plain non-negative number of at most MAX_CASE_SECONDS is left out."""
    found = []
    for case in root.iter("testcase"):
        text = case.get("time") or ""
        try:
            seconds = float(text)
        except ValueError:
            continue
        if 0.0 <= seconds <= MAX_CASE_SECONDS:  # also false for nan
            found.append((case.get("classname") or "", case.get("name") or "", seconds))
    return found


def merge(files: list[bytes]) -> bytes:
    """One JUnit XML file holding the test suites of each of ``files`` (each already
    plain JUnit: junit.clean's output), in order, under a ``testsuites`` root;
    JUnitError if one is not plain JUnit or the merge is larger than MAX_BYTES."""
    merged = ElementTree.Element("testsuites")
    for data in files:
        root = parse(data)
        merged.extend([root] if root.tag == "testsuite" else list(root))
    data = ElementTree.tostring(merged, encoding="utf-8", xml_declaration=True)
    if len(data) > MAX_BYTES:
        raise JUnitError("the merged file is larger than %d bytes" % MAX_BYTES)
    return data
