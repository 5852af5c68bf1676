"""A warm pytest: a process that has imported pytest once and forks a fresh child per job.

Starting Python and importing pytest costs a runner about 0.3 CPU-seconds per
commit before its own plugins and tests even load (0.35 s of a 0.37 s run of one
trivial test on the 2-core benchmark machine). With several runners on one machine
those starts come at the same moments and slow every runner's tests. So the runner
starts this module once, as its own process (the *zygote*), which imports pytest
and its built-in plugins, and then waits. For each job it forks a child that
becomes what ``python -m pytest`` would have been in the clone: a new session
(process group) of its own, the job's working directory, environment,
``sys.path[0]`` and ``sys.argv``, output to the job's log file; the child runs
pytest's command-line entry point (installed plugins load then, as usual) and
exits like an interpreter does (atexit handlers, flushed output). The zygote itself never runs a
test and never imports anything from a clone, so every job starts from the same
state: what differs from a fresh interpreter is only that pytest was imported
before the job's working directory was on ``sys.path``.

A test may start a process that leaves the job's session (``setsid``, a
double-forked daemon): killing the job's process group does not reach it, and it
could go on changing the clone while the next commit is tested. So the zygote is
a *child subreaper* (``become_subreaper``): whatever a job started comes back to
it as a child when its parent dies, and once the job's own child has ended, every
other child the zygote has is a leftover of that job, killed and reaped
(``kill_leftovers``) before the job's end is reported. The runner does the same
for a job run in a fresh interpreter. Both functions live here because the zygote
runs this file as a script: a module of ours it imported would be in every job's
``sys.modules``, hiding a module of the same name in the clone.

Talk with the runner is one JSON object per line over the zygote's stdin and
stdout:

* zygote -> runner, once: ``{"ready": true, "pytest": VERSION, "sources": [[PATH,
  INODE, MTIME_NS, SIZE], ...]}`` or ``{"ready": false, "error": TEXT}`` (then it
  exits). The sources are what the zygote's imports came from (see
  ``_snapshot_sources``): when one of them changes, the runner starts a new zygote
  before the next job, so that a job never runs a pytest (or a sitecustomize, or a
  Python) older than a fresh interpreter would;
* runner -> zygote: ``{"cwd": DIR, "args": [...], "env": {...}, "output": PATH}``;
* zygote -> runner: ``{"pid": PID}`` as soon as the child exists (the runner kills
  the job's process group by that pid on a timeout), then ``{"pid": PID,
  "status": CODE, "leftovers": COUNT, "stuck": [PID, ...]}`` when it has ended and
  what it left running has been killed (CODE as ``subprocess`` gives it: negative
  for a signal; COUNT processes were killed; the stuck ones did not die in time).

The zygote exits when its stdin closes (the runner stopped or died).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

#: Longest request line the zygote reads (an environment of a few hundred variables).
MAX_REQUEST_BYTES = 1 << 20
#: Longest reply line the runner reads from the zygote (the ready line lists a few
#: hundred source files).
MAX_REPLY_BYTES = 1 << 20
#: How long the zygote may take to import pytest (about 0.3 s on the benchmark machine).
READY_TIMEOUT_S = 60.0
#: How long forking a child for a job may take.
FORK_TIMEOUT_S = 10.0
#: After the time limit and the kill, how long to wait for the zygote to report the
#: child's end before giving up on the zygote (it includes LEFTOVERS_TIMEOUT_S).
END_MARGIN_S = 30.0
#: prctl(2): orphaned descendants are re-parented to this process, not to init.
PR_SET_CHILD_SUBREAPER = 36
#: Longest that killing and reaping a job's leftovers may take: a killed process
#: is gone within milliseconds, unless it is stuck in the kernel (a hung NFS mount).
LEFTOVERS_TIMEOUT_S = 10.0
#: Most kill-and-reap rounds: each reaches the children of the processes the last
#: one killed (a daemon's own children), and a process that keeps forking is
#: caught one generation per round.
LEFTOVERS_ROUNDS = 100

class WarmPytestError(Exception):
    """The zygote could not run a job (it is gone or confused); the runner falls back
    to a fresh interpreter."""


def _stat_key(path: str) -> list | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_ino, status.st_mtime_ns, status.st_size]


def _snapshot(paths) -> list[list]:
    return [[path, *(_stat_key(path) or [None] * 3)] for path in sorted(set(paths))]


def changed_source(snapshot: list[list]) -> str | None:
    """The first path in ``snapshot`` that is not as it was then (gone, replaced,
    written), or None."""
    for path, *key in snapshot:
        if (_stat_key(path) or [None] * 3) != key:
            return path
    return None


def _imported_sources() -> list[str]:
    """The files the zygote's modules came from, but the standard library's (an
    upgrade of Python replaces the interpreter and changes the library's folder,
    which are watched), and the folders that hold them."""
    import sysconfig

    folders = sysconfig.get_paths()
    library = tuple(os.path.join(folders[name], "") for name in ("stdlib", "platstdlib"))
    # Installed packages may sit inside the library's folder (site-packages).
    installed = tuple(os.path.join(folders[name], "") for name in ("purelib", "platlib"))
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.isabs(path) and (path.startswith(installed) or not path.startswith(library)):
            files.add(path)
    return sorted(files | {os.path.dirname(path) for path in files})


def _preload() -> dict:
    """Import pytest and its built-in plugins, as every pytest run does first; returns
    what to announce.

    Installed plugins (entry points) are not imported here: pytest rewrites their
    asserts when it imports them itself, which it cannot do for a module already
    imported (and says so in a warning), so each job loads them as a fresh
    interpreter would.
    """
    # The folders on the path are taken before the imports, so that a package
    # installed while they run is noticed (a new file changes its folder).
    folders = _snapshot([sys.executable, *(path for path in sys.path if os.path.isdir(path))])
    import pytest
    from _pytest.config import default_plugins, essential_plugins

    for name in (*essential_plugins, *default_plugins):
        try:
            importlib.import_module("_pytest." + name)
        except ImportError:
            pass  # a plugin that needs an optional module; pytest skips it the same way
    return {"ready": True, "pytest": pytest.__version__, "sources": folders + _snapshot(_imported_sources())}


def _become_job(job: dict, channels: tuple[int, int]) -> None:
    """In the forked child: turn into ``python -m pytest ARGS`` run in ``job["cwd"]``. Never returns."""
    code = 1
    try:
        os.setsid()
        # As a fresh interpreter has them (SIGPIPE stays ignored, as Python sets it).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        output = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        for fd in (output, null, *channels):
            os.close(fd)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        # What the zygote's import system remembers of folders is from before this
        # checkout: a folder on the path that did not exist then (src/ of a
        # $PYTHONPATH=src) would stay "not there", and a listing could be stale.
        importlib.invalidate_caches()
        import _pytest.config
        import pytest

        sys.argv = [os.path.join(os.path.dirname(pytest.__file__), "__main__.py"), *job["args"]]
        # What ``python -m`` puts first on the path: the working directory.
        sys.path.insert(0, os.getcwd())
        # What pytest/__main__.py calls (pytest 9.1 made the public name deprecated).
        console_main = getattr(_pytest.config, "_console_main", None) or pytest.console_main
        code = console_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the job's output, like an interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # An interpreter's exit: wait for the threads the tests left running (as
        # ``threading._shutdown`` does at the end of a program), then the atexit
        # handlers, then flushed output.
        try:
            import atexit

            shutdown = getattr(threading, "_shutdown", None)
            if shutdown is not None:
                shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def become_subreaper() -> bool:
    """Make this process a child subreaper: a process it started, directly or not,
    whose parent dies is re-parented to it rather than to init, whatever session
    or process group it moved to. It must then reap such children
    (``kill_leftovers``). False where that is not possible (not Linux). The setting
    is not inherited: processes started from here are ordinary parents.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children():
    """This process's children, as (pid, state letter, process group) ("Z": ended,
    not yet reaped), yielded as they are read from /proc.

    Every /proc/PID/stat is read, because /proc/PID/task/TID/children needs a kernel
    option that is often off (as on the test machine): about 1.6 ms with 100
    processes on the machine.
    """
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # it ended meanwhile
        # The command name is in parentheses and may contain spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[1]) == me:
            yield int(entry), fields[0].decode("ascii", "replace"), int(fields[2])


