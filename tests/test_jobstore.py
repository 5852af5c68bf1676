"""jobstore.JobStore on a real SQLite file: queue order, the state machine, attempts, recovery."""

from __future__ import annotations

import itertools
import sqlite3
import threading

import pytest

from commit_ci.states import FINAL_STATES, TRANSITIONS, JobState, Outcome
from commit_ci.store import SCHEMA_VERSION, InvalidTransition, JobStore

A = "a" * 40
B = "b" * 40
C = "c" * 40
D = "d" * 40


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "queue.sqlite3")


@pytest.fixture
def store(db_path):
    opened = JobStore(db_path)
    yield opened
    opened.close()


def attempt_outcome(store: JobStore, attempt_id: int):
    return store.attempt(attempt_id).outcome


def put_in_state(store: JobStore, commit: str, state: JobState) -> int | None:
    """Enqueue ``commit`` and move it to ``state`` through allowed moves; returns its attempt."""
    store.enqueue(commit, 1.0)
    if state is JobState.QUEUED:
        return None
    if state is JobState.SKIPPED:  # --coalesce: a newer commit of its branch came
        store.report("f" + commit[1:], 1.0, coalesce=True)
        return None
    attempt = store.assign(commit, "r1", 2.0)
    if state is JobState.RUNNING:
        return attempt
    store.finish(commit, attempt, state, Outcome(state.value), None, "{}", 3.0)
    return attempt


# --- enqueue and queue order -------------------------------------------------------------


def test_enqueue_is_idempotent(store):
    assert store.enqueue(A, 10.0) == (True, JobState.QUEUED)
    assert store.enqueue(A, 11.0) == (False, JobState.QUEUED)
    assert store.count(JobState.QUEUED) == 1
    assert store.job(A).queued_at == 10.0, "a second dispatch does not touch the job"
    attempt = store.assign(A, "r1", 12.0)
    assert store.enqueue(A, 13.0) == (False, JobState.RUNNING)
    store.finish(A, attempt, JobState.PASSED, Outcome.PASSED, None, "{}", 14.0)
    assert store.enqueue(A, 15.0) == (False, JobState.PASSED)
    assert store.queued(10) == [] and store.count(JobState.PASSED) == 1


def test_queue_is_first_in_first_out(store):
    for index, commit in enumerate([C, A, D, B]):
        store.enqueue(commit, 100.0 - index)  # queue order is arrival order, not timestamps
    assert store.queued(10) == [C, A, D, B]
    assert store.queued(2) == [C, A]
    store.assign(C, "r1", 1.0)
    assert store.queued(10) == [A, D, B]


def test_requeued_job_keeps_its_place(store):
    for commit in (A, B, C):
        store.enqueue(commit, 1.0)
    first = store.assign(A, "r1", 2.0)
    store.assign(B, "r2", 2.0)
    assert store.queued(10) == [C]
    store.requeue(B, store.job(B).current_attempt, Outcome.LOST, 3.0)
    store.requeue(A, first, Outcome.ERROR, 3.0)
    assert store.queued(10) == [A, B, C], "back in the queue in dispatch order, ahead of later jobs"
    store.enqueue(D, 4.0)
    assert store.queued(10) == [A, B, C, D]


# --- looking a job up by the start of its id ----------------------------------------------


def commits_starting_with(store: JobStore, prefix: str) -> list[str]:
    return [job.commit for job in store.jobs_starting_with(prefix)]


def test_a_prefix_finds_the_one_job_that_starts_with_it(store):
    twin_low, twin_high = "0fe6b0ed1b3d" + "0" * 28, "0fe6b0ed1b3d" + "f" * 28
    sha256 = "0fe6b0ef" + "2" * 56
    for commit in (twin_low, twin_high, sha256, "0fe6b0ec" + "f" * 32, "0fe6b0ee" + "0" * 32):
        store.enqueue(commit, 1.0)
    assert commits_starting_with(store, "0fe6b0ef") == [sha256]
    assert commits_starting_with(store, sha256) == [sha256]
    assert commits_starting_with(store, twin_high[:13]) == [twin_high]
    assert commits_starting_with(store, "0fe6b0ed1b3df") == [twin_high], "a last digit f is bounded too"
    assert commits_starting_with(store, twin_low) == [twin_low]
    # Ambiguous: two of them are enough to say so, however many there are.
    assert commits_starting_with(store, "0fe6b0ed1b3d") == [twin_low, twin_high]
    assert commits_starting_with(store, "0fe6b0e") == ["0fe6b0ec" + "f" * 32, twin_low]
    assert commits_starting_with(store, "0fe6b0ea") == []
    assert commits_starting_with(store, "1fe6b0e") == []


