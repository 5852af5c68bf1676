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

The zygote is a child subreaper: once a job's own child has ended, it kills and
reaps what the job left running, even in another session (leftovers.py), before it
reports the end. It runs this file as a script, and imports nothing of the package:
a module of ours in its ``sys.modules`` would be in every job's too, hiding a module
of the same name in the clone (commit-ci testing itself, say). So it loads
leftovers.py by its path, under a name of its own, without entering it in
``sys.modules``; and it takes its own folder off ``sys.path``.

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

import importlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from commit_ci.isolation import Launch

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
#: child's end before giving up on the zygote (it includes leftovers.LEFTOVERS_TIMEOUT_S).
END_MARGIN_S = 30.0

class WarmPytestError(Exception):
    """The zygote could not run a job (it is gone or confused); the runner falls back
    to a fresh interpreter."""


def _stat_key(path: str) -> list | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_ino, status.st_mtime_ns, status.st_size]


def _process_start_ns() -> int:
    """When this process started, in ``time.time_ns()`` terms (from /proc, to within a
    clock tick); the time now where /proc cannot tell."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            ticks = int(handle.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith(b"btime "))
        return boot * 10**9 + ticks * 10**9 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time_ns()


#: A file changed after this may have been imported in its earlier state (the imports
#: come before the snapshot of what they came from): it counts as changed. The runner
#: says when it started the zygote (``zygote_main``), to within the 20 ms by which the
#: kernel's file times may lag; else a second of slack covers /proc's clock ticks and
#: /proc/stat's whole seconds.
_NOT_BEFORE_NS = _process_start_ns() - 10**9
#: The lag of file times (the kernel's coarse clock) behind ``time.time_ns()``.
_FILE_TIME_LAG_NS = 20 * 10**6


def _snapshot(paths) -> list[list]:
    """Each path with its stat key; a file or folder changed since this process started
    gets a key that matches no real one, so that it counts as changed at once. Changed:
    its inode's change time is later (which, unlike the modification time, no one can
    set back: an edit in place, or an install that keeps a package's file times)."""
    snapshot = []
    for path in sorted(set(paths)):
        key = _stat_key(path) or [None] * 3
        try:
            changed = os.stat(path).st_ctime_ns >= _NOT_BEFORE_NS
        except OSError:
            changed = False
        if key[1] is not None and (changed or key[1] >= _NOT_BEFORE_NS):
            key[1] = -1
        snapshot.append([path, *key])
    return snapshot


def changed_source(snapshot: list[list], folders: bool = True) -> str | None:
    """The first path in ``snapshot`` that is not as it was then (gone, replaced,
    written), or None; without ``folders``, only files are looked at."""
    for path, *key in snapshot:
        if not folders and os.path.isdir(path):
            continue
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
    if sys.version_info < (3, 9):  # os.pidfd_open, os.waitstatus_to_exitcode
        raise RuntimeError("a warm pytest needs Python 3.9 or later; jobs start a fresh one")
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
        # Then what a fresh one puts next: the job's $PYTHONPATH folders that the
        # zygote's own start did not put there (a shard's plugin folder, sharding.py).
        added = [folder for folder in job["env"].get("PYTHONPATH", "").split(os.pathsep) if folder]
        sys.path[1:1] = [folder for folder in dict.fromkeys(added) if folder not in sys.path]
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


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _load_leftovers():
    """leftovers.py, from beside this file, as a module that is not in ``sys.modules``
    (see the module docstring)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "leftovers.py")
    spec = importlib.util.spec_from_file_location("_zygote_leftovers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(requests, replies) -> int:
    """The zygote's loop: one job at a time until ``requests`` ends."""
    # Ctrl-C in a terminal reaches the whole foreground group; the runner decides
    # when the zygote stops (by closing its stdin), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    leftovers = _load_leftovers()
    # Before any job is forked: what a job leaves behind comes back here, to be killed.
    subreaper = leftovers.become_subreaper()
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
            # At once: the runner waits for this exit before the job's result goes
            # out, and an interpreter's shutdown (pytest's modules freed one by one)
            # is tens of milliseconds of nothing anyone needs.
            replies.flush()
            os._exit(0)
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
        killed, stuck = leftovers.kill_leftovers() if subreaper else (0, [])
        _send(replies, {"pid": child, "status": os.waitstatus_to_exitcode(status), "leftovers": killed, "stuck": stuck})


