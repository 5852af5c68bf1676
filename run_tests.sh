#!/usr/bin/env bash
# Install the project and its test dependencies into .venv, then run the whole test
# suite. Extra arguments go to pytest (for example: ./run_tests.sh -k observer).
set -eu
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check ".[test]"
CI_REQUIRE_INSTALLED=1 exec .venv/bin/python -m pytest "$@"
