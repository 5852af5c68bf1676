"""Live logs: a running job's output, on the dispatcher while the job runs.

Two halves of one job, each used by one daemon:

* ``LiveSender`` (runner): a thread of its own that follows the file the job in
  progress writes its output to -- its setup steps' (building or reusing its
  environment, installing the project), then its tests' -- and sends what is new to
  the dispatcher in chunks of at most ``MAX_LIVE_CHUNK_BYTES`` (``live-log <commit>
  <attempt> <offset>``, docs/protocol.md), about every ``SEND_INTERVAL_S``. The
  offsets are those of one stream per attempt: the tests' output follows the setup's.
  It never slows the job nor delays its result: it only reads the files, on its own
  thread; a chunk that cannot be sent is tried again at the next turn, and when it
  falls more than ``MAX_BEHIND_BYTES`` behind it jumps to the latest output (the
  dispatcher marks the gap). When the job ends the sender simply stops following it:
  the whole output comes with the verdict.
* ``LiveLogs`` (dispatcher): the live log of each running commit, an append-only file
  ``live/<sha>.log`` in the results folder. A chunk is written once, at its offset:
  one sent again (the runner did not get the answer) adds nothing, a gap gets a marker
  line, a chunk of an attempt that is not the commit's current one is refused by the
  dispatcher before it gets here, and a new attempt of the commit starts the file
  afresh. The shards of a commit (sharding.py) run at once: their chunks go in one
  file as they come, each after a line naming its shard when the one written last
  was another, each shard's stream with offsets of its own. What an attempt whose
  runner died had sent stays until the next attempt sends output or the verdict is
  written; the verdict removes the file (the commit's ``<sha>.log`` has all of it).
  At most ``MAX_LIVE_LOG_BYTES`` per commit are kept.

Which offset a commit's file has reached is kept in memory: after a restart of the
dispatcher, a chunk that does not start at 0 is appended after a marker line, so a
piece sent both before and after the restart may show twice.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from commit_ci.client import communicate
from commit_ci.files import open_untrusted
from commit_ci.protocol import MAX_LIVE_CHUNK_BYTES, request
from commit_ci.security import Security
from commit_ci.wire import ProtocolError

log = logging.getLogger("live-log")

#: Folder of the live logs, in the results folder.
LIVE_FOLDER = "live"
#: Output kept live per attempt; the rest comes with the verdict (as much as the final log keeps).
MAX_LIVE_LOG_BYTES = 8 * 1024 * 1024
#: How often the runner looks for new output: people watch a log at this pace.
SEND_INTERVAL_S = 0.5
#: A sender further behind than this jumps to the latest output (the dispatcher marks
#: the gap): what matters live is what the tests do now.
MAX_BEHIND_BYTES = 1024 * 1024
#: Wait for the dispatcher's answer to a chunk; a sender that waits longer is late anyway.
SEND_TIMEOUT_S = 2.0
#: Most bytes one read of a live log returns (``tail``, the HTTP API).
MAX_READ_BYTES = 64 * 1024


def live_path(results_dir: str, commit: str) -> str:
    """Where the live log of ``commit`` (a validated full id) is."""
    return os.path.join(results_dir, LIVE_FOLDER, commit + ".log")


@dataclass
class _Followed:
    """What a commit's live log holds: the stream of one attempt (a whole run), or those
    of its shards' attempts, each chunk after a line naming its shard when the shard
    written last was another."""

    sharded: bool
    offsets: dict[int, int]  # by attempt: the next byte of its stream the file wants
    size: int  # bytes in the file
    capped: bool = False
    last: int | None = None  # the attempt written last


class LiveLogs:
    """The dispatcher's live logs (see the module docstring). Thread-safe; its own lock,
    never held while anything but these small files is touched."""

    def __init__(self, results_dir: str, limit: int = MAX_LIVE_LOG_BYTES):
        self.folder = os.path.join(results_dir, LIVE_FOLDER)
        self.results_dir = results_dir
        self.limit = limit
        self._lock = threading.Lock()
        self._followed: dict[str, _Followed] = {}

    def append(self, commit: str, attempt: int, offset: int, data: bytes,
               shard: tuple[int, int] | None = None) -> int:
        """Write the chunk of ``attempt``'s output that starts at byte ``offset``; returns
        the offset the next chunk should start at. The caller has checked that ``attempt``
        is one the commit has out: its only one, or, with ``shard`` (I, K), that of its
        shard I of K, which runs beside the others."""
        path = live_path(self.results_dir, commit)
        with self._lock:
            followed = self._followed.get(commit)
            notes = b""
            mode = "ab"
            if followed is None or followed.sharded != (shard is not None) or (
                    shard is None and attempt not in followed.offsets):
                # A new attempt (or the first shard's) starts afresh; after a restart of
                # the dispatcher, the file may hold this attempt's start already: kept,
                # with a marker.
                fresh = followed is not None or offset == 0 or not os.path.exists(path)
                if not fresh:
                    notes = b"\n[... live log resumed at byte %d of the output (the dispatcher restarted) ...]\n" % offset
                followed = _Followed(shard is not None, {attempt: offset}, 0 if fresh else os.path.getsize(path))
                self._followed[commit] = followed
                mode = "wb" if fresh else "ab"
            elif attempt not in followed.offsets:
                followed.offsets[attempt] = offset  # another shard's stream
            wanted = followed.offsets[attempt]
            end = offset + len(data)
            if end <= wanted and mode == "ab":
                return wanted  # sent again: written already
            if offset > wanted:
                notes += b"\n[... %d bytes of output not sent live ...]\n" % (offset - wanted)
            elif offset < wanted:
                data = data[wanted - offset:]
            if shard is not None and followed.last != attempt:
                notes = b"%s[shard %d of %d, attempt %d]\n" % (b"\n" if followed.size else b"", shard[0], shard[1],
                                                            attempt) + notes
            followed.last = attempt
            if followed.capped:
                followed.offsets[attempt] = end
                return end
            room = self.limit - followed.size
            if len(notes) + len(data) > room:
                data = (notes + data)[:max(0, room)]
                notes = b"\n[... live log limit of %d bytes reached: the whole output comes with the verdict ...]\n" % (
                    self.limit)
                data, notes = data + notes, b""
                followed.capped = True
            os.makedirs(self.folder, exist_ok=True)
            with open(path, mode) as handle:
                handle.write(notes + data)
            followed.size += len(notes) + len(data)
            followed.offsets[attempt] = end
            return end

    def discard(self, commit: str) -> None:
        """The commit has its verdict: its live log goes (its ``<sha>.log`` has it all),
        and the folder with the last of them."""
        with self._lock:
            self._followed.pop(commit, None)
            try:
                os.unlink(live_path(self.results_dir, commit))
            except FileNotFoundError:
                return
            except OSError as exc:
                log.warning("commit %s: live log not removed: %s", commit, exc)
                return
            try:
                os.rmdir(self.folder)
            except OSError:
                pass  # others are live

    def read(self, commit: str, offset: int, limit: int = MAX_READ_BYTES) -> tuple[bytes, int] | None:
        """Up to ``limit`` bytes of the live log from ``offset``, and its size; None
        when there is none."""
        return read_file_from(live_path(self.results_dir, commit), offset, limit)


def read_file_from(path: str, offset: int, limit: int = MAX_READ_BYTES) -> tuple[bytes, int] | None:
    """Up to ``limit`` bytes of the file at ``path`` from ``offset``, and its size; None
    when there is no such file."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(min(offset, size))
            return handle.read(limit), size
    except FileNotFoundError:
        return None


