"""Test runner: tests one commit at a time in its own clone and reports the verdict.

A runner listens for the dispatcher's ``ping`` (answered at once, even mid-job, with
what it is doing), ``runtest`` (answered ``OK`` or ``BUSY`` at once; the job runs
on the worker thread; with a ``tests`` section, it reruns only those failing tests) and ``stop`` (a job cancelled: its steps are killed and it is
handed back, or, not started yet, never starts). The runner is in parts, one job each:

* this module: the requests, the one job held (and one offered while the last
  result is on its way), the worker thread, starting and stopping;
* executor.py: one job -- a clean checkout of the commit, the tests in a process
  group of their own under a time limit, what they left running killed -- and its
  result;
* outbox.py: results kept on disk (in the clone's .git folder) until the dispatcher
  has them, even across a restart of the runner;
* dispatcher_link.py: registering (again whenever pings stop coming), delivering the
  results, and exiting once the dispatcher has been unreachable for
  ``--dispatcher-timeout`` seconds, to free its machine.

On SIGTERM or Ctrl-C the runner stops the tests in progress and hands the job back to
the dispatcher, which gives it to another runner. The runner is a child subreaper: a
process the checkout or the tests started that outlives its parent comes back to the
runner, even from another session (a daemon a test started), and is killed before
the job's result is sent (leftovers.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import sys
import threading

import git

from commit_ci import sharding
from commit_ci.daemon import add_logging_arguments, install_stop_signals, setup_logging
from commit_ci.dispatcher_link import RESULTS_TIMEOUT_S, DispatcherLink
from commit_ci.environments import (
    DEFAULT_MAX_ENVIRONMENTS,
    DEFAULT_SETUP_TIMEOUT_S,
    EnvironmentCache,
    Installer,
    Interpreter,
    default_cache_dir,
    find_interpreters,
)
from commit_ci.executor import SHUTTING_DOWN, Executor, ShardSpec
from commit_ci.flaky import MAX_TEST_IDS_BYTES, decode_test_ids
from commit_ci.isolation import (
    DEFAULT_JOB_USER,
    Cgroups,
    Isolation,
    IsolationError,
    JobUser,
    find_sandbox,
    new_job_root,
    parse_size,
)
from commit_ci.leftovers import become_subreaper
from commit_ci.live_log import LiveSender
from commit_ci.outbox import Outbox
from commit_ci.processes import KILL_GRACE_S
from commit_ci.protocol import Message, error, reply
from commit_ci.result import Result
from commit_ci.security import Security, add_security_arguments, runner_name, security_from_arguments
from commit_ci.server import ProtocolServer, serve_in_thread
from commit_ci.states import ReportedStatus, RunnerState
from commit_ci.wire import format_address, parse_address

log = logging.getLogger("runner")

DEFAULT_DISPATCHER = "localhost:8888"
#: Longest a test run may take before its process group is killed (verdict: failed, timeout).
DEFAULT_TEST_TIMEOUT_S = 30 * 60
#: Exit after the dispatcher has been unreachable this long (0: never).
DEFAULT_DISPATCHER_TIMEOUT_S = 120.0
#: Longest the checkout (fetch, reset, clean) may take before it is killed (an
#: infrastructure error: the job is retried elsewhere).
DEFAULT_CHECKOUT_TIMEOUT_S = 10 * 60.0
#: The reason a job the dispatcher cancelled is handed back with.
CANCELLED = "cancelled by the dispatcher"


class TestRunner:
    """One runner: its server, its worker thread, its executor, outbox and link."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(
        self,
        clone: str,
        dispatcher: tuple[str, int],
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        name: str | None = None,
        test_command: str | None = None,
        timeout: float = DEFAULT_TEST_TIMEOUT_S,
        dispatcher_timeout: float = DEFAULT_DISPATCHER_TIMEOUT_S,
        checkout_timeout: float = DEFAULT_CHECKOUT_TIMEOUT_S,
        state_dir: str | None = None,
        security: Security | None = None,
        warm_pytest: bool = True,
        subreaper: bool = False,
        interpreters: dict[str, Interpreter] | None = None,
        cache: EnvironmentCache | None = None,
        isolation: Isolation | None = None,
    ):
        """``subreaper``: this process is a child subreaper (``main`` made it one), so the
        processes a job leaves behind come back to it as children, to be killed. Only
        then is a child the runner does not know a leftover; in any other process (a
        test that embeds a runner) it may be anyone's. ``interpreters`` (by version) and
        ``cache`` are what environments are built with (executor.py); without a cache
        every job runs with the runner's own interpreter. ``isolation`` keeps jobs from the
        runner's keys (isolation.py; ``isolation_from_arguments`` builds what ``main``
        uses); without it, jobs get only their own variables and folders."""
        self.security = security or Security()
        repo = git.Repo(clone)  # fails early, with git's message, if it is not a clone
        self.clone = repo.working_tree_dir
        self.state_dir = state_dir or os.path.join(repo.git_dir, "ci_runner")
        os.makedirs(self.state_dir, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # undelivered results and logs: no job may read or forge them
        if isolation is not None:
            isolation.prepare_clone(self.clone)
        self.stop_event = threading.Event()
        #: Stops the job in progress: set on shutdown, or when the dispatcher cancels it.
        self.job_stop = threading.Event()
        #: Sends the output of the tests in progress to the dispatcher while they run.
        self.live = LiveSender(dispatcher, self.security, self.stop_event)
        self.executor = Executor(self.clone, repo.git_dir, self.state_dir, test_command, timeout, checkout_timeout,
                                 self.job_stop, warm_pytest=warm_pytest, subreaper=subreaper,
                                 interpreters=interpreters, cache=cache, isolation=isolation, live=self.live)
        self.outbox = Outbox(os.path.join(self.state_dir, "pending"))
        self.server = ProtocolServer((host, port), self.handle, log, self.security)
        bound_port = self.server.address[1]
        self.advertise_host = advertise_host or (socket.getfqdn() if host in ("0.0.0.0", "::", "") else host)
        self.name = name or "%s:%d" % (self.advertise_host, bound_port)
        self.link = DispatcherLink(dispatcher, self.security, self.outbox, self.advertise_host, bound_port, self.name,
                                   self.current_job, self.stop_event, dispatcher_timeout,
                                   pythons=tuple(sorted(interpreters or ())))
        self._cond = threading.Condition()
        self._job: tuple[str, int] | None = None  # accepted and not yet reported
        #: The tests of ``_job`` are over and its result is being reported.
        self._reporting = False
        #: A job accepted while ``_job``'s result was on its way; started next.
        self._next: tuple[str, int] | None = None
        #: The job the executor runs now, and the one of it the dispatcher cancelled.
        self._started: tuple[str, int] | None = None
        self._stopped: tuple[str, int] | None = None
        #: Jobs accepted and cancelled before they started (at most ``_job`` and ``_next``).
        self._cancelled: set[tuple[str, int]] = set()
        #: Of ``_job`` and ``_next``, those that rerun failing tests: the tests' node ids.
        self._tests: dict[tuple[str, int], tuple[str, ...]] = {}
        #: Of ``_job`` and ``_next``, those that run one shard of the tests (sharding.py).
        self._shards: dict[tuple[str, int], ShardSpec] = {}
        self._threads: list[threading.Thread] = []
        #: The commit the dispatcher last said is queued, to fetch ahead (``_fetch_loop``).
        self._fetch_cond = threading.Condition()
        self._fetch_wanted: str | None = None

    @property
    def exit_code(self) -> int:
        return self.link.exit_code

    def current_job(self) -> tuple[str, int] | None:
        """The job this runner holds, as (commit, attempt): the one offered last, or None."""
        with self._cond:
            return self._next or self._job

    # --- requests ------------------------------------------------------------------

    def handle(self, message: Message, peer: str) -> Message:
        if message.verb == "ping":
            self.link.heard_from_dispatcher()
            job = self.current_job()
            if job is None:
                job = self.outbox.oldest()
                if job is not None:
                    # A kept result still owns its job: saying so keeps the dispatcher from
                    # running it again (or giving this runner another) before it arrives.
                    self.link.wake_delivery()
            if job is None:
                return reply("OK", state=RunnerState.IDLE.value)
            return reply("OK", state=RunnerState.BUSY.value, commit=job[0], attempt=job[1])
        if message.verb == "runtest":
            self.link.heard_from_dispatcher()
            commit, attempt = message.fields["commit"], message.fields["attempt"]
            try:
                tests = self._tests_asked(message)
                shard = self._shard_asked(message)
            except ValueError as exc:
                log.warning("commit %s attempt %d offered by %s with tests to run that are not test ids: %s",
                            commit, attempt, peer, exc)
                return error("invalid tests: %s" % exc)
            with self._cond:
                if self.stop_event.is_set() or self._next is not None or (self._job is not None and not self._reporting):
                    log.info("commit %s attempt %d offered by %s: busy", commit, attempt, peer)
                    return reply("BUSY")
                if self._job is None:
                    self._job = (commit, attempt)
                else:
                    # The tests of the current job are over and its result is on its way.
                    # The dispatcher frees a runner the moment a result arrives, so its next
                    # offer can come before this runner has read the reply: take it, and start
                    # it once the report is done, rather than answer BUSY and sit idle until
                    # the dispatcher's next ping.
                    self._next = (commit, attempt)
                if tests is not None:
                    self._tests[(commit, attempt)] = tests
                if shard is not None:
                    self._shards[(commit, attempt)] = shard
                self._cond.notify_all()
            log.info("commit %s attempt %d accepted from %s%s", commit, attempt, peer,
                     ": a rerun of %d failing test(s)" % len(tests) if tests is not None else
                     ": shard %d of %d" % (shard.shard, shard.shards) if shard is not None else "")
            return reply("OK")
        if message.verb == "fetch":
            with self._fetch_cond:
                self._fetch_wanted = message.fields["commit"]
                self._fetch_cond.notify_all()
            return reply("OK")
        if message.verb == "stop":
            job = (message.fields["commit"], message.fields["attempt"])
            with self._cond:
                if job == self._started:
                    self._stopped = job
                    self.job_stop.set()
                    what = "stopping it"
                elif job in (self._job, self._next):
                    self._cancelled.add(job)
                    what = "it will not start"
                else:
                    what = "not running it"
            log.info("commit %s attempt %d cancelled by %s: %s", job[0], job[1], peer, what)
            return reply("OK")
        log.warning("%s sent %s, which is for the dispatcher", peer, message.verb)
        return error("%s is not a runner request" % message.verb)

    @staticmethod
    def _shard_asked(message: Message) -> ShardSpec | None:
        """The shard a ``runtest`` asks to run alone (sharding.py), or None for all the
        tests; ValueError if its number, count or plan are not ones (the plan's paths
        came from a commit's tests, and reach pytest's plugin here)."""
        shard, shards = message.get("shard"), message.get("shards")
        if shard is None and shards is None:
            return None
        if shard is None or shards is None or shard > shards or "tests" in message.sections:
            raise ValueError("a shard needs shard=I and shards=K, 1 <= I <= K, and no tests")
        if "plan" in message.truncated:
            raise ValueError("the plan is longer than its limit")
        plan = sharding.decode_plan(message.sections.get("plan") or b"{}", shards)
        return ShardSpec(shard, shards, sharding.encode_plan(plan))

    @staticmethod
    def _tests_asked(message: Message) -> tuple[str, ...] | None:
        """The node ids a ``runtest`` asks to run (a rerun of failing tests), or None for
        the whole test suite; ValueError if they are not test ids (flaky.py): they came
        from a commit's tests, and become pytest's arguments here."""
        if "tests" in message.truncated:
            raise ValueError("the list is longer than %d bytes" % MAX_TEST_IDS_BYTES)
        data = message.sections.get("tests")
        if data is None:
            return None
        tests = decode_test_ids(data)
        if not tests:
            raise ValueError("the list is empty")
        return tests

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        self._threads.append(serve_in_thread(self.server, "server"))
        for name, target in (("worker", self._work_loop), ("fetch-ahead", self._fetch_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.live.start()
        self.link.start()

    def shutdown(self) -> None:
        """Stop: hand back the job in progress, stop serving, join the worker."""
        self.stop_event.set()
        self.link.shutdown()
        with self._cond:
            self.job_stop.set()  # under the lock: the worker clears it only before it starts a job
            self._cond.notify_all()
        with self._fetch_cond:
            self._fetch_cond.notify_all()
        for thread in self._threads:
            if thread.name == "worker":
                thread.join(timeout=KILL_GRACE_S + RESULTS_TIMEOUT_S)
        self.server.shutdown()
        self.server.server_close()

    # --- the jobs ------------------------------------------------------------------

    def _work_loop(self) -> None:
        self.executor.start()
        while True:
            with self._cond:
                while self._job is None and not self.stop_event.is_set():
                    self._cond.wait()
                if self.stop_event.is_set():
                    job = self._job
                    self._job = self._next = None
                    self._tests.clear()
                    self._shards.clear()
                    break
                commit, attempt = self._job
                cancelled = self._job in self._cancelled
                self._cancelled.discard(self._job)
                tests = self._tests.pop(self._job, None)
                shard = self._shards.pop(self._job, None)
                if not cancelled:
                    self.job_stop.clear()
                    self._started = self._job
            if cancelled:
                result = Result(commit, ReportedStatus.ABORTED.value, attempt=attempt, reason=CANCELLED)
            else:
                result = self._run(commit, attempt, tests, shard)
            with self._cond:
                if self._stopped == (commit, attempt) and result.status == ReportedStatus.ABORTED:
                    result.reason = CANCELLED
                self._started = self._stopped = None
                self._reporting = True
            try:
                self._report(result)
            except Exception:  # noqa: BLE001 - e.g. a full disk: the job's lease runs out and it is retried
                log.exception("commit %s attempt %d: could not keep or deliver the result", commit, attempt)
            finally:
                with self._cond:
                    self._job, self._next = self._next, None
                    self._reporting = False
            self.executor.between_jobs()
        if job is not None:
            # Accepted but never started: hand it back so it runs elsewhere now.
            self.link.deliver(Result(job[0], ReportedStatus.ABORTED.value, attempt=job[1], reason=SHUTTING_DOWN))
        self.executor.close()

    def _fetch_loop(self) -> None:
        """Fetch each commit the dispatcher says is queued (of several said meanwhile,
        the last), beside the job in progress."""
        while True:
            with self._fetch_cond:
                while self._fetch_wanted is None and not self.stop_event.is_set():
                    self._fetch_cond.wait()
                if self.stop_event.is_set():
                    return
                commit, self._fetch_wanted = self._fetch_wanted, None
            try:
                self.executor.fetch_ahead(commit, self.stop_event)
            except Exception:  # noqa: BLE001 - the checkout fetches what this did not
                log.exception("commit %s: fetch ahead failed", commit)

    def _run(self, commit: str, attempt: int, tests: tuple[str, ...] | None, shard: ShardSpec | None = None) -> Result:
        try:
            return self.executor.run(commit, attempt, tests, shard)
        except Exception as exc:  # noqa: BLE001 - a fault of this runner, not a verdict: retried elsewhere
            log.exception("commit %s attempt %d: the runner failed", commit, attempt)
            return Result(commit, ReportedStatus.ERROR.value, attempt=attempt,
                          reason="runner fault: %s" % (str(exc) or type(exc).__name__))

    def _report(self, result: Result) -> None:
        """Keep a result in the outbox, then deliver it with any others still kept."""
        if result.status == ReportedStatus.ABORTED:
            # Worthless later: if the dispatcher does not hear it now, the job's lease
            # runs out and it is requeued anyway.
            self.link.deliver(result)
            return
        path = self.outbox.keep(result)
        if not self.link.deliver_kept():
            log.warning("commit %s attempt %d: result kept in %s until the dispatcher is back",
                        result.commit, result.attempt, path)


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-runner",
        description="Run a CI test runner: register with the dispatcher, then test each commit "
        "it is given in REPO (a clone of the watched repository used only by this runner) "
        "and report the verdict.",
    )
    parser.add_argument("repo", metavar="REPO", help="path to this runner's own clone of the repository")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--advertise-host", help="address the dispatcher should use to reach this runner (default: --host)")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="where the dispatcher listens (default: %(default)s)")
    parser.add_argument("--name", help="runner name in logs and results (default: the name of its key, if it holds "
                        "one, else HOST:PORT)")
    parser.add_argument("--test-command", metavar="COMMAND",
                        help="shell command that runs the tests in the clone; exit status 0 means passed. "
                        "It may write JUnit XML to $CI_JUNIT_XML for counts. "
                        "(default: %s -m pytest --junitxml $CI_JUNIT_XML)" % shlex.quote(sys.executable))
    parser.add_argument("--no-warm-pytest", dest="warm_pytest", action="store_false",
                        help="start a new Python for every test run instead of forking one that has already "
                        "imported pytest (which saves about 0.3 CPU-seconds per commit; it is started again "
                        "when what it imported changes, such as an upgraded pytest)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TEST_TIMEOUT_S,
                        help="seconds the tests may take before they are killed and the commit fails "
                        "with reason 'timeout' (default: %(default)s)")
    parser.add_argument("--dispatcher-timeout", type=float, default=DEFAULT_DISPATCHER_TIMEOUT_S,
                        help="exit after the dispatcher has been unreachable this many seconds; 0 waits "
                        "forever (default: %(default)s)")
    parser.add_argument("--checkout-timeout", type=float, default=DEFAULT_CHECKOUT_TIMEOUT_S,
                        help="seconds the fetch and checkout of a commit may take before they are killed; "
                        "the job is then retried, on another runner if there is one (default: %(default)s)")
    parser.add_argument("--state-dir", help="where to keep undelivered results and work files "
                        "(default: REPO/.git/ci_runner)")
    environments = parser.add_argument_group(
        "environments", "a commit that is a Python project (or asks for it in .commit-ci.toml) is tested in a "
        "virtualenv of its own, with the project and its test dependencies installed; README.md says how")
    environments.add_argument("--python", action="append", default=[], metavar="PATH",
                              help="an interpreter to offer to commits that ask for its version (python = \"3.12\" "
                              "in .commit-ci.toml), besides this runner's own and each python3.N on PATH; repeatable")
    environments.add_argument("--installer", choices=("auto", "uv", "pip"), default="auto",
                              help="what builds environments: uv when installed (auto), or pip (default: %(default)s)")
    environments.add_argument("--env-cache", metavar="DIR", default=default_cache_dir(),
                              help="where environments are kept, shared by the runners of this user "
                              "(default: %(default)s)")
    environments.add_argument("--env-cache-size", type=int, default=DEFAULT_MAX_ENVIRONMENTS, metavar="N",
                              help="environments kept; the least recently used go first (default: %(default)s)")
    environments.add_argument("--setup-timeout", type=float, default=DEFAULT_SETUP_TIMEOUT_S, metavar="SECONDS",
                              help="longest that building an environment or installing the project may take "
                              "(default: %(default)s)")
    environments.add_argument("--no-environments", dest="environments", action="store_false",
                              help="test every commit with this runner's own interpreter and packages, as "
                              "versions before 0.2 did")
    isolation = parser.add_argument_group(
        "isolation", "a job never sees this runner's keys: it gets only some of its variables, and runs as another "
        "user (when the runner is root), in a sandbox (where bubblewrap works) and in a cgroup of its own (where "
        "cgroup v2 can be written); README.md, Isolation, says what each protects")
    isolation.add_argument("--job-user", metavar="NAME",
                           help="for a runner started as root: the user its jobs run as (default: %s; "
                           "'root' runs them as root, with the keys in reach)" % DEFAULT_JOB_USER)
    isolation.add_argument("--sandbox", choices=("auto", "on", "off"), default="auto",
                           help="run each job in a bubblewrap sandbox: read-only file system but for the clone and "
                           "the job's folders, a private /tmp, the state folder and key file hidden; auto uses it "
                           "where it works, on refuses to start without it (default: %(default)s)")
    isolation.add_argument("--job-memory", metavar="SIZE",
                           help="most memory a job may use, such as 2G: past it the kernel kills the job's processes "
                           "and the commit fails (needs a cgroup memory controller this runner can write)")
    isolation.add_argument("--job-env", action="append", default=[], metavar="NAME",
                           help="pass this variable of the runner's to jobs too (repeatable); README.md lists "
                           "the ones they get anyway. CI_SECRET never")
    add_logging_arguments(parser)
    add_security_arguments(parser, serves=True)
    return parser


#: Signals a runner may be started with ignored (``nohup`` ignores SIGHUP; a shell
#: without job control ignores SIGINT and SIGQUIT for a command run with ``&``).
INHERITED_IGNORES = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)


def stop_passing_on_ignored_signals() -> None:
    """A signal ignored in this process stays ignored in every test process it starts,
    so a test would see a different interpreter depending on how the runner was
    launched. A handler that does nothing keeps the runner as immune as it was
    (SIGINT gets the stop handler later), and exec resets a handler to the default.
    Must be called from the main thread, before any process is started.
    """

    def keep_ignoring(signum: int, _frame: object) -> None:
        log.info("%s received: ignored, as it was when the runner started", signal.Signals(signum).name)

    for signum in INHERITED_IGNORES:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, keep_ignoring)


