"""The states of a job, of one attempt at it, and of a runner: named here, once.

A job is one commit. It is ``queued`` until the scheduler assigns it to a runner,
``running`` while an attempt is out, and ends in a verdict: ``passed``, ``failed`` or
``flaky`` (the commit's own: ``flaky`` when its failing tests passed when run again,
flaky.py), ``error`` (the infrastructure failed it too often), or
``cancelled`` (an operator stopped it before it had one). With the dispatcher's
``--coalesce``, a commit that is no branch's tip by the time a runner is free is
``skipped``: not tested, with no result, unless a bisection needs it (culprit.py);
it is not final (it may still be queued), and it is never shown as queued. An operator may run a
commit that has a verdict again (a *rerun*): its job goes back to the queue, with the
verdict it had still the current one until the new run ends; a cancelled rerun leaves
that verdict as it was. Within a run, a job whose tests failed goes back to the queue
for a rerun of its failing tests (a new round of the same run, flaky.py) before it
has its verdict. The moves a job may make are the table ``TRANSITIONS``;
store.JobStore makes them, inside the transaction that records why.

Each assignment of a job to a runner is an attempt. A runner reports how it ended with
a ``ReportedStatus``; the dispatcher records an ``Outcome`` for it, whose properties
say what follows (does it count as a fault, did it reach a runner).

A branch's state (``green``, ``red``, ``pending``) comes from the verdicts of its
commits through ``BRANCH_STATE_OF_VERDICT`` (store.JobStore.branch_states).

Everything else (the wire's field checks, the result files, the page, ci-ctl) takes
its names from here.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    FLAKY = "flaky"  # tests failed, then passed when run again (flaky.py)
    ERROR = "error"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # --coalesce: a later commit of its branch is tested instead (culprit.py)

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


#: The final states, which are the verdicts a result holds, in the order they are shown.
VERDICTS = (JobState.PASSED, JobState.FAILED, JobState.FLAKY, JobState.ERROR, JobState.CANCELLED)
FINAL_STATES = frozenset(VERDICTS)

#: Every move a job may make. Anything else is a bug and raises.
TRANSITIONS = frozenset(
    {
        (JobState.QUEUED, JobState.RUNNING),  # assigned, or re-adopted from a runner after a restart
        (JobState.RUNNING, JobState.QUEUED),  # attempt lost, refused, handed back, infra fault; failing tests to rerun
        (JobState.RUNNING, JobState.PASSED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.RUNNING, JobState.FLAKY),  # the failing tests passed when run again
        (JobState.RUNNING, JobState.ERROR),  # infra fault on the last allowed attempt
        # A verdict from an earlier attempt that arrives after its job was requeued
        # (runner presumed dead, dispatcher restarted) still settles the job.
        (JobState.QUEUED, JobState.PASSED),
        (JobState.QUEUED, JobState.FAILED),
        (JobState.QUEUED, JobState.FLAKY),
        # Only on start-up: a result file found, or a job under an abbreviated id retired.
        (JobState.QUEUED, JobState.ERROR),
        # An operator's cancel (or, for a rerun, back to the verdict it had).
        (JobState.QUEUED, JobState.CANCELLED),
        (JobState.RUNNING, JobState.CANCELLED),
        # An operator's rerun of a commit that has a verdict.
        *((verdict, JobState.QUEUED) for verdict in VERDICTS),
        # --coalesce (culprit.py): a queued commit that is no branch's tip any more is
        # not tested; a bisection that needs it queues it again, and an operator may
        # cancel it.
        (JobState.QUEUED, JobState.SKIPPED),
        (JobState.SKIPPED, JobState.QUEUED),
        (JobState.SKIPPED, JobState.CANCELLED),
    }
)


class ReportedStatus(str, enum.Enum):
    """How a runner says an attempt ended (``results <commit> <attempt> <status>``)."""

    PASSED = "passed"  # the tests ran: the commit's verdict
    FAILED = "failed"
    ERROR = "error"  # an infrastructure fault on the runner (checkout failed...): retried elsewhere
    ABORTED = "aborted"  # the runner handed the job back (it is shutting down)
    DECLINED = "declined"  # the commit asks for what the runner lacks (``requires``): another runner's job

    @property
    def verdict(self) -> bool:
        """The tests ran and decided: the commit's verdict, final."""
        return self in (ReportedStatus.PASSED, ReportedStatus.FAILED)


class Outcome(str, enum.Enum):
    """How an attempt ended, as the dispatcher records it."""

    PASSED = "passed"
    FAILED = "failed"  # (in a run with failing tests to rerun: the job goes back to the queue for them)
    FLAKY = "flaky"  # a rerun of the failing tests that made the job's verdict flaky
    ERROR = "error"  # the runner reported an infrastructure fault (checkout failed...)
    LOST = "lost"  # the runner stopped answering or forgot the job
    REFUSED = "refused"  # the runner answered BUSY or could not be reached: never started
    RETURNED = "returned"  # the runner handed the job back while shutting down
    INTERRUPTED = "interrupted"  # the dispatcher restarted while it was out
    SUPERSEDED = "superseded"  # another attempt settled the job first
    CANCELLED = "cancelled"  # an operator cancelled the job while it was out
    DECLINED = "declined"  # the runner lacks what the commit asks for: never ran

    @property
    def infra_failure(self) -> bool:
        """Counts towards the attempt limit: the job was tried and the infrastructure failed."""
        return self in (Outcome.ERROR, Outcome.LOST)

    @property
    def started(self) -> bool:
        """The attempt really ran on a runner (counts in the result's ``attempts``)."""
        return self not in (Outcome.REFUSED, Outcome.DECLINED)


#: Ends of an attempt that the runner may not know of: the dispatcher lost track of
#: it, so a runner still running it can be given it back.
ADOPTABLE = (Outcome.INTERRUPTED, Outcome.LOST, Outcome.REFUSED)


class RunnerState(str, enum.Enum):
    """What a runner is doing. A runner says ``idle`` or ``busy`` in its answer to a
    ping; the dispatcher adds ``unverified`` for one that has not answered a ping yet."""

    IDLE = "idle"
    BUSY = "busy"
    UNVERIFIED = "unverified"


#: A branch none of whose commits has a verdict that says anything yet.
BRANCH_PENDING = "pending"
#: What a verdict makes of the state of a branch whose newest judged commit has it;
#: the oldest commit of the unbroken run of such commits is the state's ``since``
#: ("red since <sha>"). A verdict not listed (``error``: the infrastructure's fault,
#: not the code's) says nothing about the branch: its commits are passed over.
BRANCH_STATE_OF_VERDICT = {
    JobState.PASSED: "green",
    JobState.FAILED: "red",
    JobState.FLAKY: "flaky",
}


def values(states) -> tuple[str, ...]:
    """The wire names of ``states`` (an enum class or a sequence of members), in order."""
    return tuple(state.value for state in states)
