"""Install the CI system: three daemons, the local launcher, the push trigger, and their shell scripts."""

import os

from setuptools import setup

setup(
    name="commit-ci",
    version="0.1.0",
    description="A small self-hosted distributed CI system: every commit tested on a pool of runners",
    long_description=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["protocol_core", "helpers", "jobstore", "reports", "pages", "dispatcher", "test_runner", "repo_observer",
                "ci_local", "ci_ctl", "push_trigger", "push_hook", "warm_pytest"],
    # The git steps stay shell scripts that users can read and adapt; installed on
    # PATH, where helpers.script_path() finds them.
    scripts=["update_repo.sh", "test_runner_script.sh", "run_or_fail.sh"],
    # pytest runs the tests of the repository under test (the runner's default command).
    # Jinja2 renders the results page: its autoescaping keeps commit messages and test
    # output, which are untrusted, from becoming markup.
    install_requires=["GitPython>=3.1.30", "pytest>=7", "Jinja2>=3"],
    extras_require={"test": ["hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "ci-dispatcher=dispatcher:main",
            "ci-runner=test_runner:main",
            "ci-observer=repo_observer:main",
            "ci-local=ci_local:main",
            "ci-ctl=ci_ctl:main",
            "ci-trigger=push_trigger:main",
        ]
    },
)