def job_user_from_arguments(args) -> JobUser | None:
    """The user jobs run as, when it is not the runner's own; IsolationError if the
    options ask for one that cannot be."""
    if os.geteuid() != 0:
        if args.job_user and args.job_user != pwd.getpwuid(os.geteuid()).pw_name:
            raise IsolationError("--job-user: only a runner started as root can run jobs as another user")
        return None
    name = args.job_user or DEFAULT_JOB_USER
    if name == "root":
        log.warning("--job-user root: jobs run as root, with this runner's keys in their reach; only for a "
                    "repository whose every pusher you trust")
        return None
    user = JobUser.named(name)
    if user.uid == 0:
        raise IsolationError("--job-user %s is root by another name (uid 0)" % name)
    return user


def isolation_from_arguments(args, user: JobUser | None, clone: str, state_dir: str,
                             interpreters: dict[str, Interpreter], cache: EnvironmentCache | None,
                             has_key: bool) -> Isolation:
    """The isolation the options ask for, tried on this machine; IsolationError (or
    ValueError, for a wrong size) if it cannot be had."""
    hidden_folders, hidden_files = (state_dir,), ((args.secret_file,) if args.secret_file else ())
    if user is not None:  # what the job user cannot reach needs no hiding (and bwrap, as that user, could not)
        hidden_folders = tuple(path for path in hidden_folders if user.can_enter(path) is None)
        hidden_files = tuple(path for path in hidden_files if user.can_enter(path) is None)
    needed = [sys.prefix, sys.base_prefix, *(os.path.dirname(os.path.dirname(interpreter.path))
                                               for interpreter in interpreters.values())]
    needed.append(os.path.dirname(os.path.abspath(__file__)))  # warm_pytest.py, which a job user runs as a script
    if cache is not None:
        needed.append(cache.folder)
    sandbox = find_sandbox(args.sandbox, user, hidden_folders, hidden_files, tuple(needed))
    cgroups = Cgroups.find(parse_size(args.job_memory) if args.job_memory else None)
    job_root = new_job_root()
    try:
        if user is not None:
            places = [clone, job_root, sys.executable, *(interpreter.path for interpreter in interpreters.values())]
            if cache is not None:
                places.append(cache.folder)
            blocked = ["%s (stopped at %s)" % (place, why) for place in places if (why := user.can_enter(place))]
            if blocked:
                raise IsolationError("the job user %s cannot reach %s; make the folders on the way searchable by "
                                     "others (chmod o+x), or use another place" % (user.name, "; ".join(blocked)))
            if hidden_files and sandbox is None:
                raise IsolationError("the job user %s could read the key file %s: make it readable by root alone "
                                     "(chmod 600)" % (user.name, hidden_files[0]))
        elif sandbox is None and has_key:
            log.warning("jobs run as this runner's user without a sandbox: a commit's tests can read this runner's "
                        "key (its file, /proc/%d/environ). Install bubblewrap, or start the runner as root (its jobs "
                        "then run as --job-user)", os.getpid())
    except BaseException:
        shutil.rmtree(job_root, ignore_errors=True)
        if cgroups is not None:
            cgroups.close()
        raise
    return Isolation(job_root, user, sandbox, cgroups, tuple(args.job_env))


