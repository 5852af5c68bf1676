"""Fixtures: real daemons as child processes, real git repositories, loopback only.

Every process a test starts goes through ``Processes``, which stops it by pid at the
end of the test (SIGTERM, a bounded wait, then SIGKILL for it and anything it left
behind) and prints the tail of its log when the test failed. Every wait is bounded
and checks a condition.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proctools import descendants

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The commands of this checkout's package, not of an installed copy: ``python -m``
# would find whichever the working directory and site-packages offer first.
from commit_ci.launcher import module_argv  # noqa: E402,F401 - for the tests

LOOPBACK = "127.0.0.1"
#: Runner options for jobs that run as the runner's own user, without a sandbox: the
#: only way a warm pytest is used (a process started ahead must not be within a job's
#: reach), and a job can write where the test wants it to (a marker in its folder).
JOBS_AS_RUNNER = ("--job-user", "root", "--sandbox", "off") if os.geteuid() == 0 else ("--sandbox", "off")
#: Where a root's test session keeps its folders (pytest_configure).
TESTS_FOLDER = "/var/lib/commit-ci-tests"
#: Generous bounds: they only matter when something is broken.
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port that was free a moment ago, for a daemon that must start after its clients."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))
        time.sleep(interval)


class Process:
    """A daemon started by a test, with its log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT_S, after: int = 0) -> re.Match:
        """Wait for a regex in the log (from character offset ``after``); fail early if the process died."""

        def found():
            match = re.search(pattern, self.log()[after:])
            if match is None and self.popen.poll() is not None:
                raise AssertionError("%s exited (%s) before logging %r:\n%s" % (self.name, self.popen.returncode, pattern, self.log()[-3000:]))
            return match

        return wait_until(found, timeout, message="%r in the log of %s" % (pattern, self.name))

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self, with_children: bool = True) -> None:
        """SIGKILL, as a crash would; with its children, as a machine crash would."""
        doomed = descendants(self.pid) if with_children else []
        for pid in [self.pid] + doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM and wait; returns the exit status, or None if it had to be killed."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        leftovers = descendants(self.pid)
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def restart(self) -> None:
        assert not self.running()
        self.start()


class Processes:
    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[Process] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict | None = None) -> Process:
        process = Process(name, argv, self.folder / ("%s.log" % name), cwd or self.folder, env)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.terminate()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "report_" + report.when, report)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Run as root, the tests' folders go in a folder of this checkout's own, outside
    /tmp: a runner's sandbox gives its jobs a /tmp of their own, where a test's flag
    files would not be; and every pytest session of root makes /tmp/pytest-of-root
    private again (0700), which would lock the job user out of the clones of a test
    running meanwhile (job_user_can_enter)."""
    if os.geteuid() == 0 and not config.option.basetemp:
        checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
        os.makedirs(TESTS_FOLDER, exist_ok=True)
        config.option.basetemp = os.path.join(TESTS_FOLDER, checkout)


def let_the_job_user_in(path: Path) -> Path:
    """Run as root, a runner's jobs run as another user (nobody), who must reach the
    clone in a test's folder: pytest makes its folders private (0700), so let others
    through them (search, not list)."""
    if os.geteuid() == 0:
        for folder in (path, *path.parents):
            info = folder.stat()
            if info.st_uid == 0 and not info.st_mode & 0o001:
                folder.chmod(info.st_mode & 0o7777 | 0o001)
    return path


@pytest.fixture(autouse=True)
def job_user_can_enter(tmp_path):
    let_the_job_user_in(tmp_path)


@pytest.fixture
def processes(request, tmp_path):
    """Start daemons; all of them are stopped by pid when the test ends, pass or fail."""
    manager = Processes(tmp_path)
    yield manager
    manager.stop_all()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for process in manager.started:
            sys.stderr.write("\n----- last lines of %s (%s) -----\n" % (process.name, process.log_path))
            sys.stderr.write("\n".join(process.log().splitlines()[-40:]) + "\n")


# --- git repositories ------------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "CI Test",
    "GIT_AUTHOR_EMAIL": "ci@example.invalid",
    "GIT_COMMITTER_NAME": "CI Test",
    "GIT_COMMITTER_EMAIL": "ci@example.invalid",
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise AssertionError("git %s failed: %s" % (" ".join(args), done.stderr))
    return done.stdout.strip()


PASSING_TEST = "def test_passes():\n    assert 1 + 1 == 2\n"
FAILING_TEST = "def test_fails():\n    assert 1 + 1 == 3\n"
SYNTAX_ERROR_TEST = "def test_broken(:\n    pass\n"
HANGING_TEST = "import time\n\ndef test_hangs():\n    time.sleep(600)\n"
#: A test that runs until the file named by ``%r`` exists (the test creates it), so a
#: job stays in progress exactly as long as a test needs it to; bounded at 120 s.
WAITS_FOR_FLAG_TEST = """import os, time

