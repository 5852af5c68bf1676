"""The results page: ``index.html`` in the results folder, one line per commit.

The page lists the newest ``PAGE_RESULTS`` final results, newest first: short
commit id, subject and author, verdict in colour, test counts, duration, runner,
attempts and reason, links to the commit's report, log and JUnit XML, and the
failing tests with the first lines of their messages (from ``<sha>.xml``). Above
the list, a bar chart shows the verdicts and durations of the last
``CHART_RESULTS`` commits. It is a single static file: no script, no external
asset, nothing fetched, so it works opened from the file system.

Everything on it that comes from a commit or its tests (subjects, author names,
reasons, test names, failure messages) is untrusted, so the page is rendered by
Jinja2 with autoescaping, and a Content-Security-Policy forbids scripts as a
second line of defence.

``ResultsPage`` keeps the file up to date from a thread of its own: the
dispatcher calls ``notify()`` after each final result (setting an event, which
never blocks), and the thread rebuilds the page from the newest summaries in the
SQLite store, read through a read-only connection of its own so that it never
waits for the dispatcher's lock nor makes it wait. Results that arrive while a
page is being built are covered by one more build, however many there are.
Subjects and authors come from a clone (``--repo``) read with GitPython; a commit
missing from it is fetched for (bounded in time) and, failing that, shown by id.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

import git
import jinja2

from commit_ci.files import atomic_write
from commit_ci.protocol import MAX_JUNIT_BYTES
from commit_ci.result_files import result_path
from commit_ci.store import JobStore
from commit_ci.wire import is_commit_id

log = logging.getLogger("dispatcher.page")

PAGE_NAME = "index.html"
#: Results on the page. It bounds the page's size and the work of each rebuild,
#: however long the history grows.
PAGE_RESULTS = 200
#: Commits in the chart of verdicts and durations.
CHART_RESULTS = 50
#: Failing tests listed per commit; the rest are counted.
FAILURES_SHOWN = 25
#: Lines, and characters per line, shown of each failure message.
FAILURE_LINES = 8
FAILURE_LINE_CHARS = 300
#: Longer subjects, author names and reasons are cut, with an ellipsis.
SUBJECT_CHARS = 200
AUTHOR_CHARS = 80
REASON_CHARS = 300
SHORT_SHA_CHARS = 10
#: A fetch for commits missing from --repo is killed after this long.
FETCH_TIMEOUT_S = 30.0
#: After a failed fetch, or one that did not bring a commit, the next fetch for
#: that commit waits this long: a commit that never comes must not cost a fetch
#: per result.
FETCH_RETRY_S = 60.0
#: Least time between two builds. A build takes tens of milliseconds of CPU; under a
#: stream of results, building after each would compete with the dispatcher for the
#: CPU (and the GIL) all the time. The page is a view: a second late is fine.
MIN_BUILD_INTERVAL_S = 1.0
#: Longest wait for the page thread to finish its build when the dispatcher stops.
STOP_TIMEOUT_S = 10.0

VERDICTS = ("passed", "failed", "error")

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
class CommitInfo:
    subject: str
    author: str


@dataclass(frozen=True)
class FailedTest:
    name: str
    kind: str  # "failure" (an assertion) or "error" (an exception, a collection error)
    lines: tuple[str, ...]


@dataclass(frozen=True)
class CommitFiles:
    """What is in the results folder for one commit; fixed once its result is final."""

    has_report: bool
    has_log: bool
    has_xml: bool
    failures: tuple[FailedTest, ...] = ()
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


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def format_duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "\u2013"
    if seconds < 60:
        return "%.1f s" % seconds
    minutes, rest = divmod(int(round(seconds)), 60)
    return "%d min %02d s" % (minutes, rest)


def format_tests(summary: dict) -> str:
    """``12 passed, 1 failed``: passed always, the other counts when not zero."""
    if not isinstance(summary.get("passed"), int):
        return "\u2013"
    parts = ["%d passed" % summary["passed"]]
    for key in ("failed", "errors", "skipped"):
        value = summary.get(key)
        if isinstance(value, int) and value:
            parts.append("%d %s" % (value, key))
    return ", ".join(parts)


def format_time(iso: object) -> str:
    """``2026-11-30T23:15:55.404Z`` -> ``2026-11-30 23:15:55 UTC``."""
    if not isinstance(iso, str) or len(iso) < 19:
        return "\u2013"
    return iso[:19].replace("T", " ") + " UTC"


def read_failures(path: str) -> tuple[tuple[FailedTest, ...], int]:
    """The failing and erroring test cases of a JUnit XML file: (the first
    ``FAILURES_SHOWN``, how many there are). A missing or unreadable file has none.

    The dispatcher keeps only plain JUnit (reports.clean_junit), but the file is
    still read defensively: size-checked, and any parse error means no list.
    """
    try:
        if os.path.getsize(path) > MAX_JUNIT_BYTES:
            return (), 0
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return (), 0
    shown: list[FailedTest] = []
    total = 0
    for case in root.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            continue
        total += 1
        if len(shown) >= FAILURES_SHOWN:
            continue
        classname, name = case.get("classname") or "", case.get("name") or "?"
        shown.append(FailedTest("%s::%s" % (classname, name) if classname else name, problem.tag, _failure_lines(problem)))
    return tuple(shown), total


def _failure_lines(problem: ElementTree.Element) -> tuple[str, ...]:
    """The message, then the ``E`` lines of pytest's traceback (where it says what
    went wrong), or the first lines of the text when there are none."""
    message = (problem.get("message") or "").strip()
    text = (problem.text or "").splitlines()
    explained = [line for line in text if line.startswith("E ")]
    lines = message.splitlines()[:2] + (explained or [line for line in text if line.strip()])
    seen, kept = set(), []
    for line in lines:
        line = line.rstrip()
        # pytest's "E   assert x" usually repeats the message: show it once.
        key = line[1:].strip() if line.startswith("E ") else line.strip()
        if key and key not in seen:
            seen.add(key)
            kept.append(_cut(line, FAILURE_LINE_CHARS))
        if len(kept) == FAILURE_LINES:
            break
    return tuple(kept)


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


PAGE_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>CI results{% if rows %}: {{ rows[0].short }} {{ rows[0].status }}{% endif %}</title>
<style>
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
         margin: 0; padding: 16px 24px; color: #1f2328; background: #f6f8fa; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 13px; font-weight: 600; color: #59636e; margin: 0 0 6px; text-transform: uppercase; letter-spacing: .04em; }
  .meta { color: #59636e; margin: 0 0 16px; }
  .meta .count { font-weight: 600; }
  section.chart, table { background: #fff; border: 1px solid #d1d9e0; border-radius: 6px; }
  section.chart { padding: 12px 16px; margin-bottom: 16px; }
  svg { display: block; max-width: 100%; height: auto; }
  .bar-passed, .count.passed { fill: #1a7f37; color: #1a7f37; }
  .bar-failed, .count.failed { fill: #cf222e; color: #cf222e; }
  .bar-error, .count.error { fill: #9a6700; color: #9a6700; }
  svg .faded { fill-opacity: .45; }
  svg .axis { stroke: #d1d9e0; }
  svg text { font-size: 11px; fill: #59636e; }
  table { border-collapse: separate; border-spacing: 0; width: 100%; overflow: hidden; }
  th, td { text-align: left; vertical-align: top; padding: 6px 10px; border-bottom: 1px solid #eaeef2; }
  th { background: #f6f8fa; font-size: 12px; color: #59636e; font-weight: 600; }
  tr.result:last-child td { border-bottom: 0; }
  tr.verdict-passed td:first-child { border-left: 4px solid #1a7f37; }
  tr.verdict-failed td:first-child { border-left: 4px solid #cf222e; }
  tr.verdict-error td:first-child { border-left: 4px solid #9a6700; }
  tr.verdict-failed { background: #fff8f8; }
  .badge { display: inline-block; min-width: 52px; text-align: center; padding: 1px 8px; border-radius: 10px;
           color: #fff; font-weight: 600; font-size: 12px; }
  .verdict-passed .badge { background: #1a7f37; }
  .verdict-failed .badge { background: #cf222e; }
  .verdict-error .badge { background: #9a6700; }
  .reason { color: #59636e; font-size: 12px; margin-top: 3px; max-width: 16em; overflow-wrap: anywhere; }
  code, pre { font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, monospace; font-size: 12px; }
  .sha { color: #0969da; }
  .subject { font-weight: 500; overflow-wrap: anywhere; }
  .author { color: #59636e; font-size: 12px; }
  .unknown { color: #59636e; font-style: italic; }
  .num, .files { white-space: nowrap; }
  a { color: #0969da; text-decoration: none; }
  a:hover { text-decoration: underline; }
  details { margin-top: 4px; }
  summary { cursor: pointer; color: #cf222e; font-size: 12px; font-weight: 600; }
  ul.failures { margin: 4px 0 0; padding-left: 18px; }
  ul.failures li { margin-bottom: 6px; }
  ul.failures pre { margin: 2px 0 0; padding: 4px 6px; background: #f6f8fa; border-radius: 4px;
                    white-space: pre-wrap; overflow-wrap: anywhere; max-width: 70em; }
  .empty { padding: 24px; color: #59636e; }
</style>
</head>
<body>
<header>
<h1>CI results</h1>
<p class="meta">
{% if rows %}
Latest {{ rows|length }} results:
{% for verdict in verdicts %}<span class="count {{ verdict }}" data-count="{{ verdict }}">{{ counts[verdict] }} {{ verdict }}</span>{% if not loop.last %} &middot; {% endif %}{% endfor %}.
{% endif %}
Page written {{ generated }}.
</p>
</header>
{% if chart.bars %}
<section class="chart" aria-label="Verdicts and durations of the last {{ chart.bars|length }} commits">
<h2>Last {{ chart.bars|length }} commits, oldest on the left; bar height is the test duration (longest {{ chart.longest }})</h2>
<svg viewBox="0 0 {{ chart.width }} {{ chart.height + 2 }}" width="{{ chart.width }}" height="{{ chart.height + 2 }}" role="img">
<line class="axis" x1="0" y1="{{ chart.height + 1 }}" x2="{{ chart.width }}" y2="{{ chart.height + 1 }}"/>
{% for bar in chart.bars %}
<a href="#c-{{ bar.commit }}"><rect class="bar-{{ bar.status }}{{ " faded" if bar.faded else "" }}" x="{{ bar.x }}" y="{{ bar.y }}" width="{{ bar_width }}" height="{{ bar.height }}" rx="2"><title>{{ bar.title }}</title></rect></a>
{% endfor %}
</svg>
</section>
{% endif %}
<table>
<thead><tr><th>Verdict</th><th>Commit</th><th>Tests</th><th>Duration</th><th>Runner</th><th>Attempts</th><th>Finished</th><th>Files</th></tr></thead>
<tbody>
{% for row in rows %}
<tr id="c-{{ row.commit }}" class="result verdict-{{ row.status }}" data-commit="{{ row.commit }}" data-verdict="{{ row.status }}">
<td><span class="badge">{{ row.status }}</span>{% if row.reason %}<div class="reason">{{ row.reason }}</div>{% endif %}</td>
<td><code class="sha" title="{{ row.commit }}">{{ row.short }}</code>
{% if row.subject is not none %}<span class="subject">{{ row.subject }}</span> <span class="author">{{ row.author }}</span>{% else %}<span class="unknown">subject unknown</span>{% endif %}
{% if row.files.failures %}
<details{{ " open" if row.commit == newest_failure else "" }}><summary>{{ row.files.failures_total }} failing test{{ "" if row.files.failures_total == 1 else "s" }}</summary>
<ul class="failures">
{% for test in row.files.failures %}
<li><code>{{ test.name }}</code> ({{ test.kind }}){% if test.lines %}<pre>{{ test.lines|join("\\n") }}</pre>{% endif %}</li>
{% endfor %}
{% if row.files.failures_total > row.files.failures|length %}<li>and {{ row.files.failures_total - row.files.failures|length }} more: see the report</li>{% endif %}
</ul>
</details>
{% endif %}
</td>
<td class="num">{{ row.tests }}</td>
<td class="num">{{ row.duration }}</td>
<td><code>{{ row.runner }}</code></td>
<td class="num">{{ row.attempts }}</td>
<td class="num">{{ row.finished }}</td>
<td class="files">{% if row.files.has_report %}<a href="{{ row.commit }}">report</a>{% endif %}
{% if row.files.has_log %} &middot; <a href="{{ row.commit }}.log">log</a>{% endif %}
{% if row.files.has_xml %} &middot; <a href="{{ row.commit }}.xml">xml</a>{% endif %}</td>
</tr>
{% endfor %}
</tbody>
</table>
{% if not rows %}<p class="empty">No results yet: they appear here as commits are tested.</p>{% endif %}
</body>
</html>
"""

_environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_template = _environment.from_string(PAGE_TEMPLATE)


def render_page(rows: list[Row], durations: dict[str, float | None], generated: str) -> str:
    """The whole page. Every value is escaped by the template: none is trusted."""
    counts = {verdict: sum(1 for row in rows if row.status == verdict) for verdict in VERDICTS}
    # The newest failure's tests are shown unfolded: it is the one people come to look at.
    newest_failure = next((row.commit for row in rows if row.files.failures), None)
    return _template.render(
        rows=rows,
        newest_failure=newest_failure,
        chart=build_chart(rows, durations),
        counts=counts,
        verdicts=VERDICTS,
        generated=generated,
        bar_width=BAR_WIDTH,
    )


# --- commit subjects and authors ------------------------------------------------------


class CommitMetadata:
    """Subjects and authors of commits, read with GitPython from a clone of the
    watched repository that nothing else uses (the dispatcher's ``--repo``).

    A commit not in the clone yet (the observer or a push hook reported it
    before this clone saw it) triggers one ``git fetch``, bounded by
    ``FETCH_TIMEOUT_S``; commits still missing after it, and all of them after
    a failed fetch, are not fetched for again before ``FETCH_RETRY_S``. Used by
    the page thread only.
    """

    def __init__(self, path: str):
        try:
            self.repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
            raise ValueError("%s is not a git repository (%s)" % (path, exc.__class__.__name__)) from None
        self.path = self.repo.working_tree_dir or self.repo.git_dir
        self._known: dict[str, CommitInfo] = {}
        #: Missing commits a fetch has been tried for, and when the last fetch ended.
        self._fetched_for: set[str] = set()
        self._last_fetch = -FETCH_RETRY_S
        self._last_fetch_failed = False

    def close(self) -> None:
        self.repo.close()  # ends GitPython's persistent `git cat-file` processes

    def lookup(self, commits: list[str]) -> dict[str, CommitInfo]:
        """What is known of ``commits``; an unknown one is simply left out."""
        found = {sha: info for sha in commits if (info := self._known.get(sha) or self._read(sha))}
        missing = [sha for sha in commits if sha not in found]
        if missing and self._should_fetch(missing):
            self._fetch(len(missing))
            self._fetched_for.update(missing)
            found.update({sha: info for sha in missing if (info := self._read(sha))})
        # Remember only what the page shows: memory stays bounded by PAGE_RESULTS.
        self._known = {sha: found[sha] for sha in commits if sha in found}
        self._fetched_for &= set(commits)
        return found

    def _read(self, sha: str) -> CommitInfo | None:
        try:
            commit = self.repo.commit(sha)
            return CommitInfo(_cut(commit.summary, SUBJECT_CHARS), _cut(commit.author.name or "", AUTHOR_CHARS))
        except (ValueError, git.BadName, git.BadObject, git.GitCommandError):
            return None

    def _should_fetch(self, missing: list[str]) -> bool:
        if not self.repo.remotes:
            return False
        if time.monotonic() - self._last_fetch >= FETCH_RETRY_S:
            return True
        return not self._last_fetch_failed and any(sha not in self._fetched_for for sha in missing)

    def _fetch(self, missing: int) -> None:
        """``git fetch`` in a process group of its own, killed after FETCH_TIMEOUT_S
        (with the ssh or https helper it started, so nothing is left holding on)."""
        log.info("%d commit(s) not in %s: fetching", missing, self.path)
        self._last_fetch_failed = True
        with tempfile.TemporaryFile() as errors:
            try:
                process = subprocess.Popen(
                    ["git", "fetch", "--quiet"],
                    cwd=self.path,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                    env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
                )
            except OSError as exc:
                self._last_fetch = time.monotonic()
                log.warning("cannot run git fetch in %s: %s; commits shown by id", self.path, exc)
                return
            try:
                status = process.wait(FETCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                log.warning("fetch in %s took over %.0f s: killed; commits shown by id", self.path, FETCH_TIMEOUT_S)
                return
            finally:
                self._last_fetch = time.monotonic()
            if status != 0:
                errors.seek(0)
                lines = errors.read().decode("utf-8", "replace").strip().splitlines() or ["no output"]
                log.warning("fetch in %s failed: %s; commits shown by id", self.path, lines[-1][:300])
                return
        self._last_fetch_failed = False


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
        self._files: dict[str, CommitFiles] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        summaries = [s for s in self.store.recent_summaries(self.limit) if is_commit_id(str(s.get("commit")))]
        commits = [summary["commit"] for summary in summaries]
        infos = self.metadata.lookup(commits) if self.metadata is not None else {}
        rows, durations = [], {}
        for summary in summaries:
            commit = summary["commit"]
            info = infos.get(commit)
            status = summary.get("status") if summary.get("status") in VERDICTS else "error"
            reason = summary.get("reason")
            rows.append(
                Row(
                    commit=commit,
                    short=commit[:SHORT_SHA_CHARS],
                    status=status,
                    subject=info.subject if info else None,
                    author=info.author if info else None,
                    tests=format_tests(summary),
                    duration=format_duration(summary.get("duration_s")),
                    runner=str(summary.get("runner") or "\u2013"),
                    attempts=str(summary.get("attempts") if summary.get("attempts") is not None else "\u2013"),
                    reason=_cut(str(reason), REASON_CHARS) if reason else None,
                    finished=format_time(summary.get("finished_at")),
                    files=self._commit_files(commit, status),
                )
            )
            duration = summary.get("duration_s")
            durations[commit] = float(duration) if isinstance(duration, (int, float)) else None
        self._files = {commit: self._files[commit] for commit in commits if commit in self._files}
        generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        page = render_page(rows, durations, generated)
        # Not fsync'ed: the page is rebuilt from the store at every start-up.
        atomic_write(self.path, page.encode("utf-8"), durable=False)
        log.debug("results page written: %d results in %.0f ms", len(rows), (time.monotonic() - started) * 1000)
        return len(rows)

    def _commit_files(self, commit: str, status: str) -> CommitFiles:
        """Which of the commit's files exist, and its failing tests; read once per
        commit (a final result's files never change)."""
        known = self._files.get(commit)
        if known is None:
            xml = result_path(self.results_dir, commit, ".xml")
            failures, total = read_failures(xml) if status == "failed" else ((), 0)
            known = CommitFiles(
                has_report=os.path.exists(result_path(self.results_dir, commit)),
                has_log=os.path.exists(result_path(self.results_dir, commit, ".log")),
                has_xml=os.path.exists(xml),
                failures=failures,
                failures_total=total,
            )
            self._files[commit] = known
        return known