def test_a_prefix_never_finds_a_job_queued_under_an_abbreviated_id(store):
    # Such jobs exist in databases from before abbreviated ids were refused.
    store.enqueue("0fe6b0ed", 1.0)
    assert commits_starting_with(store, "0fe6b0ed") == []
    store.enqueue(A, 1.0)
    store.enqueue("a" * 12, 1.0)
    assert commits_starting_with(store, "a" * 7) == [A]


def test_abbreviated_queued_lists_only_queued_jobs_under_an_abbreviated_id(store):
    put_in_state(store, "0fe6b0ed", JobState.RUNNING)  # as older dispatchers allowed
    for commit in ("0fe6b0ee", A, "0fe6b0ef" + "0" * 56, "b" * 39, "b" * 41):
        store.enqueue(commit, 1.0)
    put_in_state(store, "c" * 12, JobState.FAILED)
    assert store.abbreviated_queued() == ["0fe6b0ee", "b" * 39, "b" * 41]
    store.recover(2.0)
    assert store.abbreviated_queued() == ["0fe6b0ed", "0fe6b0ee", "b" * 39, "b" * 41]
    store.finish("0fe6b0ee", None, JobState.ERROR, Outcome.ERROR, "abbreviated", None, 3.0)
    assert store.abbreviated_queued() == ["0fe6b0ed", "b" * 39, "b" * 41]
    assert (store.job("0fe6b0ee").state, store.job("0fe6b0ee").summary) == (JobState.ERROR, None)
    assert store.recent_summaries(10) == [{}], "a job settled without a result lists no summary"


def test_a_prefix_is_looked_up_by_a_range_on_the_commit_index(store):
    """Not a scan: the cost does not grow with the history."""
    for index in range(2000):
        store.enqueue("%040x" % (index * 7919), 1.0)
    plans = []
    store._db.set_trace_callback(plans.append)
    try:
        store.jobs_starting_with("0000000000000000000000000000000000003dd")
    finally:
        store._db.set_trace_callback(None)
    (query,) = [statement for statement in plans if statement.startswith("SELECT")]
    plan = " ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + query))
    assert "SEARCH jobs USING INDEX" in plan and "(commit_id>? AND commit_id<?)" in plan, plan
    assert "SCAN" not in plan, plan


# --- attempts ------------------------------------------------------------------------------


def test_assign_creates_increasing_attempt_ids(store):
    store.enqueue(A, 1.0)
    store.enqueue(B, 1.0)
    ids = []
    for round_ in range(3):
        for commit, runner in ((A, "r1"), (B, "r2")):
            attempt_id = store.assign(commit, runner, 10.0 + round_)
            ids.append(attempt_id)
            job = store.job(commit)
            assert (job.state, job.current_attempt, job.runner, job.started_at) == (
                JobState.RUNNING, attempt_id, runner, 10.0 + round_,
            )
            attempt = store.attempt(attempt_id)
            assert (attempt.commit, attempt.runner, attempt.outcome, attempt.ended_at) == (commit, runner, None, None)
            store.requeue(commit, attempt_id, Outcome.REFUSED, 20.0)
            assert store.attempt(attempt_id).outcome is Outcome.REFUSED
            assert store.attempt(attempt_id).ended_at == 20.0
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert store.attempt(max(ids) + 1) is None


def test_attempt_ids_keep_increasing_after_reopening(db_path):
    store = JobStore(db_path)
    store.enqueue(A, 1.0)
    first = store.assign(A, "r1", 2.0)
    store.close()
    store = JobStore(db_path)
    try:
        store.recover(3.0)
        assert store.assign(A, "r1", 4.0) > first
    finally:
        store.close()


def test_attempt_counts(store):
    store.enqueue(A, 1.0)
    assert store.attempt_counts(A) == (0, 0)
    outcomes = [Outcome.REFUSED, Outcome.LOST, Outcome.REFUSED, Outcome.ERROR, Outcome.RETURNED, Outcome.INTERRUPTED]
    for outcome in outcomes:
        attempt = store.assign(A, "r1", 2.0)
        if outcome is Outcome.INTERRUPTED:
            store.recover(3.0)
        else:
            store.requeue(A, attempt, outcome, 3.0)
    # lost, error, returned, interrupted reached a runner; the refused ones never did.
    assert store.attempt_counts(A) == (4, 2)
    out = store.assign(A, "r2", 4.0)
    assert store.attempt_counts(A) == (5, 2), "an attempt still out counts as started"
    store.finish(A, out, JobState.PASSED, Outcome.PASSED, None, "{}", 5.0)
    assert store.attempt_counts(A) == (5, 2)
    assert store.attempt_counts(B) == (0, 0), "counts are per commit"


