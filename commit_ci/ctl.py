"""ci-ctl: ask the dispatcher what the CI system is doing, or give it a commit.

Subcommands talk to a running dispatcher over the protocol (docs/protocol.md):
``status`` (is it up, queue, what each runner does, each branch's state, last
verdicts), ``queue``, ``runners``, ``log [-f] SHA`` (a commit's output: live while it
runs, followed until its verdict with ``-f``), ``results SHA`` (a commit's verdict and
where its report is; the start of its id will do, if no other commit starts the same
way, and its earlier runs), ``dispatch SHA`` (test a commit now; its full id only, as
the dispatcher takes no other), ``flaky`` (the tests most often flaky over recent
runs), ``notifications`` (those waiting to be sent, and why their last try failed),
``rerun SHA`` (run a judged commit again), ``cancel SHA`` (stop a queued or running
one) and ``key add|revoke|list`` (the dispatcher's keys: one per runner, observer or
operator; with ``--keys-file`` the file itself is changed, to make the first operator
key). Output is for people by default; ``--json`` prints the dispatcher's JSON answers
for scripts. Exit status: 0 on success, 1 when the dispatcher is unreachable or
refuses, 2 for wrong usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

from commit_ci.client import communicate
from commit_ci.files import atomic_write
from commit_ci.flaky import DEFAULT_WINDOW
from commit_ci.protocol import request
from commit_ci.result import Result
from commit_ci.security import (
    ROLES,
    Key,
    Security,
    add_security_arguments,
    security_from_arguments,
    unwrap_secret,
)
from commit_ci.states import JobState
from commit_ci.wire import (
    MAX_NAME_LENGTH,
    ProtocolError,
    Refused,
    format_address,
    is_commit_prefix,
    is_name,
    parse_address,
    parse_commit,
    parse_commit_prefix,
)

DEFAULT_DISPATCHER = "localhost:8888"
#: Results shown by ``status``.
STATUS_RECENT = 5
#: Branches shown by ``status``, the most recently changed first.
STATUS_BRANCHES = 20
#: Seconds to wait for the dispatcher's answer: it answers queries without waiting on anything.
QUERY_TIMEOUT_S = 5.0
#: ``log -f``: how often to ask for more output (runners send it about twice a second).
FOLLOW_INTERVAL_S = 0.5


class Failure(Exception):
    """Something to tell the user before exiting with status 1."""


class Client:
    def __init__(self, address: tuple[str, int], security: Security):
        self.address = address
        self.security = security

    def ask(self, verb: str, **fields: object):
        """The reply to one request; Failure with a sentence if there is none or it is ERR."""
        where = format_address(self.address)
        try:
            answer = communicate(self.address, request(verb, **fields), timeout=QUERY_TIMEOUT_S, security=self.security)
        except Refused as exc:  # before it could check the request: an unknown key, a skewed clock...
            raise Failure("the dispatcher at %s refused %s: %s" % (where, verb, str(exc).partition("refused: ")[2]))
        except ProtocolError as exc:
            raise Failure("the dispatcher at %s answered something unexpected: %s" % (where, exc)) from None
        except OSError as exc:
            raise Failure("cannot reach the dispatcher at %s: %s (is it running? --dispatcher-server)"
                          % (where, exc.strerror or exc)) from None
        if answer.verb != "OK":
            raise Failure("the dispatcher at %s refused %s: %s" % (where, verb, answer.get("reason") or answer.verb))
        return answer

    def ask_json(self, verb: str, **fields: object) -> dict:
        answer = self.ask(verb, **fields)
        try:
            return json.loads(answer.sections.get("json", b"{}"))
        except ValueError:
            raise Failure("the dispatcher sent unreadable JSON for %s" % verb) from None


# --- human-readable output ---------------------------------------------------------------


def short(commit: str | None) -> str:
    return (commit or "-")[:12]


def _seconds_since(iso: str, now: datetime.datetime | None) -> float:
    """Seconds from an ISO time from the dispatcher to ``now`` (negative: it is ahead)."""
    moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return ((now or datetime.datetime.now(datetime.timezone.utc)) - moment).total_seconds()


def later(iso: str | None, now: datetime.datetime | None = None) -> str:
    """'in 12 s' style distance to an ISO time from the dispatcher; 'now' once it is past."""
    if not iso:
        return "-"
    seconds = -_seconds_since(iso, now)
    return "in %d s" % seconds if seconds >= 1 else "now"


def age(iso: str | None, now: datetime.datetime | None = None) -> str:
    """'12 s ago' style age of an ISO time from the dispatcher."""
    if not iso:
        return "-"
    seconds = _seconds_since(iso, now)
    if seconds < 90:
        return "%d s ago" % max(0, seconds)
    if seconds < 90 * 60:
        return "%d min ago" % (seconds / 60)
    return "%.1f h ago" % (seconds / 3600)


def counts(result: Result) -> str:
    if result.passed is None:
        return "no counts"
    return "%d passed, %d failed, %d errors, %d skipped" % (result.passed, result.failed, result.errors, result.skipped)


def duration(result: Result) -> str:
    return "-" if result.duration_s is None else "%.2f s" % result.duration_s


def result_line(summary: dict) -> str:
    """One line for a result's summary (as ``recent`` and ``lookup`` give it)."""
    result = Result.from_summary(summary)
    reason = " (%s)" % result.reason if result.reason else ""
    return "%s  %-6s  %s  %s  %s%s" % (short(result.commit), result.status, counts(result), duration(result),
                                       result.runner or "-", reason)


