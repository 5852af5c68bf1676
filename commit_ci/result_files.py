"""Result files: what the dispatcher writes to the results folder for each commit.

For a commit ``<sha>``:

* ``<sha>``       the report a person reads: a header (commit, verdict, counts,
                  duration, runner, attempts, reason, times, hash seed), then the
                  test output;
* ``<sha>.log``   the test output alone, as the runner sent it;
* ``<sha>.xml``   the JUnit XML the tests wrote, when they wrote a usable one;
* ``<sha>.json``  the same facts as the report, for programs (result.SUMMARY_FIELDS).

A run whose failing tests ran again (flaky.py) has the same four files: the report,
``<sha>.log`` and ``<sha>.xml`` are the first run's -- the whole suite, with the first
failure -- and the report and the log then have a section per rerun, marked by a line
``==== rerun K of N ...`` that says what ran again, where, and how it ended, followed
by that rerun's output; ``<sha>.json`` lists the reruns (``reruns``) and the tests
found flaky (``flaky_tests``). The reruns' JUnit XML is read for their outcomes, not kept.

A run split in shards over idle runners (sharding.py) has the same four files too,
merged: ``<sha>.json`` has the summed counts and one entry per shard (``shards``), the
report a line per shard, the report and ``<sha>.log`` the output of each shard in a
section of its own, marked by a line ``==== shard I of K: runner ...``, and
``<sha>.xml`` the test suites of every shard under one ``testsuites`` root.

Each file is written atomically; ``<sha>.json`` is written last and is the mark that
a commit's result is complete: on start-up the dispatcher trusts it over its own
database (it may have died between writing the files and recording the job), when it
is of the run the job is at.

They are the commit's current run's. When a rerun ends, the files of the run before
move first to ``runs/<sha>/<run>/`` (same names), ``<sha>.json`` last, so that
every run's files are kept and the top folder always holds one complete result.
A failed commit's report and ``<sha>.json`` name its branch's first failing commit
(``broken by:``, ``first_failing``) once it is known (culprit.py); when that is after
they were written, both are written again (name_first_failing), ``<sha>.json`` last:
the run's result stays one, only told more.
The page that lists the results, ``index.html``, is page.py's.
Nothing here knows about sockets or threads.
"""

from __future__ import annotations

import datetime
import json
import os

from commit_ci.files import atomic_write
from commit_ci.result import Result
from commit_ci.states import VERDICTS, values
from commit_ci.wire import is_commit_id


def iso_time(timestamp: float | None) -> str | None:
    """UTC ISO 8601 with milliseconds (how every time in a result is written), or None."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_path(results_dir: str, commit: str, suffix: str = "") -> str:
    """The path of one of ``commit``'s files; refuses anything but a commit id."""
    if not is_commit_id(commit):
        raise ValueError("not a commit id: %r" % commit)
    return os.path.join(results_dir, commit + suffix)


#: The folder, in the results folder, that keeps the files of earlier runs.
RUNS_FOLDER = "runs"
#: The files of one result, ``<sha>.json`` last (the mark that the rest is there).
SUFFIXES = ("", ".log", ".xml", ".json")


def run_folder(results_dir: str, commit: str, run: int) -> str:
    """Where the files of ``commit``'s run ``run`` go once a later run has a verdict."""
    return os.path.join(os.path.dirname(result_path(results_dir, commit)), RUNS_FOLDER, commit, str(int(run)))


#: Of each rerun's output, what the log keeps (its head and tail): a rerun runs a few tests.
RERUN_LOG_BYTES = 1024 * 1024
#: Longest reason written (a list of flaky tests can be long; the JSON has them all).
REASON_CHARS = 300


def rerun_heading(entry: dict, reruns: int) -> str:
    """The line that starts a rerun's section in the report and the log."""
    tests = entry.get("tests")
    what = "the whole test command" if tests is None else "%d failing test%s" % (len(tests), "" if len(tests) == 1 else "s")
    return "==== rerun %s of %d: %s, runner %s, attempt %s: %s ====" % (
        entry.get("rerun"), reruns, what, entry.get("runner"), entry.get("attempt"), entry.get("status"))


def with_reruns(first: Result, reruns: list[tuple[dict, bytes]], status: str, flaky: list[str],
                planned: int) -> Result:
    """The result of a run whose failing tests ran again: ``first`` (the whole suite's
    run, with its output and JUnit XML), the verdict ``status`` the reruns decided, the
    ``flaky`` tests, and each rerun's entry and output, as sections of the log.
    ``planned``: how many reruns the dispatcher allowed (``--flaky-reruns``)."""
    log = first.log
    for entry, output in reruns:
        if len(output) > RERUN_LOG_BYTES:
            half = RERUN_LOG_BYTES // 2
            output = output[:half] + b"\n[... %d bytes of this rerun's output cut here ...]\n" % (len(output) - 2 * half) + output[-half:]
        log = log.rstrip(b"\n") + b"\n\n" + rerun_heading(entry, planned).encode("utf-8", "replace") + b"\n" + output
    first.status, first.flaky_tests, first.log = status, list(flaky), log
    first.reruns = [entry for entry, _ in reruns]
    if flaky and status == "flaky":
        first.reason = "passed when run again: %s" % ", ".join(flaky)
    elif status == "failed":
        first.reason = "failed again in %d rerun%s%s" % (len(reruns), "" if len(reruns) == 1 else "s",
                                                         "; flaky: %s" % ", ".join(flaky) if flaky else "")
    if first.reason and len(first.reason) > REASON_CHARS:
        first.reason = first.reason[: REASON_CHARS - 1] + "\u2026"
    return first


