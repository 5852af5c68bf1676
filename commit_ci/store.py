"""The dispatcher's durable job queue: one SQLite file, one object, one state machine.

Every job is a commit. It is ``queued`` until the scheduler assigns it to a runner,
``running`` while an attempt is out, and ends ``passed``, ``failed`` (the commit's
verdict), ``error`` (the infrastructure failed it too often) or ``cancelled``. Each
assignment is a row in ``attempts`` whose id travels with ``runtest`` and comes back
with ``results``, so a late answer from an old attempt is recognised as such.

A job may run more than once (an operator's rerun): ``jobs.run`` numbers its latest
run, each attempt belongs to one run, and ``runs`` keeps how each run ended. The job's
``summary`` and state are its current verdict: the latest run that had one.

Branches: every ``dispatch`` says which branch brought its commit (none: the unnamed
branch ``""``, as older observers and ``ci-ctl dispatch`` send). A commit is one job
whichever branches bring it; ``branch_commits`` records each branch it came on, in
the order the branch got them, and ``branches`` each branch's newest commit, its tip.
The queue's order comes from them (``QUEUE_ORDERS``): ``tip`` runs the tips first,
the branches' in the order they became tips, then the other queued commits, newest
first; ``fifo`` runs the oldest dispatch first. Both read a partial index of their
own, so that planning reads as many rows as it plans, however long the history or
the queue. A branch's state (green, red since <sha>, pending) is read from the
verdicts of its commits, newest first (``branch_states``).

A run whose tests fail goes on in rounds (flaky.py): ``jobs.round`` is the run's
current one (0: the whole suite, then one per rerun of the failing tests) and
``jobs.retest`` the tests it runs (NULL: the whole test command); each attempt belongs
to a round. ``rounds`` keeps each ended round of a run in progress -- its summary,
output and JUnit XML, from which the run's result is made when it ends -- and is
emptied for that run when it has its verdict, so it holds only runs in progress.
``flaky_tests`` keeps, for good, each test that failed and then passed when run again,
with its commit and how it ended in each round: what ``flakiest`` reads.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A
transaction is on disk (in the WAL) when ``commit`` returns, so killing the
dispatcher at any moment loses nothing it has acknowledged; a power failure or OS
crash can lose the last transactions before the next checkpoint (SQLite's
documented trade-off for this mode). docs/reliability.md says more.

Checkpoints (copying the WAL into the database file, with its fsyncs) run on a
thread of the store's own, on a second connection, instead of inside whichever
COMMIT happens to fill the WAL: SQLite's automatic checkpoint stalled one write
in about a thousand for 15-25 ms, under the store's lock, and with it every
request waiting for that lock.

Only the dispatcher process opens the file, and it serialises every call under its
own lock; the store keeps one connection and adds a lock of its own only so that
it stays correct if used alone (tests, tools). A thread that only reads and must
not wait for that lock (the results page) opens a second, read-only store on the
same file: in WAL mode readers and the writer do not block each other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import urllib.parse
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

from commit_ci import culprit, notices
from commit_ci.states import ADOPTABLE, BRANCH_PENDING, BRANCH_STATE_OF_VERDICT, TRANSITIONS, JobState, Outcome

SCHEMA_VERSION = 8
#: The table of runs, which version 3 added (in SCHEMA too, for new files).
RUNS_TABLE = """CREATE TABLE IF NOT EXISTS runs (
    commit_id   TEXT NOT NULL,
    run         INTEGER NOT NULL,
    status      TEXT NOT NULL,          -- a verdict (states.VERDICTS)
    finished_at REAL NOT NULL,
    summary     TEXT,                   -- what <sha>.json held for it; NULL for a cancelled rerun
    PRIMARY KEY (commit_id, run)
)"""
#: The tables of rounds and flaky tests, which version 5 added (in SCHEMA too, for new files).
ROUNDS_TABLE = """CREATE TABLE IF NOT EXISTS rounds (
    commit_id   TEXT NOT NULL,
    run         INTEGER NOT NULL,
    round       INTEGER NOT NULL,       -- 0: the whole suite; k: the k-th rerun of its failing tests
    summary     TEXT NOT NULL,          -- the round's result as JSON (result.SUMMARY_FIELDS, tests, failing)
    log         BLOB,                   -- its output and JUnit XML, until the run's result files have them
    junit       BLOB,
    PRIMARY KEY (commit_id, run, round)
)"""
FLAKY_TESTS_TABLE = """CREATE TABLE IF NOT EXISTS flaky_tests (
    commit_id   TEXT NOT NULL,
    run         INTEGER NOT NULL,
    test        TEXT NOT NULL,          -- a pytest node id, or flaky.WHOLE_COMMAND
    outcomes    TEXT NOT NULL,          -- how it ended in each round, as JSON: ["failed", "passed"]
    finished_at REAL NOT NULL,          -- when its run got its verdict
    PRIMARY KEY (commit_id, run, test)
)"""
#: The tables of shards and test file durations, which version 7 added (in SCHEMA too, for new files).
SHARDS_TABLE = """CREATE TABLE IF NOT EXISTS shards (
    commit_id   TEXT NOT NULL,
    run         INTEGER NOT NULL,
    shard       INTEGER NOT NULL,       -- 1 to shards
    shards      INTEGER NOT NULL,       -- how many the run's first round has
    plan        TEXT NOT NULL,          -- test files to shards, JSON (sharding.plan): the same in every row of a run
    attempt     INTEGER,                -- the attempt out on it; NULL: waiting for a runner, or done
    summary     TEXT,                   -- its result (sharding.entry) as JSON once it has one; NULL: not yet
    log         BLOB,                   -- its output and JUnit XML, until the run's round 0 is merged
    junit       BLOB,
    PRIMARY KEY (commit_id, run, shard)
)"""
DURATIONS_TABLE = """CREATE TABLE IF NOT EXISTS test_durations (
    path        TEXT PRIMARY KEY,       -- a test file (sharding.is_test_path)
    seconds     REAL NOT NULL,          -- how long its tests took in the newest run that ran it
    updated     REAL NOT NULL           -- when that was: the oldest go first past MAX_DURATION_FILES
)"""
#: The notifications outbox and each branch's last noticed state, which version 8 added
#: (in SCHEMA too, for new files): see "Notifications" below and notify.py.
NOTIFICATIONS_TABLE = """CREATE TABLE IF NOT EXISTS notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- the order a channel sends its rows in
    delivery    TEXT NOT NULL UNIQUE,   -- sent with every try: receivers drop a repeat by it
    channel     TEXT NOT NULL,          -- notify.Channel.name: "command", "mail", "webhook <hash>", "status"
    subject     TEXT NOT NULL,          -- what it tells, once per channel: "branch <n> <name>", "status <sha> <run> <state>"
    document    TEXT NOT NULL,          -- the JSON document (notify.py completes it when sending)
    created_at  REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,          -- not tried again before (exponential backoff)
    last_error  TEXT,
    done_at     REAL,                   -- NULL while it is to be sent
    outcome     TEXT,                   -- delivered, superseded (a newer commit status), dropped (channel gone)
    UNIQUE (channel, subject)
)"""
BRANCH_NOTICES_TABLE = """CREATE TABLE IF NOT EXISTS branch_notices (
    branch    TEXT PRIMARY KEY,
    state     TEXT NOT NULL,            -- the branch's state when it last changed (states.BRANCH_STATE_OF_VERDICT)
    commit_id TEXT,                     -- the commit whose verdict made it so
    changes   INTEGER NOT NULL,         -- how many times it changed: numbers each change's subject
    judged    TEXT                      -- the newest commit whose verdict was noticed (_judged_after)
) WITHOUT ROWID"""
NOTIFICATIONS_INDEX = ("CREATE INDEX IF NOT EXISTS notifications_pending ON notifications (channel, id)"
                       " WHERE done_at IS NULL")
#: What turns a file of an older schema version into the next one, by the version it makes.
MIGRATIONS = {
    2: ("ALTER TABLE jobs ADD COLUMN requires TEXT", "ALTER TABLE runners ADD COLUMN offers TEXT"),
    3: ("ALTER TABLE jobs ADD COLUMN run INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE attempts ADD COLUMN run INTEGER NOT NULL DEFAULT 1",
        RUNS_TABLE,
        "INSERT INTO runs (commit_id, run, status, finished_at, summary)"
        " SELECT commit_id, 1, state, COALESCE(finished_at, queued_at), summary FROM jobs WHERE summary IS NOT NULL"),
    # Jobs still to run came on no known branch: they keep their order among
    # themselves, behind every commit reported from now on (whose marks are positive).
    4: (
        "ALTER TABLE jobs ADD COLUMN tip_since INTEGER",
        "ALTER TABLE jobs ADD COLUMN last_seen INTEGER",
        "UPDATE jobs SET last_seen = seq - (SELECT MAX(seq) FROM jobs) WHERE state IN ('queued', 'running')",
    ),
    5: ("ALTER TABLE jobs ADD COLUMN round INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN retest TEXT",
        "ALTER TABLE attempts ADD COLUMN round INTEGER NOT NULL DEFAULT 0",
        ROUNDS_TABLE, FLAKY_TESTS_TABLE),
    6: ("ALTER TABLE jobs ADD COLUMN bisect INTEGER",
        "ALTER TABLE jobs ADD COLUMN first_failing TEXT",
        "ALTER TABLE jobs ADD COLUMN first_failing_pending INTEGER"),
    7: ("ALTER TABLE jobs ADD COLUMN shards INTEGER",
        "ALTER TABLE attempts ADD COLUMN shard INTEGER",
        SHARDS_TABLE, DURATIONS_TABLE),
    # Only new tables: a branch with no row in branch_notices has its first change noticed
    # as one from pending (see _notice_branches).
    8: (NOTIFICATIONS_TABLE, BRANCH_NOTICES_TABLE, NOTIFICATIONS_INDEX),
}
#: Test files whose durations are kept (sharding.py); past it, the least recently run go.
MAX_DURATION_FILES = 20_000

#: The orders the queue can be taken in (the dispatcher's ``--order``): ``tip``, each
#: branch's newest commit first, then the others newest first; ``fifo``, oldest first.
QUEUE_ORDERS = ("tip", "fifo")
#: The branch of commits dispatched without one (older observers, ``ci-ctl dispatch``):
#: it has a tip like any other, and is not shown among the branches.
UNNAMED_BRANCH = ""
#: Most commits of one branch read to find its state: a run of one verdict longer than
#: this reports the oldest commit read as its ``since``. It bounds the cost of a state
#: (a few milliseconds) however long a branch's history is.
BRANCH_WALK_ROWS = 10_000
#: The last error of a notification is kept cut to this length.
NOTIFICATION_ERROR_CHARS = 500
#: Notifications done (delivered, superseded, dropped) are kept for a look at the latest
#: ones (sqlite3 on the queue's file); older ones are deleted as new ones are delivered.
NOTIFICATIONS_KEPT = 10_000

#: A checkpoint is started after this many write transactions (SQLite's automatic
#: one comes after 1,000 WAL pages; a dispatch writes about 10: the job, its branch,
#: their indexes)...
CHECKPOINT_EVERY_COMMITS = 250
#: ... or after this many seconds with at least one write, so that a quiet queue's
#: last writes reach the database file soon too.
CHECKPOINT_INTERVAL_S = 1.0
#: SQLite writes the WAL from its beginning again only when a write transaction
#: starts with all of it checkpointed; under a steady stream of writes a checkpoint
#: beside them never quite gets there. Past this many WAL pages (SQLite's own
#: automatic threshold), the checkpointer copies the last few under the store's lock,
#: after at most CATCH_UP_ROUNDS rounds beside the writer that leave fewer than
#: CATCH_UP_PAGES for it (its fsync is then most of the time it holds the lock).
WAL_RESTART_PAGES = 1000
CATCH_UP_ROUNDS = 4
CATCH_UP_PAGES = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    -- Queue order: first dispatched, first run. Jobs are never deleted, so the
    -- largest seq plus one (SQLite's rowid rule) keeps growing without AUTOINCREMENT,
    -- which costs every dispatch one more page written (its sqlite_sequence row).
    -- Files made with AUTOINCREMENT keep it and behave the same.
    seq             INTEGER PRIMARY KEY,
    commit_id       TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    queued_at       REAL NOT NULL,
    started_at      REAL,               -- when the latest attempt was assigned
    finished_at     REAL,
    current_attempt INTEGER,            -- latest attempt id, NULL before the first
    runner          TEXT,               -- runner of the latest attempt
    reason          TEXT,               -- why a final state is what it is, when not obvious
    summary         TEXT,               -- the current verdict's result as JSON (what <sha>.json holds)
    requires        TEXT,               -- what a runner needs to run it ("python3.12"), once one declined it
    run             INTEGER NOT NULL DEFAULT 1, -- the latest run: 1, then one more for each rerun
    tip_since       INTEGER,            -- while it is some branch's tip: the branch_commits.seq that made it one
    last_seen       INTEGER,            -- branch_commits.seq of its latest arrival on a branch: newer runs first
    round           INTEGER NOT NULL DEFAULT 0, -- the run's round: 0, then one per rerun of failing tests
    retest          TEXT,               -- the round's tests to run again, JSON node ids; NULL: all of them
    bisect          INTEGER,            -- its rank in a bisection that needs its verdict (culprit.py); NULL: none
    first_failing   TEXT,               -- a failed commit's culprit, once known (culprit.py)
    first_failing_pending INTEGER,      -- 1: its result files do not name first_failing yet
    shards          INTEGER             -- its run's first round is split in this many shards (sharding.py); NULL: not
);
-- Only queued and running jobs are ever looked up by state, so index only them:
-- each index stays as small as the queue (or the runners), however long the
-- history grows. Queries name the state literally so that SQLite uses them.
CREATE INDEX IF NOT EXISTS queued_jobs ON jobs (seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS running_jobs ON jobs (seq) WHERE state = 'running';
-- The queue in tip order: the queued tips (a few: one per branch at most), then the
-- other queued jobs, newest first.
CREATE INDEX IF NOT EXISTS queued_tips ON jobs (tip_since) WHERE state = 'queued' AND tip_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS queued_newest ON jobs (last_seen) WHERE state = 'queued' AND tip_since IS NULL;
-- Commits a bisection needs (culprit.py), in its order: as few as the bisections
-- under way need, ahead of the plain queue.
CREATE INDEX IF NOT EXISTS queued_bisect ON jobs (bisect, seq) WHERE state = 'queued' AND bisect IS NOT NULL;
-- Failed commits whose result files are still to be told their first failing commit:
-- none but for an instant, or after a crash (the dispatcher rewrites them on start-up).
CREATE INDEX IF NOT EXISTS first_failing_pending ON jobs (seq) WHERE first_failing_pending IS NOT NULL;
-- The results page and operators read the newest final results: an index over
-- finished jobs only, so they read just the rows they show, however long the
-- history grows. (IF NOT EXISTS adds it to files made before it existed.)
CREATE INDEX IF NOT EXISTS finished_jobs ON jobs (finished_at) WHERE summary IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    commit_id   TEXT NOT NULL,
    runner      TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    ended_at    REAL,
    outcome     TEXT,                   -- NULL while out; see Outcome
    run         INTEGER NOT NULL DEFAULT 1, -- the job's run it belongs to
    round       INTEGER NOT NULL DEFAULT 0, -- and the run's round
    shard       INTEGER                 -- and the shard of that round it runs (sharding.py); NULL: all of it
);
CREATE INDEX IF NOT EXISTS attempts_by_commit ON attempts (commit_id);
-- Every branch each commit came on, in the order the branch got them (seq): its
-- branch_history index is a branch's history, newest last; the unique index finds a
-- commit's branches. A tip recorded ahead of its round (named by its first commit)
-- moves to the end when it is reported itself (see report). Each index costs every
-- dispatch a page written: no more than these.
CREATE TABLE IF NOT EXISTS branch_commits (
    seq       INTEGER PRIMARY KEY,
    branch    TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    ahead     INTEGER NOT NULL DEFAULT 0,  -- 1: recorded as the tip, not reported itself yet
    UNIQUE (commit_id, branch)
);
CREATE INDEX IF NOT EXISTS branch_history ON branch_commits (branch, seq);
-- Each branch's newest commit; updated: the branch_commits.seq of its last change.
-- A few rows (one per branch), read whole: no index but the name.
CREATE TABLE IF NOT EXISTS branches (
    name    TEXT PRIMARY KEY,
    tip     TEXT NOT NULL,
    updated INTEGER NOT NULL
) WITHOUT ROWID;
-- Runners registered and not dropped: after a restart the dispatcher pings them at
-- once instead of waiting for each to notice the silence and register again.
CREATE TABLE IF NOT EXISTS runners (
    name          TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    port          INTEGER NOT NULL,
    registered_at REAL NOT NULL,
    offers        TEXT                -- what it can run, space-separated ("python3.11 python3.12")
);
-- How each run of a commit ended, earlier ones included (their files are kept too).
""" + RUNS_TABLE + ";\n" + ROUNDS_TABLE + ";\n" + FLAKY_TESTS_TABLE + ";\n" + SHARDS_TABLE + ";\n" + DURATIONS_TABLE + """;
CREATE INDEX IF NOT EXISTS test_durations_by_time ON test_durations (updated);
CREATE INDEX IF NOT EXISTS flaky_tests_by_time ON flaky_tests (finished_at);
-- The newest runs, which the rate of a flaky test is over (flakiest), read by time.
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (finished_at);
-- Notifications to send, kept until sent (an outbox), and each branch's last noticed
-- state. The partial index holds the rows still to send alone: a few.
""" + NOTIFICATIONS_TABLE + ";\n" + BRANCH_NOTICES_TABLE + ";\n" + NOTIFICATIONS_INDEX + ";\n"


