"""What keeps a job away from the runner: its keys, its state, and the jobs after it.

A job is code from whoever can push: the commit's setup commands, the build of its
project, its tests. None of it may reach the runner's key, which would let it speak for
the runner (post ``results passed`` for any attempt the runner holds, or, with the one
shared secret, anything at all). Four layers, each where the machine allows it:

* **Environment.** A job starts from a short list of the runner's variables (``PATH``,
  the locale, the time zone, proxies and certificates; ``--job-env NAME`` adds more),
  never from all of them: ``CI_SECRET`` and whatever else the runner was given stay
  with the runner. ``HOME`` and ``TMPDIR`` are folders of the job's own, emptied after
  each job. The installers' own settings (``PIP_*``, ``UV_*``: index addresses, which
  may hold a password) reach the setup steps only, not the tests.
* **Another user.** A runner started as root runs every step of a job as ``--job-user``
  (default ``nobody``), which can read neither the key file, nor the runner's state
  folder (mode 0700), nor ``/proc/<runner>/environ``. The checkout itself stays root's,
  in a clone whose ``.git`` the job user cannot write; what the job may write (the work
  tree, its home) is handed over after the checkout and taken back before the next.
* **A sandbox** (bubblewrap, where it is installed and user namespaces work): the job
  sees the file system read-only but for the clone's work tree and its own folders, a
  private ``/tmp``, its own process tree in ``/proc``; the state folder and the key file
  are hidden. This is what protects a runner that is not root.
* **A cgroup of its own** (cgroup v2, where it can be written): everything the job
  started is killed with ``cgroup.kill`` when it ends, whatever it did to leave the
  process tree, and ``--job-memory`` limits its memory (with the v2 memory controller,
  or the v1 one where the machine mounts that instead).

docs/security.md says what each layer protects and what it does not. An ``Isolation``
is built once from the runner's options (``isolation_from_arguments``); the executor asks
it for each step's variables (``test_variables``, ``setup_variables``) and how to start
it (``launch``), and calls ``hand_over``/``take_back`` around the checkout.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger("runner")

#: The runner's variables a job gets, by name: where programs are, how text is shown,
#: the time zone, and how to reach the network (proxies, certificate authorities).
PASSED_VARIABLES = frozenset({
    "PATH", "LANG", "LANGUAGE", "TZ",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
})
#: ... and by prefix: the locale's categories, and pytest's own settings (an operator's
#: PYTEST_ADDOPTS applies to every commit alike).
PASSED_PREFIXES = ("LC_", "PYTEST_")
#: Passed to the setup steps only (building environments, installing the project):
#: the installers' settings, which may name a private index with its password.
SETUP_PREFIXES = ("PIP_", "UV_")
#: Never passed, even when asked for with --job-env.
SECRET_VARIABLES = frozenset({"CI_SECRET"})

#: The default job user of a runner started as root.
DEFAULT_JOB_USER = "nobody"
#: How long the trial run of the sandbox at start may take.
SANDBOX_TRIAL_TIMEOUT_S = 20.0
#: How long killing a job's cgroup may take before its processes are reported stuck.
CGROUP_KILL_TIMEOUT_S = 5.0
#: How long freezing a warm pytest's cgroup may take before it is given up.
FREEZE_TIMEOUT_S = 2.0
#: Where the kernel shows its mounts and a process's cgroups.
MOUNTINFO = "/proc/self/mountinfo"
OWN_CGROUPS = "/proc/self/cgroup"


class IsolationError(Exception):
    """The isolation asked for cannot be had on this machine (said at start)."""


# --- the job's variables ---------------------------------------------------------------


def passed_variables(environ: dict, extra_names: tuple[str, ...] = (), setup: bool = False) -> dict:
    """The variables of ``environ`` a job gets (see the module docstring)."""
    prefixes = PASSED_PREFIXES + (SETUP_PREFIXES if setup else ())
    return {name: value for name, value in environ.items()
            if name not in SECRET_VARIABLES
            and (name in PASSED_VARIABLES or name.startswith(prefixes) or name in extra_names)}


# --- the job user -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobUser:
    """The account a root runner's jobs run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group it is in, its own first

    @classmethod
    def named(cls, name: str) -> "JobUser":
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise IsolationError("--job-user %s: no such user (README.md, Isolation, says how to make one)"
                                 % name) from None
        groups = [entry.pw_gid] + [group.gr_gid for group in grp.getgrall()
                                   if name in group.gr_mem and group.gr_gid != entry.pw_gid]
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(groups))

    def can_enter(self, path: str) -> str | None:
        """None if this user can reach ``path`` (search every folder on the way, and
        read it, or run it if it is a file); else the first place that stops it."""
        path = os.path.realpath(path)
        parts = path.split(os.sep)
        for depth in range(1, len(parts) + 1):
            place = os.sep.join(parts[:depth]) or os.sep
            try:
                info = os.stat(place)
            except OSError as exc:
                return "%s (%s)" % (place, exc.strerror)
            wanted = 1 if stat.S_ISDIR(info.st_mode) else 4  # search a folder, read a file
            if not self._allowed(info, wanted):
                return "%s (mode %04o, owner %d)" % (place, stat.S_IMODE(info.st_mode), info.st_uid)
        return None

    def _allowed(self, info: os.stat_result, bit: int) -> bool:
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid == self.uid:
            return bool(mode & (bit << 6))
        if info.st_gid in self.groups:
            return bool(mode & (bit << 3))
        return bool(mode & bit)

    def become(self) -> None:
        """In a child, before exec: drop to this user for good."""
        os.setgroups(list(self.groups))
        os.setgid(self.gid)
        os.setuid(self.uid)


