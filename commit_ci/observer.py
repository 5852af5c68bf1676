"""Repository observer: reports every new commit of the watched branches to the dispatcher.

Every ``--interval`` seconds it fetches the watched branches into its own clone
(update_repo.sh), lists with GitPython the commits of each that are new since the
last one the dispatcher acknowledged, and sends them to the dispatcher one
``dispatch`` at a time, oldest first (``--latest-only``: only the newest, as the
original design did), each with its branch and the branch's new tip, which the
dispatcher queues with the first of them so that it runs first. After each
acknowledged commit it records that commit in a small state file, written
atomically, so a restart neither skips commits nor reports old ones again. While
the dispatcher is down or refuses, it keeps the commits and tries again every few
seconds; nothing is skipped. On its very first run on a branch it reports the
branch's current tip only, not the whole history.

It watches one branch (the clone's current one) or several (``--branch``, repeated),
each a name or a pattern with one ``*`` (``release/*``): a pattern is matched against
the remote's branches at every fetch, so a branch created later is watched from the
next poll on, from its tip.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
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
from commit_ci.wire import ProtocolError, format_address, is_branch_name, parse_address, parse_commit

log = logging.getLogger("observer")

DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_INTERVAL_S = 5.0
#: Wait before trying again after the fetch failed or the dispatcher was unreachable.
RETRY_INTERVAL_S = 3.0
#: Longest a fetch may take before it is abandoned (and retried).
FETCH_TIMEOUT_S = 300.0
STATE_VERSION = 1
#: The one wildcard a branch pattern may have (git refspecs allow one); it matches any
#: characters, '/' included.
WILDCARD = "*"


def check_branch_spec(spec: str) -> str:
    """A branch name, or a pattern with one ``*`` that a git branch name would be with
    the ``*`` replaced; ValueError otherwise."""
    if spec.count(WILDCARD) > 1 or not is_branch_name(spec.replace(WILDCARD, "x")):
        raise ValueError("%r is not a branch name, nor a pattern of one with a single '*'" % spec)
    return spec


def spec_matcher(spec: str) -> re.Pattern:
    """What a branch name must match to be watched under ``spec``."""
    return re.compile(".*".join(re.escape(part) for part in spec.split(WILDCARD)) + r"\Z")


class RepoObserver:
    """Watches ``remote/branch`` for each watched branch (names or patterns) through the
    clone at ``clone``; see the module docstring. Methods that take ``branch`` default
    to the first one watched."""

    def __init__(
        self,
        clone: str,
        dispatcher: tuple[str, int],
        branch: str | list[str] | None = None,
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
        #: What is watched: branch names and patterns, in the order given.
        self.branches = [check_branch_spec(spec) for spec in ([branch] if isinstance(branch, str) else branch)]
        if not self.branches:
            raise ValueError("no branch to watch")
        self.branch = self.branches[0]
        self.latest_only = latest_only
        self.state_file = state_file or os.path.join(self.repo.git_dir, "ci_observer_state.json")
        #: Whether the dispatcher takes dispatch's branch and tip (older ones do not).
        self._send_branch = True

    def key(self, branch: str | None = None) -> str:
        """The state file's key of ``branch`` (by default the first watched): ``remote/branch``."""
        return "%s/%s" % (self.remote, branch or self.branch)

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

    def boundary(self, branch: str | None = None) -> list[str] | None:
        """Commits whose ancestors (themselves included) count as reported on ``branch``;
        None on a first run."""
        return self._load_state()["branches"].get(self.key(branch))

    def remember(self, boundary: list[str], branch: str | None = None) -> None:
        state = self._load_state()
        state["branches"][self.key(branch)] = boundary
        atomic_write(self.state_file, (json.dumps(state, indent=2) + "\n").encode("utf-8"))

    # --- one round -------------------------------------------------------------------

    def _update(self, spec: str, stop: threading.Event | None) -> str | None:
        """Run update_repo.sh for ``spec``: what it printed, or None (logged) if the
        fetch failed or ``stop`` was set meanwhile."""
        # A bounded step: a fetch that hangs is killed with the git processes it
        # started; with no terminal to ask for a password on.
        ended = run_step([script_path("update_repo.sh"), self.clone, self.remote, spec],
                         env=dict(os.environ, GIT_TERMINAL_PROMPT="0"), timeout=FETCH_TIMEOUT_S, stop=stop,
                         capture_stdout=True)
        if ended.killed == TIMEOUT:
            log.warning("fetch of %s took over %.0f s: killed; will retry", self.key(spec), FETCH_TIMEOUT_S)
            return None
        if not ended.succeeded:
            if ended.killed is None:
                log.warning("fetch of %s failed: %s", self.key(spec), ended.last_line())
            return None
        return ended.stdout.decode("utf-8", "replace")

    def fetch(self, stop: threading.Event | None = None, branch: str | None = None) -> str | None:
        """Fetch a branch (by default the first watched); its tip's commit id, or None
        (logged) if the fetch failed or ``stop`` was set meanwhile."""
        printed = self._update(branch or self.branch, stop)
        if printed is None:
            return None
        try:
            return parse_commit(printed.strip())
        except ProtocolError:
            log.warning("update_repo.sh printed no commit id: %r", printed[:200])
            return None

    def fetch_matching(self, pattern: str, stop: threading.Event | None = None) -> dict[str, str] | None:
        """Fetch every branch of the remote that ``pattern`` matches; their tips by
        name, or None (logged) if the fetch failed."""
        printed = self._update(pattern, stop)
        if printed is None:
            return None
        prefix, matches, tips = "refs/remotes/%s/" % self.remote, spec_matcher(pattern), {}
        for line in printed.splitlines():
            sha, _, ref = line.partition(" ")
            name = ref[len(prefix):]
            if ref.startswith(prefix) and matches.match(name) and is_branch_name(name):
                try:
                    tips[name] = parse_commit(sha)
                except ProtocolError:
                    log.warning("update_repo.sh printed no commit id for %s: %r", ref, sha[:80])
        return tips

    def tips(self, stop: threading.Event | None = None) -> tuple[dict[str, str], bool]:
        """Fetch every watched branch: the tip of each branch found, by name, and
        whether every fetch succeeded."""
        tips: dict[str, str] = {}
        complete = True
        for spec in self.branches:
            if WILDCARD in spec:
                found = self.fetch_matching(spec, stop)
                tips.update(found or {})
            else:
                found = self.fetch(stop, spec)
                if found is not None:
                    tips[spec] = found
            complete = complete and found is not None
        return tips, complete

    def new_commits(self, tip: str, branch: str | None = None) -> list[str]:
        """Commits of ``branch`` up to ``tip`` not yet reported, oldest first (parents
        before children)."""
        key = self.key(branch)
        boundary = self.boundary(branch)
        if boundary is None:
            # First run: everything before the current tip counts as already known.
            boundary = [parent.hexsha for parent in self.repo.commit(tip).parents]
            self.remember(boundary, branch)
            log.info("first run on %s: starting from its tip %s", key, tip)
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
                        key, tip)
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
        """Fetch and report. True if everything new on every watched branch was acknowledged."""
        tips, done = self.tips(stop)
        rounds = []
        for branch, tip in tips.items():
            commits = self.new_commits(tip, branch)
            if self.latest_only and len(commits) > 1:
                log.info("%d new commits on %s; reporting only the newest (--latest-only)", len(commits),
                         self.key(branch))
                commits = commits[-1:]
            if commits:
                rounds.append((branch, tip, commits))
        if not rounds:
            return done
        try:
            with Connection(self.dispatcher, security=self.security) as connection:
                for branch, tip, commits in rounds:
                    # A refusal ends this branch's round; the other branches go on.
                    done = self._report(connection, branch, tip, commits) and done
        except (OSError, ProtocolError) as exc:
            log.warning("dispatcher %s unreachable (%s); will retry", format_address(self.dispatcher), exc)
            return False
        return done

    def _report(self, connection: Connection, branch: str, tip: str, commits: list[str]) -> bool:
        """Send one branch's new commits, oldest first, each with the branch and its
        tip (which the dispatcher queues with the first, ahead of them). True if all
        were acknowledged."""
        ahead = False  # the tip was queued with an earlier commit of this round
        for sha in commits:
            answer = self._dispatch(connection, sha, branch, tip)
            if answer.verb != "OK":
                log.warning("dispatcher refused commit %s of %s: %s; will retry", sha, self.key(branch),
                            answer.get("reason"))
                return False
            # Side lines not yet reported (a merge's other parent listed
            # after this commit) must stay outside the boundary.
            boundary = [known for known in self.boundary(branch) or [] if not self._covered(known, sha)]
            self.remember(boundary + [sha], branch)
            summary = self.repo.commit(sha).summary
            if sha == tip and ahead:
                known = " - queued with the first commit of the round"
            else:
                known = "" if answer.get("new") else " - already known"
            ahead = ahead or (answer.get("new") or 0) > 1
            log.info("commit %s reported on %s (%s)%s", sha, self.key(branch), summary[:60], known)
        # Everything up to the tip is reported: the tip alone says so. What the list
        # held besides (commits a force-push left behind) would only grow, and cost
        # an ancestry check per commit reported.
        self.remember([tip], branch)
        return True

    def _dispatch(self, connection: Connection, sha: str, branch: str, tip: str):
        if not self._send_branch:
            return connection.request(request("dispatch", commit=sha))
        answer = connection.request(request("dispatch", commit=sha, branch=branch, tip=tip))
        if answer.verb == "ERR" and str(answer.get("reason", "")).startswith("unknown option"):
            # A dispatcher older than branches: the round is retried without them.
            log.warning("dispatcher %s takes no branch (an older version): commits are reported without one",
                        format_address(self.dispatcher))
            self._send_branch = False
        return answer

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
    parser.add_argument("--branch", action="append",
                        help="branch to watch, or a pattern with one '*' matched against the remote's branches at "
                        "every fetch (release/*); repeat it to watch several (default: the clone's current branch)")
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
    log.info("watching %s in %s every %g s; dispatcher %s",
             ", ".join(observer.key(spec) for spec in observer.branches), observer.clone, args.interval,
             format_address(dispatcher))
    observer.run(stop, args.interval)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
