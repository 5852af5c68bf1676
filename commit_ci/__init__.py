"""commit-ci: a small, self-hosted, distributed CI system that tests every commit.

The package's modules, one job each, in the order a commit flows through them
(README.md's files table says the same for users):

the protocol, from the bytes up
    wire            bytes on a socket: header lines, reads under deadlines, commit ids,
                    addresses, connect() -- cheap to import, for the push hook
    security        the shared secret, auth lines, TLS, the daemons' security options
    protocol        the verb table and the codec between bytes and messages
    client          a connection and communicate(): one request, one reply
    server          ProtocolServer, which the dispatcher and the runners serve with

what everything shares
    states          the states of a job, an attempt and a runner, named once
    result          Result: one type from the runner to the wire to the files
    files           atomic writes
    processes       one bounded step: own session, time limit, group killed
    daemon          logging and stop signals
    git_scripts     where the shell scripts with the git steps are

finding commits
    observer        watches a branch, reports new commits (ci-observer)
    push_hook       what a git hook runs on every push; push_trigger installs it (ci-trigger)

the dispatcher
    dispatcher      queue, runners, scheduling, heartbeat (ci-dispatcher)
    store           the SQLite job queue and the job state machine
    result_files    the files of a result in test_results/
    page            the results page, index.html (templates/index.html)
    commit_metadata commit subjects and authors for people to read
    notices         when a branch's change of state is told, and what is said
    notify          notifications sent from the store's outbox (command, webhook, mail, status)

a runner
    runner          requests, the job held, the worker thread (ci-runner)
    executor        one job: checkout, environment, tests, leftovers, result
    project_config  .commit-ci.toml, read and checked
    environments    the commit's virtualenv, built once and cached
    checkout        the clone made a clean checkout of a commit
    warm_pytest     the pytest forked for each job
    leftovers       what a job left running, killed
    outbox          results kept on disk until delivered
    dispatcher_link registering, delivering, giving up
    junit           the one reader of JUnit XML

tools
    ctl             the operator's command (ci-ctl)
    launcher        the whole system on one machine (ci-local)

Importing the package itself costs nothing: the push hook imports ``commit_ci.wire``
and ``commit_ci.security`` on every push.
"""

__version__ = "0.2.0"
