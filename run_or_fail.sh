# Sourced by the other scripts. Every git step goes through run_or_fail so that a
# failure ends the script with a sentence a person understands, as the last line on
# stderr (the daemons quote that line in their logs and in result reasons).

# run_or_fail EXPLANATION COMMAND [ARG...]
#   Run COMMAND; its output passes through. If it fails, print EXPLANATION on
#   stderr and exit with status 1.
run_or_fail() {
    local explanation=$1
    shift
    if ! "$@"; then
        echo "$explanation" >&2
        exit 1
    fi
}

# fetch_or_fail EXPLANATION COMMAND [ARG...]
#   run_or_fail for a git fetch, whose output goes to stderr once it is complete.
#   A fetch that fails can exit before the git upload-pack it started has printed
#   its own last error; waiting here until every writer is done (the command
#   substitution reads to the end) keeps EXPLANATION the last line.
fetch_or_fail() {
    local explanation=$1 output status=0
    shift
    output=$("$@" 2>&1) || status=$?
    [ -z "$output" ] || printf '%s\n' "$output" >&2
    if [ "$status" -ne 0 ]; then
        echo "$explanation" >&2
        exit 1
    fi
}
