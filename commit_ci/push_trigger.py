"""Push trigger: git hooks that tell the dispatcher about new commits the moment they land.

The observer finds new commits by fetching every ``--interval`` seconds; a hook in
the repository itself saves that wait. ``ci-trigger install --repo PATH
--dispatcher-server HOST:PORT [--branch BRANCH]`` writes two hooks into the
repository's hooks folder, each a short shell script that runs push_hook.py with an
absolute Python path and ``-S -E``:

* ``post-receive``, for a repository that is pushed to (a served, usually bare,
  repository): each new commit of the watched branch is reported, oldest first, or
  only the tip of a newly created branch, with the branch's name and its new tip
  (which the dispatcher then runs first);
* ``post-commit``, for a repository that people commit in: HEAD is reported when
  it is on the watched branch.

push_hook.py is what runs on every push, kept apart from this module (and from the
daemons' protocol module) so that starting it costs little; its docstring says how.
When the Python or the push_hook.py a hook names is gone (the project moved,
reinstalled elsewhere, removed), the hook prints one line saying to run ``ci-trigger
install`` again, and exits 0. The
dispatcher queues a commit once, however many times it is reported, so the hook
and the observer reporting the same commit make one job. A hook must never fail or
hold up a push: when the dispatcher is unreachable or slow, the hook prints a
one-line warning and exits 0, and the observer reports the commit at its next poll.

``ci-trigger post-receive ...`` (what hooks of the first versions ran) is still
accepted and handed to push_hook.py, only slower to start.
"""

from __future__ import annotations

import argparse
import os
import shlex
import stat
import sys

from commit_ci import push_hook
from commit_ci.files import atomic_write

# pushed_commits lived here before push_hook.py existed; it is still found here.
from commit_ci.push_hook import HOOK_NAMES, HookError, git_output, pushed_commits  # noqa: F401
from commit_ci.security import SECRET_ENV, add_security_arguments, security_from_arguments
from commit_ci.wire import parse_address

#: The line that marks a hook as ours: only such a hook is replaced without --force.
HOOK_MARKER = "# ci-trigger hook"
#: What the hook's Python is started with: no site-packages scan (-S), no PYTHON*
#: variables (-E). push_hook.py needs only the standard library and two modules of
#: its own package, which it finds in the folder above its own.
HOOK_PYTHON_OPTIONS = ("-S", "-E")


# --- installing the hooks ----------------------------------------------------------------


def hook_script(kind: str, repo: str, dispatcher: str, branch: str, security_options: list[str] = ()) -> str:
    """The hook: a shell script that runs push_hook.py from this installation.

    When that Python or that file is gone (the project was moved, reinstalled
    elsewhere or removed), the hook says so in one line and tells how to mend it; a
    push or a commit never fails because of it."""
    python, hook = sys.executable, os.path.abspath(push_hook.__file__)
    arguments = [kind, "--dispatcher-server", dispatcher, "--branch", branch, *security_options]
    mend = " ".join(shlex.quote(part) for part in ["ci-trigger", "install", "--repo", os.path.abspath(repo),
                                                    "--dispatcher-server", dispatcher, "--branch", branch,
                                                    *security_options])
    return "\n".join(
        [
            "#!/bin/sh",
            "%s: tells the CI dispatcher at %s about new commits on %s at once." % (HOOK_MARKER, dispatcher, branch),
            "# Written by `ci-trigger install`; run it again to change it rather than editing this file.",
            "# It runs on every push or commit, so Python starts with -S -E and imports little.",
            "python=%s" % shlex.quote(python),
            "hook=%s" % shlex.quote(hook),
            'if [ -x "$python" ] && [ -f "$hook" ]; then',
            '    exec "$python" %s "$hook" %s' % (" ".join(HOOK_PYTHON_OPTIONS), " ".join(shlex.quote(a) for a in arguments)),
            "fi",
            "echo %s >&2" % shlex.quote(
                "ci-trigger: warning: this CI hook cannot run: %s or %s is gone (commit-ci moved, reinstalled or "
                "removed); run `%s` again" % (python, hook, mend)),
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
        atomic_write(path, hook_script(kind, repo, dispatcher, branch, security_options).encode("utf-8"), durable=False)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in HOOK_NAMES:
        # A hook written by an older ci-trigger runs this module: same command line.
        return push_hook.main(argv)
    args = build_parser().parse_args(argv)
    security_options = []
    for option, value in (("--secret-file", args.secret_file), ("--tls-ca", args.tls_ca)):
        if value:
            security_options += [option, os.path.abspath(value)]
    try:
        security_from_arguments(args, serves=False)  # a wrong file is an error now, not at every push
        if os.environ.get(SECRET_ENV) and not args.secret_file:
            # git runs the hooks with the pusher's environment, not this one.
            raise HookError("the hooks cannot use the secret in $%s: give it as a file with --secret-file "
                            "(the hook records the file's path, never the secret)" % SECRET_ENV)
        for line in install(args.repo, args.dispatcher_server, args.branch, args.force, security_options):
            print(line)
    except (HookError, ValueError, OSError) as exc:
        print("ci-trigger: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
