"""repo_observer.RepoObserver in-process, against real git repositories.

Most tests call fetch / new_commits / boundary / remember directly; those that need
``poll_once`` talk to a tiny fake dispatcher (a server.ProtocolServer on 127.0.0.1,
port 0, in a thread) that records every ``dispatch`` and answers as told.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading

import pytest

from commit_ci import protocol, server
from commit_ci.observer import RepoObserver

from conftest import git


class FakeDispatcher:
    """Records dispatched commits; ``refuse(commit, accepted_so_far)`` decides which get ERR."""

    def __init__(self):
        self.lock = threading.Lock()
        self.received: list[str] = []
        self.accepted: list[str] = []
        self.refuse = lambda commit, accepted: False
        self.server = server.ProtocolServer(("127.0.0.1", 0), self.handle, logging.getLogger("fake-dispatcher"))
        self.thread = server.serve_in_thread(self.server, "fake-dispatcher")

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def handle(self, message: protocol.Message, peer: str) -> protocol.Message:
        if message.verb != "dispatch":
            return protocol.error("only dispatch here")
        commit = message.fields["commit"]
        with self.lock:
            self.received.append(commit)
            if self.refuse(commit, list(self.accepted)):
                return protocol.error("refused for the test")
            new = commit not in self.accepted
            self.accepted.append(commit)
        return protocol.reply("OK", new=int(new), job="queued")

    def take(self) -> list[str]:
        """Commits accepted since the last call."""
        with self.lock:
            taken, self.accepted[:] = list(self.accepted), []
            self.received.clear()
        return taken

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def dispatcher():
    fake = FakeDispatcher()
    yield fake
    fake.stop()


@pytest.fixture
def clone(upstream, tmp_path):
    return upstream.clone(tmp_path / "observer-clone")


@pytest.fixture
def observers():
    """Every RepoObserver a test makes; their git helper processes are stopped at the end."""
    made: list[RepoObserver] = []
    yield made
    for observer in made:
        observer.repo.close()


@pytest.fixture
def make_observer(clone, dispatcher, observers):
    def make(address=None, **options) -> RepoObserver:
        observer = RepoObserver(str(clone), address or dispatcher.address, **options)
        observers.append(observer)
        return observer

    return make


def add_commits(upstream, count: int, prefix: str = "c") -> list[str]:
    return [upstream.commit({"%s_%d.txt" % (prefix, i): "%s %d\n" % (prefix, i)}, "%s %d" % (prefix, i)) for i in range(count)]


def parents(path, sha: str) -> list[str]:
    return git(path, "rev-list", "--parents", "-n", "1", sha).split()[1:]


def assert_parents_first(path, commits: list[str]) -> None:
    position = {sha: index for index, sha in enumerate(commits)}
    for sha in commits:
        for parent in parents(path, sha):
            if parent in position:
                assert position[parent] < position[sha], "parent %s after child %s" % (parent[:8], sha[:8])


# --- without a dispatcher -------------------------------------------------------------------


def test_fetch_returns_the_upstream_tip(make_observer, upstream):
    observer = make_observer()
    assert observer.fetch() == upstream.head()
    newer = add_commits(upstream, 2)[-1]
    assert observer.fetch() == newer


def test_fetch_of_a_missing_branch_fails_softly(make_observer, caplog):
    observer = make_observer(branch="no-such-branch")
    with caplog.at_level(logging.WARNING, logger="observer"):
        assert observer.fetch() is None
    assert "fetch of origin/no-such-branch failed" in caplog.text


def test_first_run_reports_only_the_tip(make_observer, upstream):
    add_commits(upstream, 3)
    observer = make_observer()
    assert observer.boundary() is None
    tip = observer.fetch()
    assert observer.new_commits(tip) == [tip]
    assert observer.boundary() == parents(upstream.path, tip), "everything before the tip counts as known"


def test_first_run_on_a_root_commit(make_observer, upstream):
    observer = make_observer()
    tip = observer.fetch()
    assert parents(upstream.path, tip) == []
    assert observer.new_commits(tip) == [tip]
    observer.remember([tip])
    assert observer.new_commits(observer.fetch()) == []


def test_new_commits_come_oldest_first(make_observer, upstream):
    observer = make_observer()
    observer.remember([observer.fetch()])
    made = add_commits(upstream, 5)
    assert observer.new_commits(observer.fetch()) == made
    observer.remember([made[2]])
    assert observer.new_commits(observer.fetch()) == made[3:]


def test_remember_and_boundary_round_trip_per_branch(make_observer, upstream, clone):
    main = make_observer()
    other = make_observer(branch="other")
    main.remember(["a" * 40])
    other.remember(["b" * 40, "c" * 40])
    assert main.boundary() == ["a" * 40]
    assert other.boundary() == ["b" * 40, "c" * 40]
    state = json.loads((clone / ".git" / "ci_observer_state.json").read_text())
    assert state == {"version": 1, "branches": {"origin/main": ["a" * 40], "origin/other": ["b" * 40, "c" * 40]}}
    assert not list((clone / ".git").glob(".tmp-*")), "written atomically, no leftovers"


@pytest.mark.parametrize("damaged", ['{"version": 99}', '{"version": 1}', '{"version": 1, "branches": []}', "[]"])
def test_damaged_state_file_is_refused(make_observer, clone, damaged):
    (clone / ".git" / "ci_observer_state.json").write_text(damaged)
    with pytest.raises(ValueError, match="state file"):
        make_observer().boundary()


def test_merge_history_lists_every_commit_once_parents_first(make_observer, upstream, monkeypatch):
    observer = make_observer()
    observer.remember([observer.fetch()])
    path = upstream.path
    # Committer clocks disagree: P claims to come from the future and its child X from
    # the past, so an order by date alone would put X before its parent.
    monkeypatch.setenv("GIT_COMMITTER_DATE", "2096-01-01 00:00:00 +0000")
    (p,) = add_commits(upstream, 1, prefix="future")
    monkeypatch.setenv("GIT_COMMITTER_DATE", "2001-01-01 00:00:00 +0000")
    (x,) = add_commits(upstream, 1, prefix="past")
    monkeypatch.delenv("GIT_COMMITTER_DATE")
    git(path, "checkout", "--quiet", "-b", "side", p)
    side = add_commits(upstream, 3, prefix="side")
    git(path, "checkout", "--quiet", "main")
    main = add_commits(upstream, 2, prefix="main")
    git(path, "merge", "--quiet", "--no-ff", "--no-edit", "side")
    merge = upstream.head()
    more = add_commits(upstream, 1, prefix="after")

    commits = observer.new_commits(observer.fetch())

    assert sorted(commits) == sorted([p, x, *side, *main, merge, *more])
    assert len(commits) == len(set(commits))
    assert_parents_first(path, commits)
    assert commits[-1] == more[0]


def test_remembered_commit_that_is_gone_is_ignored(make_observer, upstream, caplog):
    observer = make_observer()
    add_commits(upstream, 2)
    observer.remember(["deadbeef" * 5])
    tip = observer.fetch()
    with caplog.at_level(logging.WARNING, logger="observer"):
        assert observer.new_commits(tip) == [tip], "falls back to the tip, not the whole history"
    assert "deadbeef" in caplog.text and "gone" in caplog.text


def test_detached_head_needs_a_branch(clone, make_observer):
    git(clone, "checkout", "--quiet", "--detach", "HEAD")
    with pytest.raises(ValueError, match="detached HEAD"):
        make_observer()
    observer = make_observer(branch="main")
    assert observer.branch == "main"
    assert observer.fetch() is not None


# --- with a fake dispatcher ----------------------------------------------------------------


def test_poll_reports_the_tip_then_each_new_commit_once(make_observer, upstream, dispatcher):
    add_commits(upstream, 2)
    observer = make_observer()
    assert observer.poll_once()
    assert dispatcher.take() == [upstream.head()]
    assert observer.poll_once()
    assert dispatcher.take() == [], "nothing new, nothing sent"

    made = add_commits(upstream, 3)
    assert observer.poll_once()
    assert dispatcher.take() == made
    assert observer.boundary() == [made[-1]]


def test_restart_reports_nothing_twice(make_observer, upstream, dispatcher):
    initial = upstream.head()
    first = make_observer()
    assert first.poll_once()
    made = add_commits(upstream, 2)
    assert first.poll_once()
    assert dispatcher.take() == [initial, *made]

    restarted = make_observer()
    assert restarted.poll_once()
    assert dispatcher.take() == []
    newer = add_commits(upstream, 1)
    assert restarted.poll_once()
    assert dispatcher.take() == newer


def test_latest_only_reports_only_the_newest(make_observer, upstream, dispatcher):
    observer = make_observer(latest_only=True)
    assert observer.poll_once()
    dispatcher.take()
    made = add_commits(upstream, 4)
    assert observer.poll_once()
    assert dispatcher.take() == [made[-1]]
    assert observer.poll_once()
    assert dispatcher.take() == []


def test_refusing_dispatcher_makes_poll_fail_and_nothing_is_remembered(make_observer, upstream, dispatcher, clone):
    observer = make_observer()
    assert observer.poll_once()
    dispatcher.take()
    state_file = clone / ".git" / "ci_observer_state.json"
    remembered = state_file.read_bytes()
    made = add_commits(upstream, 3)
    dispatcher.refuse = lambda commit, accepted: True

    assert observer.poll_once() is False
    assert observer.poll_once() is False

    assert state_file.read_bytes() == remembered
    assert dispatcher.received == [made[0], made[0]], "stops at the first refusal, retries it next round"
    dispatcher.refuse = lambda commit, accepted: False
    assert observer.poll_once()
    assert dispatcher.take() == made


def test_refusal_on_the_first_run_does_not_remember_the_tip(make_observer, upstream, dispatcher):
    add_commits(upstream, 2)
    dispatcher.refuse = lambda commit, accepted: True
    observer = make_observer()
    assert observer.poll_once() is False
    assert upstream.head() not in (observer.boundary() or [])
    dispatcher.refuse = lambda commit, accepted: False
    assert make_observer().poll_once()
    assert dispatcher.take() == [upstream.head()]


def test_refusal_mid_round_keeps_what_was_acknowledged(make_observer, upstream, dispatcher):
    observer = make_observer()
    assert observer.poll_once()
    dispatcher.take()
    made = add_commits(upstream, 4)
    dispatcher.refuse = lambda commit, accepted: len(accepted) >= 2

    assert observer.poll_once() is False
    assert dispatcher.take() == made[:2]

    dispatcher.refuse = lambda commit, accepted: False
    assert make_observer().poll_once(), "a restarted observer carries on"
    assert dispatcher.take() == made[2:]


def test_unreachable_dispatcher_makes_poll_fail_and_nothing_is_remembered(make_observer, upstream):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()
    observer = make_observer(address=nobody)
    observer.remember([observer.fetch()])
    before = observer.boundary()
    add_commits(upstream, 2)
    assert observer.poll_once() is False
    assert observer.boundary() == before


def test_force_pushed_branch_is_handled(make_observer, upstream, dispatcher):
    observer = make_observer()
    old = add_commits(upstream, 3, prefix="old")
    assert observer.poll_once()
    assert dispatcher.take() == [old[-1]]

    git(upstream.path, "reset", "--quiet", "--hard", "HEAD~3")
    rewritten = add_commits(upstream, 2, prefix="new")
    assert observer.poll_once()
    assert dispatcher.take() == rewritten

    # Rewound to an ancestor of what was reported: nothing new, no crash.
    git(upstream.path, "reset", "--quiet", "--hard", "HEAD~1")
    assert observer.poll_once()
    assert dispatcher.take() == []
    newest = add_commits(upstream, 1, prefix="newest")
    assert observer.poll_once()
    assert dispatcher.take() == newest


def test_an_unrelated_history_pushed_over_the_branch_reports_its_tip_only(make_observer, upstream, dispatcher, clone):
    observer = make_observer()
    add_commits(upstream, 2, prefix="old")
    assert observer.poll_once()
    dispatcher.take()
    git(upstream.path, "checkout", "--quiet", "--orphan", "imported")
    imported = add_commits(upstream, 3, prefix="imported")
    git(upstream.path, "branch", "--quiet", "-M", "imported", "main")
    assert observer.poll_once()
    assert dispatcher.take() == [imported[-1]], "like a first run: not all of its history"
    assert json.loads((clone / ".git" / "ci_observer_state.json").read_text())["branches"]["origin/main"] == [
        imported[-1]], "and nothing left of the old history"
    newer = add_commits(upstream, 1, prefix="newer")
    assert observer.poll_once()
    assert dispatcher.take() == newer


def test_force_push_after_the_reported_commit_vanished(make_observer, upstream, dispatcher, clone):
    observer = make_observer()
    assert observer.poll_once()
    (old,) = dispatcher.take()
    git(upstream.path, "commit", "--quiet", "--amend", "-m", "rewritten root")
    # The clone no longer has the old commit either (gc after the rewrite).
    git(clone, "fetch", "--quiet", "origin", "+refs/heads/main:refs/remotes/origin/main")
    git(clone, "reset", "--quiet", "--hard", "origin/main")
    git(clone, "reflog", "expire", "--expire=now", "--all")
    git(clone, "gc", "--quiet", "--prune=now")
    gone = subprocess.run(["git", "cat-file", "-e", old + "^{commit}"], cwd=clone, capture_output=True, timeout=60)
    assert gone.returncode != 0, "the reported commit is really gone from the clone"
    assert observer.poll_once()
    assert dispatcher.take() == [upstream.head()]


def merge_main_into_side_then_fast_forward(upstream, base: str) -> dict[str, str]:
    """From O - base on main: side branches from O with b1, b2; main gets a1, a2; side
    merges main and main fast-forwards to that merge, so the side line is the merge's
    first parent and comes first in the observer's list."""
    path = upstream.path
    (o,) = parents(path, base)
    shas = {}
    git(path, "checkout", "--quiet", "-b", "side", o)
    shas["b1"] = upstream.commit({"b1.txt": "b1\n"}, "b1")
    shas["b2"] = upstream.commit({"b2.txt": "b2\n"}, "b2")
    git(path, "checkout", "--quiet", "main")
    shas["a1"] = upstream.commit({"a1.txt": "a1\n"}, "a1")
    shas["a2"] = upstream.commit({"a2.txt": "a2\n"}, "a2")
    git(path, "checkout", "--quiet", "side")
    git(path, "merge", "--quiet", "--no-edit", "main")
    shas["merge"] = upstream.head()
    git(path, "checkout", "--quiet", "main")
    git(path, "merge", "--quiet", "--ff-only", "side")
    return shas


