"""Push trigger: git hooks that tell the dispatcher about new commits the moment they land.

The observer finds new commits by fetching every ``--interval`` seconds; a hook in
the repository itself saves that wait. ``ci-trigger install --repo PATH
--dispatcher-server HOST:PORT [--branch BRANCH]`` writes two hooks into the
repository's hooks folder, each a two-line shell script that runs this module
with an absolute Python path:

* ``post-receive``, for a repository that is pushed to (a served, usually bare,
  repository): git passes one ``old new ref`` line per updated ref on stdin; each
  new commit of the watched branch is reported, oldest first (``git rev-list
  --reverse old..new``), or only the tip of a newly created branch;
* ``post-commit``, for a repository that people commit in: HEAD is reported when
  it is on the watched branch.

Each commit goes to the dispatcher as ``dispatch <sha>``. The dispatcher queues a
commit once, however many times it is reported, so the hook and the observer
reporting the same commit make one job. A hook must never fail or hold up a push:
when the dispatcher is unreachable or slow, the hook prints a one-line warning
and exits 0, and the observer reports the commit at its next poll.
"""

from __future__ import annotations

import argparse
import os
import shlex
import stat
import subprocess
import sys
import time

from helpers import (
    ProtocolError,
    Security,
    add_security_arguments,
    atomic_write,
    communicate,
    format_address,
    parse_address,
    parse_commit,
    request,
    security_from_arguments,
)

HOOK_NAMES = ("post-receive", "post-commit")
#: The line that marks a hook as ours: only such a hook is replaced without --force.
HOOK_MARKER = "# ci-trigger hook"
#: A hook waits this long for the dispatcher to accept a connection, and then for
#: each answer: a push must not hang on a dispatcher that is down or stuck.
CONNECT_TIMEOUT_S = 2.0
REPLY_TIMEOUT_S = 5.0
#: Longest a hook spends reporting one push; the observer reports whatever is left.
HOOK_DEADLINE_S = 20.0
#: Longest a git command run by the hook may take (rev-list of a large push).
GIT_TIMEOUT_S = 30.0
#: A ref update whose old or new side is all zeros creates or deletes the ref.
NULL_SHAS = ("0" * 40, "0" * 64)


class HookError(Exception):
    """Something that stops ``install``; the text says what and what to do."""


def git_output(args: list[str], cwd: str | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )
    if done.returncode != 0:
        raise HookError("git %s failed: %s" % (" ".join(args), done.stderr.strip() or "exit status %d" % done.returncode))
    return done.stdout.strip()


# --- what the hooks report ---------------------------------------------------------------


def pushed_commits(update_lines: list[str], branch: str) -> list[str]:
    """The new commits of ``branch`` in a post-receive's ``old new ref`` lines, oldest first."""
    watched = "refs/heads/" + branch
    commits: list[str] = []
    for line in update_lines:
        fields = line.split()
        if len(fields) != 3 or fields[2] != watched:
            continue
        old, new = fields[0], fields[1]
        if new in NULL_SHAS:
            continue  # the branch was deleted
        if old in NULL_SHAS:
            # A new branch: its whole history would be "new"; test its tip, as the
            # observer does on its first run.
            commits.append(parse_commit(new))
            continue
        listed = git_output(["rev-list", "--reverse", "%s..%s" % (old, new)])
        commits.extend(parse_commit(sha) for sha in listed.split())
    return commits


