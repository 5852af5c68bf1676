"""Result files: what the dispatcher writes to the results folder for each commit.

For a commit ``<sha>``:

* ``<sha>``       the report a person reads: a header (commit, verdict, counts,
                  duration, runner, attempts, reason, times), then the test output;
* ``<sha>.log``   the test output alone, as the runner sent it;
* ``<sha>.xml``   the JUnit XML the tests wrote, when they wrote a usable one;
* ``<sha>.json``  the same facts as the report, for programs (see ``SUMMARY_FIELDS``).

Each file is written atomically; ``<sha>.json`` is written last and is the mark that
a commit's result is complete: on start-up the dispatcher trusts it over its own
database (it may have died between writing the files and recording the job).
The page that lists the results, ``index.html``, is pages.py's.
Nothing here knows about sockets or threads.
"""

from __future__ import annotations

import datetime
import json
import os
import xml.etree.ElementTree as ElementTree

from commit_ci.files import atomic_write
from commit_ci.wire import is_commit_id

#: The root elements of the JUnit XML that pytest (and most other tools) write.
JUNIT_ROOTS = ("testsuites", "testsuite")

#: Keys of ``<sha>.json``, in the order they are written.
SUMMARY_FIELDS = (
    "commit",
    "status",
    "passed",
    "failed",
    "errors",
    "skipped",
    "duration_s",
    "runner",
    "attempts",
    "queued_at",
    "started_at",
    "finished_at",
    "reason",
)


def iso_time(timestamp: float | None) -> str | None:
    """UTC ISO 8601 with milliseconds, or None."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_path(results_dir: str, commit: str, suffix: str = "") -> str:
    """The path of one of ``commit``'s files; refuses anything but a commit id."""
    if not is_commit_id(commit):
        raise ValueError("not a commit id: %r" % commit)
    return os.path.join(results_dir, commit + suffix)


def make_summary(**values: object) -> dict:
    """The JSON summary with every field present, in a stable order."""
    unknown = set(values) - set(SUMMARY_FIELDS)
    if unknown:
        raise ValueError("unknown summary fields: %s" % ", ".join(sorted(unknown)))
    return {name: values.get(name) for name in SUMMARY_FIELDS}


def render_report(summary: dict, output: str) -> str:
    def show(value: object) -> str:
        return "-" if value is None else str(value)

    counts = "-"
    if summary["passed"] is not None:
        counts = "%s passed, %s failed, %s errors, %s skipped" % (
            summary["passed"],
            summary["failed"],
            summary["errors"],
            summary["skipped"],
        )
    duration = "-" if summary["duration_s"] is None else "%.2f s" % summary["duration_s"]
    lines = [
        "commit:    %s" % summary["commit"],
        "verdict:   %s" % summary["status"],
        "tests:     %s" % counts,
        "duration:  %s" % duration,
        "runner:    %s" % show(summary["runner"]),
        "attempts:  %s" % show(summary["attempts"]),
        "reason:    %s" % show(summary["reason"]),
        "queued:    %s" % show(summary["queued_at"]),
        "started:   %s" % show(summary["started_at"]),
        "finished:  %s" % show(summary["finished_at"]),
        "",
        "---- test output " + "-" * 50,
        output.rstrip("\n"),
        "",
    ]
    return "\n".join(lines)


def clean_junit(data: bytes) -> bytes:
    """The JUnit XML to keep as ``<sha>.xml``: ``data`` parsed and written out again.

    The XML comes from the commit's tests, so it is untrusted, and people open it
    in a browser from the results page. A browser runs the scripts of any XHTML or
    SVG element inside an XML file, and an ``xml-stylesheet`` instruction can turn
    it into a page, so only plain JUnit gets through: no DOCTYPE (which also rules
    out entity expansion), a ``testsuites`` or ``testsuite`` root, no namespaced
    element or attribute anywhere; and the file is re-serialised from the parsed
    tree, which drops comments and processing instructions. pytest's files pass
    unchanged in content. Raises ValueError saying what is wrong.
    """
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError("it has a DOCTYPE")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise ValueError("it is not well-formed XML (%s)" % exc) from None
    if root.tag not in JUNIT_ROOTS:
        raise ValueError("its root element is not one of %s" % ", ".join(JUNIT_ROOTS))
    for element in root.iter():
        if element.tag.startswith("{") or any(name.startswith("{") for name in element.attrib):
            raise ValueError("it uses XML namespaces, which JUnit XML does not")
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def write_result(results_dir: str, summary: dict, output: str, junit: bytes | None = None) -> None:
    """Write the report, the log, the JUnit XML if there is one (already passed
    through ``clean_junit``), then the JSON summary (the completion mark)."""
    commit = summary["commit"]
    atomic_write(result_path(results_dir, commit), render_report(summary, output).encode("utf-8"))
    atomic_write(result_path(results_dir, commit, ".log"), output.encode("utf-8"))
    if junit:
        atomic_write(result_path(results_dir, commit, ".xml"), junit)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(result_path(results_dir, commit, ".json"), text.encode("utf-8"))


def read_summary(results_dir: str, commit: str) -> dict | None:
    """The JSON summary of ``commit`` if its result is complete, else None."""
    try:
        with open(result_path(results_dir, commit, ".json"), encoding="utf-8") as handle:
            summary = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") not in ("passed", "failed", "error"):
        return None
    return summary
