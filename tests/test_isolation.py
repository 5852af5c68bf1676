"""A job never reaches the runner's keys (isolation.py): a hostile commit's tests look
for the key everywhere a job could, and use whatever they find to forge a verdict.

The runners here run as root, as in CI: their jobs run as nobody, in a bubblewrap
sandbox where it works, each in a cgroup of its own. One case runs the runner itself
as an unprivileged user of its own, where only the sandbox stands between the job and
the key. A control case runs the same probe with the key in reach, to show that it
would find the key and that a forged ``results passed`` would then be recorded.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PASSING_TEST, ROOT, RUNNER_ENV, WAITS_FOR_FLAG_TEST, make_keys, module_argv, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs runners as root, as CI does")

#: What a key looks like, so that a probe can recognise it wherever it finds it: the
#: shared secret of these tests, or a named key as ``ci-ctl key add`` prints it.
KEY_PATTERN = r"ci-secret-[0-9a-f]{32}|ci-key:[A-Za-z0-9._:@-]+:[0-9a-f]{64}"

#: A commit's test that looks for the key everywhere a job can look, and forges a
#: verdict for the victim's attempts with every key it finds.
PROBE_TEST = r'''
import json, os, re, pathlib
from commit_ci.client import communicate
from commit_ci.result import Result
from commit_ci.security import Authenticator, Security, key_from_secret

KEY = re.compile(rb"%s")
CONFIG = json.loads(pathlib.Path(__file__).with_name("probe.json").read_text())


def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 20)
    except OSError:
        return b""


def places():
    yield "the environment", "\n".join("%%s=%%s" %% item for item in os.environ.items()).encode()
    for path in CONFIG["key_files"]:
        yield "the key file", read(path)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for name in ("environ", "cmdline"):
                yield "/proc/%%s/%%s" %% (pid, name), read("/proc/%%s/%%s" %% (pid, name))
    for top in CONFIG["folders"]:
        for count, (folder, _subfolders, files) in enumerate(os.walk(top)):
            if count > 5000:
                break
            for name in files:
                yield os.path.join(folder, name), read(os.path.join(folder, name))


def test_no_key_in_reach():
    found, looked = {}, 0
    for where, data in places():
        looked += 1
        for key in KEY.findall(data):
            found.setdefault(key, where)
    forged = []
    for key in found:
        security = Security(auth=Authenticator(key_from_secret(key)))
        for attempt in (1, 2, 3):
            message = Result(CONFIG["victim"], "passed", attempt=attempt).to_message()
            try:
                answer = communicate(tuple(CONFIG["dispatcher"]), message, security=security)
            except Exception:
                continue
            if answer.verb == "OK":
                forged.append(attempt)
    assert not found, "key found in %%s (of %%d places); forged results for attempts %%s" %% (
        sorted(set(found.values())), looked, forged)
''' % KEY_PATTERN

#: The victim: it runs until the probe is done (the flag), then fails.
VICTIM_TEST = WAITS_FOR_FLAG_TEST + "\n\ndef test_fails():\n    assert 1 + 1 == 3\n"


def ctl(address: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(module_argv("ctl", "--dispatcher-server", address, *args), capture_output=True,
                          text=True, timeout=60, env=env)


def make_key(path: Path, owner: str = "root") -> str:
    key = "ci-secret-" + secrets.token_hex(16)
    path.write_text(key + "\n")
    entry = pwd.getpwnam(owner)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o600)
    return key


def victim_and_probe(upstream, tmp_path, address: str, key_files: list[Path], state_dirs: list[str],
                     folders: list[str]) -> tuple[str, str, Path]:
    """Commit the victim (which fails once ``flag`` exists), then the probe."""
    flag = tmp_path / "probe-done"
    victim = upstream.commit({"test_victim.py": VICTIM_TEST % str(flag)}, "victim: fails, after a while")
    config = {"key_files": [str(path) for path in key_files], "dispatcher": ["127.0.0.1", int(address.rsplit(":", 1)[1])],
              "victim": victim, "folders": [*state_dirs, *folders]}
    probe = upstream.commit({"test_victim.py": None, "test_probe.py": PROBE_TEST, "probe.json": json.dumps(config)},
                            "probe: looks for the key and forges the victim's verdict")
    return victim, probe, flag


def run_victim_then_probe(ci, env: dict, victim: str, probe: str, flag: Path) -> tuple[dict, dict]:
    """Dispatch the victim, and once a runner is testing it, the probe (which the other
    runner takes); release the victim once the probe's verdict is in."""
    assert ctl(ci.address, "dispatch", victim, env=env).returncode == 0
    wait_until(lambda: any(re.search("commit %s attempt 1: testing" % victim, runner.log()) for runner in ci.runners),
               60, message="the victim's tests to start")
    assert ctl(ci.address, "dispatch", probe, env=env).returncode == 0
    probed = ci.wait_result(probe, timeout=120)
    flag.touch()
    return probed, ci.wait_result(victim, timeout=120)


