"""Culprit finding: which commit of a branch broke it, found in about log2(n) runs.

When a commit of a branch fails, the commits between it and the newest commit of that
branch known to pass (in the order the branch got them: store.branch_commits) hold the
first failing one, the *culprit*. ``plan`` reads such a stretch of history and says
what is known and what to test next:

* Only ``passed`` and ``failed`` decide. A ``flaky``, ``error`` or ``cancelled``
  verdict says nothing about the code: such a commit is passed over, neither tested
  again nor named. A commit ``queued``, ``running`` or ``skipped`` is *undecided*.
* The failing commit that bounds the search (``hi``) is the oldest failed commit after
  the last pass (the stretch has no pass, so every failure in it is a candidate).
* With no undecided commit between the last pass and ``hi``, ``hi`` is the first
  failing commit. Every failed commit from ``hi`` to the next pass names it
  (``first_failing``).
* Otherwise the undecided commits before ``hi`` run in *bisection order*: a running
  one counts as a probe already out, splitting the stretch where it stands; then, of
  the stretches of undecided commits between probes, the longest is split at its
  middle first (the older on a tie), and so on. Every-commit mode ranks them all in
  that order (they all run anyway; the order finds the culprit early). ``--coalesce``
  has one probe out at a time: the first of that order, and only when none is running,
  so that a branch of n untested commits costs about log2(n) runs, not more.

A branch with no commit known to pass is searched from its first recorded commit.
Nothing here touches the store; store.JobStore.culprit_step applies a plan.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from commit_ci.states import JobState

#: The states of a commit whose verdict is still to come: what a bisection may test.
UNDECIDED = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.SKIPPED})


@dataclass
class Plan:
    """What one stretch of a branch's history says: the first failing commit when it is
    known (with the failed commits that name it), else the commits to test, in order."""

    first_failing: str | None = None
    probes: list[str] = field(default_factory=list)


def bisection_order(undecided: list[tuple[str, JobState]]) -> list[str]:
    """The commits of ``undecided`` (oldest first) that are not running, in bisection
    order: running ones split the stretch; then the longest stretch's middle first."""
    segments: list[tuple[int, int, list[str]]] = []  # (-length, start, commits)
    current: list[str] = []
    start = 0
    for index, (commit, state) in enumerate(undecided):
        if state is JobState.RUNNING:
            if current:
                segments.append((-len(current), start, current))
            current, start = [], index + 1
        else:
            current.append(commit)
    if current:
        segments.append((-len(current), start, current))
    heapq.heapify(segments)
    order = []
    while segments:
        _, start, commits = heapq.heappop(segments)
        middle = (len(commits) - 1) // 2
        order.append(commits[middle])
        for part, offset in ((commits[:middle], start), (commits[middle + 1:], start + middle + 1)):
            if part:
                heapq.heappush(segments, (-len(part), offset, part))
    return order


def plan(stretch: list[tuple[str, JobState]], coalesce: bool) -> Plan:
    """The plan for ``stretch``: a branch's commits after its newest pass (or from its
    first commit), oldest first, up to and including a failed commit."""
    failed = [index for index, (_, state) in enumerate(stretch) if state is JobState.FAILED]
    if not failed:
        return Plan()
    hi = failed[0]
    undecided = [(commit, state) for commit, state in stretch[:hi] if state in UNDECIDED]
    if not undecided:
        return Plan(first_failing=stretch[hi][0])
    order = bisection_order(undecided)
    if coalesce:
        running = any(state is JobState.RUNNING for _, state in undecided)
        order = [] if running else order[:1]
    return Plan(probes=order)
