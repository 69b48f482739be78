"""Requests on their way in: checked once against the model, queued, and let in as slots free up.

    submit(req) --check--> [waiting: r5 r6 r7] --take()--> the scheduler's next step (a session)
    cancel("r6")  ->  r6 is dropped when its turn comes, without running

The scheduler (engine.py) takes requests out between steps, up to max_sessions live at once.
"""
from __future__ import annotations

import itertools
import queue

import numpy as np

from .decoding import DecodingError


class Admission:
    """Owns the requests that wait: checking each against the model (`check`), the queue (`waiting`),
    the ids queued (`queued`, so a cancel can find them), the cancels not yet applied (`cancels`:
    of waiting requests and of live sessions alike; the scheduler applies the latter), and the
    session ids handed out ("s1", "s2", ...).

    `config`: the model's GPTConfig (n_vocab, n_ctx); `stats`: the scheduler's counters, where a
    request cancelled before it ran is counted ("cancelled_waiting"); `wake()`: the scheduler's
    doorbell, rung when there is something new to do.
    """

    def __init__(self, config, stats: dict, wake):
        self.config, self.stats, self.wake = config, stats, wake
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.queued: set = set()            # ids of the requests in `waiting`, so a cancel can find them
        self.cancels: set = set()
        self._ids = itertools.count(1)

    def check(self, req):
        """Validate a request before it is queued; raises DecodingError with a clear message."""
        n = len(req.prompt_ids)
        if n == 0:
            raise DecodingError("prompt is empty: give at least one token", field="prompt")
        if any((not isinstance(t, (int, np.integer))) or not 0 <= t < self.config.n_vocab for t in req.prompt_ids):
            raise DecodingError(f"prompt token ids must be in 0..{self.config.n_vocab - 1}", field="prompt")
        # the checked copy is what runs: stop as a tuple, logit_bias as (id, bias) pairs, plain numbers
        if req.score_only:          # nothing is generated: the prompt alone must fit, all n_ctx of it
            if n > self.config.n_ctx:
                raise DecodingError(f"prompt: {n} tokens do not fit the context of n_ctx={self.config.n_ctx}; "
                                    "score a shorter window", field="prompt")
            req.params = req.params.validate(n_vocab=self.config.n_vocab)
        else:
            req.params = req.params.validate(n_ctx=self.config.n_ctx, prompt_len=n, n_vocab=self.config.n_vocab)

    def submit(self, req, checked: bool = False) -> str:
        """Queue `req` (checked first, unless the caller has just done so: `check`); returns its id."""
        if not checked:
            self.check(req)
        req.id = req.id or f"s{next(self._ids)}"
        self.queued.add(req.id)
        self.waiting.put(req)
        self.wake()
        return req.id

    def cancel(self, session_id: str):
        """Stop a generation, waiting or live (the scheduler ends a live one between steps)."""
        self.cancels.add(session_id)
        self.wake()

    def take(self):
        """The next request to run, or None if none waits. One cancelled while it waited is dropped
        (counted, never run)."""
        while not self.waiting.empty():
            req = self.waiting.get()
            self.queued.discard(req.id)
            if req.id in self.cancels:      # its client went away while it waited: it never runs
                self.cancels.discard(req.id)
                self.stats["cancelled_waiting"] += 1
                continue
            return req
        return None

    def drop_all(self) -> list:
        """Take every waiting request out (the ring did not heal in time): the caller fails them."""
        out = []
        while not self.waiting.empty():
            req = self.waiting.get()
            self.queued.discard(req.id)
            self.cancels.discard(req.id)
            out.append(req)
        return out

    def cancelled(self, session_id: str) -> bool:
        return session_id in self.cancels

    def forget_cancel(self, session_id: str):
        """A live session's cancel is applied (or it ended anyway)."""
        self.cancels.discard(session_id)
