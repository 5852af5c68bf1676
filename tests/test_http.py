"""The dispatcher's HTTP side (--http-port, web.py): the live page, the files, /api,
/metrics, and its limits, against real dispatcher and runner processes."""

from __future__ import annotations

import html.parser
import http.client
import json
import socket
import ssl
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_security import certificates  # noqa: F401 - a fixture

from commit_ci import web

from conftest import FAILING_TEST, PASSING_TEST, WAITS_FOR_FLAG_TEST, module_argv, page_rows, wait_until

XSS_SUBJECT = "<script>document.title='owned'</script> fix the <b>build</b>"


def start_with_http(ci, *extra: str) -> int:
    """Start the dispatcher with HTTP on a free port; that port."""
    ci.start_dispatcher("--http-port", "0", *extra)
    return int(ci.dispatcher.wait_for_log(r"HTTP on https?://127\.0\.0\.1:(\d+)/").group(1))


def get(port: int, path: str, method: str = "GET", context: ssl.SSLContext | None = None):
    """(status, headers, body) of one request."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def ctl_json(ci, *args: str) -> dict:
    done = subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address, "--json", *args),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class _Scripts(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append({"attrs": dict(attrs), "text": ""})
            self._in_script = True

    def handle_endtag(self, tag):
        self._in_script = tag != "script" and self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1]["text"] += data


def scripts_of(page: str) -> list[dict]:
    parser = _Scripts()
    parser.feed(page)
    return parser.scripts


def metrics(port: int) -> dict:
    """Each sample of /metrics, by name and labels, parsed by prometheus_client's own parser."""
    status, headers, body = get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_the_page_files_api_and_metrics_over_http(ci, upstream, tmp_path):
    flag = tmp_path / "release"
    port = start_with_http(ci, "--repo", str(upstream.clone(tmp_path / "dispatcher-clone")), "--order", "fifo")
    ci.start_runner("--name", "builder")
    ci.start_observer()
    failing = upstream.commit({"test_bad.py": FAILING_TEST}, XSS_SUBJECT)
    passing = upstream.commit({"test_bad.py": PASSING_TEST.replace("passes", "fixed")}, "repair the test")
    ci.wait_results([failing, passing])
    waiting = upstream.commit({"test_wait.py": WAITS_FOR_FLAG_TEST % str(flag)}, "a test that waits")
    behind = upstream.commit({"test_more.py": PASSING_TEST.replace("passes", "more")}, "queued behind it")
    ci.runners[0].wait_for_log(r"commit %s attempt \d+: testing" % waiting)
    wait_until(lambda: ctl_json(ci, "status")["queued"] == 1, 30, message="the last commit queued")
    ci.wait_page([failing, passing])

    # The page: live, escaped, its scripts ours and from files, under a strict policy.
    status, headers, body = wait_until(lambda: (lambda r: r if r[0] == 200 and failing.encode() in r[2] else None)(
        get(port, "/")), 30, message="the page over HTTP")
    page = body.decode("utf-8")
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy.split(
        "style-src")[0]
    assert headers["content-type"] == "text/html; charset=utf-8" and headers["x-content-type-options"] == "nosniff"
    assert [script["attrs"].get("src") for script in scripts_of(page)] == ["live.js"]
    assert all(not script["text"].strip() for script in scripts_of(page)), "no inline script"
    assert "&lt;script&gt;document.title=&#39;owned&#39;&lt;/script&gt;" in page
    assert {commit for commit, _ in page_rows(page)} >= {failing, passing}
    assert 'id="running-jobs"' in page
    status, headers, script = get(port, "/live.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"api/tail/" in script
    assert get(port, "/", method="HEAD")[2] == b""
    assert get(port, "/", method="POST")[0] == 405
    assert get(port, "/", method="DELETE")[1]["allow"] == "GET, HEAD"

    # A commit's files: hostile content, as plain text that no browser sniffs or runs.
    for suffix, content_type in (("", "text/plain; charset=utf-8"), (".log", "text/plain; charset=utf-8"),
                                 (".xml", "text/plain; charset=utf-8"), (".json", "application/json")):
        status, headers, body = get(port, "/%s%s" % (failing, suffix))
        assert status == 200 and body == (ci.results_dir / (failing + suffix)).read_bytes()
        assert headers["content-type"] == content_type and headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in headers["content-security-policy"]
    for path in ("/%s.txt" % failing, "/%s" % failing[:12], "/../%s" % failing, "/%s/../index.html" % failing,
                 "/runs/%s/1/%s" % (passing, failing), "/index.html.bak", "/%s.json" % ("0" * 40)):
        assert get(port, path)[0] == 404, path

    # /api mirrors the read-only queries: the same answers ci-ctl gets.
    assert json.loads(get(port, "/api/status")[2]) == {key: ctl_json(ci, "status")[key]
                                                       for key in ("queued", "running", "runners", "idle")}
    queue = json.loads(get(port, "/api/queue?limit=5")[2])
    assert queue == ctl_json(ci, "queue", "--limit", "5")
    assert [job["commit"] for job in queue["running"]] == [waiting]
    assert json.loads(get(port, "/api/lookup/%s" % failing[:10])[2]) == ctl_json(ci, "results", failing[:10])
    assert json.loads(get(port, "/api/runners")[2])["runners"][0]["name"] == "builder"
    assert json.loads(get(port, "/api/recent?limit=1")[2])["results"][0]["commit"] == passing
    assert "branches" in json.loads(get(port, "/api/branches")[2])
    assert "tests" in json.loads(get(port, "/api/flaky?window=10")[2])
    tail = json.loads(get(port, "/api/tail/%s" % failing)[2])
    assert tail["source"] == "final" and "test_fails" in tail["text"]
    for path, code in (("/api/lookup/%s" % ("e" * 12), 404), ("/api/lookup/xyz", 400), ("/api/queue?limit=-1", 400),
                       ("/api/queue?colour=red", 400), ("/api/queue?limit=1&limit=2", 400), ("/api/key-list", 404),
                       ("/api/status/extra", 400), ("/api/lookup", 400)):
        status, headers, body = get(port, path)
        assert status == code and "error" in json.loads(body), path

    # /metrics: Prometheus's format, the numbers ci-ctl status shows.
    shown = ctl_json(ci, "status")
    samples = metrics(port)
    assert samples[("ci_queue_length", ())] == shown["queued"] == 1
    assert samples[("ci_running_jobs", ())] == shown["running"] == 1
    runners = {dict(labels)["state"]: value for (name, labels), value in samples.items() if name == "ci_runners"}
    assert sum(runners.values()) == shown["runners"] == 1 and runners["idle"] == shown["idle"] == 0
    assert runners["busy"] == 1
    assert samples[("ci_verdicts", (("status", "passed"),))] >= 2  # the first commit and the repair
    assert samples[("ci_verdicts", (("status", "failed"),))] == 1
    assert samples[("ci_results_written_total", ())] == len(shown["recent"]) == 3
    assert samples[("ci_job_duration_seconds_count", ())] == 3
    assert samples[("ci_job_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert samples[("ci_job_duration_seconds_sum", ())] == pytest.approx(sum(result["duration_s"]
                                                                             for result in shown["recent"]))
    assert samples[("ci_missed_heartbeats_total", ())] == 0
    assert samples[("ci_notifications_pending", ())] == 0

    flag.touch()
    ci.wait_results([waiting, behind])
    samples = metrics(port)
    assert samples[("ci_queue_length", ())] == samples[("ci_running_jobs", ())] == 0
    assert samples[("ci_results_written_total", ())] == 5


def test_http_is_bounded(ci, upstream):
    port = start_with_http(ci)
    # A request over the size cap: refused, the connection closed.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n" + b"X-Filler: %s\r\n" % (b"a" * 2000) * 10)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.0 431")
    ci.dispatcher.wait_for_log(r"HTTP request from 127\.0\.0\.1 refused: request over")
    # Idle connections fill the slots; one more gets 503 at once, and the server serves on once they go.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(web.MAX_CONNECTIONS)]
    try:
        wait_until(lambda: "%d connections busy" % web.MAX_CONNECTIONS in ci.dispatcher.log()
                   or probe_refused(port), 20, message="a connection refused at the cap")
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: get(port, "/api/status")[0] == 200, 20, message="serving again")


def probe_refused(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/status HTTP/1.0\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.0 503")


def test_http_with_tls(ci, upstream, certificates):  # noqa: F811 - the fixture
    port = start_with_http(ci, "--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"]))
    assert "HTTP on https://" in ci.dispatcher.log()
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    status, _, body = get(port, "/api/status", context=context)
    assert status == 200 and json.loads(body)["queued"] == 0
    assert get(port, "/metrics", context=context)[0] == 200
    # Plain HTTP gets nothing; the server logs it and serves on.
    try:
        status = get(port, "/api/status")[0]
    except (OSError, http.client.HTTPException):
        status = None
    assert status is None
    ci.dispatcher.wait_for_log(r"HTTP TLS handshake with 127\.0\.0\.1 failed")
    assert get(port, "/", context=context)[0] == 200
