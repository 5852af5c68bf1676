"""pytest plugin of commit-ci: collect only the test files of one shard of a commit.

The runner of a shard (sharding.py) starts pytest with ``-p commit_ci_shard_select``
and this file's folder first on ``PYTHONPATH`` (the folder holds this file alone,
under a name no project uses; it comes from the installed commit-ci, never from the
commit), with two variables:

* ``CI_SHARD``: ``I/K``, this shard's number (1 to K) and how many there are;
* ``CI_SHARD_PLAN``: a JSON object from test file paths (relative to the directory
  pytest starts in, the clone, with ``/``) to the shard that runs them, the plan the
  dispatcher made from the durations it learned.

Every file pytest would collect goes to exactly one shard: the one the plan names, or,
for a file the plan does not know (new since the durations were learned), the one a
stable hash of its path gives (CRC-32, modulo K, plus one). Each shard skips the
others' files at collection (``pytest_ignore_collect``), so it does not even import
them, and a collection error is reported by the one shard that owns its file. So the
K shards together run exactly the tests one unsharded run would, each once, whatever
the plan knows. Folders, ``conftest.py`` and ``__init__.py`` are left to pytest: every
shard loads them, as an unsharded run does. A shard left with no test at all exits 0
(pytest would say 5, "no tests collected"), unless it skipped nothing.

This module imports nothing of commit-ci (it runs in the commit's interpreter, where
commit-ci need not be installed) and reads nothing but the two variables.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest

#: The pytest exit status "no tests collected".
NO_TESTS_COLLECTED = 5
#: Files pytest loads for every shard, as an unsharded run does.
SHARED_FILES = ("conftest.py", "__init__.py")


def shard_of(path: str, plan: dict, shards: int) -> int:
    """The shard (1 to ``shards``) that runs the test file at ``path`` (relative, ``/``)."""
    planned = plan.get(path)
    if isinstance(planned, int) and not isinstance(planned, bool) and 1 <= planned <= shards:
        return planned
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) % shards + 1


class ShardSelect:
    """What the variables say, and how many files this shard skipped."""

    def __init__(self, shard: int, shards: int, plan: dict, root: str):
        self.shard, self.shards, self.plan, self.root = shard, shards, plan, root
        self.skipped = 0

    @pytest.hookimpl(tryfirst=True)
    def pytest_ignore_collect(self, collection_path, config):
        if collection_path.name in SHARED_FILES or collection_path.is_dir():
            return None  # pytest decides, as in an unsharded run
        path = os.path.relpath(str(collection_path), self.root).replace(os.sep, "/")
        if shard_of(path, self.plan, self.shards) == self.shard:
            return None
        self.skipped += 1
        return True

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if exitstatus == NO_TESTS_COLLECTED and self.skipped:
            session.exitstatus = 0  # the other shards have the tests

    def pytest_report_header(self, config):
        return "commit-ci shard %d of %d (%d files planned)" % (self.shard, self.shards, len(self.plan))


def pytest_configure(config):
    spec = os.environ.get("CI_SHARD", "")
    try:
        shard, shards = (int(part) for part in spec.split("/"))
        plan = json.loads(os.environ.get("CI_SHARD_PLAN") or "{}")
    except ValueError:
        raise pytest.UsageError("commit-ci: CI_SHARD must be I/K and CI_SHARD_PLAN a JSON object") from None
    if not 1 <= shard <= shards or not isinstance(plan, dict):
        raise pytest.UsageError("commit-ci: CI_SHARD must be I/K with 1 <= I <= K, CI_SHARD_PLAN a JSON object")
    config.pluginmanager.register(ShardSelect(shard, shards, plan, str(config.invocation_params.dir)),
                                  "commit-ci-shard-select")
