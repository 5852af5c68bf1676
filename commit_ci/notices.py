"""What a notification says, and when there is one: decided in the store's transaction.

A branch's state is green, red or flaky (states.BRANCH_STATE_OF_VERDICT), from its
newest judged commit. Each time a verdict changes it, the store (store.JobStore._notice,
in the transaction that records the verdict) notes the new state in
``branch_notices`` and, if the change is news (``is_news``), adds one notification per
channel to the outbox (``notifications``), which notify.py sends. So:

* green -> red, red -> green, green -> flaky, flaky -> green, red -> flaky,
  flaky -> red: each is one notification per channel;
* the first verdict of a new branch (pending -> red or pending -> flaky) is one too,
  but pending -> green is not: nothing to tell of a branch that starts well;
* the same state again (a second red commit) is none, nor is a verdict that says
  nothing of the branch (``error``, ``cancelled``), nor that of an older commit (a
  bisection's), which does not change the state a branch's newest verdict makes.

Each change of a branch is numbered (``branch_notices.changes``), and its subject,
``branch <n> <name>``, is unique per channel: however often the verdict's transaction
is tried, one change is one row per channel.

The commit status channel (notify.py) gets a document per judged commit instead, and
one ``pending`` when its run is first given to a runner.

The documents hold the facts the store has (the verdict's summary); notify.py adds,
when it sends one, its delivery id, the links to the result files and the commit's
subject and author. Everything in them that came from a commit (test ids, the reason)
is cut to a bounded length.
"""

from __future__ import annotations

from typing import Iterable

from commit_ci.states import BRANCH_PENDING

#: The version of the documents' shape; a receiver may check it.
DOCUMENT_VERSION = 1
#: A commit status before its verdict.
PENDING = "pending"
#: Most test ids listed in a document (failing, flaky), and the longest one kept whole.
MAX_TESTS = 20
TEST_ID_CHARS = 300
#: A reason longer than this is cut.
REASON_CHARS = 500
#: The facts of a verdict's summary a document repeats.
SUMMARY_FACTS = ("status", "run", "passed", "failed", "errors", "skipped", "duration_s", "runner", "finished_at",
                 "reason", "first_failing")


def is_news(old: str, new: str) -> bool:
    """Whether a branch's state going from ``old`` to ``new`` is told (module docstring)."""
    return new != old and new != BRANCH_PENDING and not (old == BRANCH_PENDING and new == "green")


def branch_subject(branch: str, changes: int) -> str:
    return "branch %d %s" % (changes, branch)


def status_subject(commit: str, run: int, state: str) -> str:
    return "status %s %d %s" % (commit, run, state)


def _cut(text: object, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _tests(tests: Iterable[object]) -> list[str]:
    return [_cut(test, TEST_ID_CHARS) for test in list(tests)[:MAX_TESTS]]


def failing_tests(facts: dict, failing: Iterable[str] | None) -> list[str]:
    """The tests still failing at a run's end: its last rerun's (flaky.py), else ``failing``
    (what the runner reported), else none known. All of them: cut when written."""
    reruns = facts.get("reruns")
    if isinstance(reruns, list) and reruns and isinstance(reruns[-1], dict):
        listed = reruns[-1].get("failing")
        if isinstance(listed, list):
            return [str(test) for test in listed]
    return [str(test) for test in failing or ()]


def _commit_facts(commit: str, facts: dict) -> dict:
    found = {"id": commit}
    for name in SUMMARY_FACTS:
        value = facts.get(name)
        found[name] = _cut(value, REASON_CHARS) if name == "reason" and value is not None else value
    return found


def branch_document(branch: str, old: str, new: str, commit: str, facts: dict, failing: list[str]) -> dict:
    """The document of a change of ``branch`` from ``old`` to ``new``, made by the verdict
    of ``commit`` (``facts``: its summary)."""
    flaky = facts.get("flaky_tests") if isinstance(facts.get("flaky_tests"), list) else []
    return {
        "version": DOCUMENT_VERSION,
        "event": "branch",
        "branch": branch,
        "old_state": old,
        "new_state": new,
        "commit": _commit_facts(commit, facts),
        # The culprit, when the store knew it as the verdict was recorded (culprit.py).
        "first_failing": facts.get("first_failing"),
        "failing_tests": _tests(failing),
        "failing_tests_total": len(failing),
        "flaky_tests": _tests(flaky),
        "flaky_tests_total": len(flaky),
    }


def status_document(commit: str, run: int, state: str, facts: dict | None) -> dict:
    """The document of ``commit``'s status: ``pending`` (``facts`` None) or its verdict."""
    return {
        "version": DOCUMENT_VERSION,
        "event": "status",
        "commit": _commit_facts(commit, facts or {"status": state, "run": run}),
        "state": state,
    }