@dataclass(frozen=True)
class Job:
    commit: str
    state: JobState
    queued_at: float
    started_at: float | None
    finished_at: float | None
    current_attempt: int | None
    runner: str | None
    reason: str | None
    summary: str | None
    requires: str | None = None
    run: int = 1
    round: int = 0
    retest: tuple[str, ...] | None = None  # the round's tests (None: the whole test command)
    bisect: int | None = None  # its rank in a bisection (culprit.py)
    first_failing: str | None = None  # a failed commit's culprit, once known
    shards: int | None = None  # its run's round 0 is split in this many shards (sharding.py)


@dataclass(frozen=True)
class Enqueued:
    """What a ``dispatch`` did: whether its commit is a new job and the job's state,
    whether the tip it named was queued with it (new too), and whether the commit is a
    tip queued so, ahead of its round, reported itself at the round's end."""

    new: bool
    state: JobState
    tip_queued: bool = False
    caught_up: bool = False


@dataclass(frozen=True)
class BranchState:
    """A branch's state (states.BRANCH_STATE_OF_VERDICT), from its newest judged commit
    (``commit``; None while ``pending``); ``since``: the oldest commit of the unbroken
    run of that state up to it, in the order the branch got them; ``tip``: its newest
    commit, and that job's state."""

    branch: str
    state: str
    since: str | None
    commit: str | None
    tip: str
    tip_state: JobState | None


@dataclass(frozen=True)
class Attempt:
    id: int
    commit: str
    runner: str
    assigned_at: float
    ended_at: float | None
    outcome: Outcome | None
    run: int = 1
    round: int = 0
    shard: int | None = None  # the shard of the round it runs (sharding.py)