def _reap_all(pids, deadline: float, killed: set[int]) -> list[int]:
    """Reap each of ``pids`` (children of this process, killed) as it ends, adding
    to ``killed`` those a SIGKILL ended; returns those still there at ``deadline``.

    Ended ones are reaped at once; for the others it waits on their pidfds, which
    become readable when a process ends: no polling, and unlike a blocking waitpid
    no hang on a process stuck in the kernel. A pid whose pidfd cannot be opened
    (too many at once) counts as still there: the next step's sweep retries it.
    """

    def reap(pid: int) -> bool:
        try:
            ended, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped already: nothing left to wait for
        if ended and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed.add(pid)
        return bool(ended)

    pending = [pid for pid in pids if not reap(pid)]
    waiting: dict[int, int] = {}  # pidfd -> pid
    stuck = []
    poller = select.poll()
    try:
        for pid in pending:
            try:
                descriptor = os.pidfd_open(pid)
            except OSError:
                stuck.append(pid)
                continue
            waiting[descriptor] = pid
            poller.register(descriptor, select.POLLIN)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for descriptor, _ in poller.poll(remaining * 1000):
                poller.unregister(descriptor)
                os.close(descriptor)
                reap(waiting.pop(descriptor))
    finally:
        for descriptor in waiting:
            os.close(descriptor)
    return sorted(stuck + list(waiting.values()))


