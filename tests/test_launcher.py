"""The one-command launcher (launcher.py) and the installed console commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import urllib.request

import pytest

from conftest import PASSING_TEST, descendants, free_port, module_argv, wait_until


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal closed"])
def test_launcher_runs_everything_and_stops_cleanly(processes, upstream, tmp_path, stop_signal):
    results = tmp_path / "results"
    http_port = free_port()
    launcher = processes.start(
        "ci-local",
        module_argv("launcher", "--port", str(free_port()), "--http-port", str(http_port), "--runners", "2",
                    "--work-dir", str(tmp_path / "work"), "--results-dir", str(results), "--interval", "0.2",
                    str(upstream.path)),
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    first = upstream.head()
    wait_until(lambda: (results / (first + ".json")).exists(), timeout=60, message="first result")
    second = upstream.commit({"test_two.py": PASSING_TEST.replace("passes", "also_passes")}, "second")
    wait_until(lambda: (results / (second + ".json")).exists(), timeout=60, message="second result")
    assert json.loads((results / (second + ".json")).read_text())["status"] == "passed"

    daemons = descendants(launcher.pid)
    assert len(daemons) >= 4, "dispatcher, two runners and an observer"
    for name in ("dispatcher", "runner-1", "runner-2", "observer"):
        log = (tmp_path / "work" / "logs" / (name + ".log")).read_text()
        assert " INFO " in log, "each daemon logs to its own file"
    # A compact view of the system, not the daemons' interleaved logs.
    launcher.wait_for_log(r"done     %s  passed" % second[:12])
    output = launcher.log()
    assert re.search(r"running  %s on runner-[12] \(attempt \d+\)" % second[:12], output)
    assert " INFO " not in output
    # The live page, where the launcher says it is.
    assert "live results page: http://127.0.0.1:%d/" % http_port in output

    def page() -> str:
        with urllib.request.urlopen("http://127.0.0.1:%d/" % http_port, timeout=10) as answer:
            return answer.read().decode("utf-8")

    wait_until(lambda: second[:12] in page(), timeout=30, message="the second commit on the page")

    launcher.popen.send_signal(stop_signal)
    assert launcher.popen.wait(timeout=60) == 0
    assert "ci-local: stopped" in launcher.log()
    for pid in daemons:
        assert not os.path.exists("/proc/%d" % pid) or _is_zombie(pid), "daemon %d left running" % pid


def _is_zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_line_view_shows_the_start_of_a_job_that_ran_between_two_looks(ci, upstream, capsys):
    from commit_ci import ctl, launcher
    from commit_ci.security import Security
    from commit_ci.wire import parse_address

    ci.start_dispatcher()
    ci.start_runner("--name", "quick")
    view = launcher.LiveView(ctl.Client(parse_address(ci.address), Security()), interactive=False)
    view.refresh([])
    sha = upstream.commit({"test_two.py": PASSING_TEST.replace("passes", "also_passes")}, "second")
    assert subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address,
                           "dispatch", sha), capture_output=True, timeout=60).returncode == 0
    ci.wait_result(sha)
    view.refresh([])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"running  %s on quick \(attempt \d+\)" % sha[:12], lines[0]), lines
    assert lines[1].startswith("done     %s  passed" % sha[:12]), lines
    view.refresh([])
    assert capsys.readouterr().out == "", "each change is shown once"
    restarted = launcher.LiveView(view.client, interactive=False)
    restarted.refresh([])
    restarted.refresh([])
    assert capsys.readouterr().out == "", "results from before a view started are not news"


def test_line_view_shows_each_shard_of_a_sharded_commit_where_it_runs(capsys):
    from commit_ci import ctl, launcher
    from commit_ci.security import Security

    view = launcher.LiveView(ctl.Client(("127.0.0.1", 9), Security()), interactive=False)
    sha = "ab" * 20
    shards = [{"shard": 1, "shards": 2, "attempt": 11, "runner": "runner-1"},
              {"shard": 2, "shards": 2, "attempt": 12, "runner": "runner-2"}]
    running = {"commit": sha, "attempt": 12, "runner": "runner-2", "started_at": None, "shards": shards}
    assert view._changes({"queued": [], "running": [running]}, []) == [
        "running  %s shard 1 of 2 on runner-1 (attempt 11)" % sha[:12],
        "running  %s shard 2 of 2 on runner-2 (attempt 12)" % sha[:12]]
    again = dict(running, attempt=13, runner="runner-1", shards=[dict(shards[1], attempt=13, runner="runner-1")])
    assert view._changes({"queued": [], "running": [again]}, []) == [
        "running  %s shard 2 of 2 on runner-1 (attempt 13)" % sha[:12]], "a shard run again is news, once"


def test_launcher_refuses_a_work_dir_cloned_from_elsewhere(upstream, tmp_path):
    work = tmp_path / "work"
    other = tmp_path / "other"
    subprocess.run(["git", "init", "--quiet", str(other)], check=True)
    subprocess.run(["git", "clone", "--quiet", str(other), str(work / "observer")], check=True, capture_output=True)
    done = subprocess.run(
        module_argv("launcher", "--port", str(free_port()), "--http-port", "0", "--work-dir", str(work),
                    "--results-dir", str(tmp_path / "results"), str(upstream.path)),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "use another --work-dir" in done.stdout + done.stderr


def test_launcher_stops_and_says_so_when_its_observer_dies(processes, upstream, tmp_path):
    launcher = processes.start(
        "ci-local",
        module_argv("launcher", "--port", str(free_port()), "--http-port", "0", "--runners", "1",
                    "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), str(upstream.path)),
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    wait_until(lambda: (tmp_path / "results" / (upstream.head() + ".json")).exists(), timeout=60, message="result")
    daemons = descendants(launcher.pid)
    (observer,) = [pid for pid in daemons if b"commit_ci.observer import" in open("/proc/%d/cmdline" % pid, "rb").read()]
    os.kill(observer, signal.SIGKILL)
    assert launcher.popen.wait(timeout=60) == 1, "nothing more would be tested"
    assert re.search(r"observer exited with status -9; see \S+observer\.log", launcher.log())
    for pid in daemons:
        assert not os.path.exists("/proc/%d" % pid) or _is_zombie(pid), "daemon %d left running" % pid


def test_launcher_asks_for_a_branch_when_the_repository_has_none_checked_out(processes, upstream, tmp_path):
    subprocess.run(["git", "-C", str(upstream.path), "checkout", "--quiet", "--detach"], check=True)
    # On no branch at all (a clone would otherwise pick the branch HEAD matches).
    subprocess.run(["git", "-C", str(upstream.path), "commit", "--quiet", "--allow-empty", "-m", "nowhere"], check=True)
    # Through the fixture: if it did start its daemons, they are stopped with it.
    launcher = processes.start(
        "ci-local",
        module_argv("launcher", "--port", str(free_port()), "--http-port", "0", "--work-dir", str(tmp_path / "work"),
                    "--results-dir", str(tmp_path / "results"), str(upstream.path)),
    )
    assert launcher.popen.wait(timeout=60) == 2
    assert "say which branch to test with --branch" in launcher.log()


def test_default_work_dir_is_in_the_users_cache_not_under_this_project(monkeypatch, tmp_path):
    from commit_ci import launcher
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = launcher.default_work_dir("/srv/repos/my app")
    assert os.path.dirname(first) == str(tmp_path / "cache" / "ci-local")
    assert os.path.basename(first).startswith("my_app-")
    assert launcher.default_work_dir("/elsewhere/my app") != first, "one folder per repository"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert launcher.default_work_dir("/srv/x").startswith(os.path.join(os.path.expanduser("~"), ".cache", "ci-local"))


@pytest.mark.parametrize("command", ["ci-dispatcher", "ci-runner", "ci-observer", "ci-local", "ci-ctl", "ci-trigger"])
def test_console_commands_are_installed(command):
    scripts = sysconfig.get_path("scripts")
    path = os.path.join(scripts, command)
    if not os.path.exists(path):
        if os.environ.get("CI_REQUIRE_INSTALLED"):
            pytest.fail("%s is not installed in %s" % (command, scripts))
        pytest.skip("project not installed in this interpreter (./run_tests.sh installs it)")
    done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "usage: %s" % command in done.stdout
    # The installed copy finds its shell scripts.
    probe = subprocess.run(
        [os.path.join(scripts, "python"), "-c", "from commit_ci.git_scripts import script_path; print(script_path('test_runner_script.sh'))"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert probe.returncode == 0 and os.path.exists(probe.stdout.strip())
    assert shutil.which("bash")
