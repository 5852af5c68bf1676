"""Culprit finding in the store and in culprit.plan: bisection order, first_failing,
--coalesce's skipped commits, the queue's order, a file of schema version 5."""

from __future__ import annotations

import json
import sqlite3

import pytest

from commit_ci import culprit
from commit_ci.states import JobState, Outcome
from commit_ci.store import SCHEMA_VERSION, JobStore

COMMITS = ["%040x" % (index + 1) for index in range(32)]


@pytest.fixture
def store(tmp_path):
    opened = JobStore(str(tmp_path / "queue.sqlite3"))
    yield opened
    opened.close()


def push(store: JobStore, commits: list[str], coalesce: bool = False) -> None:
    """As the observer reports a round: oldest first, each with the branch's new tip."""
    for commit in commits:
        store.report(commit, 1.0, "main", tip=commits[-1], coalesce=coalesce)


def judge(store: JobStore, commit: str, state: JobState, coalesce: bool = False) -> list[str]:
    attempt = store.assign(commit, "r1", 2.0)
    summary = {"commit": commit, "status": state.value}
    if state is JobState.FAILED:
        summary["first_failing"] = store.known_first_failing(commit)
    store.finish(commit, attempt, state, Outcome(state.value), None, json.dumps(summary), 3.0)
    return store.culprit_step(commit, coalesce)


def first_queued(store: JobStore) -> str:
    return store.queued_jobs(1, order="tip")[0].commit


def test_bisection_order_splits_the_longest_stretch_first_and_counts_running_probes():
    q, r = JobState.QUEUED, JobState.RUNNING
    commits = [("c%d" % i, q) for i in range(7)]
    assert culprit.bisection_order(commits) == ["c3", "c1", "c5", "c0", "c2", "c4", "c6"]
    commits[3] = ("c3", r)
    assert culprit.bisection_order(commits)[:2] == ["c1", "c5"], "the running middle splits the stretch"


def test_plan_passes_over_flaky_and_error_and_names_the_oldest_failure():
    p = culprit.plan([("a", JobState.FLAKY), ("b", JobState.ERROR), ("c", JobState.FAILED), ("d", JobState.FAILED)],
                     False)
    assert (p.first_failing, p.probes) == ("c", [])
    p = culprit.plan([("a", JobState.QUEUED), ("b", JobState.RUNNING), ("c", JobState.FAILED)], True)
    assert (p.first_failing, p.probes) == (None, []), "coalesce: one probe out at a time"


@pytest.mark.parametrize("coalesce", [False, True])
def test_commit_13_is_found_by_bisection_in_at_most_7_runs(store, coalesce):
    push(store, COMMITS, coalesce)
    culprit_commit = COMMITS[12]
    runs = 0
    while True:
        commit = first_queued(store)
        runs += 1
        broken = COMMITS.index(commit) >= 12
        judge(store, commit, JobState.FAILED if broken else JobState.PASSED, coalesce)
        if store.job(culprit_commit).first_failing:
            break
        assert runs < 32
    assert store.job(culprit_commit).first_failing == culprit_commit
    assert runs <= 7, runs
    tip = store.job(COMMITS[-1])
    assert tip.first_failing == culprit_commit
    assert json.loads(tip.summary)["first_failing"] == culprit_commit
    pending = store.first_failing_pending()
    assert COMMITS[-1] in pending and culprit_commit not in pending, "the culprit's own file was written with it"
    if coalesce:
        assert store.count(JobState.QUEUED) == 0, "nothing is left queued"
        assert store.count(JobState.SKIPPED) == 32 - runs
    else:
        assert store.count(JobState.QUEUED) == 32 - runs
        assert all(job.bisect is None for job in store.queued_jobs(40)), "the bisection is over"
        # A failure judged later names the culprit when it is written.
        later = [c for c in COMMITS[13:] if store.job(c).state is JobState.QUEUED][0]
        assert store.known_first_failing(later) == culprit_commit
    store.first_failing_written(COMMITS[-1], culprit_commit)
    assert COMMITS[-1] not in store.first_failing_pending()


def test_the_queue_runs_tips_then_the_bisection_then_the_rest(store):
    push(store, COMMITS[:8])
    judge(store, COMMITS[7], JobState.FAILED)
    order = [job.commit for job in store.queued_jobs(10, order="tip")]
    assert order[:3] == [COMMITS[3], COMMITS[1], COMMITS[5]]
    store.report(COMMITS[8], 1.0, "main")
    assert [job.commit for job in store.queued_jobs(2, order="tip")] == [COMMITS[8], COMMITS[3]]
    assert [job.commit for job in store.queued_jobs(2, order="fifo")] == [COMMITS[3], COMMITS[1]]


#: Version 5's jobs table, as the version before culprit finding made it.
SCHEMA_5 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '5');
CREATE TABLE jobs (seq INTEGER PRIMARY KEY, commit_id TEXT NOT NULL UNIQUE, state TEXT NOT NULL,
    queued_at REAL NOT NULL, started_at REAL, finished_at REAL, current_attempt INTEGER, runner TEXT,
    reason TEXT, summary TEXT, requires TEXT, run INTEGER NOT NULL DEFAULT 1, tip_since INTEGER, last_seen INTEGER,
    round INTEGER NOT NULL DEFAULT 0, retest TEXT);
CREATE TABLE attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, commit_id TEXT NOT NULL, runner TEXT NOT NULL,
    assigned_at REAL NOT NULL, ended_at REAL, outcome TEXT, run INTEGER NOT NULL DEFAULT 1,
    round INTEGER NOT NULL DEFAULT 0);
CREATE TABLE branch_commits (seq INTEGER PRIMARY KEY, branch TEXT NOT NULL, commit_id TEXT NOT NULL,
    ahead INTEGER NOT NULL DEFAULT 0, UNIQUE (commit_id, branch));
CREATE TABLE branches (name TEXT PRIMARY KEY, tip TEXT NOT NULL, updated INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO jobs (commit_id, state, queued_at, last_seen) VALUES ('%s', 'queued', 1.0, 1);
INSERT INTO jobs (commit_id, state, queued_at, summary, last_seen) VALUES ('%s', 'failed', 1.0, '{}', 2);
INSERT INTO branch_commits (branch, commit_id) VALUES ('main', '%s'), ('main', '%s');
INSERT INTO branches VALUES ('main', '%s', 2);
""" % (COMMITS[0], COMMITS[1], COMMITS[0], COMMITS[1], COMMITS[1])


def test_a_file_of_schema_version_5_opens_and_bisects(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_5)
    opened = JobStore(path)
    try:
        assert opened.job(COMMITS[0]).bisect is None
        assert opened.culprit_step(COMMITS[1]) == []
        assert opened.job(COMMITS[0]).bisect == 0, "the untested commit before the failure is ranked"
        assert [job.commit for job in opened.queued_jobs(5, order="tip")] == [COMMITS[0]]
    finally:
        opened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
