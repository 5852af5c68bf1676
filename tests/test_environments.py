"""Per-commit environments (environments.py, project_config.py, the executor): a
commit that is a Python project is tested in a virtualenv of its own, with the
project and its test dependencies installed, built once and reused.

The whole-system tests build real environments with the package index this machine
is configured for (CI reaches PyPI); each runner gets a cache folder of its own, so
that what a test measures (built or reused) is its own doing.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from commit_ci import environments
from commit_ci.client import communicate
from commit_ci.environments import UNREACHABLE, EnvironmentCache, Installer, SetupFailure, plan
from commit_ci.project_config import ConfigError, ProjectConfig, parse_config, read_config
from commit_ci.protocol import request
from commit_ci.wire import parse_address

from conftest import PASSING_TEST, free_port, module_argv, wait_until

# --- .commit-ci.toml ----------------------------------------------------------------------


def write(folder, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def test_a_config_with_every_key_is_read(tmp_path):
    write(tmp_path, {"requirements/ci.txt": "six\n", "deps.lock": "x\n", ".commit-ci.toml": """
python = "3.12"
requirements = ["requirements/ci.txt"]
dependency-files = "deps.lock"
install = false
setup = ["python -m pip --version"]
test = "python -m pytest -x"
timeout = 90
[env]
MODE = "ci"
"""})
    config = read_config(str(tmp_path))
    assert config == ProjectConfig(python="3.12", requirements=("requirements/ci.txt",), dependency_files=("deps.lock",),
                                   install=False, setup=("python -m pip --version",), test="python -m pytest -x",
                                   timeout=90.0, env={"MODE": "ci"}, present=True)
    assert config.wants_environment
    assert read_config(str(tmp_path / "nowhere")) == ProjectConfig()


@pytest.mark.parametrize("document, why", [
    ({"pyton": "3.12"}, "unknown key 'pyton'"),
    ({"python": "3"}, 'python must be a version like "3.12"'),
    ({"python": 3.12}, 'python must be a version like "3.12"'),
    ({"timeout": 0}, "timeout must be a number"),
    ({"timeout": True}, "timeout must be a number"),
    ({"install": "yes"}, "install must be true or false"),
    ({"setup": [""]}, "setup must be a non-empty string"),
    ({"setup": ["x"] * 65}, "setup must be a list of at most 64"),
    ({"requirements": ["../outside.txt"]}, "not a relative path inside the repository"),
    ({"requirements": ["/etc/passwd"]}, "not a relative path inside the repository"),
    ({"requirements": ["missing.txt"]}, "not a file in the repository"),
    ({"requirements": ["escape/x.txt"]}, "leads out of the repository"),
    ({"env": {"PATH": "/tmp"}}, "PATH is set by the runner"),
    ({"env": {"1BAD": "x"}}, "not a variable name"),
    ({"env": {"A": 1}}, "must be a string"),
    ({"test": "x" * 5000}, "at most 4096 characters"),
])
def test_a_wrong_config_says_what_is_wrong(tmp_path, document, why):
    clone = tmp_path / "clone"
    clone.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", clone / "escape")
    (tmp_path / "outside" / "x.txt").write_text("six\n")
    with pytest.raises(ConfigError, match=re.escape(why)):
        parse_config(document, str(clone))


def test_a_config_that_is_not_toml_or_too_large_is_refused(tmp_path):
    (tmp_path / ".commit-ci.toml").write_text("python = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config(str(tmp_path))
    (tmp_path / ".commit-ci.toml").write_text("# " + "x" * 70000 + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        read_config(str(tmp_path))


# --- what a commit declares -----------------------------------------------------------------

INTERPRETER = environments.Interpreter(os.path.realpath(sys.executable), "%d.%d" % sys.version_info[:2],
                                       "%d.%d.%d" % sys.version_info[:3])
UV = Installer("uv", "uv")


def recipe(folder, config: ProjectConfig = ProjectConfig()):
    return plan(str(folder), config, INTERPRETER, UV)


def test_a_folder_of_tests_is_no_project_and_gets_no_environment(tmp_path):
    write(tmp_path, {"test_x.py": PASSING_TEST, "requirements.txt": "six\n",
                     "pyproject.toml": "[tool.pytest.ini_options]\naddopts = '-q'\n"})
    assert recipe(tmp_path) is None
    # Unless its config asks for one.
    config = ProjectConfig(requirements=("requirements.txt",), present=True)
    found = recipe(tmp_path, config)
    assert (found.project, found.requirement_files, found.requirements) == (False, ("requirements.txt",), ("pytest",))


def test_test_dependencies_are_found_where_projects_declare_them(tmp_path):
    write(tmp_path, {
        "pyproject.toml": """
