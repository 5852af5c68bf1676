"""commit-ci: a small, self-hosted, distributed CI system that tests every commit.

The package's modules, in the order data flows through them (README.md's files
table says the same for users):

protocol, from the bytes up
    wire          bytes on a socket: header lines, reads under deadlines, commit ids,
                  addresses, connect() -- cheap to import, for the push hook
    security      the shared secret, auth lines, TLS, the daemons' security options
    protocol      the verb table and the codec between bytes and messages
    client        a connection and communicate(): one request, one reply
    server        ProtocolServer, which the dispatcher and the runners serve with

shared by the daemons
    files         atomic writes
    daemon        logging and stop signals
    git_scripts   where the shell scripts with the git steps are

the daemons and their parts
    observer      watches a branch, reports new commits (ci-observer)
    push_hook     what a git hook runs on every push; push_trigger installs it (ci-trigger)
    dispatcher    queue, runners, scheduling, heartbeat (ci-dispatcher)
    store         the dispatcher's SQLite job queue and job state machine
    result_files  the files of a result in test_results/
    page          the results page, index.html
    runner        a test runner (ci-runner); warm_pytest: the pytest it forks per job

tools
    ctl           the operator's command (ci-ctl)
    launcher      the whole system on one machine (ci-local)

Importing the package itself costs nothing: the push hook imports ``commit_ci.wire``
and ``commit_ci.security`` on every push.
"""

__version__ = "0.2.0"