def test_attempt_counts_only_lost_and_error_are_failures(store):
    for outcome in Outcome:
        assert outcome.infra_failure == (outcome in (Outcome.ERROR, Outcome.LOST)), outcome
        assert outcome.started == (outcome not in (Outcome.REFUSED, Outcome.DECLINED)), outcome


def test_finish_supersedes_other_attempts_still_out(store):
    store.enqueue(A, 1.0)
    old = store.assign(A, "r1", 2.0)
    store.recover(3.0)  # dispatcher restarted: old attempt interrupted, job queued
    assert store.adopt(A, old, "r1")  # the runner says it is still on it
    # ... and a verdict arrives for it.
    store.finish(A, old, JobState.FAILED, Outcome.FAILED, "1 failed", '{"status": "failed"}', 4.0)
    job = store.job(A)
    assert (job.state, job.finished_at, job.reason, job.summary) == (JobState.FAILED, 4.0, "1 failed", '{"status": "failed"}')
    assert attempt_outcome(store, old) is Outcome.FAILED


def test_finish_from_queued_marks_the_attempt_out_as_superseded(store):
    store.enqueue(A, 1.0)
    first = store.assign(A, "r1", 2.0)
    store.requeue(A, first, Outcome.LOST, 3.0)
    second = store.assign(A, "r2", 4.0)
    # A late verdict for the first attempt settles the job; the second is then superseded.
    store.finish(A, first, JobState.PASSED, Outcome.PASSED, None, "{}", 5.0)
    assert attempt_outcome(store, first) is Outcome.LOST, "an ended attempt keeps how it ended"
    assert attempt_outcome(store, second) is Outcome.SUPERSEDED
    assert store.attempt(second).ended_at == 5.0
    job = store.job(A)
    assert (job.current_attempt, job.runner, job.started_at) == (first, "r1", 2.0), "the verdict's own attempt"


def test_end_attempt_records_late_answers_once(store):
    store.enqueue(A, 1.0)
    attempt = store.assign(A, "r1", 2.0)
    store.end_attempt(attempt, Outcome.RETURNED, 3.0)
    store.end_attempt(attempt, Outcome.ERROR, 4.0)
    assert (attempt_outcome(store, attempt), store.attempt(attempt).ended_at) == (Outcome.RETURNED, 3.0)
    assert store.job(A).state is JobState.RUNNING, "end_attempt does not move the job"


# --- the state machine ---------------------------------------------------------------------


def test_every_allowed_transition_from_queued_and_running_works(store):
    commits = iter("%040x" % n for n in itertools.count(1))
    for source, target in sorted(TRANSITIONS):
        commit = next(commits)
        put_in_state(store, commit, source)
        if target is JobState.RUNNING:
            store.assign(commit, "r1", 5.0)
        elif target is JobState.QUEUED:
            store.requeue(commit, store.job(commit).current_attempt, Outcome.LOST, 5.0)
        elif target is JobState.SKIPPED:
            store.report("f" + commit[1:], 5.0, coalesce=True)
        else:
            store.finish(commit, None, target, Outcome(target.value), None, "{}", 5.0)
        assert store.job(commit).state is target, (source, target)


def test_every_transition_not_in_the_table_raises(store):
    commits = iter("%040x" % n for n in itertools.count(1))
    forbidden = [(s, t) for s in JobState for t in JobState if (s, t) not in TRANSITIONS]
    assert (JobState.PASSED, JobState.PASSED) in forbidden and (JobState.QUEUED, JobState.QUEUED) in forbidden
    for source, target in forbidden:
        commit = next(commits)
        put_in_state(store, commit, source)
        before = store.job(commit)
        with pytest.raises(InvalidTransition, match="cannot go from %s to %s" % (source.value, target.value)):
            if target is JobState.RUNNING:
                store.assign(commit, "r9", 9.0)
            elif target is JobState.QUEUED:
                store.requeue(commit, before.current_attempt or 0, Outcome.LOST, 9.0)
            elif target is JobState.SKIPPED:  # the one move the store makes only on its own
                with store.transaction() as db:
                    store._move(db, commit, target)
            else:
                store.finish(commit, before.current_attempt, target, Outcome(target.value), "again", "{}", 9.0)
        assert store.job(commit) == before, "a refused move changes nothing (%s -> %s)" % (source, target)


