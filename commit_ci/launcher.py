"""Run the whole CI system on this machine for one repository, in one command.

``ci-local REPOSITORY`` clones the repository (a path or a URL) once for the
observer, once for each runner and once for the dispatcher's results page under
``--work-dir`` (by default a folder of its own under ~/.cache/ci-local: not under
this project, whose pytest.ini the tests in the clones would otherwise find), starts
a dispatcher on
127.0.0.1, ``--runners`` test runners and an observer as child processes, each
logging to its own file in WORK_DIR/logs, and shows what they do as it happens.
Results land in ``--results-dir`` (./test_results by default). Ctrl-C stops
everything in order: the observer, then the runners (which hand back jobs in
progress), then the dispatcher, each with a bounded wait and SIGKILL as the last
resort. Starting it again resumes where it stopped: the clones, the queue and the
observer's memory are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import git

from commit_ci import ctl
from commit_ci.client import communicate
from commit_ci.daemon import install_stop_signals
from commit_ci.protocol import request
from commit_ci.security import Authenticator, Security
from commit_ci.states import JobState
from commit_ci.wire import ProtocolError, format_address

log = logging.getLogger("ci-local")

#: The folder that holds this copy of the package: a checkout, or site-packages.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Longest wait for the dispatcher to answer after it is started.
DISPATCHER_START_TIMEOUT_S = 20.0
#: Longest wait for each daemon to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: How often the logs are read for display.
DISPLAY_INTERVAL_S = 0.25


class Daemon:
    """One child process with its log file."""

    def __init__(self, name: str, argv: list[str], log_path: str):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self._offset = log_file.tell()
            # A session of its own: Ctrl-C reaches only this launcher, which then
            # stops the daemons in order instead of all at once.
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def new_lines(self) -> list[str]:
        """Complete log lines written since the last call."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._offset)
                data = log_file.read()
        except OSError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [line.decode("utf-8", "replace") for line in lines if line.strip()]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_S)
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)


def module_argv(module: str, *arguments: str) -> list[str]:
    """The command line that runs ``commit_ci.<module>``'s ``main`` with this Python and
    this copy of the package, whatever the working directory holds (``python -m``
    would look there first)."""
    boot = "import sys; sys.path[0] = %r; from commit_ci.%s import main; sys.exit(main())" % (PACKAGE_PARENT, module)
    return [sys.executable, "-c", boot, *arguments]


def prepare_clone(source: str, path: str) -> None:
    """Clone ``source`` into ``path``, or check that ``path`` is already a clone of it."""
    if not os.path.exists(path):
        git.Repo.clone_from(source, path)
        return
    repo = git.Repo(path)
    url = repo.remotes.origin.url if repo.remotes else None
    if url != source:
        raise ValueError("%s is a clone of %s, not of %s: use another --work-dir" % (path, url, source))


def show(daemon: Daemon, line: str) -> None:
    # Log lines start "YYYY-MM-DD HH:MM:SS,mmm logger LEVEL message": keep the time.
    parts = line.split(" ", 3)
    if len(parts) == 4 and len(parts[0]) == 10 and parts[2]:
        line = "%s %s" % (parts[1][:8], parts[3])
    print("%-11s %s" % (daemon.name, line), flush=True)


def worth_showing(line: str) -> bool:
    """Daemon log lines the live view passes on: problems, not routine."""
    return " WARNING " in line or " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")


