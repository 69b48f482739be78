"""Generation: one scheduler for one process and for the whole cluster.

The scheduler owns rank 0's work: embed -> blocks[lo0:hi0] -> (the ring of workers, if any) -> head
-> sample. In a single process there is no ring and rank 0 holds every block; in a cluster the
same code hands rank 0's output to `ring.send()` and picks the final activations up from
`ring.recv()`. So "the cluster's output equals the single process's" holds by construction, and
the tests check it anyway.

Continuous batching: every step takes the pending rows of every live session (a prompt chunk of
up to PREFILL_CHUNK rows, more while the step has spare rows, or the one row of the last sampled
token), runs them through the stage as ONE batch (one matmul per weight, or a gemv per row for a
few rows: model.linear; attention per session against its own cache), samples each
session's next token, and lets new requests join and finished ones leave between steps. With a
ring over N machines, up to N batches are in flight (`ring.depth`, see ClusterConfig.depth) so every
machine has work; stages that share a machine get one batch holding every session.
"""
from __future__ import annotations

import collections
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .decoding import (
    EOT,
    DecodingError,
    SamplingParams,
    is_number,
    log_softmax,
    logsumexp,
    make_rng,
    most_likely,
    penalize,
    sample,
    top_probs,
)
from .kernels import PREFILL_CANDIDATES, choose_gemv_rows, choose_head_rows, choose_prefill_rows
from .model import KVCache, blocks_forward, embed, gpt2, head
from .partition import first_last
from .prefix import PrefixCache, default_prefix_cache_bytes, fork_cache
from .weights import StageWeights, load_stage

PREFILL_CHUNK = 64        # prompt rows per session per step while others have rows waiting (see _make_batch)


@dataclass
class Request:
    """One generation request. Events go to `emit(kind, data)`: "token", "status", "done", "error"."""
    prompt_ids: list
    params: SamplingParams
    emit: object = None
    echo: bool = False              # also score the prompt: prompt_logprobs (and, with top_logprobs, its top K)
    top_logprobs: int = 0           # K most likely ids with their logprobs at each scored or generated position
    score_only: bool = False        # run the prompt through once and generate nothing (echo scoring)
    stop_at_eot: bool = True
    id: str = ""
    trace: bool = False             # each token event also carries its step's hops and top-5 (see step_info)
    text: object = None             # a tokenizer.StopStream: token events carry "text"; a stop string ends it


@dataclass
class Session:
    """Rank 0's state for one live request."""
    req: Request
    cache: KVCache
    rng: np.random.Generator
    pending: list                   # token ids still to feed through the model
    pos: int = 0                    # tokens already fed (== every stage's cache length)
    out_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    prompt_top_logprobs: list = field(default_factory=list)
    in_flight: bool = False
    finished: bool = False
    cancelled: bool = False
    finish_reason: str = "length"
    t_start: float = 0.0
    t_first: float | None = None
    t_prefill_done: float | None = None
    node_ms: dict = field(default_factory=dict)   # rank -> {"compute": ms, "transit": ms}
    cached: int = 0                 # prompt tokens reused from a kept cache (nanopipe/prefix.py)
    cached_from: str | None = None  # the kept cache they came from
    fork: tuple | None = None       # (kept id, n) the stages must fork from; sent with the first batch
    error: str | None = None        # why this session failed in a step; it ends when the step does

    @property
    def id(self) -> str:
        return self.req.id


@dataclass
class Batch:
    """One step's rows in flight: each session's next `counts[i]` pending tokens, in row order
    (a decoding session gives 1 row, a prompt a chunk); the ring carries it as one (T, C) array."""
    id: int
    sessions: list                  # Session, in row order
    counts: list                    # rows per session
    t0: float = 0.0
    front_ms: float = 0.0


