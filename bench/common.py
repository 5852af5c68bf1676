"""What the benchmarks share: daemons as real processes, generated git repositories,
bounded waits, the work done "by hand" that is each benchmark's baseline, and the
rows of the table that bench/run_all.py prints.

Every process a benchmark starts goes through ``Daemons``, a context manager that
stops each one by pid when the benchmark ends, however it ends: SIGTERM, a bounded
wait, then SIGKILL for it and whatever it left behind. Every wait is bounded and
checks a condition; nothing here sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.proctools import descendants  # noqa: E402  (re-exported for the benchmarks)

LOOPBACK = "127.0.0.1"
#: Longest wait for a daemon to say it is listening or registered (several start
#: at once on 2 cores, each importing GitPython).
START_TIMEOUT_S = 60.0
#: Longest wait for a daemon to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Longest a git command or a test run "by hand" may take.
COMMAND_TIMEOUT_S = 120.0

T = TypeVar("T")


class BenchError(Exception):
    """A benchmark could not measure what it wanted (a daemon died, a wait ran out)."""


def wait_until(condition: Callable[[], T], timeout: float, interval: float, what: str) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy.

    Raises BenchError after ``timeout`` seconds. The interval is the resolution of
    whatever is timed with it, so timed waits use a few milliseconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


# --- processes ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (VmRSS from /proc)."""
    with open("/proc/%d/status" % pid, encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError("no VmRSS for pid %d" % pid)


class Daemon:
    """One process started by a benchmark, its output going to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                cwd=str(log_path.parent),
                env=env,
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

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        """Wait for a regex in the log; fail at once if the process exits first."""

        def found() -> re.Match | None:
            match = re.search(pattern, self.log())
            if match is None and self.popen.poll() is not None:
                raise BenchError("%s exited (status %s) before logging %r; last lines:\n%s"
                                 % (self.name, self.popen.returncode, pattern, self.tail()))
            return match

        return wait_until(found, timeout, 0.02, "%r in the log of %s" % (pattern, self.name))

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL for it and anything it left behind."""
        if self.popen.poll() is None:
            leftovers = descendants(self.pid)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                leftovers += descendants(self.pid)
                _kill(self.pid)
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            for pid in leftovers:
                _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Daemons:
    """Starts processes for one benchmark; ``with`` stops them all by pid at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[Daemon] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Daemon:
        daemon = Daemon(name, argv, self.folder / ("%s.log" % name), env)
        self.started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in reversed(self.started):
            try:
                daemon.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                print("bench: could not stop %s (pid %d): %s" % (daemon.name, daemon.pid, exc), file=sys.stderr)

    def __enter__(self) -> "Daemons":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def start_dispatcher(daemons: Daemons, folder: Path, *extra: str) -> tuple[Daemon, tuple[str, int], Path]:
    """A dispatcher on a free loopback port; returns it, its address and its results folder."""
    results = folder / "test_results"
    daemon = daemons.start(
        "dispatcher",
        [sys.executable, str(ROOT / "dispatcher.py"), "--host", LOOPBACK, "--port", "0",
         "--results-dir", str(results), *extra],
    )
    port = int(daemon.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    return daemon, (LOOPBACK, port), results


def start_runner(daemons: Daemons, name: str, clone: Path, dispatcher: tuple[str, int], *extra: str,
                 env: dict | None = None) -> Daemon:
    """A real test runner on a free port (not waited for: see ``wait_registered``)."""
    return daemons.start(
        name,
        [sys.executable, str(ROOT / "test_runner.py"), "--host", LOOPBACK, "--name", name,
         "--dispatcher-server", "%s:%d" % dispatcher, str(clone), *extra],
        env,
    )


def start_observer(daemons: Daemons, observer_clone: Path, dispatcher: tuple[str, int], interval: float) -> Daemon:
    """A real observer polling its clone's origin every ``interval`` seconds."""
    return daemons.start(
        "observer",
        [sys.executable, str(ROOT / "repo_observer.py"), "--dispatcher-server", "%s:%d" % dispatcher,
         "--interval", str(interval), str(observer_clone)],
    )


def first_tip(observer: Daemon) -> str:
    """The tip an observer's first round reported (it tests from there on)."""
    return observer.wait_for_log(r"first run on origin/main: starting from its tip ([0-9a-f]{40})").group(1)


def status(address: tuple[str, int]) -> dict:
    """The dispatcher's ``status`` reply as a dict of counts."""
    from commit_ci.client import communicate
    from commit_ci.protocol import request

    answer = communicate(address, request("status"))
    if answer.verb != "OK":
        raise BenchError("status refused: %s" % answer.get("reason"))
    return dict(answer.fields)


def wait_runners_ready(address: tuple[str, int], count: int, timeout: float = START_TIMEOUT_S) -> None:
    """Until the dispatcher has ``count`` runners, all idle (registered and answering pings)."""
    wait_until(
        lambda: (lambda s: s["runners"] == count and s["idle"] == count)(status(address)),
        timeout, 0.05, "%d idle runner(s)" % count,
    )


# --- git ---------------------------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "CI Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "CI Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=str(cwd), env={**os.environ, **GIT_ENV},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise BenchError("git %s failed in %s: %s" % (" ".join(args), cwd, done.stderr.strip()))
    return done.stdout.strip()


def write_files(repo: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)


def new_repo(path: Path, files: dict[str, str]) -> Path:
    """A repository with one commit of ``files`` on branch main."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    commit(path, files, "initial commit")
    return path


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    """Write ``files``, commit them, return the full commit id."""
    write_files(repo, files)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def clone(source: Path, destination: Path) -> Path:
    git(destination.parent, "clone", "--quiet", str(source), str(destination))
    return destination


# --- the baseline: the same work by hand -------------------------------------------------


def by_hand_env() -> dict:
    """The environment a runner gives the tests (TestRunner._run_job): the by-hand run
    gets the same, so that pytest loads the same plugins on both sides."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def pytest_command(junit_path: Path) -> list[str]:
    """The runner's default test command (TestRunner._run_job)."""
    return [sys.executable, "-m", "pytest", "--junitxml", str(junit_path)]


def run_by_hand(clone_path: Path, commit_id: str, work: Path, command: str | None = None,
                extra_env: dict | None = None) -> float:
    """Seconds to make ``clone_path`` a clean checkout of ``commit_id`` and run its tests,
    as a person would: ``git reset --hard``, ``git clean -xdf``, then the runner's
    default pytest command, or ``command`` (a shell command, as ``--test-command``),
    with ``extra_env`` added to the runner's environment."""
    env = by_hand_env()
    env.update(extra_env or {})
    junit = work / "by-hand-junit.xml"
    env["CI_JUNIT_XML"] = str(junit)
    started = time.perf_counter()
    for args in (["reset", "--quiet", "--hard", commit_id], ["clean", "-ffdxq"]):
        subprocess.run(["git", *args], cwd=str(clone_path), check=True, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=COMMAND_TIMEOUT_S)
    with open(work / "by-hand-output.log", "wb") as output:
        done = subprocess.run(command or pytest_command(junit), shell=command is not None, cwd=str(clone_path),
                              env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                              timeout=COMMAND_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError("the tests of %s failed when run by hand (exit %d): see %s"
                         % (commit_id[:12], done.returncode, work / "by-hand-output.log"))
    return elapsed


def result_exists(results: Path, commit_id: str) -> bool:
    """The ``<sha>.json`` is written last: its presence means the result is complete."""
    return (results / (commit_id + ".json")).exists()


#: Result files are looked for this often: the resolution of the system's time.
RESULT_POLL_S = 0.002


def dispatch_and_wait(address: tuple[str, int], results: Path, sha: str, timeout: float) -> tuple[float, dict]:
    """Seconds from ``dispatch`` to the result file of ``sha`` (polled every
    RESULT_POLL_S), and the result's summary; BenchError unless it passed."""
    from commit_ci.client import communicate
    from commit_ci.protocol import request

    started = time.perf_counter()
    answer = communicate(address, request("dispatch", commit=sha))
    if answer.verb != "OK" or answer.get("new") != 1:
        raise BenchError("dispatch of %s answered %s" % (sha[:12], answer))
    wait_until(lambda: result_exists(results, sha), timeout, RESULT_POLL_S, "result of %s" % sha[:12])
    elapsed = time.perf_counter() - started
    summary = json.loads((results / (sha + ".json")).read_text())
    if summary["status"] != "passed":
        raise BenchError("commit %s: %s (%s); see %s" % (sha[:12], summary["status"], summary["reason"], results / sha))
    return elapsed, summary


# --- the table ---------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a figure, the baseline it was measured against, the target."""

    benchmark: str
    figure: str  # what is measured, in words
    value: str
    baseline: str
    target: str
    verdict: str  # "met", "missed", "not available", or "-" (reported, no target)


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` 0.99 for p99)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def format_table(rows: list[Row]) -> str:
    """A Markdown table, so that it can be pasted as it is into docs/performance.md."""
    header = ("benchmark", "figure", "value", "baseline (same run)", "target", "verdict")
    cells = [header] + [(r.benchmark, r.figure, r.value, r.baseline, r.target, r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator] + [line(row) for row in cells[1:]])


def machine_summary() -> str:
    """What the figures were measured on."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            kib = int(handle.readline().split()[1])
            memory = ", %.0f GiB RAM" % (kib / 1024 / 1024)
    except (OSError, ValueError, IndexError):
        pass
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    return "%s, %d cores%s; %s %s; Python %s; %s; SQLite %s" % (
        model, os.cpu_count() or 0, memory, platform.system(), platform.release(),
        platform.python_version(), git_version, sqlite3.sqlite_version,
    )
