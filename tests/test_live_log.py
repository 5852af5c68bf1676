"""Live logs: a running job's output reaches the dispatcher while the job runs
(live_log.py), and ``ci-ctl log -f`` follows it until the verdict."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
import time

import pytest
from test_http import metrics, start_with_http

from commit_ci import dispatcher
from commit_ci.live_log import MAX_BEHIND_BYTES, LiveLogs, LiveSender, live_path, whole_characters
from commit_ci.protocol import MAX_LIVE_CHUNK_BYTES, reply, request
from commit_ci.security import Key, Security
from commit_ci.server import ProtocolServer, serve_in_thread
from commit_ci.store import JobStore

from conftest import module_argv, wait_until

SHA = "cd" * 20

#: A test that prints (past pytest's capture), waits for a first flag file, prints
#: again, waits for a second: its job stays running while a test watches its output.
#: Each line names the job's hash seed, which is drawn anew for each attempt, and
#: carries markup, which every reader must show as text.
LIVE_TEST = """import os, time

def _wait(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)

def test_prints_waits_prints(capsys):
    seed = os.environ.get("PYTHONHASHSEED")
    with capsys.disabled():
        print("LIVE step one, seed %%s <img src=x onerror=alert(1)><b>bold</b>" %% seed, flush=True)
    _wait(%r)
    with capsys.disabled():
        print("LIVE step two, seed %%s" %% seed, flush=True)
    _wait(%r)