def test_waits_for_flag():
    deadline = time.monotonic() + 120
    while not os.path.exists(%r) and time.monotonic() < deadline:
        time.sleep(0.05)
"""


class Upstream:
    """The repository under test: a work tree whose commits the observer fetches."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir()
        git(path, "init", "--quiet", "--initial-branch=main")
        self.commit({"test_base.py": PASSING_TEST}, "initial commit")

    def commit(self, files: dict[str, str | None], message: str, author: str | None = None) -> str:
        """Write (or, for None, delete) files, commit (as ``author``, "Name <email>",
        if given), return the full sha."""
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        git(self.path, "add", "--all")
        git(self.path, "commit", "--quiet", "--allow-empty", "-m", message, *(["--author", author] if author else []))
        return self.head()

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")

    def clone(self, destination: Path) -> Path:
        git(destination.parent, "clone", "--quiet", str(self.path), str(destination))
        return destination


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path / "upstream")


# --- keys ------------------------------------------------------------------------------


def make_keys(folder: Path, roles: dict[str, str]) -> tuple[Path, dict[str, Path]]:
    """A keys file in ``folder`` with a new key for each name in ``roles`` (name -> role),
    and for each name the file of its key, as ``ci-ctl key add -o FILE`` writes it: what
    its daemon takes with --secret-file."""
    from commit_ci.keys import HEADER, key_line, new_key

    folder.mkdir(parents=True, exist_ok=True)
    keys = {name: new_key(name, role) for name, role in roles.items()}
    keys_file = folder / "keys"
    keys_file.write_text(HEADER + "".join(key_line(key) for key in keys.values()))
    keys_file.chmod(0o600)
    files = {}
    for name, key in keys.items():
        files[name] = folder / ("%s.key" % name.replace(":", "_"))
        files[name].write_text(key.token + "\n")
        files[name].chmod(0o600)
    return keys_file, files


# --- the CI system ---------------------------------------------------------------------

#: Runners in tests skip pytest's plugin auto-loading (hypothesis, benchmark...):
#: the repositories under test need none, and it saves a second per job.
RUNNER_ENV = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