def test_finishing_a_finished_job_raises_and_changes_nothing(store):
    attempt = put_in_state(store, A, JobState.PASSED)
    before = store.job(A)
    attempts_before = store.attempt(attempt)
    with pytest.raises(InvalidTransition):
        store.finish(A, attempt, JobState.FAILED, Outcome.FAILED, "late", '{"status": "failed"}', 9.0)
    with pytest.raises(InvalidTransition):
        store.finish(A, attempt, JobState.PASSED, Outcome.PASSED, None, "{}", 9.0)
    assert store.job(A) == before and store.attempt(attempt) == attempts_before


def test_a_refused_requeue_rolls_back_its_attempt_update(store):
    store.enqueue(A, 1.0)
    attempt = store.assign(A, "r1", 2.0)
    store.finish(A, attempt, JobState.PASSED, Outcome.PASSED, None, "{}", 3.0)
    store.enqueue(B, 1.0)
    other = store.assign(B, "r1", 2.0)
    store.requeue(B, other, Outcome.LOST, 3.0)
    with pytest.raises(InvalidTransition):
        store.requeue(B, other, Outcome.ERROR, 4.0)  # B is queued: cannot be requeued
    assert attempt_outcome(store, other) is Outcome.LOST


def test_unknown_commit_cannot_move(store):
    with pytest.raises(InvalidTransition, match="no job"):
        store.assign(A, "r1", 1.0)
    with pytest.raises(InvalidTransition, match="no job"):
        store.finish(A, None, JobState.PASSED, Outcome.PASSED, None, "{}", 1.0)
    assert store.job(A) is None
    assert store.attempt_counts(A) == (0, 0)
    assert store.attempt(1) is None, "the failed assign left no attempt behind"


def test_final_states_are_final():
    assert FINAL_STATES == {JobState.PASSED, JobState.FAILED, JobState.FLAKY, JobState.ERROR, JobState.CANCELLED}
    for source, target in TRANSITIONS:
        assert not source.final or target is JobState.QUEUED, "out of a final state only by a rerun"
    assert not JobState.QUEUED.final and not JobState.RUNNING.final


def test_a_rerun_is_a_new_run_and_the_verdict_stays_until_it_has_one(store):
    store.enqueue(A, 1.0)
    first = store.assign(A, "r1", 2.0)
    store.finish(A, first, JobState.FAILED, Outcome.FAILED, None, '{"status": "failed", "run": 1}', 3.0)
    with pytest.raises(InvalidTransition):
        store.rerun(B, 4.0)
    assert store.rerun(A, 4.0) == 2
    job = store.job(A)
    assert (job.state, job.run, job.queued_at) == (JobState.QUEUED, 2, 4.0)
    assert job.summary == '{"status": "failed", "run": 1}', "the current verdict until run 2 has one"
    assert store.attempt_counts(A) == (0, 0), "attempts are counted per run"
    second = store.assign(A, "r2", 5.0)
    assert store.attempt(second).run == 2 and store.attempt(first).run == 1
    store.finish(A, second, JobState.PASSED, Outcome.PASSED, None, '{"status": "passed", "run": 2}', 6.0)
    assert [(run.run, run.status) for run in store.runs(A)] == [(1, JobState.FAILED), (2, JobState.PASSED)]
    assert store.count(JobState.PASSED) == 1 and store.count(JobState.FAILED) == 0


def test_a_cancelled_rerun_leaves_the_verdict_the_job_had(store):
    store.enqueue(A, 1.0)
    first = store.assign(A, "r1", 2.0)
    store.finish(A, first, JobState.PASSED, Outcome.PASSED, None, '{"status": "passed", "run": 1}', 3.0)
    store.rerun(A, 4.0)
    second = store.assign(A, "r2", 5.0)
    assert store.cancel_rerun(A, 6.0) is JobState.PASSED
    job = store.job(A)
    assert (job.state, job.run) == (JobState.PASSED, 2)
    assert store.attempt(second).outcome is Outcome.CANCELLED
    assert [(run.run, run.status, run.summary) for run in store.runs(A)] == [
        (1, JobState.PASSED, '{"status": "passed", "run": 1}'), (2, JobState.CANCELLED, None)]
    assert store.rerun(A, 7.0) == 3
    assert store.count(JobState.QUEUED) == 1 and store.count(JobState.PASSED) == 0


# --- restart: recover and adopt ------------------------------------------------------------