def environments_from_arguments(args, user: JobUser | None = None
                                ) -> tuple[dict[str, Interpreter], EnvironmentCache | None]:
    """The interpreters to offer and the environment cache the options ask for (whose
    builds run as ``user``); ValueError if they cannot be had."""
    if not args.environments:
        # Only its own, which every job then runs with: it takes no job that asks for another.
        return {version: interpreter for version, interpreter in find_interpreters().items()
                if version == "%d.%d" % sys.version_info[:2]}, None
    interpreters = find_interpreters(args.python)
    if args.env_cache_size < 1 or args.setup_timeout <= 0:
        raise ValueError("--env-cache-size must be at least 1 and --setup-timeout positive")
    installer = Installer.find(args.installer)
    cache = EnvironmentCache(args.env_cache, installer, args.env_cache_size, args.setup_timeout,
                             owner=(user.uid, user.gid) if user is not None else None)
    log.info("environments: built with %s in %s (at most %d); Pythons %s", installer.description, args.env_cache,
             args.env_cache_size, ", ".join("%s (%s)" % (version, interpreter.path)
                                            for version, interpreter in sorted(interpreters.items())))
    return interpreters, cache


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    stop_passing_on_ignored_signals()
    # Before any process is started, so that all of them have the runner as their
    # subreaper (a job's orphans come back here if the warm pytest itself dies).
    subreaper = become_subreaper()
    if not subreaper:
        log.warning("cannot become a child subreaper (Linux only): processes the tests start in a new session "
                    "may outlive their job")
    try:
        dispatcher = parse_address(args.dispatcher_server)
    except ValueError as exc:
        log.error("--dispatcher-server: %s", exc)
        return 2
    if args.timeout <= 0 or args.checkout_timeout <= 0:
        log.error("--timeout and --checkout-timeout must be positive")
        return 2
    try:
        repo = git.Repo(args.repo)
        git_dir, clone = repo.git_dir, repo.working_tree_dir
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        log.error("%s is not a git clone: %s", args.repo, exc)
        return 2
    state_dir = args.state_dir or os.path.join(git_dir, "ci_runner")
    try:
        security = security_from_arguments(args, serves=True)
        name = runner_name(security, args.name)  # a runner key's results count under its name alone
        user = job_user_from_arguments(args)
        interpreters, cache = environments_from_arguments(args, user)
        isolation = isolation_from_arguments(args, user, clone, state_dir, interpreters, cache,
                                             security.auth is not None)
    except (ValueError, IsolationError) as exc:
        log.error("%s", exc)
        return 2
    log.info("jobs run %s", isolation.describe())
    try:
        runner = TestRunner(
            args.repo,
            dispatcher,
            host=args.host,
            port=args.port,
            advertise_host=args.advertise_host,
            name=name,
            test_command=args.test_command,
            timeout=args.timeout,
            dispatcher_timeout=args.dispatcher_timeout,
            checkout_timeout=args.checkout_timeout,
            state_dir=state_dir,
            security=security,
            warm_pytest=args.warm_pytest,
            subreaper=subreaper,
            interpreters=interpreters,
            cache=cache,
            isolation=isolation,
        )
    except IsolationError as exc:
        isolation.close()
        log.error("%s", exc)
        return 2
    except OSError as exc:
        isolation.close()
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    install_stop_signals(runner.stop_event, log)
    log.info("listening on %s as %s (clone %s)", format_address(runner.server.address), runner.name, runner.clone)
    runner.start()
    runner.stop_event.wait()
    runner.shutdown()
    log.info("stopped")
    return runner.exit_code


if __name__ == "__main__":
    sys.exit(main())
