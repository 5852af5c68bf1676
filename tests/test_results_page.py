"""The results page, index.html: its content, its escaping, and when it is rebuilt."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time

import pytest

from commit_ci import page
from commit_ci.commit_metadata import CommitInfo, CommitMetadata
from commit_ci.junit import FailedTest
from commit_ci.result import Result
from commit_ci.result_files import iso_time
from commit_ci.states import JobState, Outcome
from commit_ci.store import JobStore

from conftest import FAILING_TEST, PASSING_TEST, git, wait_until

XSS_SUBJECT = '<script>alert("subject")</script> & friends'
# git allows no < or > in names; quotes and ampersands will do.
XSS_AUTHOR = "Eve \"Mallory\" & Co <eve@example.invalid>"


# --- against the real system ------------------------------------------------------------


def test_page_lists_commits_newest_first_with_subjects_verdicts_and_failing_tests(ci, upstream, tmp_path):
    # The dispatcher's clone is made now: every later commit must be fetched into it.
    metadata_clone = upstream.clone(tmp_path / "dispatcher-clone")
    # One runner, oldest first: results arrive in commit order.
    ci.start_dispatcher("--repo", str(metadata_clone), "--order", "fifo")
    ci.start_runner()
    ci.start_observer()
    initial = upstream.head()
    passing = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "add another passing test")
    failing = upstream.commit({"test_bad.py": FAILING_TEST}, XSS_SUBJECT, author=XSS_AUTHOR)
    fixed = upstream.commit({"test_bad.py": None}, "remove the failing test")
    commits = [initial, passing, failing, fixed]

    ci.wait_results(commits)
    rows = ci.wait_page(commits)

    assert rows == [(fixed, "passed"), (failing, "failed"), (passing, "passed"), (initial, "passed")]
    page = ci.page()
    # Untrusted text shows as text: the page has no script element at all.
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#34;subject&#34;)&lt;/script&gt; &amp; friends" in page
    assert "Eve &#34;Mallory&#34; &amp; Co" in page
    assert "add another passing test" in page and "CI Test" in page
    # The failing commit's tests, from its <sha>.xml, with the start of the message.
    failing_row = _row_html(page, failing)
    assert "<details open>" in failing_row and "1 failing test</summary>" in failing_row
    assert "test_bad::test_fails" in failing_row and "assert (1 + 1) == 3" in failing_row
    assert "2 passed, 1 failed" in failing_row
    # Links to the commit's files, relative, and the files are there.
    for name in (failing, failing + ".log", failing + ".xml"):
        assert 'href="%s"' % name in failing_row
        assert (ci.results_dir / name).exists()
    assert "<details" not in _row_html(page, fixed)
    # The chart: one bar per commit, linked to its row, coloured by verdict.
    bars = re.findall(r'<a href="#c-([0-9a-f]{40})"><rect class="bar-(\w+)', page)
    assert bars == [(initial, "passed"), (passing, "passed"), (failing, "failed"), (fixed, "passed")]
    assert re.search(r"\d+ commit\(s\) not in \S+: fetching", ci.dispatcher.log())


def test_page_is_rebuilt_after_each_result_and_shows_ids_without_a_clone(ci, upstream):
    ci.start_dispatcher()
    # Written at start-up, before any result.
    wait_until(lambda: "No results yet" in ci.page(), timeout=20, message="the empty results page")
    ci.start_runner()
    ci.start_observer()
    seen = []
    for index, (name, test) in enumerate([(None, None), ("test_a.py", FAILING_TEST), ("test_b.py", PASSING_TEST)]):
        sha = upstream.head() if name is None else upstream.commit({name: test}, "commit %d" % index)
        ci.wait_result(sha)
        seen.insert(0, sha)
        rows = ci.wait_page([sha])
        assert [commit for commit, _ in rows] == seen, "newest first, one row per result"
    assert "subject unknown" in ci.page()
    assert "results page: %s (commit subjects from nowhere" % ci.page_path in ci.dispatcher.log()


def test_page_is_written_at_start_up_from_the_store(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer()
    sha = upstream.head()
    ci.wait_page([sha])
    ci.dispatcher.terminate()
    ci.page_path.unlink()

    ci.restart_dispatcher()

    assert ci.wait_page([sha]) == [(sha, "passed")]


def test_dispatcher_refuses_a_repo_that_is_not_a_clone(ci, tmp_path):
    ci.processes.start("dispatcher", ci._dispatcher_argv(0, ("--repo", str(tmp_path / "nowhere"))))
    process = ci.processes.started[-1]
    wait_until(lambda: not process.running(), timeout=20, message="dispatcher to exit")
    assert process.popen.returncode == 2
    assert "--repo: " in process.log() and "is not a git repository" in process.log()


def _row_html(page: str, commit: str) -> str:
    start = page.index('<tr id="c-%s"' % commit)
    return page[start : page.index("</tr>", start)]


# --- the parts, without processes ---------------------------------------------------------


def _finish(store: JobStore, commit: str, status: str, finished_at: float, **values) -> dict:
    store.enqueue(commit, finished_at - 10)
    attempt = store.assign(commit, "runner-1", finished_at - 5)
    summary = Result(commit, status, finished_at=iso_time(finished_at), **values).summary()
    state = JobState(status)
    store.finish(commit, attempt, state, Outcome(status), None, json.dumps(summary), finished_at)
    return summary


def test_store_returns_newest_final_summaries_through_an_index(tmp_path):
    store = JobStore(str(tmp_path / "queue.sqlite3"))
    # Finished in an order unlike the queue order, so the page order is finished_at's.
    finished = {("%040x" % index): 1_000_000 + (index * 7919) % 300 for index in range(300)}
    for commit, when in finished.items():
        _finish(store, commit, "passed", when)
    store.enqueue("f" * 40, 2_000_000)  # queued: no summary, not listed
    reader = JobStore(str(tmp_path / "queue.sqlite3"), read_only=True)

    newest = reader.recent_summaries(200)

    expected = sorted(finished, key=finished.get, reverse=True)[:200]
    assert [summary["commit"] for summary in newest] == expected
    plan = " ".join(row[-1] for row in reader._db.execute(
        "EXPLAIN QUERY PLAN SELECT summary FROM jobs WHERE summary IS NOT NULL ORDER BY finished_at DESC LIMIT 200"))
    assert "USING INDEX finished_jobs" in plan and "TEMP B-TREE" not in plan, plan
    with pytest.raises(sqlite3.OperationalError):
        reader.enqueue("e" * 40, 0)
    reader.close()
    store.close()


def test_index_is_added_to_a_database_made_before_it(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    JobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX finished_jobs")
    store = JobStore(path)
    names = {row[0] for row in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "finished_jobs" in names
    store.close()


def _row(commit: str, status: str = "failed", **changes) -> page.Row:
    values = dict(
        commit=commit, short=commit[:10], status=status, subject="a subject", author="someone", tests="1 passed",
        duration="1.0 s", runner="127.0.0.1:9000", attempts="1", reason=None, finished="2026-01-01 00:00:00 UTC",
        files=page.CommitFiles(True, True, False),
    )
    values.update(changes)
    return page.Row(**values)


def test_everything_untrusted_on_the_page_is_escaped():
    hostile = '"><script>alert(1)</script><b onmouseover="x">'
    failure = FailedTest(hostile, "failure", (hostile, "E   " + hostile))
    row = _row("ab" * 20, subject=hostile, author=hostile, reason=hostile, runner=hostile,
               files=page.CommitFiles(True, True, True, (failure,), 1))

    html = page.render_page([row], {row.commit: 1.0}, "now")

    assert "<script" not in html and "<b " not in html and 'onmouseover="' not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6  # subject, author, reason, runner, test, lines, chart
    assert "Content-Security-Policy" in html and "default-src &#39;none&#39;" not in html


def test_chart_shows_the_last_commits_oldest_first_with_heights_from_durations():
    rows = [_row("%040x" % index, "passed" if index % 2 else "failed") for index in range(60)]
    durations = {row.commit: float(index + 1) for index, row in enumerate(rows)}
    durations[rows[0].commit] = None  # an error without a duration

    chart = page.build_chart(rows, durations)

    assert len(chart.bars) == page.CHART_RESULTS
    assert [bar.commit for bar in chart.bars] == [row.commit for row in reversed(rows[: page.CHART_RESULTS])]
    assert chart.bars[-1].faded and chart.bars[-1].height == page.NO_DURATION_BAR_HEIGHT
    assert chart.bars[0].height == page.CHART_HEIGHT  # the longest of those shown
    assert all(page.MIN_BAR_HEIGHT <= bar.height <= page.CHART_HEIGHT for bar in chart.bars)
    assert page.build_chart([], {}).bars == []


def test_commit_metadata_fetches_once_for_new_commits_and_not_again_for_missing_ones(upstream, tmp_path, monkeypatch):
    clone = upstream.clone(tmp_path / "clone")
    initial = upstream.head()
    later = upstream.commit({}, "made after the clone", author="Ann Author <ann@example.invalid>")
    metadata = CommitMetadata(str(clone))
    fetches = []
    real_fetch = metadata._fetch
    monkeypatch.setattr(metadata, "_fetch", lambda missing: (fetches.append(missing), real_fetch(missing)))
    try:
        found = metadata.lookup([later, initial])
        assert found[later] == CommitInfo("made after the clone", "Ann Author")
        assert found[initial] == CommitInfo("initial commit", "CI Test")
        assert fetches == [1]
        never = "0" * 40
        assert never not in metadata.lookup([never, later])
        assert metadata.lookup([never, later]).keys() == {later}
        assert fetches == [1, 1], "one fetch for the missing commit, not one per lookup"
    finally:
        metadata.close()
    git(clone, "remote", "remove", "origin")
    alone = CommitMetadata(str(clone))
    try:
        assert alone.lookup(["1" * 40]) == {}, "no remote: nothing to fetch from"
    finally:
        alone.close()


class _BlockingStore:
    """A store whose reads wait for a signal, to see what happens during a build."""

    def __init__(self):
        self.release = threading.Event()
        self.reads = 0
        self.reading = threading.Event()

    def close(self):
        pass

    def recent_summaries(self, limit):
        self.reads += 1
        self.reading.set()
        assert self.release.wait(20), "test did not release the store"
        return []

    def branch_states(self, limit):
        return []

    def flakiest(self, window, limit):
        return 0, []


def test_notify_never_blocks_and_a_burst_makes_one_more_build(tmp_path):
    store = _BlockingStore()
    results_page = page.ResultsPage(str(tmp_path), store)
    results_page.start()
    try:
        assert store.reading.wait(20), "the start-up build"
        started = time.monotonic()
        for _ in range(1000):
            results_page.notify()
        assert time.monotonic() - started < 0.5, "notify() waited for the build"
        store.reading.clear()
        store.release.set()
        assert store.reading.wait(20), "a build after the burst"
        wait_until(lambda: (tmp_path / "index.html").exists(), timeout=20, message="index.html")
        # Nothing more is pending: a thousand notifications cost one build.
        assert not results_page._wake.wait(0.2)
        assert store.reads == 2
    finally:
        store.release.set()
        results_page.stop()
    assert not results_page._thread.is_alive()
