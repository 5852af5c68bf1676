"""The git steps the daemons run, kept as shell scripts that users may read and adapt
(``update_repo.sh``, ``test_runner_script.sh``, ``run_or_fail.sh``), and where to find them."""

from __future__ import annotations

import os
import shutil
import sysconfig

#: The scripts live at the top of a checkout, beside this package's folder.
CHECKOUT_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_path(name: str) -> str:
    """Where one of the project's shell scripts is: at the top of a source checkout
    (beside the ``commit_ci`` folder); after ``pip install``, in the environment's
    scripts folder (setup.py installs them there) or elsewhere on PATH."""
    beside = os.path.join(CHECKOUT_FOLDER, name)
    if os.path.exists(beside):
        return beside
    installed = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.exists(installed):
        return installed
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError("%s is neither in %s, in %s, nor on PATH" % (name, CHECKOUT_FOLDER, sysconfig.get_path("scripts")))
    return found
