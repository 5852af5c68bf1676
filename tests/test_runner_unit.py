"""test_runner.py's pieces in-process: JUnit counts, the process group, results on disk, the
output cut; and every daemon's --help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import types

import pytest

from commit_ci import protocol, runner
from commit_ci.runner import JobResult, read_junit_counts, read_log, run_process_group

from conftest import ROOT, wait_until

# --- JUnit XML -------------------------------------------------------------------------------

SAMPLE_TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

def test_one():
    assert True

def test_two():
    assert True

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

def test_errors(broken):
    pass
'''


@pytest.fixture(scope="module")
def pytest_junit(tmp_path_factory):
    """JUnit XML written by a real pytest run: 2 passed, 1 failed, 1 skipped, 1 error."""
    folder = tmp_path_factory.mktemp("junit")
    (folder / "test_sample.py").write_text(SAMPLE_TESTS)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(folder / "junit.xml"), "test_sample.py"],
        cwd=folder, env=env, capture_output=True, timeout=60,
    )
    assert done.returncode == 1, done.stdout.decode()
    return folder / "junit.xml"


def test_junit_counts_from_real_pytest_output(pytest_junit):
    assert read_junit_counts(str(pytest_junit)) == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1}


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def test_junit_counts_with_a_testsuite_root_and_several_suites(tmp_path):
    single = write(tmp_path, "single.xml", '<testsuite tests="4" failures="1" errors="0" skipped="1"/>')
    assert read_junit_counts(single) == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}
    several = write(
        tmp_path, "several.xml",
        '<testsuites><testsuite tests="3" failures="1"/><testsuite tests="5" errors="2" skipped="1"/></testsuites>',
    )
    assert read_junit_counts(several) == {"passed": 4, "failed": 1, "errors": 2, "skipped": 1}
    empty = write(tmp_path, "empty.xml", '<testsuites><testsuite name="pytest" tests="0"/></testsuites>')
    assert read_junit_counts(empty) == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"this is not xml",
        b"\x00\xff\xfe\x89PNG binary",
        b'<testsuites><testsuite tests="3"',  # cut off
        b'<testsuite tests="three" failures="0"/>',
        b'<testsuite tests="3.0"/>',
    ],
    ids=["empty", "text", "binary", "truncated", "words", "float"],
)
def test_junit_counts_of_garbage_is_none(tmp_path, content):
    assert read_junit_counts(write(tmp_path, "junit.xml", content)) is None


def test_junit_counts_of_a_missing_file_or_a_folder_is_none(tmp_path):
    assert read_junit_counts(str(tmp_path / "missing.xml")) is None
    assert read_junit_counts(str(tmp_path)) is None


def test_junit_counts_of_an_oversized_file_is_none(tmp_path, monkeypatch, pytest_junit):
    monkeypatch.setattr(runner, "MAX_JUNIT_BYTES", os.path.getsize(pytest_junit) - 1)
    assert read_junit_counts(str(pytest_junit)) is None
    monkeypatch.setattr(runner, "MAX_JUNIT_BYTES", os.path.getsize(pytest_junit))
    assert read_junit_counts(str(pytest_junit)) is not None


def test_junit_counts_of_xml_that_is_not_junit_is_none(tmp_path):
    assert read_junit_counts(write(tmp_path, "page.xml", "<html><body>hello</body></html>")) is None


def test_junit_counts_refuses_negative_numbers(tmp_path):
    path = write(tmp_path, "junit.xml", '<testsuite tests="2" failures="-1" errors="0" skipped="0"/>')
    counts = read_junit_counts(path)
    assert counts is None or all(value >= 0 for value in counts.values()), counts


# --- the process group -----------------------------------------------------------------------


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
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
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
    monkeypatch.setattr(runner, "KILL_GRACE_S", 0.2)
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
    monkeypatch.setattr(runner, "KILL_GRACE_S", 0.2)
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


@pytest.mark.parametrize("junit", [None, b"", b"<testsuite tests='1'/>\xff"], ids=["no-junit", "empty-junit", "junit"])
def test_job_result_json_round_trip_keeps_binary_bytes(junit):
    result = JobResult(
        commit="ab" * 20, attempt=12, status="failed", passed=3, failed=1, errors=0, skipped=2, duration=1.25,
        reason="1 failed: \u00fcn\u00efc\u00f8d\u00e9", log=bytes(range(256)) + b"\r\n\x00end", junit=junit,
    )
    text = result.to_json()
    assert isinstance(text, bytes)
    assert JobResult.from_json(text) == result


def test_job_result_with_defaults_round_trips():
    result = JobResult(commit="abcdef12" * 5, attempt=1, status="aborted")
    assert JobResult.from_json(result.to_json()) == result


def test_a_kept_result_for_an_abbreviated_commit_id_is_unreadable():
    """An older runner may have kept one; the dispatcher would refuse it forever."""
    with pytest.raises(ValueError, match="not a full commit id: 'abcdef12'"):
        JobResult.from_json(JobResult(commit="abcdef12", attempt=1, status="passed").to_json())


def test_job_result_becomes_a_results_message_the_dispatcher_can_decode():
    result = JobResult(commit="ab" * 20, attempt=4, status="passed", passed=2, failed=0, errors=0, skipped=0,
                       duration=0.5, log=b"ok\n", junit=b"<x/>")
    wire = protocol.encode(result.to_message(), protocol.REQUESTS)
    line, _, body = wire.partition(b"\n")
    decoded, pending = protocol.decode_header(line, protocol.REQUESTS)
    assert decoded.fields == {"commit": "ab" * 20, "attempt": 4, "status": "passed", "passed": 2, "failed": 0,
                              "errors": 0, "skipped": 0, "duration": 0.5}
    assert [(section.name, length) for section, length in pending] == [("log", 3), ("junit", 4)]
    assert body == b"ok\n<x/>"


# --- the output cut -----------------------------------------------------------------------------


def test_short_log_is_sent_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "MAX_LOG_BYTES", 100)
    monkeypatch.setattr(runner, "LOG_TAIL_BYTES", 30)
    path = write(tmp_path, "out.log", bytes(range(100)))
    assert read_log(path) == bytes(range(100))


def test_long_log_keeps_head_and_tail_with_a_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "LOG_TAIL_BYTES", 30)
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
        handle.write(b"x" * (runner.MAX_LOG_BYTES + 1024) + summary)
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
