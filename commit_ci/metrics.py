"""The dispatcher's ``/metrics``: Prometheus's text format, by prometheus_client.

A custom collector reads the numbers when Prometheus scrapes, from where ``ci-ctl
status`` gets them, so the two always agree: the queue and running counts from the
store's counters (the ``status`` answer), the runners from the dispatcher's registry
(the ``runners`` answer), the verdicts from the store's counters, the durations and
the results written from the store's table of runs (read through a read-only
connection of its own, so a scrape never holds the dispatcher up), the missed
heartbeats from the dispatcher's count since it started. Nothing is registered in
prometheus_client's global registry: the web server owns a registry with this
collector alone.

Metrics (``ci_`` prefix):

* ``ci_queue_length``, ``ci_running_jobs`` (gauges): jobs queued and running.
* ``ci_runners{state}`` (gauge): registered runners, ``idle``, ``busy`` or ``unverified``.
* ``ci_verdicts{status}`` (gauge): commits whose current verdict is ``status``.
* ``ci_job_duration_seconds`` (histogram): the tests' duration of each run that got a
  verdict (``duration_s`` of its ``<sha>.json``).
* ``ci_missed_heartbeats_total`` (counter): pings a runner did not answer, since the
  dispatcher started.
* ``ci_results_written_total`` (counter): runs whose result files were written.
* ``ci_notifications_pending`` (gauge): notifications waiting to be delivered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from commit_ci.states import VERDICTS, JobState, RunnerState
from commit_ci.store import JobStore

if TYPE_CHECKING:
    from commit_ci.dispatcher import Dispatcher

#: Upper bounds of the duration histogram's buckets, in seconds: a quick suite to a
#: long one (the runner's default time limit is 30 min).
DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class DispatcherCollector:
    """Reads the numbers at each scrape (see the module docstring). ``store`` is a
    read-only JobStore on the dispatcher's database; ``notifications_pending`` says how
    many notifications wait to be delivered."""

    def __init__(self, dispatcher: "Dispatcher", store: JobStore, notifications_pending: Callable[[], int]):
        self.dispatcher = dispatcher
        self.store = store
        self.notifications_pending = notifications_pending

    def collect(self):
        counts = self.dispatcher.store
        yield GaugeMetricFamily("ci_queue_length", "Jobs queued (ci-ctl status: queued).",
                                value=counts.count(JobState.QUEUED))
        yield GaugeMetricFamily("ci_running_jobs", "Jobs running on a runner (ci-ctl status: running).",
                                value=counts.count(JobState.RUNNING))
        runners = GaugeMetricFamily("ci_runners", "Registered runners by state.", labels=["state"])
        by_state = self.dispatcher.runner_states()
        for state in (RunnerState.IDLE, RunnerState.BUSY, RunnerState.UNVERIFIED):
            runners.add_metric([state.value], by_state.get(state.value, 0))
        yield runners
        verdicts = GaugeMetricFamily("ci_verdicts", "Commits whose current verdict is status.", labels=["status"])
        for verdict in VERDICTS:
            verdicts.add_metric([verdict.value], counts.count(verdict))
        yield verdicts
        below, timed, total, runs = self.store.run_durations(DURATION_BUCKETS_S)
        buckets = [(_bound(bound), count) for bound, count in zip(DURATION_BUCKETS_S, below)] + [("+Inf", timed)]
        yield HistogramMetricFamily("ci_job_duration_seconds", "How long the tests of each judged run took.",
                                    buckets=buckets, sum_value=total)
        yield CounterMetricFamily("ci_missed_heartbeats", "Pings a runner did not answer, since the dispatcher "
                                  "started.", value=self.dispatcher.missed_pings_total)
        yield CounterMetricFamily("ci_results_written", "Runs whose result files were written.", value=runs)
        yield GaugeMetricFamily("ci_notifications_pending", "Notifications waiting to be delivered.",
                                value=self.notifications_pending())


def _bound(value: float) -> str:
    return repr(float(value))


def metrics_registry(dispatcher: "Dispatcher", store: JobStore,
                     notifications_pending: Callable[[], int]) -> CollectorRegistry:
    """A registry with the dispatcher's collector alone (not prometheus_client's global
    one); ``notifications_pending`` is the dispatcher's count of notifications waiting."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DispatcherCollector(dispatcher, store, notifications_pending))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format of everything in ``registry``."""
    return generate_latest(registry)