def kill_leftovers(keep=frozenset()) -> tuple[int, list[int]]:
    """SIGKILL and reap every child of this process but those in ``keep``, then the
    children they leave, until there are none: in a subreaper, after a job, what the
    job left running. Returns (how many a SIGKILL ended, pids still there after
    LEFTOVERS_TIMEOUT_S or LEFTOVERS_ROUNDS rounds).

    Only this process's own children, and their process groups, are signalled: a
    child's pid cannot be given to another process before it is reaped here, nor its
    group's id while it is in the group, so a kill never reaches a stranger that took
    the number of a process that just ended. When a killed child ends, the kernel
    re-parents its children to this process before the child can be reaped, so the
    next round finds them. Each child is killed the moment it is found, with its
    group: a process that keeps forking and exiting (a daemon that "hops") shows
    /proc mostly the parents it left, ended, but stays in their group.
    The caller must be the only one starting children meanwhile: any new child not
    in ``keep`` is taken for a leftover.
    """
    if not keep:
        try:
            # No children at all (the usual case): no need to read /proc.
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return 0, []
    killed: set[int] = set()
    deadline = time.monotonic() + LEFTOVERS_TIMEOUT_S
    # Groups not to kill whole: this process's own, and those of the children kept.
    spared_groups = {os.getpgid(0)} | {_group_of(pid) for pid in keep}
    killed_groups: set[int] = set()
    for _ in range(LEFTOVERS_ROUNDS):
        found = []
        for pid, state, group in _children():
            if pid in keep:
                continue
            found.append(pid)
            if state != "Z":
                os.kill(pid, signal.SIGKILL)  # a child not reaped yet: it cannot be gone
            if group not in spared_groups and group not in killed_groups:
                # Its whole group at once, a child it is forking this moment included
                # (the kernel does not let a fork escape a signal sent to the group):
                # a process that hops from pid to pid by forking stays in its group,
                # and leaves only ended parents behind for /proc to show. A group
                # holds only processes of the session that made it, all the job's.
                killed_groups.add(group)
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            return len(killed), []
        stuck = _reap_all(found, deadline, killed)
        if stuck:
            return len(killed), stuck
    # Out of rounds: a process that forks faster than it is killed.
    return len(killed), sorted(pid for pid, _, _ in _children() if pid not in keep)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def serve(requests, replies) -> int:
    """The zygote's loop: one job at a time until ``requests`` ends."""
    # Ctrl-C in a terminal reaches the whole foreground group; the runner decides
    # when the zygote stops (by closing its stdin), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Before any job is forked: what a job leaves behind comes back here, to be killed.
    subreaper = become_subreaper()
    try:
        announce = _preload()
    except Exception as exc:  # noqa: BLE001 - the runner falls back to a fresh interpreter per job
        _send(replies, {"ready": False, "error": "%s: %s" % (exc.__class__.__name__, exc)})
        return 1
    if threading.active_count() != 1:
        # fork() copies one thread only; a thread started by an import would leave
        # the children with half-held locks.
        _send(replies, {"ready": False, "error": "importing pytest started threads"})
        return 1
    _send(replies, announce)
    while True:
        line = requests.readline(MAX_REQUEST_BYTES)
        if not line:
            return 0
        try:
            job = json.loads(line)
            if not (isinstance(job.get("args"), list) and isinstance(job.get("env"), dict)
                    and isinstance(job.get("cwd"), str) and isinstance(job.get("output"), str)):
                raise ValueError("a job needs cwd, args, env and output")
        except ValueError as exc:
            _send(replies, {"error": "bad request: %s" % exc})
            continue
        # Nothing the zygote buffered may end up in a job's output.
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child == 0:
            _become_job(job, (requests.fileno(), replies.fileno()))
        _send(replies, {"pid": child})
        _, status = os.waitpid(child, 0)
        # The zygote starts nothing else: every other child it has is the job's.
        leftovers, stuck = kill_leftovers() if subreaper else (0, [])
        _send(replies, {"pid": child, "status": os.waitstatus_to_exitcode(status), "leftovers": leftovers, "stuck": stuck})


