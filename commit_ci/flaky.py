"""Flaky tests: which tests of a failed run run again, and what their reruns decide.

When a commit's tests fail, the dispatcher does not settle the run at once: up to
``--flaky-reruns`` times (default ``DEFAULT_RERUNS``), the tests still failing run
again at the same commit, on another runner when one is free. Each of these is a
*round* of the run: round 0 is the whole suite, round k the k-th rerun. If every
failing test passes in some rerun, the run's verdict is ``flaky``; if one fails in
every rerun, ``failed``. A rerun proves a test passed only when its JUnit XML says
that very test ran and passed: a test that did not run, or a rerun that could not say
(no JUnit XML, a time-out, a collection error), counts as failing again, so that a
failure that is the commit's own never comes out ``flaky``.

Test ids are pytest node ids (``tests/test_a.py::TestX::test_y[1]``). pytest's JUnit
XML names a test by ``classname`` (``tests.test_a.TestX``: the file's path with dots
for slashes, then its classes) and ``name`` (``test_y[1]``), which does not say where
the file ends and the classes begin. The *runner* turns them into node ids
(``node_id``), right after the tests ran, because it has the checkout: it tries each
split of the dotted name and keeps the one whose path is a ``.py`` file of the commit.
A name it cannot resolve (no such file, or two files that fit) has no node id; the
runner then asks for the whole test command to run again instead (``retry=command``),
as it does for a ``--test-command``, which has no ids at all.

Node ids come from the commit's tests, so they are hostile input on every side: the
runner makes only ids that pass ``is_test_id``, the dispatcher checks every id a
runner sends (``decode_test_ids``) and the runner checks again those it is told to
run. An id is at most ``MAX_TEST_ID_CHARS`` printable ASCII characters, starts with a
letter, a digit or ``_`` (never ``-`` or ``@``: pytest would take it as an option or
an arguments file, and it does not honour ``--``), and its path is a relative ``.py``
path without ``..``; a run with more than ``MAX_TESTS`` failing tests is not rerun
(that many at once is a broken commit, not flakiness).

Nothing here does any I/O: the dispatcher and the runner call these functions with
what they have.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Callable, Iterable

from commit_ci import junit

#: Reruns of the failing tests when ``--flaky-reruns`` is not given, and the most it takes.
DEFAULT_RERUNS = 2
MAX_RERUNS = 10
#: Most failing tests a run may have and still be rerun, and longest node id.
MAX_TESTS = 50
MAX_TEST_ID_CHARS = 500
#: The largest list of node ids on the wire (one per line).
MAX_TEST_IDS_BYTES = MAX_TESTS * (MAX_TEST_ID_CHARS + 1)
#: The "test" a whole test command is recorded as, when it passed on a rerun.
WHOLE_COMMAND = "(test command)"
#: The newest runs the rate of a flaky test is over (``ci-ctl flaky``, the page), by
#: default and at most: a test's rate is the share of those runs in which it was flaky.
DEFAULT_WINDOW = 100
MAX_WINDOW = 10000
#: Most splits of one dotted JUnit name tried against the checkout.
MAX_NAME_PARTS = 32

_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class Retry(str, enum.Enum):
    """What a runner says may run again after a failed run (``results ... retry=``)."""

    TESTS = "tests"  # the tests named in the ``failing`` section
    COMMAND = "command"  # the whole test command: there are no test ids


def is_test_id(text: str) -> bool:
    """A node id the runners may pass to pytest: see the module docstring."""
    if not 0 < len(text) <= MAX_TEST_ID_CHARS or text[0] not in _FIRST:
        return False
    if not all(" " <= character <= "~" for character in text) or "\\" in text:
        return False
    path = text.split("::", 1)[0]
    return path.endswith(".py") and not path.startswith("/") and all(
        part not in ("", ".", "..") for part in path.split("/"))


def encode_test_ids(ids: Iterable[str]) -> bytes:
    """Node ids as a section of the wire: one per line."""
    return "".join(test_id + "\n" for test_id in ids).encode("ascii")


def decode_test_ids(data: bytes) -> tuple[str, ...]:
    """The node ids of a section; ValueError unless each is one and there are at most MAX_TESTS."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("test ids are not ASCII") from None
    ids = tuple(text.splitlines())
    if len(ids) > MAX_TESTS:
        raise ValueError("more than %d test ids" % MAX_TESTS)
    bad = next((test_id for test_id in ids if not is_test_id(test_id)), None)
    if bad is not None:
        raise ValueError("not a test id: %r" % bad[:80])
    if len(set(ids)) != len(ids):
        raise ValueError("a test id is listed twice")
    return ids


