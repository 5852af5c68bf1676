"""What a job leaves running, found and killed, whatever session it moved to.

A test may start a process that leaves the job's session (``setsid``, a
double-forked daemon): killing the job's process group does not reach it, and it
could go on changing the clone while the next commit is tested. So the runner, and the
warm pytest's zygote that forks the jobs, are *child subreapers* (``become_subreaper``):
whatever a job started comes back to them as a child when its parent dies, and once the
job's own process has ended, every other child is a leftover of that job, killed and
reaped (``kill_leftovers``) before the job's end is reported.

Standard library only, and nothing else of the package: the zygote loads this file by
its path (warm_pytest.py says why).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time

#: prctl(2): orphaned descendants are re-parented to this process, not to init.
PR_SET_CHILD_SUBREAPER = 36
#: Longest that killing and reaping a job's leftovers may take: a killed process
#: is gone within milliseconds, unless it is stuck in the kernel (a hung NFS mount).
LEFTOVERS_TIMEOUT_S = 10.0
#: Most kill-and-reap rounds: each reaches the children of the processes the last
#: one killed (a daemon's own children), and a process that keeps forking is
#: caught one generation per round.
LEFTOVERS_ROUNDS = 100


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