class CISystem:
    """Starts the three daemons of one CI installation and reads its results."""

    def __init__(self, processes: Processes, upstream: Upstream, folder: Path):
        self.processes = processes
        self.upstream = upstream
        self.folder = folder
        self.results_dir = folder / "test_results"
        self.dispatcher: Process | None = None
        self.port: int | None = None
        self.runners: list[Process] = []
        self.observer: Process | None = None

    @property
    def address(self) -> str:
        return "%s:%d" % (LOOPBACK, self.port)

    def _dispatcher_argv(self, port: int, extra: tuple[str, ...]) -> list[str]:
        return [sys.executable, str(ROOT / "dispatcher.py"), "--host", LOOPBACK, "--port", str(port),
                "--results-dir", str(self.results_dir), *extra]

    def start_dispatcher(self, *extra: str, port: int = 0) -> Process:
        """Start the dispatcher, on a free port unless ``port`` is given."""
        self.dispatcher = self.processes.start("dispatcher", self._dispatcher_argv(port, extra))
        self.port = int(self.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        # A restart, however it is done, comes back on the same port.
        self.dispatcher.argv = self._dispatcher_argv(self.port, extra)
        return self.dispatcher

    def restart_dispatcher(self) -> Process:
        """Start the dispatcher again, same port and options, after it was killed or stopped."""
        offset = len(self.dispatcher.log())
        self.dispatcher.restart()
        self.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:%d" % self.port, after=offset)
        return self.dispatcher

    def start_runner(self, *extra: str, launched_by: tuple[str, ...] = ()) -> Process:
        """Start a runner on its own clone; ``launched_by`` is a command that execs it."""
        index = len(self.runners) + 1
        clone = self.upstream.clone(self.folder / ("runner%d-clone" % index))
        argv = [*launched_by, sys.executable, str(ROOT / "test_runner.py"), "--host", LOOPBACK,
                "--dispatcher-server", self.address, str(clone), *extra]
        runner = self.processes.start("runner%d" % index, argv, env=RUNNER_ENV)
        runner.wait_for_log(r"registered with dispatcher")
        self.runners.append(runner)
        return runner

    def start_observer(self, *extra: str) -> Process:
        clone = self.upstream.clone(self.folder / "observer-clone")
        argv = [sys.executable, str(ROOT / "repo_observer.py"), "--dispatcher-server", self.address,
                "--interval", "0.2", str(clone), *extra]
        self.observer = self.processes.start("observer", argv)
        self.observer.wait_for_log(r"watching origin/main")
        # Its first round starts from the tip it finds then: a test's later commits
        # must come after that round, or the round may start from one of them.
        self.observer.wait_for_log(r"first run on origin/main: starting from its tip")
        return self.observer

    def result(self, commit: str) -> dict | None:
        path = self.results_dir / (commit + ".json")
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def report(self, commit: str) -> str:
        return (self.results_dir / commit).read_text()

    def wait_result(self, commit: str, timeout: float = 60.0) -> dict:
        return wait_until(lambda: self.result(commit), timeout, interval=0.1, message="result of %s" % commit[:12])

    def wait_results(self, commits: list[str], timeout: float = 120.0) -> dict[str, dict]:
        def all_there():
            found = {commit: self.result(commit) for commit in commits}
            return found if all(found.values()) else None

        return wait_until(all_there, timeout, interval=0.2, message="results of %d commits" % len(commits))

    @staticmethod
    def expected_files(commits, without_xml=()) -> list[str]:
        """The results folder's listing when each commit has exactly one result: report,
        JSON, log and (when its tests wrote one) JUnit XML, plus the page."""
        names = ["index.html"]
        for sha in commits:
            names += [sha, sha + ".json", sha + ".log"] + ([] if sha in without_xml else [sha + ".xml"])
        return sorted(names)

    def result_files(self) -> list[str]:
        """The files in the results folder, but for the page's temporary file: the
        page may be rewritten at any moment (a test that needs the folder quiet
        stops the dispatcher and lists it itself)."""
        return sorted(path.name for path in self.results_dir.iterdir() if not path.name.startswith(".tmp-"))

    @property
    def page_path(self) -> Path:
        return self.results_dir / "index.html"

    def page(self) -> str:
        try:
            return self.page_path.read_text()
        except FileNotFoundError:
            return ""

    def wait_page(self, commits: list[str], timeout: float = 30.0) -> list[tuple[str, str]]:
        """Wait until the results page lists all of ``commits``; returns its rows."""

        def listed():
            rows = page_rows(self.page())
            return rows if set(commits) <= {commit for commit, _ in rows} else None

        return wait_until(listed, timeout, interval=0.1, message="results page listing %d commits" % len(commits))


class _PageRowParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "tr" and "data-commit" in attributes:
            self.rows.append((attributes["data-commit"], attributes["data-verdict"]))


def page_rows(text: str) -> list[tuple[str, str]]:
    """(commit, verdict) of each result row of a results page (or of a browser's DOM dump), in order."""
    parser = _PageRowParser()
    parser.feed(text)
    parser.close()
    return parser.rows


@pytest.fixture
def ci(processes, upstream, tmp_path) -> CISystem:
    return CISystem(processes, upstream, tmp_path)


# --- processes a test leaves running -----------------------------------------------------

#: A process a test starts and means to outlive its job: ``python -c STRAY_CODE
#: FOLDER [FILE]`` creates FOLDER/<its pid>, then, for 120 s at most, waits (and
#: writes a failing conftest.py to FILE every 10 ms, if given: what a daemon left
#: by one commit could do to the next). FOLDER in its command line marks it as
#: the test's, for the ``strays`` fixture.
STRAY_CODE = """import os, sys, time
open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as handle:
            handle.write("raise SystemExit('planted by a process an earlier commit left running')\\n")
    time.sleep(0.01)
"""


def stray_pids(folder: Path) -> list[int]:
    """The pids the strays of ``folder`` wrote, whether they still run or not."""
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _command_line(pid: int) -> bytes | None:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def running_strays(folder: Path) -> list[int]:
    """The processes running with ``folder`` in their command line (a zombie has none)."""
    marker = os.fsencode(folder)
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and marker in (_command_line(int(entry)) or b"").split(b"\0")]


def gone(pid: int) -> bool:
    """True once ``pid`` has ended and been reaped (not even a zombie)."""
    return not os.path.exists("/proc/%d" % pid)


@pytest.fixture
def strays(tmp_path) -> Path:
    """A folder for strays (STRAY_CODE) to mark themselves with. At the end of the
    test, pass or fail, every process running with it in its command line is
    killed by pid; any found fails the test."""
    folder = tmp_path / "strays"
    folder.mkdir()
    yield folder
    found: set[int] = set()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        running = running_strays(folder)  # again: one may have forked meanwhile
        if not running:
            break
        for pid in running:
            found.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not found, "processes left running: %s" % sorted(found)
