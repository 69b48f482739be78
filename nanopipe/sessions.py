"""One session's life on rank 0: what a request is, what each of its rows gives, and its final result.

    Request (prompt, SamplingParams, where events go)  --admitted-->  Session (its cache, rng, pending rows)
    each step, for the rows of a session that need logits: use_logits -> a scored prompt position
        (echo), or sample_next -> the next token, emitted ("token"); a stop ends it
    at the end: result_of(session) -> the stats every caller shows ("done")

The scheduler (engine.py) decides which sessions step together; everything here concerns one
session at a time, plus the timings of one batch's trip round the ring (step_info, add_times).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .decoding import (
    EOT,
    STRATEGIES,
    SamplingParams,
    greedy,
    is_number,
    log_softmax,
    logsumexp,
    most_likely,
    penalize,
    penalized,
    sample,
    top_probs,
)
from .model import KVCache
from .partition import first_last
from .prefix import fork_cache


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


def use_logits(s: Session, j: int, logits: np.ndarray, step: dict | None, counted=lambda: None):
    """What row j of this step's rows for `s` gives: a scored prompt position (echo), the end of
    scoring, the next token, or nothing (a replayed position). logits: (V,); `counted()` is called
    for each token sampled, before it is emitted (the scheduler's count)."""
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
        sample_next(s, logits, step, counted)
    # else: a replayed position whose next token is already known


def sample_next(s: Session, logits: np.ndarray, step: dict | None = None, counted=lambda: None):
    """Sample `s`'s next token from the model's logits (V,) after its penalties, record its logprob (and
    top K), emit it, and note whether the session is done (end of text, a stop string, max_tokens)."""
    # penalties and bias change what the strategy sees; the logprobs reported stay the model's
    tok = int(sample(penalize(logits, s.req.params, s.req.prompt_ids, s.out_ids), s.req.params, s.rng))  # (V,)
    lse = logsumexp(logits)             # logprob(t) = logits[t] - lse: no full (V,) log_softmax per token
    if s.req.top_logprobs:
        top = most_likely(logits, s.req.top_logprobs)
        s.top_logprobs.append([(int(t), float(logits[t]) - lse) for t in top])
    extra = dict(step, top=top_probs(log_softmax(logits), 5)) if step is not None and s.req.trace else {}
    take_token(s, tok, float(logits[tok]) - lse, extra, counted)


def takes_argmax(s: Session) -> bool:
    """Does `s` need no more of a row of logits than its argmax and that token's logprob? Greedy
    (the built-in one), no penalty or logit_bias (decoding.penalized), and nothing reported but the
    token's logprob: no echo, score_only, top_logprobs or trace. Then a last split stage may send the
    row's top (max, argmax, logsumexp) instead of its logits (use_top; cluster/group.py)."""
    r = s.req
    return (STRATEGIES.get(r.params.strategy) is greedy and not penalized(r.params)
            and not (r.echo or r.score_only or r.top_logprobs or r.trace))


def use_top(s: Session, j: int, tok: int, logprob: float, counted=lambda: None):
    """use_logits for a session that takes_argmax, given row j's argmax `tok` and its logprob (the
    row's max minus its logsumexp) instead of the row: the next token, or nothing (a replayed position)."""
    if s.pos + j + 1 == len(s.req.prompt_ids) + len(s.out_ids):
        take_token(s, tok, logprob, {}, counted)


def take_token(s: Session, tok: int, logprob: float, extra: dict, counted=lambda: None):
    """Record `s`'s next token and its logprob, emit it (with `extra` in the event), and note
    whether the session is done (end of text, a stop string, max_tokens)."""
    s.out_ids.append(tok)
    s.logprobs.append(logprob)
    if s.t_first is None:
        s.t_first = time.perf_counter()
    counted()
    data = {"id": tok, "logprob": s.logprobs[-1], "index": len(s.out_ids) - 1}
    eot = s.req.stop_at_eot and tok == EOT
    if s.req.text is not None:      # <|endoftext|> that ends the reply is not text
        data["text"] = "" if eot else s.req.text.push(tok)
    data.update(extra)
    emit(s.req, "token", data)
    stopped = s.req.text is not None and s.req.text.stopped is not None
    if eot or stopped:
        s.finished, s.finish_reason = True, "stop"
    elif len(s.out_ids) >= s.req.params.max_tokens:
        s.finished = True
    else:
        s.pending.append(tok)


def start_from_kept(s: Session, index):
    """Start `s` from the longest kept prefix of its prompt in `index` (prefix.PrefixCache), if any
    (echo scores every prompt position, so it always prefills in full)."""
    if s.req.echo:
        return
    kept_id, n = index.match(s.req.prompt_ids)
    if not n:
        return
    s.cache = fork_cache(index.get(kept_id), n)
    s.pending = list(s.req.prompt_ids[n:])
    s.pos = s.cached = n
    s.cached_from = kept_id
    s.fork = (kept_id, n)

def act_entry(s: Session, n: int) -> dict:
    """A session's entry in an ACT frame; its first one says which kept cache to fork from."""
    entry = {"id": s.id, "pos": s.pos, "n": n}
    if s.fork is not None and s.pos == s.fork[1]:
        entry["fork"] = {"from": s.fork[0], "n": s.fork[1]}
        s.fork = None
    return entry


def emit(req: Request, kind: str, data: dict):
    """Send one event of a request to whoever asked (its `emit` callback), if anyone."""
    if req.emit is not None:
        req.emit(kind, data)


def emit_safely(req: Request, kind: str, data: dict, log=None):
    """An event (status, error, done) whose callback may raise: that is said in `log`, and the
    scheduler's other sessions are none the worse."""
    try:
        emit(req, kind, data)
    except Exception as e:          # a broken callback must not stop the scheduler
        if log is not None:
            log(f"session {req.id}: its {kind} event could not be delivered: {type(e).__name__}: {e}")


def add_times(node_ms: dict, batch: Batch, trace: list, now: float, t_back: float):
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
        hops = hop_transits(batch, trace, t_back)
        if all(ms is not None and ms >= 0 for _, ms in hops):
            for rank, ms in hops:
                node_ms[rank]["transit"] += ms
        else:
            ring_ms = (t_back - batch.t0) * 1000 - batch.front_ms
            r0["transit"] += max(0.0, ring_ms - remote)


def hop_transits(batch: Batch, trace: list, t_back: float) -> list:
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
