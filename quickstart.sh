#!/usr/bin/env bash
# Install the project into .venv and run the whole CI system locally on one
# repository: a dispatcher, test runners with their own clones, and an observer.
# Usage: ./quickstart.sh PATH_OR_URL_OF_REPOSITORY [ci-local options]; Ctrl-C stops it.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ -x "$here/.venv/bin/python" ] || python3 -m venv "$here/.venv"
"$here/.venv/bin/python" -m pip install --quiet --disable-pip-version-check "$here"
exec "$here/.venv/bin/ci-local" "$@"