[project]
name = "demo"
version = "1"
[project.optional-dependencies]
Test = ["six"]
docs = ["sphinx"]
[dependency-groups]
lint = ["ruff"]
testing = ["attrs", {include-group = "base"}]
base = ["tomli-w"]
dev = ["attrs", "hypothesis"]
""",
        "requirements-test.txt": "-r requirements/common.txt\n",
        "requirements/common.txt": "iniconfig\n",
        "requirements/tests-extra.txt": "packaging\n",
        "test-requirements.txt": "pluggy\n",
    })
    found = recipe(tmp_path)
    assert found.project
    assert found.extras == ("Test",)
    assert found.requirements == ("attrs", "tomli-w", "hypothesis", "pytest")
    assert found.requirement_files == ("requirements-test.txt", "requirements/tests-extra.txt", "test-requirements.txt")


def test_extras_of_setup_cfg_and_of_a_setup_py(tmp_path):
    write(tmp_path, {"setup.cfg": "[metadata]\nname = demo\n[options.extras_require]\ntesting = six\nall = six\n"})
    assert recipe(tmp_path).extras == ("testing",)
    (tmp_path / "setup.cfg").unlink()
    write(tmp_path, {"setup.py": "from setuptools import setup\nsetup(name='demo')\n"})
    assert recipe(tmp_path).extras == ("test", "tests", "testing", "dev"), "only running setup.py would tell"


def test_a_dependency_group_that_includes_itself_is_a_setup_failure(tmp_path):
    write(tmp_path, {"pyproject.toml": '[project]\nname = "demo"\nversion = "1"\n'
                                       '[dependency-groups]\ntest = [{include-group = "dev"}]\ndev = [{include-group = "test"}]\n'})
    with pytest.raises(SetupFailure, match="includes itself"):
        recipe(tmp_path)


def test_the_key_changes_with_dependency_files_and_nothing_else(tmp_path):
    write(tmp_path, {"pyproject.toml": '[project]\nname = "demo"\nversion = "1"\n', "src/demo.py": "X = 1\n",
                     "requirements-test.txt": "-r requirements/base.txt\n", "requirements/base.txt": "six\n"})
    first = recipe(tmp_path).key
    write(tmp_path, {"src/demo.py": "X = 2\n", "README.md": "changed\n",
                     "pyproject.toml": '[project]\nname = "demo"\nversion = "2"\ndescription = "now with one"\n'
                                       '[tool.pytest.ini_options]\naddopts = "-q"\n'})
    assert recipe(tmp_path).key == first, "the project's code and metadata are installed again, not its environment"
    write(tmp_path, {"pyproject.toml": '[project]\nname = "demo"\nversion = "2"\ndependencies = ["six"]\n'})
    assert recipe(tmp_path).key != first, "its dependencies make its environment"
    write(tmp_path, {"pyproject.toml": '[project]\nname = "demo"\nversion = "1"\n'})
    write(tmp_path, {"requirements/base.txt": "six==1.17.0\n"})
    second = recipe(tmp_path).key
    assert second != first, "a file a requirement file includes keys it too"
    write(tmp_path, {".commit-ci.toml": "timeout = 60\n"})
    assert recipe(tmp_path).key != second
    other = environments.Interpreter("/usr/bin/python3.99", "3.99", "3.99.0")
    assert plan(str(tmp_path), ProjectConfig(), other, UV).key != recipe(tmp_path).key


def test_pips_index_settings_are_passed_on_to_uv(tmp_path, monkeypatch):
    links = tmp_path / "wheels"
    links.mkdir()
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                        "extra-index-url = file://%s file:///no/such/folder\nfind-links = %s\n" % (links, links))
    monkeypatch.setenv("PIP_CONFIG_FILE", str(pip_conf))
    # Only that file: not this machine's other pip settings (/etc/xdg/pip, PIP_FIND_LINKS...).
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in [*environments.UV_INDEX_VARIABLES, "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                 "PIP_CONSTRAINT", "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(name, raising=False)
    assert environments._uv_index_options() == (
        "--index-url", "https://mirror.example/simple", "--extra-index-url", "file://%s" % links,
        "--find-links", str(links), "--index-strategy", "unsafe-best-match")
    monkeypatch.setenv("PIP_INDEX_URL", "https://other.example/simple")
    assert environments._uv_index_options()[:2] == ("--index-url", "https://other.example/simple"), "the variable wins"
    monkeypatch.setenv("UV_INDEX_URL", "https://uv.example/simple")
    assert environments._uv_index_options() == (), "uv's own settings are uv's to read"


@pytest.mark.parametrize("output, unreachable", [
    ("  cause: tcp connect error\n  cause: Connection refused (os error 111)\n", True),
    ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(...)'", True),
    ("error: Failed to fetch: `https://pypi.org/simple/six/`\n  Caused by: dns error: failed to lookup address", True),
    ("ERROR: No matching distribution found for not-a-package", False),
    ("  cause: Because not-a-package was not found in the package registry", False),
    ("error: subprocess-exited-with-error\n  SyntaxError: invalid syntax", False),
])
def test_a_failed_install_is_the_infrastructures_only_when_the_index_was_unreachable(output, unreachable):
    assert bool(UNREACHABLE.search(output)) == unreachable


def test_an_environment_is_built_aside_once_reused_held_and_evicted_least_recently_used_first(tmp_path):
    cache = EnvironmentCache(str(tmp_path / "envs"), Installer.find("auto"), max_environments=1)
    stop = threading.Event()
    clone = tmp_path / "clone"
    write(clone, {"requirements.txt": "iniconfig\n"})
    config = ProjectConfig(requirements=("requirements.txt",), test="true", present=True)
    first = recipe(clone, config)
    built = cache.obtain(first, str(clone), dict(os.environ), str(tmp_path / "setup.log"), stop)
    assert built.built and os.path.islink(tmp_path / "envs" / first.key)
    assert os.path.realpath(tmp_path / "envs" / first.key) == built.path != str(tmp_path / "envs" / first.key)
    assert subprocess.run([built.python, "-c", "import iniconfig"], timeout=60).returncode == 0
    again = cache.obtain(first, str(clone), dict(os.environ), str(tmp_path / "setup.log"), stop)
    assert (again.built, again.path) == (False, built.path)
    # A second environment: over the limit of one, the first goes, unless in use.
    write(clone, {"requirements.txt": "iniconfig\npluggy\n"})
    second = recipe(clone, config)
    holder = EnvironmentCache(str(tmp_path / "envs"), cache.installer, max_environments=1)
    holder.obtain(first, str(clone), dict(os.environ), str(tmp_path / "held.log"), stop)  # another runner uses it
    cache.obtain(second, str(clone), dict(os.environ), str(tmp_path / "setup.log"), stop)
    assert os.path.exists(built.path), "in use by another runner: kept"
    holder.release()
    cache.release()
    third_config = ProjectConfig(requirements=("requirements.txt",), test="true", setup=("true",), present=True)
    cache.obtain(recipe(clone, third_config), str(clone), dict(os.environ), str(tmp_path / "setup.log"), stop)
    cache.release()
    links = [path for path in glob.glob(str(tmp_path / "envs" / "*")) if os.path.islink(path)]
    assert len(links) == 1 and not os.path.exists(built.path), "the least recently used went first"
    # What a half-built environment left is never used, and goes at the next build.
    half = tmp_path / "envs" / (second.key + "-deadbeef")
    half.mkdir()
    os.unlink(tmp_path / "envs" / second.key) if os.path.lexists(tmp_path / "envs" / second.key) else None
    rebuilt = cache.obtain(second, str(clone), dict(os.environ), str(tmp_path / "setup.log"), stop)
    assert rebuilt.built and not half.exists()
    cache.release()


# --- the whole system --------------------------------------------------------------------

#: A project with the src layout, whose tests import the installed package and a test
#: dependency that no runner has (six is not installed here: the suite checks).
PROJECT = {
    "pyproject.toml": """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "shapes"
