"""Processes a job leaves running, whatever session or process group they moved to
(``setsid``, a double-forked daemon): killed before the job's result is sent, with
the warm pytest and with a fresh interpreter per job, so that the next commit's
verdict is its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from commit_ci.client import communicate
from commit_ci.protocol import request
from commit_ci.wire import parse_address

from conftest import JOBS_AS_RUNNER, PASSING_TEST, ROOT, STRAY_CODE, gone, running_strays, stray_pids, wait_until
from proctools import descendants

#: The pieces of a committed test that leaves processes running. Each stray it
#: starts (STRAY_CODE) has marked itself in FOLDER before the test ends.
TEST_HEADER = '''import os, subprocess, sys, time

STRAY = [sys.executable, "-c", %r, %r]


def wait_for_strays(count):
    deadline = time.monotonic() + 30
    while len([name for name in os.listdir(STRAY[-1]) if name.isdigit()]) < count:
        assert time.monotonic() < deadline, "the stray did not start"
        time.sleep(0.01)
'''

NEW_SESSION_TEST = '''

def test_starts_a_process_in_a_new_session():
    subprocess.Popen(STRAY, start_new_session=True)
    wait_for_strays(1)
'''

DOUBLE_FORK_TEST = '''

def test_starts_a_daemon():
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.execv(STRAY[0], STRAY)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    wait_for_strays(1)
'''

#: The review's case: a daemon that keeps writing a failing conftest.py into the clone.
PLANTS_A_CONFTEST_TEST = '''

def test_leaves_a_daemon_that_plants_a_conftest():
    subprocess.Popen([*STRAY, os.path.abspath("conftest.py")], start_new_session=True)
    wait_for_strays(1)
'''


#: Leaves a process running, then waits: the first time only (a retry passes).
LEAVES_ONE_THEN_WAITS_TEST = '''

def test_leaves_a_process_then_waits():
    if os.listdir(STRAY[-1]):
        return
    subprocess.Popen(STRAY, start_new_session=True)
    wait_for_strays(1)
    time.sleep(120)
'''


def parent(pid: int) -> int:
    with open("/proc/%d/stat" % pid, "rb") as handle:
        stat = handle.read()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def committed_test(strays, body: str) -> str:
    return TEST_HEADER % (STRAY_CODE, str(strays)) + body


def dispatch(ci, commit: str) -> None:
    answer = communicate(parse_address(ci.address), request("dispatch", commit=commit))
    assert answer.verb == "OK", answer


@pytest.mark.parametrize("escape", ["new-session", "double-fork"])
@pytest.mark.parametrize("how", ["warm", "fresh"])
def test_what_the_tests_leave_running_is_killed_before_the_result(ci, strays, how, escape):
    ci.start_dispatcher()
    runner = ci.start_runner(*JOBS_AS_RUNNER, *(["--no-warm-pytest"] if how == "fresh" else []))
    body = NEW_SESSION_TEST if escape == "new-session" else DOUBLE_FORK_TEST
    commit = ci.upstream.commit({"test_leaves.py": committed_test(strays, body)}, "leaves a process running")
    dispatch(ci, commit)
    assert ci.wait_result(commit)["status"] == "passed", ci.report(commit)
    [stray] = stray_pids(strays)
    wait_until(lambda: gone(stray), 10, message="the stray killed and reaped")
    runner.wait_for_log(r"commit %s attempt 1: killed 1 process its tests left running" % commit)
    assert runner.running()

    # The runner's own children are not leftovers: the next job runs as before.
    following = ci.upstream.commit({"test_leaves.py": PASSING_TEST}, "leaves nothing")
    dispatch(ci, following)
    assert ci.wait_result(following)["status"] == "passed"
    assert "commit %s attempt 1: killed" % following not in runner.log()
    if how == "warm":
        # The warm pytest started ahead for it was no leftover of the job before.
        assert re.search(r"commit %s attempt \d+: forked from a warm pytest" % following, runner.log())


@pytest.mark.parametrize("how", ["warm", "fresh"])
def test_a_daemon_left_by_one_commit_cannot_fail_the_next(ci, strays, how):
    ci.start_dispatcher()
    ci.start_runner(*JOBS_AS_RUNNER, *(["--no-warm-pytest"] if how == "fresh" else []))
    guilty = ci.upstream.commit({"test_leaves.py": committed_test(strays, PLANTS_A_CONFTEST_TEST)}, "leaves a daemon")
    dispatch(ci, guilty)
    assert ci.wait_result(guilty)["status"] == "passed"
    innocent = ci.upstream.commit({"test_leaves.py": PASSING_TEST}, "innocent")
    dispatch(ci, innocent)
    assert ci.wait_result(innocent)["status"] == "passed", ci.report(innocent)
    assert running_strays(strays) == []


def test_what_a_job_left_is_killed_by_the_runner_when_the_warm_pytest_dies(ci, strays):
    ci.start_dispatcher()
    runner = ci.start_runner(*JOBS_AS_RUNNER)
    commit = ci.upstream.commit({"test_leaves.py": committed_test(strays, LEAVES_ONE_THEN_WAITS_TEST)}, "leaves, waits")
    dispatch(ci, commit)
    [stray] = wait_until(lambda: stray_pids(strays), 30, message="the stray started")
    runner.wait_for_log(r"commit %s attempt \d+: forked from a warm pytest" % commit)
    # The runner's child that forked the job (the job has the same command line); the
    # other one is the warm pytest started ahead for the next job.
    zygotes = [pid for pid in descendants(runner.pid) if parent(pid) == runner.pid
               and b"warm_pytest" in open("/proc/%d/cmdline" % pid, "rb").read()]
    [zygote] = [pid for pid in zygotes if any(parent(child) == pid for child in descendants(pid))]
    # Its children, the job's and the stray, come back to the runner.
    os.kill(zygote, signal.SIGKILL)
    wait_until(lambda: gone(stray), 20, message="the stray killed and reaped")
    runner.wait_for_log(r"commit %s attempt \d+: killed \d+ process(es)? its tests left running" % commit)
    assert ci.wait_result(commit)["status"] == "passed", "retried after the warm pytest's fault"


#: Runs in a process of its own (a subreaper cannot stop being one, and the test
#: process must not become one): starts a kept child and strays that escape in
#: every way, kills the strays with kill_leftovers, and prints what it found.
KILL_LEFTOVERS_PROBE = r'''
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from commit_ci.leftovers import _children, become_subreaper, kill_leftovers

folder, stray_code = sys.argv[2], sys.argv[3]
stray = [sys.executable, "-c", stray_code, folder]
# Hops (forks, and the parent exits) as fast as it can, 5,000 times, then stays where
# it is (60 s at most): whether it is caught mid-hop or after, it must not survive.
# (A process that forked faster than the kills for ever could: docs/reliability.md.)
hopper = [sys.executable, "-c", """import os, sys, time
for hops in range(5000):
    if os.fork():
        os._exit(0)
    if hops == 50:
        open(os.path.join(sys.argv[1], "hopping"), "w").close()
