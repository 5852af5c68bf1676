#!/usr/bin/env bash
# test_runner_script.sh CLONE COMMIT
#
# The runner's git step: make the runner's own CLONE an exact, clean checkout of
# COMMIT, so that a verdict depends on the commit alone. Fetches from origin only
# when the commit is not there yet, then resets the work tree to it and deletes
# every file git does not track (ignored files included: build output, caches).
# Exits non-zero with a one-line explanation last on stderr when the checkout is
# impossible; the runner reports that as an infrastructure fault, which the
# dispatcher retries on another runner.
set -u
. "$(dirname "$0")/run_or_fail.sh"

[ $# -eq 2 ] || { echo "usage: $0 CLONE COMMIT" >&2; exit 2; }
clone=$1 commit=$2

run_or_fail "cannot enter the runner's clone $clone" cd "$clone"
# A fetch may start git's automatic housekeeping (gc --auto), which by default goes
# on in the background; the runner kills whatever a job leaves running, so it would
# never finish. Here it runs inside the fetch instead, under the checkout's time limit.
fetch_origin() { git -c gc.autoDetach=false fetch --quiet --no-tags origin "$@"; }
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    fetch_or_fail "could not fetch from origin" fetch_origin
    if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
        # Not on any branch head: some servers still hand out a commit by id.
        fetch_or_fail "commit $commit is not in the upstream repository" fetch_origin "$commit"
    fi
fi
run_or_fail "could not check out $commit" git -c advice.detachedHead=false reset --quiet --hard "$commit"
run_or_fail "could not remove untracked files" git clean -ffdxq
head=$(git rev-parse HEAD)
case "$head" in
    "$commit"*) ;;
    *) echo "checked out $head instead of $commit" >&2; exit 1 ;;
esac
