"""Flaky tests: how often a test that fails at random comes out ``flaky``, and a
deterministic failure never does.

One repository, a dispatcher with the default ``--flaky-reruns 2`` and two real
runners. For each of ``RUNS`` seeds (20; 3 with --quick) the benchmark makes two
commits:

* a *random* one, whose test ``test_coin`` throws a coin seeded by the commit's seed
  and by the attempt it runs in (``CI_ATTEMPT``, a new id for every attempt): it fails
  with probability 0.5 each time it runs, independently;
* a *deterministic* one, whose test ``test_det`` always fails.

All commits are dispatched at once and the benchmark waits for every verdict. Then it
computes, exactly:

* of the random commits whose first run failed (verdict ``flaky`` or ``failed``: the
  others passed at once), the share that came out ``flaky``. With two reruns of a test
  that fails with probability 0.5 each time, a commit whose first run failed is
  ``failed`` only if both reruns fail too: the expected share is 1 - 0.5^2 = 0.75. The
  target is that share within two binomial standard deviations, sqrt(0.75 x 0.25 / n)
  for n commits whose first run failed;
* that each rerun's outcome is what the coin says for its attempt (from ``reruns`` in
  ``<sha>.json``): the reruns ran the test, and nothing else decided;
* how many deterministic commits came out ``flaky``: the target is 0, and each must be
  ``failed`` after exactly two reruns of ``test_det``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from bench.common import (
    BenchError,
    Daemons,
    Row,
    clone,
    commit,
    new_repo,
    start_dispatcher,
    start_runner,
    verdict,
    wait_runners_ready,
    wait_until,
)

RUNS = 20
QUICK_RUNS = 3
RERUNS = 2
#: Chance that the coin fails in one run, and the share of first failures expected to
#: come out flaky after RERUNS reruns.
P_FAIL = 0.5
EXPECTED_SHARE = 1 - P_FAIL ** RERUNS
RESULTS_TIMEOUT_S = 600.0

COIN_TEST = """import os, random

SEED = %d


def test_coin():
    throw = random.Random("%%d:%%s" %% (SEED, os.environ["CI_ATTEMPT"])).random()
    assert throw >= %r, "tails (%%.3f)" %% throw
"""
PASSING = "def test_%s():\n    assert %d == %d\n"
FAILING = "def test_det():\n    assert %d == -1, 'fails every time'\n"


def coin_passes(seed: int, attempt: int) -> bool:
    """What COIN_TEST does for ``seed`` in attempt ``attempt``."""
    return random.Random("%d:%s" % (seed, attempt)).random() >= P_FAIL


def run(work: Path, quick: bool) -> list[Row]:
    runs = QUICK_RUNS if quick else RUNS
    upstream = new_repo(work / "upstream", {"test_ok.py": PASSING % ("ok", 1, 1)})
    random_commits: dict[str, int] = {}
    deterministic: list[str] = []
    for seed in range(runs):
        random_commits[commit(upstream, {"test_coin.py": COIN_TEST % (seed, P_FAIL),
                                         "test_det.py": PASSING % ("det", seed, seed)}, "coin %d" % seed)] = seed
        deterministic.append(commit(upstream, {"test_coin.py": PASSING % ("coin", seed, seed),
                                               "test_det.py": FAILING % seed}, "real failure %d" % seed))
    with Daemons(work) as daemons:
        _, address, results = start_dispatcher(daemons, work, "--flaky-reruns", str(RERUNS))
        for index in (1, 2):
            start_runner(daemons, "runner-%d" % index, clone(upstream, work / ("runner-%d" % index)), address)
        wait_runners_ready(address, 2)
        from commit_ci.client import communicate
        from commit_ci.protocol import request

        for sha in [*random_commits, *deterministic]:
            answer = communicate(address, request("dispatch", commit=sha))
            if answer.verb != "OK":
                raise BenchError("dispatch of %s answered %s" % (sha[:12], answer))

        def all_there():
            found = {}
            for sha in [*random_commits, *deterministic]:
                try:
                    found[sha] = json.loads((results / (sha + ".json")).read_text())
                except (FileNotFoundError, ValueError):
                    return None
            return found

        found = wait_until(all_there, RESULTS_TIMEOUT_S, 0.2, "the verdicts of %d commits" % (2 * runs))

    statuses = [found[sha]["status"] for sha in random_commits]
    first_failed = [sha for sha in random_commits if found[sha]["status"] in ("flaky", "failed")]
    came_out_flaky = [sha for sha in first_failed if found[sha]["status"] == "flaky"]
    wrong = [sha for sha in random_commits if found[sha]["status"] not in ("passed", "flaky", "failed")]
    reruns = [(seed, entry) for sha, seed in random_commits.items() for entry in found[sha]["reruns"]]
    agree = sum(1 for seed, entry in reruns if (entry["status"] == "passed") == coin_passes(seed, entry["attempt"]))
    det_flaky = sum(1 for sha in deterministic if found[sha]["status"] == "flaky")
    det_right = sum(1 for sha in deterministic if found[sha]["status"] == "failed"
                    and [entry["tests"] for entry in found[sha]["reruns"]] == [["test_det.py::test_det"]] * RERUNS)
    share = len(came_out_flaky) / len(first_failed) if first_failed else float("nan")
    sigma = math.sqrt(EXPECTED_SHARE * (1 - EXPECTED_SHARE) / len(first_failed)) if first_failed else float("nan")
    print("  random test: %d commits, %d passed at once, %d failed first: %d of those flaky (%.2f; expected %.2f "
          "= 1 - 0.5^%d, +- %.2f at 2 sigma), %d failed; reruns agreeing with the coin: %d of %d"
          % (runs, statuses.count("passed"), len(first_failed), len(came_out_flaky), share, EXPECTED_SHARE, RERUNS,
             2 * sigma, len(first_failed) - len(came_out_flaky), agree, len(reruns)), flush=True)
    print("  of all %d random commits, %d came out flaky: expected 0.5 x %.2f = %.3f of them (%.1f)"
          % (runs, len(came_out_flaky), EXPECTED_SHARE, P_FAIL * EXPECTED_SHARE, runs * P_FAIL * EXPECTED_SHARE),
          flush=True)
    print("  deterministic failure: %d commits, %d flaky, %d failed after %d reruns of test_det alone"
          % (runs, det_flaky, det_right, RERUNS), flush=True)
    within = bool(first_failed) and abs(share - EXPECTED_SHARE) <= 2 * sigma and agree == len(reruns) and not wrong
    return [
        Row("flaky", "random test (fails 1 run in 2), %d commits: flaky of those whose first run failed" % runs,
            "%d of %d (%.2f); reruns agreeing with the coin %d of %d"
            % (len(came_out_flaky), len(first_failed), share, agree, len(reruns)),
            "expected %.2f = 1 - 0.5^%d" % (EXPECTED_SHARE, RERUNS),
            "within 2 sigma (%.2f)" % (2 * sigma) if first_failed else "-",
            verdict(within)),
        Row("flaky", "deterministic failure, %d commits: came out flaky" % runs,
            "%d (%d of %d failed after %d reruns)" % (det_flaky, det_right, runs, RERUNS), "-", "0",
            verdict(det_flaky == 0 and det_right == runs)),
    ]
