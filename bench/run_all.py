"""Run every benchmark of the CI system on this machine and print one table.

    python bench/run_all.py            # full sizes (about 8 minutes on 2 cores)
    python bench/run_all.py --quick    # tiny sizes: checks that everything runs (< 1 min)
    python bench/run_all.py --only latency --only capacity

Each benchmark generates its own git repositories in a scratch folder, runs the
daemons as real processes on 127.0.0.1, and measures each figure in the same run
as its baseline (the same work done by hand, or the same system at a small size),
so a slow or noisy machine moves both sides. Benchmarks report; they do not fail:
the exit status is 1 only when a benchmark could not run at all. docs/performance.md
says what each one measures and what the last full run printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the project importable as ``bench.*`` and top-level modules.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, format_table, machine_summary  # noqa: E402

#: In the order they run; each module has ``run(work: Path, quick: bool) -> list[Row]``.
BENCHMARKS = ("latency", "detection", "scaling", "capacity", "history", "recovery", "environments", "tip_first",
              "flaky", "culprit", "sharding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the CI system's benchmarks and print a table.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that every benchmark runs, not speed")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help="run only this benchmark (repeatable): %s" % ", ".join(BENCHMARKS))
    parser.add_argument("--work-dir", help="scratch folder (default: a new folder in ~/.cache/ci-bench, removed "
                        "afterwards; not in /tmp, which the runners' sandboxed jobs do not share)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, repositories)")
    return parser


def _scratch_folder() -> str:
    """A new folder under ~/.cache/ci-bench (as the launcher's are under ~/.cache):
    not in /tmp, which a sandboxed job sees a private one of (isolation.py), so that
    the files a benchmark shares with its jobs (the recovery benchmark's flag) are
    theirs to see. The temporary folder where the home folder cannot be written."""
    base = os.path.join(os.path.expanduser("~"), ".cache", "ci-bench")
    try:
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="run-", dir=base)
    except OSError:
        return tempfile.mkdtemp(prefix="ci-bench-")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name for name in BENCHMARKS if not args.only or name in args.only]
    work = Path(args.work_dir or _scratch_folder()).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # A root runner's jobs run as another user, who must reach the clones in it
    # (mkdtemp's folders are private): let others through, not list it.
    work.chmod(work.stat().st_mode & 0o7777 | 0o001)
    print("machine: %s" % machine_summary(), flush=True)
    print("sizes: %s; scratch folder: %s" % ("quick (tiny, figures meaningless)" if args.quick else "full", work), flush=True)
    rows: list[Row] = []
    broken = []
    try:
        for name in names:
            started = time.monotonic()
            print("running %s ..." % name, flush=True)
            folder = work / name
            folder.mkdir()
            try:
                module = importlib.import_module("bench.%s" % name)
                found = module.run(folder, args.quick)
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                broken.append(name)
                found = [Row(name, "could not run", "%s: %s" % (exc.__class__.__name__, str(exc).splitlines()[0][:80] if str(exc) else ""),
                             "-", "-", "error")]
            for row in found:
                print("  %s: %s = %s (baseline %s; target %s: %s)"
                      % (row.benchmark, row.figure, row.value, row.baseline, row.target, row.verdict), flush=True)
            print("  %s took %.0f s" % (name, time.monotonic() - started), flush=True)
            rows.extend(found)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(rows))
    if broken:
        print("\nbenchmarks that could not run: %s" % ", ".join(broken))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
