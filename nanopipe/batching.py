"""Forming each step's batch, and rank 0's part of it before the ring.

Every step takes the pending rows of live sessions: a decoding session gives 1 row (its last
token), a prompt a chunk of up to PREFILL_CHUNK rows, more while the step has spare rows
(`kernels.prefill_rows`, measured at start). They run through rank 0's blocks as ONE (T, C) batch,
each session's rows against its own cache:

    sessions  a (decoding)  b (prompt, 70 tokens left)  c (decoding)
    batch     [1 row of a | 64 rows of b | 1 row of c]  -> (66, C) -> embed, blocks[lo0:hi0] -> the ring
"""
from __future__ import annotations

import collections
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from .decoding import DecodingError
from .model import blocks_forward, embed, head
from .sessions import Batch, add_times, hop_transits, step_info, takes_argmax, use_logits, use_top

PREFILL_CHUNK = 64        # prompt rows per session per step while others have rows waiting (see make)


@dataclass(frozen=True)
class SplitLogits:
    """What comes back instead of a step's rows when the ring's last stage is a split stage that runs
    the LM head (cluster/group.py, split_lm_head): the logits of the rows asked for (`rows`, rows of
    the step's x, in order: Batcher.logit_rows), gathered by its first member in vocabulary order,
    and the rows of x that were not finite there (their sessions fail, as rank 0's own check does)."""
    logits: np.ndarray          # (len(rows), V)
    rows: list
    nonfinite: list

    def finite_rows(self) -> np.ndarray:
        return np.isfinite(self.logits).all(axis=1)                             # (R,)


@dataclass(frozen=True)
class SplitTop:
    """The compact form of SplitLogits, for a step whose rows asked for logits all take their argmax
    (sessions.takes_argmax; Batcher.greedy): each of those rows reduced by the last split stage to
    its max, the token holding it and its logsumexp (model.combine_tops), so the token's logprob is
    max - logsumexp. `bad`: why the reply as a whole could not be read (every session of the step
    fails with it; the ring goes on)."""
    top: np.ndarray             # (len(rows),) float64: each row's max
    token: np.ndarray           # (len(rows),) int64: its argmax
    lse: np.ndarray             # (len(rows),) float64: its logsumexp
    rows: list
    nonfinite: list
    bad: str | None = None

    def finite_rows(self) -> np.ndarray:
        return np.isfinite(self.top) & np.isfinite(self.lse)                    # (R,)