def test_recover_requeues_running_jobs_and_interrupts_their_attempts(store):
    store.enqueue(A, 1.0)
    store.enqueue(B, 1.0)
    store.enqueue(C, 1.0)
    done = store.assign(C, "r3", 2.0)
    store.finish(C, done, JobState.PASSED, Outcome.PASSED, None, "{}", 3.0)
    a = store.assign(A, "r1", 2.0)
    b = store.assign(B, "r2", 2.0)
    assert store.count(JobState.RUNNING) == 2

    assert store.recover(10.0) == 2

    assert store.running() == []
    assert store.queued(10) == [A, B], "back in their original order"
    for attempt in (a, b):
        assert attempt_outcome(store, attempt) is Outcome.INTERRUPTED
        assert store.attempt(attempt).ended_at == 10.0
    assert attempt_outcome(store, done) is Outcome.PASSED
    assert store.job(C).state is JobState.PASSED
    assert store.job(A).current_attempt == a, "the interrupted attempt is still known"
    assert store.recover(11.0) == 0


def test_adopt_only_the_current_attempt_of_a_queued_job(store):
    store.enqueue(A, 1.0)
    first = store.assign(A, "r1", 2.0)
    assert not store.adopt(A, first, "r1"), "a running job is not adopted"
    store.recover(3.0)
    assert not store.adopt(A, first + 100, "r1"), "not an attempt of this job"
    assert not store.adopt(B, first, "r1"), "unknown commit"

    assert store.adopt(A, first, "r1-renamed")

    job = store.job(A)
    assert (job.state, job.current_attempt, job.runner) == (JobState.RUNNING, first, "r1-renamed")
    assert store.attempt(first).outcome is None and store.attempt(first).ended_at is None
    assert not store.adopt(A, first, "r1"), "already running"


def test_adopt_refuses_a_superseded_attempt(store):
    store.enqueue(A, 1.0)
    first = store.assign(A, "r1", 2.0)
    store.requeue(A, first, Outcome.LOST, 3.0)
    second = store.assign(A, "r2", 4.0)
    store.recover(5.0)
    assert not store.adopt(A, first, "r1"), "a later attempt was assigned since"
    assert store.adopt(A, second, "r2")


@pytest.mark.parametrize("ended", [Outcome.ERROR, Outcome.RETURNED])
def test_adopt_refuses_an_attempt_its_runner_ended(store, ended):
    """A "busy" heard before the runner's own error or hand-back arrived is old news."""
    store.enqueue(A, 1.0)
    attempt = store.assign(A, "r1", 2.0)
    store.requeue(A, attempt, ended, 3.0)
    assert not store.adopt(A, attempt, "r1")
    assert store.job(A).state is JobState.QUEUED
    assert store.attempt(attempt).outcome is ended


@pytest.mark.parametrize("ended", [Outcome.LOST, Outcome.REFUSED])
def test_adopt_takes_back_an_attempt_the_dispatcher_lost_track_of(store, ended):
    store.enqueue(A, 1.0)
    attempt = store.assign(A, "r1", 2.0)
    store.requeue(A, attempt, ended, 3.0)
    assert store.adopt(A, attempt, "r1")


def test_adopt_refuses_a_finished_job(store):
    attempt = put_in_state(store, A, JobState.FAILED)
    assert not store.adopt(A, attempt, "r1")
    assert store.job(A).state is JobState.FAILED


# --- durability and schema ---------------------------------------------------------------


def test_data_survives_closing_and_reopening(db_path):
    store = JobStore(db_path)
    store.enqueue(A, 1.0)
    store.enqueue(B, 2.0)
    store.enqueue(C, 3.0)
    a = store.assign(A, "r1", 4.0)
    store.finish(A, a, JobState.FAILED, Outcome.FAILED, "2 failed", '{"status": "failed"}', 5.0)
    b = store.assign(B, "r2", 6.0)
    store.close()

    store = JobStore(db_path)
    try:
        job = store.job(A)
        assert (job.state, job.queued_at, job.started_at, job.finished_at, job.runner, job.reason, job.summary) == (
            JobState.FAILED, 1.0, 4.0, 5.0, "r1", "2 failed", '{"status": "failed"}',
        )
        assert store.job(B).state is JobState.RUNNING and store.job(B).current_attempt == b
        assert store.queued(10) == [C]
        assert store.attempt(a).outcome is Outcome.FAILED and store.attempt(b).outcome is None
        assert store.attempt_counts(A) == (1, 0)
    finally:
        store.close()


def test_a_second_store_sees_committed_writes(db_path):
    writer = JobStore(db_path)
    reader = JobStore(db_path)
    try:
        writer.enqueue(A, 1.0)
        assert reader.job(A).state is JobState.QUEUED
    finally:
        writer.close()
        reader.close()


