"""Environments: what testing a commit that is a Python project costs, with its
environment reused and when a new one has to be built, against the same work by hand.

A generated project with the src layout (setuptools), a test dependency (six) and a
small pytest suite; a dispatcher and one runner with an environment cache of its own.
Timed through the system: ``dispatch`` to the result file (polled every 2 ms).

* **environment reused**: commits that change only the project's code. The runner
  reuses the environment, installs the project at this commit again and runs the
  tests. Baseline, alternating with it: by hand in an existing virtualenv that has
  the project installed in editable mode (``git reset --hard``, ``git clean``, then
  the virtualenv's ``python -m pytest``) -- what a person with a dev setup does.
* **new environment**: commits that change a dependency declaration, so that a new
  environment is built, once with uv and once with pip (``--installer pip``).
  Baseline, alternating with it: a careful run by hand -- a fresh virtualenv
  (``python -m venv``), pip installs the project with its test extra and pytest, then
  pytest. Both sides find the packages in their caches after the first commit, as a
  CI machine would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    COMMAND_TIMEOUT_S,
    BenchError,
    Daemons,
    Row,
    by_hand_env,
    clone,
    commit,
    dispatch_and_wait,
    git,
    median,
    new_repo,
    run_by_hand,
    start_dispatcher,
    start_runner,
    wait_runners_ready,
)

RESULT_TIMEOUT_S = 300.0
TESTS = 20


def project(variant: int, six_minor: int = 0) -> dict[str, str]:
    """The project's files; ``variant`` changes its code, ``six_minor`` its declared
    test dependency (a new environment)."""
    tests = "".join("\ndef test_%d():\n    assert shapes.area(%d) == %d\n" % (index, index, index * index)
                    for index in range(TESTS))
    return {
        "pyproject.toml": ('[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
                           '[project]\nname = "shapes"\nversion = "0.1"\n\n[project.optional-dependencies]\n'
                           'test = ["six>=1.%d"]\n\n[tool.setuptools.packages.find]\nwhere = ["src"]\n' % six_minor),
        "src/shapes/__init__.py": "VARIANT = %d\n\n\ndef area(side):\n    return side * side\n" % variant,
        "tests/test_shapes.py": "import six\n\nimport shapes\n" + tests,
    }


def through_ci(address: tuple[str, int], results: Path, sha: str) -> float:
    return dispatch_and_wait(address, results, sha, RESULT_TIMEOUT_S)[0]


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=str(cwd), env=by_hand_env(), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S * 3, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError("%s failed: %s" % (" ".join(command[:4]), (done.stderr or done.stdout)[-500:]))


def careful_by_hand(hand_clone: Path, sha: str, work: Path) -> float:
    """Seconds for a fresh virtualenv, pip installing the project with its test extra
    and pytest, then pytest, at ``sha``."""
    venv = work / "fresh-venv"
    started = time.perf_counter()
    git(hand_clone, "reset", "--quiet", "--hard", sha)
    git(hand_clone, "clean", "-ffdxq")
    subprocess.run(["rm", "-rf", str(venv)], check=True)
    _run([sys.executable, "-m", "venv", str(venv)], work)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", "%s[test]" % hand_clone, "pytest"], work)
    _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], hand_clone)
    return time.perf_counter() - started


def run(work: Path, quick: bool) -> list[Row]:
    reused_samples, new_samples = (1, 1) if quick else (7, 3)
    upstream = new_repo(work / "upstream", project(0))
    hand_clone = clone(upstream, work / "by-hand-clone")
    # The person's existing virtualenv, with the project installed in editable mode.
    dev_venv = work / "dev-venv"
    _run([sys.executable, "-m", "venv", str(dev_venv)], work)
    _run([str(dev_venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", "%s[test]" % hand_clone,
          "pytest"], work)
    dev_command = "%s -m pytest -q -p no:cacheprovider --junitxml $CI_JUNIT_XML" % (dev_venv / "bin" / "python")
    rows = []
    variant = [0]
    six_minor = [0]

    def next_commit(new_environment: bool) -> str:
        variant[0] += 1
        if new_environment:
            six_minor[0] += 1
        return commit(upstream, project(variant[0], six_minor[0]), "change %d" % variant[0])

    for installer in ("uv", "pip"):
        folder = work / installer
        folder.mkdir()
        runner_clone = clone(upstream, folder / "runner-clone")
        with Daemons(folder) as daemons:
            _, address, results = start_dispatcher(daemons, folder)
            start_runner(daemons, "runner-1", runner_clone, address, "--installer", installer,
                         "--env-cache", str(folder / "envs"))
            wait_runners_ready(address, 1)
            through_ci(address, results, next_commit(True))  # the first environment, and the caches
            if installer == "uv":
                system, hand = [], []
                for index in range(reused_samples):
                    sha = next_commit(False)
                    git(hand_clone, "fetch", "--quiet", "origin")
                    if index % 2:
                        hand.append(run_by_hand(hand_clone, sha, work, dev_command))
                        system.append(through_ci(address, results, sha))
                    else:
                        system.append(through_ci(address, results, sha))
                        hand.append(run_by_hand(hand_clone, sha, work, dev_command))
                rows.append(Row(
                    "environments",
                    "dispatch -> result, environment reused (project installed again), median of %d" % reused_samples,
                    "%.0f ms (+%.0f ms, x%.2f)" % (median(system) * 1000, (median(system) - median(hand)) * 1000,
                                                   median(system) / median(hand)),
                    "%.0f ms by hand in an existing venv" % (median(hand) * 1000),
                    "-",
                    "-",
                ))
            system, hand = [], []
            for index in range(new_samples):
                sha = next_commit(True)
                git(hand_clone, "fetch", "--quiet", "origin")
                if index % 2:
                    hand.append(careful_by_hand(hand_clone, sha, work))
                    system.append(through_ci(address, results, sha))
                else:
                    system.append(through_ci(address, results, sha))
                    hand.append(careful_by_hand(hand_clone, sha, work))
            rows.append(Row(
                "environments",
                "dispatch -> result, new environment (%s), median of %d" % (installer, new_samples),
                "%.0f ms (x%.2f)" % (median(system) * 1000, median(system) / median(hand)),
                "%.0f ms careful by hand (fresh venv, pip)" % (median(hand) * 1000),
                "-",
                "-",
            ))
    return rows
