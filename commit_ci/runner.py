"""Test runner: tests one commit at a time in its own clone and reports the verdict.

A runner listens for the dispatcher's ``ping`` (answered at once, even mid-job, with
what it is doing) and ``runtest`` (answered ``OK`` or ``BUSY`` at once; the job runs
on a worker thread). For each job it makes its clone an exact, clean checkout of
the commit (test_runner_script.sh), runs the test command -- pytest with JUnit XML
by default -- in a process group of its own under a time limit, and sends the
verdict, counts and output back with ``results``. A result that cannot be delivered
is kept on disk (in the clone's .git folder) and delivered when the dispatcher is
back, even after a restart of the runner. The runner registers on start, registers
again whenever pings stop coming (the dispatcher restarted or dropped it), and
exits once the dispatcher has been unreachable for ``--dispatcher-timeout``
seconds, to free its machine. On SIGTERM or Ctrl-C it stops the tests in progress
and hands the job back to the dispatcher, which gives it to another runner.

The runner is a child subreaper: a process the checkout or the tests started that
outlives its parent comes back to the runner, even from another session (a daemon
a test started), and is killed before the job's result is sent, so that nothing a
commit's tests started is still running when the next commit is tested.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass

import git

from commit_ci.client import communicate
from commit_ci.daemon import install_stop_signals, setup_logging
from commit_ci.files import atomic_write
from commit_ci.git_scripts import script_path
from commit_ci.protocol import MAX_JUNIT_BYTES, MAX_LOG_BYTES, UNKNOWN_ATTEMPT, Message, error, reply, request
from commit_ci.security import Security, add_security_arguments, check_bind, security_from_arguments
from commit_ci.server import ProtocolServer, serve_in_thread
from commit_ci.warm_pytest import (
    END_MARGIN_S,
    LEFTOVERS_TIMEOUT_S,
    WarmPytest,
    WarmPytestError,
    become_subreaper,
    kill_leftovers,
)
from commit_ci.wire import ProtocolError, format_address, is_commit_id, parse_address

log = logging.getLogger("runner")

DEFAULT_DISPATCHER = "localhost:8888"
#: Longest a test run may take before its process group is killed (verdict: failed, timeout).
DEFAULT_TEST_TIMEOUT_S = 30 * 60
#: Exit after the dispatcher has been unreachable this long (0: never).
DEFAULT_DISPATCHER_TIMEOUT_S = 120.0
#: Longest the checkout (fetch, reset, clean) may take before it is killed (an
#: infrastructure error: the job is retried elsewhere).
DEFAULT_CHECKOUT_TIMEOUT_S = 10 * 60.0
#: After SIGTERM, how long tests get to exit before SIGKILL.
KILL_GRACE_S = 5.0
#: The warm pytest is given up for good after failing this many jobs in a row.
WARM_PYTEST_MAX_FAILURES = 3
#: Pause between attempts to register while the dispatcher is unreachable.
REGISTER_RETRY_S = 1.0
#: No ping for this many of the dispatcher's heartbeat intervals: it restarted or
#: dropped this runner (it drops after 3 missed pings), so register again.
CONTACT_HEARTBEATS = 3
#: Pause between delivery rounds of results kept on disk.
DELIVERY_RETRY_S = 2.0
#: Wait for the dispatcher's answer to ``results`` (it writes files before answering).
RESULTS_TIMEOUT_S = 30.0
#: Output sent with a result: the head and the tail (where pytest puts its summary)
#: of a long log, with a marker in between.
LOG_TAIL_BYTES = 256 * 1024
#: Output sent per result: what the dispatcher keeps, less room for the notes the
#: runner appends (a timeout message), so nothing it sends is cut off there.
LOG_LIMIT_BYTES = MAX_LOG_BYTES - 1024
EXIT_DISPATCHER_GONE = 3

#: pytest's exit codes other than 0 and 1, as reasons for a failed verdict.
PYTEST_EXIT_REASONS = {
    2: "tests interrupted or could not be collected",
    3: "pytest internal error",
    4: "pytest usage error",
    5: "no tests collected",
}


@dataclass
class JobResult:
    """The outcome of one attempt, as sent with ``results`` and as kept on disk."""

    commit: str
    attempt: int
    status: str  # passed | failed | error (infrastructure) | aborted (handed back)
    passed: int | None = None
    failed: int | None = None
    errors: int | None = None
    skipped: int | None = None
    duration: float | None = None
    reason: str | None = None
    log: bytes = b""
    junit: bytes | None = None

    def to_message(self) -> Message:
        return request(
            "results",
            commit=self.commit,
            attempt=self.attempt,
            status=self.status,
            passed=self.passed,
            failed=self.failed,
            errors=self.errors,
            skipped=self.skipped,
            duration=self.duration,
            reason=self.reason,
            log=self.log,
            junit=self.junit,
        )

    def to_json(self) -> bytes:
        data = asdict(self)
        data["log"] = base64.b64encode(self.log).decode("ascii")
        data["junit"] = None if self.junit is None else base64.b64encode(self.junit).decode("ascii")
        return json.dumps(data).encode("utf-8")

    @classmethod
    def from_json(cls, text: bytes) -> "JobResult":
        """A kept result; ValueError if it cannot be sent. One for an abbreviated commit id
        (kept by an older runner) is such: the dispatcher takes full ids only, and has
        retired the job."""
        data = json.loads(text)
        if not is_commit_id(str(data["commit"])):
            raise ValueError("not a full commit id: %r" % str(data["commit"])[:80])
        data["log"] = base64.b64decode(data["log"])
        data["junit"] = None if data["junit"] is None else base64.b64decode(data["junit"])
        return cls(**data)


def read_junit_counts(path: str) -> dict | None:
    """passed/failed/errors/skipped from a JUnit XML file, or None if there is none usable."""
    try:
        if os.path.getsize(path) > MAX_JUNIT_BYTES:
            return None
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    if root.tag not in ("testsuite", "testsuites"):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            text = suite.get(key, "0")
            if not text.isascii() or not text.isdigit():
                return None  # a count the protocol would refuse: better no counts than no result
            totals[key] += int(text)
    return {
        "passed": max(0, totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]),
        "failed": totals["failures"],
        "errors": totals["errors"],
        "skipped": totals["skipped"],
    }


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


def run_process_group(command, cwd: str, env: dict, output_path: str, timeout: float, stop: threading.Event) -> tuple[int, str | None]:
    """Run ``command`` in a new process group, output to ``output_path``; see ``supervise``."""
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            shell=isinstance(command, str),
            start_new_session=True,
        )
    return supervise(process.pid, process.wait, timeout, stop)


def supervise(pgid: int, wait, timeout: float, stop: threading.Event) -> tuple[int, str | None]:
    """Wait for the test process leading group ``pgid`` (``wait()`` blocks until it ends
    and returns its exit status) under a time limit.

    Returns (exit status, None) when it ends by itself, or (status, "timeout") /
    (status, "stopped") when it was killed: SIGTERM to the whole group, SIGKILL
    after KILL_GRACE_S. Whatever is left of the group afterwards (processes a test
    started in the background) is killed too; what left the group (a new session)
    is the runner's to kill (``TestRunner._kill_leftovers``). The exit is noticed by
    a blocking wait, not by polling, so a result is reported the moment the tests end.
    """
    finished = threading.Event()
    why: list[str] = []

    def watchdog() -> None:
        deadline = time.monotonic() + timeout
        while not finished.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why.append("timeout")
                break
            if stop.is_set():
                why.append("stopped")
                break
            finished.wait(min(remaining, 0.5))
        else:
            return
        _signal_group(pgid, signal.SIGTERM)
        if not finished.wait(KILL_GRACE_S):
            _signal_group(pgid, signal.SIGKILL)

    guard = threading.Thread(target=watchdog, name="test-watchdog", daemon=True)
    guard.start()
    try:
        status = wait()
    finally:
        finished.set()
        guard.join()
        _signal_group(pgid, signal.SIGKILL)
    return status, (why[0] if why else None)


class GitDirGuard:
    """Puts back what tests may change in the clone's ``.git`` that the checkout
    (reset, clean) does not: its configuration (core.autocrlf, sparse checkout,
    filters...), the ``info`` files (attributes, sparse-checkout patterns, excludes)
    and the hooks (which git would run during the next checkout).

    The tests run inside the clone and can write there, by accident (a ``git
    config`` run in the wrong folder) or not; a change would decide the verdicts
    of the commits after theirs. The state kept is the one found when the runner
    started, held in memory, where the tests cannot reach it: change the clone's
    configuration with the runner stopped.
    """

    #: Files kept as they were, relative to the git folder.
    FILES = ("config", "info/attributes", "info/sparse-checkout", "info/exclude")
    #: Folders whose files are kept as they were (none added, none changed).
    FOLDERS = ("hooks",)

    def __init__(self, git_dir: str):
        self.git_dir = git_dir
        self._kept = self._read()

    def _paths(self) -> list[str]:
        paths = list(self.FILES)
        for folder in self.FOLDERS:
            try:
                paths += [os.path.join(folder, name) for name in os.listdir(os.path.join(self.git_dir, folder))]
            except FileNotFoundError:
                pass
        return paths

    def _read(self) -> dict[str, tuple[bytes, int] | None]:
        """Each path's (contents, mode), or None where there is no file."""
        contents: dict[str, tuple[bytes, int] | None] = {}
        for relative in self._paths():
            try:
                with open(os.path.join(self.git_dir, relative), "rb") as handle:
                    contents[relative] = (handle.read(), os.fstat(handle.fileno()).st_mode & 0o777)
            except (FileNotFoundError, IsADirectoryError):
                contents[relative] = None
        return contents

    def restore(self) -> list[str]:
        """Put back every file that changed; the relative paths put back."""
        now = self._read()
        restored = []
        for relative in sorted(set(now) | set(self._kept)):
            was, path = self._kept.get(relative), os.path.join(self.git_dir, relative)
            if now.get(relative) == was:
                continue
            if was is None:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write(path, was[0], durable=False)
                os.chmod(path, was[1])
            restored.append(relative)
        return restored


