"""What every daemon does the same way: log one line per event, and stop in order on
SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading


def add_logging_arguments(parser) -> None:
    """``--log-file`` and ``-v``, which ``setup_logging`` takes."""
    parser.add_argument("--log-file", help="write the log here instead of to stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """One line per event: time, daemon, level, message; to stderr or to ``log_file``."""
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The format above uses none of these, and finding them costs about half of a
    # line's 30 us, on the path of every request (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # GitPython logs every git call at DEBUG; that drowns the daemon's own lines.
    logging.getLogger("git").setLevel(logging.INFO)


def install_stop_signals(stop: threading.Event, logger: logging.Logger,
                         signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """``signals`` (SIGTERM and SIGINT) set ``stop``; a second one exits at once.

    The handler only records: the main thread notices ``stop`` and shuts down in
    order. Must be called from the main thread.
    """

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        signal.signal(signum, on_signal)