version = "0.1"

[project.optional-dependencies]
test = ["six"]

[tool.setuptools.packages.find]
where = ["src"]
""",
    "src/shapes/__init__.py": "SIDES = 3\n",
    "tests/test_shapes.py": "import six\nimport shapes\n\n\ndef test_sides():\n    assert shapes.SIDES == 3\n",
}


def test_six_is_not_installed_where_the_runners_run():
    assert subprocess.run([sys.executable, "-c", "import six"], capture_output=True).returncode != 0


def dispatch(ci, commit: str) -> None:
    answer = communicate(parse_address(ci.address), request("dispatch", commit=commit))
    assert answer.verb == "OK", answer


def start(ci, tmp_path, *runner_options: str, launched_by=(), dispatcher_options=()):
    ci.start_dispatcher(*dispatcher_options)
    return ci.start_runner("--env-cache", str(tmp_path / "envs"), *runner_options, launched_by=launched_by)


def test_a_src_layout_project_is_tested_in_its_environment_built_once_and_reused(ci, upstream, tmp_path):
    runner = start(ci, tmp_path)
    first = upstream.commit(PROJECT, "a src-layout project with a test dependency")
    dispatch(ci, first)
    result = ci.wait_result(first, timeout=180)
    assert (result["status"], result["passed"]) == ("passed", 2), ci.report(first)
    assert "[runner: building environment" in ci.report(first)
    runner.wait_for_log(r"environment [0-9a-f]{12} built in")

    # Code changes, declarations do not: the environment is reused, the project's new code installed.
    second = upstream.commit({"src/shapes/__init__.py": "SIDES = 4\n",
                              "tests/test_shapes.py": PROJECT["tests/test_shapes.py"].replace("3", "4")}, "four")
    dispatch(ci, second)
    result = ci.wait_result(second, timeout=120)
    assert result["status"] == "passed", ci.report(second)
    assert re.search(r"\[runner: environment [0-9a-f]{12} reused", ci.report(second))

    # A new dependency: a new environment, once; the commit after reuses it.
    third = upstream.commit({"pyproject.toml": PROJECT["pyproject.toml"].replace('["six"]', '["six", "iniconfig"]')},
                            "one more test dependency")
    dispatch(ci, third)
    assert ci.wait_result(third, timeout=180)["status"] == "passed", ci.report(third)
    fourth = upstream.commit({"README.md": "shapes\n"}, "docs")
    dispatch(ci, fourth)
    assert ci.wait_result(fourth, timeout=120)["status"] == "passed", ci.report(fourth)
    assert len(re.findall(r"environment [0-9a-f]{12} built in", runner.log())) == 2
    assert "reused" in ci.report(fourth)


def test_without_environments_the_same_project_cannot_be_collected(ci, upstream, tmp_path):
    start(ci, tmp_path, "--no-environments")
    commit = upstream.commit(PROJECT, "a src-layout project with a test dependency")
    dispatch(ci, commit)
    result = ci.wait_result(commit, timeout=60)
    assert (result["status"], result["reason"]) == ("failed", "tests interrupted or could not be collected")


def test_pip_builds_the_environment_where_uv_is_not_wanted(ci, upstream, tmp_path):
    runner = start(ci, tmp_path, "--installer", "pip")
    runner.wait_for_log(r"environments: built with pip")
    commit = upstream.commit(PROJECT, "a src-layout project with a test dependency")
    dispatch(ci, commit)
    result = ci.wait_result(commit, timeout=240)
    assert (result["status"], result["passed"]) == ("passed", 2), ci.report(commit)


def test_a_config_gives_requirements_variables_a_test_command_and_a_timeout(ci, upstream, tmp_path):
    start(ci, tmp_path)
    commit = upstream.commit({
        "requirements/ci.txt": "six\n",
        "test_config.py": "import os\nimport six\n\n\ndef test_mode():\n    assert os.environ['MODE'] == 'ci'\n",
        ".commit-ci.toml": 'requirements = ["requirements/ci.txt"]\n'
                           'test = "python -m pytest -q --junitxml $CI_JUNIT_XML test_config.py test_base.py"\n'
                           '[env]\nMODE = "ci"\n',
    }, "a repository that is no project, with a config")
    dispatch(ci, commit)
    result = ci.wait_result(commit, timeout=180)
    assert (result["status"], result["passed"]) == ("passed", 2), ci.report(commit)

    slow = upstream.commit({"test_slow.py": "import time\n\n\ndef test_slow():\n    time.sleep(60)\n",
                            ".commit-ci.toml": 'requirements = ["requirements/ci.txt"]\ntimeout = 2\n'},
                           "slow, with a short timeout of its own")
    dispatch(ci, slow)
    result = ci.wait_result(slow, timeout=120)
    assert (result["status"], result["reason"]) == ("failed", "timeout"), ci.report(slow)


def test_a_dependency_that_does_not_exist_is_the_commits_failure(ci, upstream, tmp_path):
    start(ci, tmp_path)
    broken = dict(PROJECT, **{"pyproject.toml": PROJECT["pyproject.toml"].replace(
        '["six"]', '["commit-ci-no-such-package-4f7a"]')})
    commit = upstream.commit(broken, "depends on what does not exist")
    dispatch(ci, commit)
    result = ci.wait_result(commit, timeout=180)
    assert result["status"] == "failed" and result["attempts"] == 1, ci.report(commit)
    assert result["reason"].startswith("setup failed: could not install the dependencies:"), result["reason"]
    assert "commit-ci-no-such-package-4f7a" in ci.report(commit), "the install log is the report"


def test_a_wrong_config_is_the_commits_failure(ci, upstream, tmp_path):
    start(ci, tmp_path)
    commit = upstream.commit({".commit-ci.toml": 'pyton = "3.12"\n'}, "a typo in the config")
    dispatch(ci, commit)
    result = ci.wait_result(commit, timeout=60)
    assert result["status"] == "failed"
    assert result["reason"].startswith("setup failed: .commit-ci.toml: unknown key 'pyton'")


def test_an_unreachable_package_index_is_the_infrastructures_fault(ci, upstream, tmp_path):
    nowhere = "http://127.0.0.1:%d/simple" % free_port()
    start(ci, tmp_path, launched_by=("env", "UV_INDEX_URL=" + nowhere, "PIP_INDEX_URL=" + nowhere),
          dispatcher_options=("--max-attempts", "2"))
    commit = upstream.commit(PROJECT, "a project, while the index is down")
    dispatch(ci, commit)
    result = ci.wait_result(commit, timeout=180)
    assert (result["status"], result["attempts"]) == ("error", 2), ci.report(commit)
    assert "setup failed: package index unreachable" in result["reason"]


def other_interpreter() -> str | None:
    """A Python of another version than the suite's, if this machine has one."""
    for path in sorted(glob.glob("/root/.pyenv/versions/3.1*/bin/python3.1?")) + [
            "/usr/bin/python3.%d" % minor for minor in range(10, 15)]:
        found = environments.probe_interpreter(path) if os.path.exists(path) else None
        if found and found.version != "%d.%d" % sys.version_info[:2]:
            return path
    return None


