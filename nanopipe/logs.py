"""Logs through the standard `logging` module, with the SmolCluster guide's prefixes kept exactly.

    leader_logger().info("Server listening on 0.0.0.0:65432")   # [LEADER] Server listening on 0.0.0.0:65432
    worker_logger(1).info("Loaded 4 layers for worker 1")       # [WORKER-1] Loaded 4 layers for worker 1

The prefix is part of the message, so a terminal, a log file and pytest's caplog all show the
guide's lines as written (its troubleshooting says "check server logs for 'Server listening'").
Records go to the loggers "nanopipe.cluster.leader" and "nanopipe.cluster.worker"; `nanopipe -v` / `-q` set the
level (setup). Without setup (nanopipe used as a library) Python's defaults apply: warnings only.
"""
from __future__ import annotations

import logging
import reprlib
import sys

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 40, 40, 4, 4, 2


def shown(value, limit: int = 60) -> str:
    """repr(value), cut to at most `limit` characters, for messages about values from outside
    (a config file, a request, a file header): never the repr of a huge or deeply nested value.

        shown("x" * 1000)            -> "'xxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxx'"
        shown([[1, 2, 3, 4, 5]] * 9) -> "[[1, 2, 3, 4, ...], [1, 2, 3, 4, ...], [1, 2, 3, 4, ...],..."
    """
    r = _SHORT.repr(value)
    return r if len(r) <= limit else f"{r[:limit - 3]}..."


class Prefixed(logging.LoggerAdapter):
    """A logger that puts `prefix` and a space before every message."""

    def process(self, msg, kwargs):
        return f"{self.extra['prefix']} {msg}", kwargs


def leader_logger() -> Prefixed:
    return Prefixed(logging.getLogger("nanopipe.cluster.leader"), {"prefix": "[LEADER]"})


def worker_logger(rank: int) -> Prefixed:
    return Prefixed(logging.getLogger("nanopipe.cluster.worker"), {"prefix": f"[WORKER-{rank}]"})


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (click's test runner swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def level_for(verbosity: int) -> int:
    """0 -> INFO (the guide's lines and nanopipe's detail), 1 -> DEBUG, -1 -> WARNING, -2 -> ERROR."""
    return min(logging.CRITICAL, max(logging.DEBUG, logging.INFO - 10 * verbosity))


def setup(verbosity: int = 0) -> None:
    """Show nanopipe's log lines on stderr, bare (the prefix is in the message), at level_for(verbosity).

    Called once per command by the CLI group (`nanopipe -v serve`, `nanopipe -q join ...`); calling it
    again replaces the handler, never adds a second one.
    """
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("nanopipe")
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level_for(verbosity))