"""


def live_test(folder) -> tuple[str, object, object]:
    first, second = folder / "first", folder / "second"
    return LIVE_TEST % (str(first), str(second)), first, second


def dispatch(ci, sha: str) -> None:
    done = subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address, "dispatch", sha),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- the dispatcher's files ----------------------------------------------------------------


def test_a_chunk_is_written_once_at_its_offset_and_gaps_are_marked(tmp_path):
    logs = LiveLogs(str(tmp_path))
    path = live_path(str(tmp_path), SHA)
    assert logs.append(SHA, 7, 0, b"hello ") == 6
    assert logs.append(SHA, 7, 0, b"hello ") == 6, "sent again: nothing added"
    assert logs.append(SHA, 7, 3, b"lo world\n") == 12, "overlapping: only the new part"
    assert open(path, "rb").read() == b"hello world\n"
    assert logs.append(SHA, 7, 100, b"later\n") == 106
    assert open(path, "rb").read() == b"hello world\n\n[... 88 bytes of output not sent live ...]\nlater\n"
    assert logs.read(SHA, 6) == (open(path, "rb").read()[6:], len(open(path, "rb").read()))

    assert logs.append(SHA, 8, 0, b"second attempt\n") == 15, "a new attempt starts afresh"
    assert open(path, "rb").read() == b"second attempt\n"

    logs.discard(SHA)
    assert logs.read(SHA, 0) is None
    assert not (tmp_path / "live").exists(), "the folder goes with the last live log"


def test_the_shards_of_a_commit_share_its_live_log_each_with_its_own_stream(tmp_path):
    logs = LiveLogs(str(tmp_path))
    path = live_path(str(tmp_path), SHA)
    assert logs.append(SHA, 7, 0, b"whole run\n") == 10
    # The commit is split: its shards' chunks come as they come, none starts it afresh.
    assert logs.append(SHA, 11, 0, b"one: a\n", shard=(1, 2)) == 7
    assert logs.append(SHA, 12, 0, b"two: a\n", shard=(2, 2)) == 7
    assert logs.append(SHA, 12, 7, b"two: b\n", shard=(2, 2)) == 14
    assert logs.append(SHA, 11, 0, b"one: a\n", shard=(1, 2)) == 7, "sent again: nothing added"
    assert logs.append(SHA, 11, 7, b"one: b\n", shard=(1, 2)) == 14
    assert logs.append(SHA, 13, 0, b"one again\n", shard=(1, 2)) == 10, "a shard run again joins the others"
    assert open(path, "rb").read() == (b"[shard 1 of 2, attempt 11]\none: a\n\n[shard 2 of 2, attempt 12]\ntwo: a\n"
                                       b"two: b\n\n[shard 1 of 2, attempt 11]\none: b\n"
                                       b"\n[shard 1 of 2, attempt 13]\none again\n")
    # Its failing tests run again, unsplit: a new attempt of a whole run, afresh.
    assert logs.append(SHA, 14, 0, b"rerun\n") == 6
    assert open(path, "rb").read() == b"rerun\n"


def test_a_live_log_is_capped(tmp_path):
    logs = LiveLogs(str(tmp_path), limit=100)
    for index in range(10):
        logs.append(SHA, 1, index * 30, b"x" * 30)
    text = open(live_path(str(tmp_path), SHA), "rb").read()
    assert text.startswith(b"x" * 100) and b"live log limit of 100 bytes reached" in text
    assert len(text) < 200


def test_whole_characters_never_cuts_a_character():
    text = "h\u00e9llo \u20ac \U0001f600".encode()
    for cut in range(len(text) + 1):
        kept = whole_characters(text[:cut])
        kept.decode("utf-8")  # no partial character at its end
        assert text[:cut].startswith(kept) and cut - len(kept) < 4


@pytest.fixture
def queued(tmp_path):
    """A dispatcher (no server: its handler alone) with the commit SHA queued: the
    store, the handler and its results folder."""
    store = JobStore(str(tmp_path / "queue.sqlite3"))
    results = tmp_path / "results"
    results.mkdir()
    handler = dispatcher.Dispatcher(store, str(results))
    store.enqueue(SHA, 1.0)
    yield store, handler, results
    store.close()


def test_the_dispatcher_takes_chunks_of_current_attempts_from_their_runners_alone(queued):
    store, handler, results = queued
    attempt = store.assign(SHA, "box-1", 2.0)
    record = dispatcher.RunnerRecord("box-1", ("127.0.0.1", 9), since=0.0)
    handler._assignments[attempt] = record.assignment = dispatcher.Assignment(SHA, attempt, record, time.monotonic() + 60)

    answer = handler.handle(request("live-log", commit=SHA, attempt=attempt, offset=0, chunk=b"one\n"), "box-1")
    assert (answer.verb, answer.get("recorded"), answer.get("offset")) == ("OK", 1, 4)
    stale = handler.handle(request("live-log", commit=SHA, attempt=attempt + 1, offset=0, chunk=b"x\n"), "box-2")
    assert (stale.verb, stale.get("recorded")) == ("OK", 0), "not the current attempt: ignored"
    other = request("live-log", commit=SHA, attempt=attempt, offset=4, chunk=b"forged\n")
    other.key = Key(bytes(32), "box-2", "runner")
    refused = handler.handle(other, "box-2")
    assert refused.verb == "ERR" and "another runner" in refused.get("reason")
    big = request("live-log", commit=SHA, attempt=attempt, offset=4, chunk=b"")
    big.truncated.add("chunk")
    assert handler.handle(big, "box-1").verb == "ERR"

    tail = handler.handle(request("tail", commit=SHA[:12]), "ctl")
    assert tail.sections["chunk"] == b"one\n"
    assert json.loads(tail.sections["json"]) == {"commit": SHA, "state": "running", "attempt": attempt,
                                                 "source": "live", "offset": 4, "size": 4}
    verdict = request("results", commit=SHA, attempt=attempt, status="passed", passed=1, log=b"one\ntwo\n")
    assert handler.handle(verdict, "box-1").get("recorded") == 1
    assert not (results / "live").exists(), "the verdict removes the live log"
    tail = handler.handle(request("tail", commit=SHA, offset=4), "ctl")
    assert tail.sections["chunk"] == b"two\n" and json.loads(tail.sections["json"])["source"] == "final"
    too_long = request("live-log", commit=SHA, attempt=attempt, offset=0, chunk=b"x" * (MAX_LIVE_CHUNK_BYTES + 1))
    assert handler.handle(too_long, "box-1").get("recorded") == 0, "settled: ignored"


def test_the_dispatcher_writes_each_shards_chunks_under_its_name(queued):
    store, handler, results = queued
    store.split(SHA, 2, b"{}")
    for shard, runner in ((1, "box-1"), (2, "box-2")):
        attempt = store.assign_shard(SHA, shard, runner, 2.0)
        record = dispatcher.RunnerRecord(runner, ("127.0.0.1", 9), since=0.0)
        handler._assignments[attempt] = record.assignment = dispatcher.Assignment(
            SHA, attempt, record, time.monotonic() + 60, shard=shard, shards=2, plan=b"{}")
        answer = handler.handle(request("live-log", commit=SHA, attempt=attempt, offset=0,
                                        chunk=b"shard %d here\n" % shard), runner)
        assert (answer.verb, answer.get("recorded")) == ("OK", 1)
    text = open(live_path(str(results), SHA), "rb").read()
    assert re.fullmatch(rb"\[shard 1 of 2, attempt \d+\]\nshard 1 here\n\n\[shard 2 of 2, attempt \d+\]\nshard 2 here\n",
                        text), text


# --- the runner's sender ---------------------------------------------------------------------


@pytest.fixture
def fake_dispatcher():
    """A protocol server on 127.0.0.1 that records the live-log chunks it gets and
    answers as the dispatcher does (``hold``: it answers nothing until set)."""
    chunks: list[tuple[int, bytes]] = []
    hold = threading.Event()
    hold.set()

    def handle(message, peer):
        assert hold.wait(30)
        chunks.append((message.fields["offset"], message.sections["chunk"]))
        return reply("OK", recorded=1, offset=message.fields["offset"] + len(message.sections["chunk"]))

    server = ProtocolServer(("127.0.0.1", 0), handle, logging.getLogger("test.fake-dispatcher"),
                            threaded_verbs={"live-log"})
    serve_in_thread(server, "fake-dispatcher")
    yield server.address, chunks, hold
    hold.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def live_sender(fake_dispatcher):
    """A LiveSender to the fake dispatcher, looking every 0.05 s: (it, the chunks the
    dispatcher got, the dispatcher's hold)."""
    address, chunks, hold = fake_dispatcher
    stop = threading.Event()
    started = LiveSender(address, Security(), stop, interval=0.05)
    started.start()
    yield started, chunks, hold
    stop.set()


def test_the_sender_sends_new_output_in_order_and_jumps_ahead_when_behind(tmp_path, live_sender):
    sender, chunks, _ = live_sender
    output = tmp_path / "output.log"
    sender.follow(SHA, 3, str(output))
    output.write_bytes(b"first\n")
    wait_until(lambda: chunks == [(0, b"first\n")], 10, message="the first chunk")
    with open(output, "ab") as handle:
        handle.write(b"second\n")
    wait_until(lambda: chunks[-1:] == [(6, b"second\n")], 10, message="the next chunk, at its offset")
    with open(output, "ab") as handle:  # far more than it may be behind: it jumps to the latest
        handle.write(b"x" * (3 * MAX_BEHIND_BYTES) + b"latest\n")
    wait_until(lambda: chunks[-1][1].endswith(b"latest\n"), 10, message="the latest output")
    sent = sum(len(data) for _, data in chunks)
    assert sent < MAX_BEHIND_BYTES, "what it was behind was skipped"
    sender.forget()
    count = len(chunks)
    with open(output, "ab") as handle:
        handle.write(b"after the tests\n")
    time.sleep(0.3)  # several turns of the sender: nothing should come (nothing to wait for)
    assert len(chunks) == count, "not followed once the tests are over"


def test_the_sender_goes_on_from_the_setup_output_to_the_tests_output_in_one_stream(tmp_path, live_sender):
    sender, chunks, _ = live_sender
    setup, output = tmp_path / "setup.log", tmp_path / "output.log"
    sender.follow(SHA, 3, str(setup))
    setup.write_bytes(b"building\n")
    wait_until(lambda: chunks == [(0, b"building\n")], 10, message="the setup's output")
    with open(setup, "ab") as handle:
        handle.write(b"built\n")  # just before the tests start: still sent, before theirs
    output.write_bytes(b"tests\n")
    sender.follow(SHA, 3, str(output))
    wait_until(lambda: chunks[-1:] == [(15, b"tests\n")], 10, message="the tests' output, after the setup's")
    assert b"".join(data for _, data in chunks) == b"building\nbuilt\ntests\n"
    sender.follow(SHA, 4, str(setup))  # another attempt: a stream of its own
    wait_until(lambda: chunks[-1:] == [(0, b"building\nbuilt\n")], 10, message="the next attempt's output")


def test_the_sender_never_holds_up_the_job(tmp_path, live_sender):
    sender, _, hold = live_sender
    hold.clear()  # the dispatcher takes the chunk and does not answer
    output = tmp_path / "output.log"
    output.write_bytes(b"output\n")
    sender.follow(SHA, 3, str(output))
    time.sleep(0.3)  # the sender is now waiting for an answer
    started = time.monotonic()
    sender.forget()
    sender.follow(SHA, 4, str(output))
    sender.forget()
    assert time.monotonic() - started < 0.1, "follow and forget never wait for the network"


# --- end to end ----------------------------------------------------------------------------


def follow_a_live_test(ci, upstream, processes, tmp_path, prefix: int = 40):
    """A dispatcher and a runner testing LIVE_TEST, and ``ci-ctl log -f`` following it
    by the first ``prefix`` digits of its commit: (the commit, ci-ctl's process, the
    test's first flag, its second)."""
    code, first, second = live_test(tmp_path)
    ci.start_dispatcher()
    ci.start_runner()
    sha = upstream.commit({"test_live.py": code}, "a test that prints, waits, prints")
    dispatch(ci, sha)
    follower = processes.start("ci-ctl-log", module_argv("ctl", "--dispatcher-server", ci.address, "log", "-f",
                                                         sha[:prefix]))
    return sha, follower, first, second


def test_ctl_log_follows_a_running_job_until_its_verdict(ci, upstream, processes, tmp_path):
    sha, follower, first, second = follow_a_live_test(ci, upstream, processes, tmp_path, prefix=12)

    follower.wait_for_log(r"LIVE step one, seed \d+", timeout=60)
    assert "LIVE step two" not in follower.log()
    first.touch()
    follower.wait_for_log(r"LIVE step two", timeout=30)
    assert ci.result(sha) is None, "seen while the job runs"
    second.touch()
    ci.wait_result(sha)
    assert wait_until(lambda: follower.popen.poll() is not None, 30, message="ci-ctl log -f to exit") is True
    assert follower.popen.returncode == 0
    assert "%s: passed" % sha[:12] in follower.log()
    # Without -f, once judged: the final log, whole.
    done = processes.start("ci-ctl-log-final", module_argv("ctl", "--dispatcher-server", ci.address, "log", sha))
    wait_until(lambda: done.popen.poll() is not None, 30, message="ci-ctl log to exit")
    assert done.popen.returncode == 0 and "LIVE step two" in done.log() and "2 passed" in done.log()
    assert not (ci.results_dir / "live").exists()


def test_the_output_of_a_commits_environment_setup_is_live_before_its_tests_start(ci, upstream, tmp_path):
    flag = tmp_path / "setup-may-end"
    ci.start_dispatcher()
    ci.start_runner("--env-cache", str(tmp_path / "envs"))
    sha = upstream.commit({
        ".commit-ci.toml": 'setup = ["python setup_step.py"]\n',
        "setup_step.py": "import os, time\nprint('SETUP STEP RUNNING', flush=True)\n"
                         "deadline = time.monotonic() + 120\n"
                         "while not os.path.exists(%r) and time.monotonic() < deadline:\n"
                         "    time.sleep(0.05)\n" % str(flag),
    }, "a setup step that takes its time")
    dispatch(ci, sha)

    def shown() -> str:
        return subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address, "log", sha), capture_output=True,
                              text=True, timeout=60).stdout

    live = wait_until(lambda: "SETUP STEP RUNNING" in shown() and shown(), 120, message="the setup's output, live")
    assert "[runner: building environment" in live
    flag.touch()
    result = ci.wait_result(sha, timeout=120)
    assert result["status"] == "passed", ci.report(sha)
    assert "SETUP STEP RUNNING" in (ci.results_dir / (sha + ".log")).read_text()


