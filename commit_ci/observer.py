"""Repository observer: reports every new commit of one branch to the dispatcher.

Every ``--interval`` seconds it fetches the watched branch into its own clone
(update_repo.sh), lists with GitPython the commits that are new since the last one
the dispatcher acknowledged, and sends them to the dispatcher one ``dispatch`` at a
time, oldest first (``--latest-only``: only the newest, as the original design
did). After each acknowledged commit it records that commit in a small state file,
written atomically, so a restart neither skips commits nor reports old ones again.
While the dispatcher is down or refuses, it keeps the commits and tries again
every few seconds; nothing is skipped. On its very first run it reports the
branch's current tip only, not the whole history.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

import git

from commit_ci.client import Connection
from commit_ci.daemon import add_logging_arguments, install_stop_signals, setup_logging
from commit_ci.files import atomic_write
from commit_ci.git_scripts import script_path
from commit_ci.processes import TIMEOUT, run_step
from commit_ci.protocol import request
from commit_ci.security import Security, add_security_arguments, security_from_arguments
from commit_ci.wire import ProtocolError, format_address, parse_address, parse_commit

log = logging.getLogger("observer")

DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_INTERVAL_S = 5.0
#: Wait before trying again after the fetch failed or the dispatcher was unreachable.
RETRY_INTERVAL_S = 3.0
#: Longest a fetch may take before it is abandoned (and retried).
FETCH_TIMEOUT_S = 300.0
STATE_VERSION = 1


class RepoObserver:
    """Watches ``remote/branch`` through the clone at ``clone``; see the module docstring."""

    def __init__(
        self,
        clone: str,
        dispatcher: tuple[str, int],
        branch: str | None = None,
        remote: str = "origin",
        latest_only: bool = False,
        state_file: str | None = None,
        security: Security | None = None,
    ):
        self.security = security or Security()
        self.repo = git.Repo(clone)
        self.clone = self.repo.working_tree_dir or clone
        self.dispatcher = dispatcher
        self.remote = remote
        if branch is None:
            try:
                branch = self.repo.active_branch.name
            except TypeError:  # detached HEAD has no branch to follow
                raise ValueError("%s has a detached HEAD: say which branch to watch with --branch" % clone) from None
        self.branch = branch
        self.latest_only = latest_only
        self.state_file = state_file or os.path.join(self.repo.git_dir, "ci_observer_state.json")
        self._key = "%s/%s" % (remote, branch)

    # --- what has been reported ------------------------------------------------------

    def _load_state(self) -> dict:
        try:
            with open(self.state_file, encoding="utf-8") as handle:
                state = json.load(handle)
        except FileNotFoundError:
            return {"version": STATE_VERSION, "branches": {}}
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("branches"), dict):
            raise ValueError("%s is not an observer state file this version understands" % self.state_file)
        return state

    def boundary(self) -> list[str] | None:
        """Commits whose ancestors (themselves included) count as reported; None on a first run."""
        return self._load_state()["branches"].get(self._key)

    def remember(self, boundary: list[str]) -> None:
        state = self._load_state()
        state["branches"][self._key] = boundary
        atomic_write(self.state_file, (json.dumps(state, indent=2) + "\n").encode("utf-8"))

    # --- one round -------------------------------------------------------------------

    def fetch(self, stop: threading.Event | None = None) -> str | None:
        """Fetch the branch; its tip's commit id, or None (logged) if the fetch failed
        or ``stop`` was set meanwhile."""
        # A bounded step: a fetch that hangs is killed with the git processes it
        # started; with no terminal to ask for a password on.
        ended = run_step([script_path("update_repo.sh"), self.clone, self.remote, self.branch],
                         env=dict(os.environ, GIT_TERMINAL_PROMPT="0"), timeout=FETCH_TIMEOUT_S, stop=stop,
                         capture_stdout=True)
        if ended.killed == TIMEOUT:
            log.warning("fetch of %s took over %.0f s: killed; will retry", self._key, FETCH_TIMEOUT_S)
            return None
        if not ended.succeeded:
            if ended.killed is None:
                log.warning("fetch of %s failed: %s", self._key, ended.last_line())
            return None
        try:
            return parse_commit(ended.stdout.decode("ascii", "replace").strip())
        except ProtocolError:
            log.warning("update_repo.sh printed no commit id: %r", ended.stdout[:200])
            return None

    def new_commits(self, tip: str) -> list[str]:
        """Commits up to ``tip`` not yet reported, oldest first (parents before children)."""
        boundary = self.boundary()
        if boundary is None:
            # First run: everything before the current tip counts as already known.
            boundary = [parent.hexsha for parent in self.repo.commit(tip).parents]
            self.remember(boundary)
            log.info("first run on %s: starting from its tip %s", self._key, tip)
        known = []
        for sha in boundary:
            try:
                self.repo.commit(sha)
                known.append(sha)
            except (ValueError, git.BadName):
                log.warning("remembered commit %s is gone (history rewritten?); ignoring it", sha)
        if len(known) < len(boundary) and not known:
            known = [parent.hexsha for parent in self.repo.commit(tip).parents]
        elif known and not self.repo.merge_base(tip, *known):
            # A history with nothing in common with what was reported (an unrelated
            # one force-pushed over the branch, an import): like a first run, its
            # tip only, not every commit it ever had.
            log.warning("%s now has a history unrelated to what was reported: starting again from its tip %s",
                        self._key, tip)
            known = [parent.hexsha for parent in self.repo.commit(tip).parents]
        revisions = [tip] + ["^" + sha for sha in known]
        return [commit.hexsha for commit in self.repo.iter_commits(revisions, reverse=True, topo_order=True)]

    def _covered(self, known: str, sha: str) -> bool:
        """Whether ``known`` is an ancestor of ``sha`` (or gone: then it marks nothing)."""
        try:
            return self.repo.is_ancestor(known, sha)
        except git.GitCommandError:
            return True

    def poll_once(self, stop: threading.Event | None = None) -> bool:
        """Fetch and report. True if everything new was acknowledged."""
        tip = self.fetch(stop)
        if tip is None:
            return False
        commits = self.new_commits(tip)
        if not commits:
            return True
        if self.latest_only and len(commits) > 1:
            log.info("%d new commits on %s; reporting only the newest (--latest-only)", len(commits), self._key)
            commits = commits[-1:]
        try:
            with Connection(self.dispatcher, security=self.security) as connection:
                for sha in commits:
                    answer = connection.request(request("dispatch", commit=sha))
                    if answer.verb != "OK":
                        log.warning("dispatcher refused commit %s: %s; will retry", sha, answer.get("reason"))
                        return False
                    # Side lines not yet reported (a merge's other parent listed
                    # after this commit) must stay outside the boundary.
                    boundary = [known for known in self.boundary() or [] if not self._covered(known, sha)]
                    self.remember(boundary + [sha])
                    summary = self.repo.commit(sha).summary
                    log.info("commit %s reported (%s)%s", sha, summary[:60], "" if answer.get("new") else " - already known")
        except (OSError, ProtocolError) as exc:
            log.warning("dispatcher %s unreachable (%s); will retry", format_address(self.dispatcher), exc)
            return False
        # Everything up to the tip is reported: the tip alone says so. What the list
        # held besides (commits a force-push left behind) would only grow, and cost
        # an ancestry check per commit reported.
        self.remember([tip])
        return True

    def run(self, stop: threading.Event, interval: float) -> None:
        while not stop.is_set():
            try:
                done = self.poll_once(stop)
            except (git.GitCommandError, ValueError, OSError) as exc:
                log.error("round failed: %s; will retry", exc)
                done = False
            stop.wait(interval if done else max(interval, RETRY_INTERVAL_S))


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-observer",
        description="Watch a branch of a git repository through REPO (a clone used only by the "
        "observer) and report every new commit to the dispatcher.",
    )
    parser.add_argument("repo", metavar="REPO", help="path to the observer's own clone of the repository")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="where the dispatcher listens (default: %(default)s)")
    parser.add_argument("--branch", help="branch to watch (default: the clone's current branch)")
    parser.add_argument("--remote", default="origin", help="remote to fetch from (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S,
                        help="seconds between fetches (default: %(default)s)")
    parser.add_argument("--latest-only", action="store_true",
                        help="report only the newest commit of each fetch, not every new one")
    parser.add_argument("--state-file", help="where to remember the last acknowledged commit "
                        "(default: REPO/.git/ci_observer_state.json)")
    add_logging_arguments(parser)
    add_security_arguments(parser, serves=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    if args.interval < 0:
        log.error("--interval must not be negative")
        return 2
    try:
        dispatcher = parse_address(args.dispatcher_server)
        security = security_from_arguments(args, serves=False)
        observer = RepoObserver(args.repo, dispatcher, args.branch, args.remote, args.latest_only, args.state_file, security)
        observer.boundary()  # a damaged state file should stop us now, not at the first round
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        log.error("%s is not a git clone: %s", args.repo, exc)
        return 2
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    stop = threading.Event()
    install_stop_signals(stop, log)
    log.info("watching %s/%s in %s every %g s; dispatcher %s",
             observer.remote, observer.branch, observer.clone, args.interval, format_address(dispatcher))
    observer.run(stop, args.interval)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
