"""A runner's clone made an exact, clean checkout of one commit.

The git step is test_runner_script.sh (fetch if need be, reset, clean; users may
adapt it), run as a bounded step (processes.py). Before it, ``GitDirGuard`` puts back
what the tests of the job before may have changed in the clone's ``.git``, which the
reset and the clean do not touch.
"""

from __future__ import annotations

import os
import re
import shutil
import threading

from commit_ci.files import atomic_write
from commit_ci.git_scripts import script_path
from commit_ci.processes import KnownChildren, StepEnd, run_step


class GitDirGuard:
    """Puts back what tests may change in the clone's ``.git`` that the checkout
    (reset, clean) does not: its configuration (core.autocrlf, sparse checkout,
    filters...), the ``info`` files (attributes, sparse-checkout patterns, excludes)
    and the hooks (which git would run during the next checkout).

    The tests run inside the clone and can write there, by accident (a ``git
    config`` run in the wrong folder) or not; a change would decide the verdicts
    of the commits after theirs. The state kept is the one found when the runner
    started, held in memory, where the tests cannot reach it: change the clone's
    configuration with the runner stopped.
    """

    #: Files kept as they were, relative to the git folder.
    FILES = ("config", "info/attributes", "info/sparse-checkout", "info/exclude")
    #: Folders whose files are kept as they were (none added, none changed).
    FOLDERS = ("hooks",)

    def __init__(self, git_dir: str):
        self.git_dir = git_dir
        self._kept = self._read()

    def _paths(self) -> list[str]:
        paths = list(self.FILES)
        for folder in self.FOLDERS:
            try:
                paths += [os.path.join(folder, name) for name in os.listdir(os.path.join(self.git_dir, folder))]
            except FileNotFoundError:
                pass
        return paths

    def _read(self) -> dict[str, tuple[bytes, int] | None]:
        """Each path's (contents, mode), or None where there is no file."""
        contents: dict[str, tuple[bytes, int] | None] = {}
        for relative in self._paths():
            try:
                with open(os.path.join(self.git_dir, relative), "rb") as handle:
                    contents[relative] = (handle.read(), os.fstat(handle.fileno()).st_mode & 0o777)
            except (FileNotFoundError, IsADirectoryError):
                contents[relative] = None
        return contents

    def restore(self) -> list[str]:
        """Put back every file that changed; the relative paths put back, but for what
        git itself writes there at every checkout (a submodule's registration)."""
        now = self._read()
        restored = [relative for relative in self._remove_submodule_hooks()]
        for relative in sorted(set(now) | set(self._kept)):
            was, path = self._kept.get(relative), os.path.join(self.git_dir, relative)
            if now.get(relative) == was:
                continue
            if was is None:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write(path, was[0], durable=False)
                os.chmod(path, was[1])
            if not (relative == "config" and was is not None and now.get(relative) is not None
                    and _only_submodule_registrations(was[0], now[relative][0])):
                restored.append(relative)
        return restored

    def _remove_submodule_hooks(self) -> list[str]:
        """Remove the hooks in the submodules' git folders (``modules/*/hooks``, nested
        too), which the next checkout would run: git writes only ``.sample`` files there."""
        removed = []
        for folder, _subfolders, names in os.walk(os.path.join(self.git_dir, "modules")):
            if os.path.basename(folder) != "hooks":
                continue
            for name in names:
                if not name.endswith(".sample"):
                    path = os.path.join(folder, name)
                    os.unlink(path)
                    removed.append(os.path.relpath(path, self.git_dir))
        return removed


#: What ``git submodule update --init`` writes into the clone's config for each submodule.
_SUBMODULE_REGISTRATION = re.compile(r'\s*(\[submodule ".*"\]|(url|active)\s*=.*)\s*\Z')


def _only_submodule_registrations(kept: bytes, now: bytes) -> bool:
    """Whether the config ``now`` differs from the one ``kept`` only by the lines with
    which git registers submodules (restored all the same: other keys there, such as
    ``update = !command``, would run at the next checkout)."""
    before, after = kept.decode("utf-8", "replace").splitlines(), now.decode("utf-8", "replace").splitlines()
    changed = set(before) ^ set(after)
    return all(_SUBMODULE_REGISTRATION.match(line) for line in changed)


def check_out(clone: str, commit: str, output_path: str, timeout: float, stop: threading.Event) -> StepEnd:
    """Fetch if need be and check ``commit`` out in ``clone``, cleanly, with the output
    in ``output_path``; how the step ended.

    Like the tests, in a session of its own and under a time limit: a fetch that
    hangs is killed with everything it started, and a stopping runner does not wait
    for it (see ``_git_env`` for its variables).
    """
    return run_step([script_path("test_runner_script.sh"), clone, commit], cwd=clone, env=_git_env(), timeout=timeout,
                    stop=stop, output_path=output_path)


def fetch_ahead(clone: str, commit: str, output_path: str, timeout: float, stop: threading.Event,
                known: KnownChildren) -> StepEnd:
    """Fetch ``commit`` into ``clone`` if it is not there yet, leaving the work tree
    alone (the runner may be testing another commit in it), as one of the ``known``
    children; how the step ended."""
    return run_step([script_path("test_runner_script.sh"), "--fetch-only", clone, commit], cwd=clone,
                    env=_git_env(), timeout=timeout, stop=stop, output_path=output_path, known=known)


def _git_env() -> dict:
    """The runner's variables for its git steps: no password prompt (with no terminal
    to ask on, a fetch that would wait for one fails instead), and every folder safe.

    The submodules' work trees may be a job user's (isolation.py), and git refuses a
    repository another user owns; the runner has removed every git folder or link
    the job could have planted there, so they are safe to enter. Given on top of any
    configuration the runner itself was started with this way."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    count = int(env.get("GIT_CONFIG_COUNT", "0")) if env.get("GIT_CONFIG_COUNT", "0").isdigit() else 0
    env.update({"GIT_CONFIG_COUNT": str(count + 1), "GIT_CONFIG_KEY_%d" % count: "safe.directory",
                "GIT_CONFIG_VALUE_%d" % count: "*"})
    return env
