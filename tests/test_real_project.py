"""A real project nobody here wrote (../shared/real-repos/iniconfig.bundle, pytest-dev's
iniconfig: the src layout, its version from git by hatch-vcs, tests in testing/), with
no config file added: the CI system must give each commit the verdict and the test
counts that a careful run by hand gives -- a fresh virtualenv, the project and pytest
installed with pip, then pytest.

Slow (about a minute and a half): it builds environments and installs from the package
index this machine is configured for, which CI reaches.
"""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from commit_ci.client import communicate
from commit_ci.protocol import request
from commit_ci.wire import parse_address

from conftest import ROOT, RUNNER_ENV, Processes, free_port, git, module_argv, wait_until

BUNDLE = ROOT.parent / "shared" / "real-repos" / "iniconfig.bundle"
#: The newest commits of its history, tested by both.
COMMITS = 20
INSTALL_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path) -> Path:
    if not BUNDLE.exists():
        pytest.fail("%s is missing: the real project's history is part of the workplace" % BUNDLE)
    clone = tmp_path / "iniconfig"
    git(tmp_path, "clone", "--quiet", str(BUNDLE), str(clone))
    return clone


def by_hand(project: Path, sha: str, folder: Path) -> dict:
    """What a careful person gets for ``sha``: its verdict and counts, from a fresh
    virtualenv with the project and pytest installed by pip."""
    source, venv = folder / "source", folder / "venv"
    git(folder.parent, "clone", "--quiet", str(project), str(source))
    git(source, "checkout", "--quiet", sha)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--quiet", str(source), "pytest"], capture_output=True, text=True,
                             timeout=INSTALL_TIMEOUT_S)
    if install.returncode != 0:
        return {"status": "failed", "install": install.stderr[-2000:]}
    junit = folder / "junit.xml"
    tests = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--junitxml", str(junit)], cwd=source, capture_output=True, text=True, timeout=600,
                           env={**RUNNER_ENV, "PYTHONDONTWRITEBYTECODE": "1"})
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    return {"status": "passed" if tests.returncode == 0 else "failed",
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"]}


def test_the_last_commits_get_the_verdicts_and_counts_of_a_careful_run_by_hand(ci, project, tmp_path):
    shas = git(project, "rev-list", "--reverse", "--max-count=%d" % COMMITS, "HEAD").split()
    assert len(shas) == COMMITS
    ci.upstream = ProjectUpstream(project)
    ci.start_dispatcher()
    for _ in range(2):
        ci.start_runner("--env-cache", str(tmp_path / "envs"))
    address = parse_address(ci.address)
    for sha in shas:
        assert communicate(address, request("dispatch", commit=sha)).fields["new"] == 1
    # The careful runs meanwhile, two at a time.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        careful = list(pool.map(lambda item: by_hand(project, item[1], tmp_path / ("by-hand-%d" % item[0])),
                                enumerate(shas)))
    results = ci.wait_results(shas, timeout=600)

    for sha, expected in zip(shas, careful):
        got = results[sha]
        seen = {key: got[key] for key in expected if key in got}
        assert seen == {key: expected[key] for key in seen}, (sha, expected, ci.report(sha)[-3000:])
    # Built when the declarations change, not for every commit: the others reuse it.
    built = sum(len(re.findall(r"environment [0-9a-f]{12} built in", runner.log())) for runner in ci.runners)
    assert 1 <= built <= 4, built


class ProjectUpstream:
    """The real project as CISystem's upstream: what runners clone."""

    def __init__(self, path: Path):
        self.path = path

    def clone(self, destination: Path) -> Path:
        git(destination.parent, "clone", "--quiet", str(self.path), str(destination))
        return destination


def test_the_readmes_first_run_tests_the_project_green(processes: Processes, project, tmp_path):
    """README's quick start (ci-local, as quickstart.sh runs it) on the real project."""
    results = tmp_path / "results"
    processes.start("ci-local", module_argv("launcher", "--port", str(free_port()), "--runners", "1",
                                             "--work-dir", str(tmp_path / "work"), "--results-dir", str(results),
                                             str(project)), env=RUNNER_ENV)
    tip = git(project, "rev-parse", "HEAD")
    summary = wait_until(lambda: (results / (tip + ".json")).exists() and (results / (tip + ".json")).read_text(),
                         timeout=300, interval=0.2, message="the first result")
    assert '"status": "passed"' in summary, (results / tip).read_text()[-3000:]
    assert '"passed": 42' in summary