def node_id(classname: str, name: str, is_file: Callable[[str], bool]) -> str | None:
    """The pytest node id of the JUnit test case (``classname``, ``name``), or None if
    it cannot be told: ``is_file(path)`` says whether the commit has that ``.py`` file.
    A case with no classname (a module that failed to import) is its module file."""
    dotted, tail = (classname, [name]) if classname else (name, [])
    parts = dotted.split(".")
    if len(parts) > MAX_NAME_PARTS or any(part in ("", "..") or "/" in part or "\\" in part for part in parts):
        return None
    found = [index for index in range(len(parts), 0, -1) if is_file("/".join(parts[:index]) + ".py")]
    if len(found) != 1:
        return None  # not a file of the commit, or two that fit (a/b.py with class c, and a/b/c.py)
    index = found[0]
    node = "::".join(["/".join(parts[:index]) + ".py", *parts[index:], *tail])
    return node if is_test_id(node) else None


def failing_ids(root: ElementTree.Element, is_file: Callable[[str], bool]) -> tuple[str, ...] | None:
    """The node ids of the test cases that failed or errored, in order; None when one
    of them has no node id or there are more than MAX_TESTS."""
    ids: list[str] = []
    for classname, name, outcome in junit.cases(root):
        if outcome != junit.FAILED:
            continue
        test_id = node_id(classname, name, is_file)
        if test_id is None:
            return None
        if test_id not in ids:
            ids.append(test_id)
        if len(ids) > MAX_TESTS:
            return None
    return tuple(ids)


def still_failing(asked: Iterable[str], root: ElementTree.Element | None,
                  is_file: Callable[[str], bool]) -> tuple[str, ...]:
    """Of the tests a rerun ``asked`` for, those it did not prove passing: a test is
    proven only by a case of its node id that passed, and none of it that failed."""
    passed, failed = set(), set()
    for classname, name, outcome in junit.cases(root) if root is not None else ():
        test_id = node_id(classname, name, is_file)
        if test_id is not None:
            (passed if outcome == junit.PASSED else failed).add(test_id)
    return tuple(test_id for test_id in asked if test_id not in passed or test_id in failed)


# --- what the dispatcher decides after each round ------------------------------------


@dataclass(frozen=True)
class Step:
    """What follows a round of a run: another round (``again``) of ``tests`` (None: the
    whole test command), or the verdict ``status`` with the ``flaky`` tests. ``failing``:
    of a rerun, the tests it did not see pass (None: the whole command failed again)."""

    again: bool
    tests: tuple[str, ...] | None = None
    status: str | None = None
    flaky: tuple[str, ...] = ()
    failing: tuple[str, ...] | None = None


def first_step(status: str, retry: str | None, failing: tuple[str, ...] | None, reruns: int) -> Step:
    """After round 0 (the whole suite) reported ``status``: rerun the failing tests, or
    the whole command, when the runner says it can and reruns are on; else the verdict."""
    if status != "failed" or reruns < 1 or retry is None:
        return Step(False, status=status)
    if retry == Retry.TESTS and failing:
        return Step(True, tests=failing)
    return Step(True, tests=None)


def next_step(round_: int, reruns: int, first: tuple[str, ...] | None, asked: tuple[str, ...] | None,
              status: str, retry: str | None, failing: tuple[str, ...] | None) -> Step:
    """After rerun ``round_`` (1 and up) of the tests ``asked`` (None: the whole command)
    reported ``status``: the tests still failing run again while reruns are left; once
    none is, the run is ``flaky``; when reruns run out, ``failed``. ``first`` is what
    failed in round 0 (None: the whole command)."""
    if asked is None:
        still: tuple[str, ...] | None = () if status == "passed" else None
    elif retry == Retry.TESTS:
        # The runner names what it did not see pass; ids it sent that are not ids prove nothing.
        still = asked if failing is None else tuple(test for test in asked if test in failing)
    else:
        still = () if status == "passed" else asked  # a runner with a test command ran it all: it passed or not
    if still == ():
        return Step(False, status="flaky", flaky=first if first is not None else (WHOLE_COMMAND,), failing=())
    if round_ < reruns:
        return Step(True, tests=still, failing=still)
    flaky = tuple(test for test in first if test not in still) if first is not None and still is not None else ()
    return Step(False, status="failed", flaky=flaky, failing=still)


def records(summary: dict) -> list[tuple[str, list[str]]]:
    """The flaky tests of a result's summary (``<sha>.json``), each with how it ended in
    each round: what the store keeps of them."""
    reruns = summary.get("reruns") or []
    return [(test, outcomes(test, reruns)) for test in summary.get("flaky_tests") or [] if isinstance(test, str)]


def outcomes(test: str, rounds: list[dict]) -> list[str]:
    """How ``test`` ended in each round: ``failed`` in round 0, then, for each rerun
    that ran it, ``passed`` or ``failed`` (``rounds``: the ``reruns`` entries)."""
    ended = ["failed"]
    for entry in rounds:
        asked = entry.get("tests")
        if asked is not None and test not in asked:
            continue
        still = entry.get("failing")
        if still is None:
            ended.append(entry.get("status") or "failed")
        else:
            ended.append("failed" if test in still else "passed")
    return ended