def render_report(result: Result, output: str) -> str:
    """The report a person reads: the facts of ``<sha>.json``, then the test ``output``."""

    def show(value: object) -> str:
        return "-" if value is None else str(value)

    counts = "-"
    if result.passed is not None:
        counts = "%s passed, %s failed, %s errors, %s skipped" % (result.passed, result.failed, result.errors,
                                                                 result.skipped)
    duration = "-" if result.duration_s is None else "%.2f s" % result.duration_s
    lines = [
        "commit:    %s" % result.commit,
        "verdict:   %s" % result.status,
        "tests:     %s" % counts,
        "duration:  %s" % duration,
        "runner:    %s" % show(result.runner),
        "attempts:  %s" % show(result.attempts),
        "run:       %s" % show(result.run),
        "reason:    %s" % show(result.reason),
        "queued:    %s" % show(result.queued_at),
        "started:   %s" % show(result.started_at),
        "finished:  %s" % show(result.finished_at),
        "hash seed: %s" % show(result.hash_seed),
    ]
    if result.reruns:
        lines.append("reruns:    %d (the failing tests run again at this commit)" % len(result.reruns))
        for entry in result.reruns:
            tests = entry.get("tests")
            lines.append("  rerun %s: %s on runner %s (attempt %s), %s%s" % (
                entry.get("rerun"), entry.get("status"), entry.get("runner"), entry.get("attempt"),
                "the whole test command" if tests is None else ", ".join(tests),
                "; still failing: %s" % ", ".join(entry["failing"]) if entry.get("failing") else ""))
        lines.append("flaky:     %s" % (", ".join(result.flaky_tests) if result.flaky_tests else "-"))
    if result.shards:
        lines.append("shards:    %d (split over idle runners; a section per shard in the output below)"
                     % len(result.shards))
        for entry in result.shards:
            lines.append("  shard %s: %s on runner %s (attempt %s), %s passed, %s failed, %s errors, %s skipped, %s s%s" % (
                entry.get("shard"), entry.get("status"), entry.get("runner"), entry.get("attempt"), entry.get("passed"),
                entry.get("failed"), entry.get("errors"), entry.get("skipped"), entry.get("duration_s"),
                " (%s)" % entry["reason"] if entry.get("reason") else ""))
    if result.first_failing:
        lines.append("broken by: %s (the first failing commit of its branch)" % result.first_failing)
    lines += [
        "",
        "---- test output " + "-" * 50,
        output.rstrip("\n"),
        "",
    ]
    return "\n".join(lines)


def write_result(results_dir: str, result: Result) -> None:
    """Write the report, the log, the JUnit XML if there is one (already passed
    through junit.clean), then the JSON summary (the completion mark); the files of an
    earlier run are moved to its folder first."""
    commit = result.commit
    keep_earlier_run(results_dir, commit, result.run or 1)
    # As the runner sent it, with what is not UTF-8 replaced: the files are text.
    output = result.log.decode("utf-8", errors="replace")
    atomic_write(result_path(results_dir, commit), render_report(result, output).encode("utf-8"))
    atomic_write(result_path(results_dir, commit, ".log"), output.encode("utf-8"))
    if result.junit:
        atomic_write(result_path(results_dir, commit, ".xml"), result.junit)
    text = json.dumps(result.summary(), indent=2) + "\n"
    atomic_write(result_path(results_dir, commit, ".json"), text.encode("utf-8"))


def name_first_failing(results_dir: str, commit: str, first_failing: str, run: int) -> bool:
    """Rewrite the files of ``commit``'s failed run ``run`` so that they name its first
    failing commit: the report (its header; the output is the log's) and then
    ``<sha>.json``, each atomically, the JSON last, as write_result does. False (nothing
    written) when the current files are not of that failed run."""
    result = read_result(results_dir, commit)
    if result is None or result.status != "failed" or (result.run or 1) != run:
        return False
    if result.first_failing == first_failing:
        return True
    result.first_failing = first_failing
    try:
        with open(result_path(results_dir, commit, ".log"), "rb") as handle:
            output = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        output = ""
    atomic_write(result_path(results_dir, commit), render_report(result, output).encode("utf-8"))
    text = json.dumps(result.summary(), indent=2) + "\n"
    atomic_write(result_path(results_dir, commit, ".json"), text.encode("utf-8"))
    return True


def read_result(results_dir: str, commit: str) -> Result | None:
    """``commit``'s result as its ``<sha>.json`` holds it, if that file is there and
    complete, else None."""
    try:
        with open(result_path(results_dir, commit, ".json"), encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") not in values(VERDICTS) or summary.get("commit") != commit:
        return None
    return Result.from_summary(summary)


def keep_earlier_run(results_dir: str, commit: str, run: int) -> None:
    """Move ``commit``'s files to their run's folder if they are of a run before
    ``run``. A move cut short (the dispatcher killed) is finished by the next call:
    ``<sha>.json``, which says the run, moves last."""
    current = read_result(results_dir, commit)
    if current is None or (current.run or 1) >= run:
        return
    folder = run_folder(results_dir, commit, current.run or 1)
    os.makedirs(folder, exist_ok=True)
    for suffix in SUFFIXES:
        try:
            os.replace(result_path(results_dir, commit, suffix), os.path.join(folder, commit + suffix))
        except FileNotFoundError:
            pass  # no JUnit XML in that run, or moved before a crash
