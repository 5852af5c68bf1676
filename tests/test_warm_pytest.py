"""The warm pytest (warm_pytest.py): a job forked from it sees what ``python -m pytest``
would have seen, starts from the zygote's state and not the last job's, is killed
with what it started, and a zygote that dies costs a job nothing but time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from commit_ci import processes, runner
from commit_ci.client import communicate
from commit_ci.protocol import request
from commit_ci.warm_pytest import _FILE_TIME_LAG_NS, WarmPytest, WarmPytestError
from commit_ci.wire import parse_address

from conftest import JOBS_AS_RUNNER, PASSING_TEST, RUNNER_ENV, STRAY_CODE, gone, stray_pids, wait_until
from proctools import descendants

PYTEST_ARGS = ["-p", "no:cacheprovider"]

#: A test that writes what it sees of its interpreter to the file named by $PROBE_OUT.
PROBE_TEST = '''
import json, os, sys

def test_probe():
    seen = {
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "path": sys.path,
        "argv0": os.path.relpath(sys.argv[0], os.path.dirname(os.path.dirname(sys.argv[0]))),
        "argv": sys.argv[1:],
        "mark": os.environ.get("PROBE_MARK"),
        "own_session": os.getsid(0) == os.getpid(),
        "dont_write_bytecode": sys.dont_write_bytecode,
        "sigint": repr(__import__("signal").getsignal(__import__("signal").SIGINT)),
        "sigterm": repr(__import__("signal").getsignal(__import__("signal").SIGTERM)),
        "stdin_is_null": os.path.samefile("/proc/self/fd/0", os.devnull),
        "imported_from_clone": os.path.dirname(os.path.abspath(__import__("helper_module").__file__)),
        # Nothing of the runner's package, which would hide a module of the same name.
        "ours": sorted(name for name in sys.modules if name.split(".")[0] in ("commit_ci", "leftovers")
                       or "zygote" in name),
    }
    with open(os.environ["PROBE_OUT"], "w") as handle:
        json.dump(seen, handle)
'''


def base_env() -> dict:
    return dict(RUNNER_ENV, PYTHONDONTWRITEBYTECODE="1")


@pytest.fixture
def runner_signals():
    """This process's signals as a runner has them, whatever ignored ones pytest was
    started with (a job started from here then sees what it would from a runner)."""
    before = {signum: signal.getsignal(signum) for signum in runner.INHERITED_IGNORES}
    runner.stop_passing_on_ignored_signals()
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.fixture
def warm(tmp_path, runner_signals):
    """A started zygote, stopped (and killed by pid if need be) after the test."""
    zygote = WarmPytest(sys.executable, base_env(), str(tmp_path), hash_seed=12345)
    zygote.start()
    zygote.wait_ready()
    pid = zygote.process.pid
    yield zygote
    zygote.close()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_warm(warm: WarmPytest, cwd, output, timeout: float = 60.0, env: dict | None = None, args=PYTEST_ARGS):
    pid = warm.spawn(str(cwd), list(args), env or base_env(), str(output))
    try:
        return processes.supervise(pid, lambda: warm.wait(pid, timeout + 30), timeout, threading.Event())
    finally:
        processes.signal_group(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_job_sees_what_python_m_pytest_would_have_seen(warm, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "test_probe.py").write_text(PROBE_TEST)
    (clone / "helper_module.py").write_text("")
    seen = {}
    for how in ("fresh", "warm"):
        env = dict(base_env(), PROBE_MARK="mark", PROBE_OUT=str(tmp_path / (how + ".json")))
        output = tmp_path / (how + ".log")
        if how == "fresh":
            ended = processes.run_step([sys.executable, "-m", "pytest", *PYTEST_ARGS], cwd=str(clone), env=env,
                                       output_path=str(output), timeout=60)
            status, why = ended.status, ended.killed
        else:
            status, why = run_warm(warm, clone, output, env=env)
        assert (status, why) == (0, None), output.read_text()
        seen[how] = json.loads((tmp_path / (how + ".json")).read_text())
    assert seen["warm"] == seen["fresh"]
    assert seen["warm"]["path0"] == str(clone)
    assert seen["warm"]["own_session"] and seen["warm"]["stdin_is_null"]
    assert seen["warm"]["argv0"] == os.path.join("pytest", "__main__.py")
    assert seen["warm"]["ours"] == []


def test_each_job_starts_from_the_zygote_not_from_the_job_before(warm, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "test_leaves.py").write_text(
        "import pytest, sys, os\n\n"
        "def test_leaves_traces():\n"
        "    pytest.left_by_a_job = True\n"
        "    sys.modules['left_by_a_job'] = sys\n"
        "    os.environ['LEFT_BY_A_JOB'] = '1'\n")
    assert run_warm(warm, clone, tmp_path / "first.log") == (0, None)
    (clone / "test_leaves.py").unlink()
    (clone / "test_finds.py").write_text(
        "import pytest, sys, os\n\n"
        "def test_finds_none():\n"
        "    assert not hasattr(pytest, 'left_by_a_job')\n"
        "    assert 'left_by_a_job' not in sys.modules\n"
        "    assert 'LEFT_BY_A_JOB' not in os.environ\n")
    status, why = run_warm(warm, clone, tmp_path / "second.log")
    assert (status, why) == (0, None), (tmp_path / "second.log").read_text()


def test_exit_status_output_and_atexit_are_an_interpreters(warm, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    marker = tmp_path / "atexit-ran"
    (clone / "test_fails.py").write_text(
        "import atexit\n\n"
        "atexit.register(lambda: open(%r, 'w').close())\n\n"
        "def test_fails():\n"
        "    print('SOME OUTPUT')\n"
        "    assert 1 + 1 == 3\n" % str(marker))
    output = tmp_path / "out.log"
    assert run_warm(warm, clone, output, args=[*PYTEST_ARGS, "-s"]) == (1, None)
    assert marker.exists()
    text = output.read_text()
    assert "SOME OUTPUT" in text and "1 failed" in text
    (clone / "test_fails.py").write_text("import pytest\n")  # collects nothing: pytest's status 5
    assert run_warm(warm, clone, output) == (5, None)


def test_time_limit_kills_the_job_and_what_it_started(warm, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    pid_file = tmp_path / "sleeper.pid"
    (clone / "test_hangs.py").write_text(
        "import subprocess, time\n\n"
        "def test_hangs():\n"
        "    sleeper = subprocess.Popen(['sleep', '600'])\n"
        "    open(%r, 'w').write(str(sleeper.pid))\n"
        "    time.sleep(600)\n" % str(pid_file))
    status, why = run_warm(warm, clone, tmp_path / "out.log", timeout=3)
    assert why == "timeout" and status < 0
    sleeper = int(pid_file.read_text())
    wait_until(lambda: not alive(sleeper), 10, message="the test's own child killed")
    # The zygote is still there for the next job.
    (clone / "test_hangs.py").write_text(PASSING_TEST)
    assert run_warm(warm, clone, tmp_path / "next.log") == (0, None)


def test_what_a_job_started_in_other_sessions_is_killed_before_the_zygote_answers(warm, tmp_path, strays):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "test_escapes.py").write_text(
        "import os, subprocess, sys, time\n\n"
        "STRAY = [sys.executable, '-c', %r, %r]\n\n"
        "def test_escapes():\n"
        "    subprocess.Popen(STRAY, start_new_session=True)\n"
        "    if os.fork() == 0:  # a daemon: in a session of its own, and its parent gone\n"
        "        try:\n"
        "            os.setsid()\n"
        "            if os.fork() == 0:\n"
        "                os.execv(STRAY[0], STRAY)\n"
        "        finally:\n"
        "            os._exit(0)\n"
        "    os.wait()\n"
        "    deadline = time.monotonic() + 30\n"
        "    while len(os.listdir(STRAY[-1])) < 2 and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n" % (STRAY_CODE, str(strays)))
    zygote = warm.process.pid
    assert run_warm(warm, clone, tmp_path / "out.log") == (0, None), (tmp_path / "out.log").read_text()
    pids = stray_pids(strays)
    assert len(pids) == 2
    # Killed and reaped before the answer: no wait needed.
    assert [pid for pid in pids if not gone(pid)] == []
    assert (warm.leftovers, warm.stuck) == (2, [])
    (clone / "test_escapes.py").write_text(PASSING_TEST)
    assert run_warm(warm, clone, tmp_path / "next.log") == (0, None)
    assert warm.process.pid == zygote and warm.leftovers == 0


def test_a_zygote_that_dies_mid_job_is_an_error_not_a_hang(warm, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(600)\n")
    pid = warm.spawn(str(clone), PYTEST_ARGS, base_env(), str(tmp_path / "out.log"))
    try:
        os.kill(warm.process.pid, signal.SIGKILL)
        with pytest.raises(WarmPytestError, match="exited"):
            warm.wait(pid, timeout=30)
        assert not warm.running
        with pytest.raises(WarmPytestError):
            warm.spawn(str(clone), PYTEST_ARGS, base_env(), str(tmp_path / "out.log"))
    finally:
        processes.signal_group(pid, signal.SIGKILL)


def written_a_while_ago(*paths) -> None:
    """What was written just before a zygote starts counts as changed for it (it may
    have been imported before it was written): these were written well before. Their
    change time (which os.utime sets to now) must also be older than the zygote's
    start, by more than the lag of file times the zygote allows for."""
    for path in paths:
        os.utime(path, (time.time() - 60, time.time() - 60))
    changed = max(os.stat(path).st_ctime_ns for path in paths)
    while time.time_ns() <= changed + 2 * _FILE_TIME_LAG_NS:
        time.sleep(0.01)


def test_the_zygote_knows_when_what_it_imported_has_changed(tmp_path, runner_signals):
    site = tmp_path / "site"
    site.mkdir()
    custom = site / "sitecustomize.py"  # imported by every interpreter that has site on its path
    custom.write_text("MARK = 'one'\n")
    written_a_while_ago(custom, site)
    zygote = WarmPytest(sys.executable, dict(base_env(), PYTHONPATH=str(site)), str(tmp_path), hash_seed=1)
    zygote.start()
    zygote.wait_ready()
    try:
        assert zygote.changed_source() is None
        (tmp_path / "elsewhere.py").write_text("")
        assert zygote.changed_source() is None, "only what its imports came from counts"
        custom.write_text("MARK = 'second'\n")  # in place, as an editor may
        assert zygote.changed_source() == str(custom)
        zygote.start()
        zygote.wait_ready()
        assert zygote.changed_source() == str(custom), "written just before it started: it may have read the old one"
        written_a_while_ago(custom, site)
        zygote.start()
        zygote.wait_ready()
        assert zygote.changed_source() is None
        (site / "newly_installed.py").write_text("")  # as pip adds a package
        assert zygote.changed_source() == str(site)
        assert zygote.changed_source(folders=False) is None, "a new package: only its folder changed"
    finally:
        pid = zygote.process.pid
        zygote.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


SITE_PROBE = "import sitecustomize\n\ndef test_site():\n    open(%r, 'w').write(sitecustomize.MARK)\n"


def test_a_job_never_runs_what_was_imported_before_it_changed(ci, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("MARK = 'one'\n")
    written_a_while_ago(site / "sitecustomize.py", site)
    ci.start_dispatcher()
    runner = ci.start_runner(*JOBS_AS_RUNNER, "--job-env", "PYTHONPATH", launched_by=("env", "PYTHONPATH=%s" % site))
    mark = tmp_path / "mark"
    first = ci.upstream.commit({"test_site.py": SITE_PROBE % str(mark)}, "site probe")
    dispatch(ci, first)
    assert ci.wait_result(first)["status"] == "passed"
    assert mark.read_text() == "one"
    runner.wait_for_log(r"commit %s attempt \d+: forked from a warm pytest" % first)

    (site / "sitecustomize.py").write_text("MARK = 'second'\n")  # as an upgrade would change pytest
    os.utime(site / "sitecustomize.py", (time.time() - 30, time.time() - 30))  # as long before the next zygote
    second = ci.upstream.commit({"test_site.py": SITE_PROBE % str(mark) + "\n"}, "site probe again")
    dispatch(ci, second)
    assert ci.wait_result(second)["status"] == "passed"
    assert mark.read_text() == "second", "what a fresh interpreter would have imported"
    runner.wait_for_log(r"sitecustomize\.py changed since the warm pytest started: this job starts a fresh Python")
    # The next job forks again, from a warm pytest that imported the new one.
    third = ci.upstream.commit({"test_site.py": SITE_PROBE % str(mark) + "\n\n"}, "site probe once more")
    dispatch(ci, third)
    assert ci.wait_result(third)["status"] == "passed"
    assert mark.read_text() == "second"
    runner.wait_for_log(r"commit %s attempt \d+: forked from a warm pytest" % third)


def test_a_job_waits_for_its_threads_as_an_interpreter_does(warm, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    marker = tmp_path / "thread-finished"
    (clone / "test_thread.py").write_text(
        "import threading, time\n\n"
        "def test_leaves_a_thread_running():\n"
        "    def finish_later():\n"
        "        time.sleep(0.5)\n"
        "        open(%r, 'w').close()\n"
        "    threading.Thread(target=finish_later).start()\n" % str(marker))
    assert run_warm(warm, clone, tmp_path / "out.log") == (0, None)
    assert marker.exists(), "a program ends after its last non-daemon thread"


IMPORTS_FROM_SRC = "import mymod\n\ndef test_finds_src():\n    assert mymod.FOUND\n"


@pytest.mark.parametrize("how", ["warm", "fresh"])
def test_a_relative_pythonpath_means_the_clone_as_for_a_fresh_interpreter(ci, how):
    ci.start_dispatcher()
    ci.start_runner(*JOBS_AS_RUNNER, *(["--no-warm-pytest"] if how == "fresh" else []), "--job-env", "PYTHONPATH",
                    launched_by=("env", "PYTHONPATH=src"))
    commit = ci.upstream.commit({"src/mymod.py": "FOUND = True\n", "test_src.py": IMPORTS_FROM_SRC}, "src layout")
    dispatch(ci, commit)
    assert ci.wait_result(commit)["status"] == "passed", (ci.results_dir / (commit + ".log")).read_text()


def test_the_zygote_exits_when_its_input_closes(tmp_path):
    zygote = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(runner.__file__), "warm_pytest.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=base_env(), cwd=tmp_path)
    try:
        assert json.loads(zygote.stdout.readline())["ready"] is True
        zygote.stdin.write(b"not json\n")
        zygote.stdin.flush()
        assert "bad request" in json.loads(zygote.stdout.readline())["error"]
        zygote.stdin.close()
        assert zygote.wait(timeout=10) == 0
    finally:
        zygote.kill()
        zygote.wait()
        zygote.stdout.close()


# --- in the runner ---------------------------------------------------------------------------

def dispatch(ci, commit: str) -> None:
    answer = communicate(parse_address(ci.address), request("dispatch", commit=commit))
    assert answer.verb == "OK", answer


#: Writes the pid and the command line of the process that started the tests.
PARENT_PROBE = ("import os\n\ndef test_parent():\n    parent = os.getppid()\n"
                "    command = open('/proc/%%d/cmdline' %% parent).read().replace('\\0', ' ')\n"
                "    open(%r, 'w').write('%%d %%s' %% (parent, command))\n")


def test_the_runner_forks_its_warm_pytest_unless_told_not_to(ci, tmp_path):
    ci.start_dispatcher()
    warm_runner = ci.start_runner(*JOBS_AS_RUNNER)
    probe = tmp_path / "parent"
    commit = ci.upstream.commit({"test_parent.py": PARENT_PROBE % str(probe)}, "parent probe")
    dispatch(ci, commit)
    assert ci.wait_result(commit)["status"] == "passed"
    warm_runner.wait_for_log(r"commit %s attempt \d+: forked from a warm pytest \(pytest [\d.]+\)" % commit)
    parent, command = probe.read_text().split(" ", 1)
    assert int(parent) != warm_runner.pid and "warm_pytest.py" in command

    warm_runner.terminate()
    cold_runner = ci.start_runner(*JOBS_AS_RUNNER, "--no-warm-pytest")
    again = ci.upstream.commit({"test_parent.py": PARENT_PROBE % str(probe) + "\n"}, "parent probe again")
    dispatch(ci, again)
    assert ci.wait_result(again)["status"] == "passed"
    assert int(probe.read_text().split(" ", 1)[0]) == cold_runner.pid
    assert "every job starts a fresh Python (no warm pytest: --no-warm-pytest)" in cold_runner.log()
    assert "forked from a warm pytest" not in cold_runner.log()


SIGNALS_PROBE = """import signal