class Batcher:
    """Owns how a step's rows are chosen (`make`: which sessions, how many rows each, capped by
    max_batch_rows) and rank 0's compute on them: before the ring (`front`: embed and its blocks)
    and after it (`back`: the head, then each session's logits), with its one-row times (decode_ms).
    `stage`: rank 0's StageWeights; `kernels`: the chosen kernels (kernels.choose_prefill_rows),
    whose prefill_rows bound how far prompt chunks grow. The batch ids it hands out count up."""

    def __init__(self, stage, kernels, max_batch_rows: int = 256, log=None):
        """`log(message)`: where a session that failed on its own is reported (see back); None: nowhere."""
        self.stage, self.kernels, self.max_batch_rows, self.log = stage, kernels, max_batch_rows, log
        self._ids = itertools.count(1)
        # rank 0's own time (embed, its blocks, the head) of recent one-row decode steps, in ms:
        # the leader checks it against the placement's prediction (cluster/planner.py stage_report)
        self.decode_ms: collections.deque = collections.deque(maxlen=64)
        # each rank's link transit on those steps, in ms (sessions.hop_transits): {rank: deque}
        self.transit_ms: dict = collections.defaultdict(lambda: collections.deque(maxlen=64))

    def make(self, sessions: dict, depth: int) -> Batch | None:
        """This step's next batch from the live `sessions` ({id: Session}), or None if none has rows
        waiting; with a ring of `depth` stages, about 1/depth of the sessions go in each batch."""
        ready = [s for s in sessions.values() if not s.in_flight and s.pending and not s.finished]
        if not ready:
            return None
        # with a ring of `depth` stages, split the live sessions into about `depth` groups so
        # every stage has a batch to work on
        cap = max(1, math.ceil(len(sessions) / depth))
        chosen, counts, rows = [], [], 0
        for s in ready[:cap]:
            n = min(len(s.pending), PREFILL_CHUNK)
            if rows and rows + n > self.max_batch_rows:
                break
            chosen.append(s)
            counts.append(n)
            rows += n
        counts = self._grow_chunks(chosen, counts)
        for s in chosen:
            s.in_flight = True
        return Batch(next(self._ids), chosen, counts, t0=time.perf_counter())

    def _grow_chunks(self, sessions: list, counts: list) -> list:
        """Let prompt chunks follow the load: every session already has its rows of this step (a
        decode row, or up to PREFILL_CHUNK prompt rows); while the step holds fewer rows than
        `kernels.prefill_rows` (measured at start: where a larger chunk stops prefilling faster per
        row, capped by max_batch_rows), prompts take the spare rows, in batch order.

        So a lone 512-token prompt goes through in a few large steps, while with others waiting a
        step never holds more rows than before or than prefill_rows, and every session in it keeps
        its rows: a long prompt still never stalls the others. Worked example, prefill_rows 256:
        a lone 512-token prompt -> [256], [256]; behind 3 decoding sessions -> [1, 1, 1, 253].
        """
        budget = min(self.kernels.prefill_rows, self.max_batch_rows)
        spare = budget - sum(counts)
        if spare <= 0:
            return counts
        grown = list(counts)
        for i, s in enumerate(sessions):
            extra = min(spare, len(s.pending) - grown[i])
            if extra > 0:                   # only a prompt (or a replay) has more than one row pending
                grown[i] += extra
                spare -= extra
        return grown

    def front(self, batch: Batch) -> np.ndarray:
        """Rank 0's part before the ring: the first two parts of `model.gpt2`, embed and its blocks
        (`back` runs the third, the head, on the rows that come back)."""
        st = self.stage
        parts = list(zip(batch.sessions, batch.counts))                         # (session, its n rows)
        ids = np.concatenate([np.asarray(s.pending[:n], np.int64) for s, n in parts])       # (T,)
        pos = np.concatenate([np.arange(s.pos, s.pos + n) for s, n in parts])                # (T,)
        x = embed(ids, pos, st.wte, st.wpe)                                     # (T, C)
        x = blocks_forward(x, st.blocks, n_head=st.config.n_head,
                           segments=[(s.cache, n) for s, n in zip(batch.sessions, batch.counts)])   # (T, C)
        batch.front_ms = (time.perf_counter() - batch.t0) * 1000
        return x

    def logit_rows(self, batch: Batch) -> list:
        """The rows of the step's x that need logits, in order: every row of an echo request (each
        prompt token is scored), else a session's last row once its prompt is all in this step.
        Sessions a (decoding, 1 row), b (a prompt chunk of 64, more to come), c (its last 3 prompt
        rows): [0, 67]."""
        rows, row = [], 0
        for s, n in zip(batch.sessions, batch.counts):
            if _asks(s, n):
                rows.extend(range(row if s.req.echo else row + n - 1, row + n))
            row += n
        return rows

    def greedy(self, batch: Batch) -> bool:
        """Does every session with a row in logit_rows take its argmax (sessions.takes_argmax)? Then
        a last split stage that runs the head sends each such row's top, not its logits (SplitTop).
        A step that mixes greedy and other sessions asks logits of every row: one kind of reply a
        step, and the greedy rows' tokens from whole logits are the same."""
        return all(takes_argmax(s) for s, n in zip(batch.sessions, batch.counts) if _asks(s, n))

    def back(self, batch: Batch, x, trace: list, source: str | None = None, counted=lambda: None):
        """After the last block: head, then each session's rows (sessions.use_logits: score, sample,
        emit); every session of the batch moves on by its rows. `source`: who sent x back (the ring's
        last stage; None: no ring). x: (T, C), or the SplitLogits a last split stage sent, whose
        members ran the head (rank 0 then only samples), or its SplitTop for a greedy step (rank 0
        then takes each row's token and logprob: sessions.use_top).

        What is done per session (scoring, penalties, sampling, stop strings, detokenizing, emitting)
        cannot fail the batch: an exception there fails that session alone (s.error, a message saying
        what went wrong), and every other session goes on. The caller ends the sessions that are done.
        """
        t_back = time.perf_counter()
        split, compact = isinstance(x, (SplitLogits, SplitTop)), isinstance(x, SplitTop)
        T = sum(batch.counts)
        if source is not None:
            finite = np.isfinite(x).all(axis=1) if not split else np.ones(T, bool)      # (T,)
            if split:
                finite[x.nonfinite] = False
                finite[x.rows] &= x.finite_rows()
            self._fail_rows(batch, finite, f"{source} sent non-finite activations (NaN or inf) for this request; "
                            "check that node's weights (and the ones before it in the ring), then retry")
        if compact:
            self._check_top(batch, x, source)
        asked = x.rows if split else self.logit_rows(batch)
        starts = np.cumsum([0] + list(batch.counts))
        at = np.searchsorted(starts, asked, side="right") - 1                   # the session of each row
        keep = [i for i, k in enumerate(at) if batch.sessions[k].error is None]   # not of a failed session
        owners = [(batch.sessions[at[i]], int(asked[i] - starts[at[i]])) for i in keep]   # (session, its row)
        t_head = time.perf_counter()
        if not keep or compact:
            logits = None
        elif split:
            logits = x.logits if len(keep) == len(asked) else x.logits[keep]                # (len(keep), V)
        else:
            logits = head(x[[asked[i] for i in keep]], self.stage.ln_f, self.stage.lm_head)  # (len(keep), V)
        if T == 1 and owners:
            self.decode_ms.append(batch.front_ms + (time.perf_counter() - t_head) * 1000)
            for rank, ms in hop_transits(batch, trace, t_back) if trace else ():
                if ms is not None and ms >= 0:
                    self.transit_ms[rank].append(ms)
        step = step_info(self.stage, batch, trace, t_back) if any(o[0].req.trace for o in owners) else None
        for i, (s, j) in enumerate(owners):
            if s.error is not None:
                continue                        # an earlier row of this session failed
            try:
                if compact:                     # the token and its logprob, from the row's top
                    k = keep[i]
                    use_top(s, j, int(x.token[k]), float(x.top[k] - x.lse[k]), counted)
                else:
                    use_logits(s, j, logits[i], step, counted)                # logits[i]: (V,)
            except Exception as e:              # whatever it is, it is this session's alone
                self._failed(s, "choosing its next token", e)
        now = time.perf_counter()
        for s, n in zip(batch.sessions, batch.counts):
            s.in_flight = False
            del s.pending[:n]
            s.pos += n
            add_times(s.node_ms, batch, trace, now, t_back)
            if not s.pending and s.t_prefill_done is None:
                s.t_prefill_done = now

    def _check_top(self, batch: Batch, x: SplitTop, source: str):
        """A compact reply's rows must name tokens of the vocabulary with a logprob <= 0 (max <=
        logsumexp); a row that does not, or a reply that could not be read at all (x.bad), fails its
        sessions alone, naming the sender."""
        T, V = sum(batch.counts), self.stage.config.n_vocab
        ok = np.ones(T, bool)
        if x.bad is not None:
            self._fail_rows(batch, ~ok, f"{source} sent a malformed greedy reply (TOP) for this request: {x.bad}; "
                            "check that node runs this version of nanopipe, then retry")
            return
        good = (x.token >= 0) & (x.token < V) & ~(x.top > x.lse)                  # (R,)
        for r in np.flatnonzero(~good):
            ok = np.ones(T, bool)
            ok[x.rows[r]] = False
            self._fail_rows(batch, ok, f"{source} sent a greedy reply (TOP) naming token {int(x.token[r])} with "
                            f"logprob {float(x.top[r] - x.lse[r]):.4g}, not a token of the vocabulary 0..{V - 1} "
                            "with a logprob <= 0; check that node's weights and version, then retry")

    def _fail_rows(self, batch: Batch, ok: np.ndarray, message: str):
        """Fail the sessions of every row that is not `ok` ((T,) bool) with `message`; the others go on.
        (Rows that came back from the ring as NaN or inf fail their sessions this way, naming who
        sent them: the ring's last stage, though a stage before it may have made them.)"""
        if ok.all():
            return
        row = 0
        for s, n in zip(batch.sessions, batch.counts):
            if not ok[row:row + n].all() and s.error is None:
                self._failed(s, "reading its activations", None, message)
            row += n

    def _failed(self, s, doing: str, e: Exception | None, message: str | None = None):
        """Session `s` failed on its own: it ends when this step does, with a message naming what
        failed (the field, for a DecodingError); the step goes on for the others."""
        if message is None:         # a DecodingError's message names its field already
            detail = str(e) if isinstance(e, DecodingError) else f"{type(e).__name__}: {e}"
            message = f"this request failed while {doing}: {detail}"
        s.error = message
        if self.log is not None:
            self.log(f"session {s.id} failed alone: {message}")


def _asks(s, n: int) -> bool:
    """Does session `s`, with n rows in a step, need logits of any: an echo request (it scores every
    prompt row), or its prompt's last row is in this step (its next token)."""
    return s.req.echo or n == len(s.pending)
