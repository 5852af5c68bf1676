"""A minimal fake runner for the history benchmark: it passes every job at once.

    python bench/fake_runner.py HOST:PORT NAME [--no-shards]

It speaks the runner's side of the protocol and nothing else: listens on a free
loopback port (a commit_ci.server.ProtocolServer), registers with the dispatcher at
HOST:PORT under NAME, answers ``ping`` (idle, or busy with the job in hand),
accepts every ``runtest`` with ``OK`` and, from a worker thread, sends the
dispatcher ``results <commit> <attempt> passed`` over one persistent connection
straight away. No git, no tests: what is left is the dispatcher's own cost per job.
With ``--no-shards`` it answers a shard's ``runtest`` as a runner from before
sharding does (``ERR unknown option 'shard' for runtest``), and logs it.

It stops on SIGTERM or SIGINT, and by itself after MAX_LIFETIME_S.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from commit_ci.client import Connection, communicate
from commit_ci.daemon import install_stop_signals, setup_logging
from commit_ci.protocol import Message, error, reply, request
from commit_ci.server import ProtocolServer, serve_in_thread
from commit_ci.wire import parse_address

log = logging.getLogger("fake-runner")

#: A forgotten fake runner stops by itself.
MAX_LIFETIME_S = 3 * 3600.0
OUTPUT = b"fake runner: 1 passed\n"


class FakeRunner:
    def __init__(self, dispatcher: tuple[str, int], name: str, shards: bool = True):
        self.dispatcher = dispatcher
        self.name = name
        self.shards = shards
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[str, int]] = collections.deque()
        self.server = ProtocolServer(("127.0.0.1", 0), self.handle, log)

    def handle(self, message: Message, peer: str) -> Message:
        if message.verb == "ping":
            with self._cond:
                job = self._jobs[0] if self._jobs else None
            if job is None:
                return reply("OK", state="idle")
            return reply("OK", state="busy", commit=job[0], attempt=job[1])
        if message.verb == "runtest":
            if "shard" in message.fields and not self.shards:
                log.info("commit %s attempt %d: shard refused (a runner from before sharding)",
                         message.fields["commit"], message.fields["attempt"])
                return error("unknown option 'shard' for runtest")
            with self._cond:
                self._jobs.append((message.fields["commit"], message.fields["attempt"]))
                self._cond.notify_all()
            return reply("OK")
        return error("%s is not a runner request" % message.verb)

    def work(self) -> None:
        connection: Connection | None = None
        while not self.stop.is_set():
            with self._cond:
                if not self._jobs:
                    self._cond.wait(0.5)
                    continue
                commit, attempt = self._jobs[0]
            result = request("results", commit=commit, attempt=attempt, status="passed", passed=1, failed=0,
                             errors=0, skipped=0, duration=0.001, log=OUTPUT)
            try:
                if connection is None:
                    connection = Connection(self.dispatcher)
                answer = connection.request(result)
            except OSError as exc:
                log.warning("commit %s attempt %d: could not deliver (%s); retrying", commit, attempt, exc)
                if connection is not None:
                    connection.close()
                connection = None
                self.stop.wait(0.2)
                continue
            if answer.verb != "OK":
                log.error("commit %s attempt %d: dispatcher answered %s", commit, attempt, answer)
            with self._cond:
                self._jobs.popleft()

    def register(self) -> None:
        port = self.server.address[1]
        answer = communicate(self.dispatcher, request("register", host="127.0.0.1", port=port, name=self.name))
        if answer.verb != "OK":
            raise SystemExit("registration refused: %s" % answer.get("reason"))
        log.info("registered with dispatcher as %s (listening on 127.0.0.1:%d)", self.name, port)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[2:] not in ([], ["--no-shards"]):
        print("usage: fake_runner.py HOST:PORT NAME [--no-shards]", file=sys.stderr)
        return 2
    address, name = argv[:2]
    setup_logging()
    runner = FakeRunner(parse_address(address), name, shards=argv[2:] != ["--no-shards"])
    install_stop_signals(runner.stop, log)
    serve_in_thread(runner.server, "server")
    worker = threading.Thread(target=runner.work, name="worker", daemon=True)
    worker.start()
    runner.register()
    runner.stop.wait(MAX_LIFETIME_S)
    runner.stop.set()
    runner.server.shutdown()
    runner.server.server_close()
    worker.join(timeout=5)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