def branch_lines(branches: list[dict]) -> list[str]:
    """One line per branch: its state, since which commit, and its tip."""
    lines = []
    for branch in branches:
        state = branch["state"] + (" since %s" % short(branch["since"]) if branch["state"] in ("red", "flaky") else "")
        judged = " (%s)" % short(branch["commit"]) if branch["commit"] and branch["state"] != "red" else ""
        lines.append("  %-20s %s%s, tip %s %s" % (branch["branch"], state, judged, short(branch["tip"]),
                                                branch["tip_state"] or "unknown"))
    return lines or ["  (none reported yet)"]


def runner_lines(runners: list[dict]) -> list[str]:
    if not runners:
        return ["  (none registered)"]
    lines = []
    for runner in runners:
        doing = "%s with %s" % (runner["state"], short(runner["commit"])) if runner["commit"] else runner["state"]
        # A runner of a version before sharding gets whole commits alone.
        whole = ", whole commits only" if runner.get("shards") is False else ""
        lines.append("  %-20s %-28s since %s  (%s%s)" % (runner["name"], doing, age(runner["since"]), runner["address"],
                                                        whole))
    return lines


# --- subcommands -------------------------------------------------------------------------


def show_status(client: Client, as_json: bool) -> None:
    status = client.ask("status")
    runners = client.ask_json("runners")["runners"]
    recent = client.ask_json("recent", limit=STATUS_RECENT)["results"]
    branches = client.ask_json("branches", limit=STATUS_BRANCHES)["branches"]
    if as_json:
        document = {key: status.get(key) for key in ("queued", "running", "runners", "idle")}
        document.update(dispatcher=format_address(client.address), up=True, runner_list=runners, recent=recent,
                        branches=branches)
        print(json.dumps(document, indent=2))
        return
    print("dispatcher %s: up" % format_address(client.address))
    print("queue: %d queued, %d running" % (status.get("queued"), status.get("running")))
    print("runners: %d registered, %d idle" % (status.get("runners"), status.get("idle")))
    print("\n".join(runner_lines(runners)))
    print("branches:")
    print("\n".join(branch_lines(branches)))
    print("last results:")
    print("\n".join("  " + result_line(summary) for summary in recent) or "  (none yet)")


def show_queue(client: Client, as_json: bool, limit: int) -> None:
    queue = client.ask_json("queue", limit=limit)
    if as_json:
        print(json.dumps(queue, indent=2))
        return
    print("running (%d):" % len(queue["running"]))
    for job in queue["running"]:
        if job.get("shards"):
            print("  %s  in shards, started %s:" % (short(job["commit"]), age(job["started_at"])))
            for out in job["shards"]:
                print("    shard %s of %s: attempt %s on %s" % (out["shard"], out["shards"], out["attempt"], out["runner"]))
        else:
            print("  %s  attempt %s on %s, started %s" % (short(job["commit"]), job["attempt"], job["runner"],
                                                        age(job["started_at"])))
    shown = len(queue["queued"])
    order = "in the order they run: each branch's newest first, then the others newest first" \
        if queue.get("order") == "tip" else "oldest first"
    print("queued (%d%s), %s:" % (queue["queued_total"], ", first %d shown" % shown if shown < queue["queued_total"] else "",
                                  order))
    for job in queue["queued"]:
        needs = ", waits for a runner with %s" % job["requires"] if job.get("requires") else ""
        print("  %s  queued %s%s" % (short(job["commit"]), age(job["queued_at"]), needs))


