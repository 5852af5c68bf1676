"""The results page in a real browser: Debian's headless Chromium, from the file system.

CI installs chromium (.ci/run) and sets CI_REQUIRE_CHROMIUM, so there the test fails
if the browser is missing; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from conftest import FAILING_TEST, PASSING_TEST, STOP_TIMEOUT_S, module_argv, page_rows, wait_until

CHROMIUM = "/usr/bin/chromium"
#: A headless page load takes about a second; this only matters when it hangs.
CHROMIUM_TIMEOUT_S = 60.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in CI, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: The verdict colours of pages.py, as RGB.
PASSED_GREEN = (0x1A, 0x7F, 0x37)
FAILED_RED = (0xCF, 0x22, 0x2E)

XSS_SUBJECT = "<script>document.title='owned'</script> fix the <b>build</b>"


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # After the command name, which is in parentheses and may contain spaces:
    # state, ppid, pgrp, session, ...
    return stat[stat.rfind(")") + 2 :].split()


def _cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


class Chromium:
    """Runs headless Chromium; every process of every run is stopped by pid afterwards.

    Each run gets a session of its own (its browser's pid), a new profile and a new
    HOME under ``folder``. The browser, zygotes, renderers and GPU process stay in
    that session; the crash handler leaves it but names the HOME folder on its
    command line. ``stop_all`` finds both kinds by pid and stops them.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.runs: list[tuple[subprocess.Popen, Path]] = []

    def run(self, url: str, *flags: str) -> tuple[str, str]:
        """Run Chromium on ``url`` until it exits by itself; returns (stdout, stderr)."""
        index = len(self.runs) + 1
        home = self.folder / ("chromium-%d" % index)
        (home / "profile").mkdir(parents=True)
        stdout_path, stderr_path = home / "stdout.txt", home / "stderr.txt"
        argv = [CHROMIUM, *CHROMIUM_FLAGS, "--user-data-dir=%s" % (home / "profile"), *flags, url]
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache")}
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                                       start_new_session=True)
        self.runs.append((process, home))
        try:
            process.wait(timeout=CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError("chromium still running after %.0f s: %s" % (CHROMIUM_TIMEOUT_S, " ".join(argv))) from None
        return stdout_path.read_text(errors="replace"), stderr_path.read_text(errors="replace")

    def _members(self, process: subprocess.Popen, home: Path) -> list[int]:
        """Live processes of one run: its session, and anything naming its HOME."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            fields = _stat_fields(pid)
            if fields is None or fields[0] == "Z":  # gone, or a zombie: nothing to stop
                continue
            if int(fields[3]) == process.pid or str(home) in _cmdline(pid):
                found.append(pid)
        return found

    def stop_all(self) -> None:
        for process, home in self.runs:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
            for pid in self._members(process, home):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if process.poll() is None:
                process.wait(timeout=STOP_TIMEOUT_S)
            wait_until(lambda: not self._members(process, home), timeout=STOP_TIMEOUT_S,
                       message="chromium processes of run %s to end" % home.name)


@pytest.fixture
def chromium(tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI_REQUIRE_CHROMIUM"):
            pytest.fail("%s is missing, and CI_REQUIRE_CHROMIUM is set (.ci/run installs Debian's chromium)" % CHROMIUM)
        pytest.skip("%s is not installed (apt-get install chromium); CI runs this test" % CHROMIUM)
    browser = Chromium(tmp_path)
    yield browser
    browser.stop_all()


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to the JavaScript console (errors included), from
    Chromium's log on stderr (--enable-logging=stderr): lines like
    ``[...:INFO:CONSOLE:12] "message", source: file:///... (12)``."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(\]]", line)]


# --- PNG, with the standard library only -------------------------------------------------


def read_png(path: Path) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of raw pixel bytes, bytes per pixel) of an 8-bit RGB or
    RGBA, non-interlaced PNG (what Chromium writes): chunks parsed, IDAT inflated
    with zlib, scanline filters undone."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    position, compressed, header = 8, [], None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, "unexpected PNG format %r" % (header,)
    pixel = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(compressed))
    stride = width * pixel
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:  # Sub
            for i in range(pixel, stride):
                line[i] = (line[i] + line[i - pixel]) & 0xFF
        elif kind == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous))
        elif kind == 3:  # Average
            for i in range(stride):
                left = line[i - pixel] if i >= pixel else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                a = line[i - pixel] if i >= pixel else 0
                b = previous[i]
                c = previous[i - pixel] if i >= pixel else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows, pixel


def colour_counts(rows: list[bytes], pixel: int) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for i in range(0, len(row), pixel):
            colour = (row[i], row[i + 1], row[i + 2])
            counts[colour] = counts.get(colour, 0) + 1
    return counts


def near(colour: tuple[int, int, int], target: tuple[int, int, int], tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, target))


# --- the test ----------------------------------------------------------------------------


def test_results_page_renders_in_chromium_from_the_file_system(ci, upstream, chromium, tmp_path):
    # A real run: a handful of passed and failed commits, one with a hostile subject.
    # One runner, oldest first: results arrive in commit order.
    ci.start_dispatcher("--repo", str(upstream.clone(tmp_path / "dispatcher-clone")), "--order", "fifo")
    ci.start_runner()
    ci.start_observer()
    initial = upstream.head()
    failing = upstream.commit({"test_bad.py": FAILING_TEST}, XSS_SUBJECT)
    fixed = upstream.commit({"test_bad.py": PASSING_TEST.replace("passes", "repaired")}, "repair the test")
    ci.wait_results([initial, failing, fixed])
    expected = [(fixed, "passed"), (failing, "failed"), (initial, "passed")]
    assert ci.wait_page([initial, failing, fixed]) == expected
    url = ci.page_path.as_uri()

    dom, log = chromium.run(url, "--enable-logging=stderr", "--v=0", "--dump-dom")

    assert console_messages(log) == [], "the page wrote to the console"
    assert page_rows(dom) == expected, "the rendered page lists the commits, newest first"
    # The hostile subject is text in the DOM: no script element, the title untouched.
    assert "<script" not in dom.lower()
    assert "&lt;script&gt;document.title='owned'&lt;/script&gt; fix the &lt;b&gt;build&lt;/b&gt;" in dom
    assert "owned" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert "test_bad::test_fails" in dom and "<svg" in dom

    screenshot = tmp_path / "page.png"
    chromium.run(url, "--screenshot=%s" % screenshot, "--window-size=1200,900", "--hide-scrollbars")

    width, height, rows, pixel = read_png(screenshot)
    assert (width, height) == (1200, 900)
    counts = colour_counts(rows, pixel)
    assert len(counts) > 50, "a blank or nearly blank screenshot (%d colours)" % len(counts)
    background = max(counts.values())
    assert background < 0.95 * width * height, "the screenshot is almost one colour"
    assert sum(n for colour, n in counts.items() if near(colour, PASSED_GREEN)) > 200, "no green verdicts drawn"
    assert sum(n for colour, n in counts.items() if near(colour, FAILED_RED)) > 200, "no red verdict drawn"


def test_console_check_sees_errors(chromium, tmp_path):
    # The check above must not pass because it cannot see anything.
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><title>x</title><script>console.error('visible'); undefinedFunction();</script>")

    _, log = chromium.run(page.as_uri(), "--enable-logging=stderr", "--v=0", "--dump-dom")

    messages = console_messages(log)
    assert any("visible" in line for line in messages)
    assert any("undefinedFunction is not defined" in line for line in messages)


# --- the live page over HTTP, driven over time -----------------------------------------------

#: Longest wait for one DevTools answer; a page that hangs fails the test, not the session.
DEVTOOLS_TIMEOUT_S = 30.0


class DevTools:
    """Headless Chromium driven over its DevTools protocol on a pipe
    (``--remote-debugging-pipe``: it reads commands on fd 3 and writes answers and
    events on fd 4, each a JSON document ended by a NUL byte), so a test can look at a
    page again and again while it changes. The standard library is enough: no
    WebSocket. The process is one of ``chromium``'s runs, stopped by pid with them.
    Console messages, exceptions and log entries (a policy violation among them) are
    collected in ``problems``."""

    def __init__(self, chromium: Chromium):
        index = len(chromium.runs) + 1
        home = chromium.folder / ("chromium-%d" % index)
        (home / "profile").mkdir(parents=True)
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()

        def onto_3_and_4():  # in the child, before exec: our pipe ends become fds 3 and 4
            import fcntl

            read_end = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        argv = [CHROMIUM, *CHROMIUM_FLAGS, "--user-data-dir=%s" % (home / "profile"), "--remote-debugging-pipe",
                "about:blank"]
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
               "XDG_CACHE_HOME": str(home / "cache")}
        with open(home / "stderr.txt", "wb") as stderr:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env,
                                            start_new_session=True, pass_fds=(3, 4), preexec_fn=onto_3_and_4)
        chromium.runs.append((self.process, home))
        os.close(to_browser)
        os.close(from_browser)
        self._next_id = 0
        self._buffer = b""
        self._pending: list[dict] = []
        self.problems: list[str] = []
        self.session: str | None = None

    def close(self) -> None:
        for fd in (self._commands, self._answers):
            try:
                os.close(fd)
            except OSError:
                pass

    def _receive(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no answer from chromium within %.0f s" % DEVTOOLS_TIMEOUT_S)
            ready, _, _ = select.select([self._answers], [], [], left)
            if ready:
                data = os.read(self._answers, 1 << 20)
                if not data:
                    raise AssertionError("chromium closed its DevTools pipe")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(line)

    def call(self, method: str, session: bool = True, **params) -> dict:
        """Send one command (to the attached page unless ``session`` is False); its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self.session is not None:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + DEVTOOLS_TIMEOUT_S
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise AssertionError("%s failed: %s" % (method, answer["error"]))
                return answer.get("result", {})
            self._event(answer)

    def _event(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.problems.append("exception: %s" % params.get("exceptionDetails", {}).get("text"))
        elif method == "Runtime.consoleAPICalled":
            self.problems.append("console.%s: %s" % (params.get("type"), [arg.get("value") for arg in params.get("args", [])]))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            self.problems.append("log: %s (%s)" % (params["entry"].get("text"), params["entry"].get("url")))

    def open(self, url: str) -> None:
        """Open ``url`` in a new tab and attach to it."""
        target = self.call("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError("%s: %s" % (expression, result["exceptionDetails"].get("text")))
        return result["result"].get("value")


def test_the_live_page_shows_a_running_jobs_log_grow_then_its_verdict_without_reload(ci, upstream, chromium,
                                                                                       tmp_path):
    from test_http import ctl_json, start_with_http
    from test_live_log import live_test

    code, first, second = live_test(tmp_path)
    port = start_with_http(ci)
    ci.start_runner()
    sha = upstream.commit({"test_live.py": code}, "a test that prints, waits, prints")
    done = subprocess.run(module_argv("ctl", "--dispatcher-server", ci.address, "dispatch", sha),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ci.runners[0].wait_for_log(r"commit %s attempt \d+: testing" % sha)

    browser = DevTools(chromium)
    try:
        browser.open("http://127.0.0.1:%d/" % port)
        wait_until(lambda: browser.evaluate("document.readyState") == "complete", 30, message="the page loaded")
        browser.evaluate("window.keptSinceLoad = 'this page'")  # gone if the page is ever reloaded
        live_log = ("(document.querySelector('#running-jobs .job[data-commit=\"%s\"] pre.live-log') || {})"
                    ".textContent || ''" % sha)

        seen = wait_until(lambda: (lambda text: text if "LIVE step one" in text else None)(browser.evaluate(live_log)),
                          60, interval=0.2, message="the first line of the running job's log on the page")
        assert "LIVE step two" not in seen
        assert "<img src=x onerror=alert(1)><b>bold</b>" in seen, "the job's markup shown as text"
        assert browser.evaluate("document.querySelectorAll('#running-jobs img, #running-jobs b').length") == 0
        assert ctl_json(ci, "status")["running"] == 1
        first.touch()
        grown = wait_until(lambda: (lambda text: text if "LIVE step two" in text else None)(browser.evaluate(live_log)),
                           30, interval=0.2, message="the log to grow on the page")
        assert grown.startswith(seen), "appended to, not replaced"
        assert ci.result(sha) is None, "seen while the job runs"
        second.touch()

        verdict = ("(document.querySelector('#running-jobs .job[data-commit=\"%s\"]') || {dataset: {}}).dataset.verdict"
                   % sha)
        assert wait_until(lambda: browser.evaluate(verdict), 60, interval=0.2, message="the verdict") == "passed"
        row = "(document.getElementById('c-%s') || {dataset: {}}).dataset.verdict" % sha
        assert wait_until(lambda: browser.evaluate(row), 30, interval=0.2, message="the results row") == "passed"
        assert browser.evaluate("window.keptSinceLoad") == "this page", "no reload"
        assert browser.evaluate("performance.getEntriesByType('navigation').length") == 1
        assert browser.evaluate("document.body.dataset.live") == "ok"
        assert browser.problems == [], "console messages, exceptions or policy violations"
    finally:
        browser.close()
