"""The dispatcher, where the design card puts it: ``python dispatcher.py --host H --port P``.

It queues the commits the observer reports, hands each to an idle test runner, watches
the runners with a heartbeat and writes one result per commit to test_results/. The
code is commit_ci/dispatcher.py; installed, the same command is ``ci-dispatcher``.
``python dispatcher.py --help`` lists the options.
"""

import sys

from commit_ci.dispatcher import main

if __name__ == "__main__":
    sys.exit(main())
