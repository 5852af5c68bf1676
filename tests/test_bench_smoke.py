"""The benchmarks still run: bench/run_all.py --quick prints every row of its table.

This checks that the benchmark command works end to end at tiny sizes -- daemons
start, the fake runner and load clients speak the protocol, every benchmark
produces its rows -- not how fast anything is: the figures of a quick run mean
nothing, and a timed test would fail on a busy machine.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

#: Every row the table must have, as (benchmark, start of the figure's name).
EXPECTED_ROWS = [
    ("latency", "dispatch -> result file"),
    ("detection", "push -> job queued, observer"),
    ("detection", "push -> job queued, with the push trigger"),
    ("detection", "push hook start"),
    ("scaling", "R=1 runners"),
    ("scaling", "per-job overhead outside the test command"),
    ("scaling", "R=2 runners"),
    ("scaling", "R=4 runners"),
    ("scaling", "R=8 runners"),
    ("capacity", "dispatch, 32 clients, persistent connections, 2000/s offered"),
    ("capacity", "dispatch, 32 clients, persistent connections, as fast as answered"),
    ("capacity", "status, 32 clients, persistent connections, 2000/s offered"),
    ("capacity", "status, 32 clients, persistent connections, as fast as answered"),
    ("capacity", "dispatch, 32 clients, per-request connections, 2000/s offered"),
    ("capacity", "dispatch, 32 clients, per-request connections, as fast as answered"),
    ("capacity", "status, 32 clients, per-request connections, 2000/s offered"),
    ("capacity", "status, 32 clients, per-request connections, as fast as answered"),
    ("history", "cost per job"),
    ("history", "dispatcher memory"),
    ("history", "status request"),
    ("recovery", "runner SIGKILLed mid-job"),
    ("recovery", "dispatcher SIGKILLed"),
    ("environments", "dispatch -> result, environment reused"),
    ("environments", "dispatch -> result, new environment (uv)"),
    ("environments", "dispatch -> result, new environment (pip)"),
    ("tip_first", "tip of 4 commits pushed at once, 2 runners"),
    ("tip_first", "tip of 4 commits pushed at once with --order fifo"),
    ("flaky", "random test (fails 1 run in 2)"),
    ("flaky", "deterministic failure"),
    ("culprit", "32 commits pushed at once, 2 runners, commit 13 breaks a test for good"),
    ("culprit", "the same with --coalesce"),
    ("sharding", "8 files of one 0.1 s test, 2 idle runners, push -> result, durations learned"),
    ("sharding", "the commit before, nothing learned yet"),
]
#: "-": a figure reported without a target (recovery times).
VERDICTS = {"met", "missed", "not available", "-"}


BENCHMARKS = list(dict.fromkeys(benchmark for benchmark, _ in EXPECTED_ROWS))


def test_every_benchmark_of_run_all_is_checked_here():
    source = ast.parse((ROOT / "bench" / "run_all.py").read_text())
    (listed,) = [node.value for node in source.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "BENCHMARKS" for target in node.targets)]
    assert list(ast.literal_eval(listed)) == BENCHMARKS


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_quick_benchmark_run_prints_every_row(benchmark, tmp_path):
    # One benchmark at a time: each is a test of its own, which runs in parallel with
    # the others when the suite does.
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", benchmark,
         "--work-dir", str(tmp_path / "bench")],
        cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, "bench failed:\n%s\n%s" % (done.stdout[-4000:], done.stderr[-4000:])
    table = done.stdout[done.stdout.index("| benchmark"):]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("|")]
    expected = [row for row in EXPECTED_ROWS if row[0] == benchmark]
    assert len(rows) == len(expected), table
    for (name, figure), row in zip(expected, rows):
        assert row[0] == name and row[1].startswith(figure), (name, figure, row)
        assert row[5] in VERDICTS, row
        assert row[2], row
    assert done.stdout.startswith("machine: ")
