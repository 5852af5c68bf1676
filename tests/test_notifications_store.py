"""The notifications outbox in the store: which verdicts change a branch's state and are
news, one row per channel and change, commit statuses, and a file of schema version 6."""

from __future__ import annotations

import json
import sqlite3

import pytest

from commit_ci import notices
from commit_ci.states import JobState, Outcome
from commit_ci.store import SCHEMA_VERSION, JobStore

from conftest import wait_until

COMMITS = ["%040x" % (index + 1) for index in range(16)]
CHANNELS = ("command", "webhook abc")


@pytest.fixture
def store(tmp_path):
    opened = JobStore(str(tmp_path / "queue.sqlite3"))
    opened.notify_to(CHANNELS, ("status",))
    yield opened
    opened.close()


def judge(store: JobStore, commit: str, state: JobState, branch: str = "main", failing=None, summary=None) -> None:
    store.report(commit, 1.0, branch)
    attempt = store.assign(commit, "r1", 2.0)
    facts = {"commit": commit, "status": state.value, "run": 1, **(summary or {})}
    store.finish(commit, attempt, state, Outcome(state.value), None, json.dumps(facts), 3.0, failing=failing)


def rows(store: JobStore, channel: str | None = None) -> list[dict]:
    with sqlite3.connect(store.path) as db:
        db.row_factory = sqlite3.Row
        found = db.execute("SELECT * FROM notifications ORDER BY id").fetchall()
    return [dict(row, document=json.loads(row["document"])) for row in found if channel in (None, row["channel"])]


def changes(store: JobStore, channel: str = "command") -> list[tuple[str, str, str]]:
    return [(row["document"]["branch"], row["document"]["old_state"], row["document"]["new_state"])
            for row in rows(store, channel)]


def test_one_notification_per_channel_for_each_change_and_none_for_a_first_green(store):
    judge(store, COMMITS[0], JobState.PASSED)
    assert changes(store) == [], "pending -> green is no news"
    judge(store, COMMITS[1], JobState.FAILED, failing=["test_a.py::test_x"])
    judge(store, COMMITS[2], JobState.FAILED)
    judge(store, COMMITS[3], JobState.PASSED)
    judge(store, COMMITS[4], JobState.ERROR)
    judge(store, COMMITS[5], JobState.FLAKY, summary={"flaky_tests": ["test_b.py::test_y"]})
    judge(store, COMMITS[6], JobState.PASSED)
    expected = [("main", "green", "red"), ("main", "red", "green"), ("main", "green", "flaky"), ("main", "flaky", "green")]
    for channel in CHANNELS:
        assert changes(store, channel) == expected
    red = rows(store, "command")[0]
    assert red["document"]["commit"]["id"] == COMMITS[1]
    assert red["document"]["failing_tests"] == ["test_a.py::test_x"]
    assert rows(store, "command")[2]["document"]["flaky_tests"] == ["test_b.py::test_y"]
    deliveries = [row["delivery"] for row in rows(store)]
    assert len(set(deliveries)) == len(deliveries), "every row its own delivery id"
    assert store.notifications_pending() == len([row for row in rows(store) if row["done_at"] is None])


def test_a_new_branch_that_starts_red_is_news_and_an_older_verdict_is_not(store):
    store.report(COMMITS[0], 1.0, "feature")
    store.report(COMMITS[1], 1.0, "feature")
    judge(store, COMMITS[1], JobState.FAILED, branch="feature")
    assert changes(store) == [("feature", "pending", "red")]
    judge(store, COMMITS[0], JobState.PASSED, branch="feature")  # older: a bisection's probe
    assert changes(store) == [("feature", "pending", "red")]


def test_the_unnamed_branch_is_not_told_and_without_channels_nothing_is_kept(tmp_path):
    opened = JobStore(str(tmp_path / "queue.sqlite3"))
    try:
        judge(opened, COMMITS[0], JobState.PASSED)
        judge(opened, COMMITS[1], JobState.FAILED)
        assert rows(opened) == [] and opened.notifications_pending() == 0
    finally:
        opened.close()
    store = JobStore(str(tmp_path / "other.sqlite3"))
    store.notify_to(CHANNELS, ())
    try:
        store.enqueue(COMMITS[0], 1.0)
        attempt = store.assign(COMMITS[0], "r1", 2.0)
        store.finish(COMMITS[0], attempt, JobState.FAILED, Outcome.FAILED, None, json.dumps({"status": "failed"}), 3.0)
        assert rows(store) == []
    finally:
        store.close()


