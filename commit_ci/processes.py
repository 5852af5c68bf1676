"""Running one step (a git fetch, a checkout, the tests) as a child process, bounded.

Every command the daemons run goes through ``run_step``: in a session (process group)
of its own, so that a step that hangs is killed with everything it started; under a
time limit, after which the group gets SIGTERM and, KILL_GRACE_S later, SIGKILL; with
its output in a file rather than a pipe, so that it can never block on a reader; with
the last of that output kept, whose last line is the reason shown when a step fails
(the shell scripts end with a sentence there). The end is noticed by a blocking wait,
not by polling, so a result is reported the moment the step ends. ``supervise`` is the
same watch for a process started some other way (a job forked by the warm pytest).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from commit_ci.isolation import Launch

#: After SIGTERM, how long a step's processes get to exit before SIGKILL.
KILL_GRACE_S = 5.0
#: How often a step's watchdog looks at the stop event (a stopping daemon waits at most this).
STOP_CHECK_S = 0.5
#: Output kept of a step, from its end: enough for the reason of a failure.
OUTPUT_TAIL_BYTES = 64 * 1024
#: Standard output kept of a step that is asked for it (update_repo.sh prints one commit id).
STDOUT_BYTES = 64 * 1024

#: Why a step was killed (``StepEnd.killed``): it ran past its time limit, or it was told to stop.
TIMEOUT = "timeout"
STOPPED = "stopped"

#: Never set: the stop event of a step that nothing stops early.
_NEVER = threading.Event()
#: The lock of a step no one else needs to know of.
_NO_LOCK = contextlib.nullcontext()


@dataclass(frozen=True)
class StepEnd:
    """How a step ended."""

    status: int  # its exit status; negative: the signal that ended it
    killed: str | None  # None when it ended by itself; TIMEOUT or STOPPED when it was killed
    output: bytes  # the last OUTPUT_TAIL_BYTES of what it wrote (but a captured stdout)
    stdout: bytes = b""  # what it wrote to standard output, when asked for apart

    @property
    def succeeded(self) -> bool:
        return self.status == 0 and self.killed is None

    def last_line(self) -> str:
        """The last line of its output that is not blank, or "no output"."""
        lines = self.output.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else "no output"


class KnownChildren:
    """The children a runner starts beside the job's steps (a fetch ahead, on another
    thread), which its sweep for what a job left running (leftovers.py) must spare:
    a child is registered under ``lock`` as it is started, and the sweep holds it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: set[int] = set()


def run_step(command: list[str] | str, *, timeout: float, cwd: str | None = None, env: dict | None = None,
             stop: threading.Event | None = None, output_path: str | None = None, append: bool = False,
             capture_stdout: bool = False, launch: Launch | None = None,
             known: KnownChildren | None = None, stdin_data: bytes | None = None) -> StepEnd:
    """Run ``command`` (a string runs in the shell) in a new session, stdin /dev/null
    (or ``stdin_data``, from a temporary file: never a pipe it could block on), until
    it ends, ``timeout`` seconds pass, or ``stop`` is set; see ``supervise``.

    Its output (stdout and stderr together, unless ``capture_stdout`` keeps stdout
    apart) goes to ``output_path`` (after what it holds, with ``append``), or to a
    temporary file. A job's step is started as its ``launch`` says (isolation.py:
    its cgroup, its user, its sandbox), which is closed once it has started. With
    ``known``, the step is one of those children while it runs. OSError if it cannot
    start.
    """
    with tempfile.TemporaryFile() as scratch, tempfile.TemporaryFile() as stdout_file, \
            tempfile.TemporaryFile() as stdin_file:
        if stdin_data is not None:
            stdin_file.write(stdin_data)
            stdin_file.seek(0)
        with open(output_path, "a+b" if append else "w+b") if output_path else scratch as output:
            if launch is not None:
                command = launch.command(command)
            try:
                with known.lock if known is not None else _NO_LOCK:
                    process = subprocess.Popen(
                        command,
                        cwd=cwd,
                        env=env,
                        stdin=subprocess.DEVNULL if stdin_data is None else stdin_file,
                        stdout=stdout_file if capture_stdout else output,
                        stderr=output,
                        shell=isinstance(command, str),
                        start_new_session=True,
                        **(launch.popen_options() if launch is not None else {}),
                    )
                    if known is not None:
                        known.pids.add(process.pid)
            except BaseException as exc:
                if launch is not None:
                    launch.started()
                    launch.ended()
                if isinstance(exc, subprocess.SubprocessError):  # what went wrong between fork and exec
                    raise OSError("cannot start %s: %s" % (command, exc)) from None
                raise
            if launch is not None:
                launch.started()
            try:
                status, killed = supervise(process.pid, process.wait, timeout, stop or _NEVER)
            finally:
                if known is not None:
                    with known.lock:
                        known.pids.discard(process.pid)
            if launch is not None:
                launch.ended()
            tail = _read_tail(output, OUTPUT_TAIL_BYTES)
        stdout = b""
        if capture_stdout:
            stdout_file.seek(0)
            stdout = stdout_file.read(STDOUT_BYTES)
    return StepEnd(status, killed, tail, stdout)


def _read_tail(handle: IO[bytes], size: int) -> bytes:
    end = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, end - size))
    return handle.read()


def supervise(pgid: int, wait: Callable[[], int], timeout: float, stop: threading.Event) -> tuple[int, str | None]:
    """Wait for the process leading group ``pgid`` (``wait()`` blocks until it ends and
    returns its exit status) under a time limit.

    Returns (exit status, None) when it ends by itself, or (status, TIMEOUT) /
    (status, STOPPED) when it was killed: SIGTERM to the whole group, SIGKILL after
    KILL_GRACE_S. Whatever is left of the group afterwards (processes it started in
    the background) is killed too; what left the group (a new session) is for the
    caller to kill (leftovers.py).
    """
    finished = threading.Event()
    why: list[str] = []

    def watchdog() -> None:
        deadline = time.monotonic() + timeout
        while not finished.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why.append(TIMEOUT)
                break
            if stop.is_set():
                why.append(STOPPED)
                break
            finished.wait(min(remaining, STOP_CHECK_S))
        else:
            return
        signal_group(pgid, signal.SIGTERM)
        if not finished.wait(KILL_GRACE_S):
            signal_group(pgid, signal.SIGKILL)

    guard = threading.Thread(target=watchdog, name="step-watchdog", daemon=True)
    guard.start()
    try:
        status = wait()
    finally:
        finished.set()
        guard.join()
        signal_group(pgid, signal.SIGKILL)
    return status, (why[0] if why else None)


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to process group ``pgid``, if it still exists."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