# --- the sandbox ---------------------------------------------------------------------


#: Folders a sandboxed job gets empty ones of its own in place of.
PRIVATE_FOLDERS = ("/tmp", "/var/tmp")


@dataclass(frozen=True)
class Sandbox:
    """bubblewrap, and what it hides (the state folder, the key file)."""

    bwrap: str
    hidden_folders: tuple[str, ...]
    hidden_files: tuple[str, ...]
    #: What the job needs (interpreters, the environment cache) that lives in a folder
    #: it gets a private one of: bound back, read-only.
    needed: tuple[str, ...] = ()

    def wrap(self, command: list[str], cwd: str, writable: list[str], read_only: list[str],
             moved: tuple[tuple[str, str], ...] = ()) -> list[str]:
        """``command`` run in the sandbox: the whole file system read-only, a private
        /tmp, /dev, and a pid namespace with its own /proc (as the runner's user, a job
        could otherwise read /proc/<runner>/environ; as a job user, it could reach the
        warm pytest started for the next job), ``writable`` bound back writable, each
        (source, target) of ``moved`` bound writable at its target, ``read_only``
        (inside those) bound read-only again, the hidden things covered over."""
        argv = [self.bwrap, "--die-with-parent", "--unshare-ipc", "--ro-bind", "/", "/", "--dev", "/dev",
                "--unshare-pid", "--proc", "/proc"]
        for folder in PRIVATE_FOLDERS:
            if os.path.isdir(folder):
                argv += ["--tmpfs", folder]
        for path in self.needed:
            if os.path.exists(path) and path.startswith(tuple(folder + os.sep for folder in PRIVATE_FOLDERS)):
                argv += ["--ro-bind", path, path]
        for path in writable:
            argv += ["--bind", path, path]
        for source, target in moved:
            argv += ["--bind", source, target]
        for path in read_only:
            if os.path.exists(path):
                argv += ["--ro-bind", path, path]
        for path in self.hidden_folders:
            if os.path.isdir(path):
                argv += ["--tmpfs", path]
        for path in self.hidden_files:
            if os.path.exists(path):
                argv += ["--ro-bind", "/dev/null", path]
        return argv + ["--chdir", cwd, "--", *command]