def test_a_runner_that_dies_leaves_what_it_sent_and_the_next_attempt_starts_afresh(ci, upstream, tmp_path):
    code, first, second = live_test(tmp_path)
    port = start_with_http(ci, "--heartbeat-interval", "0.3")
    runner = ci.start_runner()
    sha = upstream.commit({"test_live.py": code}, "a test that prints, waits, prints")
    dispatch(ci, sha)
    path = live_path(str(ci.results_dir), sha)

    def live_text() -> str:
        try:
            return open(path, encoding="utf-8", errors="replace").read()
        except FileNotFoundError:
            return ""

    seed = wait_until(lambda: re.search(r"LIVE step one, seed (\d+)", live_text()), 60,
                      message="the first attempt's output, live").group(1)
    runner.kill()
    ci.dispatcher.wait_for_log(r"commit %s attempt \d+ \(runner [^)]*\): runner .* lost" % sha, timeout=30)
    assert "seed %s" % seed in live_text(), "what the dead runner sent is still there"
    assert metrics(port)[("ci_missed_heartbeats_total", ())] >= 3, "the pings the dead runner missed"

    ci.start_runner()
    wait_until(lambda: re.search(r"LIVE step one, seed (?!%s\b)\d+" % seed, live_text()), 60,
               message="the second attempt's output, live")
    assert "seed %s" % seed not in live_text(), "a fresh live log"
    first.touch()
    second.touch()
    assert ci.wait_result(sha)["status"] == "passed"


def test_ctl_log_follow_ends_at_any_verdict_even_one_without_output(ci, upstream, processes, tmp_path):
    sha, follower, _, _ = follow_a_live_test(ci, upstream, processes, tmp_path)
    follower.wait_for_log(r"LIVE step one", timeout=60)
    cancel = subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address, "cancel", sha),
                            capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 0, cancel.stderr
    assert wait_until(lambda: follower.popen.poll() is not None, 30, message="ci-ctl log -f to exit") is True
    assert follower.popen.returncode == 0 and "%s: cancelled" % sha[:12] in follower.log()