time.sleep(60)
""", folder]
assert become_subreaper()
# Not on this probe's output, which the test reads to the end.
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
kept = subprocess.Popen(stray, **quiet)
subprocess.Popen(stray, start_new_session=True, **quiet)
subprocess.run(["sh", "-c", 'setsid "$@" & exit 0', "sh", *stray], **quiet)  # a daemon: its parent is gone
subprocess.Popen(["sh", "-c", '"$@" & exec "$@"', "sh", *stray], start_new_session=True, **quiet)  # one with a child
subprocess.Popen(hopper, start_new_session=True, **quiet)
deadline = time.monotonic() + 30
while len([name for name in os.listdir(folder) if name.isdigit()]) < 5 or not os.path.exists(os.path.join(folder, "hopping")):
    assert time.monotonic() < deadline, "the strays did not start"
    time.sleep(0.01)
killed, stuck = kill_leftovers({kept.pid})
after = sorted(pid for pid, _, _ in _children())
kept_running = kept.poll() is None
kept.kill()
kept.wait()
print(json.dumps({"kept": kept.pid, "killed": killed, "stuck": stuck, "children_after": after, "kept_running": kept_running}))
'''


def test_kill_leftovers_kills_every_generation_and_spares_the_kept(strays):
    done = subprocess.run([sys.executable, "-c", KILL_LEFTOVERS_PROBE, str(ROOT), str(strays), STRAY_CODE],
                          capture_output=True, text=True, timeout=60, start_new_session=True)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["stuck"] == []
    assert found["children_after"] == [found["kept"]] and found["kept_running"]
    # The session's, the daemon, the chain's two, and the hopper where it was.
    assert found["killed"] >= 5, found
    assert len(stray_pids(strays)) == 5
    assert running_strays(strays) == []