def clone_parents(ci) -> list[str]:
    """The folders above the runners' clones, up to the test's own."""
    return [str(ci.folder), str(ci.folder.parent)]


@pytest.mark.parametrize("sandbox,keys", [("auto", "shared"), ("off", "shared"), ("auto", "per runner")])
def test_a_hostile_commit_finds_no_key_and_forges_nothing(ci, upstream, tmp_path, sandbox, keys):
    """Two runners as root; the probe runs on one while the other holds the victim's
    attempt. Each runner has its key in a file and in its environment (CI_SECRET)."""
    if keys == "shared":
        key_file = tmp_path / "key"
        runner_keys = {1: (key_file, make_key(key_file)), 2: (key_file, key_file.read_text().strip())}
        operator = runner_keys[1][1]
        dispatcher_options: tuple[str, ...] = ()
    else:
        keys_file, files = make_keys(tmp_path / "keys", {"runner1": "runner", "runner2": "runner", "ops": "operator"})
        runner_keys = {index: (files["runner%d" % index], files["runner%d" % index].read_text().strip())
                       for index in (1, 2)}
        operator = files["ops"].read_text().strip()
        dispatcher_options = ("--keys-file", str(keys_file))
    env = {**RUNNER_ENV, "CI_SECRET": operator}  # for ci-ctl
    ci.dispatcher = ci.processes.start("dispatcher", ci._dispatcher_argv(0, dispatcher_options),
                                       env=env if keys == "shared" else RUNNER_ENV)
    ci.port = int(ci.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    state_dirs = [str(ci.folder / ("runner%d-clone" % index) / ".git" / "ci_runner") for index in (1, 2)]
    victim, probe, flag = victim_and_probe(upstream, tmp_path, ci.address, [path for path, _ in runner_keys.values()],
                                           state_dirs, clone_parents(ci))
    for index, (key_file, key) in runner_keys.items():
        clone = upstream.clone(ci.folder / ("runner%d-clone" % index))
        runner = ci.processes.start("runner%d" % index, [
            sys.executable, str(ROOT / "test_runner.py"), "--host", "127.0.0.1", "--dispatcher-server", ci.address,
            "--secret-file", str(key_file), "--sandbox", sandbox, str(clone)], env={**RUNNER_ENV, "CI_SECRET": key})
        runner.wait_for_log(r"registered with dispatcher")
        ci.runners.append(runner)
    assert re.search(r"jobs run as nobody, %s" % ("in a bubblewrap sandbox" if sandbox == "auto" and shutil.which("bwrap")
                                                  else "without a sandbox"), ci.runners[0].log())

    probed, victimized = run_victim_then_probe(ci, env, victim, probe, flag)

    assert probed["status"] == "passed", ci.report(probe)
    assert victimized["status"] == "failed"
    assert victimized["attempts"] == 1


#: The account the runner that is not root runs as. Not nobody, the job user of the
#: root runners: their jobs could read its environment, key and all, from /proc,
#: without a sandbox (the probe of another test running meanwhile found it there).
NON_ROOT_RUNNER_USER = "daemon"


def test_a_runner_that_is_not_root_hides_its_key_in_the_sandbox(ci, upstream, tmp_path):
    """Run as an unprivileged user, the runner's jobs run as that user too: only the
    sandbox keeps them from its key file, its state folder and its /proc."""
    if not shutil.which("bwrap"):
        pytest.skip("needs bubblewrap") if not os.environ.get("CI") else pytest.fail("bubblewrap missing in CI")
    user = pwd.getpwnam(NON_ROOT_RUNNER_USER)
    dispatcher_key = tmp_path / "dispatcher-key"
    key = make_key(dispatcher_key)
    runner_key = tmp_path / "runner-key"
    runner_key.write_text(key + "\n")
    os.chown(runner_key, user.pw_uid, user.pw_gid)
    runner_key.chmod(0o600)
    env = {**RUNNER_ENV, "CI_SECRET": key}
    ci.dispatcher = ci.processes.start("dispatcher", ci._dispatcher_argv(0, ("--secret-file", str(dispatcher_key))),
                                       env=RUNNER_ENV)
    ci.port = int(ci.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    state_dirs = [str(ci.folder / ("runner%d-clone" % index) / ".git" / "ci_runner") for index in (1, 2)]
    victim, probe, flag = victim_and_probe(upstream, tmp_path, ci.address, [runner_key], state_dirs,
                                           clone_parents(ci))
    for index in (1, 2):
        clone = upstream.clone(ci.folder / ("runner%d-clone" % index))
        subprocess.run(["chown", "-R", "%s:" % NON_ROOT_RUNNER_USER, str(clone)], check=True)
        runner = ci.processes.start("runner%d" % index, [
            "setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--clear-groups",
            sys.executable, str(ROOT / "test_runner.py"), "--host", "127.0.0.1", "--dispatcher-server", ci.address,
            "--secret-file", str(runner_key), "--sandbox", "on", "--no-environments", str(clone)],
            env={**env, "HOME": str(tmp_path)})
        runner.wait_for_log(r"registered with dispatcher")
        ci.runners.append(runner)
    assert "jobs run as this runner's user, in a bubblewrap sandbox" in ci.runners[0].log()

    probed, victimized = run_victim_then_probe(ci, env, victim, probe, flag)

    assert probed["status"] == "passed", ci.report(probe)
    assert victimized["status"] == "failed"


def test_the_probe_finds_a_key_in_reach_and_its_forgery_is_recorded(ci, upstream, tmp_path):
    """The control: the same probe, run by hand with the key in its environment and its
    file readable, finds the key, and the verdict it forges is the one recorded."""
    key_file = tmp_path / "key"
    key = make_key(key_file)
    env = {**RUNNER_ENV, "CI_SECRET": key}
    ci.dispatcher = ci.processes.start("dispatcher", ci._dispatcher_argv(0, ()), env=env)
    ci.port = int(ci.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    victim, probe, flag = victim_and_probe(upstream, tmp_path, ci.address, [key_file], [], [])
    clone = upstream.clone(ci.folder / "runner1-clone")
    runner = ci.processes.start("runner1", [
        sys.executable, str(ROOT / "test_runner.py"), "--host", "127.0.0.1", "--dispatcher-server", ci.address,
        "--secret-file", str(key_file), str(clone)], env=env)
    runner.wait_for_log(r"registered with dispatcher")
    ci.runners.append(runner)
    assert ctl(ci.address, "dispatch", victim, env=env).returncode == 0
    runner.wait_for_log(r"commit %s attempt 1: testing" % victim)

    checkout = upstream.clone(tmp_path / "by-hand")
    subprocess.run(["git", "checkout", "--quiet", probe], cwd=checkout, check=True)
    by_hand = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "test_probe.py"], cwd=checkout,
                             env=env, capture_output=True, text=True, timeout=120)
    flag.touch()

    assert by_hand.returncode == 1
    # (Keys of other CI installations on the machine may be found too, in /proc.)
    assert re.search(r"key found in \[[^]]*'the environment'", by_hand.stdout), by_hand.stdout
    assert "forged results for attempts [1]" in by_hand.stdout
    assert ci.wait_result(victim)["status"] == "passed"  # the forgery, recorded


ENVIRONMENT_TEST = """import json, os

def test_dump():
    assert False, "ENV=" + json.dumps(dict(os.environ))
"""


def test_jobs_get_only_the_documented_variables(ci, upstream, tmp_path):
    env = {**RUNNER_ENV, "CI_SECRET": "ci-secret-" + "0" * 32, "RUNNER_ONLY": "1", "PASSED_ON": "yes",
           "PIP_INDEX_URL": "https://user:password@index.example/simple", "LC_TIME": "C", "TZ": "UTC"}
    ci.dispatcher = ci.processes.start("dispatcher", ci._dispatcher_argv(0, ()), env=env)
    ci.port = int(ci.dispatcher.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    clone = upstream.clone(ci.folder / "runner1-clone")
    runner = ci.processes.start("runner1", [
        sys.executable, str(ROOT / "test_runner.py"), "--host", "127.0.0.1", "--dispatcher-server", ci.address,
        "--job-env", "PASSED_ON", "--job-env", "CI_SECRET", str(clone)], env=env)
    runner.wait_for_log(r"registered with dispatcher")
    sha = upstream.commit({"test_env.py": ENVIRONMENT_TEST}, "dump the environment")
    assert ctl(ci.address, "dispatch", sha, env=env).returncode == 0

    assert ci.wait_result(sha)["status"] == "failed"  # to show what it saw
    seen = json.loads(re.search(r"ENV=(\{.*\})", ci.report(sha)).group(1))

    for name in ("CI_SECRET", "RUNNER_ONLY", "PIP_INDEX_URL"):
        assert name not in seen
    assert seen["PASSED_ON"] == "yes" and seen["LC_TIME"] == "C" and seen["TZ"] == "UTC"
    assert seen["PATH"] == env["PATH"]
    assert seen["USER"] == seen["LOGNAME"] == "nobody"
    assert re.fullmatch(r"/tmp/commit-ci-job-\d+-\w+/job/home", seen["HOME"])
    assert seen["CI_COMMIT"] == sha


WORK_TREE_TEST = """import os, pathlib, pytest, subprocess

def test_the_work_tree_is_the_jobs_and_git_is_not():
    pathlib.Path("made-at-the-top.txt").write_text("ok")
    pathlib.Path("src/made-inside.txt").write_text("ok")
    pathlib.Path("src/module.py").write_text("changed = True")
    with pytest.raises(PermissionError):
        open(".git/config", "a")
    with pytest.raises(OSError):
        os.rename(".git", "moved")
    # A git folder of its own in the work tree, pointing anywhere: gone before the next checkout.
    pathlib.Path("src/.git").write_text("gitdir: /tmp/elsewhere")
    assert subprocess.run(["git", "log", "-1", "--format=%H"], capture_output=True, text=True).stdout.strip()


def test_no_pytest_started_ahead_is_within_reach():
    # One running as this user beside the job, in its reach, could be changed by it, and
    # fork the next commit's tests. (This runner's: its warm_pytest.py, the one this test
    # was forked from. The one started for the next job runs in a pid namespace of its
    # own. Other installations on the machine with the same job user are the
    # documented exception.)
    ancestors, pid = {}, os.getpid()
    while pid > 0:  # up to the init of its sandbox's pid namespace, whose parent is 0
        ancestors[pid] = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\\0")
        pid = int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[1])
    ours = {word for words in ancestors.values() for word in words if word.endswith(b"warm_pytest.py")}
    assert ours, "forked from a warm pytest"
    others = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(entry) not in ancestors and os.stat("/proc/" + entry).st_uid == os.getuid():
                others.append(open("/proc/%s/cmdline" % entry, "rb").read().split(b"\\0"))
        except OSError:
            pass
    assert not [words for words in others if ours & set(words)]
"""

NEXT_TEST = """import pathlib

def test_nothing_of_the_job_before_is_left():
    assert not pathlib.Path("src/.git").exists()
    assert not pathlib.Path("made-at-the-top.txt").exists()
    assert pathlib.Path("src/module.py").read_text() == "changed = False"
"""


def test_the_job_user_writes_the_work_tree_but_not_git(ci, upstream):
    ci.start_dispatcher()
    ci.start_runner()
    ci.start_observer()
    first = upstream.commit({"src/module.py": "changed = False", "test_tree.py": WORK_TREE_TEST}, "a job that writes")
    second = upstream.commit({"test_tree.py": None, "test_next.py": NEXT_TEST}, "the next job")

    assert ci.wait_result(first)["status"] == "passed", ci.report(first)
    assert ci.wait_result(second)["status"] == "passed", ci.report(second)
    # As nobody, in the sandbox: still forked from a pytest started ahead (frozen while
    # the runner checked the commit out).
    ci.runners[0].wait_for_log(r"commit %s attempt \d+: forked from a warm pytest" % second)
    clone = ci.folder / "runner1-clone"
    assert (clone / ".git").stat().st_uid == 0
    assert oct((clone / ".git" / "ci_runner").stat().st_mode & 0o777) == "0o700"


CGROUP_TEST = """import pathlib, subprocess, sys

def test_cgroup():
    # A daemon in a session of its own, which the job's end must take with it.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "left-by-the-job"],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert False, "CGROUP=" + pathlib.Path("/proc/self/cgroup").read_text().replace(chr(10), " ")
"""


def left_by_the_job() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"left-by-the-job" in open("/proc/%s/cmdline" % entry, "rb").read():
                found.append(int(entry))
        except OSError:
            pass
    return found

MEMORY_HOG_TEST = """def test_hog():
    hog = bytearray(512 * 1024 * 1024)
    for offset in range(0, len(hog), 4096):
        hog[offset] = 1
"""


def test_each_job_has_a_cgroup_of_its_own_and_a_memory_limit(ci, upstream):
    ci.start_dispatcher()
    try:
        runner = ci.start_runner("--job-memory", "128M")
    except AssertionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no cgroup memory controller here")
    pid = runner.pid
    ci.start_observer()
    first = upstream.commit({"test_cgroup.py": CGROUP_TEST}, "where am I")
    assert ci.wait_result(first)["status"] == "failed"  # to show where it ran
    assert re.search(r"CGROUP=.*0::/\S*commit-ci-%d/job-\d+ " % pid, ci.report(first))
    assert left_by_the_job() == []
    hog = upstream.commit({"test_cgroup.py": None, "test_hog.py": MEMORY_HOG_TEST}, "takes too much memory")
    result = ci.wait_result(hog)
    assert result["status"] == "failed"
    assert "out of memory" in result["reason"]
    after = upstream.commit({"test_hog.py": None, "test_ok.py": PASSING_TEST}, "fine again")
    assert ci.wait_result(after)["status"] == "passed"
    # Each job's cgroup is gone with it; what is left is the warm pytest's started for
    # the next job (once it has started: its cgroup is made first).
    own = [line for line in open("/proc/%d/cgroup" % pid).read().splitlines() if line.startswith("0::")]
    folder = Path("/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup")
    jobs = folder / own[0][3:].lstrip("/") / ("commit-ci-%d" % pid)

    def only_a_warm_pytest_is_left():
        cgroups = [entry for entry in jobs.iterdir() if entry.is_dir()]
        members = [member for cgroup in cgroups for member in (cgroup / "cgroup.procs").read_text().split()]
        try:
            commands = [Path("/proc/%s/cmdline" % member).read_bytes() for member in members]
        except FileNotFoundError:
            return False  # ended meanwhile
        return len(cgroups) == 1 and commands and all(b"warm_pytest" in command for command in commands)

    wait_until(only_a_warm_pytest_is_left, 20, message="only the next job's warm pytest to be left")


def test_a_runner_refuses_a_key_file_its_jobs_could_read(ci, upstream, tmp_path):
    ci.start_dispatcher()
    key_file = tmp_path / "key"
    key_file.write_text("ci-secret-" + "1" * 32)
    key_file.chmod(0o644)
    clone = upstream.clone(ci.folder / "runner1-clone")
    done = subprocess.run([sys.executable, str(ROOT / "test_runner.py"), "--dispatcher-server", ci.address,
                           "--secret-file", str(key_file), "--sandbox", "off", str(clone)],
                          capture_output=True, text=True, timeout=60, env=RUNNER_ENV)
    assert done.returncode == 2
    assert "the job user nobody could read the key file %s" % key_file in done.stderr
    unknown = subprocess.run([sys.executable, str(ROOT / "test_runner.py"), "--dispatcher-server", ci.address,
                              "--job-user", "no-such-user-here", str(clone)],
                             capture_output=True, text=True, timeout=60, env=RUNNER_ENV)
    assert unknown.returncode == 2 and "--job-user no-such-user-here: no such user" in unknown.stderr



def test_the_work_tree_is_handed_over_and_taken_back_without_following_links(tmp_path):
    """What a job leaves in the work tree is the job user's: the runner, as root, changes
    owners and removes git folders there without ever following a link the job made."""
    from commit_ci.isolation import Isolation, JobUser, new_job_root

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("root's")
    tree = tmp_path / "tree"
    (tree / ".git").mkdir(parents=True)
    (tree / "src").mkdir()
    (tree / "src" / "module.py").write_text("x = 1")
    (tree / "src" / "link-to-file").symlink_to(outside / "precious")
    (tree / "link-to-folder").symlink_to(outside)
    (tree / "sub").mkdir()
    (tree / "sub" / ".git").write_text("gitdir: %s" % outside)
    (tree / "planted").mkdir()
    (tree / "planted" / ".git").symlink_to(outside)
    isolation = Isolation(new_job_root(), JobUser.named("nobody"))
    try:
        isolation.begin_job()
        isolation.hand_over(str(tree))
        nobody = pwd.getpwnam("nobody").pw_uid
        assert (tree / "src" / "module.py").stat().st_uid == nobody
        assert os.lstat(tree / "src" / "link-to-file").st_uid == nobody
        assert (outside / "precious").stat().st_uid == 0, "followed a link"
        assert outside.stat().st_uid == 0, "followed a link"
        assert (tree / ".git").stat().st_uid == 0 and (tree / "sub" / ".git").stat().st_uid == 0
        isolation.take_back(str(tree))
        assert list((tree / "sub").iterdir()) == [] and list((tree / "planted").iterdir()) == []
        assert (outside / "precious").read_text() == "root's", "followed a link"
        assert (tree / "src" / "module.py").exists() and (tree / ".git").is_dir()
    finally:
        isolation.close()


COUNTER = """import sys, time
path = sys.argv[1]
count = 0
while True:
    count += 1
    with open(path, "w") as handle:
        handle.write(str(count))
    time.sleep(0.001)
"""


def test_a_frozen_cgroup_makes_no_progress_until_thawed(tmp_path):
    """What keeps a warm pytest started ahead (a process of the job user) still while the
    runner checks the next commit out."""
    from commit_ci.isolation import Cgroups, Launch

    cgroups = Cgroups.find(None)
    if cgroups is None or cgroups.v2 is None:
        pytest.skip("no writable cgroup v2") if not os.environ.get("CI") else pytest.fail("no cgroup v2 in CI")
    counter = tmp_path / "count"
    cgroup = cgroups.new_job()
    launch = Launch(cgroup_files=cgroup.join_files())
    process = subprocess.Popen([sys.executable, "-c", COUNTER, str(counter)], **launch.popen_options())
    launch.started()
    try:
        wait_until(lambda: counter.exists() and counter.read_text(), 10, message="the counter to count")
        assert cgroup.freeze(True)
        still = counter.read_text()
        # Frozen, it cannot write: however long this takes, the count stays.
        for _ in range(20):
            assert counter.read_text() == still
            time.sleep(0.01)
        assert cgroup.freeze(False)
        wait_until(lambda: counter.read_text() != still, 10, message="the counter to count again")
    finally:
        process.kill()
        process.wait()
        cgroup.close()
        cgroups.close()


def test_a_warm_pytest_closed_unused_is_no_leftover_of_the_job(ci, upstream):
    # A commit with variables of its own cannot use the warm pytest started for the
    # runner's: it is closed, with the init of its sandbox, before the job's leftovers
    # are looked for (none), and the job starts a fresh Python.
    ci.start_dispatcher()
    runner = ci.start_runner()
    ci.start_observer()
    assert ci.wait_result(upstream.head())["status"] == "passed"
    own = upstream.commit({".commit-ci.toml": '[env]\nMODE = "ci"\n'}, "variables of its own")
    assert ci.wait_result(own)["status"] == "passed", ci.report(own)
    again = upstream.commit({"test_more.py": "def test_more():\n    pass\n"}, "and another")
    assert ci.wait_result(again)["status"] == "passed", ci.report(again)
    log = runner.log()
    assert not re.search(r"killed \d+ process", log), log
    assert re.search(r"commit %s attempt \d+: forked from a warm pytest" % again, log), log


#: Runs in a process of its own (a subreaper cannot stop being one): finds the
#: sandbox as a runner does at start, then prints the children it is left with.
SANDBOX_TRIAL_PROBE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from commit_ci.isolation import find_sandbox
from commit_ci.leftovers import _children, become_subreaper
assert become_subreaper()
assert find_sandbox("on", None, (), ()) is not None
print(json.dumps(sorted(_children())))
'''


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed")
def test_trying_the_sandbox_at_start_leaves_no_process_for_the_first_job_to_count():
    # The trial's sandbox init outlives bwrap and comes back to the runner, a
    # subreaper: left there, the first job's sweep counted it as a process its
    # checkout left running.
    done = subprocess.run([sys.executable, "-c", SANDBOX_TRIAL_PROBE, str(ROOT)], capture_output=True, text=True,
                          timeout=60, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
