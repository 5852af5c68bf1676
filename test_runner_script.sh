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
git_dir=$(git rev-parse --absolute-git-dir) || { echo "$clone is not a git clone" >&2; exit 1; }
# Only this runner uses its clone, one job at a time: a lock file here was left by a
# git killed mid-write (with the runner, or by a power cut), and would block every
# later checkout.
find "$git_dir" -maxdepth 1 -name '*.lock' -type f -delete
find "$git_dir/refs" -name '*.lock' -type f -delete
# A replace ref (git replace, by a test) would make git check out other contents
# than the commit's.
git for-each-ref --format='%(refname)' refs/replace/ | while read -r ref; do
    run_or_fail "could not delete the replace ref $ref" git update-ref -d "$ref"
done
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
if ! git clean -ffdxq >/dev/null 2>&1; then
    # Tests may leave read-only folders behind (Go's module cache does).
    chmod -R u+w . 2>/dev/null
    run_or_fail "could not remove untracked files" git clean -ffdxq
fi
head=$(git rev-parse HEAD)
case "$head" in
    "$commit"*) ;;
    *) echo "checked out $head instead of $commit" >&2; exit 1 ;;
esac
