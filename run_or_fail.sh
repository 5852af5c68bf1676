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
