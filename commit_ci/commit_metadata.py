"""Subjects and authors of commits, for people to read next to a commit id.

They come from a clone of the watched repository that only the dispatcher uses
(``--repo``), read with GitPython. Everything here is text from a commit: untrusted,
cut to a bounded length, and escaped wherever it is shown.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import git

from commit_ci.processes import run_step

log = logging.getLogger("dispatcher.commits")

#: Longer subjects and author names are cut, with an ellipsis.
SUBJECT_CHARS = 200
AUTHOR_CHARS = 80
#: A fetch for commits missing from the clone is killed after this long.
FETCH_TIMEOUT_S = 30.0
#: After a failed fetch, or one that did not bring a commit, the next fetch for
#: that commit waits this long: a commit that never comes must not cost a fetch
#: per lookup.
FETCH_RETRY_S = 60.0


@dataclass(frozen=True)
class CommitInfo:
    subject: str
    author: str


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` - 1 characters and an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class CommitMetadata:
    """Subjects and authors of commits from the clone at ``path``.

    A commit not in the clone yet (the observer or a push hook reported it before
    this clone saw it) triggers one ``git fetch``, bounded by ``FETCH_TIMEOUT_S``;
    commits still missing after it, and all of them after a failed fetch, are not
    fetched for again before ``FETCH_RETRY_S``. Not thread-safe: one thread (the
    results page's) uses it.
    """

    def __init__(self, path: str):
        try:
            self.repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
            raise ValueError("%s is not a git repository (%s)" % (path, exc.__class__.__name__)) from None
        self.path = self.repo.working_tree_dir or self.repo.git_dir
        self._known: dict[str, CommitInfo] = {}
        #: Missing commits a fetch has been tried for, and when the last fetch ended.
        self._fetched_for: set[str] = set()
        self._last_fetch = -FETCH_RETRY_S
        self._last_fetch_failed = False

    def close(self) -> None:
        self.repo.close()  # ends GitPython's persistent `git cat-file` processes

    def lookup(self, commits: list[str]) -> dict[str, CommitInfo]:
        """What is known of ``commits``; an unknown one is simply left out."""
        found = {sha: info for sha in commits if (info := self._known.get(sha) or self._read(sha))}
        missing = [sha for sha in commits if sha not in found]
        if missing and self._should_fetch(missing):
            self._fetch(len(missing))
            self._fetched_for.update(missing)
            found.update({sha: info for sha in missing if (info := self._read(sha))})
        # Remember only what was asked for last: memory stays bounded by what one caller shows.
        self._known = {sha: found[sha] for sha in commits if sha in found}
        self._fetched_for &= set(commits)
        return found

    def _read(self, sha: str) -> CommitInfo | None:
        try:
            commit = self.repo.commit(sha)
            return CommitInfo(cut(commit.summary, SUBJECT_CHARS), cut(commit.author.name or "", AUTHOR_CHARS))
        except (ValueError, git.BadName, git.BadObject, git.GitCommandError):
            return None

    def _should_fetch(self, missing: list[str]) -> bool:
        if not self.repo.remotes:
            return False
        if time.monotonic() - self._last_fetch >= FETCH_RETRY_S:
            return True
        return not self._last_fetch_failed and any(sha not in self._fetched_for for sha in missing)

    def _fetch(self, missing: int) -> None:
        """``git fetch`` as a bounded step (with the ssh or https helper it started,
        so nothing is left holding on when it is killed)."""
        log.info("%d commit(s) not in %s: fetching", missing, self.path)
        try:
            ended = run_step(["git", "fetch", "--quiet"], cwd=self.path, timeout=FETCH_TIMEOUT_S,
                             env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        except OSError as exc:
            ended = None
            log.warning("cannot run git fetch in %s: %s; commits shown by id", self.path, exc)
        self._last_fetch = time.monotonic()
        self._last_fetch_failed = ended is None or not ended.succeeded
        if ended is not None and ended.killed:
            log.warning("fetch in %s took over %.0f s: killed; commits shown by id", self.path, FETCH_TIMEOUT_S)
        elif ended is not None and not ended.succeeded:
            log.warning("fetch in %s failed: %s; commits shown by id", self.path, ended.last_line()[:300])