def show_runners(client: Client, as_json: bool) -> None:
    runners = client.ask_json("runners")
    if as_json:
        print(json.dumps(runners, indent=2))
        return
    print("\n".join(runner_lines(runners["runners"])))


def show_result(client: Client, as_json: bool, commit: str) -> None:
    result = client.ask_json("lookup", commit=commit)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if result["summary"] is None:
        running = result["state"] == JobState.RUNNING
        where = " on %s (attempt %s)" % (result["runner"], result["attempt"]) if running else ""
        again = ", rerun %s of its failing tests" % result["round"] if result.get("round") else ""
        print("%s: %s%s%s, queued %s" % (result["commit"], result["state"], where, again, age(result["queued_at"])))
        return
    final = Result.from_summary(result["summary"])
    print("%s: %s" % (final.commit, final.status))
    if not JobState(result["state"]).final:
        print("  now:      run %s %s (the verdict above is run %s's)" % (result["run"], result["state"], final.run or 1))
    if result.get("branches"):
        print("  branches: %s" % ", ".join(result["branches"]))
    print("  tests:    %s" % counts(final))
    print("  duration: %s" % duration(final))
    print("  runner:   %s, %s attempt(s)" % (final.runner, final.attempts))
    if final.reason:
        print("  reason:   %s" % final.reason)
    for entry in final.shards or ():
        print("  shard %s:  %s on %s, %s passed, %s failed, %s s%s" % (
            entry.get("shard"), entry.get("status"), entry.get("runner"), entry.get("passed"), entry.get("failed"),
            entry.get("duration_s"), " (%s)" % entry["reason"] if entry.get("reason") else ""))
    for entry in final.reruns or ():
        tests = entry.get("tests")
        print("  rerun %s:  %s on %s, %s" % (entry.get("rerun"), entry.get("status"), entry.get("runner"),
                                           "the whole test command" if tests is None else ", ".join(tests)))
    if final.flaky_tests:
        print("  flaky:    %s" % ", ".join(final.flaky_tests))
    if final.first_failing:
        print("  broken by: %s" % final.first_failing)
    print("  report:   %s" % result["files"]["report"])
    print("  json:     %s" % result["files"]["json"])
    if len(result.get("runs", ())) > 1:
        print("  runs:")
        for run in result["runs"]:
            print("    %-4s %-9s %s  %s" % (run["run"], run["status"], age(run["finished_at"]),
                                        run["files"].get("report", "(no files)")))


def show_flaky(client: Client, as_json: bool, limit: int, window: int) -> None:
    document = client.ask_json("flaky", limit=limit, window=window)
    if as_json:
        print(json.dumps(document, indent=2))
        return
    runs = document["runs"]
    print("flakiest tests in the last %d run%s that ran tests (rate: runs in which the test was flaky, of those):"
          % (runs, "" if runs == 1 else "s"))
    for test in document["tests"]:
        print("  %5.1f%%  %d of %d  %s  (last: %s run %s, %s, %s)" % (
            test["rate"] * 100, test["flaky"], runs, test["test"], short(test["commit"]), test["run"],
            " ".join(test["outcomes"]), age(test["finished_at"])))
    if not document["tests"]:
        print("  (none was flaky)")