def test_a_channel_sends_in_order_and_keeps_tries_and_errors(store):
    judge(store, COMMITS[0], JobState.FAILED)
    judge(store, COMMITS[1], JobState.PASSED)
    first = store.next_notification("command")
    assert first.document["new_state"] == "red" and first.attempts == 0
    assert store.notification_failed(first.id, "refused", 100.0) == 1
    again = store.next_notification("command")
    assert (again.id, again.attempts, again.last_error, again.next_at) == (first.id, 1, "refused", 100.0)
    store.notification_delivered(first.id, 5.0)
    assert store.next_notification("command").document["new_state"] == "green"
    assert store.next_notification("webhook abc").id != first.id, "each channel its own rows"
    dropped = store.drop_notifications(["command", "status"], 6.0)
    assert dropped == {"webhook abc": 2}
    assert store.next_notification("webhook abc") is None


def test_the_list_for_operators_shows_those_to_send_oldest_first_then_those_done_newest_first(store):
    judge(store, COMMITS[0], JobState.FAILED)
    judge(store, COMMITS[1], JobState.PASSED)
    judge(store, COMMITS[2], JobState.FAILED)
    command = [row["id"] for row in rows(store, "command")]
    store.notification_delivered(command[0], 5.0)
    store.notification_delivered(command[1], 6.0)
    store.notification_failed(command[2], "exit 1", 100.0)
    pending, listed = store.notification_list(1000)
    waiting = [row for row in rows(store) if row["done_at"] is None]
    assert pending == len(waiting) == store.notifications_pending()
    done = sorted((row["id"] for row in rows(store) if row["done_at"] is not None), reverse=True)
    assert command[0] in done and command[1] in done
    assert [row["id"] for row in listed] == [row["id"] for row in waiting] + done
    failed = next(row for row in listed if row["id"] == command[2])
    assert (failed["attempts"], failed["last_error"], failed["next_at"], failed["document"]["new_state"]) == \
        (1, "exit 1", 100.0, "red")
    assert {row["id"]: row["outcome"] for row in listed}[command[1]] == "delivered"
    pending, listed = store.notification_list(2)
    assert [row["id"] for row in listed] == [row["id"] for row in waiting[:2]], "those to send come first"


def test_a_commit_status_is_pending_once_per_run_then_its_verdict(store):
    store.report(COMMITS[0], 1.0, "main")
    store.assign(COMMITS[0], "r1", 2.0)
    store.requeue(COMMITS[0], store.job(COMMITS[0]).current_attempt, Outcome.LOST, 2.5)
    attempt = store.assign(COMMITS[0], "r2", 2.6)
    statuses = rows(store, "status")
    assert [row["document"]["state"] for row in statuses] == [notices.PENDING], "one pending for the run"
    store.notification_delivered(statuses[0]["id"], 2.7)
    store.finish(COMMITS[0], attempt, JobState.PASSED, Outcome.PASSED, None,
                 json.dumps({"status": "passed", "run": 1}), 3.0)
    assert [row["document"]["state"] for row in rows(store, "status")] == [notices.PENDING, "passed"]
    # A pending not sent yet when the verdict comes is superseded by it.
    store.rerun(COMMITS[0], 4.0)
    attempt = store.assign(COMMITS[0], "r1", 4.1)
    store.finish(COMMITS[0], attempt, JobState.FAILED, Outcome.FAILED, None,
                 json.dumps({"status": "failed", "run": 2}), 5.0)
    outcomes = [(row["document"]["state"], row["document"]["commit"]["run"], row["outcome"])
                for row in rows(store, "status")]
    assert outcomes == [("pending", 1, "delivered"), ("passed", 1, None), ("pending", 2, "superseded"),
                        ("failed", 2, None)]


def test_a_rerun_in_progress_keeps_its_commits_verdict_for_the_branch(store):
    store.report(COMMITS[2], 1.0, "main")  # the oldest, judged last (a bisection's probe)
    judge(store, COMMITS[0], JobState.PASSED)
    judge(store, COMMITS[1], JobState.FAILED)
    store.rerun(COMMITS[1], 4.0)  # its verdict stays red meanwhile...
    judge(store, COMMITS[2], JobState.FAILED)
    assert changes(store) == [("main", "green", "red")], "... not green from the pass before it"


