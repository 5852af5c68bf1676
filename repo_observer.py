"""The repository observer, where the design card puts it: ``python repo_observer.py ... CLONE``.

It fetches the watched branch into CLONE (a clone that only the observer uses) and
reports every new commit to the dispatcher, oldest first. The code is
commit_ci/observer.py; installed, the same command is ``ci-observer``.
``python repo_observer.py --help`` lists the options.
"""

import sys

from commit_ci.observer import main

if __name__ == "__main__":
    sys.exit(main())
