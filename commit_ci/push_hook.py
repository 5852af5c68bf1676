"""What the push trigger's git hooks run, on every push and commit: built to start fast.

``ci-trigger install`` (push_trigger.py) writes hooks that run::

    PYTHON -S -E /path/to/commit_ci/push_hook.py post-receive|post-commit \\
        --dispatcher-server HOST:PORT --branch BRANCH [--secret-file FILE] [--tls-ca FILE]

* ``post-receive``, in a repository that is pushed to: git passes one ``old new ref``
  line per updated ref on stdin; each new commit of the watched branch is reported,
  oldest first (``git rev-list --reverse old..new``), or only the tip of a newly
  created branch;
* ``post-commit``, in a repository that people commit in: HEAD is reported when it is
  on the watched branch.

Each commit goes to the dispatcher as ``dispatch <sha> branch=<branch> tip=<new tip>``
(the dispatcher queues the tip with the first commit, so that it runs first), one
connection for the lot,
signed when a key (an observer's, or the shared secret) is given (``--secret-file``,
or CI_SECRET in the environment) and
over TLS with ``--tls-ca``. A hook must never fail or hold up a push: when the
dispatcher is unreachable, slow or refusing, or anything else goes wrong, the hook
prints a one-line warning and exits 0, and the observer reports the commit at its
next poll.

``git push`` waits for its post-receive hook, so what this process costs is added to
every push and to the time until the commit is queued (docs/performance.md,
detection). Hence: Python runs with ``-S`` (no site-packages scan) and ``-E`` (no
PYTHON* variables), this file by its path, and it imports only commit_ci.wire and
commit_ci.security (os, socket, time; hmac once it signs, ssl with TLS) and select.
Measured on the project's machine with ``-X importtime``, each of these would add to
every push: the daemons' protocol module ~80 ms, argparse ~8 ms (so the arguments are
parsed by hand), subprocess ~9 ms (so git runs through ``os.posix_spawn``), re ~5 ms.
"""

import os
import select
import sys
import time

if __name__ == "__main__":
    # Run by path, with -S: Python put this package's folder first on the path, where
    # its modules would be importable by their bare names; the folder above it (a
    # checkout, or site-packages, which -S leaves off the path) holds the package.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from commit_ci.security import Authenticator, client_tls_context, read_key
from commit_ci.wire import (
    ProtocolError,
    Stream,
    connect,
    format_address,
    header_bytes,
    is_decimal,
    parse_address,
    parse_commit,
    quote_field,
    split_header,
)

HOOK_NAMES = ("post-receive", "post-commit")
#: The options ``ci-trigger install`` writes into a hook; each takes a value.
HOOK_OPTIONS = ("--dispatcher-server", "--branch", "--secret-file", "--tls-ca")
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
    """A git command that failed, or (in push_trigger) something that stops ``install``;
    the text says what and what to do."""


def git_output(args: list[str], cwd: str | None = None) -> str:
    """What ``git ARGS`` (run in ``cwd``) prints, stripped; HookError if it fails or
    takes longer than GIT_TIMEOUT_S. Its stdin is /dev/null."""
    command = ["git", *(("-C", cwd) if cwd is not None else ()), *args]
    # The pipes' own ends are close-on-exec, so git holds only the write ends it is given.
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        pid = os.posix_spawnp("git", command, os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_write, 1),
            (os.POSIX_SPAWN_DUP2, err_write, 2),
        ])
    except BaseException:
        for fd in (out_read, err_read):
            os.close(fd)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    output = {out_read: bytearray(), err_read: bytearray()}
    deadline = time.monotonic() + GIT_TIMEOUT_S
    try:
        open_fds = [out_read, err_read]
        while open_fds:
            remaining = deadline - time.monotonic()
            ready = select.select(open_fds, [], [], remaining)[0] if remaining > 0 else []
            if not ready:
                raise HookError("git %s took longer than %g s" % (" ".join(args), GIT_TIMEOUT_S))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    output[fd] += chunk
                else:
                    open_fds.remove(fd)
    except BaseException:
        # Not waited for yet, so the pid is still git's: SIGKILL (9, without importing signal).
        os.kill(pid, 9)
        raise
    finally:
        os.close(out_read)
        os.close(err_read)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:
        reason = output[err_read].decode("utf-8", "replace").strip()
        raise HookError("git %s failed: %s" % (" ".join(args), reason or "exit status %d" % status))
    return output[out_read].decode("utf-8", "replace").strip()


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
    try:
        head = git_output(["symbolic-ref", "--quiet", "--short", "HEAD"])
    except HookError:
        return []  # detached HEAD: a rebase, a bisect
    if head != branch:
        return []
    return [parse_commit(git_output(["rev-parse", "HEAD"]))]


