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

The scheduler is the loop; its parts each own one concern:

    admission.py  Admission   requests checked once, waiting, cancelled before they ran
    batching.py   Batcher     which rows step together; rank 0's compute before and after the ring
    sessions.py   (functions) one session: its rows' logits, sampling, its result and timings
    prefix.py     PrefixCache the kept caches a new request may start from
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .admission import Admission
from .batching import PREFILL_CHUNK, Batcher
from .decoding import EOT, SamplingParams, make_rng
from .kernels import PREFILL_CANDIDATES, choose_gemv_rows, choose_head_rows, choose_prefill_rows
from .model import KVCache, blocks_forward, gpt2
from .prefix import PrefixCache, default_prefix_cache_bytes
from .sessions import (
    Batch,
    Request,
    Session,
    act_entry,
    emit_safely,
    result_of,
    start_from_kept,
)
from .weights import StageWeights, load_stage

__all__ = ["EOT", "Engine", "PREFILL_CHUNK", "Request", "Scheduler", "prefill_step"]



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

    It owns the live sessions, the batches in flight on the ring, the counters (`stats`), the
    index of kept caches (`prefix`), and the loop: admit from `admission`, step the batches
    `batcher` forms, end what is done, and recover when the ring breaks (interrupt, replay_all,
    fail_all).

    `stage` is rank 0's StageWeights (with embeddings and head). `ring`, when given, carries the
    activations through the workers: ring.send(batch_id, sessions_meta, x), ring.recv() ->
    (batch_id, x, trace), ring.free(ids); `ring.depth` is how many batches may be in flight.
    """

    def __init__(self, stage: StageWeights, ring=None, max_sessions: int = 16, max_batch_rows: int = 256,
                 prefix_cache_bytes: int | None = None, log=None):
        """`log(message)`: where a session that failed on its own (see _finish) is reported, besides
        its caller; None: nowhere else."""
        self.ring, self.log, self.max_sessions = ring, log, max_sessions
        self.sessions: dict = {}
        self.in_flight: dict = {}
        self._wake, self._stop, self.lock = threading.Event(), threading.Event(), threading.RLock()
        # max_live: the most sessions ever live at once (requests batched together show up here)
        # cancelled_waiting: requests cancelled before they were admitted (they never ran)
        self.stats = {"requests": 0, "tokens": 0, "errors": 0, "max_in_flight": 0, "max_live": 0,
                      "prompt_tokens_cached": 0, "prompt_tokens_computed": 0, "cancelled_waiting": 0}
        self.admission = Admission(stage.config, self.stats, wake=self._wake.set)   # the requests that wait
        self.batcher = Batcher(stage, None, max_batch_rows, log=log)                # which rows step together
        self._take_stage(stage, default_prefix_cache_bytes() if prefix_cache_bytes is None else prefix_cache_bytes)

    def _take_stage(self, stage: StageWeights, budget: int):
        """Run on `stage`: its kernels, chosen once per process before the first step (nanopipe/kernels.py:
        model.linear's, then a lone prompt's chunk, then the head's), and an empty index of kept
        caches: rank 0's stage only, until the leader adds its workers' (set_prefix_stages)."""
        if not stage.has_head:
            raise ValueError("the scheduler runs on rank 0, whose stage must hold wte, wpe, ln_f and the head")
        self.stage, self.config = stage, stage.config
        choose_gemv_rows(stage.blocks)
        self.kernels = choose_prefill_rows(prefill_step(stage.blocks, stage.config.n_head))
        if stage.lm_head is not None:
            choose_head_rows(stage.lm_head)
        self.admission.config = stage.config
        self.batcher.stage, self.batcher.kernels = stage, self.kernels
        self.prefix = PrefixCache([(self.position_bytes(len(stage.blocks)), budget)])

    # -- requests in ------------------------------------------------------------------------

    def check(self, req: Request):
        """Validate a request before it is queued; raises DecodingError with a clear message."""
        self.admission.check(req)

    def submit(self, req: Request, checked: bool = False) -> str:
        """Queue `req` (checked first, unless the caller has just done so: `check`); returns its id."""
        return self.admission.submit(req, checked)

    def submit_many(self, reqs: list) -> list:
        """Submit several requests as one batch: all are checked first (one bad request refuses them
        all), then queued while no step runs, so the next step admits them together (up to
        max_sessions) and they run as concurrent sessions, never one after another."""
        for req in reqs:
            self.check(req)
        with self.lock:
            return [self.submit(req, checked=True) for req in reqs]

    def cancel(self, session_id: str):
        """Stop a generation (its client went away); its caches are freed at every stage. A request
        still waiting to be admitted is dropped when its turn comes, without running."""
        self.admission.cancel(session_id)

    @property
    def decode_ms(self):
        """Rank 0's own ms (embed, its blocks, the head) of recent one-row decode steps (Batcher.back)."""
        return self.batcher.decode_ms

    @property
    def waiting(self):
        """The requests not admitted yet (a queue.SimpleQueue: qsize(), empty())."""
        return self.admission.waiting

    def use_stage(self, stage: StageWeights):
        """Run on other blocks from now on (the leader's plan moved rank 0's share): kernels are chosen
        for them, kept caches are dropped, and every live session replays from its tokens. Requests
        waiting, cancels and session ids carry on: nothing queued is lost or renamed."""
        with self.lock:
            self._take_stage(stage, self.prefix.stages[0][1])
            self.batcher.decode_ms.clear()      # times of the old blocks
            self.replay_all()

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
            batch = self.batcher.make(self.sessions, depth)
            if batch is None:
                break
            x = self.batcher.front(batch)                                       # (T, C)
            did = True
            if self.ring is None:
                self._finish(batch, x, [])
                break                       # one batch a step: new requests join, and the lock comes free
            else:
                self.in_flight[batch.id] = batch
                sessions = [act_entry(s, n) for s, n in zip(batch.sessions, batch.counts)]
                self.ring.send(batch.id, sessions, x, logits=self.batcher.logit_rows(batch),   # (T, C) to rank 1
                               greedy=self.batcher.greedy(batch))
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
                emit_safely(s.req, "status", {"text": message}, self.log)

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
            for req in self.admission.drop_all():
                self.stats["errors"] += 1
                emit_safely(req, "error", {"error": message}, self.log)

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
        while len(self.sessions) < self.max_sessions:
            req = self.admission.take()
            if req is None:
                break
            s = Session(req, self._new_cache(), make_rng(req.params.seed), list(req.prompt_ids),
                        t_start=time.perf_counter())
            start_from_kept(s, self.prefix)
            self.sessions[req.id] = s
            self.stats["requests"] += 1
            self.stats["prompt_tokens_cached"] += s.cached
            self.stats["prompt_tokens_computed"] += len(req.prompt_ids) - s.cached
        self.stats["max_live"] = max(self.stats["max_live"], len(self.sessions))

    # -- prefix reuse (nanopipe/prefix.py): the index lives here, the stages obey ------------

    def position_bytes(self, n_layers: int) -> int:
        """Bytes one cached position takes on a stage of n_layers blocks: k and v, float32."""
        return n_layers * 2 * self.config.n_embd * 4

    def set_prefix_stages(self, stages: list):
        """The ring's stages, rank 0 first: (n_layers, budget_bytes) each. Forgets what was kept."""
        with self.lock:
            self.prefix.clear()
            self.prefix.stages = [(self.position_bytes(n), budget) for n, budget in stages]

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
        adm = self.admission
        for sid in list(adm.cancels):
            s = self.sessions.get(sid)
            if s is None:
                if sid not in adm.queued:       # a waiting one is dropped when _admit reaches it
                    adm.forget_cancel(sid)
            elif not s.in_flight:
                adm.forget_cancel(sid)
                s.cancelled = True
                self._end(s)

    def _finish(self, batch: Batch, x: np.ndarray, trace: list):
        """After the last block: head, sample, emit (Batcher.back); sessions that are done leave."""
        source = None if self.ring is None else getattr(self.ring, "source", None) or "the ring"
        self.batcher.back(batch, x, trace, source=source, counted=self._count_token)
        adm = self.admission
        for s in batch.sessions:
            if s.error is not None:
                adm.forget_cancel(s.id)
                self._end(s, error=s.error)
            elif s.finished or adm.cancelled(s.id):
                s.cancelled = adm.cancelled(s.id)
                adm.forget_cancel(s.id)
                self._end(s)

    def _count_token(self):
        self.stats["tokens"] += 1

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
            emit_safely(s.req, "error", {"error": error}, self.log)
        elif done is not None:
            emit_safely(s.req, "done", done, self.log)



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
        that must compute every prompt in full, however often they send it). The process's memory
        orders are decided first (kernels.choose_layout), then its kernels on the loaded weights."""
        return cls(load_stage(path, n_head=n_head, choose_order=True), prefix_cache_bytes=prefix_cache_bytes)

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
        box = {}

        def emit(kind, data):
            if kind == "token" and on_token is not None:
                on_token(data["id"])
            elif kind in ("done", "error"):
                box[kind] = data

        req = Request(list(prompt_ids), params, emit, echo=echo, top_logprobs=top_logprobs, score_only=score_only)
        self.scheduler.check(req)           # once: stop "x" -> ("x",) before a StopStream reads it
        if text is None and req.params.stop:
            from .tokenizer import StopStream
            text = StopStream(stops=req.params.stop)
        req.text = text
        self.scheduler.submit(req, checked=True)
        self.scheduler.run_until_idle()
        if "error" in box:
            raise RuntimeError(box["error"]["error"])
        return box["done"]
