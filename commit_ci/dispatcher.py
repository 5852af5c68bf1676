"""Dispatcher: the single source of truth of the CI system.

It listens for the observer's ``dispatch`` (a commit to test) and the runners'
``register`` and ``results``, keeps every job in a durable SQLite queue
(jobstore.py), and runs two threads of its own: a scheduler that hands each queued
commit to an idle runner the moment both exist (woken by a condition variable, never
by a timer), and a heartbeat that pings every runner about once a second, drops
runners that stop answering and puts their jobs back in the queue. When jobs wait
for a runner, each branch's newest commit goes first, then the others newest first
(``--order tip``; ``--order fifo``: oldest first); a commit is one job whichever
branches bring it, and the store records each (store.py). A test failure is the
commit's verdict; an infrastructure fault (checkout failed, runner lost) is retried
on another runner, up to ``--max-attempts`` times. When tests fail, the failing tests
alone run again (up to ``--flaky-reruns`` times, on another runner when one is free):
if they pass, the verdict is ``flaky`` (flaky.py). When a commit fails, the untested
commits between it and its branch's last pass run in bisection order, right after the
tips, and the failed commits' results name the first failing one (``first_failing``,
culprit.py); ``--coalesce`` tests only the tips and what a bisection needs. Final results go to the results
folder (result_files.py), written once per run and atomically, and the results page
there (page.py) is rebuilt on a thread of its own after each. An operator may run a
judged commit again (``rerun``: a new run, the earlier run's files kept) or cancel a
queued or running one (``cancel``: its runner is told to ``stop``).

Who may ask what: with a keys file (``--keys-file``, keys.py), each request is
checked against the role of the key it was signed with (protocol.REQUESTS), a runner's
key registers and reports under that runner's name alone, and the dispatcher talks to
each runner with the key the runner registered with. Revoking a runner's key drops
the runner.

Threads and state: one ``Dispatcher`` object owns the runner registry, the
assignments out and the store, all under one condition. Handlers and the two loops
decide under it and talk to runners outside it, through a small thread pool.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from commit_ci import flaky, junit, notify, result_files, sharding
from commit_ci.client import communicate
from commit_ci.daemon import add_logging_arguments, install_stop_signals, setup_logging
from commit_ci.live_log import MAX_READ_BYTES, LiveLogs, read_file_from, whole_characters
from commit_ci.page import ResultsPage
from commit_ci.protocol import MAX_LIVE_CHUNK_BYTES, UNKNOWN_ATTEMPT, Message, error, may_send, reply, request
from commit_ci.result import Result
from commit_ci.result_files import iso_time
from commit_ci.security import RUNNER, Key, Security, add_security_arguments, security_from_arguments, wrap_secret
from commit_ci.server import ProtocolServer, serve_in_thread
from commit_ci.states import JobState, Outcome, ReportedStatus, RunnerState
from commit_ci.store import QUEUE_ORDERS, Job, JobStore, Round, Shard
from commit_ci.wire import ProtocolError, format_address

log = logging.getLogger("dispatcher")

DEFAULT_PORT = 8888
#: How often each runner is pinged.
HEARTBEAT_INTERVAL_S = 1.0
#: Consecutive unanswered pings after which a runner is dropped and its job requeued.
MISSED_PINGS_LIMIT = 3
#: A running job whose runner has not confirmed it for this many heartbeats is
#: taken back: a little more than MISSED_PINGS_LIMIT, so a dead runner is dropped
#: by the heartbeat first and the lease only catches runners that answer but forgot.
LEASE_HEARTBEATS = MISSED_PINGS_LIMIT + 1
#: Infrastructure failures (runner lost, checkout failed) after which a job is an error.
DEFAULT_MAX_ATTEMPTS = 3
#: Wait for a runner's answer to ``ping``; a loopback or LAN runner answers in ms.
PING_TIMEOUT_S = 1.0
#: Wait for a runner's answer to ``runtest`` (it answers before starting work).
RUNTEST_TIMEOUT_S = 5.0
#: The scheduler re-plans at least this often even without a wake-up; it is woken
#: on every event that can make an assignment possible, so this is only a safety net.
SCHEDULER_RECHECK_S = 1.0
#: After an unexpected error in the scheduler (a full disk...), how long it waits to retry.
LOOP_RETRY_S = 1.0
#: Threads that talk to runners (pings, runtest); pings to many runners overlap.
IO_THREADS = 32
#: Entries in a ``queue`` or ``recent`` answer unless the request asks for another
#: number, and the most it may ask for (an answer stays well under the JSON cap).
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000


@dataclass(eq=False)
class Assignment:
    """An attempt out on a runner. Its lease is renewed by pings that confirm it."""

    commit: str
    attempt_id: int
    runner: "RunnerRecord"
    lease_expires: float
    acknowledged: bool = False  # the runner answered OK to runtest (or reported it busy)
    superseded: bool = False  # the job was settled by another attempt meanwhile
    tests: tuple[str, ...] | None = None  # a rerun of these failing tests alone (flaky.py)
    shard: int | None = None  # one shard of its commit's tests alone (sharding.py): its number,
    shards: int | None = None  # how many there are,
    plan: bytes | None = None  # and the plan, test files to shards


@dataclass(eq=False)
class RunnerRecord:
    name: str
    address: tuple[str, int]
    since: float  # wall-clock time of the last change of what it is doing
    #: The key it registered with (None: no authentication), and the settings that
    #: sign what is sent to it with that key: a runner accepts its own key alone.
    key: Key | None = None
    security: Security | None = None
    verified: bool = False  # answered a ping since it registered
    assignment: Assignment | None = None
    #: What the runner itself last said it runs: (commit, attempt) or None for idle.
    #: A runner busy with something we did not give it (a job from before a
    #: dispatcher restart) is not available until it says it is idle.
    reported: tuple[str | None, int | None] | None = None
    missed_pings: int = 0
    #: What it can run that a job may require: "python3.12" for each interpreter it has.
    offers: frozenset[str] = frozenset()
    #: False once it answered a shard with "unknown option" (a runner of a version
    #: before sharding): whole commits only, until it registers again.
    runs_shards: bool = True

    def can_run(self, job: Job, shard: bool = False) -> bool:
        """Whether it can run ``job`` (with ``shard``: a shard of it)."""
        return (job.requires is None or job.requires in self.offers) and (self.runs_shards or not shard)

    @property
    def available(self) -> bool:
        return self.verified and self.assignment is None and self.reported is None


class Dispatcher:
    """Job queue, runner registry and scheduling. Thread-safe; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        results_dir: str,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        security: Security | None = None,
        on_final_result: Callable[[], None] | None = None,
        order: str = "tip",
        on_branch_change: Callable[[], None] | None = None,
        flaky_reruns: int = flaky.DEFAULT_RERUNS,
        coalesce: bool = False,
        max_shards: int = sharding.DEFAULT_MAX_SHARDS,
        on_notification: Callable[[], None] | None = None,
    ):
        self.store = store
        #: Most shards one commit's tests are split in when runners are idle (1: never; sharding.py).
        self.max_shards = max_shards
        #: Called after a transaction that may have added notifications to the store's
        #: outbox (a verdict, an assignment: notify.py); must not block.
        self.on_notification = on_notification or (lambda: None)
        #: --coalesce: only branch tips are tested, and the commits a bisection needs (culprit.py).
        self.coalesce = coalesce
        #: Held while result files are rewritten to name their first failing commit.
        self._naming = threading.Lock()
        #: How many times the tests still failing run again (0: never; flaky.py).
        self.flaky_reruns = flaky_reruns
        self.security = security or Security()
        self.results_dir = results_dir
        self.max_attempts = max_attempts
        self.heartbeat_interval = heartbeat_interval
        #: Called, with the lock held, after each final result is recorded: it must
        #: not block (the results page only sets an event).
        self.on_final_result = on_final_result or (lambda: None)
        #: The order queued jobs are given to runners in (store.QUEUE_ORDERS).
        self.order = order
        #: Called after a commit is reported on a named branch (a tip, a branch new to
        #: the page); must not block either.
        self.on_branch_change = on_branch_change or (lambda: None)
        self._cond = threading.Condition()
        self._runners: dict[str, RunnerRecord] = {}
        self._assignments: dict[int, Assignment] = {}
        #: Runners on which a job met an infrastructure fault: tried last for it.
        self._avoid: dict[str, set[str]] = {}
        #: Runners that ran a round of a job's run whose failing tests run again: the
        #: next round goes to another runner when one is free (kept in memory only).
        self._ran: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="runner-io")
        self._threads: list[threading.Thread] = []
        #: The newest commit queued that the runners have not been told to fetch yet.
        self._fetch_cond = threading.Condition()
        self._fetch_wanted: str | None = None
        #: Commits whose verdict's files are being written (outside the lock).
        self._settling: set[str] = set()
        #: The pings to the runners known at start-up: the scheduler waits for them.
        self._first_pings: list[concurrent.futures.Future] = []
        #: The keys file, if any (its own lock), and the last of its versions whose
        #: removed keys have had their runners dropped.
        self.keys = self.security.keyring
        self._keys_checked = self.keys.generation if self.keys is not None else 0
        #: The live logs of running jobs (live_log.py; their own lock).
        self.live = LiveLogs(results_dir)
        #: Pings that got no answer (or a refusal), since the dispatcher started (/metrics).
        self.missed_pings_total = 0

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Recover the queue from the database and the results folder, then start the loops."""
        requeued = self.store.recover(time.time())
        if requeued:
            log.info("recovered %d running job(s) from before the restart: back in the queue", requeued)
        self._retire_abbreviated_jobs()
        self._recover_written_results()
        # Killed between recording a first failing commit and telling the files: now.
        self._name_first_failing(self.store.first_failing_pending())
        with self._cond:
            for name, host, port, offers in self.store.runners():
                key = self._restored_runner_key(name)
                if self.security.auth is not None and key is None:
                    # No key to talk to it with: it registers again when our pings stop.
                    self.store.forget_runner(name)
                    log.info("runner %s known from before the restart has no key here now: forgotten", name)
                    continue
                record = RunnerRecord(name, (host, port), since=time.time(), offers=offers, key=key,
                                      security=self.security.signing_with(key))
                self._runners[name] = record
                self._first_pings.append(self._pool.submit(self._verify, record))
            if self._runners:
                log.info("pinging %d runner(s) known from before the restart", len(self._runners))
        for name, target in (("scheduler", self._schedule_loop), ("heartbeat", self._heartbeat_loop),
                             ("fetch-ahead", self._fetch_ahead_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        with self._fetch_cond:
            self._fetch_cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _restored_runner_key(self, name: str) -> Key | None:
        """The key to talk to a runner known from before a restart with: the runner key of
        its name, else the shared secret. (If it registered with the other, our pings
        fail, it is dropped, and it registers again.)"""
        key = self.keys.current().get(name) if self.keys is not None else None
        if key is not None and key.role == RUNNER:
            return key
        return self.security.auth.key if self.security.auth is not None else None

    def _retire_abbreviated_jobs(self) -> None:
        # A database from before abbreviated ids were refused may still queue one. No
        # runner takes it (each would refuse it, and the scheduler offer it again,
        # forever), and no result file may be named after it: the commit is tested
        # under its full id. So it ends as an error, with no result.
        reason = "abbreviated commit id, refused since; dispatch the full id"
        for commit in self.store.abbreviated_queued():
            self.store.finish(commit, None, JobState.ERROR, Outcome.ERROR, reason, None, time.time())
            log.warning("commit %s: queued under an abbreviated id before those were refused; "
                        "settled as error with no result (dispatch its full id to test it)", commit)

    def _recover_written_results(self) -> None:
        # A crash between writing a result's files and recording it leaves a queued
        # job whose <sha>.json exists: the file wins, so the result is never written twice.
        for job in self.store.queued_jobs(limit=1_000_000):
            commit = job.commit
            result = result_files.read_result(self.results_dir, commit)
            if result is None or (result.run or 1) != job.run:
                continue  # none, or the verdict of the run before a rerun
            state = JobState(result.status)
            summary = result.summary()
            self.store.finish(commit, None, state, Outcome(state.value), result.reason, json.dumps(summary),
                              time.time(), flaky=flaky.records(summary))
            log.info("commit %s: result file found on start-up (%s); recorded", commit, state.value)
            self.live.discard(commit)

    # --- requests ------------------------------------------------------------------

    def handle(self, message: Message, peer: str) -> Message:
        handler = {
            "status": self._on_status,
            "dispatch": self._on_dispatch,
            "register": self._on_register,
            "results": self._on_results,
            "queue": self._on_queue,
            "branches": self._on_branches,
            "runners": self._on_runners,
            "recent": self._on_recent,
            "lookup": self._on_lookup,
            "flaky": self._on_flaky,
            "notifications": self._on_notifications,
            "tail": self._on_tail,
            "live-log": self._on_live_log,
            "rerun": self._on_rerun,
            "cancel": self._on_cancel,
            "key-add": self._on_key_add,
            "key-revoke": self._on_key_revoke,
            "key-list": self._on_key_list,
        }.get(message.verb)
        if handler is None:
            log.warning("%s sent %s, which is for runners", peer, message.verb)
            return error("%s is not a dispatcher request" % message.verb)
        if not may_send(message.key, message.verb):
            key = message.key
            log.warning("%s sent %s, which a key of role %s may not send: refused", _who(message, peer),
                        message.verb, key.role)
            return error("key %s (role %s) may not send %s" % (key.name, key.role, message.verb))
        return handler(message, peer)

    def _on_status(self, message: Message, peer: str) -> Message:
        with self._cond:
            runners = len(self._runners)
            idle = sum(1 for runner in self._runners.values() if runner.available)
        # The counts come from the store, which has its own lock: reading them under
        # the dispatcher's would hold up every handler and the scheduler meanwhile.
        return reply(
            "OK",
            queued=self.store.count(JobState.QUEUED),
            running=self.store.count(JobState.RUNNING),
            runners=runners,
            idle=idle,
        )

    # --- read-only queries (JSON answers) ---------------------------------------------

    def _on_queue(self, message: Message, peer: str) -> Message:
        limit = min(message.get("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT)
        with self._cond:
            queued = self.store.queued_jobs(limit, order=self.order)
            running = self.store.running()
            total = self.store.count(JobState.QUEUED)
            # A sharded commit runs on several runners at once: each shard out, and where.
            shards_out: dict[str, list[dict]] = {}
            for assignment in self._assignments.values():
                if assignment.shard is not None:
                    shards_out.setdefault(assignment.commit, []).append(
                        {"shard": assignment.shard, "shards": assignment.shards, "attempt": assignment.attempt_id,
                         "runner": assignment.runner.name})
        return _json_reply({
            "order": self.order,
            "queued_total": total,
            "queued": [{"commit": job.commit, "queued_at": iso_time(job.queued_at), "requires": job.requires}
                       for job in queued],
            "running": [
                {"commit": job.commit, "attempt": job.current_attempt, "runner": job.runner,
                 "started_at": iso_time(job.started_at),
                 "shards": sorted(shards_out.get(job.commit, ()), key=lambda out: out["shard"])}
                for job in running
            ],
        })

    def _on_branches(self, message: Message, peer: str) -> Message:
        limit = min(message.get("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT)
        # The store's lock alone: reading a branch's history takes a few milliseconds,
        # which the scheduler and the other handlers need not wait for.
        states = self.store.branch_states(limit)
        return _json_reply({"branches": [
            {"branch": state.branch, "state": state.state, "since": state.since, "commit": state.commit,
             "tip": state.tip, "tip_state": state.tip_state.value if state.tip_state else None}
            for state in states
        ]})

    def _on_runners(self, message: Message, peer: str) -> Message:
        with self._cond:
            described = [self._describe_runner(record) for record in self._runners.values()]
        return _json_reply({"runners": described})

    def runner_states(self) -> dict[str, int]:
        """How many registered runners are in each state, as ``runners`` says (/metrics)."""
        states: dict[str, int] = {}
        with self._cond:
            for record in self._runners.values():
                state = self._describe_runner(record)["state"]
                states[state] = states.get(state, 0) + 1
        return states

    def _describe_runner(self, record: RunnerRecord) -> dict:
        if not record.verified:
            state, commit, attempt = RunnerState.UNVERIFIED, None, None
        elif record.assignment is not None:
            state, commit, attempt = RunnerState.BUSY, record.assignment.commit, record.assignment.attempt_id
        elif record.reported is not None:
            state, (commit, attempt) = RunnerState.BUSY, record.reported
        else:
            state, commit, attempt = RunnerState.IDLE, None, None
        return {"name": record.name, "address": format_address(record.address), "state": state.value,
                "commit": commit, "attempt": attempt, "since": iso_time(record.since), "offers": sorted(record.offers),
                "shards": record.runs_shards}

    def _on_recent(self, message: Message, peer: str) -> Message:
        limit = min(message.get("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT)
        with self._cond:
            summaries = self.store.recent_summaries(limit)
        return _json_reply({"results": summaries})

    def _job_by_prefix(self, prefix: str) -> Job | Message:
        """The job whose commit's full id starts with ``prefix``: people look commits up
        by the short ids they see (ci-ctl status prints 12 digits). Else the error reply."""
        with self._cond:
            jobs = self.store.jobs_starting_with(prefix)
        if not jobs:
            return error("unknown commit %s" % prefix)
        if len(jobs) > 1:
            return error("ambiguous commit prefix %s: more than one commit starts with it; give more digits" % prefix)
        return jobs[0]

    def _on_lookup(self, message: Message, peer: str) -> Message:
        job = self._job_by_prefix(message.fields["commit"])
        if isinstance(job, Message):
            return job
        commit = job.commit
        with self._cond:
            runs = self.store.runs(commit)
        answer = {"commit": commit, "state": job.state.value, "runner": job.runner, "attempt": job.current_attempt,
                  "run": job.run, "round": job.round, "queued_at": iso_time(job.queued_at),
                  "branches": self.store.branches_of(commit), "summary": None, "files": {}, "runs": []}
        if job.summary:
            # The current verdict: while a rerun is queued or running, the one before.
            answer["summary"] = json.loads(job.summary)
            answer["files"] = self._files(commit, None)
        current = answer["summary"].get("run") if answer["summary"] else None
        for run in runs:
            answer["runs"].append({"run": run.run, "status": run.status.value, "finished_at": iso_time(run.finished_at),
                                   "files": self._files(commit, None if run.run == (current or 1) else run.run)
                                   if run.summary else {}})
        return _json_reply(answer)

    def _on_flaky(self, message: Message, peer: str) -> Message:
        limit = min(message.get("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT)
        window = min(max(1, message.get("window", flaky.DEFAULT_WINDOW)), flaky.MAX_WINDOW)
        # The store's own lock: a read through two small indexes, no need for the dispatcher's.
        runs, tests = self.store.flakiest(window, limit)
        for test in tests:
            test["rate"] = round(test["flaky"] / runs, 4) if runs else 0.0
            test["finished_at"] = iso_time(test["finished_at"])
        return _json_reply({"window": window, "runs": runs, "tests": tests})

    def _on_notifications(self, message: Message, peer: str) -> Message:
        limit = min(message.get("limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT)
        # The store's own lock: a few rows through the partial index and the primary key.
        pending, rows = self.store.notification_list(limit)
        listed = []
        for row in rows:
            document = row["document"]
            entry = {"delivery": row["delivery"], "channel": row["channel"], "event": document.get("event"),
                     "commit": (document.get("commit") or {}).get("id"),
                     "state": row["outcome"] or "waiting", "created_at": iso_time(row["created_at"]),
                     "tries": row["attempts"], "last_error": row["last_error"],
                     "next_try_at": None if row["done_at"] is not None else iso_time(row["next_at"]),
                     "done_at": iso_time(row["done_at"])}
            if document.get("event") == "branch":
                entry.update(branch=document.get("branch"), old_state=document.get("old_state"),
                             new_state=document.get("new_state"))
            else:
                entry.update(status=document.get("state"))
            listed.append(entry)
        return _json_reply({"pending": pending, "notifications": listed})

    def _on_tail(self, message: Message, peer: str) -> Message:
        # A commit's output from a byte offset: its live log while it is queued or
        # running (a runner that died leaves what it sent), its final log once judged.
        offset = message.get("offset", 0)
        job = self._job_by_prefix(message.fields["commit"])
        if isinstance(job, Message):
            return job
        commit = job.commit
        if job.state.final:
            source, found = "final", read_file_from(result_files.result_path(self.results_dir, commit, ".log"),
                                                    offset, MAX_READ_BYTES)
        else:
            source, found = "live", self.live.read(commit, offset, MAX_READ_BYTES)
        if found is None:
            source, found = "none", (b"", 0)
        data, size = found
        data = whole_characters(data) if offset + len(data) < size else data
        return reply("OK", chunk=data, json=json.dumps({
            "commit": commit, "state": job.state.value, "attempt": job.current_attempt, "source": source,
            "offset": min(offset, size) + len(data), "size": size}).encode("utf-8"))

    def _on_live_log(self, message: Message, peer: str) -> Message:
        commit, attempt_id, offset = message.fields["commit"], message.fields["attempt"], message.fields["offset"]
        if "chunk" in message.truncated:
            log.warning("commit %s attempt %d: live output chunk from %s over the size limit: refused", commit,
                        attempt_id, _who(message, peer))
            return error("chunk too large (limit %d bytes)" % MAX_LIVE_CHUNK_BYTES)
        data = message.sections.get("chunk", b"")
        with self._cond:
            assignment = self._assignments.get(attempt_id)
            if assignment is None or assignment.commit != commit or assignment.superseded or commit in self._settling:
                # Not the commit's current attempt (settled, lost, or never given), or its
                # verdict is being written: ignored.
                log.debug("commit %s attempt %d: live output from %s ignored: not a current attempt", commit,
                          attempt_id, _who(message, peer))
                return reply("OK", recorded=0)
            key = message.key
            if key is not None and not key.shared and assignment.runner.name != key.name:
                log.warning("commit %s attempt %d: live output from %s refused: the attempt is runner %s's", commit,
                            attempt_id, _who(message, peer), assignment.runner.name)
                return error("attempt %d of commit %s was given to another runner, not to %s"
                             % (attempt_id, commit, key.name))
            # Small appends to a file (no fsync): held under the lock, so that a verdict
            # recorded meanwhile (which removes the file) cannot be followed by a write.
            try:
                end = self.live.append(commit, attempt_id, offset, data,
                                       None if assignment.shard is None else (assignment.shard, assignment.shards))
            except OSError as exc:
                log.error("commit %s attempt %d: live output not written: %s", commit, attempt_id, exc)
                return error("internal error")
        return reply("OK", recorded=1, offset=end)

    def _files(self, commit: str, run: int | None) -> dict:
        """Where the report and the summary of ``commit``'s run ``run`` are (None: the current one)."""
        folder = result_files.run_folder(self.results_dir, commit, run) if run else self.results_dir
        return {"report": os.path.join(folder, commit), "json": os.path.join(folder, commit + ".json")}

    # --- keys (the keys file has its own lock: never written under the dispatcher's) -----

    def _on_key_add(self, message: Message, peer: str) -> Message:
        if self.keys is None:
            return _no_keys_file(message, peer)
        name, role = message.fields["name"], message.fields["role"]
        try:
            key = self.keys.add(name, role)
        except ValueError as exc:
            log.warning("key %s not added for %s: %s", name, _who(message, peer), exc)
            return error(str(exc))
        except OSError as exc:
            log.error("key %s not added for %s: cannot write the keys file %s: %s", name, _who(message, peer),
                      self.keys.path, exc)
            return error("cannot write the keys file")
        log.info("key %s (role %s) added by %s", name, role, _who(message, peer))
        # The new secret goes back hidden with the key of the request, which only the
        # asker holds (security.wrap_secret): it never crosses the wire in clear.
        salt = os.urandom(16).hex()
        return _json_reply({"name": name, "role": role, "salt": salt,
                            "wrapped": wrap_secret(message.key, salt, key.secret)})

    def _on_key_revoke(self, message: Message, peer: str) -> Message:
        if self.keys is None:
            return _no_keys_file(message, peer)
        name = message.fields["name"]
        try:
            revoked = self.keys.revoke(name)
        except KeyError:
            log.warning("key %s not revoked for %s: there is no such key", name, _who(message, peer))
            return error("no key named %s" % name)
        except OSError as exc:
            log.error("key %s not revoked for %s: cannot write the keys file %s: %s", name, _who(message, peer),
                      self.keys.path, exc)
            return error("cannot write the keys file")
        log.info("key %s (role %s) revoked by %s", name, revoked.role if revoked else "unknown", _who(message, peer))
        self._drop_runners_without_keys()
        return reply("OK")

    def _on_key_list(self, message: Message, peer: str) -> Message:
        if self.keys is None:
            return _no_keys_file(message, peer)
        return _json_reply({"keys": [{"name": key.name, "role": key.role} for key in self.keys.keys()],
                            "shared_secret": self.keys.shared is not None})

    def _drop_runners_without_keys(self) -> None:
        """Drop each runner whose key has been revoked (or changed) since it registered;
        its job goes back to the queue."""
        generation, keys = self.keys.generation, self.keys.current()
        with self._cond:
            self._keys_checked = max(self._keys_checked, generation)
            for record in list(self._runners.values()):
                key = record.key
                if key is not None and not key.shared and keys.get(key.name) != key:
                    self._drop(record, "its key %s was revoked" % key.name)

    # --- requests that change things --------------------------------------------------

    def _on_rerun(self, message: Message, peer: str) -> Message:
        commit = message.fields["commit"]
        with self._cond:
            job = self.store.job(commit)
            if job is None:
                return error("unknown commit %s: dispatch it to test it" % commit)
            if not job.state.final or commit in self._settling:
                return error("commit %s is %s: its run is not over (cancel it first)" % (commit, job.state.value))
            run = self.store.rerun(commit, time.time())
            self._avoid.pop(commit, None)
            self._ran.pop(commit, None)
            self._cond.notify_all()
        log.info("commit %s: run %d queued (rerun asked by %s; its verdict stays %s until then)",
                 commit, run, _who(message, peer), job.state.value)
        return reply("OK", run=run)

    def _on_cancel(self, message: Message, peer: str) -> Message:
        commit = message.fields["commit"]
        who = _who(message, peer)
        with self._cond:
            job = self.store.job(commit)
            if job is None:
                return error("unknown commit %s" % commit)
            if job.state.final or commit in self._settling:
                return error("commit %s is %s already: nothing to cancel" % (commit, job.state.value))
            running = [assignment for assignment in self._assignments.values()
                       if assignment.commit == commit and not assignment.superseded]
            for assignment in running:
                # Its runner stays busy (not given another job) until it says it is idle.
                assignment.superseded = True
            if job.summary:
                verdict = self.store.cancel_rerun(commit, time.time())
                self.live.discard(commit)
                self.on_final_result()
                log.info("commit %s: run %d cancelled by %s; its verdict stays %s", commit, job.run, who, verdict.value)
                state = verdict
            else:
                reason = "cancelled by %s" % (message.key.name if message.key and not message.key.shared else "an operator")
                self._settle(Result(commit, JobState.CANCELLED.value, reason=reason), JobState.CANCELLED, job.runner
                             if running else None)
                state = JobState.CANCELLED
        for assignment in running:
            self._pool.submit(self._send_cancel, assignment)
        return reply("OK", job=state.value, stopped=len(running))

    def _send_cancel(self, assignment: Assignment) -> None:
        """Tell a runner to stop an attempt whose job was cancelled (it answers at once;
        whatever it reports for it later is a late result)."""
        record = assignment.runner
        try:
            answer = communicate(record.address,
                                 request("stop", commit=assignment.commit, attempt=assignment.attempt_id),
                                 timeout=RUNTEST_TIMEOUT_S, total_timeout=RUNTEST_TIMEOUT_S * 2,
                                 security=record.security)
        except (OSError, ProtocolError) as exc:
            answer = error(str(exc) or exc.__class__.__name__)
        if answer.verb == "OK":
            log.info("commit %s attempt %d: runner %s stops it", assignment.commit, assignment.attempt_id, record.name)
        else:
            log.warning("commit %s attempt %d: runner %s was not told to stop (%s); its result will be ignored",
                        assignment.commit, assignment.attempt_id, record.name, answer.get("reason"))

    def _on_dispatch(self, message: Message, peer: str) -> Message:
        commit, branch, tip = message.fields["commit"], message.get("branch"), message.get("tip")
        # Saved outside the dispatcher's lock (the store has its own), so that many
        # observers or a burst of commits do not queue up behind one another's SQLite
        # writes while holding everything else up. No wake-up is lost: the scheduler
        # reads the queue under the lock, and the notification below comes after the
        # job is committed.
        # In fifo order the tip is queued when it is itself dispatched, last of its round.
        done = self.store.report(commit, time.time(), branch, tip if self.order == "tip" else None,
                                 coalesce=self.coalesce)
        if done.caught_up and done.state.final:
            # A tip judged before the commits older than it were reported: its place in
            # its branch is known only now, and with it the commits to bisect.
            with self._cond:
                self._find_culprit(commit)
        if done.new or done.tip_queued:
            self._fetch_ahead(tip if done.tip_queued else commit)
            with self._cond:
                # Waking the scheduler when no runner is free would only make it
                # contend for the lock to find nothing to do.
                if any(runner.available for runner in self._runners.values()):
                    self._cond.notify_all()
        where = ", branch %s" % branch if branch else ""
        if done.tip_queued:
            log.info("commit %s queued (from %s%s): the branch's tip, ahead of the commits before it",
                     tip, _who(message, peer), where)
        if done.new:
            log.info("commit %s queued (from %s%s)", commit, _who(message, peer), where)
        elif done.caught_up:
            log.info("commit %s reported by %s as the tip of branch %s, after the commits before it: %s since the "
                     "first of them", commit, _who(message, peer), branch or "(unnamed)", done.state.value)
        else:
            log.info("commit %s dispatched again by %s: already %s%s", commit, _who(message, peer), done.state.value,
                     " (branch %s)" % branch if branch else "")
        if branch:
            self.on_branch_change()
        # new counts the jobs this dispatch queued: its commit, and the tip it named.
        return reply("OK", new=int(done.new) + int(done.tip_queued), job=done.state.value)

    def _on_register(self, message: Message, peer: str) -> Message:
        address = (message.fields["host"], message.fields["port"])
        name = message.get("name") or format_address(address)
        key = message.key
        if key is not None and not key.shared and name != key.name:
            # Else a runner's key could take another runner's name, and its jobs.
            log.warning("%s tried to register as runner %s: refused (a runner key registers under its own name)",
                        _who(message, peer), name)
            return error("key %s may register only as the runner named %s, not %s" % (key.name, key.name, name))
        running = message.get("attempt")
        offers = frozenset("python" + version for version in message.get("pythons", ()))
        with self._cond:
            if self.keys is not None and key is not None and not key.shared and self.keys.current().get(key.name) != key:
                # Revoked since the request was checked: registered now, the runner would
                # outlive the revocation (the runners of revoked keys were dropped already).
                log.warning("runner %s registering from %s: its key was revoked meanwhile: refused", name, peer)
                return error("unknown key %s (never added, or revoked)" % key.name)
            old = self._runners.get(name)
            record = RunnerRecord(name, address, since=time.time(), offers=offers, key=key,
                                  security=self.security.signing_with(key))
            if old is not None:
                kept = old.assignment
                if kept is not None and not kept.superseded and (old.address != address or kept.attempt_id != running):
                    # The runner restarted, or another took its name: what it ran is gone.
                    self._lose(kept, "runner %s registered again without it" % name, Outcome.LOST)
                elif kept is not None:
                    kept.runner = record
                    record.assignment = kept
            if running is not None:
                record.reported = (message.get("commit"), running)
            self._runners[name] = record
            self.store.save_runner(name, address[0], address[1], time.time(), offers)
        log.info("runner %s registered from %s (address %s%s)", name, _who(message, peer), format_address(address),
                 "; offers %s" % " ".join(sorted(offers)) if offers else "")
        # Not available until it answers a ping: that proves the address works.
        self._pool.submit(self._verify, record)
        return reply("OK", runner=name, heartbeat=self.heartbeat_interval)

    def _on_results(self, message: Message, peer: str) -> Message:
        result = Result.from_message(message)
        if "log" in message.truncated:
            log.warning("commit %s attempt %d: output cut to the size limit", result.commit, result.attempt)
        if "junit" in message.truncated:
            log.warning("commit %s attempt %d: JUnit XML over the size limit: not kept", result.commit, result.attempt)
        elif result.junit:
            # Checked here, before the lock: a large file takes a while to parse.
            try:
                result.junit = junit.clean(result.junit)
            except junit.JUnitError as exc:
                result.junit = None
                log.warning("commit %s attempt %d: JUnit XML not kept: %s", result.commit, result.attempt, exc)
        with self._cond:
            job = self.store.job(result.commit)
            attempt = self.store.attempt(result.attempt)
            if job is None or attempt is None or attempt.commit != result.commit:
                log.warning(
                    "results from %s for unknown commit %s attempt %d: refused", peer, result.commit, result.attempt
                )
                return error(UNKNOWN_ATTEMPT)
            if (attempt.run, attempt.round) != (job.run, job.round):
                # Of a run before a rerun, that run settled meanwhile; or of a round of this
                # run whose failing tests run again already (its result sent twice, or
                # another attempt of that round settled it first): it judges nothing now.
                self.store.end_attempt(result.attempt, Outcome.SUPERSEDED, time.time())
                self._free_runner_of(result.attempt)
                log.info("commit %s attempt %d (runner %s): late %s result of run %d round %d ignored, run %d round "
                         "%d is on", result.commit, result.attempt, attempt.runner, result.status, attempt.run,
                         attempt.round, job.run, job.round)
                return reply("OK", recorded=0)
            key = message.key
            if key is not None and not key.shared and attempt.runner != key.name:
                # A runner's key speaks for that runner's attempts alone.
                log.warning("commit %s attempt %d: %s result from %s refused: the attempt is runner %s's",
                            result.commit, result.attempt, result.status, _who(message, peer), attempt.runner)
                return error("attempt %d of commit %s was given to another runner, not to %s"
                             % (result.attempt, result.commit, key.name))
            if result.commit in self._settling:
                # Another verdict for it is being written: this one waits its turn (the
                # runner keeps it and sends it again), so that the first one wins.
                return error("busy: a result for %s is being recorded; send it again later" % result.commit)
            if attempt.shard is not None and not job.state.final:
                if attempt.round == 0 and ReportedStatus(result.status).verdict:
                    self._learn_durations(result)
                merged = self._on_shard_result(job, attempt.shard, attempt.runner, result)
                if isinstance(merged, Message):
                    return merged
                result = merged
            elif job.state.final or not ReportedStatus(result.status).verdict:
                # If recording fails (the results folder unwritable...), the handler's
                # ERR makes the runner keep the result and send it again; the assignment
                # stays meanwhile, so the job keeps its lease instead of hanging unowned.
                answer = self._record_result(job, attempt.runner, result)
                self._free_runner_of(result.attempt)
                return answer
            elif attempt.round == 0:
                self._learn_durations(result)
            # A verdict: its files (the output may be megabytes, fsync'ed) are written
            # without the lock, which every request and the scheduler need meanwhile.
            # A failure may instead be a round whose failing tests run again (flaky.py),
            # kept in the store, also without the lock.
            step = self._step(job, result)
            state = JobState(step.status or result.status)
            now = self._complete(result, JobState(result.status), result.runner or attempt.runner)
            # Its result names its branch's first failing commit if that is known already.
            named = self.store.known_first_failing(result.commit) if state is JobState.FAILED else None
            self._settling.add(result.commit)
        try:
            if step.again:
                self._keep_round(job, result, step)
                with self._cond:
                    self._next_round(job, result, step, attempt.runner)
                    self._free_runner_of(result.attempt)
                return reply("OK", recorded=1)
            if job.round > 0:
                result = self._with_reruns(job, result, step, state)
            result.first_failing = named
            # Gone before the verdict's files appear (no chunk is written while the
            # commit settles): once its <sha>.json is there, it has no live log.
            self.live.discard(result.commit)
            result_files.write_result(self.results_dir, result)
            with self._cond:
                self._record_settled(result, state, now)
                self._free_runner_of(result.attempt)
        finally:
            with self._cond:
                self._settling.discard(result.commit)
        return reply("OK", recorded=1)

    # --- shards (sharding.py) -------------------------------------------------------

    def _learn_durations(self, result: Result) -> None:
        """Keep the test file durations a run of the whole suite, or a shard, measured."""
        if not result.durations:
            return
        try:
            durations = sharding.decode_durations(result.durations)
        except ValueError as exc:
            log.warning("commit %s attempt %d: test durations not kept: %s", result.commit, result.attempt, exc)
            return
        self.store.learn_durations(durations, time.time())

    def _on_shard_result(self, job: Job, shard: int, runner: str, result: Result) -> Result | Message:
        """A runner's result for one shard of ``job`` (lock held): kept, or its shard
        waits again; the answer to send, unless it was the last shard: then the merged
        result of them all, which goes on as any run's result does."""
        commit = job.commit
        if not ReportedStatus(result.status).verdict:
            outcome = _OUTCOMES[ReportedStatus(result.status)]
            why = result.reason or ("infrastructure error on runner" if outcome is Outcome.ERROR else
                                    "handed back by runner")
            self._requeue_shard(commit, result.attempt, runner, why, outcome,
                                result.requires if outcome is Outcome.DECLINED else None)
            self._free_runner_of(result.attempt)
            return reply("OK", recorded=1)
        kept, superseded = self.store.keep_shard(result.attempt, sharding.entry(shard, result, runner), result.log,
                                                 result.junit, time.time())
        self._free_runner_of(result.attempt)
        if superseded in self._assignments:
            # Its runner stays busy (not given another job) until it says it is idle.
            self._assignments[superseded].superseded = True
        if not kept:
            log.info("commit %s attempt %d (runner %s): stale %s result of shard %d ignored", commit, result.attempt,
                     runner, result.status, shard)
            return reply("OK", recorded=0)
        shards = self.store.shards_of(commit, job.run)
        left = sum(1 for other in shards if other.summary is None)
        log.info("commit %s attempt %d (runner %s): shard %d of %d %s (%s passed, %s failed); %d shard(s) to go",
                 commit, result.attempt, runner, shard, len(shards), result.status, result.passed, result.failed, left)
        if left:
            return reply("OK", recorded=1)
        merged = sharding.merge(commit, [(other.summary, other.log, other.junit) for other in shards])
        merged.attempt = result.attempt
        merged.runner = ", ".join(dict.fromkeys(str(other.summary.get("runner")) for other in shards))
        return merged

    # --- failing tests run again (flaky.py) --------------------------------------------

    def _step(self, job: Job, result: Result) -> flaky.Step:
        """What follows the verdict ``result`` of the job's current round (lock held)."""
        if job.round == 0:
            return flaky.first_step(result.status, result.retry, result.failing, self.flaky_reruns)
        kept = self.store.round_summaries(job.commit, job.run)
        first = kept[0].get("failing") if kept else None  # none kept: a broken store; the whole command then
        return flaky.next_step(job.round, self.flaky_reruns, None if first is None else tuple(first), job.retest,
                               result.status, result.retry, result.failing)

    def _round_entry(self, job: Job, result: Result, step: flaky.Step) -> dict:
        """What a round's result keeps in the store: round 0's summary, with its failing
        tests (None: a whole-command run); of a rerun, its entry of ``reruns``."""
        if job.round == 0:
            return dict(result.summary(), attempt=result.attempt,
                        failing=None if step.tests is None else list(step.tests))
        entry = {"rerun": job.round, "tests": None if job.retest is None else list(job.retest),
                 "status": result.status, "failing": None if step.failing is None else list(step.failing),
                 "attempt": result.attempt}
        entry.update((name, getattr(result, name)) for name in (
            "passed", "failed", "errors", "skipped", "duration_s", "runner", "attempts", "started_at", "finished_at",
            "reason", "hash_seed"))
        return entry

    def _keep_round(self, job: Job, result: Result, step: flaky.Step) -> None:
        """Keep a round whose failing tests run again, with its output (lock not held)."""
        self.store.keep_round(job.commit, job.run, job.round, json.dumps(self._round_entry(job, result, step)),
                              result.log, result.junit)

    def _next_round(self, job: Job, result: Result, step: flaky.Step, runner: str) -> None:
        """Queue the job's next round, for the tests still failing (lock held)."""
        commit = job.commit
        self.store.next_round(commit, result.attempt, job.round + 1, step.tests, time.time())
        self._ran.setdefault(commit, set()).add(runner)
        for other in self._assignments.values():
            if other.commit == commit and other.attempt_id != result.attempt:
                other.superseded = True
        what = "the whole test command" if step.tests is None else "%d failing test(s): %s" % (
            len(step.tests), ", ".join(step.tests))
        log.info("commit %s attempt %d (runner %s): tests failed; rerun %d of %d queued: %s", commit, result.attempt,
                 runner, job.round + 1, self.flaky_reruns, what)
        self._cond.notify_all()

    def _with_reruns(self, job: Job, result: Result, step: flaky.Step, state: JobState) -> Result:
        """The result of a run that ends after reruns of its failing tests: the first
        round's, with every rerun's (lock not held: the run's rounds change no more)."""
        rounds: list[Round] = self.store.rounds(job.commit, job.run)
        if not rounds or rounds[0].round != 0:
            log.error("commit %s: the first round of run %d is not in the store: the result is the last rerun's",
                      job.commit, job.run)
            rounds = [Round(0, result.summary(), result.log, result.junit)]
        first = Result.from_summary(rounds[0].summary)
        first.log, first.junit, first.attempt = rounds[0].log, rounds[0].junit, result.attempt
        first.finished_at, first.run = result.finished_at, result.run
        reruns = [(entry.summary, entry.log) for entry in rounds[1:] if entry.round < job.round]
        reruns.append((self._round_entry(job, result, step), result.log))
        return result_files.with_reruns(first, reruns, state.value, list(step.flaky), max(self.flaky_reruns, job.round))

    def _free_runner_of(self, attempt_id: int) -> None:
        """The runner of ``attempt_id`` has reported: it is free again now, not at its
        next ping (called with the lock held)."""
        assignment = self._assignments.pop(attempt_id, None)
        if assignment is not None and assignment.runner.assignment is assignment:
            assignment.runner.assignment = None
            assignment.runner.reported = None
            assignment.runner.since = time.time()
            self._cond.notify_all()

    def _record_result(self, job: Job, runner: str, result: Result) -> Message:
        """The state change a runner's result makes (called with self._cond held)."""
        if job.state.final:
            self.store.end_attempt(result.attempt, Outcome.SUPERSEDED, time.time())
            log.info(
                "commit %s attempt %d (runner %s): late %s result ignored, already %s",
                result.commit, result.attempt, runner, result.status, job.state.value,
            )
            return reply("OK", recorded=0)
        outcome = _OUTCOMES[ReportedStatus(result.status)]
        current = job.current_attempt == result.attempt
        if not current or job.state is not JobState.RUNNING:
            self.store.end_attempt(result.attempt, outcome, time.time())
            log.info(
                "commit %s attempt %d (runner %s): stale %s ignored",
                result.commit, result.attempt, runner, result.status,
            )
            return reply("OK", recorded=0)
        if outcome is Outcome.DECLINED:
            self.store.requeue(result.commit, result.attempt, outcome, time.time(), requires=result.requires)
            if result.requires is None:  # nothing to wait for: at least not this runner again
                self._avoid.setdefault(result.commit, set()).add(runner)
            log.info("commit %s attempt %d (runner %s): declined (%s); waits for a runner that has %s",
                     result.commit, result.attempt, runner, result.reason, result.requires or "it")
            self._cond.notify_all()
            return reply("OK", recorded=1)
        why = result.reason or ("infrastructure error on runner" if outcome is Outcome.ERROR else "handed back by runner")
        self._requeue(result.commit, result.attempt, runner, why, outcome)
        return reply("OK", recorded=1)

    # --- state changes (all called with self._cond held) ------------------------------

    def _settle(self, result: Result, state: JobState, runner: str | None) -> None:
        """Write the final result files, then record the job as final (all under the
        lock: for results without output; a runner's verdict is written outside it,
        see _on_results)."""
        now = self._complete(result, state, runner)
        self.live.discard(result.commit)  # before the files, as in _on_results
        result_files.write_result(self.results_dir, result)
        self._record_settled(result, state, now)

    def _complete(self, result: Result, state: JobState, runner: str | None) -> float:
        """Fill in what only the dispatcher knows of a final result (its verdict, its
        runner, the attempts it took, its times); returns when it became final. Called
        with the lock held."""
        job = self.store.job(result.commit)
        result.attempts, _ = self.store.attempt_counts(result.commit, job.round)
        result.run = job.run
        now = time.time()
        started = self.store.attempt(result.attempt).assigned_at if result.attempt else job.started_at
        result.status, result.runner = state.value, runner
        # Every new summary has both lists, empty when no failing test ran again.
        result.flaky_tests = [] if result.flaky_tests is None else result.flaky_tests
        result.reruns = [] if result.reruns is None else result.reruns
        result.shards = [] if result.shards is None else result.shards
        if result.shards and job.started_at is not None:
            started = job.started_at  # its first shard's start
        result.queued_at, result.started_at, result.finished_at = iso_time(job.queued_at), iso_time(started), iso_time(now)
        return now

    def _record_settled(self, result: Result, state: JobState, now: float) -> None:
        """Record a job whose result files are written as final; called with the lock held."""
        commit = result.commit
        summary = result.summary()
        self.store.finish(commit, result.attempt, state, Outcome(state.value), result.reason,
                          json.dumps(summary), now, flaky=flaky.records(summary), failing=result.failing)
        self.on_final_result()
        self.on_notification()
        self._avoid.pop(commit, None)
        self._ran.pop(commit, None)
        for other in self._assignments.values():
            if other.commit == commit:
                other.superseded = True
        log.info(
            "commit %s: %s (attempt %s, runner %s)%s%s",
            commit, state.value, result.attempt, result.runner, ": %s" % result.reason if result.reason else "",
            "; first failing commit %s" % result.first_failing if result.first_failing else "",
        )
        if state is not JobState.CANCELLED:
            self._find_culprit(commit)

    # --- culprit finding (culprit.py) -----------------------------------------------

    def _find_culprit(self, commit: str) -> None:
        """After ``commit``'s verdict (lock held): rank the commits a bisection needs, or
        record the first failing commit on the failed commits it was found for; their
        files are told on a thread of the pool, outside the lock."""
        before = {job.commit for job in self.store.queued_jobs(limit=8, order=self.order) if job.bisect is not None}
        rewrite = self.store.culprit_step(commit, self.coalesce)
        probes = [job.commit for job in self.store.queued_jobs(limit=8, order=self.order) if job.bisect is not None]
        if probes and set(probes) != before:
            log.info("commit %s: bisection for the first failing commit; next: %s", commit,
                     ", ".join(probe[:12] for probe in probes))
        self._cond.notify_all()
        if rewrite:
            self._pool.submit(self._name_first_failing, rewrite)

    def _name_first_failing(self, commits: list[str]) -> None:
        """Rewrite the files of failed ``commits`` to name the first failing commit the
        store has for each (lock not held), then tell the store they do."""
        named = 0
        with self._naming:
            for commit in commits:
                with self._cond:
                    job = self.store.job(commit)
                    if job is None or job.state is not JobState.FAILED or commit in self._settling:
                        continue
                try:
                    done = job.first_failing is not None and result_files.name_first_failing(
                        self.results_dir, commit, job.first_failing, job.run)
                except OSError as exc:
                    log.error("commit %s: result files not rewritten to name first failing commit %s: %s",
                              commit, job.first_failing, exc)
                    continue
                self.store.first_failing_written(commit, job.first_failing)
                if done:
                    named += 1
                    log.info("commit %s: first failing commit %s named in its result files", commit, job.first_failing)
        if named:
            self.on_final_result()

    def _lose(self, assignment: Assignment, why: str, outcome: Outcome) -> None:
        """An attempt out on a runner ended without a verdict: free the runner, requeue the job."""
        self._assignments.pop(assignment.attempt_id, None)
        if assignment.runner.assignment is assignment:
            assignment.runner.assignment = None
            assignment.runner.since = time.time()
        if assignment.commit in self._settling:
            return  # its verdict is being written: nothing to requeue
        if assignment.superseded:
            return
        if assignment.shard is not None:
            self._requeue_shard(assignment.commit, assignment.attempt_id, assignment.runner.name, why, outcome)
        else:
            self._requeue(assignment.commit, assignment.attempt_id, assignment.runner.name, why, outcome)

    def _requeue(self, commit: str, attempt_id: int, runner: str, why: str, outcome: Outcome) -> None:
        """Put a running job back in the queue, or settle it as an error after too many faults."""
        self.store.requeue(commit, attempt_id, outcome, time.time())
        if outcome.infra_failure:
            self._avoid.setdefault(commit, set()).add(runner)
        _, failures = self.store.attempt_counts(commit)
        if outcome.infra_failure and failures >= self.max_attempts:
            log.error("commit %s attempt %d (runner %s): %s; %d infrastructure failures, giving up",
                      commit, attempt_id, runner, why, failures)
            reason = "%s (after %d attempts)" % (why, failures)
            # No attempt of its own: the failed one has ended already, and the job is queued.
            self._settle(Result(commit, JobState.ERROR.value, reason=reason), JobState.ERROR, runner)
        else:
            log.warning("commit %s attempt %d (runner %s): %s; back in the queue", commit, attempt_id, runner, why)
        self._cond.notify_all()

    def _requeue_shard(self, commit: str, attempt_id: int, runner: str, why: str, outcome: Outcome,
                       requires: str | None = None) -> None:
        """An attempt at one shard ended without a result: that shard alone waits for a
        runner again (the others go on), or the job is an error after too many faults."""
        if not self.store.requeue_shard(attempt_id, outcome, time.time(), requires):
            log.info("commit %s attempt %d (runner %s): %s; not the shard's attempt any more", commit, attempt_id,
                     runner, why)
            return
        if outcome.infra_failure or (outcome is Outcome.DECLINED and requires is None):
            self._avoid.setdefault(commit, set()).add(runner)
        _, failures = self.store.attempt_counts(commit)
        if outcome.infra_failure and failures >= self.max_attempts:
            log.error("commit %s attempt %d (runner %s): %s; %d infrastructure failures, giving up",
                      commit, attempt_id, runner, why, failures)
            self._settle(Result(commit, JobState.ERROR.value, reason="%s (after %d attempts)" % (why, failures)),
                         JobState.ERROR, runner)
        else:
            shard = self.store.attempt(attempt_id).shard
            log.warning("commit %s attempt %d (runner %s): shard %s: %s; that shard alone waits for a runner again",
                        commit, attempt_id, runner, shard, why)
        self._cond.notify_all()

    def _drop(self, record: RunnerRecord, why: str) -> None:
        if self._runners.get(record.name) is record:
            del self._runners[record.name]
            self.store.forget_runner(record.name)
        log.warning("runner %s dropped: %s", record.name, why)
        if record.assignment is not None:
            self._lose(record.assignment, "runner %s lost (%s)" % (record.name, why), Outcome.LOST)

    def _lease_deadline(self) -> float:
        return time.monotonic() + LEASE_HEARTBEATS * self.heartbeat_interval + PING_TIMEOUT_S

    def _apply_ping(self, record: RunnerRecord, answer: Message | None) -> None:
        """Update a runner from its answer to a ping (None: no answer)."""
        if self._runners.get(record.name) is not record:
            return  # dropped or replaced while the ping was out
        if answer is None or answer.verb != "OK":
            record.missed_pings += 1
            self.missed_pings_total += 1
            if record.missed_pings >= MISSED_PINGS_LIMIT:
                self._drop(record, "%d pings unanswered" % record.missed_pings)
            return
        record.missed_pings = 0
        if not record.verified:
            record.verified = True
            log.info("runner %s answers at %s: ready", record.name, format_address(record.address))
        assignment = record.assignment
        if answer.get("state") == RunnerState.BUSY:
            commit, attempt_id = answer.get("commit"), answer.get("attempt")
            record.reported = (commit, attempt_id)
            if assignment is not None and assignment.attempt_id == attempt_id:
                assignment.acknowledged = True
                assignment.lease_expires = self._lease_deadline()
            elif assignment is None and commit is not None and attempt_id is not None:
                self._adopt(record, commit, attempt_id)
        else:
            record.reported = None
            if assignment is not None and assignment.superseded:
                record.assignment = None
        self._cond.notify_all()

    def _adopt(self, record: RunnerRecord, commit: str, attempt_id: int) -> None:
        attempt = self.store.attempt(attempt_id)
        if attempt is None or attempt.commit != commit:
            return
        if self.store.adopt(commit, attempt_id, record.name):
            # A shard's: how many its commit has (its live log and the queue name it "I of K").
            job = self.store.job(commit) if attempt.shard is not None else None
            assignment = Assignment(commit, attempt_id, record, self._lease_deadline(), acknowledged=True,
                                    shard=attempt.shard, shards=job.shards if job is not None else None)
            record.assignment = assignment
            record.since = time.time()
            self._assignments[attempt_id] = assignment
            log.info("commit %s attempt %d: runner %s is still running it; adopted", commit, attempt_id, record.name)

    def _reap_leases(self) -> None:
        now = time.monotonic()
        for record in list(self._runners.values()):
            assignment = record.assignment
            if assignment is not None and now > assignment.lease_expires:
                if assignment.superseded:
                    record.assignment = None
                else:
                    self._lose(assignment, "runner %s stopped confirming the job" % record.name, Outcome.LOST)

    # --- scheduler -----------------------------------------------------------------

    def _schedule_loop(self) -> None:
        # A runner still running a job from before the restart says so in its first
        # answer, and the job is adopted; handed out before that, it would run twice.
        concurrent.futures.wait(self._first_pings, timeout=PING_TIMEOUT_S * 2 + 1)
        while not self._stop.is_set():
            try:
                with self._cond:
                    planned = self._plan()
                    if not planned:
                        # Woken by dispatch, register, a verified runner, a result or a
                        # requeue; the timeout is only a safety net.
                        self._cond.wait(SCHEDULER_RECHECK_S)
                        continue
                self.on_notification()  # a commit status: pending
                for assignment in planned:
                    self._pool.submit(self._send_runtest, assignment)
            except Exception:  # noqa: BLE001 - e.g. a full disk: the scheduler must outlive it
                log.exception("scheduler: unexpected error; retrying in %g s", LOOP_RETRY_S)
                self._stop.wait(LOOP_RETRY_S)

    def _plan(self) -> list[Assignment]:
        """Pair queued jobs, in the queue's order (``self.order``: tips first, or oldest
        first), with available runners that can run them (``requires``), idle longest
        first. Shards waiting for a runner go first (their commit has begun); a job
        that finds more runners idle than the jobs after it need is split in shards
        (sharding.py), each to a runner of its own."""
        idle = sorted((r for r in self._runners.values() if r.available), key=lambda r: r.since)
        if not idle:
            return []
        planned: list[Assignment] = []
        plans: dict[str, Shard] = {}
        for job, shard in self.store.waiting_shards(limit=len(idle) + 32):
            choice = self._choose(job, idle, shard=True)
            if choice is None:
                continue
            if job.commit not in plans:
                plans[job.commit] = self.store.shards_of(job.commit, job.run)[0]
            planned.append(self._give(job, choice, idle, shard, plans[job.commit].shards, plans[job.commit].plan))
            if not idle:
                return planned
        offered = frozenset().union(*(runner.offers for runner in idle))
        jobs = [job for job in self.store.queued_jobs(limit=len(idle) + 32, offered=offered, order=self.order)
                if not (job.shards and job.round == 0)]  # split already: its shards were above
        for index, job in enumerate(jobs):
            if not idle:
                break
            choice = self._choose(job, idle)
            if choice is None:
                continue
            split = self._split(job, idle, waiting_after=len(jobs) - index - 1)
            if split is None:
                planned.append(self._give(job, choice, idle))
                continue
            shards, plan = split
            for shard in range(1, shards + 1):
                # The first goes to the runner chosen above if it runs shards; one that
                # finds none (runners that failed the commit before, or that do not run
                # shards) waits, and goes out with the next plan.
                if shard > 1 or not choice.runs_shards:
                    choice = self._choose(job, idle, shard=True)
                if choice is None:
                    break
                planned.append(self._give(job, choice, idle, shard, shards, plan))
        return planned

    def _choose(self, job: Job, idle: list[RunnerRecord], shard: bool = False) -> RunnerRecord | None:
        """The idle runner ``job`` (with ``shard``: a shard of it) goes to, or None: one
        that can run it, not one that failed it before when another can take it
        instead, and, for a rerun of failing tests, another than the one that ran them
        when one is free."""
        commit = job.commit
        able = [runner for runner in idle if runner.can_run(job, shard)]
        if not able:
            return None
        if job.round:  # failing tests run again: on another runner when one is free
            able.sort(key=lambda runner: runner.name in self._ran.get(commit, ()))
        avoid = self._avoid.get(commit, set())
        choice = next((r for r in able if r.name not in avoid), None)
        if choice is None:
            # Every idle runner already failed this job. Use one anyway only if no
            # runner could take it instead; otherwise leave it for the others.
            if any(name not in avoid and runner.can_run(job, shard) for name, runner in self._runners.items()):
                return None
            choice = able[0]
        return choice

    def _split(self, job: Job, idle: list[RunnerRecord], waiting_after: int) -> tuple[int, bytes] | None:
        """Split ``job``'s first round in shards, when the idle runners that can run it
        are more than the jobs after it need: (how many, the plan), recorded; None: not
        split (sharding off, a rerun, or fewer than two known test files)."""
        if self.max_shards < 2 or job.round != 0:
            return None
        able = sum(1 for runner in idle if runner.can_run(job, shard=True))
        if able - waiting_after < 2:
            return None
        durations = self.store.durations()
        shards = sharding.shard_count(able, waiting_after, self.max_shards, len(durations))
        if shards < 2:
            return None
        assigned, loads = sharding.plan(durations, shards)
        plan = sharding.encode_plan(assigned)
        self.store.split(job.commit, shards, plan)
        log.info("commit %s: split in %d shards over idle runners, expected %s s (%d test files known)", job.commit,
                 shards, " / ".join("%.1f" % load for load in loads), len(durations))
        return shards, plan

    def _give(self, job: Job, choice: RunnerRecord, idle: list[RunnerRecord], shard: int | None = None,
              shards: int | None = None, plan: bytes | None = None) -> Assignment:
        """Record ``job`` (or its shard ``shard``) as assigned to ``choice``, taken off ``idle``."""
        idle.remove(choice)
        commit = job.commit
        if shard is None:
            attempt_id = self.store.assign(commit, choice.name, time.time())
        else:
            attempt_id = self.store.assign_shard(commit, shard, choice.name, time.time())
        assignment = Assignment(commit, attempt_id, choice, self._lease_deadline(),
                                tests=job.retest if shard is None else None, shard=shard, shards=shards, plan=plan)
        choice.assignment = assignment
        choice.since = time.time()
        self._assignments[attempt_id] = assignment
        return assignment

    def _send_runtest(self, assignment: Assignment) -> None:
        record = assignment.runner
        with self._cond:
            if self._assignments.get(assignment.attempt_id) is not assignment:
                return  # lost while it waited for a thread: sent now, it would run twice
        try:
            answer = communicate(
                record.address,
                request("runtest", commit=assignment.commit, attempt=assignment.attempt_id,
                        tests=None if assignment.tests is None else flaky.encode_test_ids(assignment.tests),
                        shard=assignment.shard, shards=assignment.shards, plan=assignment.plan),
                timeout=RUNTEST_TIMEOUT_S,
                total_timeout=RUNTEST_TIMEOUT_S * 2,
                security=record.security,
            )
        except (OSError, ProtocolError) as exc:
            answer = error(str(exc) or exc.__class__.__name__)
        with self._cond:
            if self._assignments.get(assignment.attempt_id) is not assignment:
                return  # settled or lost meanwhile (a fast result can beat the OK)
            if answer.verb == "OK":
                assignment.acknowledged = True
                assignment.lease_expires = self._lease_deadline()
                log.info("commit %s attempt %d: running on runner %s%s", assignment.commit, assignment.attempt_id,
                         record.name, "" if assignment.shard is None else " (shard %d of %d)" % (
                             assignment.shard, assignment.shards))
                return
            if answer.verb == "BUSY":
                # Busy with something we do not know of; not available until it says idle.
                record.reported = (None, None)
                self._lose(assignment, "runner %s is busy" % record.name, Outcome.REFUSED)
            else:
                reason = str(answer.get("reason"))
                if assignment.shard is not None and reason.startswith("unknown option") and record.runs_shards:
                    record.runs_shards = False
                    log.warning("runner %s does not run shards (%s: a version before sharding?): it gets whole "
                                "commits alone until it registers again", record.name, reason)
                record.verified = False  # a ping must succeed before it gets another job
                self._lose(assignment, "runner %s refused: %s" % (record.name, reason), Outcome.REFUSED)
                self._pool.submit(self._verify, record)

    # --- fetch ahead -----------------------------------------------------------------

    def _fetch_ahead(self, commit: str) -> None:
        """Have every runner fetch ``commit`` now, while it may still be testing another
        one, so that the checkout of its job finds it there (the fetch-ahead thread
        sends it; of a burst, only the newest is sent: a runner's fetch gets every branch)."""
        with self._fetch_cond:
            self._fetch_wanted = commit
            self._fetch_cond.notify_all()

    def _fetch_ahead_loop(self) -> None:
        while not self._stop.is_set():
            with self._fetch_cond:
                while self._fetch_wanted is None and not self._stop.is_set():
                    self._fetch_cond.wait()
                commit, self._fetch_wanted = self._fetch_wanted, None
            if commit is None:
                continue
            with self._cond:
                runners = [(r.name, r.address, r.security) for r in self._runners.values() if r.verified]
            for name, address, security in runners:
                if self._stop.is_set():
                    return
                try:
                    answer = communicate(address, request("fetch", commit=commit), timeout=PING_TIMEOUT_S,
                                         connect_timeout=PING_TIMEOUT_S, security=security,
                                         total_timeout=PING_TIMEOUT_S * 2)
                except (OSError, ProtocolError) as exc:
                    answer = error(str(exc) or exc.__class__.__name__)
                if answer.verb != "OK":  # a runner of an older version, or one that is gone: its checkout fetches
                    log.debug("runner %s: fetch ahead of commit %s: %s", name, commit, answer.get("reason"))

    # --- heartbeat -----------------------------------------------------------------

    def _ping(self, record: RunnerRecord) -> Message | None:
        try:
            # All of it bounded: a runner that answers a byte at a time must not hold
            # one of the threads every ping and runtest share.
            return communicate(record.address, request("ping"), timeout=PING_TIMEOUT_S,
                               connect_timeout=PING_TIMEOUT_S, security=record.security,
                               total_timeout=PING_TIMEOUT_S * 2)
        except (OSError, ProtocolError) as exc:
            log.debug("runner %s: ping failed: %s", record.name, exc)
            return None

    def _verify(self, record: RunnerRecord) -> None:
        answer = self._ping(record)
        with self._cond:
            self._apply_ping(record, answer)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._heartbeat()
            except Exception:  # noqa: BLE001 - e.g. a result that cannot be written: the next round retries
                log.exception("heartbeat: unexpected error")

    def _heartbeat(self) -> None:
        if self.keys is not None:
            # A key removed from the file by hand is heard of here even when no one
            # sends a message with it: its runner goes now, not at its next message.
            self.keys.refresh()
            if self.keys.generation != self._keys_checked:
                self._drop_runners_without_keys()
        with self._cond:
            records = list(self._runners.values())
        futures = [self._pool.submit(self._ping, record) for record in records]
        concurrent.futures.wait(futures, timeout=PING_TIMEOUT_S * 2 + 1)
        with self._cond:
            for record, future in zip(records, futures):
                answer = future.result() if future.done() and not future.cancelled() else None
                self._apply_ping(record, answer)
            self._reap_leases()


