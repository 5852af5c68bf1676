"""The results page in a real browser: Debian's headless Chromium, from the file system.

CI installs chromium (.ci/run) and sets CI_REQUIRE_CHROMIUM, so there the test fails
if the browser is missing; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from conftest import FAILING_TEST, PASSING_TEST, STOP_TIMEOUT_S, page_rows, wait_until

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
