"""One job on a runner: check the commit out, prepare its environment, run its tests,
sweep what they left.

For each job the executor makes the runner's clone an exact, clean checkout of the
commit (checkout.py); reads what the commit says of itself (project_config.py) and
prepares the environment it declares (environments.py: reused from the cache, or
built, and the project installed at this commit); runs the test command in it --
pytest with JUnit XML by default, forked from a warm pytest (warm_pytest.py) when one
is ready for that environment -- in a process group of its own under a time limit
(processes.py); kills whatever the checkout or the tests left running (leftovers.py);
and makes the attempt's ``Result``: the verdict, the counts from the JUnit XML
(junit.py), the output, the hash seed, and why when it is not plain.

A job may be a rerun of some failing tests (``tests``: their pytest node ids, which
it passes to pytest alone). After a failed run, the executor reads the failing tests'
node ids from the JUnit XML while the clone is still the commit's checkout, and says
what may run again (flaky.py: ``retry``, ``failing``).

Whose fault an ending is decides what follows. A test failure, a timeout, tests that
cannot be collected, a config file that is wrong and a failed install of the commit's
own dependencies are the commit's verdict (``failed``). A checkout that fails, a
package index that cannot be reached, or a warm pytest that breaks mid-job are the
runner's (``error``: the dispatcher retries the job elsewhere). A commit asking for an
interpreter this runner lacks is ``declined`` (the dispatcher gives it to a runner that
has one). A runner told to stop hands the job back (``aborted``).

Every job gets a random hash seed (PYTHONHASHSEED), as a fresh interpreter does,
reported with its result so that a failure can be reproduced; a warm pytest is
therefore used for one job only, and the next one is started ahead.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass

from commit_ci import flaky, junit, sharding
from commit_ci.checkout import GitDirGuard, check_out, fetch_ahead
from commit_ci.environments import Environment, EnvironmentCache, Interpreter, SetupFailure, note, plan
from commit_ci.files import open_untrusted
from commit_ci.flaky import Retry
from commit_ci.isolation import Isolation, Launch, new_job_root
from commit_ci.leftovers import LEFTOVERS_TIMEOUT_S, kill_leftovers
from commit_ci.live_log import LiveSender
from commit_ci.processes import KILL_GRACE_S, STOPPED, TIMEOUT, KnownChildren, run_step, supervise
from commit_ci.project_config import CONFIG_NAME, ConfigError, ProjectConfig, read_config
from commit_ci.protocol import MAX_LOG_BYTES
from commit_ci.result import Result
from commit_ci.states import ReportedStatus
from commit_ci.warm_pytest import END_MARGIN_S, WarmPytest, WarmPytestError

log = logging.getLogger("runner")

#: The warm pytest is given up for good after failing this many times in a row.
WARM_PYTEST_MAX_FAILURES = 3
#: Output sent with a result: the head and the tail (where pytest puts its summary)
#: of a long log, with a marker in between.
LOG_TAIL_BYTES = 256 * 1024
#: Output sent per result: what the dispatcher keeps, less room for the notes the
#: runner adds (a timeout message, the setup's last lines), so nothing it sends is cut off there.
LOG_LIMIT_BYTES = MAX_LOG_BYTES - 32 * 1024
#: Of a successful setup, the last bytes of its output shown before the tests' output.
SETUP_LOG_SHOWN_BYTES = 16 * 1024
#: Characters of a failed step's last line kept in a result's reason.
REASON_CHARS = 300
#: Hash seeds are drawn from the range PYTHONHASHSEED takes.
MAX_HASH_SEED = 4294967295

#: pytest's exit codes other than 0 and 1, as reasons for a failed verdict.
PYTEST_EXIT_REASONS = {
    2: "tests interrupted or could not be collected",
    3: "pytest internal error",
    4: "pytest usage error",
    5: "no tests collected",
}

#: The reason of a job handed back because the runner is stopping.
SHUTTING_DOWN = "runner shutting down"


class JobFault(Exception):
    """The runner failed the job (not the tests): it is handed back as an ``error``."""


def read_log(path: str, limit: int | None = None) -> bytes:
    """The output to send, at most ``limit`` bytes: all of it, or the head and the tail
    (where pytest writes its summary) of a long one, with a marker between them."""
    limit = LOG_LIMIT_BYTES if limit is None else limit
    marker = b"\n[... %d bytes of output cut here: limit %d bytes ...]\n"
    try:
        with open_untrusted(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size <= limit:
                return handle.read()
            tail_size = min(LOG_TAIL_BYTES, limit // 4)
            # The marker's own length, with the largest number it can show.
            head_size = max(0, limit - tail_size - len(marker % (size, limit)))
            head = handle.read(head_size)
            handle.seek(size - tail_size)
            tail = handle.read(tail_size)
    except OSError as exc:
        return ("[runner could not read the test output: %s]\n" % exc).encode()
    return head + marker % (size - len(head) - len(tail), limit) + tail


@dataclass
class Setting:
    """Where and how one job's tests run."""

    python: str  # the interpreter that runs them
    env: dict  # their environment variables (hash seed apart)
    timeout: float
    test_command: str | None  # None: pytest with JUnit XML
    environment: Environment | None  # the commit's environment, or None: the runner's own interpreter
    notes: bytes  # what to show before the tests' output
    unsplit: str | None = None  # why its tests cannot be split in shards (sharding.py), if they cannot


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a commit's tests to run alone (sharding.py): its number, how many
    there are, and the plan (test files to shards, JSON), checked."""

    shard: int
    shards: int
    plan: bytes


class Executor:
    """Runs jobs, one at a time, in the runner's clone; the runner's worker thread is
    its only user (it alone starts processes, which ``_kill_leftovers`` relies on).

    ``work_dir`` (the runner's, which jobs cannot reach) holds the job's output and its
    setup and checkout logs; ``stop`` kills a job in progress (it is then handed back).
    ``interpreters`` are the Pythons the runner offers, by version; ``cache`` builds and
    keeps environments (None: no environments, every job runs with the runner's own
    interpreter, as before). ``isolation`` keeps jobs from the runner (isolation.py; by
    default, only their variables and folders are their own). With ``subreaper``, this
    process is a child subreaper (the runner's ``main`` made it one) and every child that
    is not a warm pytest is a leftover of the job.
    """

    def __init__(self, clone: str, git_dir: str, work_dir: str, test_command: str | None, timeout: float,
                 checkout_timeout: float, stop: threading.Event, warm_pytest: bool = True, subreaper: bool = False,
                 interpreters: dict[str, Interpreter] | None = None, cache: EnvironmentCache | None = None,
                 isolation: Isolation | None = None, live: LiveSender | None = None):
        self.clone = clone
        #: Follows the tests' output while they run and sends it to the dispatcher (live_log.py).
        self.live = live
        self.work_dir = work_dir
        self.test_command = test_command
        self.timeout = timeout
        self.checkout_timeout = checkout_timeout
        self.stop = stop
        self.subreaper = subreaper
        self.interpreters = interpreters or {}
        self.cache = cache
        self.isolation = isolation or Isolation(new_job_root())
        self._git_dir_guard = GitDirGuard(git_dir)
        #: The clone's git folder is the checkout's or a fetch ahead's, one at a time.
        self._clone_lock = threading.Lock()
        #: Children started beside the job's steps (a fetch ahead): no leftovers of it.
        self._known = KnownChildren()
        #: Whether jobs may fork from a warm pytest: only with the default test command,
        #: and where the one started ahead, a process the job user can reach, can be
        #: frozen while the runner works in the job's folders (isolation.py).
        self._warm_enabled = warm_pytest and not test_command and self.isolation.warm_allowed
        #: Why not, for the log line at start.
        self._no_warm_because = ("--no-warm-pytest" if not warm_pytest else "--test-command" if test_command
                                 else "no cgroup v2 to freeze it with while the runner checks out")
        #: The warm pytest started ahead for the next job, and the one the job in progress uses.
        self._spare: WarmPytest | None = None
        self._in_use: WarmPytest | None = None
        #: The spare started while the job in progress runs (apart from it), if any.
        self._next_spare: WarmPytest | None = None
        self._warm_failures = 0
        #: For a job user: the interpreter and variables of the last job's tests, which
        #: ``between_jobs`` starts the next warm pytest for, and whether nothing of the
        #: job user's was left running.
        self._spare_for: tuple[str, dict] | None = None
        self._job_user_idle = True
        #: The variables every job starts from (not all the runner's: isolation.py).
        self._base_env = self.isolation.test_variables()

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start a warm pytest ahead of the first job, when jobs may use one, and wait
        until it is ready (or has failed: jobs then start a fresh Python)."""
        self._spare_for = (sys.executable, self._base_env)
        self._start_spare(*self._spare_for, slot=self.isolation.slot if self.isolation.spare_apart else None)
        if not self._warm_enabled:
            log.info("every job starts a fresh Python (no warm pytest: %s)", self._no_warm_because)
        if self._spare is not None:
            try:
                self._spare.wait_ready()
            except (WarmPytestError, OSError) as exc:
                self._spare = None
                self._warm_failed(str(exc))
                return
            log.info("warm pytest ready (%s): each job forks one, started ahead", self._spare.description)

    def close(self) -> None:
        for zygote in (self._spare, self._in_use):
            if zygote is not None:
                self._discard(zygote)
        self._spare = self._in_use = None
        if self.cache is not None:
            self.cache.release()
        self.isolation.close()

    # --- a job -----------------------------------------------------------------------

    def run(self, commit: str, attempt: int, tests: tuple[str, ...] | None = None,
            shard: ShardSpec | None = None) -> Result:
        """Check ``commit`` out, prepare its environment, test it and sweep up after it;
        the attempt's result. ``tests``: node ids of failing tests to run again, alone
        (flaky.py); the whole test command runs when there is one. ``shard``: run that
        shard of the tests alone (sharding.py)."""
        self._freeze_spare()
        try:
            self.isolation.begin_job(self._spare.slot if self._spare is not None else None)
            return self._run(commit, attempt, tests, shard)
        finally:
            if self._spare is not None and self.isolation.separate and self._spare is not self._next_spare:
                # Not taken, and the job user's steps may have reached it: it serves no job.
                self._discard(self._spare)
                self._spare = None
            self._next_spare = None
            if self.live is not None:
                self.live.forget()  # a job that ended in its setup too
            # Before the result goes out: the dispatcher may send the next commit at once.
            self._kill_leftovers(commit, attempt, "job")
            stuck = self.isolation.end_job()
            self._job_user_idle = not stuck
            if stuck:
                log.error("commit %s attempt %d: processes %s did not leave the job's cgroup", commit, attempt, stuck)

    def between_jobs(self) -> None:
        """Once a job's result is out: for a job user without a sandbox, start the warm
        pytest for the next job now. Started while a job ran, it would be a process
        the job could reach (the same user, the same pids), change, and so forge the
        next commit's verdict with; started now, with nothing of the job user's
        running and the job's folders emptied, it is the next job's alone. (In a
        sandbox, one starts while the job runs, apart: ``_take_warm``.)"""
        if (not self._warm_enabled or not self.isolation.separate or self.isolation.spare_apart
                or self._spare is not None):
            return
        if self._job_user_idle and self._spare_for is not None:
            try:
                self.isolation.empty_job_folders()
            except OSError as exc:
                log.warning("cannot empty the job's folders (%s): no warm pytest for the next job", exc)
                return
            self._start_spare(*self._spare_for)

    def _run(self, commit: str, attempt: int, tests: tuple[str, ...] | None, shard: ShardSpec | None = None) -> Result:
        started = time.monotonic()
        early = self._check_out(commit, attempt)
        if early is None:
            setting = self._prepare(commit, attempt)
            if isinstance(setting, Result):
                early = setting
        if early is not None:
            early.duration_s = round(time.monotonic() - started, 3)
            return early
        output_path = os.path.join(self.work_dir, "output.log")
        if os.path.exists(output_path):
            os.unlink(output_path)
        junit_path = os.path.join(self.isolation.out, "junit.xml")  # a new folder, as the job's others
        env = dict(setting.env, CI_COMMIT=commit, CI_ATTEMPT=str(attempt), CI_JUNIT_XML=junit_path)
        if tests is not None and setting.test_command:
            log.info("commit %s attempt %d: testing again, with its test command (it has no test ids)", commit, attempt)
            tests = None
        if shard is not None and setting.unsplit:
            # Every shard's runner reads the same config at the same commit: shard 1
            # runs the whole suite, the others nothing, and together they run it once.
            why = "%s: %s; shard 1 of %d runs the whole suite" % (sharding.UNSPLIT, setting.unsplit, shard.shards)
            log.info("commit %s attempt %d: shard %d of %d: %s", commit, attempt, shard.shard, shard.shards, why)
            if shard.shard != 1:
                return Result(commit, ReportedStatus.PASSED.value, attempt=attempt, passed=0, failed=0, errors=0,
                              skipped=0, duration_s=round(time.monotonic() - started, 3), reason=why,
                              log=setting.notes + b"[runner: %s]\n" % why.encode("utf-8", "replace"))
            shard = None
        if shard is not None:
            # The plugin comes from this installation (a folder that holds it alone), never from the commit.
            path = env.get("PYTHONPATH")
            env.update(CI_SHARD="%d/%d" % (shard.shard, shard.shards), CI_SHARD_PLAN=shard.plan.decode("ascii"),
                       PYTHONPATH=sharding.PLUGIN_FOLDER + (os.pathsep + path if path else ""))
        log.info("commit %s attempt %d: testing%s", commit, attempt,
                 " again: %d failing test(s) alone" % len(tests) if tests is not None else
                 " shard %d of %d" % (shard.shard, shard.shards) if shard is not None else "")
        test_started = time.monotonic()
        try:
            status, killed, hash_seed, output_path = self._run_tests(commit, attempt, setting, junit_path, env,
                                                                     output_path, tests, shard is not None)
        except JobFault as exc:
            log.error("commit %s attempt %d: %s", commit, attempt, exc)
            return Result(commit, ReportedStatus.ERROR.value, attempt=attempt, reason=str(exc),
                          log=setting.notes + read_log(output_path), duration_s=round(time.monotonic() - started, 3))
        finally:
            self._kill_leftovers(commit, attempt, "tests")
        duration = time.monotonic() - test_started
        result = Result(commit, ReportedStatus.PASSED.value, attempt=attempt, duration_s=round(duration, 3),
                        hash_seed=hash_seed, log=setting.notes + read_log(output_path))
        self._add_junit(result, self.isolation.outside(junit_path))
        self._judge(result, status, killed, setting)
        self._add_retry(result, setting, tests)
        if tests is None:
            self._add_durations(result, setting)
        log.info("commit %s attempt %d: %s in %.2f s%s (PYTHONHASHSEED=%d)", commit, attempt, result.status, duration,
                 " (%s)" % result.reason if result.reason else "", hash_seed)
        return result

    def _add_junit(self, result: Result, path: str) -> None:
        """The counts and the file of the JUnit XML the tests wrote, when it is plain JUnit."""
        try:
            report = junit.read(path)
        except junit.JUnitError as exc:
            log.warning("commit %s attempt %d: JUnit XML not sent: %s", result.commit, result.attempt, exc)
            return
        counts = junit.counts(report[1]) if report is not None else None
        if counts is not None:
            for name, count in counts.items():
                setattr(result, name, count)
            result.junit = report[0]

    def _add_retry(self, result: Result, setting: Setting, tests: tuple[str, ...] | None) -> None:
        """What may run again (flaky.py): of a rerun of ``tests``, those it did not see
        pass; of a plain test failure, the failing tests' node ids, read from the JUnit
        XML while the checkout is the commit's, or else the whole test command."""
        if result.status not in (ReportedStatus.PASSED, ReportedStatus.FAILED):
            return
        root = None
        if result.junit and not setting.test_command:
            try:
                root = junit.parse(result.junit)
            except junit.JUnitError:
                root = None
        if tests is not None:
            result.retry, result.failing = Retry.TESTS.value, flaky.still_failing(tests, root, self._is_test_file)
            return
        if result.status != ReportedStatus.FAILED or result.reason is not None:
            return  # passed; or it did not get to judge its tests (time-out, collection error, setup...)
        failing = flaky.failing_ids(root, self._is_test_file) if root is not None else None
        if failing:
            result.retry, result.failing = Retry.TESTS.value, failing
        elif root is not None and len([case for case in junit.cases(root) if case[2] == junit.FAILED]) > flaky.MAX_TESTS:
            log.info("commit %s attempt %d: more than %d tests failed: none runs again", result.commit,
                     result.attempt, flaky.MAX_TESTS)
        else:
            result.retry = Retry.COMMAND.value

    def _add_durations(self, result: Result, setting: Setting) -> None:
        """Seconds per test file, from the JUnit XML of a run of the whole suite or of a
        shard, for the dispatcher to plan shards with (sharding.py)."""
        if not result.junit or setting.test_command or result.status not in (ReportedStatus.PASSED,
                                                                            ReportedStatus.FAILED):
            return
        try:
            durations = sharding.file_durations(junit.parse(result.junit), self._is_test_file)
        except junit.JUnitError:
            return
        if durations:
            result.durations = sharding.encode_durations(durations)

    def _is_test_file(self, path: str) -> bool:
        """Whether the checkout has a ``.py`` file at ``path`` (relative, checked by flaky.node_id)."""
        return os.path.isfile(os.path.join(self.clone, path))

    def _judge(self, result: Result, status: int, killed: str | None, setting: Setting) -> None:
        """The verdict and its reason, from how the tests ended."""
        if killed == STOPPED:
            result.status, result.reason = ReportedStatus.ABORTED.value, SHUTTING_DOWN
        elif killed == TIMEOUT:
            result.status, result.reason = ReportedStatus.FAILED.value, "timeout"
            result.log += b"\n[runner: tests killed after the %g s time limit]\n" % setting.timeout
        elif status != 0:
            result.status = ReportedStatus.FAILED.value
            if self.isolation.out_of_memory():
                result.reason = "out of memory: the job may use %d MiB (--job-memory)" % (
                    self.isolation.cgroups.memory_limit >> 20)
            elif status < 0:
                result.reason = "killed by signal %d" % -status
            elif not setting.test_command:
                result.reason = PYTEST_EXIT_REASONS.get(status, None if status == 1 else "exit status %d" % status)

    def _check_out(self, commit: str, attempt: int) -> Result | None:
        """Make the clone a clean checkout of ``commit``: None when it is, else the
        attempt's result (handed back, or an infrastructure error)."""
        restored = self._git_dir_guard.restore()
        if restored:
            log.warning("commit %s: put back what changed in the clone's .git since the runner started "
                        "(by the tests before?): %s", commit, ", ".join(restored))
        output_path = os.path.join(self.work_dir, "checkout.log")
        try:
            self.isolation.take_back(self.clone)
        except OSError as exc:
            log.error("commit %s attempt %d: cannot take the work tree back from the job user: %s", commit, attempt, exc)
            return Result(commit, ReportedStatus.ERROR.value, attempt=attempt, reason="checkout failed: %s" % exc)
        with self._clone_lock:
            ended = check_out(self.clone, commit, output_path, self.checkout_timeout, self.stop)
        self._kill_leftovers(commit, attempt, "checkout")
        if ended.killed == STOPPED:
            return Result(commit, ReportedStatus.ABORTED.value, attempt=attempt, reason=SHUTTING_DOWN)
        if ended.succeeded:
            try:
                self.isolation.hand_over(self.clone)
            except OSError as exc:
                log.error("commit %s attempt %d: cannot hand the work tree to the job user: %s", commit, attempt, exc)
                return Result(commit, ReportedStatus.ERROR.value, attempt=attempt, reason="checkout failed: %s" % exc)
            return None
        why = "took more than %g s" % self.checkout_timeout if ended.killed == TIMEOUT else ended.last_line()
        reason = "checkout failed: %s" % why[:REASON_CHARS]
        log.error("commit %s attempt %d: %s", commit, attempt, reason)
        return Result(commit, ReportedStatus.ERROR.value, attempt=attempt, reason=reason, log=read_log(output_path))

    def fetch_ahead(self, commit: str, stop: threading.Event) -> None:
        """Fetch ``commit`` into the clone if it is not there yet (the dispatcher says it
        is queued), beside the job in progress, if any: the checkout of its own job
        then finds it there. Run by the runner's fetch-ahead thread; ``stop``: the
        runner's."""
        with self._clone_lock:
            if stop.is_set():
                return
            started = time.monotonic()
            ended = fetch_ahead(self.clone, commit, os.path.join(self.work_dir, "fetch.log"), self.checkout_timeout,
                                stop, self._known)
        if ended.succeeded:
            if b"fetched" in ended.output:
                log.info("commit %s: fetched ahead of its job in %.2f s", commit, time.monotonic() - started)
        elif ended.killed != STOPPED:
            log.warning("commit %s: fetch ahead failed (its checkout will fetch): %s", commit,
                        "took more than %g s" % self.checkout_timeout if ended.killed == TIMEOUT else ended.last_line())

    # --- the environment -----------------------------------------------------------

    def _prepare(self, commit: str, attempt: int) -> Setting | Result:
        """Where the job's tests run, as the commit declares it: a Setting, or the
        attempt's result when that cannot be made (see the module docstring)."""
        if self.cache is not None:
            self.cache.release()
        try:
            config = read_config(self.clone)
        except ConfigError as exc:
            return self._setup_failed(commit, attempt, SetupFailure(str(exc)), None)
        interpreter = self._interpreter_for(config)
        if interpreter is None:
            log.info("commit %s attempt %d: asks for Python %s, which this runner does not have: declined",
                     commit, attempt, config.python)
            return Result(commit, ReportedStatus.DECLINED.value, attempt=attempt, requires="python" + config.python,
                          reason="this runner has no Python %s" % config.python)
        env = dict(self._base_env, **config.env)
        timeout = config.timeout or self.timeout
        test_command = config.test or self.test_command
        unsplit = ("a test command of its own" if test_command else
                   "shard = false in %s" % CONFIG_NAME if not config.shard else None)
        if self.cache is None:  # no environments: the runner's own interpreter (the one it offers)
            return Setting(sys.executable, env, timeout, test_command, None, b"", unsplit)
        setup_log = os.path.join(self.work_dir, "setup.log")
        # Followed live from the start: a build of minutes shows as it goes.
        open(setup_log, "wb").close()
        self._follow(commit, attempt, setup_log)
        setup_env = self.isolation.setup_variables(env)
        try:
            recipe = plan(self.clone, config, interpreter, self.cache.installer)
            if recipe is None:
                return Setting(sys.executable, env, timeout, test_command, None, b"", unsplit)
            environment = self.cache.obtain(recipe, self.clone, setup_env, setup_log, self.stop, self._launcher)
            if not environment.built:
                note(setup_log, "environment %s reused: Python %s, %s" % (
                    environment.key[:12], interpreter.full_version, self.cache.installer.name), append=False)
            if recipe.project:
                self.cache.install_project(environment, self.clone, setup_env, setup_log, self.stop, self._launcher)
        except SetupFailure as exc:
            return self._setup_failed(commit, attempt, exc, setup_log)
        notes = read_log(setup_log, SETUP_LOG_SHOWN_BYTES).rstrip(b"\n") + b"\n[runner: tests]\n"
        return Setting(environment.python, environment.variables(env), timeout, test_command, environment, notes,
                       unsplit)

    def _launcher(self, writable: tuple[str, ...] = ()) -> Launch:
        """How a step of the job starts (isolation.py), in the clone."""
        return self.isolation.launch(self.clone, self.clone, writable)

    def _interpreter_for(self, config: ProjectConfig) -> Interpreter | None:
        """The interpreter the commit asks for, or the runner's own; None if it asks for
        one this runner does not offer (without environments, it offers only its own)."""
        if config.python:
            return self.interpreters.get(config.python)
        own = "%d.%d" % sys.version_info[:2]
        return self.interpreters.get(own) or Interpreter(os.path.realpath(sys.executable), own,
                                                         "%d.%d.%d" % sys.version_info[:3])

    def _setup_failed(self, commit: str, attempt: int, failure: SetupFailure, setup_log: str | None) -> Result:
        if str(failure) == "runner stopping":
            return Result(commit, ReportedStatus.ABORTED.value, attempt=attempt, reason=SHUTTING_DOWN)
        status = ReportedStatus.ERROR if failure.infrastructure else ReportedStatus.FAILED
        reason = "setup failed: %s" % str(failure)[:REASON_CHARS]
        log.warning("commit %s attempt %d: %s%s", commit, attempt, reason,
                    " (the infrastructure's fault: retried)" if failure.infrastructure else "")
        output = read_log(setup_log) if setup_log else b""
        return Result(commit, status.value, attempt=attempt, reason=reason,
                      log=output + b"\n[runner: %s]\n" % reason.encode("utf-8", "replace"))

    # --- the tests -------------------------------------------------------------------

    def _run_tests(self, commit: str, attempt: int, setting: Setting, junit_path: str, env: dict,
                   output_path: str, tests: tuple[str, ...] | None = None,
                   shard: bool = False) -> tuple[int, str | None, int, str]:
        """Run the tests in the clone, their output followed live (live_log.py): forked
        from a warm pytest when one is ready for this interpreter, else the test command
        in a new interpreter. Returns what ``supervise`` returns, the hash seed the
        tests ran with, and where their output is: ``output_path``, or, when a warm
        pytest run as the job user wrote it, a file in the job's own folder (read
        without following links)."""
        # Node ids are checked (flaky.is_test_id): none can be taken for an option.
        pytest_args = ["--junitxml", junit_path, *(tests or ())]
        if shard:
            pytest_args[:0] = ["-p", sharding.PLUGIN_MODULE]
        zygote = self._take_warm(setting) if not setting.test_command and self._warm_enabled else None
        if zygote is not None:
            log.info("commit %s attempt %d: forked from a warm pytest (%s)", commit, attempt, zygote.description)
            env = dict(env, PYTHONHASHSEED=str(zygote.hash_seed))
            if self.isolation.user is not None:
                output_path = os.path.join(self.isolation.out, "output.log")
            self._follow(commit, attempt, self.isolation.outside(output_path))
            try:
                pid = zygote.spawn(self.clone, pytest_args, env, output_path)
            except WarmPytestError as exc:
                self._warm_failed(str(exc))  # nothing ran yet
            else:
                self._start_next_spare()
                group = self._host_pid(zygote, pid)
                limit = setting.timeout + KILL_GRACE_S + END_MARGIN_S
                try:
                    # supervise kills the job's group however wait() ends, this error included.
                    status, killed = supervise(group, lambda: zygote.wait(pid, limit), setting.timeout, self.stop)
                except WarmPytestError as exc:
                    # The tests ran, in part: run again here, they would find what they left.
                    self._warm_failed(str(exc))
                    raise JobFault("warm pytest failed during the tests: %s" % exc) from None
                self._warm_failures = 0
                return status, killed, zygote.hash_seed, self.isolation.outside(output_path)
        hash_seed = int(env["PYTHONHASHSEED"]) if env.get("PYTHONHASHSEED", "").isdigit() else _new_hash_seed()
        env = dict(env, PYTHONHASHSEED=str(hash_seed))
        command = setting.test_command or [setting.python, "-m", "pytest", *pytest_args]
        self._start_next_spare()
        self._follow(commit, attempt, output_path)
        ended = run_step(command, cwd=self.clone, env=env, timeout=setting.timeout, stop=self.stop,
                         output_path=output_path, launch=self._launcher())
        return ended.status, ended.killed, hash_seed, output_path

    @staticmethod
    def _host_pid(zygote: WarmPytest, pid: int) -> int:
        """The runner's pid of the child ``pid`` a zygote forked: the same, but for a
        zygote in a sandbox's pid namespace (then found in its cgroup)."""
        if zygote.slot is None:
            return pid
        host = zygote.cgroup.host_pid(pid) if zygote.cgroup is not None else None
        if host is None:  # the tests may have begun: no fresh Python in their clone, an error
            if zygote.cgroup is not None:
                zygote.cgroup.kill()
            raise JobFault("the tests the warm pytest forked (pid %d in its sandbox) are not in its cgroup" % pid)
        return host

    def _follow(self, commit: str, attempt: int, output_path: str) -> None:
        if self.live is not None:
            self.live.follow(commit, attempt, output_path)

    def _take_warm(self, setting: Setting) -> WarmPytest | None:
        """The warm pytest started ahead for this job's interpreter, ready and as it was
        when it started, or None (the job then starts a fresh one). Starts the next one
        ahead either way, for the next job, while this one runs (for a job user: once
        this one has ended, ``between_jobs``)."""
        zygote, self._spare = self._spare, None
        if zygote is not None and zygote.cgroup is not None and self.isolation.separate:
            zygote.cgroup.freeze(False)  # frozen since the job began (_freeze_spare)
        if zygote is not None and (zygote.python, zygote.base_env) != (setting.python, setting.env):
            self._discard(zygote)  # started for another environment, or other variables (PYTHONPATH...)
            zygote = None
        if zygote is not None:
            try:
                zygote.wait_ready()
            except (WarmPytestError, OSError) as exc:
                self._warm_failed(str(exc))
                self._discard(zygote)
                zygote = None
        if zygote is not None:
            # In a project's environment the project was installed again just now;
            # what matters is whether what the zygote imported changed.
            changed = zygote.changed_source(folders=setting.environment is None)
            if changed is not None:
                log.info("%s changed since the warm pytest started: this job starts a fresh Python", changed)
                self._discard(zygote)
                zygote = None
        if self.isolation.spare_apart:
            # In the other slot, its own sandbox and pid namespace: out of this job's
            # reach. (Its folders were the job's before this one, which has ended.)
            # Started once this job's tests are forked (``_start_next_spare``): its
            # imports would slow their start.
            self._spare_for = (setting.python, setting.env) if self._job_user_idle else None
        elif self.isolation.separate:
            self._spare_for = (setting.python, setting.env)  # between_jobs starts it
        else:
            self._start_spare(setting.python, setting.env)
        self._in_use = zygote
        if zygote is not None and zygote.cgroup is not None:
            self.isolation.adopt(zygote.cgroup)  # the job's, killed and removed with it
        return zygote

    def _start_next_spare(self) -> None:
        """With spares apart (``_take_warm``): start the next job's warm pytest, in the
        other slot, now that this job's tests have started."""
        if self.isolation.spare_apart and self._spare_for is not None and self._spare is None:
            self._start_spare(*self._spare_for, slot=self.isolation.other_slot())
            self._next_spare = self._spare
            self._spare_for = None

    def _start_spare(self, python: str, env: dict, slot: int | None = None) -> None:
        if not self._warm_enabled:
            return
        spare = WarmPytest(python, env, self.clone, _new_hash_seed())
        # A cgroup of its own: the job in progress's is killed when that job ends.
        spare.cgroup = self.isolation.new_cgroup()
        try:
            if slot is not None:
                self.isolation.empty_job_folders(slot)
                spare.slot = slot
            spare.start(self.isolation.launch(self.clone, self.clone, cgroup=spare.cgroup, slot=slot))
        except OSError as exc:
            self._discard(spare)
            self._warm_failed(str(exc))
            return
        self._spare = spare

    def _freeze_spare(self) -> None:
        """Freeze the warm pytest started ahead, as the job user, until the job takes
        it for its tests: the runner empties the job's folders, checks the commit out
        and hands the work tree over meanwhile, which no process of the job user may
        change under it. One that cannot be frozen is closed."""
        spare = self._spare
        if spare is None or not self.isolation.separate:
            return
        if spare.cgroup is None or not spare.cgroup.freeze(True):
            log.warning("the warm pytest started ahead could not be frozen: closed; this job starts a fresh Python")
            self._discard(spare)
            self._spare = None

    @staticmethod
    def _discard(zygote: WarmPytest) -> None:
        """Close a warm pytest that serves no job, and its cgroup."""
        zygote.close()
        if zygote.cgroup is not None:
            zygote.cgroup.close()

    def _warm_failed(self, why: str) -> None:
        self._warm_failures += 1
        if self._warm_failures >= WARM_PYTEST_MAX_FAILURES:
            log.warning("%s; warm pytest failed %d times in a row, every job now starts a fresh Python",
                        why, self._warm_failures)
            self._warm_enabled = False
            if self._spare is not None:
                self._discard(self._spare)
                self._spare = None
        else:
            log.warning("%s; this job runs in a fresh Python", why)

    def _kill_leftovers(self, commit: str, attempt: int, step: str) -> None:
        """Kill what ``step`` of the job (its checkout, its tests, or all of it) left
        running, whatever session or process group it moved to: what a job forked from
        a warm pytest left, that zygote has killed already (and says how many); what is
        in the job's cgroup goes at once (even what left the runner's process tree); what
        came back to the runner (a fresh interpreter's leftovers, or a zygote's that
        died) is killed here. The warm pytests are the runner's only other children, and
        the worker thread, which calls this between steps, the only one that starts
        processes, so any other child of the runner is the job's.
        """
        killed, stuck = 0, []
        used, self._in_use = self._in_use, None
        if used is not None and step == "tests":
            killed, stuck = used.leftovers, used.stuck
            used.close()  # one job each: see the module docstring
        # The checkout is the runner's own, in no job cgroup.
        in_cgroup = self.isolation.kill_job() if step != "checkout" else 0
        more = 0
        if self.subreaper:
            keep = {self._spare.process.pid} if self._spare is not None and self._spare.process else set()
            with self._known.lock:  # no fetch ahead starts meanwhile, and those running are spared
                more, more_stuck = kill_leftovers(keep | self._known.pids)  # reaps what the cgroup's kill ended
            stuck += more_stuck
        killed += max(in_cgroup, more)
        if killed:
            log.warning("commit %s attempt %d: killed %d process%s its %s left running",
                        commit, attempt, killed, "" if killed == 1 else "es", step)
        if stuck:
            log.error("commit %s attempt %d: processes %s left by its %s did not die within %g s",
                      commit, attempt, stuck, step, LEFTOVERS_TIMEOUT_S)


def _new_hash_seed() -> int:
    return secrets.randbelow(MAX_HASH_SEED + 1)



