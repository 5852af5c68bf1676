"""The runner's pieces in-process: JUnit counts (junit.py), a step's process group
(processes.py), results kept on disk (outbox.py), the output cut (executor.py); and
every daemon's --help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import types

import pytest

from commit_ci import executor, outbox, processes, protocol
from commit_ci.executor import read_log
from commit_ci.result import Result

from conftest import ROOT, wait_until


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


# --- the process group -----------------------------------------------------------------------


def run_process_group(command, cwd: str, env: dict, output_path: str, timeout: float,
                      stop: threading.Event) -> tuple[int, str | None]:
    ended = processes.run_step(command, cwd=cwd, env=env, output_path=output_path, timeout=timeout, stop=stop)
    return ended.status, ended.killed



def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 here may never reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


class GroupRun:
    """run_process_group on a thread, so the test can watch and poke it meanwhile."""

    def __init__(self, command, folder, timeout: float, stop: threading.Event | None = None):
        self.output = folder / "output.log"
        self.stop = stop or threading.Event()
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(command, folder, timeout), daemon=True)
        self.thread.start()

    def _run(self, command, folder, timeout):
        try:
            self.result = run_process_group(command, str(folder), dict(os.environ), str(self.output), timeout, self.stop)
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def wait(self, timeout: float = 30.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_process_group did not return"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def leftovers():
    """Pids a test started; any still alive at the end are killed (and fail the test)."""
    pids: list[int] = []
    yield pids
    survivors = [pid for pid in pids if alive(pid)]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, "processes left running: %s" % survivors


def read_pids(path) -> list[int] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return [int(word) for word in text.split()] if text.endswith("\n") else None


def test_normal_exit_gives_its_status_and_output(tmp_path):
    run = GroupRun("echo to stdout; echo to stderr >&2; exit 3", tmp_path, timeout=60)
    assert run.wait() == (3, None)
    assert run.output.read_bytes() == b"to stdout\nto stderr\n"
    run = GroupRun([sys.executable, "-c", "print('list form')"], tmp_path, timeout=60)
    assert run.wait() == (0, None)
    assert run.output.read_text() == "list form\n"


def test_environment_and_working_folder_are_the_given_ones(tmp_path):
    output = tmp_path / "out.log"
    status = run_process_group('printf "%s %s" "$CI_MARK" "$(pwd)"', str(tmp_path), {"CI_MARK": "marked", "PATH": os.environ["PATH"]},
                               str(output), 60, threading.Event())
    assert status == (0, None)
    assert output.read_text() == "marked %s" % os.path.realpath(tmp_path)


def test_timeout_is_a_verdict_even_for_a_quick_limit(tmp_path, leftovers):
    # However early the limit strikes (before or after the pid is written), the verdict is the same.
    run = GroupRun('echo "$$" > pids.tmp && mv pids.tmp pids; exec sleep 600', tmp_path, timeout=0.2)
    try:
        assert run.wait() == (-signal.SIGTERM, "timeout")
    finally:
        leftovers.extend(read_pids(tmp_path / "pids") or [])


def test_timeout_kills_the_whole_process_group(tmp_path, monkeypatch, leftovers):
    # A fake clock: the time limit passes exactly when the test says so, however slow the machine.
    clock = [0.0]
    monkeypatch.setattr(processes, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    pid_file = tmp_path / "pids"
    command = 'sleep 600 & echo "$$ $!" > pids.tmp && mv pids.tmp pids; wait'
    run = GroupRun(command, tmp_path, timeout=100)
    pids = wait_until(lambda: read_pids(pid_file), timeout=20, message="the child and grandchild pids")
    leftovers.extend(pids)
    assert all(alive(pid) for pid in pids)
    assert run.thread.is_alive(), "still running before the limit"

    clock[0] = 101.0
    status, why = run.wait()

    assert why == "timeout"
    assert status == -signal.SIGTERM
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10, message="child and grandchild gone")


def test_leftovers_that_ignore_sigterm_are_killed_too(tmp_path, monkeypatch, leftovers):
    monkeypatch.setattr(processes, "KILL_GRACE_S", 0.2)
    stop = threading.Event()
    # The grandchild ignores SIGTERM; the child does not.
    command = "(trap '' TERM; exec sleep 600) & echo \"$$ $!\" > pids.tmp && mv pids.tmp pids; wait"
    run = GroupRun(command, tmp_path, timeout=600, stop=stop)
    pids = wait_until(lambda: read_pids(tmp_path / "pids"), timeout=20, message="pids")
    leftovers.extend(pids)

    stop.set()
    status, why = run.wait()

    assert (status, why) == (-signal.SIGTERM, "stopped")
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10, message="the grandchild gone")


def test_a_child_that_ignores_sigterm_gets_sigkill(tmp_path, monkeypatch, leftovers):
    monkeypatch.setattr(processes, "KILL_GRACE_S", 0.2)
    stop = threading.Event()
    command = "trap '' TERM; echo \"$$\" > pids.tmp && mv pids.tmp pids; while :; do sleep 1; done"
    run = GroupRun(command, tmp_path, timeout=600, stop=stop)
    pids = wait_until(lambda: read_pids(tmp_path / "pids"), timeout=20, message="pid")
    leftovers.extend(pids)

    stop.set()

    assert run.wait() == (-signal.SIGKILL, "stopped")
    assert not alive(pids[0])


def test_stop_event_gives_stopped(tmp_path, leftovers):
    stop = threading.Event()
    run = GroupRun('echo "$$" > pids.tmp && mv pids.tmp pids; exec sleep 600', tmp_path, timeout=600, stop=stop)
    pids = wait_until(lambda: read_pids(tmp_path / "pids"), timeout=20, message="pid")
    leftovers.extend(pids)
    stop.set()
    assert run.wait() == (-signal.SIGTERM, "stopped")


# --- results kept on disk ----------------------------------------------------------------------


@pytest.mark.parametrize("junit_xml", [None, b"", b"<testsuite tests='1'/>\xff"], ids=["no-junit", "empty-junit", "junit"])
def test_a_kept_result_round_trips_with_its_bytes(junit_xml):
    result = Result(
        commit="ab" * 20, attempt=12, status="failed", passed=3, failed=1, errors=0, skipped=2, duration_s=1.25,
        reason="1 failed: \u00fcn\u00efc\u00f8d\u00e9", log=bytes(range(256)) + b"\r\n\x00end", junit=junit_xml,
    )
    data = outbox.encode(result)
    assert isinstance(data, bytes)
    assert outbox.decode(data) == result


def test_a_kept_result_with_defaults_round_trips():
    result = Result(commit="abcdef12" * 5, attempt=1, status="aborted")
    assert outbox.decode(outbox.encode(result)) == result


def test_a_result_kept_by_an_older_runner_is_read():
    """Version 0.1 named the duration ``duration``."""
    old = b'{"commit": "%s", "attempt": 3, "status": "passed", "passed": 1, "failed": 0, "errors": 0, ' \
          b'"skipped": 0, "duration": 0.75, "reason": null, "log": "b2sK", "junit": null}' % (b"cd" * 20)
    assert outbox.decode(old) == Result(commit="cd" * 20, attempt=3, status="passed", passed=1, failed=0, errors=0,
                                        skipped=0, duration_s=0.75, log=b"ok\n")


def test_a_kept_result_for_an_abbreviated_commit_id_is_unreadable():
    """An older runner may have kept one; the dispatcher would refuse it forever."""
    with pytest.raises(ValueError, match="not a full commit id: 'abcdef12'"):
        outbox.decode(outbox.encode(Result(commit="abcdef12", attempt=1, status="passed")))


@pytest.mark.parametrize("damage", [b"[]", b'{"commit": "%s"}' % (b"ab" * 20), b"not json",
                                    b'{"commit": "%s", "attempt": 1, "status": "won"}' % (b"ab" * 20)])
def test_a_damaged_kept_result_is_unreadable(damage):
    with pytest.raises(ValueError):
        outbox.decode(damage)


def test_a_result_becomes_a_results_message_the_dispatcher_reads_back_whole():
    result = Result(commit="ab" * 20, attempt=4, status="passed", passed=2, failed=0, errors=0, skipped=0,
                    duration_s=0.5, log=b"ok\n", junit=b"<x/>")
    wire = protocol.encode(result.to_message(), protocol.REQUESTS)
    line, _, body = wire.partition(b"\n")
    decoded, pending = protocol.decode_header(line, protocol.REQUESTS)
    assert decoded.fields == {"commit": "ab" * 20, "attempt": 4, "status": "passed", "passed": 2, "failed": 0,
                              "errors": 0, "skipped": 0, "duration": 0.5}
    assert [(section.name, length) for section, length in pending] == [("log", 3), ("junit", 4)]
    assert body == b"ok\n<x/>"
    decoded.sections = {"log": b"ok\n", "junit": b"<x/>"}
    assert Result.from_message(decoded) == result


# --- the output cut -----------------------------------------------------------------------------


def test_short_log_is_sent_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "LOG_TAIL_BYTES", 30)
    path = write(tmp_path, "out.log", bytes(range(100)))
    assert read_log(path, limit=100) == bytes(range(100))


def test_long_log_keeps_head_and_tail_with_a_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "LOG_TAIL_BYTES", 30)
    content = b"".join(b"line %03d\n" % n for n in range(60))  # 540 bytes
    path = write(tmp_path, "out.log", content)

    sent = read_log(path, limit=200)

    assert len(sent) <= 200
    assert sent.endswith(content[-30:])
    head, marker, _ = sent[:-30].partition(b"\n[... ")
    assert len(head) > 50 and content.startswith(head)
    cut = 540 - len(head) - 30
    assert sent[len(head):-30] == b"\n[... %d bytes of output cut here: limit 200 bytes ...]\n" % cut


def test_missing_log_is_explained(tmp_path):
    sent = read_log(str(tmp_path / "nothing.log"))
    assert sent.startswith(b"[runner could not read the test output:") and b"nothing.log" in sent


def test_cut_log_fits_the_dispatchers_log_limit(tmp_path):
    keep = {section.name: section.keep for section in protocol.REQUESTS["results"].sections}["log"]
    summary = b"\n===== 1 failed, 2 passed in 0.50s =====\n"
    path = tmp_path / "out.log"
    with open(path, "wb") as handle:
        handle.write(b"x" * (protocol.MAX_LOG_BYTES + 1024) + summary)
    sent = read_log(str(path))
    assert sent.endswith(summary)
    assert len(sent) <= keep, "the dispatcher keeps only %d bytes and would cut %d off the tail" % (keep, len(sent) - keep)


# --- command lines ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, flags",
    [
        ("dispatcher.py", ["--host", "--port", "--results-dir", "--db", "--max-attempts", "--heartbeat-interval", "--log-file"]),
        ("test_runner.py", ["REPO", "--dispatcher-server", "--host", "--port", "--name", "--test-command", "--timeout",
                            "--dispatcher-timeout", "--state-dir", "--log-file"]),
        ("repo_observer.py", ["REPO", "--dispatcher-server", "--branch", "--remote", "--interval", "--latest-only",
                              "--state-file", "--log-file"]),
    ],
)
def test_help_exits_zero_and_names_the_main_flags(script, flags):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
    for flag in flags:
        assert flag in done.stdout, flag


@pytest.mark.parametrize("argv", [["dispatcher.py"], ["test_runner.py", "clone"], ["repo_observer.py", "clone"]],
                         ids=lambda argv: argv[0])
def test_unknown_flag_is_a_usage_error(argv):
    done = subprocess.run([sys.executable, *argv, "--no-such-flag"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in done.stderr