class LiveView:
    """What the system is doing, from the dispatcher's own answers.

    On a terminal, a small block redrawn in place: queue, each runner, the last
    verdicts. Otherwise (a pipe, a file) one line per change: a commit queued,
    started on a runner, settled with its verdict.
    """

    def __init__(self, client: ctl.Client, interactive: bool):
        self.client = client
        self.interactive = interactive
        self._seen_queued: set[str] = set()
        self._seen_running: set[tuple[str, int]] = set()
        self._seen_started: set[str] = set()  # commits shown running, whatever the attempt
        self._seen_results: set[str] | None = None  # None: not read yet (older results are not news)
        self._settled: dict[str, int] = {}
        self._block_height = 0

    def refresh(self, notes: list[str]) -> None:
        try:
            status = self.client.ask("status")
            queue = self.client.ask_json("queue", limit=50)
            runners = self.client.ask_json("runners")["runners"]
            recent = self.client.ask_json("recent", limit=10)["results"]
        except ctl.Failure as exc:
            notes = notes + ["ci-local: %s" % exc]
            status = queue = runners = recent = None
        if self.interactive:
            self._redraw(notes, status, queue, runners, recent)
            return
        for note in notes:
            print(note, flush=True)
        if status is not None:
            for line in self._changes(queue, recent):
                print(line, flush=True)

    def _changes(self, queue: dict, recent: list[dict]) -> list[str]:
        lines = []
        for job in queue["queued"]:
            if job["commit"] not in self._seen_queued:
                self._seen_queued.add(job["commit"])
                lines.append("queued   %s" % ctl.short(job["commit"]))
        for job in queue["running"]:
            for out in job.get("shards") or [job]:  # a sharded commit: each shard where it runs
                key = (job["commit"], out["attempt"])
                if key not in self._seen_running:
                    self._seen_running.add(key)
                    self._seen_started.add(job["commit"])
                    shard = " shard %s of %s" % (out["shard"], out["shards"]) if "shard" in out else ""
                    lines.append("running  %s%s on %s (attempt %s)" % (ctl.short(job["commit"]), shard, out["runner"],
                                                                       out["attempt"]))
        if self._seen_results is None:
            # Results from before this session (a restart on the same work dir) are not news.
            self._seen_results = {summary["commit"] for summary in recent}
        fresh = [summary for summary in reversed(recent) if summary["commit"] not in self._seen_results]
        for summary in fresh:
            self._seen_results.add(summary["commit"])
            if not self.interactive and summary["commit"] not in self._seen_started:
                # Started and finished between two looks: the start is news too.
                lines += self._missed_start(summary)
            self._settled[summary["status"]] = self._settled.get(summary["status"], 0) + 1
            lines.append("done     %s" % ctl.result_line(summary))
        return lines

    def _missed_start(self, summary: dict) -> list[str]:
        if not summary.get("runner"):
            return []  # settled without running (e.g. its commit was gone)
        try:
            attempt = self.client.ask_json("lookup", commit=summary["commit"]).get("attempt")
        except ctl.Failure:
            return []
        self._seen_started.add(summary["commit"])
        return ["running  %s on %s (attempt %s)" % (ctl.short(summary["commit"]), summary["runner"], attempt)]

    def _redraw(self, notes, status, queue, runners, recent) -> None:
        if recent is not None:
            self._changes(queue, recent)  # keeps the session's counts
        block = ["ci-local  dispatcher %s  (Ctrl-C stops)" % format_address(self.client.address)]
        if status is None:
            block.append("  dispatcher not answering")
        else:
            done = ", ".join("%d %s" % (count, verdict) for verdict, count in sorted(self._settled.items())) or "none yet"
            block.append("queued %d   running %d   done this session: %s" % (status.get("queued"), status.get("running"), done))
            block += ctl.runner_lines(runners)
            block.append("last:")
            block += ["  " + _coloured(summary) for summary in recent[:5]] or ["  (no results yet)"]
        # Up over the previous block, clear it, print any notes (they scroll away), then the block.
        out = "\x1b[%dA\x1b[J" % self._block_height if self._block_height else ""
        out += "".join(note + "\n" for note in notes) + "\n".join(block) + "\n"
        sys.stdout.write(out)
        sys.stdout.flush()
        self._block_height = len(block)


def _coloured(summary: dict) -> str:
    colour = {JobState.PASSED: "32", JobState.FAILED: "31"}.get(summary["status"], "33")
    return "\x1b[%sm%s\x1b[0m" % (colour, ctl.result_line(summary))


def local_secret(work_dir: str) -> bytes:
    """The secret the local daemons share: made once, readable by this user only.

    Even on loopback, other users of the machine could otherwise post results or
    make the runners run tests."""
    path = os.path.join(work_dir, "secret")
    if not os.path.exists(path):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    with open(path, "rb") as handle:
        return handle.read().strip()


def wait_for_dispatcher(address: tuple[str, int], dispatcher: Daemon, security: Security) -> bool:
    deadline = time.monotonic() + DISPATCHER_START_TIMEOUT_S
    while time.monotonic() < deadline and dispatcher.exited() is None:
        try:
            if communicate(address, request("status"), timeout=2, security=security).verb == "OK":
                return True
        except (OSError, ProtocolError):
            time.sleep(0.1)
    return False