def show_notifications(client: Client, as_json: bool, limit: int) -> None:
    document = client.ask_json("notifications", limit=limit)
    if as_json:
        print(json.dumps(document, indent=2))
        return
    pending = document["pending"]
    print("%d notification%s waiting to be sent" % (pending, "" if pending == 1 else "s"))
    for entry in document["notifications"]:
        if entry["event"] == "branch":
            what = "branch %s %s -> %s" % (entry["branch"], entry["old_state"], entry["new_state"])
        else:
            what = "status %s" % entry["status"]
        tries = "%d tr%s" % (entry["tries"], "y" if entry["tries"] == 1 else "ies")
        if entry["state"] == "waiting":
            when = "next try %s" % later(entry["next_try_at"])
        else:
            when = age(entry["done_at"])
        error = ", last error: %s" % entry["last_error"] if entry["last_error"] else ""
        print("  %-10s %-24s %s (commit %s)  %s, %s%s" % (entry["state"], entry["channel"], what,
                                                        short(entry["commit"]), tries, when, error))
    if not document["notifications"]:
        print("  (none yet)")


def show_log(client: Client, commit: str, follow: bool, interval: float = FOLLOW_INTERVAL_S) -> None:
    """Print a commit's output: while it runs, its live log (with ``follow``, as it grows,
    until the verdict, which ends it with a line on stderr); once judged, its final log."""
    offset, source = 0, None
    out = sys.stdout.buffer
    while True:
        answer = client.ask("tail", commit=commit, offset=offset)
        try:
            document = json.loads(answer.sections.get("json", b"{}"))
            final = JobState(document["state"]).final
        except (ValueError, KeyError):
            raise Failure("the dispatcher sent unreadable JSON for tail") from None
        if final and source == "live":
            # The verdict came while the live log was followed: it ends here (the final
            # log, ci-ctl log SHA, holds all of the output).
            return _verdict_line(document)
        if document["source"] != source or document["offset"] < offset:
            # The first answer; output starting; or a new attempt started the live log afresh.
            if source == "live":
                out.write(b"\n[ci-ctl: the output starts again: a new attempt]\n")
            source, offset = document["source"], 0
            if document["offset"] != len(answer.sections.get("chunk", b"")):
                continue  # asked from another offset: read this one from its start
        chunk = answer.sections.get("chunk", b"")
        if chunk:
            out.write(chunk)
            out.flush()
        offset = document["offset"]
        if offset < document["size"]:
            continue  # more to read now
        if final:
            return _verdict_line(document) if follow else None
        if not follow:
            return None
        time.sleep(interval)


def _verdict_line(document: dict) -> None:
    sys.stdout.flush()
    print("ci-ctl: %s: %s (the whole output: ci-ctl log %s)" % (short(document["commit"]), document["state"],
                                                               short(document["commit"])), file=sys.stderr)


def do_rerun(client: Client, as_json: bool, commit: str) -> None:
    commit = client.ask_json("lookup", commit=commit)["commit"]
    answer = client.ask("rerun", commit=commit)
    if as_json:
        print(json.dumps({"commit": commit, "run": answer.get("run")}))
    else:
        print("%s: run %s queued" % (commit, answer.get("run")))


def do_cancel(client: Client, as_json: bool, commit: str) -> None:
    commit = client.ask_json("lookup", commit=commit)["commit"]
    answer = client.ask("cancel", commit=commit)
    if as_json:
        print(json.dumps({"commit": commit, "state": answer.get("job"), "stopped": answer.get("stopped")}))
    else:
        stopped = " (its runner was told to stop)" if answer.get("stopped") else ""
        print("%s: cancelled%s; now %s" % (commit, stopped, answer.get("job")))


def do_dispatch(client: Client, as_json: bool, commit: str) -> None:
    answer = client.ask("dispatch", commit=commit)
    if as_json:
        print(json.dumps({"commit": commit, "new": bool(answer.get("new")), "state": answer.get("job")}))
    elif answer.get("new"):
        print("%s: queued" % commit)
    else:
        print("%s: already known, %s" % (commit, answer.get("job")))


# --- keys ---------------------------------------------------------------------------------