class WarmPytest:
    """The runner's side of one zygote, for one job.

    A job's hash seed (PYTHONHASHSEED) is fixed when its interpreter starts, and every
    job must get a random one of its own, as a fresh interpreter does; so a zygote
    serves one job and is closed. The runner starts the next one ahead, while a job
    runs or after it (``start`` returns at once), so that the next job only forks.
    The runner's worker thread is its only user.
    """

    def __init__(self, python: str, env: dict, cwd: str, hash_seed: int):
        self.python = python
        self.hash_seed = hash_seed
        #: The variables it was started with, but the hash seed: a job with others
        #: (another PYTHONPATH) would not find what a fresh interpreter finds.
        self.base_env = env
        self.env = dict(env, PYTHONHASHSEED=str(hash_seed))
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.description = ""
        self.ready = False
        self._sources: list[list] = []
        self._buffer = b""
        #: After ``wait``: how many processes the job left running, which the zygote
        #: killed, and the pids of those that would not die.
        self.leftovers = 0
        self.stuck: list[int] = []
        #: The cgroup it runs in (isolation.JobCgroup), the executor's to remove.
        self.cgroup = None
        #: The job folders' slot it was started with (isolation.Isolation), if any.
        self.slot: int | None = None
        #: How it was started (its sandbox's init is waited for when it is closed).
        self._launch: "Launch | None" = None

    def start(self, launch: "Launch | None" = None) -> None:
        """Start the zygote (as ``launch`` says: in the cgroup of the job it will serve,
        as the job user, in the sandbox); it imports pytest while the caller goes on
        (``wait_ready``)."""
        self.close()
        self._buffer = b""
        self.ready = False
        self._launch = launch
        command = [self.python, os.path.abspath(__file__), str(time.time_ns())]
        try:
            self.process = subprocess.Popen(
                launch.command(command) if launch is not None else command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C in the runner's terminal is the runner's to handle
                **(launch.popen_options() if launch is not None else {}),
            )
        except subprocess.SubprocessError as exc:  # what went wrong before exec
            raise OSError("cannot start the warm pytest: %s" % exc) from None
        finally:
            if launch is not None:
                launch.started()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the zygote has imported pytest; WarmPytestError if it cannot."""
        if self.ready:
            return
        if self.process is None:
            raise WarmPytestError("warm pytest is not started")
        ready = self._read(timeout)
        if not ready.get("ready"):
            self.close()
            raise WarmPytestError("warm pytest could not start: %s" % ready.get("error"))
        self.description = "pytest %s" % ready.get("pytest")
        self._sources = ready.get("sources") if isinstance(ready.get("sources"), list) else []
        self.ready = True

    def changed_source(self, folders: bool = True) -> str | None:
        """A file or folder the zygote's imports came from that has changed since it
        started (a pytest upgraded, a sitecustomize edited), or None. About 0.3 ms.
        Without ``folders``, only the files it imported are looked at: in a project's
        environment, where the project is installed again for every commit, and what
        the zygote imported is all that matters."""
        return changed_source(self._sources, folders)

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
        """Stop the zygote: end of its input, then a kill if it does not exit. One that
        is not ready yet (a spare no job will use) is killed at once."""
        process, self.process = self.process, None
        if process is None:
            return
        if not self.ready:
            process.kill()
        try:
            process.stdin.close()
        except OSError:
            pass
        _reap(process)
        process.stdout.close()
        launch, self._launch = self._launch, None
        if launch is not None:
            # The init of its sandbox's pid namespace outlives bwrap by a moment: gone
            # before anything that would take it for a job's leftover (and its pipe closed).
            launch.ended()

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
    global _NOT_BEFORE_NS
    if len(sys.argv) > 1 and sys.argv[1].isdigit():  # when the runner started this process
        _NOT_BEFORE_NS = int(sys.argv[1]) - _FILE_TIME_LAG_NS
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