def test_another_schema_version_is_refused(db_path):
    JobStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(RuntimeError, match="schema version %d" % (SCHEMA_VERSION + 1)):
        JobStore(db_path)


#: A commit judged in a file from before reruns existed.
JUDGED_BEFORE_RERUNS = "0f" * 20
#: The tables of schema version 1 (before jobs could require a Python, runners offer one).
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE jobs (seq INTEGER PRIMARY KEY, commit_id TEXT NOT NULL UNIQUE, state TEXT NOT NULL,
    queued_at REAL NOT NULL, started_at REAL, finished_at REAL, current_attempt INTEGER, runner TEXT,
    reason TEXT, summary TEXT);
CREATE TABLE attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, commit_id TEXT NOT NULL, runner TEXT NOT NULL,
    assigned_at REAL NOT NULL, ended_at REAL, outcome TEXT);
CREATE TABLE runners (name TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL, registered_at REAL NOT NULL);
INSERT INTO jobs (commit_id, state, queued_at) VALUES ('%s', 'queued', 1.0);
INSERT INTO jobs (commit_id, state, queued_at, finished_at, summary) VALUES ('%s', 'failed', 1.0, 2.0, '{"status": "failed"}');
INSERT INTO runners VALUES ('r1', '127.0.0.1', 8900, 1.0);
""" % (A, JUDGED_BEFORE_RERUNS)


def test_a_file_of_schema_version_1_is_brought_up_to_date_keeping_its_jobs(db_path):
    with sqlite3.connect(db_path) as db:
        db.executescript(SCHEMA_1)
    store = JobStore(db_path)
    try:
        assert [job.commit for job in store.queued_jobs(10)] == [A]
        assert store.runners() == [("r1", "127.0.0.1", 8900, frozenset())]
        attempt = store.assign(A, "r1", 2.0)
        store.requeue(A, attempt, Outcome.DECLINED, 3.0, requires="python3.12")
        assert store.queued_jobs(10, offered=frozenset({"python3.11"})) == []
        assert [job.requires for job in store.queued_jobs(10, offered=frozenset({"python3.12"}))] == ["python3.12"]
        # Version 3: a job judged before reruns existed is its first run, and can be run again.
        assert [(run.run, run.status) for run in store.runs(JUDGED_BEFORE_RERUNS)] == [(1, JobState.FAILED)]
        assert store.rerun(JUDGED_BEFORE_RERUNS, 3.0) == 2
    finally:
        store.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_a_new_file_gets_the_current_schema_version(db_path):
    JobStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    JobStore(db_path).close()  # reopening the same version is fine


# --- checkpoints ---------------------------------------------------------------------------


def wal_pages(path: str) -> tuple[int, int]:
    """(pages in the WAL, pages of it already copied into the database file), as a
    passive checkpoint on a connection of its own reports them after doing its part."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        _, pages, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return pages, copied
    finally:
        other.close()


def rows_in_the_database_file(path: str, folder) -> int:
    """Jobs in the database file alone, without its WAL: what checkpoints copied."""
    import shutil

    copy = str(folder / "copy.sqlite3")
    shutil.copyfile(path, copy)
    alone = sqlite3.connect(copy)
    try:
        return alone.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # not even the table yet
    finally:
        alone.close()


def test_commits_do_not_checkpoint_the_store_does_it_on_its_own_thread(store, db_path, tmp_path):
    from conftest import wait_until

    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert store._checkpointer.is_alive()
    for index in range(10):
        store.enqueue("%040x" % index, float(index))
    # A quiet store's last writes reach the database file within about a second,
    # without a commit or anyone else asking.
    wait_until(lambda: rows_in_the_database_file(db_path, tmp_path) == 10, 10,
               message="the writes copied into the database file")