def committed_commit(branch: str) -> list[str]:
    """HEAD, as a post-commit hook sees it, if it is on ``branch`` (not during a
    rebase or on another branch)."""
    done = subprocess.run(
        ["git", "symbolic-ref", "--quiet", "--short", "HEAD"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
    )
    if done.returncode != 0 or done.stdout.strip() != branch:
        return []
    return [parse_commit(git_output(["rev-parse", "HEAD"]))]


def report(dispatcher: tuple[str, int], commits: list[str], security: Security | None = None) -> str:
    """Send each commit to the dispatcher, oldest first; returns the line to show.

    Never raises for a dispatcher that is down, slow or refusing: that is a
    warning, because the observer will report the commits anyway.
    """
    where = format_address(dispatcher)
    deadline = time.monotonic() + HOOK_DEADLINE_S
    new = 0
    for index, sha in enumerate(commits):
        left = len(commits) - index
        if time.monotonic() > deadline:
            return "ci-trigger: warning: out of time after %d commit(s); the CI observer will report the other %d" % (
                index, left)
        try:
            answer = communicate(
                dispatcher, request("dispatch", commit=sha), timeout=REPLY_TIMEOUT_S, connect_timeout=CONNECT_TIMEOUT_S,
                security=security,
            )
        except (OSError, ProtocolError) as exc:
            return "ci-trigger: warning: CI dispatcher %s unreachable (%s); its observer will report %d commit(s) later" % (
                where, str(exc) or exc.__class__.__name__, left)
        if answer.verb != "OK":
            return "ci-trigger: warning: CI dispatcher %s refused commit %s: %s" % (where, sha[:12], answer.get("reason"))
        new += answer.get("new") or 0
    return "ci-trigger: %d commit(s) sent to the CI dispatcher at %s (%d new)" % (len(commits), where, new)


def run_hook(kind: str, dispatcher_text: str, branch: str, stdin_lines: list[str], args=None) -> int:
    """What a hook runs. Always returns 0: a CI hook must never fail a push or a commit."""
    try:
        dispatcher = parse_address(dispatcher_text)
        security = security_from_arguments(args, serves=False) if args is not None else None
        commits = pushed_commits(stdin_lines, branch) if kind == "post-receive" else committed_commit(branch)
        if commits:
            print(report(dispatcher, commits, security), file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the push itself succeeded
        print("ci-trigger: warning: %s: %s; the CI observer will report new commits" % (exc.__class__.__name__, exc),
              file=sys.stderr)
    return 0


# --- installing the hooks ----------------------------------------------------------------


def hook_script(kind: str, dispatcher: str, branch: str, security_options: list[str] = ()) -> str:
    command = [sys.executable, os.path.abspath(__file__), kind, "--dispatcher-server", dispatcher, "--branch", branch,
               *security_options]
    return "\n".join(
        [
            "#!/bin/sh",
            "%s: tells the CI dispatcher at %s about new commits on %s at once." % (HOOK_MARKER, dispatcher, branch),
            "# Written by `ci-trigger install`; run it again to change it rather than editing this file.",
            "exec %s" % " ".join(shlex.quote(part) for part in command),
            "",
        ]
    )


def install(repo: str, dispatcher: str, branch: str | None, force: bool, security_options: list[str] = ()) -> list[str]:
    """Write both hooks into ``repo``'s hooks folder; returns what was done, one line each.

    ``security_options`` (``--secret-file PATH``, ``--tls-ca PATH``) go into the hook's
    command: file names, never the secret itself."""
    parse_address(dispatcher)  # ValueError for the caller
    if not os.path.isdir(repo):
        raise HookError("%s is not a folder" % repo)
    git_output(["rev-parse", "--git-dir"], cwd=repo)  # HookError: not a repository
    if branch is None:
        try:
            branch = git_output(["symbolic-ref", "--short", "HEAD"], cwd=repo)
        except HookError:
            raise HookError("HEAD of %s is not on a branch: say which branch to watch with --branch" % repo) from None
    git_output(["check-ref-format", "--branch", branch], cwd=repo)
    # --git-path honours core.hooksPath; the answer may be relative to the repository.
    hooks = os.path.join(os.path.abspath(repo), git_output(["rev-parse", "--git-path", "hooks"], cwd=repo))
    os.makedirs(hooks, exist_ok=True)
    # Every hook is checked before any is written: a refusal leaves the folder as it was.
    foreign = [kind for kind in HOOK_NAMES if _is_foreign_hook(os.path.join(hooks, kind))]
    if foreign and not force:
        raise HookError("%s: hook(s) not written by ci-trigger: %s; nothing changed (--force replaces them and "
                        "keeps each as HOOK.before-ci-trigger)" % (hooks, ", ".join(foreign)))
    done = []
    for kind in HOOK_NAMES:
        path = os.path.join(hooks, kind)
        if kind in foreign:
            os.replace(path, path + ".before-ci-trigger")
            done.append("kept the previous %s as %s.before-ci-trigger (it no longer runs)" % (kind, path))
        atomic_write(path, hook_script(kind, dispatcher, branch, security_options).encode("utf-8"), durable=False)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        done.append("installed %s" % path)
    done.append("commits on %s are now reported to %s as they arrive" % (branch, dispatcher))
    return done


def _is_foreign_hook(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return HOOK_MARKER not in handle.read()
    except FileNotFoundError:
        return False


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-trigger",
        description="Tell the CI dispatcher about new commits the moment they are pushed or made, "
        "through git hooks (the observer stays the safety net).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    setup = commands.add_parser("install", help="write the post-receive and post-commit hooks into a repository")
    setup.add_argument("--repo", required=True, metavar="PATH",
                       help="the repository to watch: the one people push to (bare or not), or commit in")
    setup.add_argument("--dispatcher-server", required=True, metavar="HOST:PORT", help="where the dispatcher listens")
    setup.add_argument("--branch", help="branch to report (default: the repository's current branch, HEAD)")
    setup.add_argument("--force", action="store_true",
                       help="replace hooks that ci-trigger did not write (each is kept, not run, as HOOK.before-ci-trigger)")
    add_security_arguments(setup, serves=False)
    for kind in HOOK_NAMES:
        hook = commands.add_parser(kind, help="what the %s hook runs (git calls it; not for people)" % kind)
        hook.add_argument("--dispatcher-server", required=True, metavar="HOST:PORT")
        hook.add_argument("--branch", required=True)
        add_security_arguments(hook, serves=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in HOOK_NAMES:
        lines = sys.stdin.read().splitlines() if args.command == "post-receive" else []
        return run_hook(args.command, args.dispatcher_server, args.branch, lines, args)
    security_options = []
    for option, value in (("--secret-file", args.secret_file), ("--tls-ca", args.tls_ca)):
        if value:
            security_options += [option, os.path.abspath(value)]
    try:
        security_from_arguments(args, serves=False)  # a wrong file is an error now, not at every push
        for line in install(args.repo, args.dispatcher_server, args.branch, args.force, security_options):
            print(line)
    except (HookError, ValueError, OSError) as exc:
        print("ci-trigger: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