def default_work_dir(source: str) -> str:
    """A folder for ``source`` in the user's cache: outside any project, because
    pytest looks for its configuration in the folders above the clones too."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(source.rstrip("/")))
    return os.path.join(cache, "ci-local", "%s-%s" % (name or "repository", hashlib.sha1(source.encode()).hexdigest()[:8]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-local",
        description="Run the CI system locally on REPOSITORY: a dispatcher, test runners and an "
        "observer, with their clones and logs under --work-dir. Ctrl-C stops everything.",
    )
    parser.add_argument("repository", metavar="REPOSITORY", help="path or URL of the git repository to test")
    parser.add_argument("--runners", type=int, default=2, help="number of test runners (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8888, help="dispatcher port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8889,
                        help="port on 127.0.0.1 of the live results page, /api and /metrics (default: %(default)s; "
                        "0: none)")
    parser.add_argument("--work-dir", help="clones, logs and the shared secret (default: a folder for "
                        "REPOSITORY under $XDG_CACHE_HOME/ci-local, else ~/.cache/ci-local)")
    parser.add_argument("--results-dir", default="test_results", help="result files (default: %(default)s)")
    parser.add_argument("--branch", help="branch to watch (default: the repository's current branch)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between fetches (default: %(default)s)")
    parser.add_argument("--timeout", type=float, help="seconds a test run may take (default: the runner's)")
    parser.add_argument("--test-command", metavar="COMMAND", help="test command for the runners (default: pytest)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ci-local: %(message)s", stream=sys.stdout)
    if args.runners < 1:
        log.error("--runners must be at least 1")
        return 2
    source = os.path.abspath(args.repository) if os.path.exists(args.repository) else args.repository
    work_dir = os.path.abspath(args.work_dir or default_work_dir(source))
    logs = os.path.join(work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    names = ["observer"] + ["runner-%d" % index for index in range(1, args.runners + 1)]
    try:
        # The dispatcher's own clone only gives the results page commit subjects and authors.
        for name in names + ["dispatcher"]:
            prepare_clone(source, os.path.join(work_dir, name))
    except (git.GitCommandError, git.InvalidGitRepositoryError, ValueError) as exc:
        log.error("cannot prepare clones: %s", exc)
        return 2
    if not args.branch and git.Repo(os.path.join(work_dir, "observer")).head.is_detached:
        log.error("%s has no current branch (its HEAD is detached): say which branch to test with --branch", source)
        return 2

    security = Security(auth=Authenticator(local_secret(work_dir)))
    secret_option = ["--secret-file", os.path.join(work_dir, "secret")]
    address = ("127.0.0.1", args.port)
    dispatcher_address = "127.0.0.1:%d" % args.port
    dispatcher = Daemon(
        "dispatcher",
        module_argv("dispatcher", "--host", "127.0.0.1", "--port", str(args.port),
                    "--results-dir", os.path.abspath(args.results_dir), "--repo", os.path.join(work_dir, "dispatcher"),
                    *(["--http-port", str(args.http_port)] if args.http_port else []), *secret_option),
        os.path.join(logs, "dispatcher.log"),
    )
    runner_options = []
    if args.timeout is not None:
        runner_options += ["--timeout", str(args.timeout)]
    if args.test_command:
        runner_options += ["--test-command", args.test_command]
    runners = [
        Daemon(
            name,
            module_argv("runner", "--dispatcher-server", dispatcher_address, "--name", name,
                        *runner_options, *secret_option, os.path.join(work_dir, name)),
            os.path.join(logs, name + ".log"),
        )
        for name in names[1:]
    ]
    observer_options = ["--branch", args.branch] if args.branch else []
    observer = Daemon(
        "observer",
        module_argv("observer", "--dispatcher-server", dispatcher_address,
                    "--interval", str(args.interval), *observer_options, *secret_option, os.path.join(work_dir, "observer")),
        os.path.join(logs, "observer.log"),
    )
    daemons = [dispatcher, *runners, observer]

    stop = threading.Event()
    # SIGHUP too: closing the terminal must stop the daemons, which run in sessions
    # of their own and would not get it.
    install_stop_signals(stop, log, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    log.info("testing %s with %d runner(s); results in %s; logs in %s; Ctrl-C stops",
             source, args.runners, os.path.abspath(args.results_dir), logs)
    log.info("to ask it yourself: ci-ctl --dispatcher-server %s --secret-file %s status",
             dispatcher_address, os.path.join(work_dir, "secret"))
    if args.http_port:
        log.info("live results page: http://127.0.0.1:%d/", args.http_port)
    status = 0
    try:
        dispatcher.start()
        if not wait_for_dispatcher(address, dispatcher, security):
            for line in dispatcher.new_lines():
                show(dispatcher, line)
            log.error("the dispatcher did not start; see %s", dispatcher.log_path)
            return 1
        for daemon in daemons[1:]:
            daemon.start()
        view = LiveView(ctl.Client(address, security), interactive=sys.stdout.isatty())
        exits: list[str] = []
        while not stop.wait(DISPLAY_INTERVAL_S):
            notes = ["ci-local: " + exited for exited in exits]
            notes += ["%-11s %s" % (daemon.name, line) for daemon in daemons for line in daemon.new_lines()
                      if worth_showing(line)]
            exits = []
            view.refresh(notes)
            for daemon in daemons:
                code = daemon.exited()
                if code is not None and daemon.process is not None:
                    # Shown by the view (above its block, which a plain print would be drawn over).
                    exits.append("%s exited with status %s; see %s" % (daemon.name, code, daemon.log_path))
                    daemon.process = None
                    if daemon is dispatcher or daemon is observer:
                        # Without either, nothing more would be tested.
                        status = 1
                        stop.set()
        for exited in exits:
            log.warning("%s", exited)
    finally:
        log.info("stopping")
        for daemon in reversed(daemons):
            daemon.stop()
        try:
            for daemon in reversed(daemons):
                for line in daemon.new_lines():
                    if worth_showing(line):
                        show(daemon, line)
        except OSError:
            pass  # the terminal is gone (SIGHUP): the daemons are stopped all the same
        log.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