def dispatch(stream: Stream, sha: str, branch: str | None = None, tip: str | None = None) -> tuple[str, str]:
    """Send ``dispatch <sha>`` (with its branch and the branch's tip, when given) and
    return the reply's verb and the rest of its header.

    OSError if the connection fails or times out, ProtocolError if the reply is not
    one (or, with a secret, not an authentic answer to this request).
    """
    options = "".join(" %s=%s" % (name, quote_field(value)) for name, value in (("branch", branch), ("tip", tip))
                      if value is not None)
    nonce = stream.send(header_bytes("dispatch %s%s" % (sha, options)))
    header = stream.read_header(REPLY_TIMEOUT_S, request_nonce=nonce)
    if header is None:
        raise ConnectionError("closed the connection without a reply")
    line, verification = header
    if verification is not None:
        verification.finish()  # a reply to dispatch has no sections
    return split_header(line)


def reply_option(rest: str, name: str) -> str | None:
    """The value of option ``name`` in the rest of a reply's header, or None."""
    for token in rest.split(" "):
        key, sep, value = token.partition("=")
        if sep and key == name:
            return value
    return None


def report(dispatcher: tuple[str, int], commits: list[str], auth: Authenticator | None = None, tls=None,
           branch: str | None = None) -> str:
    """Send each commit to the dispatcher, oldest first, over one connection, with
    ``branch`` and the newest of them as its tip when ``branch`` is given; returns the
    line to show.

    Never raises for a dispatcher that is down, slow or refusing: that is a
    warning, because the observer will report the commits anyway.
    """
    where = format_address(dispatcher)
    deadline = time.monotonic() + HOOK_DEADLINE_S
    new = 0
    stream = None
    try:
        for index, sha in enumerate(commits):
            left = len(commits) - index
            if time.monotonic() > deadline:
                return "ci-trigger: warning: out of time after %d commit(s); the CI observer will report the other %d" % (
                    index, left)
            try:
                if stream is None:
                    stream = Stream(connect(dispatcher, CONNECT_TIMEOUT_S, tls), auth)
                verb, rest = dispatch(stream, sha, branch, commits[-1] if branch else None)
                if verb == "ERR" and rest.startswith("unknown option") and branch is not None:
                    # A dispatcher older than branches, which closed the connection: without them.
                    stream.sock.close()
                    stream, branch = Stream(connect(dispatcher, CONNECT_TIMEOUT_S, tls), auth), None
                    verb, rest = dispatch(stream, sha)
            except (OSError, ProtocolError) as exc:
                return "ci-trigger: warning: CI dispatcher %s unreachable (%s); its observer will report %d commit(s) later" % (
                    where, str(exc) or exc.__class__.__name__, left)
            if verb != "OK":
                return "ci-trigger: warning: CI dispatcher %s refused commit %s: %s" % (where, sha[:12], rest or verb)
            count = reply_option(rest, "new")
            new += int(count) if count is not None and is_decimal(count) else 0
    finally:
        if stream is not None:
            stream.sock.close()
    return "ci-trigger: %d commit(s) sent to the CI dispatcher at %s (%d new)" % (len(commits), where, new)


def run_hook(kind: str, dispatcher_text: str, branch: str, stdin_lines: list[str], secret_file: str | None = None,
             tls_ca: str | None = None) -> int:
    """What a hook runs. Always returns 0: a CI hook must never fail a push or a commit."""
    try:
        dispatcher = parse_address(dispatcher_text)
        key = read_key(secret_file)
        auth = Authenticator(key) if key is not None else None
        tls = client_tls_context(tls_ca) if tls_ca else None
        commits = pushed_commits(stdin_lines, branch) if kind == "post-receive" else committed_commit(branch)
        if commits:
            print(report(dispatcher, commits, auth, tls, branch), file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the push itself succeeded
        print("ci-trigger: warning: %s: %s; the CI observer will report new commits" % (exc.__class__.__name__, exc),
              file=sys.stderr)
    return 0


# --- command line ------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> tuple[str, dict[str, str]]:
    """``KIND --option VALUE ...`` as ``ci-trigger install`` writes it (``--option=VALUE``
    is accepted too); returns the kind and the options. ValueError for anything else."""
    if not argv or argv[0] not in HOOK_NAMES:
        raise ValueError("want %s as the first argument, got %r" % (" or ".join(HOOK_NAMES), argv[:1]))
    options: dict[str, str] = {}
    rest = iter(argv[1:])
    for argument in rest:
        name, sep, value = argument.partition("=")
        if name not in HOOK_OPTIONS:
            raise ValueError("unknown argument %r" % argument)
        if not sep:
            value = next(rest, None)
            if value is None:
                raise ValueError("%s needs a value" % name)
        options[name] = value
    missing = [name for name in HOOK_OPTIONS[:2] if name not in options]
    if missing:
        raise ValueError("missing %s" % " and ".join(missing))
    return argv[0], options


def main(argv: list[str] | None = None) -> int:
    """Run the hook named by ``argv[0]``; always 0 (a usage error is a warning too)."""
    try:
        kind, options = parse_arguments(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print("ci-trigger: warning: bad hook command line (%s); run `ci-trigger install` again" % exc, file=sys.stderr)
        return 0
    lines = sys.stdin.read().splitlines() if kind == "post-receive" else []
    return run_hook(kind, options["--dispatcher-server"], options["--branch"], lines, options.get("--secret-file"),
                    options.get("--tls-ca"))


if __name__ == "__main__":
    sys.exit(main())
