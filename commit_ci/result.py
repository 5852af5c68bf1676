"""A result, as one type from the runner that makes it to the files that keep it.

A runner makes a ``Result`` from one attempt (verdict, counts, duration, reason, the
test output and JUnit XML), keeps it in its outbox and sends it with ``results``; the
dispatcher reads it back from that message, completes it with what only it knows (the
runner's name, how many attempts the job took, when it was queued, started and
finished) and writes it to the results folder (result_files.py), where ``<sha>.json``
holds its summary. The fields are named as ``<sha>.json`` names them; the protocol's
``duration`` option is the one name the wire keeps of its own (docs/protocol.md).

A run whose tests failed may have reruns of its failing tests (flaky.py): its result is
then the first run's (counts, output, JUnit XML, runner), with the verdict the reruns
decided, the tests found flaky (``flaky_tests``) and one entry per rerun (``reruns``).
A failed commit's result names the first failing commit of its branch
(``first_failing``, culprit.py) once that is known: when it is written, or later.
"""

from __future__ import annotations

from dataclasses import dataclass

from commit_ci.flaky import decode_test_ids, encode_test_ids
from commit_ci.protocol import Message, request

#: The fields of ``<sha>.json``, in the order they are written.
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
    "run",
    "queued_at",
    "started_at",
    "finished_at",
    "reason",
    "hash_seed",
    "flaky_tests",
    "reruns",
    "first_failing",
    "shards",
)
#: The test counts, as JUnit XML gives them (junit.counts) and the protocol carries them.
COUNT_FIELDS = ("passed", "failed", "errors", "skipped")


@dataclass
class Result:
    """One commit's result; see the module docstring. Times are ISO 8601 UTC text."""

    commit: str
    status: str  # a runner's ReportedStatus; once final, the job's verdict (states.VERDICTS)
    passed: int | None = None
    failed: int | None = None
    errors: int | None = None
    skipped: int | None = None
    duration_s: float | None = None  # how long the tests ran
    runner: str | None = None
    attempts: int | None = None  # attempts that reached a runner (in this run)
    run: int | None = None  # which run of the commit: 1, then one more per rerun (None: before reruns, 1)
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    reason: str | None = None
    hash_seed: int | None = None  # the PYTHONHASHSEED the tests ran with: set it to run them the same way
    flaky_tests: list[str] | None = None  # tests that failed, then passed when run again (None: before flaky.py)
    reruns: list[dict] | None = None  # one entry per rerun of the failing tests (flaky.py), the first first
    first_failing: str | None = None  # of a failed commit: the first failing commit of its branch, once known (culprit.py)
    shards: list[dict] | None = None  # of a sharded run: one entry per shard (sharding.py); [] when unsharded
    # Travel with the result, not in <sha>.json:
    attempt: int | None = None  # the attempt id the dispatcher gave out
    requires: str | None = None  # a declined job: what the commit asks for ("python3.12")
    retry: str | None = None  # of a failed run: what may run again (flaky.Retry), if anything
    failing: tuple[str, ...] | None = None  # with retry "tests": node ids of the tests that failed
    log: bytes = b""  # the test output
    junit: bytes | None = None  # the JUnit XML; the dispatcher keeps only junit.clean's copy
    durations: bytes | None = None  # seconds per test file, as the wire carries them (sharding.encode_durations)

    def summary(self) -> dict:
        """What ``<sha>.json`` holds: every summary field, in a stable order."""
        return {name: getattr(self, name) for name in SUMMARY_FIELDS}

    @classmethod
    def from_summary(cls, summary: dict) -> "Result":
        """A result from its summary (a ``<sha>.json``, the store's copy, a ``recent``
        answer); fields it lacks are None, fields this version does not know are left out."""
        return cls(**{name: summary.get(name) for name in SUMMARY_FIELDS})

    def counts(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in COUNT_FIELDS}

    def to_message(self) -> Message:
        """The ``results`` request that reports this attempt's result."""
        return request("results", commit=self.commit, attempt=self.attempt, status=self.status,
                       **self.counts(), duration=self.duration_s, reason=self.reason, hash_seed=self.hash_seed,
                       requires=self.requires, retry=self.retry, log=self.log, junit=self.junit,
                       failing=None if self.failing is None else encode_test_ids(self.failing),
                       durations=self.durations)

    @classmethod
    def from_message(cls, message: Message) -> "Result":
        """The result a ``results`` request carries (fields already checked by the codec).
        Test ids that are not valid ones (flaky.decode_test_ids) are dropped: ``failing``
        is then None, and a rerun that cannot name its failing tests proves none passed."""
        values = message.fields
        retry, failing = values.get("retry"), message.sections.get("failing")
        try:
            failing = decode_test_ids(failing) if failing is not None and "failing" not in message.truncated else None
        except ValueError:
            failing = None
        return cls(commit=values["commit"], attempt=values["attempt"], status=values["status"],
                   **{name: values.get(name) for name in COUNT_FIELDS}, duration_s=values.get("duration"),
                   reason=values.get("reason"), hash_seed=values.get("hash_seed"), requires=values.get("requires"),
                   retry=retry, failing=failing,
                   log=message.sections.get("log", b""),
                   junit=message.sections.get("junit") or None,
                   durations=message.sections.get("durations") if "durations" not in message.truncated else None)