def test_the_wal_starts_over_after_a_checkpoint_even_with_a_write_in_progress(db_path):
    from commit_ci.store import WAL_RESTART_PAGES
    store = JobStore(db_path)
    try:
        # Stop the checkpointer and write well past the restart threshold.
        store._closing.set()
        store._checkpoint_wanted.set()
        store._checkpointer.join()
        for index in range(400):
            store.enqueue("%040x" % index, float(index))
        pages, _ = wal_pages(db_path)
        assert pages > WAL_RESTART_PAGES
        # A write is in progress (its transaction open) while the checkpoint runs: the
        # checkpoint's last step waits for it, so that it copies that write too.
        in_transaction, may_commit = threading.Event(), threading.Event()

        def slow_write():
            with store.transaction() as db:
                db.execute("INSERT INTO jobs (commit_id, state, queued_at) VALUES (?, 'queued', 0)", ("e" * 40,))
                in_transaction.set()
                may_commit.wait(30)

        writer = threading.Thread(target=slow_write)
        writer.start()
        checkpointer = None
        try:
            assert in_transaction.wait(10)
            connection = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            checkpointer = threading.Thread(target=store._checkpoint, args=(connection,))
            checkpointer.start()
            checkpointer.join(timeout=1.0)
            assert checkpointer.is_alive(), "the checkpoint's last step did not wait for the write in progress"
        finally:
            may_commit.set()
            writer.join(timeout=30)
            if checkpointer is not None:
                checkpointer.join(timeout=30)
        connection.close()
        store.enqueue("f" * 40, 1.0)
        # The WAL was written from its start again: it holds only that last write (a
        # dispatch writes a dozen pages or so: the job, its branch, their indexes).
        pages_after, _ = wal_pages(db_path)
        assert pages_after < 30 < pages
    finally:
        store.close()


def test_a_closed_store_leaves_everything_in_the_database_file(db_path):
    import os

    store = JobStore(db_path)
    for index in range(50):
        store.enqueue("%040x" % index, float(index))
    store.close()
    assert not store._checkpointer.is_alive()
    assert not os.path.exists(db_path + "-wal") or os.path.getsize(db_path + "-wal") == 0
    reopened = JobStore(db_path)
    try:
        assert reopened.count(JobState.QUEUED) == 50
    finally:
        reopened.close()


# --- branches: tip order and branch states -------------------------------------------------

E = "e" * 40
F = "f" * 40


def in_tip_order(store: JobStore, limit: int = 10) -> list[str]:
    return [job.commit for job in store.queued_jobs(limit, order="tip")]


def report_round(store: JobStore, branch: str, commits: list[str]) -> None:
    """As the observer reports a round: oldest first, each with the branch's new tip."""
    for commit in commits:
        store.report(commit, 1.0, branch, tip=commits[-1])


def test_a_round_queues_its_tip_with_its_first_commit_and_runs_it_first(store):
    done = store.report(A, 1.0, "main", tip=D)
    assert (done.new, done.state, done.tip_queued) == (True, JobState.QUEUED, True)
    assert in_tip_order(store) == [D, A], "the tip is queued with the first commit, ahead of it"
    report_round(store, "main", [A, B, C, D])
    assert in_tip_order(store) == [D, C, B, A], "the tip, then the others newest first"
    assert store.queued(10) == [A, D, B, C], "fifo: the order they were dispatched in"
    assert store.count(JobState.QUEUED) == 4


def test_a_commit_without_a_tip_is_its_branch_s_newest(store):
    for commit in (A, B, C):
        store.enqueue(commit, 1.0)  # older observers, ci-ctl dispatch: the unnamed branch
    assert in_tip_order(store) == [C, B, A]
    assert store.branch_states(10) == [], "the unnamed branch is not shown"


def test_tips_of_several_branches_run_in_the_order_they_became_tips(store):
    report_round(store, "main", [A, B])
    report_round(store, "release", [C, D])
    report_round(store, "main", [E])
    assert in_tip_order(store) == [D, E, C, B, A], "then the others by when they came, newest first"
    # A commit that is the tip of two branches stays a tip until neither has it.
    store.report(D, 1.0, "feature")
    report_round(store, "release", [F])
    assert in_tip_order(store)[:3] == [D, E, F]


def test_a_requeued_job_keeps_its_place_in_tip_order(store):
    report_round(store, "main", [A, B, C])
    attempt = store.assign(C, "r1", 2.0)
    report_round(store, "main", [D])
    store.requeue(C, attempt, Outcome.LOST, 3.0)
    assert in_tip_order(store) == [D, C, B, A]


def test_the_tip_order_survives_reopening(db_path):
    store = JobStore(db_path)
    report_round(store, "main", [A, B, C])
    report_round(store, "other", [D])
    before = in_tip_order(store)
    store.close()
    store = JobStore(db_path)
    try:
        assert in_tip_order(store) == before == [C, D, B, A]
    finally:
        store.close()


def test_a_commit_is_one_job_and_records_every_branch_it_came_on(store):
    assert store.report(A, 1.0, "main").new
    assert not store.report(A, 1.0, "release/1.0").new
    assert not store.report(A, 1.0, "main").new
    assert store.count(JobState.QUEUED) == 1
    assert store.branches_of(A) == ["main", "release/1.0"]
    assert {state.branch: state.tip for state in store.branch_states(10)} == {"main": A, "release/1.0": A}