def add_key(client: Client, as_json: bool, name: str, role: str, output: str | None, keys_file: str | None) -> None:
    """Have a key made (by the dispatcher, or in ``keys_file`` directly) and print it, or
    write it to ``output`` (mode 0600): a daemon takes the file with --secret-file."""
    if keys_file:
        key = _keyring(keys_file).add(name, role)
    else:
        answer = client.ask_json("key-add", name=name, role=role)
        own = client.security.auth.key if client.security.auth is not None else None
        if own is None:
            raise Failure("the dispatcher made key %s, but this command holds no key to read it with" % name)
        try:
            key = Key(unwrap_secret(own, answer["salt"], answer["wrapped"]), name, role)
        except (KeyError, TypeError, ValueError) as exc:
            raise Failure("the dispatcher's answer to key-add is not a key: %s" % exc) from None
    if output:
        atomic_write(output, (key.token + "\n").encode("ascii"), mode=0o600)
    if as_json:
        print(json.dumps({"name": name, "role": role, **({"file": output} if output else {"key": key.token})}))
    elif output:
        print("key %s (role %s) written to %s: give it to the daemon with --secret-file %s" % (name, role, output, output))
    else:
        print(key.token)
        if sys.stdout.isatty():
            print("ci-ctl: save it in a file only its daemon's user can read (chmod 600) and give that daemon "
                  "--secret-file FILE, or set CI_SECRET", file=sys.stderr)


def revoke_key(client: Client, as_json: bool, name: str, keys_file: str | None) -> None:
    if keys_file:
        try:
            _keyring(keys_file).revoke(name)
        except KeyError:
            raise Failure("%s has no key named %s" % (keys_file, name)) from None
    else:
        client.ask("key-revoke", name=name)
    print(json.dumps({"name": name, "revoked": True}) if as_json else "key %s revoked" % name)


def list_keys(client: Client, as_json: bool, keys_file: str | None) -> None:
    if keys_file:
        keys = _keyring(keys_file)
        document = {"keys": [{"name": key.name, "role": key.role} for key in keys.keys()], "shared_secret": None}
    else:
        document = client.ask_json("key-list")
    if as_json:
        print(json.dumps(document, indent=2))
        return
    for key in document["keys"]:
        print("%-30s %s" % (key["name"], key["role"]))
    if not document["keys"]:
        print("(no keys)")
    if document.get("shared_secret"):
        print("(and the shared secret, which may do everything)")


def _keyring(path: str):
    from commit_ci.keys import Keyring, KeysFileError

    keyring = Keyring(path)
    try:
        keyring.load()
    except KeysFileError as exc:
        raise Failure(str(exc)) from None
    return keyring


def key_name_argument(text: str) -> str:
    if not is_name(text):
        raise argparse.ArgumentTypeError("%r is not a key name: 1 to %d characters of A-Z a-z 0-9 . _ : @ -"
                                         % (text, MAX_NAME_LENGTH))
    return text


def full_commit_argument(text: str) -> str:
    """A commit to dispatch: its full id. The dispatcher would refuse an abbreviated one
    (it would be a second job for the same commit); say so before asking it."""
    try:
        return parse_commit(text)
    except ProtocolError as exc:
        if is_commit_prefix(text.lower()):
            raise argparse.ArgumentTypeError(
                "%s is not a full commit id: dispatch needs all 40 (SHA-1) or 64 (SHA-256) hex digits; "
                "give the full id, for example from `git rev-parse %s`" % (text, text)) from None
        raise argparse.ArgumentTypeError(str(exc)) from None


