"""helpers.py, the few lines a script of one's own uses to talk to the daemons."""

from __future__ import annotations

import os

import pytest

import helpers
from commit_ci.wire import parse_address

from conftest import PASSING_TEST


def test_a_script_queues_a_commit_and_reads_its_verdict(ci, upstream):
    ci.start_dispatcher()
    host, port = parse_address(ci.address)
    sha = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "tested through helpers.py")

    assert helpers.communicate(host, port, "status") == "OK queued=0 running=0 runners=0 idle=0"
    assert helpers.communicate(host, port, "dispatch %s" % sha) == "OK job=queued new=1"
    ci.start_runner()
    ci.wait_result(sha)

    found = helpers.query(host, port, "lookup %s" % sha[:10])
    assert (found["commit"], found["state"], found["summary"]["passed"]) == (sha, "passed", 2)
    header, _, document = helpers.communicate(host, port, "recent limit=1").partition("\n")
    assert header.startswith("OK json=") and '"commit": "%s"' % sha in document
    assert helpers.communicate(host, port, "lookup %s" % ("0" * 40)) == "ERR unknown commit %s" % ("0" * 40)
    with pytest.raises(RuntimeError, match="unknown commit"):
        helpers.query(host, port, "lookup %s" % ("0" * 40))
    # A request the protocol does not know never leaves the script.
    with pytest.raises(helpers.ProtocolError, match="unknown verb 'dispach'"):
        helpers.communicate(host, port, "dispach %s" % sha)


def test_a_script_signs_its_requests_with_the_shared_secret(ci, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("a-shared-secret-for-the-helpers-test\n")
    ci.start_dispatcher("--secret-file", str(secret))
    host, port = parse_address(ci.address)

    assert helpers.communicate(host, port, "status", secret_file=str(secret)).startswith("OK ")
    monkeypatch.setenv("CI_SECRET", secret.read_text().strip())
    assert helpers.communicate(host, port, "status").startswith("OK "), "CI_SECRET serves as well"
    monkeypatch.delenv("CI_SECRET")
    assert helpers.communicate(host, port, "status") == "ERR authentication required"
    assert "CI_SECRET" not in os.environ