def test_signals_are_as_a_fresh_interpreter_has_them():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGQUIT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
"""


@pytest.mark.parametrize("how", ["warm", "fresh"])
def test_a_runner_started_with_signals_ignored_does_not_pass_them_on(ci, how):
    ci.start_dispatcher()
    # What nohup, or a shell without job control running it with &, would do.
    ignoring = ("sh", "-c", 'trap "" HUP INT QUIT; exec "$@"', "sh")
    runner = ci.start_runner(*JOBS_AS_RUNNER, *(["--no-warm-pytest"] if how == "fresh" else []), launched_by=ignoring)
    assert open("/proc/%d/cmdline" % runner.pid).read().split("\0")[1].endswith("test_runner.py"), "exec'd"
    commit = ci.upstream.commit({"test_signals.py": SIGNALS_PROBE}, "probe signals")
    dispatch(ci, commit)
    assert ci.wait_result(commit)["status"] == "passed", (ci.results_dir / (commit + ".log")).read_text()
    os.kill(runner.pid, signal.SIGHUP)
    runner.wait_for_log(r"SIGHUP received: ignored")
    assert runner.popen.poll() is None, "still ignores a hang-up, as it was started to"


def zygotes_of(runner) -> list[int]:
    return [pid for pid in descendants(runner.pid) if "warm_pytest" in open("/proc/%d/cmdline" % pid).read()]


def test_a_killed_warm_pytest_is_started_again_and_loses_no_verdict(ci):
    ci.start_dispatcher()
    runner = ci.start_runner(*JOBS_AS_RUNNER)
    zygotes = wait_until(lambda: zygotes_of(runner), 20, message="the warm pytest started ahead")
    assert len(zygotes) == 1
    os.kill(zygotes[0], signal.SIGKILL)
    passing = ci.upstream.commit({"test_ok.py": PASSING_TEST}, "passes")
    dispatch(ci, passing)
    assert ci.wait_result(passing)["status"] == "passed"
    runner.wait_for_log(r"warm pytest exited .*; this job runs in a fresh Python")
    failing = ci.upstream.commit({"test_ok.py": "def test_no():\n    assert False\n"}, "fails")
    dispatch(ci, failing)
    assert ci.wait_result(failing)["status"] == "failed"
    runner.wait_for_log(r"commit %s attempt \d+: forked from a warm pytest" % failing)


def test_every_job_gets_a_hash_seed_of_its_own_and_reports_it(ci, tmp_path):
    """As a fresh interpreter would: a random PYTHONHASHSEED per job, warm or not, in
    the result so that a failure can be run again the same way."""
    ci.start_dispatcher()
    ci.start_runner(*JOBS_AS_RUNNER)
    seen = tmp_path / "seeds"
    probe = ("import os, sys\n\ndef test_seed():\n    with open(%r, 'a') as handle:\n"
             "        handle.write('%%s %%d\\n' %% (os.environ['PYTHONHASHSEED'], sys.flags.hash_randomization))\n"
             "    assert hash('a') == hash('a')\n" % str(seen))
    results = []
    for index in range(4):
        commit = ci.upstream.commit({"test_seed.py": probe + "\n" * index}, "seed probe %d" % index)
        dispatch(ci, commit)
        results.append(ci.wait_result(commit))
    reported = [result["hash_seed"] for result in results]
    in_tests = [int(line.split()[0]) for line in seen.read_text().splitlines()]
    assert reported == in_tests
    assert len(set(reported)) == 4, "a seed of its own for each job"
    assert all(0 <= seed <= 4294967295 for seed in reported)