class WarmPytest:
    """The runner's side: one zygote process, one job at a time (the runner's worker
    thread is its only user)."""

    def __init__(self, env: dict, cwd: str):
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.description = ""
        self._sources: list[list] = []
        self._buffer = b""
        #: After ``wait``: how many processes the job left running, which the zygote
        #: killed, and the pids of those that would not die.
        self.leftovers = 0
        self.stuck: list[int] = []

    def start(self) -> None:
        """Start the zygote and wait until it has imported pytest; WarmPytestError if it cannot."""
        self.close()
        self._buffer = b""
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the runner's terminal is the runner's to handle
        )
        ready = self._read(READY_TIMEOUT_S)
        if not ready.get("ready"):
            self.close()
            raise WarmPytestError("warm pytest could not start: %s" % ready.get("error"))
        self.description = "pytest %s" % ready.get("pytest")
        self._sources = ready.get("sources") if isinstance(ready.get("sources"), list) else []

    def changed_source(self) -> str | None:
        """A file or folder the zygote's imports came from that has changed since it
        started (a pytest upgraded, a sitecustomize edited), or None. About 0.3 ms."""
        return changed_source(self._sources)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self, cwd: str, args: list[str], env: dict, output_path: str) -> int:
        """Fork a child that runs ``python -m pytest ARGS`` in ``cwd``; returns its pid
        (also its process group)."""
        if not self.running:
            raise WarmPytestError("warm pytest is not running")
        job = {"cwd": cwd, "args": args, "env": env, "output": output_path}
        try:
            self.process.stdin.write(json.dumps(job).encode("utf-8") + b"\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise WarmPytestError("warm pytest is gone: %s" % exc) from None
        started = self._read(FORK_TIMEOUT_S)
        if not isinstance(started.get("pid"), int):
            raise WarmPytestError("warm pytest refused the job: %s" % started.get("error"))
        return started["pid"]

    def wait(self, pid: int, timeout: float) -> int:
        """The exit status of child ``pid`` (negative: killed by that signal), once it
        and whatever it left running have ended (see ``leftovers``)."""
        self.leftovers, self.stuck = 0, []
        ended = self._read(timeout)
        if ended.get("pid") != pid or not isinstance(ended.get("status"), int):
            raise WarmPytestError("warm pytest answered %r for job %d" % (ended, pid))
        if isinstance(ended.get("leftovers"), int):
            self.leftovers = ended["leftovers"]
        if isinstance(ended.get("stuck"), list):
            self.stuck = [stray for stray in ended["stuck"] if isinstance(stray, int)]
        return ended["status"]

    def close(self) -> None:
        """Stop the zygote: end of its input, then a kill if it does not exit."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        _reap(process)
        process.stdout.close()

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        stream = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WarmPytestError("warm pytest did not answer within %g s" % timeout)
            readable, _, _ = select.select([stream], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(stream, 65536)
            if not chunk:
                # Its pipe closes before the kernel makes it a zombie; reap it so that
                # ``running`` is False as soon as this error is raised.
                raise WarmPytestError("warm pytest exited (status %s)" % _reap(self.process))
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise WarmPytestError("warm pytest sent a reply of more than %d bytes" % MAX_REPLY_BYTES)
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise WarmPytestError("warm pytest sent %r" % line[:200]) from None
        if not isinstance(message, dict):
            raise WarmPytestError("warm pytest sent %r" % line[:200])
        return message


def _reap(process: subprocess.Popen) -> int:
    """The zygote's exit status, after a kill if it has not exited within 5 s."""
    try:
        return process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def zygote_main() -> int:
    # Run by path, Python put this file's folder first on the path: that would make
    # the package's modules importable by their bare names, for pytest's imports
    # here and for every job. A job gets the working directory there instead.
    del sys.path[0]
    # The protocol moves off fds 0 and 1, which become /dev/null and stderr: what a
    # plugin prints while it is imported must not end up in a reply.
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return serve(requests, replies)


if __name__ == "__main__":
    sys.exit(zygote_main())