def whole_characters(data: bytes) -> bytes:
    """``data`` less an incomplete UTF-8 character at its end (up to 3 bytes), so that a
    reader decoding chunk by chunk never cuts a character in two."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data  # ASCII: complete
        if byte >= 0xC0:  # the lead byte of the last character
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= needed else data[:-back]
    return data


class LiveSender:
    """The runner's side: follows the output of the job in progress and sends it (see
    the module docstring). ``follow`` and ``forget`` are called by the executor's
    thread; they never wait for the network."""

    def __init__(self, dispatcher: tuple[str, int], security: Security, stop: threading.Event,
                 interval: float = SEND_INTERVAL_S):
        self.dispatcher = dispatcher
        self.security = security
        self.stop = stop
        self.interval = interval
        self._lock = threading.Lock()
        self._job: tuple[str, int, str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="live-log", daemon=True)
        self._thread.start()

    def follow(self, commit: str, attempt: int, path: str) -> None:
        """The job (commit, attempt) writes its output to ``path`` from now on: a path
        of the same attempt after another continues the attempt's live log (what was
        left of the one before is sent first)."""
        with self._lock:
            self._job = (commit, attempt, path)

    def forget(self) -> None:
        """The tests are over: stop following (the result carries the whole output)."""
        with self._lock:
            self._job = None

    def _current(self) -> tuple[str, int, str] | None:
        with self._lock:
            return self._job

    def _loop(self) -> None:
        # offset: in the file followed; base: where that file starts in the attempt's stream.
        handle, followed, base, offset, sent = None, None, 0, 0, 0
        try:
            while not self.stop.wait(self.interval):
                job = self._current()
                if job != followed:
                    same_attempt = job is not None and followed is not None and job[:2] == followed[:2]
                    if handle is not None:
                        if same_attempt and sent < MAX_LIVE_LOG_BYTES:
                            offset, sent = self._send_new(followed, handle, base, offset, sent)
                        handle.close()
                    base = base + offset if same_attempt else 0
                    sent = sent if same_attempt else 0
                    handle, followed, offset = None, job, 0
                if job is None or sent >= MAX_LIVE_LOG_BYTES:
                    continue
                if handle is None:
                    try:  # written by the job: no link, no FIFO (files.open_untrusted)
                        handle = open_untrusted(job[2])
                    except OSError:
                        continue  # not there yet
                offset, sent = self._send_new(job, handle, base, offset, sent)
        finally:
            if handle is not None:
                handle.close()

    def _send_new(self, job: tuple[str, int, str], handle, base: int, offset: int, sent: int) -> tuple[int, int]:
        """Send what the file has past ``offset`` (one chunk per turn, several when
        there is more), at ``base`` + its offset in the attempt's stream; returns the
        new offset in the file and the bytes sent."""
        commit, attempt, _ = job
        for _ in range(8):
            try:
                size = os.fstat(handle.fileno()).st_size
            except OSError:
                return offset, sent
            if size <= offset:
                return offset, sent
            if size - offset > MAX_BEHIND_BYTES:
                offset = size - MAX_LIVE_CHUNK_BYTES  # behind: the latest output matters most
            handle.seek(offset)
            data = handle.read(MAX_LIVE_CHUNK_BYTES)
            if not data:
                return offset, sent
            try:
                answer = communicate(self.dispatcher, request("live-log", commit=commit, attempt=attempt,
                                                              offset=base + offset, chunk=data),
                                     timeout=SEND_TIMEOUT_S, connect_timeout=SEND_TIMEOUT_S,
                                     total_timeout=SEND_TIMEOUT_S * 2, security=self.security)
            except (OSError, ProtocolError) as exc:
                log.debug("commit %s attempt %d: live output not sent: %s", commit, attempt, exc)
                return offset, sent
            if answer.verb != "OK":
                log.debug("commit %s attempt %d: live output refused: %s", commit, attempt, answer.get("reason"))
                return offset, sent
            sent += len(data)
            wanted = answer.get("offset")
            offset = max(0, wanted - base) if isinstance(wanted, int) else offset + len(data)
            if sent >= MAX_LIVE_LOG_BYTES or self._current() != job:
                return offset, sent
        return offset, sent