class JobFault(Exception):
    """The runner failed the job (not the tests): it is handed back as an ``error``."""


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class TestRunner:
    """One runner: its server, its worker, and its link to the dispatcher."""

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
    ):
        self.security = security or Security()
        repo = git.Repo(clone)  # fails early, with git's message, if it is not a clone
        self.clone = repo.working_tree_dir
        self.dispatcher = dispatcher
        self.test_command = test_command
        self.timeout = timeout
        self.dispatcher_timeout = dispatcher_timeout
        self.checkout_timeout = checkout_timeout
        self.state_dir = state_dir or os.path.join(repo.git_dir, "ci_runner")
        self._git_dir_guard = GitDirGuard(repo.git_dir)
        self.pending_dir = os.path.join(self.state_dir, "pending")
        os.makedirs(self.pending_dir, exist_ok=True)
        self.server = ProtocolServer((host, port), self.handle, log, self.security)
        bound_host, bound_port = self.server.address
        self.advertise_host = advertise_host or (socket.getfqdn() if host in ("0.0.0.0", "::", "") else host)
        self.name = name or "%s:%d" % (self.advertise_host, bound_port)
        self.stop_event = threading.Event()
        self.exit_code = 0
        self._cond = threading.Condition()
        self._job: tuple[str, int] | None = None  # accepted and not yet reported
        #: The tests of ``_job`` are over and its result is being reported.
        self._reporting = False
        #: A job accepted while ``_job``'s result was on its way; started next.
        self._next: tuple[str, int] | None = None
        #: (commit, attempt) of results kept on disk, oldest first; a copy of what
        #: pending_dir holds, refreshed whenever a file there is added or removed.
        self._kept: list[tuple[str, int]] = []
        self._refresh_kept()
        self._last_contact = time.monotonic()
        self._contact_timeout = CONTACT_HEARTBEATS * 1.0
        self._delivery_wake = threading.Event()
        self._delivery_lock = threading.Lock()  # one delivery round at a time
        self._threads: list[threading.Thread] = []
        #: The worker thread's own: a pytest imported once, forked for each job
        #: (only for the default test command).
        self._warm: WarmPytest | None = None
        if warm_pytest and not test_command:
            # Started in the clone, where a fresh ``python -m pytest`` starts: relative
            # entries of $PYTHONPATH mean the same to both.
            self._warm = WarmPytest(dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), self.clone)
        self._warm_failures = 0
        #: This process is a child subreaper (``main`` made it one): the processes a
        #: job leaves behind come back to it as children, to be killed. Only then
        #: is a child the runner does not know a leftover; in any other process (a
        #: test that embeds a runner) it may be anyone's.
        self.subreaper = subreaper

    # --- requests ------------------------------------------------------------------

    def handle(self, message: Message, peer: str) -> Message:
        if message.verb == "ping":
            with self._cond:
                self._last_contact = time.monotonic()
                job = self._next or self._job or (self._kept[0] if self._kept else None)
            if job is None:
                return reply("OK", state="idle")
            if job is not self._job and job is not self._next:
                # A kept result still owns its job: saying so keeps the dispatcher from
                # running it again (or giving this runner another) before it arrives.
                self._delivery_wake.set()
            return reply("OK", state="busy", commit=job[0], attempt=job[1])
        if message.verb == "runtest":
            commit, attempt = message.fields["commit"], message.fields["attempt"]
            with self._cond:
                self._last_contact = time.monotonic()
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
                self._cond.notify_all()
            log.info("commit %s attempt %d accepted from %s", commit, attempt, peer)
            return reply("OK")
        log.warning("%s sent %s, which is for the dispatcher", peer, message.verb)
        return error("%s is not a runner request" % message.verb)

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        self._threads.append(serve_in_thread(self.server, "server"))
        for name, target in (("worker", self._work_loop), ("contact", self._contact_loop), ("delivery", self._delivery_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self) -> None:
        """Stop: hand back the job in progress, stop serving, join the threads."""
        self.stop_event.set()
        self._delivery_wake.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            if thread.name == "worker":
                thread.join(timeout=KILL_GRACE_S + RESULTS_TIMEOUT_S)
        self.server.shutdown()
        self.server.server_close()

    # --- the job -------------------------------------------------------------------

    def _work_loop(self) -> None:
        if self._warm is not None:
            self._start_warm()
        while True:
            with self._cond:
                while self._job is None and not self.stop_event.is_set():
                    self._cond.wait()
                if self.stop_event.is_set():
                    job = self._job
                    self._job = self._next = None
                    break
                commit, attempt = self._job
            try:
                result = self._run_job(commit, attempt)
            except Exception as exc:  # noqa: BLE001 - a fault of this runner, not a verdict: retried elsewhere
                log.exception("commit %s attempt %d: the runner failed", commit, attempt)
                result = JobResult(commit, attempt, "error", reason="runner fault: %s" % (str(exc) or type(exc).__name__))
            with self._cond:
                self._reporting = True
            try:
                self._report(result)
            except Exception:  # noqa: BLE001 - e.g. a full disk: the job's lease runs out and it is retried
                log.exception("commit %s attempt %d: could not keep or deliver the result", commit, attempt)
            finally:
                with self._cond:
                    self._job, self._next = self._next, None
                    self._reporting = False
        if job is not None:
            # Accepted but never started: hand it back so it runs elsewhere now.
            self._deliver(JobResult(job[0], job[1], "aborted", reason="runner shutting down"))
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

    def _run_tests(self, command, pytest_args: list[str] | None, env: dict, output_path: str) -> tuple[int, str | None]:
        """Run the tests in the clone: forked from the warm pytest when there is one,
        else ``command`` in a new interpreter. Returns what ``supervise`` returns."""
        # There is a warm pytest only for the default command (pytest_args given).
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
                    outcome = supervise(pid, lambda: self._warm.wait(pid, limit), self.timeout, self.stop_event)
                except WarmPytestError as exc:
                    # The tests ran, in part: run again here, they would find what they left.
                    self._warm_failed(str(exc), then="the job is handed back to run from a clean checkout")
                    raise JobFault("warm pytest failed during the tests: %s" % exc) from None
                self._warm_failures = 0
                return outcome
        return run_process_group(command, self.clone, env, output_path, self.timeout, self.stop_event)

    def _check_out(self, commit: str) -> tuple[int, str | None, bytes]:
        """Fetch if need be and check ``commit`` out, cleanly: (exit status, why it
        was killed or None, output), as ``supervise`` gives them.

        Like the tests, in a session of its own and under a time limit: a fetch that
        hangs is killed with everything it started, and a stopping runner does not
        wait for it. With no terminal to ask for a password on, a fetch that would
        wait for one fails instead.
        """
        restored = self._git_dir_guard.restore()
        if restored:
            log.warning("commit %s: put back what changed in the clone's .git since the runner started "
                        "(by the tests before?): %s", commit, ", ".join(restored))
        output_path = os.path.join(self.state_dir, "checkout.log")
        env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
        status, killed = run_process_group([script_path("test_runner_script.sh"), self.clone, commit], self.clone,
                                           env, output_path, self.checkout_timeout, self.stop_event)
        return status, killed, read_log(output_path)

    def _run_job(self, commit: str, attempt: int) -> JobResult:
        started = time.monotonic()
        status, killed, checkout_output = self._check_out(commit)
        self._kill_leftovers(commit, attempt, "checkout")
        if killed == "stopped":
            return JobResult(commit, attempt, "aborted", reason="runner shutting down")
        if status != 0:
            lines = checkout_output.decode("utf-8", "replace").strip().splitlines() or ["no output"]
            if killed == "timeout":
                lines.append("took more than %g s" % self.checkout_timeout)
            reason = "checkout failed: %s" % lines[-1][:300]
            log.error("commit %s attempt %d: %s", commit, attempt, reason)
            return JobResult(commit, attempt, "error", reason=reason, log=checkout_output[-MAX_LOG_BYTES:],
                             duration=time.monotonic() - started)
        output_path = os.path.join(self.state_dir, "output.log")
        junit_path = os.path.join(self.state_dir, "junit.xml")
        for path in (output_path, junit_path):
            if os.path.exists(path):
                os.unlink(path)
        pytest_args = None
        if self.test_command:
            command: object = self.test_command
        else:
            pytest_args = ["--junitxml", junit_path]
            command = [sys.executable, "-m", "pytest", *pytest_args]
        env = dict(os.environ)  # the operator's environment, as documented: part of the runner's setup
        env.update(CI_COMMIT=commit, CI_ATTEMPT=str(attempt), CI_JUNIT_XML=junit_path, PYTHONDONTWRITEBYTECODE="1")
        log.info("commit %s attempt %d: testing", commit, attempt)
        test_started = time.monotonic()
        try:
            status, killed = self._run_tests(command, pytest_args, env, output_path)
        except JobFault as exc:
            log.error("commit %s attempt %d: %s", commit, attempt, exc)
            return JobResult(commit, attempt, "error", reason=str(exc), log=read_log(output_path),
                             duration=time.monotonic() - started)
        finally:
            # Before the result goes out: the dispatcher may send the next commit at once.
            self._kill_leftovers(commit, attempt, "tests")
        duration = time.monotonic() - test_started
        counts = read_junit_counts(junit_path) or {}
        junit = None
        if counts:
            with open(junit_path, "rb") as handle:
                junit = handle.read()
        result = JobResult(commit, attempt, "passed", duration=round(duration, 3), log=read_log(output_path), junit=junit, **counts)
        if killed == "stopped":
            result.status, result.reason = "aborted", "runner shutting down"
        elif killed == "timeout":
            result.status, result.reason = "failed", "timeout"
            result.log += b"\n[runner: tests killed after the %g s time limit]\n" % self.timeout
        elif status != 0:
            result.status = "failed"
            if self.test_command:
                result.reason = None if status > 0 else "killed by signal %d" % -status
            elif status < 0:
                result.reason = "killed by signal %d" % -status
            else:
                result.reason = PYTEST_EXIT_REASONS.get(status, None if status == 1 else "exit status %d" % status)
        log.info("commit %s attempt %d: %s in %.2f s%s", commit, attempt, result.status, duration,
                 " (%s)" % result.reason if result.reason else "")
        return result

    # --- results -------------------------------------------------------------------

    def _report(self, result: JobResult) -> None:
        """Keep a result on disk, then deliver it with any others still kept."""
        if result.status == "aborted":
            # Worthless later: if the dispatcher does not hear it now, the job's lease
            # runs out and it is requeued anyway.
            self._deliver(result)
            return
        path = os.path.join(self.pending_dir, "%012d-%s.json" % (result.attempt, result.commit))
        atomic_write(path, result.to_json())
        self._refresh_kept()
        if not self._deliver_kept():
            log.warning("commit %s attempt %d: result kept in %s until the dispatcher is back",
                        result.commit, result.attempt, path)

    def _deliver(self, result: JobResult) -> bool:
        """Send one result. True when the dispatcher has it (or will never want it)."""
        try:
            answer = communicate(self.dispatcher, result.to_message(), timeout=RESULTS_TIMEOUT_S, security=self.security)
        except (OSError, ProtocolError) as exc:
            log.info("commit %s attempt %d: could not deliver result: %s", result.commit, result.attempt, exc)
            return False
        if answer.verb == "OK":
            log.info("commit %s attempt %d: result delivered", result.commit, result.attempt)
            return True
        reason = answer.get("reason")
        if reason == UNKNOWN_ATTEMPT:
            # The dispatcher never gave out this attempt (its database was replaced):
            # the result can never be recorded, so keeping it would only retry forever.
            log.error("commit %s attempt %d: dispatcher refused the result: %s; discarded",
                      result.commit, result.attempt, reason)
            return True
        # Anything else (it could not write the result, had too many connections...)
        # may pass: the result is kept and sent again.
        log.warning("commit %s attempt %d: dispatcher could not take the result: %s",
                    result.commit, result.attempt, reason)
        return False

    def _deliver_kept(self) -> bool:
        """Deliver every kept result, oldest first. False if the dispatcher is unreachable."""
        with self._delivery_lock:
            for name in sorted(os.listdir(self.pending_dir)):
                if not name.endswith(".json"):
                    continue
                path = os.path.join(self.pending_dir, name)
                try:
                    with open(path, "rb") as handle:
                        result = JobResult.from_json(handle.read())
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    log.error("unreadable kept result %s (%s): removed", path, exc)
                    os.unlink(path)
                    self._refresh_kept()
                    continue
                if not self._deliver(result):
                    return False
                os.unlink(path)
                self._refresh_kept()
        return True

    def _refresh_kept(self) -> None:
        kept = []
        for name in sorted(os.listdir(self.pending_dir)):
            attempt, _, rest = name.partition("-")
            commit = rest[: -len(".json")]
            # A ping that named a commit by anything but its full id would fail to
            # decode at the dispatcher: such a file is not a result (it is removed).
            if name.endswith(".json") and attempt.isdigit() and is_commit_id(commit):
                kept.append((commit, int(attempt)))
        with self._cond:
            self._kept = kept

    def _delivery_loop(self) -> None:
        while not self.stop_event.is_set():
            self._delivery_wake.wait(DELIVERY_RETRY_S)
            self._delivery_wake.clear()
            if os.listdir(self.pending_dir):
                self._deliver_kept()

    # --- the link to the dispatcher -------------------------------------------------

    def _register(self) -> bool:
        with self._cond:
            job = self._next or self._job
        message = request(
            "register",
            host=self.advertise_host,
            port=self.server.address[1],
            name=self.name,
            commit=job[0] if job else None,
            attempt=job[1] if job else None,
        )
        try:
            answer = communicate(self.dispatcher, message, security=self.security)
        except (OSError, ProtocolError) as exc:
            log.debug("register with %s failed: %s", format_address(self.dispatcher), exc)
            return False
        if answer.verb != "OK":
            log.error("dispatcher refused registration: %s", answer.get("reason"))
            return False
        heartbeat = answer.get("heartbeat") or 1.0
        with self._cond:
            self._contact_timeout = max(CONTACT_HEARTBEATS * heartbeat, 2.0)
            self._last_contact = time.monotonic()
        log.info("registered with dispatcher %s as %s", format_address(self.dispatcher), self.name)
        return True

    def _contact_loop(self) -> None:
        registered = False
        unreachable_since: float | None = None
        while not self.stop_event.is_set():
            with self._cond:
                silent_for = time.monotonic() - self._last_contact
                contact_timeout = self._contact_timeout
                busy = self._job is not None
            if not registered or silent_for > contact_timeout:
                if registered:
                    log.warning("no ping from the dispatcher for %.1f s: registering again", silent_for)
                # Results kept from before go first: a job settled by them is not handed
                # out again, to this runner or another, once the runner is registered.
                registered = self._deliver_kept() and self._register()
                if registered:
                    unreachable_since = None
                else:
                    now = time.monotonic()
                    if unreachable_since is None:
                        unreachable_since = now
                        log.warning("dispatcher %s unreachable; retrying", format_address(self.dispatcher))
                    gone_for = now - unreachable_since
                    if self.dispatcher_timeout and gone_for > self.dispatcher_timeout and not busy:
                        log.error("dispatcher unreachable for %.0f s: exiting", gone_for)
                        self.exit_code = EXIT_DISPATCHER_GONE
                        self.stop_event.set()
                        return
            self.stop_event.wait(REGISTER_RETRY_S)


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
    parser.add_argument("--name", help="runner name in logs and results (default: HOST:PORT)")
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
    parser.add_argument("--log-file", help="write the log here instead of to stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
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
        security = security_from_arguments(args, serves=True)
        check_bind(args.host, security, args.insecure)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        runner = TestRunner(
            args.repo,
            dispatcher,
            host=args.host,
            port=args.port,
            advertise_host=args.advertise_host,
            name=args.name,
            test_command=args.test_command,
            timeout=args.timeout,
            dispatcher_timeout=args.dispatcher_timeout,
            checkout_timeout=args.checkout_timeout,
            state_dir=args.state_dir,
            security=security,
            warm_pytest=args.warm_pytest,
            subreaper=subreaper,
        )
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        log.error("%s is not a git clone: %s", args.repo, exc)
        return 2
    except OSError as exc:
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