def find_sandbox(choice: str, user: JobUser | None, hidden_folders: tuple[str, ...],
                 hidden_files: tuple[str, ...], needed: tuple[str, ...] = ()) -> Sandbox | None:
    """The sandbox ``--sandbox`` asks for ("auto", "on", "off"), tried once as the job
    user; None for "off", or for "auto" where bubblewrap is missing or does not work.
    IsolationError for "on" where it cannot be had."""
    if choice == "off":
        return None
    bwrap = shutil.which("bwrap")
    why = "bubblewrap (bwrap) is not installed" if bwrap is None else None
    if bwrap is not None:
        sandbox = Sandbox(bwrap, hidden_folders, hidden_files, tuple(os.path.realpath(path) for path in needed))
        # Started as a job's steps are: the sandbox's init, which outlives bwrap, is
        # waited for, not left to the first job's sweep to count as its leftover.
        trial = Launch(wrap=sandbox.wrap([], "/", [], []), user=user)
        try:
            ended = subprocess.run(trial.command(["true"]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, timeout=SANDBOX_TRIAL_TIMEOUT_S, **trial.popen_options())
            if ended.returncode == 0:
                return sandbox
            why = "bwrap does not work here: %s" % ended.stderr.decode("utf-8", "replace").strip()[-300:]
        except (OSError, subprocess.SubprocessError) as exc:
            why = "bwrap does not work here: %s" % exc
        finally:
            trial.started()
            trial.ended()
    if choice == "on":
        raise IsolationError("--sandbox on: %s" % why)
    log.info("no sandbox for jobs: %s", why)
    return None


# --- cgroups -----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1048576``: bytes (K, M, G, T are powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text[-1:] in units and text[-1:] != "" else (text, "")
    if not number.isdigit() or int(number) * units[unit] < 1 << 20:
        raise ValueError("want a size of at least 1M, such as 512M or 2G, got %r" % text)
    return int(number) * units[unit]


def _mounts() -> dict[str, list[tuple[str, str]]]:
    """cgroup mounts by type ("cgroup2", "cgroup"): (mount point, root within the hierarchy, super options)."""
    found: dict[str, list[tuple[str, str]]] = {"cgroup2": [], "cgroup": []}
    try:
        with open(MOUNTINFO, encoding="utf-8") as handle:
            for line in handle:
                before, _, after = line.partition(" - ")
                fields, tail = before.split(), after.split()
                if len(fields) >= 5 and tail and tail[0] in found:
                    found[tail[0]].append((fields[4], fields[3] + "|" + (tail[2] if len(tail) > 2 else "")))
    except OSError:
        pass
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy: "" for the v2 one, else its controllers."""
    paths = {}
    try:
        with open(OWN_CGROUPS, encoding="utf-8") as handle:
            for line in handle:
                _number, controllers, path = line.rstrip("\n").split(":", 2)
                paths[controllers] = path
    except OSError:
        pass
    return paths


def _folder(mount_point: str, mount_root: str, path: str) -> str:
    """The folder of cgroup ``path`` under a mount of the hierarchy from ``mount_root``."""
    relative = os.path.relpath(path, mount_root) if mount_root != "/" else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, relative))


class Cgroups:
    """Where this runner makes its jobs' cgroups: a folder of its own (``commit-ci-<pid>``)
    under its cgroup in the v2 hierarchy, and, for a memory limit on a machine whose
    memory controller is in a v1 hierarchy, one there too."""

    def __init__(self, v2: str | None, memory_v1: str | None, memory_limit: int | None):
        self.v2 = v2
        self.memory_v1 = memory_v1
        self.memory_limit = memory_limit
        self._count = 0

    @classmethod
    def find(cls, memory_limit: int | None) -> "Cgroups | None":
        """This runner's cgroups, made now; None where cgroup v2 cannot be written (and
        no memory limit is asked for). IsolationError if a limit is asked for and no
        memory controller can be used."""
        mounts, own = _mounts(), _own_cgroups()
        v2 = memory_v1 = None
        name = "commit-ci-%d" % os.getpid()
        if mounts["cgroup2"] and "" in own:
            mount_point, roots = mounts["cgroup2"][0]
            parent = _folder(mount_point, roots.split("|")[0], own[""])
            v2 = _make_own_folder(parent, name)
            if v2 is not None and memory_limit is not None and not _enable_memory_v2(parent, v2):
                memory_limit_v2 = False
            else:
                memory_limit_v2 = v2 is not None
        else:
            memory_limit_v2 = False
        if memory_limit is not None and not memory_limit_v2:
            for mount_point, roots in mounts["cgroup"]:
                if "memory" in roots.split("|")[1].split(","):
                    controllers = next((key for key in own if "memory" in key.split(",")), None)
                    if controllers is not None:
                        parent = _folder(mount_point, roots.split("|")[0], own[controllers])
                        memory_v1 = _make_own_folder(parent, name)
                    break
            if memory_v1 is None:
                if v2 is not None:
                    _remove_folder(v2)
                raise IsolationError("--job-memory: no memory controller this runner can use (cgroup v2 with "
                                     "the memory controller, or a writable v1 memory hierarchy)")
        if v2 is None and memory_v1 is None:
            return None
        return cls(v2, memory_v1, memory_limit)

    def describe(self) -> str:
        where = "cgroup v2 (%s)" % self.v2 if self.v2 else "no cgroup v2"
        if self.memory_limit is not None:
            where += ", memory limit %d MiB (%s)" % (self.memory_limit >> 20, "v1" if self.memory_v1 else "v2")
        return where

    def new_job(self) -> "JobCgroup":
        """A cgroup for the next job (or warm pytest that will serve one)."""
        self._count += 1
        name = "job-%d" % self._count
        folders = []
        for base in (self.v2, self.memory_v1):
            if base is not None:
                folder = os.path.join(base, name)
                os.mkdir(folder)
                folders.append(folder)
        cgroup = JobCgroup(folders, self.v2 is not None)
        if self.memory_limit is not None:
            cgroup.limit_memory(self.memory_limit, v1=self.memory_v1 is not None)
        return cgroup

    def close(self) -> None:
        for base in (self.v2, self.memory_v1):
            if base is not None:
                _remove_folder(base)


def _make_own_folder(parent: str, name: str) -> str | None:
    """``parent/name``, made now, after removing what runners that died left there."""
    try:
        for entry in os.listdir(parent):
            if entry.startswith("commit-ci-") and entry[10:].isdigit() and not _alive(int(entry[10:])):
                _remove_folder(os.path.join(parent, entry))
        folder = os.path.join(parent, name)
        os.mkdir(folder)
        return folder
    except OSError as exc:
        log.debug("no cgroup of its own in %s: %s", parent, exc)
        return None


def _enable_memory_v2(parent: str, own: str) -> bool:
    """Make the v2 memory controller available to the job cgroups under ``own``."""
    try:
        with open(os.path.join(parent, "cgroup.controllers"), encoding="ascii") as handle:
            if "memory" not in handle.read().split():
                return False
        for folder in (parent, own):
            with open(os.path.join(folder, "cgroup.subtree_control"), "w", encoding="ascii") as handle:
                handle.write("+memory")
        return True
    except OSError as exc:
        log.debug("memory controller of %s: %s", parent, exc)
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_folder(folder: str) -> None:
    """Kill what is in cgroup ``folder`` and its children, and remove them (deepest first)."""
    for below, _subfolders, _files in sorted(os.walk(folder), key=lambda entry: -entry[0].count(os.sep)):
        JobCgroup([below], os.path.exists(os.path.join(below, "cgroup.kill"))).close()


class JobCgroup:
    """One job's cgroup (a folder in each hierarchy used)."""

    def __init__(self, folders: list[str], killable: bool):
        self.folders = folders
        self.killable = killable  # v2: cgroup.kill kills everything in it at once

    def limit_memory(self, limit: int, v1: bool) -> None:
        for folder in self.folders:
            for name in (("memory.limit_in_bytes", "memory.memsw.limit_in_bytes") if v1 else ("memory.max", "memory.swap.max")):
                path = os.path.join(folder, name)
                if os.path.exists(path):
                    value = "0" if name == "memory.swap.max" else str(limit)
                    with open(path, "w", encoding="ascii") as handle:
                        handle.write(value)

    def join_files(self) -> list[int]:
        """Descriptors of the ``cgroup.procs`` files, opened by the runner for a child
        to write "0" into (``Launch``) before it drops to the job user."""
        return [os.open(os.path.join(folder, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for folder in self.folders]

    def freeze(self, frozen: bool) -> bool:
        """Freeze (or thaw) every process in the cgroup; once frozen (within
        FREEZE_TIMEOUT_S), True. False where it cannot be done (no v2 freezer)."""
        if not self.killable:
            return False
        folder = self.folders[0]
        try:
            with open(os.path.join(folder, "cgroup.freeze"), "w", encoding="ascii") as handle:
                handle.write("1" if frozen else "0")
        except OSError as exc:
            log.warning("cannot %s cgroup %s: %s", "freeze" if frozen else "thaw", folder, exc)
            return False
        return not frozen or self._wait_for_event(b"frozen 1", FREEZE_TIMEOUT_S)

    def _wait_for_event(self, line: bytes, timeout: float) -> bool:
        """Whether the v2 cgroup's ``cgroup.events`` holds ``line`` (``frozen 1``,
        ``populated 0``) within ``timeout`` seconds: the kernel signals each change of
        that file to poll() (POLLPRI), so this waits for the change, not a timer."""
        try:
            events = os.open(os.path.join(self.folders[0], "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot read %s's events: %s", self.folders[0], exc)
            return False
        try:
            poller = select.poll()
            poller.register(events, select.POLLPRI | select.POLLERR)
            deadline = time.monotonic() + timeout
            while True:
                os.lseek(events, 0, os.SEEK_SET)
                if line in os.read(events, 4096):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                poller.poll(remaining * 1000)
        finally:
            os.close(events)

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the job for going past the limit."""
        for folder in self.folders:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    with open(os.path.join(folder, name), encoding="ascii") as handle:
                        for line in handle:
                            key, _, value = line.partition(" ")
                            if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                                return True
                except OSError:
                    continue
        return False

    def kill(self) -> int:
        """Kill everything in the cgroup at once; how many processes were there."""
        members = self._members()
        if self.killable:
            try:
                with open(os.path.join(self.folders[0], "cgroup.kill"), "w", encoding="ascii") as handle:
                    handle.write("1")
                return len(members)
            except OSError as exc:
                log.warning("cgroup.kill of %s: %s", self.folders[0], exc)
        for pid in members:  # a v1 hierarchy has no cgroup.kill
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(members)

    def host_pid(self, inner: int) -> int | None:
        """The pid, as the runner sees it, of the process in this cgroup that is
        ``inner`` in the pid namespace of its sandbox (``NSpid`` in /proc/PID/status)."""
        for pid in self._members():
            try:
                with open("/proc/%d/status" % pid, encoding="ascii", errors="replace") as handle:
                    for line in handle:
                        if line.startswith("NSpid:"):
                            if line.split()[-1] == str(inner):
                                return pid
                            break
            except OSError:
                continue
        return None

    def _members(self) -> list[int]:
        pids: set[int] = set()
        for folder in self.folders:
            try:
                with open(os.path.join(folder, "cgroup.procs"), encoding="ascii") as handle:
                    pids.update(int(line) for line in handle if line.strip())
            except OSError:
                pass
        return sorted(pids)

    def close(self) -> list[int]:
        """Kill what is left, wait (within CGROUP_KILL_TIMEOUT_S) until it has left the
        cgroup, and remove it; the pids that would not leave."""
        self.kill()
        deadline = time.monotonic() + CGROUP_KILL_TIMEOUT_S
        remaining = self._members()
        if remaining and self.killable:
            # A killed process leaves once it has exited: cgroup.events says when.
            self._wait_for_event(b"populated 0", CGROUP_KILL_TIMEOUT_S)
            remaining = self._members()
        pause = 0.001
        while remaining and time.monotonic() < deadline:
            # Cgroup v1 alone, with no events to wait on (cgroup.kill does not exist
            # there either: processes forked meanwhile are signalled again).
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            self.kill()
            remaining = self._members()
        for folder in self.folders:
            try:
                os.rmdir(folder)
            except OSError:
                pass
        return remaining


# --- how a step starts -------------------------------------------------------------------


#: Longest wait, after a sandboxed step ends, for the sandbox's init to be gone.
SANDBOX_EXIT_TIMEOUT_S = 1.0


@dataclass
class Launch:
    """How to start one step of a job: the command wrapped in the sandbox, and what the
    child does before exec (join the job's cgroup, then become the job user)."""

    wrap: list[str] = field(default_factory=list)  # bwrap's arguments, up to "--", or none
    user: JobUser | None = None
    cgroup_files: list[int] = field(default_factory=list)
    #: Where bwrap says the pid of the sandbox's init (--info-fd).
    _info: tuple[int, int] | None = None

    def command(self, command: list[str] | str) -> list[str] | str:
        if not self.wrap:
            return command
        if "--unshare-pid" not in self.wrap:  # no init of its own to wait for
            return [*self.wrap, *(["/bin/sh", "-c", command] if isinstance(command, str) else command)]
        self._info = os.pipe()
        os.set_inheritable(self._info[1], True)
        at = self.wrap.index("--chdir")
        return [*self.wrap[:at], "--info-fd", str(self._info[1]), *self.wrap[at:],
                *(["/bin/sh", "-c", command] if isinstance(command, str) else command)]

    def before_exec(self) -> None:
        """Runs in the child between fork and exec (as subprocess's preexec_fn)."""
        for fd in self.cgroup_files:
            os.write(fd, b"0")
        if self.user is not None:
            self.user.become()

    def popen_options(self) -> dict:
        options: dict = {}
        if self._info is not None:
            options["pass_fds"] = (self._info[1],)
        if self.cgroup_files or self.user is not None:
            options["preexec_fn"] = self.before_exec
        return options

    def started(self) -> None:
        """Once the child is started: close what only it needed."""
        for fd in self.cgroup_files:
            os.close(fd)
        self.cgroup_files = []
        if self._info is not None:
            os.close(self._info[1])

    def ended(self) -> None:
        """Once the step has ended: wait until the sandbox's init is gone too. bwrap
        returns as soon as the command has ended, and its init, which it kills on
        the way out, would otherwise be taken for a process the job left running."""
        if self._info is None:
            return
        reader, self._info = self._info[0], None
        try:
            with os.fdopen(reader, "rb") as info:
                pid = json.loads(info.read(4096) or b"{}").get("child-pid")
        except (OSError, ValueError):
            return
        if not isinstance(pid, int) or pid <= 1:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already
            return
        try:
            select.select([pidfd], [], [], SANDBOX_EXIT_TIMEOUT_S)  # readable once it has exited
        finally:
            os.close(pidfd)
        try:
            # Ended after bwrap, it came back to the runner (a subreaper): reaped here,
            # or the sweep for the job's leftovers would count it (bwrap SIGKILLs it).
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # bwrap reaped it, or this process is not a subreaper


# --- one runner's isolation ----------------------------------------------------------------


class Isolation:
    """How this runner keeps its jobs apart (see the module docstring): built once at
    start; the executor, its only user, calls it around each job and step.

    ``job_root/job`` holds the job's own folders, emptied before every job: ``home``
    (its HOME), ``tmp`` (its TMPDIR, when there is no sandbox to give it a private /tmp)
    and ``out`` (where the tests write their JUnit XML). The runner reads nothing there
    but through ``files.open_untrusted``.

    With a job user, a sandbox and cgroup v2 (``spare_apart``), a job's folders are one
    of two *slots* (``job_root/slot-0``, ``job_root/slot-1``), bound at ``job_root/job``
    in its sandbox: the warm pytest for the next job starts while a job runs, in a
    sandbox (and pid namespace) of its own with the other slot, out of the running
    job's reach. The paths a job sees are the same in either slot; ``outside`` says
    where the runner finds one.
    """

    def __init__(self, job_root: str, user: JobUser | None = None, sandbox: Sandbox | None = None,
                 cgroups: Cgroups | None = None, extra_names: tuple[str, ...] = ()):
        self.job_root = job_root
        self.user = user
        self.sandbox = sandbox
        self.cgroups = cgroups
        self.extra_names = tuple(name for name in extra_names if name not in SECRET_VARIABLES)
        #: The job's folders as its steps see them (``outside``: as the runner does).
        self.folder = os.path.join(job_root, "job")
        self.home = os.path.join(self.folder, "home")
        self.tmp = os.path.join(self.folder, "tmp")
        self.out = os.path.join(self.folder, "out")
        #: The slot of the job in progress, or of the next one (see the class docstring).
        self.slot = 0
        #: The cgroups of the job in progress (a warm pytest brings its own).
        self._cgroups: list[JobCgroup] = []
        _make_private_folder(job_root, 0o755)
        _make_private_folder(self.folder, 0o755)  # with slots, only where they are bound
        if self.spare_apart:
            for slot in (0, 1):
                _make_private_folder(self._slot_folder(slot), 0o755)

    @property
    def separate(self) -> bool:
        """Whether the job runs apart from the runner (another user, or a sandbox): a
        process the job can reach must not outlive it, nor run beside the next job."""
        return self.user is not None or self.sandbox is not None

    @property
    def warm_allowed(self) -> bool:
        """Whether a warm pytest may be started ahead of a job: where jobs run as the
        runner's own user without a sandbox (nothing of the runner's to keep from
        them), or as a job user whose processes the runner can freeze (cgroup v2)
        while it works in the job's folders and checks the next commit out. (For a job
        user, the executor starts one apart from the running job, or between jobs:
        ``spare_apart``.)"""
        if not self.separate:
            return True
        return self.user is not None and self.cgroups is not None and self.cgroups.v2 is not None

    @property
    def spare_apart(self) -> bool:
        """Whether the warm pytest for the next job may start while a job runs: in a
        sandbox of its own (a pid namespace the job cannot see into, folders of the
        other slot), as a job user, frozen (cgroup v2) while the runner checks out.
        Otherwise a job user's starts between jobs, when nothing of the job user's runs."""
        return self.user is not None and self.sandbox is not None and self.warm_allowed

    def _slot_folder(self, slot: int | None) -> str:
        """Where the runner finds the folders of ``slot`` (the current one for None)."""
        if not self.spare_apart:
            return self.folder
        return os.path.join(self.job_root, "slot-%d" % (self.slot if slot is None else slot))

    def outside(self, path: str) -> str:
        """Where the runner finds ``path`` of the job's folders (as the job sees it)."""
        if self.spare_apart and path.startswith(self.folder + os.sep):
            return self._slot_folder(None) + path[len(self.folder):]
        return path

    def describe(self) -> str:
        parts = ["as %s" % (self.user.name if self.user else "this runner's user"),
                 "in a bubblewrap sandbox" if self.sandbox else "without a sandbox",
                 self.cgroups.describe() if self.cgroups else "no cgroup"]
        return ", ".join(parts)

    # --- variables

    def test_variables(self) -> dict:
        """What a job's tests start from (the commit's own variables go on top)."""
        env = passed_variables(os.environ, self.extra_names)
        env.update(HOME=self.home, PYTHONDONTWRITEBYTECODE="1")
        if self.sandbox is None:
            env["TMPDIR"] = self.tmp
        if self.user is not None:
            env.update(USER=self.user.name, LOGNAME=self.user.name)
        else:
            for name in ("USER", "LOGNAME"):
                if name in os.environ:
                    env[name] = os.environ[name]
        return env

    def setup_variables(self, env: dict) -> dict:
        """``env`` (a job's variables) for its setup steps: with the installers' settings."""
        return dict(env, **passed_variables(os.environ, self.extra_names, setup=True))

    # --- a job

    def begin_job(self, slot: int | None = None) -> None:
        """Empty the job's folders (in ``slot``, the warm pytest's it will use, when
        given; nothing of a job before that used them is running: ``end_job``) and
        give it a cgroup."""
        if slot is not None:
            self.slot = slot
        self.empty_job_folders()
        if self.cgroups is not None:
            self._cgroups.append(self.cgroups.new_job())

    def other_slot(self) -> int:
        return 1 - self.slot

    def empty_job_folders(self, slot: int | None = None) -> None:
        """Empty the job's home, temporary and output folders (of ``slot``, the current
        one for None), while nothing of a job that used them runs: what it left is gone."""
        top = self._slot_folder(slot)
        for entry in os.listdir(top):
            path = os.path.join(top, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # never follows a link the job left (it works on descriptors)
            else:
                os.unlink(path)
        for name in ("home", "tmp", "out"):
            folder = os.path.join(top, name)
            os.mkdir(folder, 0o700)
            if self.user is not None:
                os.chown(folder, self.user.uid, self.user.gid)

    def adopt(self, cgroup: JobCgroup) -> None:
        """Make ``cgroup`` (a warm pytest's) one of the job's."""
        self._cgroups.append(cgroup)

    def launch(self, cwd: str, clone: str, writable: tuple[str, ...] = (),
               cgroup: JobCgroup | None = None, slot: int | None = None) -> Launch:
        """How to start a step of the job in ``cwd``: in the job's cgroup (or
        ``cgroup``: a warm pytest's), as the job user, in the sandbox with ``clone``'s
        work tree, the job's folders (those of ``slot``, the current one for None) and
        ``writable`` writable (the clone's .git read-only). ``started()`` it once
        started, ``ended()`` once it has ended."""
        launch = Launch(user=self.user)
        if self.sandbox is not None:
            if self.spare_apart:
                mounted, moved = [clone, *writable], ((self._slot_folder(slot), self.folder),)
            else:
                mounted, moved = [clone, self.job_root, *writable], ()
            launch.wrap = self.sandbox.wrap([], cwd, mounted, [os.path.join(clone, ".git")], moved)
        cgroup = cgroup or (self._cgroups[0] if self._cgroups else None)
        if cgroup is not None:
            launch.cgroup_files = cgroup.join_files()
        return launch

    def out_of_memory(self) -> bool:
        return any(cgroup.out_of_memory() for cgroup in self._cgroups)

    def new_cgroup(self) -> JobCgroup | None:
        """A cgroup for a warm pytest started ahead of the job it will serve (``adopt``)."""
        return self.cgroups.new_job() if self.cgroups is not None else None

    def kill_job(self) -> int:
        """Kill everything left in the job's cgroups; how many processes there were."""
        return sum(cgroup.kill() for cgroup in self._cgroups)

    def end_job(self) -> list[int]:
        """Remove the job's cgroups (after ``kill_job`` and reaping); the pids that
        would not leave them."""
        stuck: list[int] = []
        for cgroup in self._cgroups:
            stuck += cgroup.close()
        self._cgroups = []
        return stuck

    # --- the clone, for a job user

    def prepare_clone(self, clone: str) -> None:
        """At start: the work tree's top folder writable by the job user too, but
        sticky, so that the job cannot move ``.git`` away; ``.git`` the runner's."""
        if self.user is None:
            return
        git_dir = os.path.join(clone, ".git")
        if not os.path.isdir(git_dir) or os.path.islink(git_dir):
            raise IsolationError("%s: the clone's .git must be a folder (not a link or a worktree's file) "
                                 "for jobs to run as %s" % (clone, self.user.name))
        os.chown(clone, 0, self.user.gid)
        os.chmod(clone, 0o1775)
        os.chown(git_dir, 0, 0)
        os.chmod(git_dir, 0o755)

    def take_back(self, clone: str) -> None:
        """Before root's checkout: empty every folder of the work tree that holds a git
        folder, file or link of its own (a submodule's, or one the job made): git would
        follow it into a folder the job controls. The checkout puts the submodules back."""
        if self.user is None:
            return
        for folder, subfolders, files, folder_fd in os.fwalk(clone):
            if folder == clone:
                subfolders[:] = [name for name in subfolders if name != ".git"]
                continue
            if ".git" in subfolders or ".git" in files:
                for name in subfolders + files:
                    _remove(name, folder_fd)
                subfolders[:] = []

    def hand_over(self, clone: str) -> None:
        """After the checkout: the work tree the job user's, but the top folder and
        every ``.git`` (so that it cannot point one elsewhere)."""
        if self.user is None:
            return
        chown_tree(clone, self.user.uid, self.user.gid, keep=".git")
        # git refuses a repository another user owns unless told it is safe, in
        # configuration the repository cannot set: the job's global one.
        with open(os.path.join(self.outside(self.home), ".gitconfig"), "x", encoding="utf-8") as handle:
            handle.write("[safe]\n\tdirectory = %s\n" % clone)
            os.fchown(handle.fileno(), self.user.uid, self.user.gid)

    def close(self) -> None:
        self.end_job()
        if self.cgroups is not None:
            self.cgroups.close()
        shutil.rmtree(self.job_root, ignore_errors=True)


def chown_tree(top: str, uid: int, gid: int, keep: str | None = None) -> None:
    """Give everything below ``top`` (not ``top`` itself, nor what is named ``keep``) to
    ``uid``:``gid``. Safe while another process of that user changes the tree: every
    change goes through a descriptor of a folder opened without following links
    (os.fwalk), to an entry by name, never following a link at its last step."""
    for _folder, subfolders, files, folder_fd in os.fwalk(top):
        if keep is not None:
            subfolders[:] = [name for name in subfolders if name != keep]
        for name in subfolders + files:
            if name != keep:
                try:
                    os.chown(name, uid, gid, dir_fd=folder_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass  # gone meanwhile


def _remove(name: str, folder_fd: int) -> None:
    """Remove ``name`` in the folder open as ``folder_fd``, whatever it is, without
    following a link."""
    info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=folder_fd)
        return
    # What shutil.rmtree(dir_fd=) does from Python 3.11 on.
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    try:
        for entry in os.listdir(fd):
            _remove(entry, fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=folder_fd)


def new_job_root() -> str:
    """A new folder for a runner's job folders, in the temporary folder (named after the
    runner's pid: what runners that died left there is removed first)."""
    temporary = tempfile.gettempdir()
    for entry in os.listdir(temporary):
        parts = entry.split("-")
        if entry.startswith("commit-ci-job-") and len(parts) == 5 and parts[3].isdigit() and not _alive(int(parts[3])):
            path = os.path.join(temporary, entry)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix="commit-ci-job-%d-" % os.getpid())
    os.chmod(folder, 0o755)  # mkdtemp's are private: the job user must enter it
    return folder


def _make_private_folder(path: str, mode: int) -> None:
    """``path``, a folder of this process's user with ``mode``: made, or checked to be one
    (not a link, not another user's: it may be in a folder everyone can write, /tmp)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise IsolationError("%s exists and is not a folder of this user: remove it" % path) from None
    os.chmod(path, mode)