#: How an attempt ended, by what its runner reported when that was no verdict.
_OUTCOMES = {ReportedStatus.ERROR: Outcome.ERROR, ReportedStatus.ABORTED: Outcome.RETURNED,
             ReportedStatus.DECLINED: Outcome.DECLINED}


def _json_reply(document: dict) -> Message:
    return reply("OK", json=json.dumps(document).encode("utf-8"))


def _who(message: Message, peer: str) -> str:
    """Who sent ``message``, for log lines: its address, and its key if it is a named one."""
    key = message.key
    return peer if key is None or key.shared else "%s (key %s)" % (peer, key.name)


def _no_keys_file(message: Message, peer: str) -> Message:
    log.warning("%s sent %s, but there is no keys file: refused", _who(message, peer), message.verb)
    return error("no keys file: start the dispatcher with --keys-file to manage keys")


# --- command line ----------------------------------------------------------------------


def default_db_path(results_dir: str) -> str:
    """The queue lives beside the results folder: ``test_results`` -> ``test_results.queue.sqlite3``."""
    return os.path.abspath(results_dir).rstrip(os.sep) + ".queue.sqlite3"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-dispatcher",
        description="Run the CI dispatcher: queue commits from the observer, hand them to "
        "registered test runners, watch the runners, and write one result per commit.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--results-dir", default="test_results", help="folder for result files (default: %(default)s)")
    parser.add_argument("--db", help="SQLite file of the job queue (default: beside the results folder, RESULTS_DIR.queue.sqlite3)")
    parser.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                        help="infrastructure failures (runner lost, checkout failed) before a commit's verdict is 'error' (default: %(default)s)")
    parser.add_argument("--flaky-reruns", type=int, default=flaky.DEFAULT_RERUNS, metavar="N",
                        help="when tests fail, run the failing tests again up to N times (at most %d), on another "
                        "runner when one is free; if they pass, the commit's verdict is 'flaky'. 0: never "
                        "(default: %%(default)s)" % flaky.MAX_RERUNS)
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S,
                        help="seconds between pings to each runner; a runner missing %d in a row is dropped (default: %%(default)s)" % MISSED_PINGS_LIMIT)
    parser.add_argument("--order", choices=QUEUE_ORDERS, default="tip",
                        help="which queued commit a free runner gets: 'tip', each branch's newest commit first "
                        "(the branches' in the order they got them), then the others newest first; 'fifo', the "
                        "oldest dispatched first (default: %(default)s)")
    parser.add_argument("--coalesce", action="store_true",
                        help="for busy teams: test only each branch's tip (when a runner is free) and the commits "
                        "a bisection needs to find the first failing one; the others are 'skipped' (no result). "
                        "Default: every commit is tested")
    parser.add_argument("--max-shards", type=int, default=sharding.DEFAULT_MAX_SHARDS, metavar="K",
                        help="when more runners are idle than commits wait, split a commit's tests in up to K shards, "
                        "one per idle runner, balanced by the durations of earlier runs (at most %d; 1: never split; "
                        "a repository can say shard = false in .commit-ci.toml) (default: %%(default)s)"
                        % sharding.MAX_SHARDS)
    parser.add_argument("--repo", metavar="PATH",
                        help="a clone of the watched repository for the dispatcher alone (not the observer's or "
                        "a runner's), used only to read commit subjects and authors for the results page "
                        "(index.html); it is fetched into when a commit is not in it yet. Without it the page "
                        "shows commit ids only")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="also serve HTTP on --host at this port (0 picks a free one), read-only and without "
                        "authentication, with TLS when --tls-cert is given: the live results page at /, each "
                        "commit's files, JSON at /api/..., Prometheus metrics at /metrics (README, HTTP). "
                        "Default: no HTTP")
    notify.add_arguments(parser)
    add_logging_arguments(parser)
    add_security_arguments(parser, serves=True, keys=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    if args.max_attempts < 1 or args.heartbeat_interval <= 0:
        log.error("--max-attempts must be at least 1 and --heartbeat-interval positive")
        return 2
    if not 1 <= args.max_shards <= sharding.MAX_SHARDS:
        log.error("--max-shards must be 1 to %d", sharding.MAX_SHARDS)
        return 2
    if not 0 <= args.flaky_reruns <= flaky.MAX_RERUNS:
        log.error("--flaky-reruns must be 0 to %d", flaky.MAX_RERUNS)
        return 2
    try:
        security = security_from_arguments(args, serves=True, keys=True)
        channels = notify.channels_from_arguments(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    os.makedirs(args.results_dir, exist_ok=True)
    db_path = args.db or default_db_path(args.results_dir)
    stop = threading.Event()
    install_stop_signals(stop, log)
    store = JobStore(db_path)
    # Before the first verdict (start-up records results found in the folder).
    store.notify_to([channel.name for channel in channels if not channel.status],
                    [channel.name for channel in channels if channel.status])
    results_dir = os.path.abspath(args.results_dir)
    try:
        # A connection of its own: building the page never waits for the dispatcher's lock.
        page = ResultsPage(results_dir, JobStore(db_path, read_only=True), repo=args.repo)
    except ValueError as exc:
        log.error("--repo: %s", exc)
        store.close()
        return 2
    metadata = None
    if channels and args.repo:
        from commit_ci.commit_metadata import CommitMetadata

        metadata = CommitMetadata(args.repo)  # checked already by the page's
    notifier = notify.Notifier(store, channels, results_dir, args.results_url, metadata, args.notify_retry_cap)
    dispatcher = Dispatcher(store, results_dir, args.max_attempts, args.heartbeat_interval, security,
                            on_final_result=page.notify, order=args.order, on_branch_change=page.notify,
                            flaky_reruns=args.flaky_reruns, coalesce=args.coalesce, max_shards=args.max_shards,
                            on_notification=notifier.wake)
    try:
        # Recording a result, adding or revoking a key, write files (fsync'd): each gets a
        # thread of its own rather than hold up the event loop that answers everyone else.
        server = ProtocolServer((args.host, args.port), dispatcher.handle, log, security,
                                threaded_verbs={"results", "key-add", "key-revoke"})
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        page.stop()
        store.close()
        return 1
    http_server = None
    if args.http_port is not None:
        from commit_ci.metrics import metrics_registry  # prometheus_client: only with --http-port
        from commit_ci.web import WebServer
        from commit_ci.web import serve_in_thread as serve_http_in_thread

        metrics_store = JobStore(db_path, read_only=True)
        try:
            http_server = WebServer((args.host, args.http_port), dispatcher.handle, page.live_page, results_dir,
                                    metrics_registry(dispatcher, metrics_store,
                                                     notifications_pending=metrics_store.notifications_pending),
                                    tls=security.server_tls)
        except OSError as exc:
            log.error("cannot listen for HTTP on %s:%d: %s", args.host, args.http_port, exc)
            server.server_close()
            metrics_store.close()
            page.stop()
            store.close()
            return 1
    dispatcher.start()
    notifier.start()
    # After the recovery in start(): the first page includes what it recorded.
    page.start()
    log.info("results page: %s (commit subjects from %s)", page.path, args.repo or "nowhere: no --repo")
    serve_in_thread(server, "server")
    log.info(
        "listening on %s (results in %s, queue in %s, order %s%s, %s; %s, %s)",
        format_address(server.address), os.path.abspath(args.results_dir), db_path, args.order,
        ", coalesce: tips and bisections only" if args.coalesce else ", every commit",
        "up to %d shards per commit" % args.max_shards if args.max_shards > 1 else "no sharding",
        _authentication(security), "TLS" if security.server_tls else "no TLS",
    )
    if http_server is not None:
        serve_http_in_thread(http_server)
        log.info("HTTP on %s://%s/ (read-only, no authentication: the results page, /api, /metrics)",
                 "https" if security.server_tls else "http", format_address(http_server.address))
    stop.wait()
    log.info("stopping: no new connections")
    if http_server is not None:
        http_server.shutdown()
        http_server.server_close()
        metrics_store.close()
    server.shutdown()
    server.server_close()
    dispatcher.stop()
    notifier.stop()
    page.stop()
    store.close()
    log.info("stopped")
    return 0


def _authentication(security: Security) -> str:
    if security.auth is None:
        return "no authentication"
    what = ["the shared secret"] if security.auth.key is not None else []
    if security.keyring is not None:
        what.append("the keys of %s" % security.keyring.path)
    return "messages authenticated with %s" % " and ".join(what)


if __name__ == "__main__":
    sys.exit(main())