def commit_prefix_argument(text: str) -> str:
    try:
        return parse_commit_prefix(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-ctl",
        description="Ask the CI dispatcher what it is doing, or give it a commit to test.",
    )
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="where the dispatcher listens (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    add_security_arguments(parser, serves=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", help="is the dispatcher up; queue length; what each runner does; last verdicts")
    queue = commands.add_parser("queue", help="jobs running and queued")
    queue.add_argument("--limit", type=int, default=20, help="queued jobs to list (default: %(default)s)")
    runners = commands.add_parser("runners", help="registered runners: idle or busy with which commit, since when")
    results = commands.add_parser("results", help="a commit's verdict and where its report is")
    results.add_argument("commit", metavar="SHA", type=commit_prefix_argument,
                         help="the commit id, or its first 7 or more hex digits if no other commit starts with them")
    dispatch = commands.add_parser("dispatch", help="queue a commit for testing now")
    dispatch.add_argument("commit", metavar="SHA", type=full_commit_argument, help="the full commit id (git rev-parse)")
    flaky = commands.add_parser("flaky", help="the tests most often flaky (failed, then passed when run again) "
                                "in recent runs, with their rate")
    flaky.add_argument("--limit", type=int, default=20, help="tests to list (default: %(default)s)")
    flaky.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                       help="the rate is over this many newest runs that ran tests (default: %(default)s)")
    notifications = commands.add_parser("notifications", help="the notifications waiting to be sent (with their "
                                        "tries and last error), then the newest sent")
    notifications.add_argument("--limit", type=int, default=20, help="notifications to list (default: %(default)s)")
    log = commands.add_parser("log", help="a commit's output: live while it runs, its final log once judged")
    log.add_argument("commit", metavar="SHA", type=commit_prefix_argument,
                     help="the commit id, or its first 7 or more hex digits if no other commit starts with them")
    log.add_argument("-f", "--follow", action="store_true",
                     help="keep printing the output as it arrives until the commit's verdict, then exit 0")
    rerun = commands.add_parser("rerun", help="run a commit that has a verdict again; its earlier files are kept "
                                "in RESULTS_DIR/runs/SHA/RUN/")
    cancel = commands.add_parser("cancel", help="stop a queued or running commit: a first run ends 'cancelled', "
                                 "a rerun leaves the verdict the commit had")
    for command in (rerun, cancel):
        command.add_argument("commit", metavar="SHA", type=commit_prefix_argument,
                             help="the commit id, or its first 7 or more hex digits if no other commit starts with them")
    key = commands.add_parser("key", help="the dispatcher's keys: one per runner, observer or operator")
    key_commands = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    key_add = key_commands.add_parser("add", help="make a key and print it (what a daemon takes with --secret-file)")
    key_add.add_argument("name", metavar="NAME", type=key_name_argument,
                         help="the key's name; a runner registers under its key's name")
    key_add.add_argument("--role", required=True, choices=ROLES, help="what the key may do (docs/security.md)")
    key_add.add_argument("-o", "--output", metavar="FILE", help="write the key to FILE (mode 0600) instead of printing it")
    key_revoke = key_commands.add_parser("revoke", help="remove a key: refused from now on, its runner dropped")
    key_revoke.add_argument("name", metavar="NAME", type=key_name_argument)
    key_list = key_commands.add_parser("list", help="the keys' names and roles (never their secrets)")
    for command in (key_add, key_revoke, key_list):
        command.add_argument("--keys-file", metavar="FILE",
                             help="change (or read) this keys file directly instead of asking the dispatcher: on "
                             "its machine, to make the first operator key; the dispatcher reads it within a second")
    for command in (status, queue, runners, results, dispatch, flaky, notifications, rerun, cancel, key_add, key_revoke,
                    key_list):
        # After the command too (`ci-ctl status --json`); SUPPRESS keeps the one given before it.
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print JSON for scripts instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        address = parse_address(args.dispatcher_server)
        security = security_from_arguments(args, serves=False)
    except ValueError as exc:
        parser.error(str(exc))
    client = Client(address, security)
    try:
        if args.command == "status":
            show_status(client, args.json)
        elif args.command == "queue":
            show_queue(client, args.json, max(1, args.limit))
        elif args.command == "runners":
            show_runners(client, args.json)
        elif args.command == "results":
            show_result(client, args.json, args.commit)
        elif args.command == "dispatch":
            do_dispatch(client, args.json, args.commit)
        elif args.command == "flaky":
            show_flaky(client, args.json, max(1, args.limit), max(1, args.window))
        elif args.command == "notifications":
            show_notifications(client, args.json, max(1, args.limit))
        elif args.command == "log":
            show_log(client, args.commit, args.follow)
        elif args.command == "rerun":
            do_rerun(client, args.json, args.commit)
        elif args.command == "cancel":
            do_cancel(client, args.json, args.commit)
        elif args.key_command == "add":
            add_key(client, args.json, args.name, args.role, args.output, args.keys_file)
        elif args.key_command == "revoke":
            revoke_key(client, args.json, args.name, args.keys_file)
        else:
            list_keys(client, args.json, args.keys_file)
    except (ValueError, OSError) as exc:  # from a keys file changed here (--keys-file), or --output
        print("ci-ctl: %s" % exc, file=sys.stderr)
        return 1
    except Failure as exc:
        print("ci-ctl: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