def test_a_commit_asking_for_another_python_goes_to_a_runner_that_has_it(ci, upstream, tmp_path):
    python = other_interpreter()
    if python is None:
        pytest.skip("no second Python version on this machine")
    version = environments.probe_interpreter(python).version
    ci.start_dispatcher()
    plain = ci.start_runner("--env-cache", str(tmp_path / "envs"), "--name", "plain")
    offers = ci.start_runner("--env-cache", str(tmp_path / "envs"), "--name", "offers", "--python", python)
    offers.wait_for_log(r"Pythons .*%s \(" % re.escape(version))
    probe = "import sys\n\n\ndef test_version():\n    assert '%%d.%%d' %% sys.version_info[:2] == %r\n" % version
    commits = []
    for index in range(3):
        commits.append(upstream.commit({"test_version.py": probe + "\n" * index,
                                        ".commit-ci.toml": 'python = "%s"\n' % version}, "needs %s" % version))
        dispatch(ci, commits[-1])
    for commit in commits:
        result = ci.wait_result(commit, timeout=240)
        assert (result["status"], result["runner"], result["attempts"]) == ("passed", "offers", 1), ci.report(commit)
    # A commit asking for a Python no runner has waits in the queue, and says for what.
    nobody = upstream.commit({".commit-ci.toml": 'python = "3.99"\n'}, "needs 3.99")
    dispatch(ci, nobody)
    plain.wait_for_log(r"commit %s attempt \d+: asks for Python 3.99, which this runner does not have" % nobody)

    def waiting():
        answer = communicate(parse_address(ci.address), request("queue"))
        queued = json.loads(answer.sections["json"])["queued"]
        return [job for job in queued if job["commit"] == nobody and job["requires"] == "python3.99"]

    wait_until(waiting, 30, message="the job queued for python3.99")
    assert ci.result(nobody) is None
    shown = subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address, "queue"), capture_output=True,
                           text=True, timeout=60)
    assert "%s  queued" % nobody[:12] in shown.stdout and "waits for a runner with python3.99" in shown.stdout
