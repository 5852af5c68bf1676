"""A runner cut off from the network mid-job, with each daemon on its own host.

The hosts are Linux network namespaces made by the test: a hub namespace holding a
bridge, and one namespace each for the dispatcher (with the observer beside it) and
two runners, joined to the bridge by veth pairs on a private /24. Cutting a runner
off is taking its link down on the hub side; healing is bringing it up again. Each
runner holds a key of its own, the observer an observer's key.
Needs root and iproute2; where namespaces cannot be made the test says why and
skips, except in CI (CI_REQUIRE_NETNS=1), where it must run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, WAITS_FOR_FLAG_TEST, CISystem, make_keys, wait_until

SUBNET = "10.231.%d" % (os.getpid() % 200 + 20)
DISPATCHER_IP = SUBNET + ".1"
RUNNER_IPS = {"r1": SUBNET + ".11", "r2": SUBNET + ".12"}


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError("ip %s: %s" % (" ".join(args), done.stderr.strip()))


class Network:
    def __init__(self):
        tag = "%d" % os.getpid()
        self.hub = "cihub" + tag
        self.hosts = {"dispatcher": "cidisp" + tag, "r1": "cir1" + tag, "r2": "cir2" + tag}
        self.made: list[str] = []

    def build(self) -> None:
        for namespace in [self.hub, *self.hosts.values()]:
            ip("netns", "add", namespace)
            self.made.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        addresses = {"dispatcher": DISPATCHER_IP, **RUNNER_IPS}
        for role, namespace in self.hosts.items():
            port = "p" + role[:6]
            ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("-n", self.hub, "link", "set", port, "master", "br0")
            ip("-n", self.hub, "link", "set", port, "up")
            ip("-n", namespace, "addr", "add", addresses[role] + "/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")

    def cut(self, role: str) -> None:
        ip("-n", self.hub, "link", "set", "p" + role[:6], "down")

    def heal(self, role: str) -> None:
        ip("-n", self.hub, "link", "set", "p" + role[:6], "up")

    def run_in(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[role], *argv]

    def destroy(self) -> None:
        for namespace in reversed(self.made):
            try:
                ip("netns", "del", namespace)
            except RuntimeError:
                pass


@pytest.fixture
def network():
    built = Network()
    try:
        built.build()
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        built.destroy()
        if os.environ.get("CI_REQUIRE_NETNS"):
            pytest.fail("cannot create network namespaces in CI: %s" % exc)
        pytest.skip("cannot create network namespaces here (needs root and iproute2): %s" % exc)
    yield built
    built.destroy()


def key_env(key_file) -> dict:
    """Across hosts the daemons must authenticate (they refuse to listen beyond loopback
    without a secret or keys): each key reaches its daemon through the environment."""
    return {**os.environ, "CI_SECRET": key_file.read_text().strip()}


@pytest.mark.slow
def test_runner_cut_off_mid_job_is_replaced_and_its_late_result_ignored(network, ci: CISystem, upstream):
    # `network` comes first so that its namespaces outlive the processes in them.
    keys_file, key_files = make_keys(ci.folder / "keys", {"r1": "runner", "r2": "runner", "observer": "observer"})
    dispatcher = ci.processes.start("dispatcher", network.run_in("dispatcher", [
        sys.executable, str(ROOT / "dispatcher.py"), "--host", DISPATCHER_IP, "--port", "8888",
        "--results-dir", str(ci.results_dir), "--heartbeat-interval", "0.5", "--keys-file", str(keys_file)]),
        env={name: value for name, value in os.environ.items() if name != "CI_SECRET"})
    dispatcher.wait_for_log(r"listening on %s:8888" % DISPATCHER_IP)
    ci.dispatcher = dispatcher

    def start_runner(role: str):
        clone = upstream.clone(ci.folder / (role + "-clone"))
        runner = ci.processes.start(role, network.run_in(role, [
            sys.executable, str(ROOT / "test_runner.py"), "--host", RUNNER_IPS[role], "--port", "8900",
            "--name", role, "--dispatcher-server", "%s:8888" % DISPATCHER_IP, str(clone)]), env=key_env(key_files[role]))
        runner.wait_for_log(r"registered with dispatcher")
        return runner

    cut_off = start_runner("r1")
    observer_clone = upstream.clone(ci.folder / "observer-clone")
    observer = ci.processes.start("observer", network.run_in("dispatcher", [
        sys.executable, str(ROOT / "repo_observer.py"), "--dispatcher-server", "%s:8888" % DISPATCHER_IP,
        "--interval", "0.2", str(observer_clone)]), env=key_env(key_files["observer"]))
    ci.wait_result(upstream.head())

    # The job waits for this flag: r1 is cut off while it runs, however long r2 takes to start.
    flag = ci.folder / "release"
    slow = upstream.commit({"test_slow.py": WAITS_FOR_FLAG_TEST % str(flag)}, "slow test")
    cut_off.wait_for_log(r"commit %s attempt \d+: testing" % slow)
    replacement = start_runner("r2")
    network.cut("r1")
    replacement.wait_for_log(r"commit %s attempt \d+: testing" % slow, timeout=60)
    flag.touch()

    result = ci.wait_result(slow, timeout=60)
    assert result["status"] == "passed"
    assert result["runner"] == "r2"
    assert result["attempts"] == 2
    assert re.search(r"runner r1 dropped: \d+ pings unanswered", dispatcher.log())
    # r1 finishes the tests it was running but cannot report: it keeps the result.
    cut_off.wait_for_log(r"commit %s attempt \d+: result kept" % slow, timeout=60)
    settled = (ci.results_dir / (slow + ".json")).read_bytes(), ci.report(slow)

    network.heal("r1")
    dispatcher.wait_for_log(r"commit %s attempt \d+ \(runner r1\): late passed result ignored, already passed" % slow, timeout=60)
    dispatcher.wait_for_log(r"runner r1 registered(.|\n)*runner r1 registered(.|\n)*runner r1 answers", timeout=30)

    assert ((ci.results_dir / (slow + ".json")).read_bytes(), ci.report(slow)) == settled
    assert json.loads(settled[0])["runner"] == "r2"
    assert ci.result_files() == ci.expected_files([upstream.head(), observer_head(observer)])
    # Healed, r1 takes work again.
    after = upstream.commit({"test_after.py": "def test_after():\n    pass\n"}, "after the partition")
    wait_until(lambda: ci.result(after), timeout=60, message="a result after healing")


def observer_head(observer) -> str:
    return re.findall(r"commit ([0-9a-f]{40}) reported", observer.log())[0]