def test_merge_round_fully_acknowledged(make_observer, upstream, dispatcher):
    observer = make_observer()
    assert observer.poll_once()
    dispatcher.take()
    base = upstream.commit({"base.txt": "base\n"}, "base")
    shas = merge_main_into_side_then_fast_forward(upstream, base)
    assert observer.poll_once()
    reported = dispatcher.take()
    assert sorted(reported) == sorted([base, *shas.values()])
    assert_parents_first(upstream.path, reported)
    assert observer.poll_once() and dispatcher.take() == []


def test_merge_round_interrupted_part_way_reports_nothing_twice(make_observer, upstream, dispatcher):
    base = upstream.commit({"base.txt": "base\n"}, "base")
    observer = make_observer()
    assert observer.poll_once()
    assert dispatcher.take() == [base]
    shas = merge_main_into_side_then_fast_forward(upstream, base)

    # The dispatcher acknowledges the first commit of the round (b1), then refuses.
    dispatcher.refuse = lambda commit, accepted: len(accepted) >= 1
    assert observer.poll_once() is False
    first_round = dispatcher.take()
    assert first_round == [shas["b1"]]

    dispatcher.refuse = lambda commit, accepted: False
    assert make_observer().poll_once()
    second_round = dispatcher.take()

    assert base not in second_round, "base was reported before this round"
    assert sorted(first_round + second_round) == sorted(shas.values())
