"""A runner's results that the dispatcher does not have yet, kept on disk until it does.

Every result of a job (but a job handed back, worthless later) is written here before
it is sent, one JSON file per result, atomically, and removed once the dispatcher has
acknowledged it. So a result survives the dispatcher being down and the runner being
restarted, and is delivered when the dispatcher is back (dispatcher_link.py). While a
result waits here its job is still the runner's: the runner says it is busy with it
when pinged, so the dispatcher neither runs it again nor gives the runner another.

A file is named ``<attempt, 12 digits>-<commit>.json``, so that a listing is oldest
first, and holds the result's fields (result.py), with the output and the JUnit XML in
base64. Results kept by older versions (which named the duration ``duration``) are read too.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from typing import Iterator

from commit_ci.files import atomic_write
from commit_ci.result import Result
from commit_ci.states import ReportedStatus, values
from commit_ci.wire import is_commit_id

log = logging.getLogger("runner")

#: The fields a kept result holds besides its output and JUnit XML.
_PLAIN_FIELDS = ("commit", "attempt", "status", "passed", "failed", "errors", "skipped", "duration_s", "reason",
                 "hash_seed", "requires", "retry")


class Outbox:
    """The folder of kept results, and an in-memory list of which jobs they are for
    (its one owner: the lock guards the list and the files' coming and going)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._lock = threading.Lock()
        #: (commit, attempt) of each kept result, oldest first: what the folder holds.
        self._kept: list[tuple[str, int]] = []
        self._refresh()

    def keep(self, result: Result) -> str:
        """Write ``result`` to the folder; its path."""
        path = os.path.join(self.folder, "%012d-%s.json" % (result.attempt, result.commit))
        atomic_write(path, encode(result))
        self._refresh()
        return path

    def oldest(self) -> tuple[str, int] | None:
        """(commit, attempt) of the oldest kept result, or None when there is none."""
        with self._lock:
            return self._kept[0] if self._kept else None

    def results(self) -> Iterator[tuple[str, Result]]:
        """Each kept result with its path, oldest first. One that cannot be read (or
        could never be delivered) is logged and removed instead."""
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.folder, name)
            try:
                with open(path, "rb") as handle:
                    result = decode(handle.read())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                log.error("unreadable kept result %s (%s): removed", path, exc)
                self.remove(path)
                continue
            yield path, result

    def remove(self, path: str) -> None:
        """Forget a kept result: the dispatcher has it (or will never take it)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._refresh()

    def _refresh(self) -> None:
        kept = []
        for name in sorted(os.listdir(self.folder)):
            attempt, _, rest = name.partition("-")
            commit = rest[: -len(".json")]
            # A ping that named a commit by anything but its full id would fail to
            # decode at the dispatcher: such a file is not a result (``results`` removes it).
            if name.endswith(".json") and attempt.isdigit() and is_commit_id(commit):
                kept.append((commit, int(attempt)))
        with self._lock:
            self._kept = kept


def encode(result: Result) -> bytes:
    """A kept result's file."""
    record = {name: getattr(result, name) for name in _PLAIN_FIELDS}
    record["log"] = base64.b64encode(result.log).decode("ascii")
    record["junit"] = None if result.junit is None else base64.b64encode(result.junit).decode("ascii")
    record["failing"] = None if result.failing is None else list(result.failing)
    record["durations"] = None if result.durations is None else result.durations.decode("ascii", "replace")
    return json.dumps(record).encode("utf-8")


def decode(data: bytes) -> Result:
    """The result a kept file holds; ValueError if it is not one that can be sent. One
    for an abbreviated commit id (kept by an older runner) is such: the dispatcher
    takes full ids only, and has retired the job."""
    record = json.loads(data)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "duration" in record:  # the name older versions gave it
        record.setdefault("duration_s", record.pop("duration"))
    if not is_commit_id(str(record.get("commit"))):
        raise ValueError("not a full commit id: %r" % str(record.get("commit"))[:80])
    if not isinstance(record.get("attempt"), int) or record.get("status") not in values(ReportedStatus):
        raise ValueError("no attempt or status")
    try:
        log_bytes = base64.b64decode(record.get("log") or "", validate=True)
        junit = None if record.get("junit") is None else base64.b64decode(record["junit"], validate=True)
    except (binascii.Error, TypeError):
        raise ValueError("output or JUnit XML not in base64") from None
    failing = record.get("failing")
    if failing is not None and not (isinstance(failing, list) and all(isinstance(test, str) for test in failing)):
        raise ValueError("failing tests not a list of ids")
    durations = record.get("durations")
    if durations is not None and not isinstance(durations, str):
        raise ValueError("durations not text")
    return Result(**{name: record.get(name) for name in _PLAIN_FIELDS}, log=log_bytes, junit=junit,
                  failing=None if failing is None else tuple(failing),
                  durations=None if durations is None else durations.encode("ascii", "replace"))