def test_a_commit_reported_again_does_not_become_the_tip_again(store):
    report_round(store, "main", [A, B, C])
    store.report(A, 1.0, "main")  # the push hook and the observer both report it
    assert in_tip_order(store) == [C, B, A]


def test_the_planning_queries_read_their_own_indexes(store):
    for order, indexes in (("fifo", {"queued_jobs", "queued_bisect"}),
                           ("tip", {"queued_tips", "queued_bisect", "queued_newest"})):
        plans = []
        original = store._db

        class Explaining:
            def execute(self, sql, values=()):
                if sql.startswith("SELECT * FROM jobs"):
                    plans.extend(row[3] for row in original.execute("EXPLAIN QUERY PLAN " + sql, values))
                return original.execute(sql, values)

        store._db = Explaining()
        try:
            store.queued_jobs(10, offered=frozenset({"python3.12"}), order=order)
        finally:
            store._db = original
        assert plans and all(any(index in plan for index in indexes) for plan in plans), (order, plans)
        assert not any("TEMP B-TREE" in plan for plan in plans), "no sort: the index gives the order"


def judge(store: JobStore, commit: str, state: JobState) -> None:
    attempt = store.assign(commit, "r1", 2.0)
    store.finish(commit, attempt, state, Outcome(state.value), None, "{}", 3.0)


def state_of(store: JobStore, branch: str):
    (found,) = [state for state in store.branch_states(10) if state.branch == branch]
    return found.state, found.since, found.commit


def test_a_branch_goes_green_then_red_since_the_breaking_commit_then_green_again(store):
    report_round(store, "main", [A])
    assert state_of(store, "main") == ("pending", None, None)
    judge(store, A, JobState.PASSED)
    assert state_of(store, "main") == ("green", A, A)
    report_round(store, "main", [B, C, D])
    judge(store, D, JobState.FAILED)
    assert state_of(store, "main") == ("red", D, D)
    judge(store, B, JobState.FAILED)
    assert state_of(store, "main") == ("red", B, D), "C is not judged yet: it does not break the run"
    judge(store, C, JobState.ERROR)
    assert state_of(store, "main") == ("red", B, D), "an infrastructure error says nothing of the code"
    report_round(store, "main", [E])
    judge(store, E, JobState.PASSED)
    assert state_of(store, "main") == ("green", E, E)
    report_round(store, "main", [F])
    judge(store, F, JobState.FLAKY)
    assert state_of(store, "main") == ("flaky", F, F), "flaky: a state of its own"


def test_the_state_follows_the_order_the_branch_got_its_commits(store):
    # The tip is recorded with the round's first commit, and moves after the others
    # when it is reported itself: the newest judged commit is the tip.
    report_round(store, "main", [A, B, C])
    judge(store, C, JobState.FAILED)
    judge(store, B, JobState.PASSED)
    assert state_of(store, "main") == ("red", C, C)


#: The tables of schema version 2, with a queue of three jobs and a finished one.
SCHEMA_2 = SCHEMA_1.replace("'schema_version', '1'", "'schema_version', '2'").replace(
    "reason TEXT, summary TEXT)", "reason TEXT, summary TEXT, requires TEXT)").replace(
    "registered_at REAL NOT NULL)", "registered_at REAL NOT NULL, offers TEXT)").replace(
    "8900, 1.0)", "8900, 1.0, '')") + """
INSERT INTO jobs (commit_id, state, queued_at, summary) VALUES ('%s', 'passed', 1.0, '{}');
INSERT INTO jobs (commit_id, state, queued_at) VALUES ('%s', 'queued', 1.0);
INSERT INTO jobs (commit_id, state, queued_at) VALUES ('%s', 'running', 1.0);
""" % (B, C, D)


def test_a_file_of_schema_version_2_opens_with_its_queue_behind_new_commits(db_path):
    with sqlite3.connect(db_path) as db:
        db.executescript(SCHEMA_2)
    store = JobStore(db_path)
    try:
        assert store.recover(2.0) == 1
        assert in_tip_order(store) == [D, C, A], "the old queue, newest first"
        report_round(store, "main", [E, F])
        assert in_tip_order(store) == [F, E, D, C, A], "behind what is reported from now on"
        assert store.queued(10) == [A, C, D, E, F]
        judge(store, F, JobState.PASSED)
        assert state_of(store, "main") == ("green", F, F)
    finally:
        store.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