def prefill_step(blocks, n_head: int):
    """What kernels.choose_prefill_rows times: step(T) runs the stage's first block over T rows and a
    fresh cache, a real prefill step. None when the stage holds no blocks."""
    if not blocks:
        return None
    p, C = blocks[0], blocks[0]["ln_1"]["g"].shape[0]
    x = np.random.default_rng(0).standard_normal((max(PREFILL_CANDIDATES), C)).astype(np.float32)   # (T, C)

    def step(T: int):
        blocks_forward(x[:T], [p], n_head=n_head, segments=[(KVCache(1, n_head, C // n_head, T), T)])
    return step


class Scheduler:
    """Runs every live session forward, one batched step at a time.

    `stage` is rank 0's StageWeights (with embeddings and head). `ring`, when given, carries the
    activations through the workers: ring.send(batch_id, sessions_meta, x), ring.recv() ->
    (batch_id, x, trace), ring.free(ids); `ring.depth` is how many batches may be in flight.
    """

    def __init__(self, stage: StageWeights, ring=None, max_sessions: int = 16, max_batch_rows: int = 256,
                 prefix_cache_bytes: int | None = None, log=None):
        """`log(message)`: where a session that failed on its own (see _finish) is reported, besides
        its caller; None: nowhere else."""
        if not stage.has_head:
            raise ValueError("the scheduler runs on rank 0, whose stage must hold wte, wpe, ln_f and the head")
        self.stage, self.ring = stage, ring
        self.config = stage.config
        self.log = log
        # once per process, before the first step (nanopipe/kernels.py): model.linear's kernels, then
        # a lone prompt's chunk (its measured steps run those kernels), and the head's (rank 0 holds it)
        choose_gemv_rows(stage.blocks)
        self.kernels = choose_prefill_rows(prefill_step(stage.blocks, stage.config.n_head))
        if stage.lm_head is not None:
            choose_head_rows(stage.lm_head)
        self.max_sessions, self.max_batch_rows = max_sessions, max_batch_rows
        self.sessions: dict = {}
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._queued: set = set()           # ids of the requests in `waiting`, so a cancel can find them
        self.in_flight: dict = {}
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel: set = set()
        self.lock = threading.RLock()
        # max_live: the most sessions ever live at once (requests batched together show up here)
        # cancelled_waiting: requests cancelled before they were admitted (they never ran)
        self.stats = {"requests": 0, "tokens": 0, "errors": 0, "max_in_flight": 0, "max_live": 0,
                      "prompt_tokens_cached": 0, "prompt_tokens_computed": 0, "cancelled_waiting": 0}
        # rank 0's own time (embed, its blocks, the head) of recent one-row decode steps, in ms:
        # the leader checks it against the placement's prediction (cluster/ring.py stage_report)
        self.decode_ms: collections.deque = collections.deque(maxlen=64)
        # finished sessions' caches, kept for the next request with the same start: rank 0's
        # stage only, until the leader adds its workers' (set_prefix_stages)
        budget = default_prefix_cache_bytes() if prefix_cache_bytes is None else prefix_cache_bytes
        self.prefix = PrefixCache([(self.position_bytes(len(stage.blocks)), budget)])

    # -- requests in ------------------------------------------------------------------------

    def check(self, req: Request):
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

    def submit(self, req: Request, checked: bool = False) -> str:
        """Queue `req` (checked first, unless the caller has just done so: `check`)."""
        if not checked:
            self.check(req)
        req.id = req.id or f"s{next(self._ids)}"
        self._queued.add(req.id)
        self.waiting.put(req)
        self._wake.set()
        return req.id

    def cancel(self, session_id: str):
        """Stop a generation (its client went away); its caches are freed at every stage. A request
        still waiting to be admitted is dropped when its turn comes, without running."""
        self._cancel.add(session_id)
        self._wake.set()

    def take_waiting(self, old: "Scheduler"):
        """Queue here the requests still waiting in `old` (the leader replaced its scheduler), with
        the cancels they got meanwhile."""
        while not old.waiting.empty():
            req = old.waiting.get()
            old._queued.discard(req.id)
            self._queued.add(req.id)
            self.waiting.put(req)
            if req.id in old._cancel:
                self._cancel.add(req.id)
        self._wake.set()

    @property
    def busy(self) -> bool:
        return bool(self.sessions) or not self.waiting.empty()

    # -- the loop ----------------------------------------------------------------------------

    def run_forever(self, ready: threading.Event | None = None, on_error=None):
        """The leader's scheduler thread: step while there is work, wait for work, until stop().

        `ready`: step only while it is set (the leader's ring is up); None: always.
        `on_error(e)`: called with an exception a step raised, and the loop goes on (the leader logs it
        and fails the live requests); without it the exception ends the loop.
        """
        while not self._stop.is_set():
            if ready is not None and not ready.is_set():
                ready.wait(0.2)
                continue
            try:
                if not self.step():
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(e)

    def stop(self):
        self._stop.set()
        self._wake.set()

    def run_until_idle(self):
        """Single-process generation: step until every request has finished."""
        while self.busy or self.in_flight:
            self.step()

    def step(self) -> bool:
        """Start batches while the pipeline has room, then finish one. Returns False if idle."""
        with self.lock:
            return self._step()

    def _step(self) -> bool:
        if self.ring is None and self.stage.hi != self.config.n_layer:
            return False                    # a cluster whose ring is down: wait for it to heal
        self._admit()
        self._apply_cancels()
        depth = getattr(self.ring, "depth", 1)
        did = False
        while len(self.in_flight) < depth:
            batch = self._make_batch(depth)
            if batch is None:
                break
            x = self._front(batch)                                              # (T, C)
            did = True
            if self.ring is None:
                self._finish(batch, x, [])
            else:
                self.in_flight[batch.id] = batch
                sessions = [self._act_entry(s, n) for s, n in zip(batch.sessions, batch.counts)]
                self.ring.send(batch.id, sessions, x)                           # (T, C) to rank 1
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(self.in_flight))
        if self.in_flight:
            got = self.ring.recv(timeout=0.5)
            if got is not None:
                batch_id, x, trace = got                                        # x: (T, C) from the last rank
                batch = self.in_flight.pop(batch_id, None)
                if batch is not None:
                    self._finish(batch, x, trace)
            did = True
        return did

    def interrupt(self, message: str):
        """The ring broke: batches in flight are lost. Sessions stay, waiting for replay_all()."""
        with self.lock:
            self._drop_in_flight()
            self.prefix.clear()             # the workers drop every cache when they join the next ring
            for s in self.sessions.values():
                self._emit_safely(s.req, "status", {"text": message})

    def _drop_in_flight(self):
        """Forget the batches out on a ring that broke; their sessions may be batched again."""
        for batch in self.in_flight.values():
            for s in batch.sessions:
                s.in_flight = False
        self.in_flight.clear()

    def replay_all(self) -> int:
        """After the ring is rebuilt, every stage's caches are gone: feed each live session's tokens
        (prompt + generated so far) again from position 0. Tokens already sampled are not sampled
        again, so a greedy answer comes out exactly as if nothing had happened."""
        with self.lock:
            self.prefix.clear()             # every worker dropped its kept caches joining this ring
            for s in self.sessions.values():
                s.cache = self._new_cache()
                s.pending = list(s.req.prompt_ids) + list(s.out_ids)
                s.pos = 0
                s.in_flight = False
                s.fork = None
                # its reused prefix is computed again after all: count it as computed
                self.stats["prompt_tokens_cached"] -= s.cached
                self.stats["prompt_tokens_computed"] += s.cached
                s.cached, s.cached_from = 0, None
            return len(self.sessions)

    def fail_all(self, message: str):
        """Every live and waiting request ends with `message` (the ring did not heal in time)."""
        with self.lock:
            self._drop_in_flight()
            for s in list(self.sessions.values()):
                self._end(s, error=message)
            while not self.waiting.empty():
                req = self.waiting.get()
                self._queued.discard(req.id)
                self._cancel.discard(req.id)
                self.stats["errors"] += 1
                self._emit_safely(req, "error", {"error": message})

    def cache_bytes(self) -> int:
        """Rank 0's KV caches: live sessions' and kept ones'."""
        live = sum(s.cache.nbytes for s in list(self.sessions.values()) if s.cache is not None)
        return live + self.prefix_bytes()

    def prefix_bytes(self) -> int:
        return sum(k.cache.nbytes for k in list(self.prefix.kept.values()))

    def _new_cache(self) -> KVCache:
        return KVCache.for_model(self.config, len(self.stage.blocks))

    # -- the pieces of a step ----------------------------------------------------------------

    def _admit(self):
        while len(self.sessions) < self.max_sessions and not self.waiting.empty():
            req = self.waiting.get()
            self._queued.discard(req.id)
            if req.id in self._cancel:      # its client went away while it waited: it never runs
                self._cancel.discard(req.id)
                self.stats["cancelled_waiting"] += 1
                continue
            s = Session(req, self._new_cache(), make_rng(req.params.seed), list(req.prompt_ids),
                        t_start=time.perf_counter())
            self._reuse_prefix(s)
            self.sessions[req.id] = s
            self.stats["requests"] += 1
            self.stats["prompt_tokens_cached"] += s.cached
            self.stats["prompt_tokens_computed"] += len(req.prompt_ids) - s.cached
        self.stats["max_live"] = max(self.stats["max_live"], len(self.sessions))

    def submit_many(self, reqs: list) -> list:
        """Submit several requests as one batch: all are checked first (one bad request refuses them
        all), then queued while no step runs, so the next step admits them together (up to
        max_sessions) and they run as concurrent sessions, never one after another."""
        for req in reqs:
            self.check(req)
        with self.lock:
            return [self.submit(req, checked=True) for req in reqs]

    # -- prefix reuse (nanopipe/prefix.py): the index lives here, the stages obey ------------

    def position_bytes(self, n_layers: int) -> int:
        """Bytes one cached position takes on a stage of n_layers blocks: k and v, float32."""
        return n_layers * 2 * self.config.n_embd * 4

    def set_prefix_stages(self, stages: list):
        """The ring's stages, rank 0 first: (n_layers, budget_bytes) each. Forgets what was kept."""
        with self.lock:
            self.prefix.clear()
            self.prefix.stages = [(self.position_bytes(n), budget) for n, budget in stages]

    def _reuse_prefix(self, s: Session):
        """Start `s` from the longest kept prefix of its prompt, if any (echo scores every prompt
        position, so it always prefills in full)."""
        if s.req.echo:
            return
        kept_id, n = self.prefix.match(s.req.prompt_ids)
        if not n:
            return
        s.cache = fork_cache(self.prefix.get(kept_id), n)
        s.pending = list(s.req.prompt_ids[n:])
        s.pos = s.cached = n
        s.cached_from = kept_id
        s.fork = (kept_id, n)

    def _act_entry(self, s: Session, n: int) -> dict:
        """A session's entry in an ACT frame; its first one says which kept cache to fork from."""
        entry = {"id": s.id, "pos": s.pos, "n": n}
        if s.fork is not None and s.pos == s.fork[1]:
            entry["fork"] = {"from": s.fork[0], "n": s.fork[1]}
            s.fork = None
        return entry

    def _keep_or_free(self, s: Session, keep: bool):
        """A session has ended: keep its cache on every stage for the next request, or drop it;
        drop as well whatever the index evicts to make room."""
        cluster = self.stage.hi != self.config.n_layer
        if keep and s.pos > 0 and (self.ring is not None or not cluster):
            tokens = (list(s.req.prompt_ids) + list(s.out_ids))[:s.pos]
            pinned = {o.fork[0] for o in self.sessions.values() if o.fork is not None}
            drop = self.prefix.keep(s.id, tokens, s.cache, pinned)
        else:
            drop = [s.id]
        if drop and self.ring is not None:
            self.ring.free(drop)

    def _apply_cancels(self):
        for sid in list(self._cancel):
            s = self.sessions.get(sid)
            if s is None:
                if sid not in self._queued:     # a waiting one is dropped when _admit reaches it
                    self._cancel.discard(sid)
            elif not s.in_flight:
                self._cancel.discard(sid)
                s.cancelled = True
                self._end(s)

    def _make_batch(self, depth: int):
        ready = [s for s in self.sessions.values() if not s.in_flight and s.pending and not s.finished]
        if not ready:
            return None
        # with a ring of `depth` stages, split the live sessions into about `depth` groups so
        # every stage has a batch to work on
        cap = max(1, math.ceil(len(self.sessions) / depth))
        sessions, counts, rows = [], [], 0
        for s in ready[:cap]:
            n = min(len(s.pending), PREFILL_CHUNK)
            if rows and rows + n > self.max_batch_rows:
                break
            sessions.append(s)
            counts.append(n)
            rows += n
        counts = self._grow_chunks(sessions, counts)
        for s in sessions:
            s.in_flight = True
        return Batch(next(self._batch_ids), sessions, counts, t0=time.perf_counter())

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

    def _front(self, batch: Batch) -> np.ndarray:
        """Rank 0's part before the ring: the first two parts of `model.gpt2`, embed and its blocks
        (`_finish` runs the third, the head, on the rows that come back)."""
        st = self.stage
        parts = list(zip(batch.sessions, batch.counts))                         # (session, its n rows)
        ids = np.concatenate([np.asarray(s.pending[:n], np.int64) for s, n in parts])       # (T,)
        pos = np.concatenate([np.arange(s.pos, s.pos + n) for s, n in parts])                # (T,)
        x = embed(ids, pos, st.wte, st.wpe)                                     # (T, C)
        x = blocks_forward(x, st.blocks, n_head=self.config.n_head,
                           segments=[(s.cache, n) for s, n in zip(batch.sessions, batch.counts)])   # (T, C)
        batch.front_ms = (time.perf_counter() - batch.t0) * 1000
        return x

    def _finish(self, batch: Batch, x: np.ndarray, trace: list):
        """After the last block: head, sample, emit; sessions that are done leave.

        What is done per session (scoring, penalties, sampling, stop strings, detokenizing, emitting)
        cannot fail the batch: an exception there fails that session alone, with a message saying
        what went wrong, and every other session goes on.
        """
        t_back = time.perf_counter()
        if self.ring is not None:
            self._check_finite(batch, x)
        rows, owners = [], []                   # which rows of x need logits, and for whom
        row = 0
        for s, n in zip(batch.sessions, batch.counts):
            last_chunk = n == len(s.pending)
            if s.error is not None:
                pass                            # its rows came back unusable: no logits for it
            elif s.req.echo or last_chunk:   # echo scores every prompt row; otherwise only the last row
                for r in range(row if s.req.echo else row + n - 1, row + n):
                    rows.append(r)
                    owners.append((s, r - row))
            row += n
        t_head = time.perf_counter()
        logits = head(x[rows], self.stage.ln_f, self.stage.lm_head) if rows else None   # (len(rows), V)
        if len(x) == 1 and rows:
            self.decode_ms.append(batch.front_ms + (time.perf_counter() - t_head) * 1000)
        step = step_info(self.stage, batch, trace, t_back) if any(o[0].req.trace for o in owners) else None
        for i, (s, j) in enumerate(owners):
            if s.error is not None:
                continue                        # an earlier row of this session failed
            try:
                self._use_logits(s, j, logits[i], step)                         # logits[i]: (V,)
            except Exception as e:              # whatever it is, it is this session's alone
                self._failed(s, "choosing its next token", e)
        now = time.perf_counter()
        for s, n in zip(batch.sessions, batch.counts):
            s.in_flight = False
            del s.pending[:n]
            s.pos += n
            _add_times(s.node_ms, batch, trace, now, t_back)
            if not s.pending and s.t_prefill_done is None:
                s.t_prefill_done = now
            if s.error is not None:
                self._cancel.discard(s.id)
                self._end(s, error=s.error)
            elif s.finished or s.id in self._cancel:
                s.cancelled = s.id in self._cancel
                self._cancel.discard(s.id)
                self._end(s)

    def _use_logits(self, s: Session, j: int, logits: np.ndarray, step: dict | None):
        """What row j of this step's rows for `s` gives: a scored prompt position (echo), the end of
        scoring, the next token, or nothing (a replayed position). logits: (V,)"""
        p = s.pos + j                       # these logits predict the token at position p + 1
        known = len(s.req.prompt_ids) + len(s.out_ids)
        if p + 1 < len(s.req.prompt_ids):   # inside the prompt: score it (echo), once
            if len(s.prompt_logprobs) == p:
                lse = logsumexp(logits)
                s.prompt_logprobs.append(float(logits[s.req.prompt_ids[p + 1]]) - lse)
                if s.req.top_logprobs:
                    top = most_likely(logits, s.req.top_logprobs)
                    s.prompt_top_logprobs.append([(int(t), float(logits[t]) - lse) for t in top])
        elif p + 1 == known and s.req.score_only:   # the prompt is scored: nothing to generate
            s.finished = True
        elif p + 1 == known:                # the newest token: sample the next one
            self._sample(s, logits, step)
        # else: a replayed position whose next token is already known

    def _check_finite(self, batch: Batch, x: np.ndarray):
        """Rows that came back from the ring as NaN or inf fail their sessions, naming who sent them
        (the ring's last stage; a stage before it may have made them). x: (T, C)"""
        finite = np.isfinite(x).all(axis=1)                                     # (T,)
        if finite.all():
            return
        source = getattr(self.ring, "source", None) or "the ring"
        row = 0
        for s, n in zip(batch.sessions, batch.counts):
            if not finite[row:row + n].all():
                self._failed(s, "reading its activations", None,
                             f"{source} sent non-finite activations (NaN or inf) for this request; check that "
                             "node's weights (and the ones before it in the ring), then retry")
            row += n

    def _failed(self, s: Session, doing: str, e: Exception | None, message: str | None = None):
        """Session `s` failed on its own: it ends when this step does, with a message naming what
        failed (the field, for a DecodingError); the step goes on for the others."""
        if message is None:         # a DecodingError's message names its field already
            detail = str(e) if isinstance(e, DecodingError) else f"{type(e).__name__}: {e}"
            message = f"this request failed while {doing}: {detail}"
        s.error = message
        if self.log is not None:
            self.log(f"session {s.id} failed alone: {message}")

    def _sample(self, s: Session, logits: np.ndarray, step: dict | None = None):
        # penalties and bias change what the strategy sees; the logprobs reported stay the model's
        tok = int(sample(penalize(logits, s.req.params, s.req.prompt_ids, s.out_ids), s.req.params, s.rng))  # (V,)
        lse = logsumexp(logits)             # logprob(t) = logits[t] - lse: no full (V,) log_softmax per token
        s.out_ids.append(tok)
        s.logprobs.append(float(logits[tok]) - lse)
        if s.req.top_logprobs:
            top = most_likely(logits, s.req.top_logprobs)
            s.top_logprobs.append([(int(t), float(logits[t]) - lse) for t in top])
        if s.t_first is None:
            s.t_first = time.perf_counter()
        self.stats["tokens"] += 1
        data = {"id": tok, "logprob": s.logprobs[-1], "index": len(s.out_ids) - 1}
        eot = s.req.stop_at_eot and tok == EOT
        if s.req.text is not None:      # <|endoftext|> that ends the reply is not text
            data["text"] = "" if eot else s.req.text.push(tok)
        if step is not None and s.req.trace:
            data.update(step, top=top_probs(log_softmax(logits), 5))
        _emit(s.req, "token", data)
        stopped = s.req.text is not None and s.req.text.stopped is not None
        if eot or stopped:
            s.finished, s.finish_reason = True, "stop"
        elif len(s.out_ids) >= s.req.params.max_tokens:
            s.finished = True
        else:
            s.pending.append(tok)

    def _end(self, s: Session, error: str | None = None):
        self.sessions.pop(s.id, None)
        s.finished = True
        done = None
        if not error and not s.cancelled:
            try:
                done = result_of(s)     # flushes the held-back text: a bad tokenizer state fails here
            except Exception as e:      # this session's alone
                error = f"this request failed while finishing its reply: {type(e).__name__}: {e}"
        self._keep_or_free(s, keep=not error and not s.cancelled)
        s.cache = None                  # rank 0's copy lives on in self.prefix if it was kept
        if error:
            self.stats["errors"] += 1
            self._emit_safely(s.req, "error", {"error": error})
        elif done is not None:
            self._emit_safely(s.req, "done", done)

    def _emit_safely(self, req: Request, kind: str, data: dict):
        """An event (status, error, done) whose callback may raise: that is said in the log, and the
        scheduler's other sessions are none the worse."""
        try:
            _emit(req, kind, data)
        except Exception as e:          # a broken callback must not stop the scheduler
            if self.log is not None:
                self.log(f"session {req.id}: its {kind} event could not be delivered: {type(e).__name__}: {e}")


def _emit(req: Request, kind: str, data: dict):
    if req.emit is not None:
        req.emit(kind, data)


def _add_times(node_ms: dict, batch: Batch, trace: list, now: float, t_back: float):
    """Accumulate each node's compute and transit time for one session's share of a batch.

    A node's transit is that of the frame it sends on, as `nanopipe trace` shows it (step_info):
    from the end of its compute to the frame's arrival at the next node, on wall clocks. When a
    hop cannot be timed that way (an older worker left out its stamps, or the nodes' clocks
    disagree and a hop comes out negative), the ring's clock-free transit goes to rank 0 alone."""
    r0 = node_ms.setdefault(0, {"compute": 0.0, "transit": 0.0})
    r0["compute"] += batch.front_ms + (now - t_back) * 1000
    remote = 0.0
    for hop in trace:
        t = node_ms.setdefault(hop["rank"], {"compute": 0.0, "transit": 0.0})
        t["compute"] += hop["compute_ms"]
        remote += hop["compute_ms"]
    if trace:
        hops = _hop_transits(batch, trace, t_back)
        if all(ms is not None and ms >= 0 for _, ms in hops):
            for rank, ms in hops:
                node_ms[rank]["transit"] += ms
        else:
            ring_ms = (t_back - batch.t0) * 1000 - batch.front_ms
            r0["transit"] += max(0.0, ring_ms - remote)


def _hop_transits(batch: Batch, trace: list, t_back: float) -> list:
    """[(rank, ms or None)] in ring order: each node's compute end to the next node's frame arrival
    (the last worker's frame arrives back at rank 0 at trace[-1]["t_back"]), as step_info times them."""
    now_wall, now_perf = time.time(), time.perf_counter()
    front_done = now_wall - (now_perf - batch.t0) + batch.front_ms / 1000
    ends = [(0, front_done)] + [(e["rank"], _plus_ms(_number(e.get("t_in")), e["compute_ms"])) for e in trace]
    arrivals = [_number(e.get("t_in")) for e in trace] + [_number(trace[-1].get("t_back"))]
    return [(rank, None if end is None or t is None else (t - end) * 1000)
            for (rank, end), t in zip(ends, arrivals)]


def step_info(stage, batch, trace: list, t_back: float) -> dict:
    """The journey of one batch round the ring, from the scheduler's timings and the workers' trace.

    stage: rank 0's StageWeights; batch: the engine's Batch (t0, front_ms, counts);
    trace: the workers' entries in ring order, each {"rank", "compute_ms", "layers", "bytes_in", "t_in"},
    the last one also {"bytes_out", "t_back"}; t_back: perf_counter() when the batch came back.
    Hop i is node i's compute and the frame it sends on. In one process (no ring, trace == [])
    there is a single hop and nothing goes on a wire.
    """
    now_wall, now_perf = time.time(), time.perf_counter()

    def wall(perf: float) -> float:         # rank 0 times with perf_counter; the workers' stamps are wall clock
        return now_wall - (now_perf - perf)

    rows, C = sum(batch.counts), stage.config.n_embd
    front_done = wall(batch.t0) + batch.front_ms / 1000
    # an older worker leaves out what it does not know: those cells become None ("?" when printed)
    done = [(0, [stage.lo, stage.hi], batch.front_ms, front_done)]          # (rank, layers, ms, when it ended)
    done += [(e["rank"], _span(e.get("layers")), e["compute_ms"], _plus_ms(_number(e.get("t_in")), e["compute_ms"]))
             for e in trace]
    arrived = [(_number(e.get("bytes_in")), _number(e.get("t_in"))) for e in trace]   # (frame bytes, when it came)
    arrived += [(_number(trace[-1].get("bytes_out")), _number(trace[-1].get("t_back")))] if trace else [(0, front_done)]
    # layers: [first, last] inclusive, as every output shows them (partition.first_last)
    hops = [{"rank": rank, "layers": layers and first_last(*layers), "shape": [rows, C], "bytes": nbytes,
             "compute_ms": round(ms, 3),
             "transit_ms": None if t is None or end is None else round((t - end) * 1000, 3)}
            for (rank, layers, ms, end), (nbytes, t) in zip(done, arrived)]
    for hop, e in zip(hops[1:], trace):     # a split stage's first member: of its compute, the all-reduces
        if _number(e.get("reduce_ms")) is not None:
            hop["reduce_ms"] = e["reduce_ms"]
    ring_ms = (t_back - batch.t0) * 1000 - batch.front_ms if trace else 0.0
    return {"hops": hops, "head_ms": round((now_perf - t_back) * 1000, 3),
            "transit_total_ms": round(max(0.0, ring_ms - sum(e["compute_ms"] for e in trace)), 3)}


def _plus_ms(t: float | None, ms: float) -> float | None:
    return None if t is None else t + ms / 1000


def _number(x) -> float | None:
    """A number a worker reported, or None: a bad value (a string, NaN, inf) must not stop the
    scheduler or end up in a JSON answer."""
    return x if is_number(x) and math.isfinite(x) else None


def _span(x) -> list | None:
    return x if isinstance(x, list) and len(x) == 2 and all(_number(v) is not None for v in x) else None


def result_of(s: Session) -> dict:
    """The final stats of a session, shared by the CLI's --json, the client protocol and the web."""
    end = time.perf_counter()
    n = len(s.out_ids)
    prefill_ms = ((s.t_first or end) - s.t_start) * 1000
    decode_s = end - (s.t_first or end)
    out = {
        "id": s.id, "token_ids": list(s.out_ids), "prompt_ids": list(s.req.prompt_ids), "tokens_generated": n,
        "decoding_strategy": s.req.params.strategy, "logprobs": list(s.logprobs),
        "prefill_ms": round(prefill_ms, 3), "ttft_ms": round(prefill_ms, 3),
        "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None,
        "total_ms": round((end - s.t_start) * 1000, 3),
        "finish_reason": s.finish_reason,
        "node_ms": {str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in sorted(s.node_ms.items())},
        "seed": s.req.params.seed,
        "prompt_tokens": len(s.req.prompt_ids), "cached_tokens": s.cached,
        "cached_from": s.cached_from,
    }
    if s.req.top_logprobs:
        out["top_logprobs"] = [[{"id": t, "logprob": lp} for t, lp in pos] for pos in s.top_logprobs]
    if s.req.echo:
        out["prompt_logprobs"] = list(s.prompt_logprobs)
        if s.req.top_logprobs:
            out["prompt_top_logprobs"] = [[{"id": t, "logprob": lp} for t, lp in pos] for pos in s.prompt_top_logprobs]
    if s.req.text is not None:          # the reply's text without a stop string; tail: held back until now
        out["tail"] = s.req.text.flush()
        out["text"] = s.req.text.text
        out["stop"] = s.req.text.stopped
    return out


class Engine:
    """The whole model in one process: the scheduler with no ring.

        eng = Engine.load("weights/gpt2.safetensors")
        eng.generate([15496, 995], SamplingParams("greedy", max_tokens=5))["token_ids"]
    """

    def __init__(self, stage: StageWeights, prefix_cache_bytes: int | None = None):
        if stage.lo != 0 or stage.hi != stage.config.n_layer:
            raise ValueError("an Engine holds the whole model; use load_stage() for a pipeline slice")
        self.stage = stage
        self.config = stage.config
        # finished generations' caches are kept for prompts that start the same way (nanopipe/prefix.py)
        self.scheduler = Scheduler(stage, prefix_cache_bytes=prefix_cache_bytes)

    @classmethod
    def load(cls, path: str, n_head: int | None = None, prefix_cache_bytes: int | None = None) -> "Engine":
        """The whole model from `path`; prefix_cache_bytes=0 turns prefix reuse off (benchmarks
        that must compute every prompt in full, however often they send it)."""
        return cls(load_stage(path, n_head=n_head), prefix_cache_bytes=prefix_cache_bytes)

    def logits(self, ids) -> np.ndarray:
        """Logits at every position of `ids`, through the same cached prefill path: (T, V)."""
        st = self.stage
        cache = KVCache.for_model(self.config, len(st.blocks))
        return gpt2(np.asarray(ids), np.arange(len(ids)), st.wte, st.wpe, st.blocks, st.ln_f, st.lm_head,
                    n_head=self.config.n_head, segments=[(cache, len(ids))])    # (T, V)

    def generate(self, prompt_ids, params: SamplingParams, on_token=None, echo: bool = False,
                 top_logprobs: int = 0, score_only: bool = False, text=None) -> dict:
        """Generate for one prompt; `on_token(id)` is called as each token is sampled. `score_only`:
        score the prompt (echo), generate nothing.

        `text`: a tokenizer.StopStream; one is made when params has stop strings. With one, the
        result also holds "text" (the reply, without the stop string) and "stop" (which one hit).
        """
        params = params.validate()          # stop "x" -> ("x",) before a StopStream reads it
        if text is None and params.stop:
            from .tokenizer import StopStream
            text = StopStream(stops=params.stop)
        box = {}

        def emit(kind, data):
            if kind == "token" and on_token is not None:
                on_token(data["id"])
            elif kind in ("done", "error"):
                box[kind] = data

        self.scheduler.submit(Request(list(prompt_ids), params, emit, echo=echo, top_logprobs=top_logprobs,
                                      score_only=score_only, text=text))
        self.scheduler.run_until_idle()
        if "error" in box:
            raise RuntimeError(box["error"]["error"])
        return box["done"]
