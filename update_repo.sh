#!/usr/bin/env bash
# update_repo.sh CLONE REMOTE BRANCH
#
# The observer's git step: fetch BRANCH from REMOTE into the observer's own CLONE
# and print the commit id at its tip. The observer (repo_observer.py) then works out
# which commits are new since the last one the dispatcher acknowledged.
# BRANCH may be a pattern with one '*' (release/*, matching across '/' too): then
# every branch of REMOTE it matches is fetched, the remote-tracking branches of those
# gone from REMOTE are deleted, and the script prints "COMMIT REF" for each
# remote-tracking branch of REMOTE (the observer keeps those the pattern matches).
# Adapt this script to watch a repository that needs another fetch (mirrors,
# credentials): its contract is only "fetch, then print the tip's full commit id"
# (for a pattern, "fetch, then list the tips").
set -u
. "$(dirname "$0")/run_or_fail.sh"

[ $# -eq 3 ] || { echo "usage: $0 CLONE REMOTE BRANCH" >&2; exit 2; }
clone=$1 remote=$2 branch=$3

run_or_fail "cannot enter the observer's clone $clone" cd "$clone"
case $branch in
*'*'*)
    fetch_or_fail "could not fetch the branches $branch from $remote" \
        git fetch --quiet --no-tags --prune "$remote" "+refs/heads/$branch:refs/remotes/$remote/$branch"
    run_or_fail "cannot list the branches fetched from $remote" \
        git for-each-ref --format='%(objectname) %(refname)' "refs/remotes/$remote/"
    exit 0
    ;;
esac
fetch_or_fail "could not fetch $branch from $remote" \
    git fetch --quiet --no-tags "$remote" "+refs/heads/$branch:refs/remotes/$remote/$branch"
run_or_fail "branch $branch not found on $remote" \
    git rev-parse --verify --quiet "refs/remotes/$remote/$branch^{commit}"
