"""One job on a runner: check the commit out, run its tests, sweep what they left.

For each job the executor makes the runner's clone an exact, clean checkout of the
commit (checkout.py), runs the test command in it -- pytest with JUnit XML by default,
forked from the warm pytest (warm_pytest.py) when there is one -- in a process group
of its own under a time limit (processes.py), kills whatever the checkout or the
tests left running (leftovers.py), and makes the attempt's ``Result``: the verdict,
the counts from the JUnit XML (junit.py), the output, and why when it is not plain.

A test failure, a timeout or tests that cannot be collected are the commit's verdict
(``failed``); a checkout that fails, or a warm pytest that breaks mid-job, is the
runner's fault (``error``: the dispatcher retries the job elsewhere); a runner told to
stop hands the job back (``aborted``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from commit_ci import junit
from commit_ci.checkout import GitDirGuard, check_out
from commit_ci.leftovers import LEFTOVERS_TIMEOUT_S, kill_leftovers
from commit_ci.processes import KILL_GRACE_S, STOPPED, TIMEOUT, run_step, supervise
from commit_ci.protocol import MAX_LOG_BYTES
from commit_ci.result import Result
from commit_ci.states import ReportedStatus
from commit_ci.warm_pytest import END_MARGIN_S, WarmPytest, WarmPytestError

log = logging.getLogger("runner")

#: The warm pytest is given up for good after failing this many jobs in a row.
WARM_PYTEST_MAX_FAILURES = 3
#: Output sent with a result: the head and the tail (where pytest puts its summary)
#: of a long log, with a marker in between.
LOG_TAIL_BYTES = 256 * 1024
#: Output sent per result: what the dispatcher keeps, less room for the notes the
#: runner appends (a timeout message), so nothing it sends is cut off there.
LOG_LIMIT_BYTES = MAX_LOG_BYTES - 1024
#: Characters of the checkout's last line kept in the reason of a failed checkout.
REASON_CHARS = 300

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
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
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


class Executor:
    """Runs jobs, one at a time, in the runner's clone; the runner's worker thread is
    its only user (it alone starts processes, which ``_kill_leftovers`` relies on).

    ``work_dir`` holds the job's output and JUnit XML while it runs; ``stop`` kills
    a job in progress (it is then handed back). With ``subreaper``, this process is a
    child subreaper (the runner's ``main`` made it one) and every child that is not
    the warm pytest is a leftover of the job.
    """

    def __init__(self, clone: str, git_dir: str, work_dir: str, test_command: str | None, timeout: float,
                 checkout_timeout: float, stop: threading.Event, warm_pytest: bool = True, subreaper: bool = False):
        self.clone = clone
        self.work_dir = work_dir
        self.test_command = test_command
        self.timeout = timeout
        self.checkout_timeout = checkout_timeout
        self.stop = stop
        self.subreaper = subreaper
        self._git_dir_guard = GitDirGuard(git_dir)
        #: A pytest imported once, forked for each job (only for the default test command).
        self._warm: WarmPytest | None = None
        if warm_pytest and not test_command:
            # Started in the clone, where a fresh ``python -m pytest`` starts: relative
            # entries of $PYTHONPATH mean the same to both.
            self._warm = WarmPytest(dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), clone)
        self._warm_failures = 0

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the warm pytest, if there is to be one (a failure is logged: jobs then
        start a fresh Python)."""
        if self._warm is not None:
            self._start_warm()

    def close(self) -> None:
        if self._warm is not None:
            self._warm.close()

    def _start_warm(self) -> None:
        try:
            self._warm.start()
        except (WarmPytestError, OSError) as exc:
            self._warm_failed("%s" % exc)
            return
        log.info("warm pytest ready (%s): each job forks it instead of starting Python", self._warm.description)

    def _warm_failed(self, why: str, then: str = "this job runs in a fresh Python") -> None:
        self._warm_failures += 1
        self._warm.close()
        if self._warm_failures >= WARM_PYTEST_MAX_FAILURES:
            log.warning("%s; warm pytest failed %d times in a row, every job now starts a fresh Python",
                        why, self._warm_failures)
            self._warm = None
        else:
            log.warning("%s; %s", why, then)

    # --- a job -----------------------------------------------------------------------

    def run(self, commit: str, attempt: int) -> Result:
        """Check ``commit`` out, test it and sweep up after it; the attempt's result."""
        started = time.monotonic()
        checkout = self._check_out(commit, attempt)
        if checkout is not None:
            checkout.duration_s = round(time.monotonic() - started, 3)
            return checkout
        output_path = os.path.join(self.work_dir, "output.log")
        junit_path = os.path.join(self.work_dir, "junit.xml")
        for path in (output_path, junit_path):
            if os.path.exists(path):
                os.unlink(path)
        env = dict(os.environ)  # the operator's environment, as documented: part of the runner's setup
        env.update(CI_COMMIT=commit, CI_ATTEMPT=str(attempt), CI_JUNIT_XML=junit_path, PYTHONDONTWRITEBYTECODE="1")
        log.info("commit %s attempt %d: testing", commit, attempt)
        test_started = time.monotonic()
        try:
            status, killed = self._run_tests(junit_path, env, output_path)
        except JobFault as exc:
            log.error("commit %s attempt %d: %s", commit, attempt, exc)
            return Result(commit, ReportedStatus.ERROR.value, attempt=attempt, reason=str(exc),
                          log=read_log(output_path), duration_s=round(time.monotonic() - started, 3))
        finally:
            # Before the result goes out: the dispatcher may send the next commit at once.
            self._kill_leftovers(commit, attempt, "tests")
        duration = time.monotonic() - test_started
        result = Result(commit, ReportedStatus.PASSED.value, attempt=attempt, duration_s=round(duration, 3),
                        log=read_log(output_path))
        self._add_junit(result, junit_path)
        self._judge(result, status, killed)
        log.info("commit %s attempt %d: %s in %.2f s%s", commit, attempt, result.status, duration,
                 " (%s)" % result.reason if result.reason else "")
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

    def _judge(self, result: Result, status: int, killed: str | None) -> None:
        """The verdict and its reason, from how the tests ended."""
        if killed == STOPPED:
            result.status, result.reason = ReportedStatus.ABORTED.value, SHUTTING_DOWN
        elif killed == TIMEOUT:
            result.status, result.reason = ReportedStatus.FAILED.value, "timeout"
            result.log += b"\n[runner: tests killed after the %g s time limit]\n" % self.timeout
        elif status != 0:
            result.status = ReportedStatus.FAILED.value
            if status < 0:
                result.reason = "killed by signal %d" % -status
            elif not self.test_command:
                result.reason = PYTEST_EXIT_REASONS.get(status, None if status == 1 else "exit status %d" % status)

    def _check_out(self, commit: str, attempt: int) -> Result | None:
        """Make the clone a clean checkout of ``commit``: None when it is, else the
        attempt's result (handed back, or an infrastructure error)."""
        restored = self._git_dir_guard.restore()
        if restored:
            log.warning("commit %s: put back what changed in the clone's .git since the runner started "
                        "(by the tests before?): %s", commit, ", ".join(restored))
        output_path = os.path.join(self.work_dir, "checkout.log")
        ended = check_out(self.clone, commit, output_path, self.checkout_timeout, self.stop)
        self._kill_leftovers(commit, attempt, "checkout")
        if ended.killed == STOPPED:
            return Result(commit, ReportedStatus.ABORTED.value, attempt=attempt, reason=SHUTTING_DOWN)
        if ended.succeeded:
            return None
        why = "took more than %g s" % self.checkout_timeout if ended.killed == TIMEOUT else ended.last_line()
        reason = "checkout failed: %s" % why[:REASON_CHARS]
        log.error("commit %s attempt %d: %s", commit, attempt, reason)
        return Result(commit, ReportedStatus.ERROR.value, attempt=attempt, reason=reason, log=read_log(output_path))

    def _run_tests(self, junit_path: str, env: dict, output_path: str) -> tuple[int, str | None]:
        """Run the tests in the clone: forked from the warm pytest when there is one,
        else the test command in a new interpreter. Returns what ``supervise`` returns."""
        pytest_args = ["--junitxml", junit_path]
        if self._warm is not None and self._warm.running:
            changed = self._warm.changed_source()
            if changed is not None:
                # A fresh interpreter would import the new one: so must the job.
                log.info("%s changed since the warm pytest started: starting it again", changed)
                self._warm.close()
        if self._warm is not None and not self._warm.running:
            self._start_warm()  # gives it up for good after too many failures
        if self._warm is not None and self._warm.running:
            try:
                pid = self._warm.spawn(self.clone, pytest_args, env, output_path)
            except WarmPytestError as exc:
                self._warm_failed(str(exc))  # nothing ran yet
            else:
                limit = self.timeout + KILL_GRACE_S + END_MARGIN_S
                try:
                    # supervise kills the job's group however wait() ends, this error included.
                    outcome = supervise(pid, lambda: self._warm.wait(pid, limit), self.timeout, self.stop)
                except WarmPytestError as exc:
                    # The tests ran, in part: run again here, they would find what they left.
                    self._warm_failed(str(exc), then="the job is handed back to run from a clean checkout")
                    raise JobFault("warm pytest failed during the tests: %s" % exc) from None
                self._warm_failures = 0
                return outcome
        command = self.test_command or [sys.executable, "-m", "pytest", *pytest_args]
        ended = run_step(command, cwd=self.clone, env=env, timeout=self.timeout, stop=self.stop,
                         output_path=output_path)
        return ended.status, ended.killed

    def _kill_leftovers(self, commit: str, attempt: int, step: str) -> None:
        """Kill what ``step`` of the job (its checkout or its tests) left running,
        whatever session or process group it moved to: what a job forked from the
        warm pytest left, the zygote has killed already (and says how many); what
        came back to the runner (a fresh interpreter's leftovers, or a zygote's
        that died) is killed here. The zygote is the runner's only other child, and
        the worker thread, which calls this between steps, the only one that starts
        processes, so any other child of the runner is the job's.
        """
        killed, stuck = 0, []
        if self._warm is not None and step == "tests":
            killed, stuck = self._warm.leftovers, self._warm.stuck
            self._warm.leftovers, self._warm.stuck = 0, []
        if self.subreaper:
            zygote = self._warm.process if self._warm is not None else None
            more, more_stuck = kill_leftovers({zygote.pid} if zygote is not None else set())
            killed, stuck = killed + more, stuck + more_stuck
        if killed:
            log.warning("commit %s attempt %d: killed %d process%s its %s left running",
                        commit, attempt, killed, "" if killed == 1 else "es", step)
        if stuck:
            log.error("commit %s attempt %d: processes %s left by its %s did not die within %g s",
                      commit, attempt, stuck, step, LEFTOVERS_TIMEOUT_S)
