"""The results page: ``index.html`` in the results folder, one line per commit.

The page lists the newest ``PAGE_RESULTS`` final results, newest first: short
commit id, subject and author, verdict in colour, test counts, duration, runner,
attempts and reason, links to the commit's report, log and JUnit XML, and the
failing tests with the first lines of their messages (from ``<sha>.xml``), and the
tests found flaky (failed, then passed when run again: flaky.py). Above the list, a
bar chart shows the verdicts and durations of the last ``CHART_RESULTS`` commits, a
table the ``FLAKY_SHOWN`` flakiest tests over the last ``flaky.DEFAULT_WINDOW`` runs,
and above them each branch's state: green, red since the commit that broke it, or
pending (store.JobStore.branch_states). It is a single static file: no script, no
external asset, nothing fetched, so it works opened from the file system.

Everything on it that comes from a commit or its tests (subjects, author names,
reasons, test names, failure messages) is untrusted, so the page is rendered by
Jinja2 with autoescaping, from the template templates/index.html, and a
Content-Security-Policy forbids scripts as a second line of defence.

``ResultsPage`` keeps the file up to date from a thread of its own: the
dispatcher calls ``notify()`` after each final result (setting an event, which
never blocks), and the thread rebuilds the page from the newest summaries in the
SQLite store, read through a read-only connection of its own so that it never
waits for the dispatcher's lock nor makes it wait. Results that arrive while a
page is being built are covered by one more build, however many there are.
Subjects and authors come from a clone (``--repo``, commit_metadata.py); a commit
missing from it is fetched for (bounded in time) and, failing that, shown by id.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import jinja2

from commit_ci import flaky, junit
from commit_ci.commit_metadata import CommitMetadata, cut
from commit_ci.files import atomic_write
from commit_ci.result import Result
from commit_ci.result_files import RUNS_FOLDER, result_path
from commit_ci.states import VERDICTS, JobState, values
from commit_ci.store import BranchState, JobStore
from commit_ci.wire import is_commit_id

log = logging.getLogger("dispatcher.page")

PAGE_NAME = "index.html"
#: Results on the page. It bounds the page's size and the work of each rebuild,
#: however long the history grows.
PAGE_RESULTS = 200
#: Commits in the chart of verdicts and durations.
CHART_RESULTS = 50
#: Branches whose state is shown, the most recently changed first.
BRANCHES_SHOWN = 50
#: Failing tests listed per commit; the rest are counted.
FAILURES_SHOWN = 25
#: Tests in the table of the flakiest.
FLAKY_SHOWN = 10
#: Longer reasons are cut, with an ellipsis (subjects and authors: commit_metadata.py).
REASON_CHARS = 300
SHORT_SHA_CHARS = 10
#: Least time between two builds. A build takes tens of milliseconds of CPU; under a
#: stream of results, building after each would compete with the dispatcher for the
#: CPU (and the GIL) all the time. The page is a view: a second late is fine.
MIN_BUILD_INTERVAL_S = 1.0
#: Longest wait for the page thread to finish its build when the dispatcher stops.
STOP_TIMEOUT_S = 10.0

#: The verdicts, as the page's colours and counts name them.
VERDICT_NAMES = values(VERDICTS)

# Chart geometry, in SVG user units (the chart scales to the page width).
BAR_WIDTH = 14
BAR_GAP = 4
CHART_HEIGHT = 90
#: The shortest bar, so that a very short run still shows its colour.
MIN_BAR_HEIGHT = 3
#: A result without a duration (an infrastructure error): a bar of this height, drawn faded.
NO_DURATION_BAR_HEIGHT = 12


# --- what the page shows ----------------------------------------------------------------


@dataclass(frozen=True)
class CommitFiles:
    """What is in the results folder for one commit; fixed once its result is final."""

    has_report: bool
    has_log: bool
    has_xml: bool
    failures: tuple[junit.FailedTest, ...] = ()
    failures_total: int = 0


@dataclass
class Row:
    commit: str
    short: str
    status: str
    subject: str | None
    author: str | None
    tests: str
    duration: str
    runner: str
    attempts: str
    reason: str | None
    finished: str
    files: CommitFiles
    #: The run shown (1, then one more per rerun), and the other runs: (number,
    #: status, link to its report or None when it has no files), the first first.
    run: int = 1
    other_runs: list[tuple[int, str, str | None]] = field(default_factory=list)
    #: Tests that failed and then passed when run again, and how many reruns there were.
    flaky_tests: list[str] = field(default_factory=list)
    reruns: int = 0
    #: Of a failed commit: "broken by <short sha> <subject> (<author>)", its first failing commit.
    broken_by: str | None = None
    first_failing: str | None = None


@dataclass
class FlakyTest:
    """A line of the table of the flakiest tests."""

    test: str
    flaky: int
    rate: str
    commit: str
    short: str
    outcomes: str


@dataclass
class BranchRow:
    name: str
    state: str
    since: str | None  # full id, the row it links to
    since_short: str | None
    commit_short: str | None  # the newest judged commit
    tip_short: str
    tip_state: str


def branch_row(state: BranchState) -> BranchRow:
    def short(commit: str | None) -> str | None:
        return commit[:SHORT_SHA_CHARS] if commit else None

    return BranchRow(state.branch, state.state, state.since, short(state.since), short(state.commit),
                     short(state.tip), state.tip_state.value if state.tip_state else "unknown")


@dataclass
class Bar:
    commit: str
    status: str
    x: int
    y: int
    height: int
    title: str
    faded: bool = False  # no duration to show


@dataclass
class Chart:
    bars: list[Bar] = field(default_factory=list)
    width: int = 0
    height: int = CHART_HEIGHT
    longest: str = ""


def broken_by(result: Result, infos: dict) -> str | None:
    """"broken by <short sha> <subject> (<author>)" for a failed result that names its
    first failing commit (the subject and author when they are known)."""
    culprit = result.first_failing
    if result.status != JobState.FAILED or not culprit or not is_commit_id(str(culprit)):
        return None
    info = infos.get(culprit)
    return "broken by %s%s" % (culprit[:SHORT_SHA_CHARS], " %s (%s)" % (info.subject, info.author) if info else "")


def format_duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "\u2013"
    if seconds < 60:
        return "%.1f s" % seconds
    minutes, rest = divmod(int(round(seconds)), 60)
    return "%d min %02d s" % (minutes, rest)


def format_tests(result: Result) -> str:
    """``12 passed, 1 failed``: passed always, the other counts when not zero."""
    counts = result.counts()
    if not isinstance(counts.pop("passed"), int):
        return "\u2013"
    parts = ["%d passed" % result.passed]
    parts += ["%d %s" % (value, key) for key, value in counts.items() if isinstance(value, int) and value]
    return ", ".join(parts)


def format_time(iso: object) -> str:
    """``2026-11-30T23:15:55.404Z`` -> ``2026-11-30 23:15:55 UTC``."""
    if not isinstance(iso, str) or len(iso) < 19:
        return "\u2013"
    return iso[:19].replace("T", " ") + " UTC"


def build_chart(rows: list[Row], durations: dict[str, float | None]) -> Chart:
    """Bars for the newest ``CHART_RESULTS`` rows, oldest on the left: colour is the
    verdict, height the duration relative to the longest shown."""
    recent = list(reversed(rows[:CHART_RESULTS]))
    if not recent:
        return Chart()
    longest = max((durations.get(row.commit) or 0.0 for row in recent), default=0.0)
    chart = Chart(width=len(recent) * (BAR_WIDTH + BAR_GAP) - BAR_GAP, longest=format_duration(longest))
    for index, row in enumerate(recent):
        duration = durations.get(row.commit)
        if duration is None:
            height, faded = NO_DURATION_BAR_HEIGHT, True
        else:
            height, faded = MIN_BAR_HEIGHT, False
            if longest > 0:
                height = max(MIN_BAR_HEIGHT, round(duration / longest * CHART_HEIGHT))
        title = "%s %s, %s%s" % (row.short, row.status, row.duration, " \u2013 " + row.subject if row.subject else "")
        x = index * (BAR_WIDTH + BAR_GAP)
        chart.bars.append(Bar(row.commit, row.status, x, CHART_HEIGHT - height, height, title, faded))
    return chart


#: The page's template, a file of the package (templates/index.html).
_template = jinja2.Environment(
    loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
).get_template("index.html")


def render_page(rows: list[Row], durations: dict[str, float | None], generated: str,
                branches: list[BranchRow] = (), flakiest: tuple[int, list[FlakyTest]] = (0, []),
                live: bool = False) -> str:
    """The whole page. Every value is escaped by the template: none is trusted. ``live``:
    the page as the dispatcher's HTTP server serves it (web.py), with a section for the
    running jobs and the script that keeps it up to date; without it, the static file."""
    counts = {verdict: sum(1 for row in rows if row.status == verdict) for verdict in VERDICT_NAMES}
    # The newest failure's tests are shown unfolded: it is the one people come to look at.
    newest_failure = next((row.commit for row in rows if row.files.failures), None)
    return _template.render(
        rows=rows,
        newest_failure=newest_failure,
        chart=build_chart(rows, durations),
        counts=counts,
        verdicts=VERDICT_NAMES,
        generated=generated,
        bar_width=BAR_WIDTH,
        branches=branches,
        flaky_runs=flakiest[0],
        flakiest=flakiest[1],
        live=live,
    )


# --- the page and its thread -------------------------------------------------------------


class ResultsPage:
    """Keeps ``results_dir/index.html`` up to date on a thread of its own; see the module docstring.

    ``store`` should be a read-only JobStore on the dispatcher's database (its own
    connection), which the page then owns and closes in ``stop()``; ``repo`` the
    path of the clone for commit subjects, or None.
    """

    def __init__(self, results_dir: str, store: JobStore, repo: str | None = None, limit: int = PAGE_RESULTS):
        self.results_dir = results_dir
        self.path = os.path.join(results_dir, PAGE_NAME)
        self.store = store
        self.limit = limit
        self.metadata = CommitMetadata(repo) if repo else None
        self._files: dict[tuple[str, int], CommitFiles] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The page as HTTP serves it (render_page's ``live``), from the last build.
        self._live_page: bytes | None = None

    def live_page(self) -> bytes | None:
        """The last page built for HTTP (web.py), or None before the first build."""
        return self._live_page

    def notify(self) -> None:
        """A final result was recorded. Never blocks: it only sets an event, so the
        dispatcher may call it with its lock held."""
        self._wake.set()

    def start(self) -> None:
        """Start the thread; it writes the page at once, then after each ``notify()``."""
        self._wake.set()
        self._thread = threading.Thread(target=self._loop, name="results-page", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a build in progress is finished), then close the store and the clone."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                # Stuck in a fetch, at most FETCH_TIMEOUT_S; a daemon thread, it ends with
                # the process. Closing what it uses under it would only add a traceback.
                log.warning("results page thread still busy after %.0f s; not waiting for it", STOP_TIMEOUT_S)
                return
        self.store.close()
        if self.metadata is not None:
            self.metadata.close()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            # Cleared before the build: a result recorded during it sets the event
            # again and gets a build of its own; any number of them share that one.
            self._wake.clear()
            try:
                self.write()
            except Exception:  # a broken page must not stop the next attempt
                log.exception("results page not written")
            if self._stop.wait(MIN_BUILD_INTERVAL_S):
                return

    def write(self) -> int:
        """Build the page from the store and write it atomically. Returns the number of results on it."""
        started = time.monotonic()
        results = [Result.from_summary(summary) for summary in self.store.recent_summaries(self.limit)]
        results = [result for result in results if is_commit_id(str(result.commit))]
        commits = [result.commit for result in results]
        culprits = {str(result.first_failing) for result in results
                    if result.status == JobState.FAILED and result.first_failing and is_commit_id(str(result.first_failing))}
        infos = self.metadata.lookup(commits + sorted(culprits - set(commits))) if self.metadata is not None else {}
        rows, durations = [], {}
        for result in results:
            commit = result.commit
            info = infos.get(commit)
            status = result.status if result.status in VERDICT_NAMES else JobState.ERROR.value
            rows.append(
                Row(
                    commit=commit,
                    short=commit[:SHORT_SHA_CHARS],
                    status=status,
                    subject=info.subject if info else None,
                    author=info.author if info else None,
                    tests=format_tests(result),
                    duration=format_duration(result.duration_s),
                    runner=str(result.runner or "\u2013"),
                    attempts=str(result.attempts if result.attempts is not None else "\u2013"),
                    reason=cut(str(result.reason), REASON_CHARS) if result.reason else None,
                    finished=format_time(result.finished_at),
                    files=self._commit_files(commit, status, result.run or 1),
                    run=result.run or 1,
                    other_runs=self._other_runs(commit, result.run or 1),
                    flaky_tests=[str(test) for test in result.flaky_tests or ()],
                    reruns=len(result.reruns or ()),
                    broken_by=broken_by(result, infos),
                    first_failing=str(result.first_failing) if broken_by(result, {}) else None,
                )
            )
            duration = result.duration_s
            durations[commit] = float(duration) if isinstance(duration, (int, float)) else None
        shown = set(commits)
        self._files = {key: files for key, files in self._files.items() if key[0] in shown}
        generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        branches = [branch_row(state) for state in self.store.branch_states(BRANCHES_SHOWN)]
        flakiest = self._flakiest()
        page = render_page(rows, durations, generated, branches, flakiest)
        self._live_page = render_page(rows, durations, generated, branches, flakiest, live=True).encode("utf-8")
        # Not fsync'ed: the page is rebuilt from the store at every start-up.
        atomic_write(self.path, page.encode("utf-8"), durable=False)
        log.debug("results page written: %d results in %.0f ms", len(rows), (time.monotonic() - started) * 1000)
        return len(rows)

    def _flakiest(self) -> tuple[int, list[FlakyTest]]:
        """The flakiest tests, and how many runs their rate is over (flaky.py)."""
        runs, tests = self.store.flakiest(flaky.DEFAULT_WINDOW, FLAKY_SHOWN)
        return runs, [FlakyTest(test["test"], test["flaky"], "%.1f%%" % (100.0 * test["flaky"] / runs),
                                test["commit"], test["commit"][:SHORT_SHA_CHARS], " ".join(test["outcomes"]))
                      for test in tests if runs and is_commit_id(test["commit"])]

    def _other_runs(self, commit: str, shown: int) -> list[tuple[int, str, str | None]]:
        """The runs of ``commit`` other than the one shown (read only for a commit run
        more than once), with links to the reports of the earlier ones."""
        if shown == 1:
            job = self.store.job(commit)
            if job is None or job.run == 1:
                return []
        others = []
        for run in self.store.runs(commit):
            if run.run != shown:
                link = "%s/%s/%d/%s" % (RUNS_FOLDER, commit, run.run, commit) if run.summary and run.run < shown else None
                others.append((run.run, run.status.value, link))
        return others

    def _commit_files(self, commit: str, status: str, run: int) -> CommitFiles:
        """Which of the commit's files exist, and its failing tests; read once per
        run of a commit (a final result's files never change)."""
        known = self._files.get((commit, run))
        if known is None:
            xml = result_path(self.results_dir, commit, ".xml")
            failures, total = self._failures(xml) if status == JobState.FAILED else ((), 0)
            known = CommitFiles(
                has_report=os.path.exists(result_path(self.results_dir, commit)),
                has_log=os.path.exists(result_path(self.results_dir, commit, ".log")),
                has_xml=os.path.exists(xml),
                failures=failures,
                failures_total=total,
            )
            self._files[(commit, run)] = known
        return known

    @staticmethod
    def _failures(path: str) -> tuple[tuple[junit.FailedTest, ...], int]:
        """The failing tests in the kept JUnit XML at ``path``; none when there is no usable file."""
        try:
            report = junit.read(path)
        except junit.JUnitError:
            return (), 0
        return junit.failures(report[1], FAILURES_SHOWN) if report is not None else ((), 0)