def test_a_file_of_schema_version_6_opens_with_its_branches_and_notices_from_then_on(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    old = JobStore(path)
    judge(old, COMMITS[0], JobState.PASSED)
    old.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE notifications")
        db.execute("DROP TABLE branch_notices")
        db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    store = JobStore(path)
    store.notify_to(CHANNELS, ())
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert store.notifications_pending() == 0
        judge(store, COMMITS[1], JobState.FAILED)
        assert changes(store) == [("main", "pending", "red")], "no state noticed before the upgrade: from pending"
    finally:
        store.close()


def test_notifications_done_long_ago_are_forgotten_but_those_to_send(store, monkeypatch):
    monkeypatch.setattr("commit_ci.store.NOTIFICATIONS_KEPT", 3)
    for index in range(6):
        judge(store, COMMITS[index], JobState.FAILED if index % 2 else JobState.PASSED)
    waiting = store.next_notification("webhook abc")  # never sent: kept however old
    for row in rows(store, "command"):
        store.notification_delivered(row["id"], 4.0)
    left = rows(store)
    assert waiting.id in [row["id"] for row in left]
    done = [row for row in left if row["done_at"] is not None]
    assert done and all(row["id"] > max(r["id"] for r in left) - 3 for row in done)


def test_a_tip_judged_before_its_round_is_reported_stays_the_newest(store):
    judge(store, COMMITS[0], JobState.PASSED)
    # A round of three, the tip (COMMITS[3]) queued with its first commit, and judged at once.
    store.report(COMMITS[1], 4.0, "main", tip=COMMITS[3])
    attempt = store.assign(COMMITS[3], "r1", 4.1)
    store.finish(COMMITS[3], attempt, JobState.FAILED, Outcome.FAILED, None, json.dumps({"status": "failed"}), 4.2)
    store.report(COMMITS[2], 4.3, "main", tip=COMMITS[3])
    attempt = store.assign(COMMITS[2], "r1", 4.4)
    store.finish(COMMITS[2], attempt, JobState.PASSED, Outcome.PASSED, None, json.dumps({"status": "passed"}), 4.5)
    assert changes(store) == [("main", "green", "red")], "the older commit's pass changes nothing"
    store.report(COMMITS[3], 4.6, "main", tip=COMMITS[3])  # the tip's own report, at the round's end
    store.report(COMMITS[4], 4.7, "main", tip=COMMITS[4])  # the next round, not judged yet
    judge(store, COMMITS[1], JobState.PASSED)
    assert changes(store) == [("main", "green", "red")], "COMMITS[3], judged, is still newer"
    judge(store, COMMITS[4], JobState.PASSED)
    assert changes(store) == [("main", "green", "red"), ("main", "red", "green")]


def test_a_long_queue_of_newer_commits_is_not_read_once_the_branch_has_a_judged_commit(store):
    for commit in COMMITS[:8]:
        store.report(commit, 1.0, "main")
    judge(store, COMMITS[3], JobState.FAILED)  # the branch's first verdict: the commits after it are read
    statements = []
    store._db.set_trace_callback(statements.append)
    judge(store, COMMITS[1], JobState.PASSED)  # older: known by the lookups, no read of the commits after it
    store._db.set_trace_callback(None)
    assert not [sql for sql in statements if "b.seq >" in sql]
    judge(store, COMMITS[6], JobState.PASSED)
    assert changes(store) == [("main", "pending", "red"), ("main", "red", "green")]


def test_the_notifier_sends_each_channel_in_order_and_retries_a_failing_one_without_resending_the_other(store):
    from commit_ci.notify import Channel, DeliveryError, Notifier

    class Recording(Channel):
        def __init__(self, name: str, fails: bool):
            self.name, self.fails, self.sent = name, fails, []

        def send(self, document, delivery):
            self.sent.append((document["new_state"], delivery))
            if self.fails:
                raise DeliveryError("refused")

    good, bad = Recording("command", False), Recording("webhook abc", True)
    notifier = Notifier(store, [good, bad], "/results", backoff_cap=1.0)
    notifier.start()
    try:
        judge(store, COMMITS[0], JobState.FAILED)
        judge(store, COMMITS[1], JobState.PASSED)
        notifier.wake()
        wait_until(lambda: len(good.sent) == 2 and len(bad.sent) >= 3, 20, message="sends and retries")
    finally:
        notifier.stop()
    assert [state for state, _ in good.sent] == ["red", "green"], "in order, each once"
    assert {state for state, _ in bad.sent} == {"red"}, "a failing row holds up its own channel alone"
    assert len({delivery for _, delivery in bad.sent}) == 1, "one delivery id for every try"
    waiting = store.next_notification("webhook abc")
    assert waiting.attempts >= 3 and waiting.last_error == "refused"
    assert store.next_notification("command") is None
