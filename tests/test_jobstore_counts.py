"""The store's job counts per state (what ``status`` reports) stay equal to the table's."""

from __future__ import annotations

import pytest

from commit_ci.states import JobState, Outcome
from commit_ci.store import InvalidTransition, JobStore


def counted(store: JobStore) -> dict[str, int]:
    return {state.value: store.count(state) for state in JobState}


def in_table(store: JobStore) -> dict[str, int]:
    found = {state.value: 0 for state in JobState}
    for state, count in store._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        found[state] = count
    return found


def test_counts_follow_every_move_and_survive_a_restart(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    store = JobStore(path)
    commits = ["%040x" % index for index in range(1, 7)]
    for commit in commits:
        store.enqueue(commit, 0.0)
    assert store.enqueue(commits[0], 0.0) == (False, JobState.QUEUED)  # known: not counted twice
    attempts = {commit: store.assign(commit, "runner", 1.0) for commit in commits[:4]}
    store.finish(commits[0], attempts[commits[0]], JobState.PASSED, Outcome.PASSED, None, "{}", 2.0)
    store.finish(commits[1], attempts[commits[1]], JobState.FAILED, Outcome.FAILED, None, "{}", 2.0)
    store.requeue(commits[2], attempts[commits[2]], Outcome.LOST, 2.0)
    with pytest.raises(InvalidTransition):  # a refused move changes nothing
        store.assign(commits[0], "runner", 3.0)
    assert counted(store) == in_table(store) == {"queued": 3, "running": 1, "passed": 1, "failed": 1, "flaky": 0, "error": 0, "cancelled": 0, "skipped": 0}

    store.close()
    store = JobStore(path)  # a restart: counts come from the table
    assert counted(store) == in_table(store)
    assert store.recover(4.0) == 1
    assert counted(store) == in_table(store) == {"queued": 4, "running": 0, "passed": 1, "failed": 1, "flaky": 0, "error": 0, "cancelled": 0, "skipped": 0}
    store.close()
