"""Install the CI system: the commit_ci package, its commands, and the shell scripts with its git steps."""

import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# setuptools packs all of build/lib into the wheel, files an earlier version put there
# included: a checkout upgraded in place (git pull, then pip install .) would install
# the modules that version had at the top level again. So every build starts clean.
shutil.rmtree(os.path.join(HERE, "build"), ignore_errors=True)

setup(
    name="commit-ci",
    version="0.2.0",
    description="A small self-hosted distributed CI system: every commit tested on a pool of runners",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # One package and nothing else at the top level: the tested repository's tests may
    # run in this interpreter, and must never find a module of ours under a generic
    # name (dispatcher.py, test_runner.py, repo_observer.py and helpers.py are entry
    # points for a checkout, not installed).
    packages=["commit_ci"],
    package_data={"commit_ci": ["templates/*.html", "templates/*.js", "pytest_shard/*.py"]},
    # The git steps stay shell scripts that users can read and adapt; installed on
    # PATH, where commit_ci.git_scripts finds them.
    scripts=["update_repo.sh", "test_runner_script.sh", "run_or_fail.sh"],
    # pytest runs the tests of the repository under test (the runner's default command).
    # Jinja2 renders the results page: its autoescaping keeps commit messages and test
    # output, which are untrusted, from becoming markup. uv builds the environments of
    # the commits under test, several times faster than pip (docs/performance.md); pip
    # is the fallback where uv cannot be installed. tomli reads pyproject.toml and
    # .commit-ci.toml where the standard library has no tomllib (Python 3.10).
    # prometheus_client writes the dispatcher's /metrics in Prometheus's text format.
    install_requires=["GitPython>=3.1.30", "pytest>=7", "Jinja2>=3", "uv>=0.5", "tomli>=1.1; python_version < '3.11'",
                      "prometheus_client>=0.17"],
    # aiosmtpd: a real SMTP server for the notification tests (tests/test_notifications.py).
    # pytest-xdist: the suite's tests mostly wait on daemons, so it runs them three at a
    # time (pytest.ini), which keeps it near 10 minutes on 2 cores.
    extras_require={"test": ["hypothesis>=6", "aiosmtpd>=1.4", "pytest-xdist>=3.2"]},
    entry_points={
        "console_scripts": [
            "ci-dispatcher=commit_ci.dispatcher:main",
            "ci-runner=commit_ci.runner:main",
            "ci-observer=commit_ci.observer:main",
            "ci-local=commit_ci.launcher:main",
            "ci-ctl=commit_ci.ctl:main",
            "ci-trigger=commit_ci.push_trigger:main",
        ]
    },
)