@dataclass(frozen=True)
class Shard:
    """One shard of a run in progress (sharding.py): its plan, its attempt out (None:
    none) and, once it has one, its result (``summary``: sharding.entry, output, XML)."""

    commit: str
    run: int
    shard: int
    shards: int
    plan: bytes
    attempt: int | None
    summary: dict | None
    log: bytes
    junit: bytes | None


@dataclass(frozen=True)
class Round:
    """An ended round of a run in progress (flaky.py)."""

    round: int
    summary: dict
    log: bytes
    junit: bytes | None


@dataclass(frozen=True)
class Run:
    """How one run of a commit ended."""

    commit: str
    run: int
    status: JobState
    finished_at: float
    summary: str | None


@dataclass(frozen=True)
class Notification:
    """A notification still to send (the ``notifications`` table)."""

    id: int
    delivery: str  # its delivery id, the same on every try
    channel: str
    subject: str
    document: dict
    attempts: int  # tries so far
    next_at: float
    last_error: str | None


class InvalidTransition(Exception):
    pass


class JobStore:
    """All reads and writes of the job database. Methods are atomic transactions."""

    def __init__(self, path: str, read_only: bool = False):
        """Open (and, unless ``read_only``, create or check) the database at ``path``.

        A read-only store never writes: it expects the file to exist already, made
        by a writing store, and any write method on it raises sqlite3.OperationalError.
        """
        self.path = path
        self._lock = threading.RLock()
        #: Jobs per state, kept in step with the table by every transaction that moves
        #: a job (``_pending`` holds the current transaction's changes until COMMIT),
        #: so that ``count`` costs the same with 10 jobs or 10 million. A read-only
        #: store does not see the writer's moves and must not use ``count``.
        self._counts = {state.value: 0 for state in JobState}
        self._pending: dict[str, int] = {}
        #: Writes since the last checkpoint, and the checkpointer's thread (None for a
        #: read-only store, which never writes); see _checkpoint_loop.
        self._commits_since_checkpoint = 0
        #: The notification channels (notify.Channel.name) that get each change of a
        #: branch's state, and those that get each commit's status: see notify_to.
        self._branch_channels: tuple[str, ...] = ()
        self._status_channels: tuple[str, ...] = ()
        self._checkpoint_wanted = threading.Event()
        self._closing = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if read_only:
            uri = "file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path))
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout=10000")
            return
        # isolation_level=None: no implicit transactions; every write below sits in an
        # explicit BEGIN IMMEDIATE so it takes the write lock up front.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        try:
            self._prepare()
        except BaseException:
            self._db.close()
            raise
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread's job
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="checkpointer", daemon=True)
        self._checkpointer.start()

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self.transaction() as db:
            has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
            row = has_meta and db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row["value"]) if row else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    "%s has schema version %s; this dispatcher knows version %d" % (self.path, row["value"], SCHEMA_VERSION)
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    if not _column_there(db, statement):
                        db.execute(statement)
            if row and has_meta:
                # A file whose version says it has them and that lacks columns of a
                # migration (made while version 7 was a placeholder, before sharding
                # was merged) gets them now; the tables come with SCHEMA below.
                for statement in MIGRATIONS[7]:
                    if statement.startswith("ALTER TABLE") and not _column_there(db, statement):
                        db.execute(statement)
            if row:
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        # executescript commits on its own; the statements are idempotent.
        self._db.executescript(SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        with self._lock:
            for state, count in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                self._counts[state] = count

    def close(self) -> None:
        if self._checkpointer is not None:
            self._closing.set()
            self._checkpoint_wanted.set()
            self._checkpointer.join()
        with self._lock:
            self._db.close()  # the last connection to close checkpoints what is left

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file when enough has been written, without
        the store's lock: in WAL mode a checkpoint on another connection runs beside
        the writer (PASSIVE: it never waits for it, and the writer never waits for it)."""
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            while not self._closing.is_set():
                self._checkpoint_wanted.wait(CHECKPOINT_INTERVAL_S)
                self._checkpoint_wanted.clear()
                with self._lock:
                    written, self._commits_since_checkpoint = self._commits_since_checkpoint, 0
                if written and not self._closing.is_set():
                    try:
                        self._checkpoint(connection)
                    except sqlite3.Error:
                        pass  # the next round tries again; the WAL only grows meanwhile
        finally:
            connection.close()

    def _checkpoint(self, connection: sqlite3.Connection) -> None:
        # The bulk of the copy beside the writer; each round copies what was written
        # during the one before, so the rounds get shorter...
        _, wal_pages, _ = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if wal_pages <= WAL_RESTART_PAGES:
            return
        for _ in range(CATCH_UP_ROUNDS):
            before = wal_pages
            _, wal_pages, _ = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if wal_pages - before <= CATCH_UP_PAGES:
                break
        # ... until a last short one with no write in progress, so that the next write
        # starts the WAL over instead of making it longer.
        with self._lock:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._pending = {}
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
                for state, change in self._pending.items():
                    self._counts[state] += change
                self._wrote()
            finally:
                self._pending = {}

    def _wrote(self) -> None:
        """Count a committed write (under the lock) towards the next checkpoint."""
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint == CHECKPOINT_EVERY_COMMITS:
            self._checkpoint_wanted.set()

    # --- reads -----------------------------------------------------------------------

    def job(self, commit: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE commit_id = ?", (commit,)).fetchone()
        return _job(row) if row else None

    def jobs_starting_with(self, prefix: str) -> list[Job]:
        """The jobs whose commit id starts with ``prefix`` (lower-case hex digits):
        none, the one, or two when it is ambiguous (how many more does not matter).

        A range on the commit id's unique index, from the prefix up to the prefix with
        its last character raised by one (every id that starts with the prefix sorts in
        between, and nothing else does): it reads at most three index entries however
        long the history is. Only full ids count: a job queued under an abbreviated id
        before those were refused names no commit of its own.
        """
        upper_bound = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE commit_id >= ? AND commit_id < ? AND length(commit_id) IN (40, 64)"
                " ORDER BY commit_id LIMIT 2",
                (prefix, upper_bound),
            ).fetchall()
        return [_job(row) for row in rows]

    def attempt(self, attempt_id: int) -> Attempt | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        return _attempt(row) if row else None

    def queued(self, limit: int) -> list[str]:
        """Up to ``limit`` queued commits, oldest first."""
        return [job.commit for job in self.queued_jobs(limit)]

    def queued_jobs(self, limit: int, offered: frozenset[str] | None = None, order: str = "fifo") -> list[Job]:
        """Up to ``limit`` queued jobs in ``order`` (QUEUE_ORDERS; oldest first by
        default), the commits bisections need (culprit.py) in their order ahead of the
        plain queue: after the tips in tip order, first in fifo order; with ``offered``, only those that require nothing or one of these
        (the jobs some runner can take). Each part of the order is a range of a
        partial index, read no further than ``limit`` rows."""
        condition, values = "", []
        if offered is not None:
            condition = " AND (requires IS NULL OR requires IN (%s))" % ",".join("?" * len(offered))
            values = sorted(offered)
        bisect = "WHERE state = 'queued' AND bisect IS NOT NULL%s ORDER BY bisect, seq"
        if order == "fifo":
            parts = [bisect, "WHERE state = 'queued' AND bisect IS NULL%s ORDER BY seq"]
        elif order == "tip":
            parts = ["WHERE state = 'queued' AND tip_since IS NOT NULL%s ORDER BY tip_since", bisect,
                     "WHERE state = 'queued' AND tip_since IS NULL AND bisect IS NULL%s ORDER BY last_seen DESC"]
        else:
            raise ValueError("unknown queue order %r (want one of %s)" % (order, ", ".join(QUEUE_ORDERS)))
        rows: list[sqlite3.Row] = []
        seen: set[str] = set()
        with self._lock:
            for part in parts:
                if len(rows) < limit:
                    # A tip that a bisection of another branch needs is read twice: once.
                    found = self._db.execute("SELECT * FROM jobs " + part % condition + " LIMIT ?",
                                             (*values, limit - len(rows))).fetchall()
                    rows += [row for row in found if row["commit_id"] not in seen]
                    seen.update(row["commit_id"] for row in found)
        return [_job(row) for row in rows]

    def branches_of(self, commit: str) -> list[str]:
        """The named branches ``commit`` came on, in the order it came on them."""
        with self._lock:
            rows = self._db.execute("SELECT branch FROM branch_commits WHERE commit_id = ? AND branch != ? ORDER BY seq",
                                    (commit, UNNAMED_BRANCH)).fetchall()
        return [row["branch"] for row in rows]

    def branch_states(self, limit: int) -> list[BranchState]:
        """The state of up to ``limit`` named branches, the most recently changed first.

        Each walks its branch's commits from the newest (``branch_history`` index) to
        the first whose verdict maps to another state, passing over commits without a
        verdict or with one that says nothing (states.BRANCH_STATE_OF_VERDICT), and at
        most BRANCH_WALK_ROWS of them.
        """
        states = []
        with self._lock:
            branches = self._db.execute("SELECT name, tip FROM branches WHERE name != ? ORDER BY updated DESC LIMIT ?",
                                        (UNNAMED_BRANCH, limit)).fetchall()
            for branch in branches:
                state = since = newest = None
                cursor = self._db.execute(
                    "SELECT b.commit_id, j.state FROM branch_commits b JOIN jobs j ON j.commit_id = b.commit_id"
                    " WHERE b.branch = ? ORDER BY b.seq DESC LIMIT ?", (branch["name"], BRANCH_WALK_ROWS))
                try:
                    for commit, job_state in cursor:
                        verdict = BRANCH_STATE_OF_VERDICT.get(JobState(job_state))
                        if verdict is None:
                            continue
                        if state is None:
                            state, newest = verdict, commit
                        elif verdict != state:
                            break
                        since = commit
                finally:
                    cursor.close()
                tip = self._db.execute("SELECT state FROM jobs WHERE commit_id = ?", (branch["tip"],)).fetchone()
                states.append(BranchState(branch["name"], state or BRANCH_PENDING, since, newest, branch["tip"],
                                          JobState(tip["state"]) if tip else None))
        return states

    def running(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()
        return [_job(row) for row in rows]

    def recent_summaries(self, limit: int) -> list[dict]:
        """The JSON summaries of the ``limit`` most recently finished jobs, newest first.

        Reads through the ``finished_jobs`` index: the cost depends on ``limit``,
        not on the length of the history. A summary that is not a JSON object is
        left out (none should be).
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT summary FROM jobs WHERE summary IS NOT NULL ORDER BY finished_at DESC LIMIT ?", (limit,)
            ).fetchall()
        summaries = []
        for row in rows:
            try:
                summary = json.loads(row["summary"])
            except ValueError:
                continue
            if isinstance(summary, dict):
                summaries.append(summary)
        return summaries

    def run_durations(self, bounds: tuple[float, ...]) -> tuple[list[int], int, float, int]:
        """For /metrics (metrics.py): of the runs whose verdict was written, how many had a
        test duration (``duration_s``) at most each of ``bounds``, how many had one, the sum
        of those durations, and how many runs there are in all. One pass over the runs
        table: its cost grows with the history, a few ms per 10,000 runs, once per scrape."""
        below = ", ".join("TOTAL(d <= ?)" for _ in bounds)
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COUNT(d), TOTAL(d)%s FROM (SELECT json_extract(summary, '$.duration_s') AS d "
                "FROM runs WHERE summary IS NOT NULL)" % (", " + below if bounds else ""), bounds).fetchone()
        return [int(value) for value in tuple(row)[3:]], int(row[1]), float(row[2]), int(row[0])

    def abbreviated_queued(self) -> list[str]:
        """Queued jobs whose commit id is not a full id (40 or 64 digits): dispatched
        before abbreviated ids were refused. Read through the queue's own index."""
        with self._lock:
            rows = self._db.execute(
                "SELECT commit_id FROM jobs WHERE state = 'queued' AND length(commit_id) NOT IN (40, 64) ORDER BY seq"
            ).fetchall()
        return [row["commit_id"] for row in rows]

    def count(self, state: JobState) -> int:
        """Jobs in ``state``, from counters kept by the transactions: constant time."""
        with self._lock:
            return self._counts[JobState(state).value]

    def attempt_counts(self, commit: str, round_: int | None = None) -> tuple[int, int]:
        """Of the job's latest run: (attempts that reached a runner -- in its round
        ``round_`` alone, when given --, attempts that the infrastructure failed, in
        all its rounds: the attempt limit is per run)."""
        started = [o.value for o in Outcome if o.started]
        failures = [o.value for o in Outcome if o.infra_failure]
        with self._lock:
            row = self._db.execute(
                "SELECT"
                " SUM((outcome IS NULL OR outcome IN (%s)) AND (? IS NULL OR round = ?)),"
                " SUM(outcome IN (%s))"
                " FROM attempts WHERE commit_id = ? AND run = (SELECT run FROM jobs WHERE commit_id = ?)"
                % (",".join("?" * len(started)), ",".join("?" * len(failures))),
                (*started, round_, round_, *failures, commit, commit),
            ).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def rounds(self, commit: str, run: int) -> list[Round]:
        """The ended rounds of ``commit``'s run ``run`` (in progress), the first first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds WHERE commit_id = ? AND run = ? ORDER BY round",
                                    (commit, run)).fetchall()
        return [Round(row["round"], json.loads(row["summary"]), row["log"] or b"", row["junit"]) for row in rows]

    def round_summaries(self, commit: str, run: int) -> list[dict]:
        """The summaries alone of ``rounds``: what decides the next round, without the output."""
        with self._lock:
            rows = self._db.execute("SELECT summary FROM rounds WHERE commit_id = ? AND run = ? ORDER BY round",
                                    (commit, run)).fetchall()
        return [json.loads(row["summary"]) for row in rows]

    def flakiest(self, window: int, limit: int) -> tuple[int, list[dict]]:
        """The tests flaky most often in the newest ``window`` runs that ran the tests
        (verdict passed, failed or flaky): (how many such runs there are, up to ``limit``
        tests, each with ``test``, ``flaky`` -- in how many of those runs it was --,
        and its newest ``commit``, ``run``, ``outcomes`` and ``finished_at``), most
        often first. Read through the runs' and flaky tests' time indexes."""
        judged = (JobState.PASSED.value, JobState.FAILED.value, JobState.FLAKY.value)
        recent = ("SELECT commit_id, run FROM runs WHERE status IN (?, ?, ?) ORDER BY finished_at DESC LIMIT ?")
        with self._lock:
            runs = self._db.execute("SELECT COUNT(*) FROM (%s)" % recent, (*judged, window)).fetchone()[0]
            rows = self._db.execute(
                "SELECT f.test, COUNT(*) AS flaky, MAX(f.finished_at) AS finished_at, f.commit_id, f.run, f.outcomes"
                " FROM flaky_tests f JOIN (%s) r ON f.commit_id = r.commit_id AND f.run = r.run"
                " GROUP BY f.test ORDER BY flaky DESC, finished_at DESC, f.test LIMIT ?" % recent,
                (*judged, window, limit),
            ).fetchall()
        return runs, [{"test": row["test"], "flaky": row["flaky"], "commit": row["commit_id"], "run": row["run"],
                       "outcomes": json.loads(row["outcomes"]), "finished_at": row["finished_at"]} for row in rows]

    def runs(self, commit: str) -> list[Run]:
        """How each run of ``commit`` that has ended ended, the first first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM runs WHERE commit_id = ? ORDER BY run", (commit,)).fetchall()
        return [Run(row["commit_id"], row["run"], JobState(row["status"]), row["finished_at"], row["summary"])
                for row in rows]

    # --- writes ----------------------------------------------------------------------

    def enqueue(self, commit: str, now: float) -> tuple[bool, JobState]:
        """Queue ``commit`` unless it is known, on no named branch. Returns (newly
        queued, its state)."""
        done = self.report(commit, now)
        return done.new, done.state

    def report(self, commit: str, now: float, branch: str | None = None, tip: str | None = None,
               coalesce: bool = False) -> Enqueued:
        """``commit`` came on ``branch`` (None: the unnamed branch): queue it unless it is
        known, and record the branch. ``tip``, when given, is the branch's newest commit,
        which the reporter sends with each commit of a round, oldest first: it is queued
        now too, ahead of them in tip order, instead of after them all. Without ``tip``,
        a commit new to the branch is its newest. With ``coalesce``, a commit that is
        queued, never tried and no branch's tip (this one or the tip it replaces) is
        ``skipped`` instead (culprit.py)."""
        name = branch or UNNAMED_BRANCH
        with self.transaction() as db:
            before = coalesce and db.execute("SELECT tip FROM branches WHERE name = ?", (name,)).fetchone()
            new = self._insert_job(db, commit, now)
            joined = self._join_branch(db, name, commit)
            tip_queued = caught_up = False
            if tip is not None and tip != commit:
                tip_queued = self._insert_job(db, tip, now)
                self._join_branch(db, name, tip, ahead=True)
            elif tip == commit and not joined:
                # The tip's own report, at the end of its round: recorded with the
                # round's first commit, it moves after the commits older than it.
                caught_up = bool(db.execute("DELETE FROM branch_commits WHERE branch = ? AND commit_id = ? AND ahead = 1",
                                            (name, commit)).rowcount)
                if caught_up:
                    self._join_branch(db, name, commit)
            newest = tip if tip is not None else commit if joined else None
            if newest is not None:
                self._set_tip(db, name, newest)
            if coalesce:
                for other in {commit, before["tip"] if before else commit}:
                    self._skip_if_unneeded(db, other)
            state = JobState.QUEUED if new else JobState(
                db.execute("SELECT state FROM jobs WHERE commit_id = ?", (commit,)).fetchone()["state"])
        return Enqueued(new, state, tip_queued, caught_up)

    # --- culprit finding (culprit.py) -----------------------------------------------

    def known_first_failing(self, commit: str) -> str | None:
        """The first failing commit, if it is known already, of the branches of
        ``commit`` if ``commit`` fails: what its result names when it is written."""
        with self._lock:
            for branch in self._culprit_branches(self._db, commit):
                stretch = self._back_to_pass(self._db, branch, commit)
                if stretch is not None:
                    found = culprit.plan(stretch + [(commit, JobState.FAILED)], False).first_failing
                    if found is not None:
                        return found
        return None

    def culprit_step(self, commit: str, coalesce: bool = False) -> list[str]:
        """After ``commit``'s verdict: on each branch it came on, plan the stretch of
        history around it (culprit.plan) and apply the plan: rank the commits to test
        (``jobs.bisect``; in coalesce mode a skipped one is queued again, and one no
        longer needed skipped again), or record the first failing commit on every
        failed commit of the stretch, in its summary too. Returns the commits whose
        result files must be told (their ``first_failing_pending`` is set, so that a
        crash before they are leaves the job to start-up: first_failing_pending())."""
        rewrite: list[str] = []
        with self.transaction() as db:
            for branch in self._culprit_branches(db, commit):
                state = JobState(db.execute("SELECT state FROM jobs WHERE commit_id = ?", (commit,)).fetchone()[0])
                back = self._back_to_pass(db, branch, commit)
                if back is None:
                    continue
                forward = self._forward_to_pass(db, branch, commit)
                # A pass splits the history: what was one stretch is two now.
                windows = [back, forward] if state is JobState.PASSED else [back + [(commit, state)] + forward]
                for window in windows:
                    rewrite += self._apply_plan(db, window, coalesce)
        return rewrite

    def _apply_plan(self, db: sqlite3.Connection, window: list[tuple[str, JobState]], coalesce: bool) -> list[str]:
        """Apply culprit.plan to a stretch of a branch's history (culprit_step)."""
        rewrite = []
        found = culprit.plan(window, coalesce)
        ranks = {probe: rank for rank, probe in enumerate(found.probes)}
        for other, other_state in window:
            if other in ranks:
                db.execute("UPDATE jobs SET bisect = ? WHERE commit_id = ?", (ranks[other], other))
                if other_state is JobState.SKIPPED:
                    self._move(db, other, JobState.QUEUED)
                continue
            if other_state in culprit.UNDECIDED:
                db.execute("UPDATE jobs SET bisect = NULL WHERE commit_id = ? AND bisect IS NOT NULL", (other,))
                if coalesce:
                    self._skip_if_unneeded(db, other)
            elif other_state is JobState.FAILED and found.first_failing is not None:
                if self._name_first_failing(db, other, found.first_failing):
                    rewrite.append(other)
        return rewrite

    def first_failing_pending(self) -> list[str]:
        """Failed commits whose result files do not name their first failing commit yet."""
        with self._lock:
            rows = self._db.execute("SELECT commit_id FROM jobs WHERE first_failing_pending IS NOT NULL ORDER BY seq")
            return [row[0] for row in rows.fetchall()]

    def first_failing_written(self, commit: str, first_failing: str | None) -> None:
        """``commit``'s result files name ``first_failing``: done, unless it changed meanwhile."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET first_failing_pending = NULL WHERE commit_id = ? AND first_failing IS ?",
                       (commit, first_failing))

    @staticmethod
    def _culprit_branches(db: sqlite3.Connection, commit: str) -> list[str]:
        """The branches ``commit`` has its place on (not a tip recorded ahead of its round)."""
        rows = db.execute("SELECT branch FROM branch_commits WHERE commit_id = ? AND ahead = 0 ORDER BY seq", (commit,))
        return [row[0] for row in rows.fetchall()]

    @staticmethod
    def _back_to_pass(db: sqlite3.Connection, branch: str, commit: str) -> list[tuple[str, JobState]] | None:
        """The commits of ``branch`` before ``commit`` and after its newest pass, oldest
        first (at most BRANCH_WALK_ROWS); None when ``commit`` is not in place on it."""
        row = db.execute("SELECT seq FROM branch_commits WHERE branch = ? AND commit_id = ? AND ahead = 0",
                         (branch, commit)).fetchone()
        if row is None:
            return None
        cursor = db.execute("SELECT b.commit_id, j.state FROM branch_commits b JOIN jobs j ON j.commit_id = b.commit_id"
                            " WHERE b.branch = ? AND b.seq < ? AND b.ahead = 0 ORDER BY b.seq DESC LIMIT ?",
                            (branch, row[0], BRANCH_WALK_ROWS))
        return JobStore._until_pass(cursor)[::-1]

    @staticmethod
    def _forward_to_pass(db: sqlite3.Connection, branch: str, commit: str) -> list[tuple[str, JobState]]:
        """The commits of ``branch`` after ``commit`` and before its next pass, oldest first."""
        cursor = db.execute("SELECT b.commit_id, j.state FROM branch_commits b JOIN jobs j ON j.commit_id = b.commit_id"
                            " WHERE b.branch = ? AND b.ahead = 0 AND b.seq >"
                            " (SELECT seq FROM branch_commits WHERE branch = ? AND commit_id = ?)"
                            " ORDER BY b.seq LIMIT ?", (branch, branch, commit, BRANCH_WALK_ROWS))
        return JobStore._until_pass(cursor)

    @staticmethod
    def _until_pass(cursor: sqlite3.Cursor) -> list[tuple[str, JobState]]:
        """The (commit, state) rows of ``cursor``, in its order, up to the first commit
        that passed (left out); the cursor is closed."""
        found = []
        try:
            for other, state in cursor:
                if state == JobState.PASSED.value:
                    break
                found.append((other, JobState(state)))
        finally:
            cursor.close()
        return found

    @staticmethod
    def _name_first_failing(db: sqlite3.Connection, commit: str, first_failing: str) -> bool:
        """Record ``first_failing`` on the failed ``commit`` and in its summary (and its
        run's); True if its files do not say so yet (first_failing_pending set)."""
        row = db.execute("SELECT summary, first_failing FROM jobs WHERE commit_id = ?", (commit,)).fetchone()
        try:
            summary = json.loads(row["summary"] or "null")
        except ValueError:
            summary = None
        if not isinstance(summary, dict):
            return False
        written = summary.get("first_failing") == first_failing
        if row["first_failing"] == first_failing and written:
            return False
        summary["first_failing"] = first_failing
        text = json.dumps(summary)
        db.execute("UPDATE jobs SET first_failing = ?, summary = ?, first_failing_pending = ? WHERE commit_id = ?",
                   (first_failing, text, None if written else 1, commit))
        db.execute("UPDATE runs SET summary = ? WHERE commit_id = ? AND run = (SELECT run FROM jobs WHERE commit_id = ?)",
                   (text, commit, commit))
        return not written

    def _skip_if_unneeded(self, db: sqlite3.Connection, commit: str) -> None:
        """--coalesce: a queued commit never tried, that is no branch's tip and that no
        bisection needs, is skipped."""
        row = db.execute("SELECT state FROM jobs WHERE commit_id = ? AND state = 'queued' AND tip_since IS NULL"
                         " AND bisect IS NULL AND current_attempt IS NULL AND run = 1 AND round = 0",
                         (commit,)).fetchone()
        if row is not None:
            self._move(db, commit, JobState.SKIPPED)

    def assign(self, commit: str, runner: str, now: float) -> int:
        """Move a queued job to running on ``runner``; returns the new attempt id."""
        with self.transaction() as db:
            self._move(db, commit, JobState.RUNNING)
            attempt_id = db.execute(
                "INSERT INTO attempts (commit_id, runner, assigned_at, run, round)"
                " SELECT ?, ?, ?, run, round FROM jobs WHERE commit_id = ?", (commit, runner, now, commit)
            ).lastrowid
            db.execute(
                "UPDATE jobs SET current_attempt = ?, runner = ?, started_at = ? WHERE commit_id = ?",
                (attempt_id, runner, now, commit),
            )
            if self._status_channels:
                run = db.execute("SELECT run FROM jobs WHERE commit_id = ?", (commit,)).fetchone()[0]
                # Once per run: a second attempt (or round) finds the row there already.
                self._add_notifications(db, self._status_channels, notices.status_subject(commit, run, notices.PENDING),
                                        notices.status_document(commit, run, notices.PENDING, None), now)
            return attempt_id

    def adopt(self, commit: str, attempt_id: int, runner: str) -> bool:
        """A runner reports it is still running ``attempt_id``, which was requeued (for
        instance by a dispatcher restart). If nothing else has happened to the job
        since, put it back to running on that attempt instead of running it twice."""
        with self.transaction() as db:
            row = db.execute("SELECT state, current_attempt FROM jobs WHERE commit_id = ?", (commit,)).fetchone()
            shard = db.execute("SELECT shard FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
            if row is not None and shard is not None and shard["shard"] is not None:
                return self._adopt_shard(db, commit, attempt_id, runner, JobState(row["state"]))
            if row is None or row["state"] != JobState.QUEUED.value or row["current_attempt"] != attempt_id:
                return False
            outcome = db.execute("SELECT outcome FROM attempts WHERE id = ?", (attempt_id,)).fetchone()["outcome"]
            if outcome not in ADOPTABLE:
                # The runner itself ended it (an error, a hand-back): a "busy" heard
                # before its result arrived is old news, not a job still running.
                return False
            self._move(db, commit, JobState.RUNNING)
            db.execute("UPDATE jobs SET runner = ? WHERE commit_id = ?", (runner, commit))
            db.execute("UPDATE attempts SET ended_at = NULL, outcome = NULL WHERE id = ?", (attempt_id,))
            return True

    def _adopt_shard(self, db: sqlite3.Connection, commit: str, attempt_id: int, runner: str, state: JobState) -> bool:
        """adopt, for an attempt at a shard: its shard must be waiting, without a result."""
        attempt = db.execute("SELECT a.outcome, s.shard FROM attempts a JOIN shards s ON s.commit_id = a.commit_id"
                             " AND s.run = a.run AND s.shard = a.shard JOIN jobs j ON j.commit_id = a.commit_id"
                             " AND j.run = a.run AND j.round = a.round"
                             " WHERE a.id = ? AND s.attempt IS NULL AND s.summary IS NULL", (attempt_id,)).fetchone()
        if attempt is None or attempt["outcome"] not in ADOPTABLE or state not in (JobState.QUEUED, JobState.RUNNING):
            return False
        if state is JobState.QUEUED:
            self._move(db, commit, JobState.RUNNING)
        db.execute("UPDATE shards SET attempt = ? WHERE commit_id = ? AND shard = ? AND summary IS NULL",
                   (attempt_id, commit, attempt["shard"]))
        db.execute("UPDATE jobs SET runner = ? WHERE commit_id = ?", (runner, commit))
        db.execute("UPDATE attempts SET ended_at = NULL, outcome = NULL WHERE id = ?", (attempt_id,))
        return True

    # --- shards (sharding.py) ---------------------------------------------------------

    def durations(self) -> dict[str, float]:
        """Seconds per test file, as the newest run of each took (at most MAX_DURATION_FILES)."""
        with self._lock:
            rows = self._db.execute("SELECT path, seconds FROM test_durations").fetchall()
        return {row["path"]: row["seconds"] for row in rows}

    def learn_durations(self, durations: dict[str, float], now: float) -> None:
        """Keep the durations a run measured (checked by sharding.decode_durations),
        dropping the least recently run files past MAX_DURATION_FILES."""
        if not durations:
            return
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO test_durations (path, seconds, updated) VALUES (?, ?, ?)",
                           [(path, seconds, now) for path, seconds in durations.items()])
            db.execute("DELETE FROM test_durations WHERE path IN (SELECT path FROM test_durations"
                       " ORDER BY updated DESC LIMIT -1 OFFSET ?)", (MAX_DURATION_FILES,))

    def split(self, commit: str, shards: int, plan: bytes) -> None:
        """Split the queued first round of ``commit``'s run in ``shards`` shards, each
        waiting for a runner, with ``plan`` (sharding.encode_plan)."""
        with self.transaction() as db:
            row = db.execute("SELECT state, run, round, shards FROM jobs WHERE commit_id = ?", (commit,)).fetchone()
            if row is None or row["state"] != JobState.QUEUED.value or row["round"] != 0 or row["shards"]:
                raise InvalidTransition("job %s cannot be split now" % commit)
            db.executemany("INSERT OR REPLACE INTO shards (commit_id, run, shard, shards, plan) VALUES (?, ?, ?, ?, ?)",
                           [(commit, row["run"], shard, shards, plan.decode("ascii")) for shard in range(1, shards + 1)])
            db.execute("UPDATE jobs SET shards = ? WHERE commit_id = ?", (shards, commit))

    def waiting_shards(self, limit: int) -> list[tuple[Job, int]]:
        """Up to ``limit`` shards waiting for a runner, each with its job: the oldest job first."""
        with self._lock:
            # CROSS JOIN: the few shards of the runs in progress first (SQLite's planner
            # would otherwise walk every job in seq order to spare the sort).
            rows = self._db.execute(
                "SELECT j.*, s.shard AS waiting FROM shards s CROSS JOIN jobs j ON j.commit_id = s.commit_id AND j.run = s.run"
                " WHERE s.attempt IS NULL AND s.summary IS NULL AND j.round = 0 AND j.state IN ('queued', 'running')"
                " ORDER BY j.seq, s.shard LIMIT ?", (limit,)).fetchall()
        return [(_job(row), row["waiting"]) for row in rows]

    def assign_shard(self, commit: str, shard: int, runner: str, now: float) -> int:
        """Give a waiting shard of ``commit``'s run to ``runner`` (its job running, if it
        was queued); returns the new attempt id."""
        with self.transaction() as db:
            if db.execute("SELECT state FROM jobs WHERE commit_id = ?", (commit,)).fetchone()["state"] == "queued":
                self._move(db, commit, JobState.RUNNING)
                db.execute("UPDATE jobs SET started_at = ? WHERE commit_id = ?", (now, commit))
            attempt_id = db.execute(
                "INSERT INTO attempts (commit_id, runner, assigned_at, run, round, shard)"
                " SELECT ?, ?, ?, run, round, ? FROM jobs WHERE commit_id = ?", (commit, runner, now, shard, commit)
            ).lastrowid
            updated = db.execute("UPDATE shards SET attempt = ? WHERE commit_id = ? AND shard = ? AND attempt IS NULL"
                                 " AND summary IS NULL AND run = (SELECT run FROM jobs WHERE commit_id = ?)",
                                 (attempt_id, commit, shard, commit)).rowcount
            if not updated:
                raise InvalidTransition("shard %d of job %s is not waiting" % (shard, commit))
            db.execute("UPDATE jobs SET current_attempt = ?, runner = ? WHERE commit_id = ?", (attempt_id, runner, commit))
            return attempt_id

    def shards_of(self, commit: str, run: int) -> list[Shard]:
        """The shards of ``commit``'s run ``run`` (in progress), the first first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM shards WHERE commit_id = ? AND run = ? ORDER BY shard",
                                    (commit, run)).fetchall()
        return [_shard(row) for row in rows]

    def requeue_shard(self, attempt_id: int, outcome: Outcome, now: float, requires: str | None = None) -> bool:
        """End an attempt at a shard without a result: the shard waits for a runner
        again (the job goes back to the queue when no other shard of it is out).
        False if the attempt was not the shard's own."""
        with self.transaction() as db:
            self._end_attempt(db, attempt_id, outcome, now)
            waiting = db.execute("UPDATE shards SET attempt = NULL WHERE attempt = ? AND summary IS NULL",
                                 (attempt_id,)).rowcount
            commit = db.execute("SELECT commit_id FROM attempts WHERE id = ?", (attempt_id,)).fetchone()[0]
            if waiting and requires is not None:
                db.execute("UPDATE jobs SET requires = ? WHERE commit_id = ?", (requires, commit))
            out = db.execute("SELECT 1 FROM shards s JOIN jobs j ON j.commit_id = s.commit_id AND j.run = s.run"
                             " WHERE s.commit_id = ? AND s.attempt IS NOT NULL", (commit,)).fetchone()
            state = db.execute("SELECT state FROM jobs WHERE commit_id = ?", (commit,)).fetchone()["state"]
            if waiting and out is None and state == JobState.RUNNING.value:
                self._move(db, commit, JobState.QUEUED)  # nothing of it out: queued, as ci-ctl queue shows it
            return bool(waiting)

    def keep_shard(self, attempt_id: int, summary: dict, log: bytes, junit: bytes | None,
                   now: float) -> tuple[bool, int | None]:
        """Keep the verdict of an attempt at a shard of the run in progress, unless that
        shard has one already: (kept, the attempt out on the same shard that it
        supersedes, if any). A late verdict of an attempt the shard was taken back
        from counts, as a job's does: the shard's test files ran at the same commit."""
        with self.transaction() as db:
            row = db.execute("SELECT s.attempt FROM attempts a JOIN shards s ON s.commit_id = a.commit_id"
                             " AND s.run = a.run AND s.shard = a.shard WHERE a.id = ? AND s.summary IS NULL",
                             (attempt_id,)).fetchone()
            if row is None:
                self._end_attempt(db, attempt_id, Outcome.SUPERSEDED, now)
                return False, None
            db.execute("UPDATE shards SET summary = ?, log = ?, junit = ?, attempt = NULL"
                       " WHERE (commit_id, run, shard) = (SELECT commit_id, run, shard FROM attempts WHERE id = ?)",
                       (json.dumps(summary), log, junit, attempt_id))
            self._end_attempt(db, attempt_id, Outcome(summary["status"]), now)
            other = row["attempt"] if row["attempt"] != attempt_id else None
            if other is not None:
                self._end_attempt(db, other, Outcome.SUPERSEDED, now)
            return True, other

    def requeue(self, commit: str, attempt_id: int, outcome: Outcome, now: float, requires: str | None = None) -> None:
        """End a running attempt without a verdict and put its job back in the queue;
        with ``requires``, only for a runner that has it."""
        with self.transaction() as db:
            self._end_attempt(db, attempt_id, outcome, now)
            self._move(db, commit, JobState.QUEUED)
            if requires is not None:
                db.execute("UPDATE jobs SET requires = ? WHERE commit_id = ?", (requires, commit))

    def keep_round(self, commit: str, run: int, round_: int, summary: str, log: bytes, junit: bytes | None) -> None:
        """Keep an ended round of a run in progress (again: the same round kept twice,
        when its result was sent again, is the same)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO rounds (commit_id, run, round, summary, log, junit)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (commit, run, round_, summary, log, junit))

    def next_round(self, commit: str, attempt_id: int, round_: int, tests: tuple[str, ...] | None,
                   now: float) -> None:
        """The round of ``attempt_id`` (kept with keep_round) ended with failing tests:
        the job goes back to the queue for round ``round_``, to run ``tests`` again (None:
        the whole test command). Any other attempt still out is superseded."""
        with self.transaction() as db:
            self._end_attempt(db, attempt_id, Outcome.FAILED, now)
            db.execute("UPDATE attempts SET ended_at = ?, outcome = ? WHERE commit_id = ? AND outcome IS NULL",
                       (now, Outcome.SUPERSEDED.value, commit))
            if db.execute("SELECT state FROM jobs WHERE commit_id = ?", (commit,)).fetchone()["state"] != "queued":
                self._move(db, commit, JobState.QUEUED)
            db.execute("UPDATE jobs SET round = ?, retest = ? WHERE commit_id = ?",
                       (round_, None if tests is None else json.dumps(list(tests)), commit))

    def end_attempt(self, attempt_id: int, outcome: Outcome, now: float) -> None:
        """Record how an attempt ended when its job does not move (late answers)."""
        with self.transaction() as db:
            self._end_attempt(db, attempt_id, outcome, now)

    def finish(
        self,
        commit: str,
        attempt_id: int | None,
        state: JobState,
        outcome: Outcome,
        reason: str | None,
        summary: str | None,
        now: float,
        flaky: Iterable[tuple[str, list[str]]] = (),
        failing: Iterable[str] | None = None,
    ) -> None:
        """Settle a job for good. The attempt that settled it ends with ``outcome`` and
        becomes the job's own (a late verdict from an earlier attempt is that
        attempt's, on its runner); any other attempt still out is marked superseded.
        ``summary`` is None only for a job that gets no result at all (one retired on
        start-up). ``flaky``: the run's flaky tests, with how each ended in each
        round, kept for good; the run's rounds, now in its result files, are dropped.
        The same transaction notices what the verdict changes (_notice): a branch's
        state, the commit's status, with a notification per channel that wants it;
        ``failing``: the tests that failed, which a notification names."""
        assert state.final
        with self.transaction() as db:
            self._move(db, commit, state)
            if attempt_id is not None:
                self._end_attempt(db, attempt_id, outcome, now)
                db.execute(
                    "UPDATE jobs SET current_attempt = ?,"
                    " runner = (SELECT runner FROM attempts WHERE id = ?),"
                    " started_at = (SELECT assigned_at FROM attempts WHERE id = ?) WHERE commit_id = ?",
                    (attempt_id, attempt_id, attempt_id, commit),
                )
            others = Outcome.CANCELLED if state is JobState.CANCELLED else Outcome.SUPERSEDED
            db.execute(
                "UPDATE attempts SET ended_at = ?, outcome = ? WHERE commit_id = ? AND outcome IS NULL",
                (now, others.value, commit),
            )
            try:
                named = json.loads(summary).get("first_failing") if summary else None
            except (ValueError, AttributeError):
                named = None
            db.execute(
                "UPDATE jobs SET finished_at = ?, reason = ?, summary = ?, first_failing = ?, first_failing_pending = NULL"
                " WHERE commit_id = ?",
                (now, reason, summary, named, commit),
            )
            if summary is not None:
                db.execute("INSERT OR REPLACE INTO runs (commit_id, run, status, finished_at, summary)"
                           " SELECT commit_id, run, state, ?, summary FROM jobs WHERE commit_id = ?", (now, commit))
            db.executemany("INSERT OR REPLACE INTO flaky_tests (commit_id, run, test, outcomes, finished_at)"
                           " SELECT commit_id, run, ?, ?, ? FROM jobs WHERE commit_id = ?",
                           [(test, json.dumps(outcomes), now, commit) for test, outcomes in flaky])
            db.execute("DELETE FROM rounds WHERE commit_id = ?", (commit,))
            db.execute("DELETE FROM shards WHERE commit_id = ?", (commit,))
            if summary is not None:
                self._notice(db, commit, state, summary, failing, now)

    def rerun(self, commit: str, now: float) -> int:
        """Queue a job that has a verdict again, as its next run (its verdict stays the
        current one until that run has one); returns the run's number."""
        with self.transaction() as db:
            self._move(db, commit, JobState.QUEUED)
            db.execute("UPDATE jobs SET run = run + 1, queued_at = ?, requires = NULL, round = 0, retest = NULL,"
                       " bisect = NULL, shards = NULL"
                       " WHERE commit_id = ?", (now, commit))
            return db.execute("SELECT run FROM jobs WHERE commit_id = ?", (commit,)).fetchone()["run"]

    def cancel_rerun(self, commit: str, now: float) -> JobState:
        """Cancel the queued or running rerun of a job that has a verdict: the job goes
        back to that verdict, the run is recorded as cancelled, and any attempt of it
        still out ends so. Returns the verdict it is back to."""
        with self.transaction() as db:
            row = db.execute("SELECT summary, run FROM jobs WHERE commit_id = ?", (commit,)).fetchone()
            verdict = JobState(json.loads(row["summary"])["status"])
            self._move(db, commit, verdict)
            db.execute("UPDATE attempts SET ended_at = ?, outcome = ? WHERE commit_id = ? AND outcome IS NULL",
                       (now, Outcome.CANCELLED.value, commit))
            db.execute("INSERT OR REPLACE INTO runs (commit_id, run, status, finished_at, summary) VALUES (?, ?, ?, ?, NULL)",
                       (commit, row["run"], JobState.CANCELLED.value, now))
            db.execute("DELETE FROM rounds WHERE commit_id = ?", (commit,))
            db.execute("DELETE FROM shards WHERE commit_id = ?", (commit,))
            return verdict

    def recover(self, now: float) -> int:
        """After a restart: every running job goes back to the queue. Returns how many."""
        with self.transaction() as db:
            db.execute(
                "UPDATE attempts SET ended_at = ?, outcome = ? WHERE outcome IS NULL",
                (now, Outcome.INTERRUPTED.value),
            )
            requeued = db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount
            db.execute("UPDATE shards SET attempt = NULL WHERE summary IS NULL")
            self._counted(JobState.RUNNING, JobState.QUEUED, requeued)
            return requeued

    def save_runner(self, name: str, host: str, port: int, now: float, offers: frozenset[str] = frozenset()) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO runners (name, host, port, registered_at, offers) VALUES (?, ?, ?, ?, ?)",
                (name, host, port, now, " ".join(sorted(offers))),
            )

    def forget_runner(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM runners WHERE name = ?", (name,))

    def runners(self) -> list[tuple[str, str, int, frozenset[str]]]:
        """(name, host, port, what it offers) of every runner registered and not dropped."""
        with self._lock:
            rows = self._db.execute("SELECT name, host, port, offers FROM runners ORDER BY registered_at").fetchall()
        return [(row["name"], row["host"], row["port"], frozenset((row["offers"] or "").split())) for row in rows]

    # --- notifications (notify.py sends them) -------------------------------------------

    def notify_to(self, branch_channels: Iterable[str], status_channels: Iterable[str]) -> None:
        """The channels that get a notification for each change of a branch's state
        (notices.is_news), and those that get each commit's status (pending when its
        run is first assigned, then its verdict). Set before the first verdict."""
        with self._lock:
            self._branch_channels = tuple(branch_channels)
            self._status_channels = tuple(status_channels)

    def next_notification(self, channel: str) -> Notification | None:
        """The oldest notification ``channel`` has still to send: a channel sends its
        notifications in order, so a receiver never sees a change before the one
        before it. Read through the partial index of the rows still to send."""
        with self._lock:
            row = self._db.execute("SELECT * FROM notifications WHERE channel = ? AND done_at IS NULL ORDER BY id LIMIT 1",
                                   (channel,)).fetchone()
        if row is None:
            return None
        return Notification(row["id"], row["delivery"], row["channel"], row["subject"], json.loads(row["document"]),
                            row["attempts"], row["next_at"], row["last_error"])

    def notification_delivered(self, notification_id: int, now: float) -> None:
        """Mark a notification delivered, and forget those done before the newest
        NOTIFICATIONS_KEPT: a range of the primary key, where only the few rows still
        to send stay below it, so the table stays as long as that however long the history."""
        with self.transaction() as db:
            db.execute("UPDATE notifications SET done_at = ?, outcome = 'delivered', attempts = attempts + 1"
                       " WHERE id = ? AND done_at IS NULL", (now, notification_id))
            db.execute("DELETE FROM notifications WHERE id <= (SELECT MAX(id) FROM notifications) - ?"
                       " AND done_at IS NOT NULL", (NOTIFICATIONS_KEPT,))

    def notification_failed(self, notification_id: int, error: str, next_at: float) -> int:
        """A try failed: kept, with the error, to be tried again at ``next_at``; returns
        how many tries it has had."""
        with self.transaction() as db:
            db.execute("UPDATE notifications SET attempts = attempts + 1, last_error = ?, next_at = ?"
                       " WHERE id = ? AND done_at IS NULL", (error[:NOTIFICATION_ERROR_CHARS], next_at, notification_id))
            row = db.execute("SELECT attempts FROM notifications WHERE id = ?", (notification_id,)).fetchone()
        return row[0] if row else 0

    def drop_notifications(self, keep: Iterable[str], now: float) -> dict[str, int]:
        """Give up the notifications still to send of every channel not in ``keep`` (one
        configured before a restart, not any more): by channel, how many."""
        keep = sorted(set(keep))
        with self.transaction() as db:
            rows = db.execute("SELECT channel, COUNT(*) FROM notifications WHERE done_at IS NULL"
                              " AND channel NOT IN (%s) GROUP BY channel" % ",".join("?" * len(keep)), keep).fetchall()
            db.execute("UPDATE notifications SET done_at = ?, outcome = 'dropped' WHERE done_at IS NULL"
                       " AND channel NOT IN (%s)" % ",".join("?" * len(keep)), (now, *keep))
        return {row[0]: row[1] for row in rows}

    def notifications_pending(self) -> int:
        """Notifications still to send, over every channel: a count of the partial
        index's rows, which holds those alone (cheap enough for every /metrics scrape)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM notifications WHERE done_at IS NULL").fetchone()[0]

    def notification_list(self, limit: int) -> tuple[int, list[dict]]:
        """What the outbox holds, for an operator: how many notifications are still to
        send, and up to ``limit`` rows, those still to send first (oldest first: the
        order they go in), then those done (the newest first). Each a dict of the
        table's columns, ``document`` parsed. The first read goes through the partial
        index of the rows still to send, the second down the primary key."""
        pending = self.notifications_pending()
        with self._lock:
            rows = self._db.execute("SELECT * FROM notifications WHERE done_at IS NULL ORDER BY id LIMIT ?",
                                    (limit,)).fetchall()
            if len(rows) < limit:
                rows += self._db.execute("SELECT * FROM notifications WHERE done_at IS NOT NULL ORDER BY id DESC"
                                         " LIMIT ?", (limit - len(rows),)).fetchall()
        return pending, [dict(row, document=json.loads(row["document"])) for row in rows]

    def _notice(self, db: sqlite3.Connection, commit: str, state: JobState, summary: str, failing: Iterable[str] | None,
                now: float) -> None:
        """Inside finish's transaction: note the change the verdict of ``commit`` makes to
        the state of each named branch it came on, and add a notification per channel
        for it if it is news (notices.is_news); and its status, for the status channels."""
        facts = _facts(summary)
        failing = notices.failing_tests(facts, failing)
        if self._status_channels:
            run = facts.get("run") or 1
            # A pending status not sent yet says nothing the verdict does not: superseded.
            for channel in self._status_channels:
                db.execute("UPDATE notifications SET done_at = ?, outcome = 'superseded' WHERE channel = ?"
                           " AND done_at IS NULL AND subject = ?",
                           (now, channel, notices.status_subject(commit, run, notices.PENDING)))
            self._add_notifications(db, self._status_channels, notices.status_subject(commit, run, state.value),
                                    notices.status_document(commit, run, state.value, facts), now)
        new = BRANCH_STATE_OF_VERDICT.get(state)
        if new is None:
            return  # error, cancelled: nothing said of a branch (the walk of branch_states passes over it)
        rows = db.execute("SELECT branch, seq, ahead FROM branch_commits WHERE commit_id = ? AND branch != ?"
                          " ORDER BY seq", (commit, UNNAMED_BRANCH)).fetchall()
        for branch, seq, ahead in rows:
            known = db.execute("SELECT * FROM branch_notices WHERE branch = ?", (branch,)).fetchone()
            if not ahead and self._judged_after(db, branch, seq, commit, known["judged"] if known else None):
                continue  # an older commit (a bisection's): the newer verdict makes the state
            old = known["state"] if known else BRANCH_PENDING
            if new == old:
                db.execute("UPDATE branch_notices SET judged = ? WHERE branch = ?", (commit, branch))
                continue
            changes = (known["changes"] if known else 0) + 1
            db.execute("INSERT OR REPLACE INTO branch_notices (branch, state, commit_id, changes, judged)"
                       " VALUES (?, ?, ?, ?, ?)", (branch, new, commit, changes, commit))
            if self._branch_channels and notices.is_news(old, new):
                self._add_notifications(db, self._branch_channels, notices.branch_subject(branch, changes),
                                        notices.branch_document(branch, old, new, commit, facts, failing), now)

    @staticmethod
    def _judged_after(db: sqlite3.Connection, branch: str, seq: int, commit: str, newest: str | None) -> bool:
        """Whether a commit newer than ``commit`` (at ``seq`` on ``branch``, in its place)
        has a verdict that says something of the branch (states.BRANCH_STATE_OF_VERDICT):
        the branch's state is then that commit's. Newer: after it on the branch, or
        recorded ahead of its round (report: a tip, newer than every commit of its round
        whatever their order of arrival). A commit whose rerun is queued or running keeps
        its verdict until the rerun has one: a rerun is no change and back.

        Three looks, the first that answers wins, each a lookup or two: the branch's
        tip (judged: the newest); ``newest``, the newest commit whose verdict was
        noticed before (branch_notices.judged), by where it is now (a tip's row moves
        when its round is reported); and only for a branch with neither (its first
        verdict, or a file from before notifications), the commits after ``seq``, read
        up to the first judged one (at most BRANCH_WALK_ROWS, about 0.3 us each)."""
        judged = [state.value for state in BRANCH_STATE_OF_VERDICT]
        verdict = ("CASE WHEN j.state IN ('queued', 'running') AND j.summary IS NOT NULL"
                   " THEN json_extract(j.summary, '$.status') ELSE j.state END")
        tip = db.execute("SELECT %s FROM branches t JOIN jobs j ON j.commit_id = t.tip WHERE t.name = ? AND t.tip != ?"
                         % verdict, (branch, commit)).fetchone()
        if tip is not None and tip[0] in judged:
            return True
        if newest is not None:
            where = db.execute("SELECT seq, ahead FROM branch_commits WHERE branch = ? AND commit_id = ?",
                               (branch, newest)).fetchone()
            if where is not None:
                return newest != commit and (bool(where["ahead"]) or where["seq"] > seq)
        row = db.execute(
            "SELECT 1 FROM (SELECT %s AS verdict FROM branch_commits b JOIN jobs j ON j.commit_id = b.commit_id"
            " WHERE b.branch = ? AND b.seq > ? ORDER BY b.seq DESC LIMIT ?)"
            " WHERE verdict IN (%s) LIMIT 1" % (verdict, ",".join("?" * len(judged))),
            (branch, seq, BRANCH_WALK_ROWS, *judged)
        ).fetchone()
        return row is not None

    @staticmethod
    def _add_notifications(db: sqlite3.Connection, channels: Iterable[str], subject: str, document: dict,
                           now: float) -> None:
        """One row per channel for ``subject``, unless the channel has it already; each
        with a delivery id of its own, kept for every try."""
        text = json.dumps(document)
        db.executemany("INSERT OR IGNORE INTO notifications (delivery, channel, subject, document, created_at, next_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       [(uuid.uuid4().hex, channel, subject, text, now, now) for channel in channels])

    # --- helpers ---------------------------------------------------------------------

    def _insert_job(self, db: sqlite3.Connection, commit: str, now: float) -> bool:
        inserted = db.execute("INSERT OR IGNORE INTO jobs (commit_id, state, queued_at) VALUES (?, 'queued', ?)",
                              (commit, now)).rowcount
        if inserted:
            self._counted(None, JobState.QUEUED)
        return bool(inserted)

    @staticmethod
    def _join_branch(db: sqlite3.Connection, branch: str, commit: str, ahead: bool = False) -> bool:
        """Record that ``commit`` came on ``branch`` (``ahead``: as the tip, before its
        own report) unless it is recorded; True if it was new to it. Its job (if any) is
        then among the newest of the queue."""
        cursor = db.execute("INSERT OR IGNORE INTO branch_commits (branch, commit_id, ahead) VALUES (?, ?, ?)",
                            (branch, commit, int(ahead)))
        if not cursor.rowcount:
            return False
        db.execute("UPDATE jobs SET last_seen = ? WHERE commit_id = ?", (cursor.lastrowid, commit))
        return True

    @staticmethod
    def _set_tip(db: sqlite3.Connection, branch: str, tip: str) -> None:
        """Make ``tip`` (recorded on ``branch``) the branch's newest commit: its job runs
        among the tips, and the tip before it, unless another branch's tip too, among
        the others (where its last_seen keeps it ahead of the commits before it)."""
        mark = db.execute("SELECT seq FROM branch_commits WHERE branch = ? AND commit_id = ?", (branch, tip)).fetchone()[0]
        row = db.execute("SELECT tip FROM branches WHERE name = ?", (branch,)).fetchone()
        db.execute("INSERT OR REPLACE INTO branches (name, tip, updated) VALUES (?, ?, ?)", (branch, tip, mark))
        if row is not None and row["tip"] == tip:
            return
        db.execute("UPDATE jobs SET tip_since = ? WHERE commit_id = ? AND tip_since IS NULL", (mark, tip))
        if row is not None and not db.execute("SELECT 1 FROM branches WHERE tip = ?", (row["tip"],)).fetchone():
            db.execute("UPDATE jobs SET tip_since = NULL WHERE commit_id = ?", (row["tip"],))

    def _counted(self, source: JobState | None, target: JobState, jobs: int = 1) -> None:
        """Note, inside a transaction, that ``jobs`` jobs moved from ``source`` (None: new) to ``target``."""
        if source is not None:
            self._pending[source.value] = self._pending.get(source.value, 0) - jobs
        self._pending[target.value] = self._pending.get(target.value, 0) + jobs

    def _move(self, db: sqlite3.Connection, commit: str, target: JobState) -> None:
        row = db.execute("SELECT state FROM jobs WHERE commit_id = ?", (commit,)).fetchone()
        if row is None:
            raise InvalidTransition("no job for commit %s" % commit)
        current = JobState(row["state"])
        if (current, target) not in TRANSITIONS:
            raise InvalidTransition("job %s cannot go from %s to %s" % (commit, current.value, target.value))
        db.execute("UPDATE jobs SET state = ? WHERE commit_id = ?", (target.value, commit))
        self._counted(current, target)

    @staticmethod
    def _end_attempt(db: sqlite3.Connection, attempt_id: int, outcome: Outcome, now: float) -> None:
        db.execute(
            "UPDATE attempts SET ended_at = ?, outcome = ? WHERE id = ? AND outcome IS NULL",
            (now, outcome.value, attempt_id),
        )


def _facts(summary: str | None) -> dict:
    """A summary as a dict (empty when it is none or not a JSON object)."""
    try:
        facts = json.loads(summary) if summary else {}
    except ValueError:
        return {}
    return facts if isinstance(facts, dict) else {}


def _column_there(db: sqlite3.Connection, statement: str) -> bool:
    """Whether ``statement`` adds a column (``ALTER TABLE t ADD COLUMN c ...``) that its
    table has already; False for any other statement."""
    words = statement.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    return any(column[1] == words[5] for column in db.execute("PRAGMA table_info(%s)" % words[2]))


def _job(row: sqlite3.Row) -> Job:
    return Job(
        commit=row["commit_id"],
        state=JobState(row["state"]),
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        current_attempt=row["current_attempt"],
        runner=row["runner"],
        reason=row["reason"],
        summary=row["summary"],
        requires=row["requires"],
        run=row["run"],
        round=row["round"],
        retest=None if row["retest"] is None else tuple(json.loads(row["retest"])),
        bisect=row["bisect"],
        first_failing=row["first_failing"],
        shards=row["shards"],
    )


def _attempt(row: sqlite3.Row) -> Attempt:
    return Attempt(
        id=row["id"],
        commit=row["commit_id"],
        runner=row["runner"],
        assigned_at=row["assigned_at"],
        ended_at=row["ended_at"],
        outcome=Outcome(row["outcome"]) if row["outcome"] else None,
        run=row["run"],
        round=row["round"],
        shard=row["shard"],
    )


def _shard(row: sqlite3.Row) -> Shard:
    return Shard(row["commit_id"], row["run"], row["shard"], row["shards"], row["plan"].encode("ascii"),
                 row["attempt"], None if row["summary"] is None else json.loads(row["summary"]),
                 row["log"] or b"", row["junit"])
