"""A test runner, where the design card puts it: ``python test_runner.py ... CLONE``.

It registers with the dispatcher, then tests each commit it is given in CLONE (a
clone of the watched repository that only this runner uses) and reports the verdict.
The code is commit_ci/runner.py; installed, the same command is ``ci-runner``.
``python test_runner.py --help`` lists the options.
"""

import sys

from commit_ci.runner import main

if __name__ == "__main__":
    sys.exit(main())
