#!/usr/bin/env bash
# test_runner_script.sh [--fetch-only] CLONE COMMIT
#
# The runner's git step: make the runner's own CLONE an exact, clean checkout of
# COMMIT, so that a verdict depends on the commit alone. Fetches from origin only
# when the commit is not there yet, then resets the work tree to it and deletes
# every file git does not track (ignored files included: build output, caches).
# Exits non-zero with a one-line explanation last on stderr when the checkout is
# impossible; the runner reports that as an infrastructure fault, which the
# dispatcher retries on another runner.
#
# When the commit has a .gitmodules file, its submodules are checked out too, each
# at the revision the commit records (not its branch tip), and cleaned the same way.
# Their URLs come from the commit: git's file:// transport (local paths) stays
# forbidden for them, as git has it by default, so that a commit cannot copy into
# its checkout another repository readable on this machine.
#
# With --fetch-only, it only fetches the commit if the clone does not have it yet,
# and leaves the work tree alone: the runner does that as soon as the dispatcher
# says the commit is queued, while it may still be testing another one, so that the
# checkout finds the commit there.
set -u
. "$(dirname "$0")/run_or_fail.sh"

fetch_only=
if [ "${1:-}" = --fetch-only ]; then fetch_only=1; shift; fi
[ $# -eq 2 ] || { echo "usage: $0 [--fetch-only] CLONE COMMIT" >&2; exit 2; }
clone=$1 commit=$2

run_or_fail "cannot enter the runner's clone $clone" cd "$clone"
git_dir=$(git rev-parse --absolute-git-dir) || { echo "$clone is not a git clone" >&2; exit 1; }
# Only this runner uses its clone, one job at a time: a lock file here was left by a
# git killed mid-write (with the runner, or by a power cut), and would block every
# later checkout.
find "$git_dir" -maxdepth 1 -name '*.lock' -type f -delete
find "$git_dir/refs" -name '*.lock' -type f -delete
# The same in the git folders of the submodules (there once one was checked out).
[ ! -d "$git_dir/modules" ] || find "$git_dir/modules" -name '*.lock' -type f -delete
# A replace ref (git replace, by a test) would make git check out other contents
# than the commit's.
git for-each-ref --format='%(refname)' refs/replace/ | while read -r ref; do
    run_or_fail "could not delete the replace ref $ref" git update-ref -d "$ref"
done
# A fetch may start git's automatic housekeeping (gc --auto), which by default goes
# on in the background; the runner kills whatever a job leaves running, so it would
# never finish. Here it runs inside the fetch instead, under the checkout's time limit.
# Submodules are fetched by "submodule update" below, for the revisions the commit
# records: a recursive fetch here would enter their folders before they are checked out.
fetch_origin() { git -c gc.autoDetach=false fetch --quiet --no-tags --no-recurse-submodules origin "$@"; }
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    fetch_or_fail "could not fetch from origin" fetch_origin
    if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
        # Not on any branch head: some servers still hand out a commit by id.
        fetch_or_fail "commit $commit is not in the upstream repository" fetch_origin "$commit"
    fi
    [ -z "$fetch_only" ] || echo "fetched $commit"
fi
[ -z "$fetch_only" ] || exit 0
# A submodule the commit no longer has keeps its folder, with a .git file pointing
# into $git_dir/modules: the clean below deletes such a folder whole (-ff), but not
# that .git file in one where the commit has a plain folder instead (the submodule's
# files vendored in). So those .git files go first; only in a clone that has had
# submodules checked out.
if [ -d "$git_dir/modules" ]; then
    removed=$(git -c core.quotePath=false diff --name-only --no-renames --diff-filter=DT HEAD "$commit" --) ||
        { echo "could not compare the checkout with $commit" >&2; exit 1; }
    while IFS= read -r path; do
        if [ -n "$path" ] && [ -f "$path/.git" ] && [ ! -L "$path/.git" ]; then
            run_or_fail "could not remove the leftover submodule link $path/.git" rm -f "$path/.git"
        fi
    done <<PATHS
$removed
PATHS
fi
run_or_fail "could not check out $commit" git -c advice.detachedHead=false reset --quiet --hard "$commit"
if ! git clean -ffdxq >/dev/null 2>&1; then
    # Tests may leave read-only folders behind (Go's module cache does).
    chmod -R u+w . 2>/dev/null
    run_or_fail "could not remove untracked files" git clean -ffdxq
fi
if [ -f .gitmodules ]; then
    # Each submodule at the revision the commit records, fetched if need be (the fetch
    # runs git's housekeeping, as above), then reset and cleaned: nothing the tests of
    # an earlier commit changed or left in a submodule survives. A submodule's folder
    # that is not a checkout of it yet is emptied first: the clean above keeps what
    # is in it (a path git tracks), and git refuses to clone into it unless empty.
    links=$(git -c core.quotePath=false ls-files --stage) ||
        { echo "could not list the submodules of $commit" >&2; exit 1; }
    while read -r mode _ _ path; do
        if [ "$mode" = 160000 ] && [ ! -e "$path/.git" ] && [ -d "$path" ] && [ ! -L "$path" ]; then
            run_or_fail "could not empty the folder of submodule $path" find "$path" -mindepth 1 -delete
        fi
    done <<LINKS
$links
LINKS
    run_or_fail "could not update the submodule URLs of $commit" git submodule sync --quiet --recursive
    fetch_or_fail "could not check out the submodules of $commit" \
        git -c gc.autoDetach=false submodule update --quiet --init --recursive --force
    run_or_fail "could not reset the submodules of $commit" \
        git submodule foreach --quiet --recursive git reset --quiet --hard
    if ! git submodule foreach --quiet --recursive git clean -ffdxq >/dev/null 2>&1; then
        chmod -R u+w . 2>/dev/null
        run_or_fail "could not remove untracked files in the submodules of $commit" \
            git submodule foreach --quiet --recursive git clean -ffdxq
    fi
fi
head=$(git rev-parse HEAD)
case "$head" in
    "$commit"*) ;;
    *) echo "checked out $head instead of $commit" >&2; exit 1 ;;
esac
