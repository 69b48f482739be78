"""The forward pass as a pipeline sees it: caching, slicing into stages, batching, scheduling.

Each test compares two ways of computing the same thing that must agree:
    one token at a time through the KV cache   ==  the whole sequence at once
    blocks[0:k] then blocks[k:n] (two stages)  ==  blocks[0:n]               (bit for bit)
    two sequences in one batched step          ==  each sequence alone
    the logprob reported for a token           ==  log_softmax of recomputed logits
"""
from __future__ import annotations

import numpy as np
import pytest
from floats import assert_same

from nanopipe import kernels
from nanopipe.decoding import DecodingError, SamplingParams, log_softmax
from nanopipe.engine import EOT, PREFILL_CHUNK, Engine, Request, Scheduler
from nanopipe.model import KVCache, blocks_forward, embed, head
from nanopipe.weights import load_stage


def prompt(n: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


def new_cache(stage) -> KVCache:
    c = stage.config
    return KVCache(len(stage.blocks), c.n_head, c.head_dim, c.n_ctx)


def run_blocks(stage, x, cache):
    return blocks_forward(x, stage.blocks, n_head=stage.config.n_head, segments=[(cache, len(x))])


def embed_at(stage, ids, start: int):
    return embed(np.asarray(ids), np.arange(start, start + len(ids)), stage.wte, stage.wpe)  # (T, C)


# ---------------------------------------------------------------------------------------------
# the KV cache gives the same logits as recomputing everything


def test_cached_decode_equals_full_recomputation(tiny_engine):
    st = tiny_engine.stage
    ids = prompt(12)
    full = tiny_engine.logits(ids)                                      # (T, V)
    cache = new_cache(st)
    for t, token in enumerate(ids):
        x = run_blocks(st, embed_at(st, [token], t), cache)             # (1, C)
        step = head(x, st.ln_f, st.lm_head)[0]                          # (V,)
        diff = float(np.abs(step - full[t]).max())
        assert diff <= 1e-5, f"position {t}: cached logits differ from full recomputation by {diff:.2e}"
    assert cache.length == len(ids)


def test_prefill_then_decode_equals_full_recomputation(tiny_engine):
    st = tiny_engine.stage
    ids = prompt(20, seed=1)
    full = tiny_engine.logits(ids)
    cache = new_cache(st)
    x = run_blocks(st, embed_at(st, ids[:15], 0), cache)                # a 15-row prefill
    np.testing.assert_allclose(head(x, st.ln_f, st.lm_head), full[:15], atol=1e-5)
    for t in range(15, 20):
        x = run_blocks(st, embed_at(st, [ids[t]], t), cache)
        np.testing.assert_allclose(head(x, st.ln_f, st.lm_head)[0], full[t], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a pipeline stage is a slice of the model


@pytest.mark.parametrize("k", [1, 2, 3])
def test_two_stages_equal_the_whole_model_exactly(tiny_weights, k):
    whole = load_stage(tiny_weights)
    front = load_stage(tiny_weights, 0, k)
    back = load_stage(tiny_weights, k, whole.config.n_layer, rank0=False)
    assert not back.has_head and len(back.blocks) == whole.config.n_layer - k
    ids = prompt(9, seed=k)
    c_whole, c_front, c_back = new_cache(whole), new_cache(front), new_cache(back)
    steps = [(ids[:6], 0)] + [([t], 6 + i) for i, t in enumerate(ids[6:])]   # prefill, then 3 decode steps
    for chunk, start in steps:
        x = embed_at(whole, chunk, start)
        want = run_blocks(whole, x, c_whole)
        got = run_blocks(back, run_blocks(front, x, c_front), c_back)
        assert_same(got, want, f"blocks[0:{k}] + blocks[{k}:] run the very calls of blocks[0:n], in the same order")
    assert c_front.length == c_back.length == c_whole.length == len(ids)


@pytest.mark.slow
def test_gpt2_small_shaped_stages_and_cache_agree(small_weights):
    """The same two checks at gpt2-small's real shapes (12 heads of 64): a 5 + 7 split, and caching."""
    whole = Engine.load(small_weights)
    front = load_stage(small_weights, 0, 5)
    back = load_stage(small_weights, 5, 12, rank0=False)
    ids = prompt(10, seed=11)
    full = whole.logits(ids)                                            # (T, V)
    c_front, c_back = new_cache(front), new_cache(back)
    x = run_blocks(back, run_blocks(front, embed_at(front, ids[:7], 0), c_front), c_back)
    got = [head(x, front.ln_f, front.lm_head)]
    for t in range(7, 10):
        x = run_blocks(back, run_blocks(front, embed_at(front, [ids[t]], t), c_front), c_back)
        got.append(head(x, front.ln_f, front.lm_head))
    got = np.concatenate(got)                                           # (T, V)
    diff = float(np.abs(got - full).max())
    print(f"\ngpt2-small shaped: max |two stages, cached - whole, recomputed| = {diff:.2e}")
    assert diff <= 1e-5


# ---------------------------------------------------------------------------------------------
# batching: sequences in one step do not see each other


def test_batched_sessions_equal_each_alone(tiny_engine):
    st = tiny_engine.stage
    a, b = prompt(7, seed=2), prompt(4, seed=3)
    # alone
    ca, cb = new_cache(st), new_cache(st)
    ya = run_blocks(st, embed_at(st, a, 0), ca)
    yb = run_blocks(st, embed_at(st, b, 0), cb)
    # batched: the rows of both prompts in one call, each attending to its own cache
    ba, bb = new_cache(st), new_cache(st)
    x = np.concatenate([embed_at(st, a, 0), embed_at(st, b, 0)])        # (7 + 4, C)
    y = blocks_forward(x, st.blocks, n_head=st.config.n_head, segments=[(ba, 7), (bb, 4)])
    np.testing.assert_allclose(y[:7], ya, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[7:], yb, rtol=1e-5, atol=1e-6)
    assert (ba.length, bb.length) == (7, 4)
    # one decode row each, at different positions
    ya = run_blocks(st, embed_at(st, [11], 7), ca)
    yb = run_blocks(st, embed_at(st, [22], 4), cb)
    x = np.concatenate([embed_at(st, [11], 7), embed_at(st, [22], 4)])
    y = blocks_forward(x, st.blocks, n_head=st.config.n_head, segments=[(ba, 1), (bb, 1)])
    np.testing.assert_allclose(y, np.concatenate([ya, yb]), rtol=1e-5, atol=1e-6)


def test_scheduler_batches_concurrent_requests_without_mixing_them(tiny_engine, monkeypatch):
    monkeypatch.setattr(kernels.kernels, "prefill_rows", PREFILL_CHUNK)   # no spare rows to grow chunks into
    params = SamplingParams("greedy", max_tokens=6)
    prompts = [prompt(5, seed=4), prompt(70, seed=5), prompt(1, seed=6)]   # one longer than PREFILL_CHUNK
    alone = [tiny_engine.generate(p, params)["token_ids"] for p in prompts]
    results, batches = {}, []
    sched = Scheduler(tiny_engine.stage)
    front = sched.batcher.front
    sched.batcher.front = lambda batch: (batches.append(batch.counts), front(batch))[1]   # record each step's rows

    def collector(i):
        def emit(kind, data):
            if kind == "done":
                results[i] = data["token_ids"]
        return emit

    for i, p in enumerate(prompts):
        sched.submit(Request(p, params, collector(i)))
    sched.run_until_idle()
    assert [results[i] for i in range(3)] == alone
    # all three prompts share the first step (the long one's first 64 rows), the rest of the long
    # prompt rides along with the others' first decode rows; then one row per live session
    assert batches == [[5, 64, 1], [1, 6, 1]] + [[1, 1, 1]] * 4 + [[1]]


def record_steps(sched: Scheduler) -> list:
    """Each step's rows per session, as the scheduler batches them."""
    steps, front = [], sched.batcher.front
    sched.batcher.front = lambda batch: (steps.append(list(batch.counts)), front(batch))[1]
    return steps


@pytest.mark.parametrize("prefill_rows", [64, 96, 128])
def test_a_lone_prompt_prefills_in_larger_chunks_and_answers_the_same(tiny_engine, monkeypatch, prefill_rows):
    """With nobody else waiting, a prompt takes up to kernels.prefill_rows rows a step; the answer
    is the one of 64-row chunks (greedy tokens equal, logprobs within float tolerance: other chunks
    are other matmuls)."""
    monkeypatch.setattr(kernels.kernels, "prefill_rows", prefill_rows)
    ids, params = prompt(120, seed=9), SamplingParams("greedy", max_tokens=3)
    sched = Scheduler(tiny_engine.stage)
    steps, box = record_steps(sched), {}
    sched.submit(Request(ids, params, lambda kind, data: box.setdefault(kind, data)))
    sched.run_until_idle()
    first = -(-120 // prefill_rows) * [prefill_rows]
    first[-1] = 120 - prefill_rows * (len(first) - 1)
    assert steps == [[n] for n in first] + [[1], [1]]
    monkeypatch.setattr(kernels.kernels, "prefill_rows", PREFILL_CHUNK)
    want = tiny_engine.generate(ids, params)
    assert box["done"]["token_ids"] == want["token_ids"]
    diff = max(abs(a - b) for a, b in zip(box["done"]["logprobs"], want["logprobs"]))
    assert diff <= 1e-4, f"logprobs, {prefill_rows}-row vs 64-row chunks: largest difference {diff:.2e}"


def test_with_others_waiting_a_prompt_chunk_only_takes_the_spare_rows(tiny_engine, monkeypatch):
    """The fairness guarantee: a step never holds more than max(prefill_rows, what it held before),
    and every live session keeps its rows in every step. Three 2-token prompts and a 120-token one,
    prefill_rows 96: the long prompt gets its 64 rows plus the 26 spare, then the rest."""
    monkeypatch.setattr(kernels.kernels, "prefill_rows", 96)
    params = SamplingParams("greedy", max_tokens=4)
    prompts = [prompt(2, seed=20), prompt(2, seed=21), prompt(2, seed=22), prompt(120, seed=9)]
    sched = Scheduler(tiny_engine.stage)
    steps, done = record_steps(sched), {}
    for i, p in enumerate(prompts):
        sched.submit(Request(p, params, lambda k, d, i=i: k == "done" and done.setdefault(i, d)))
    sched.run_until_idle()
    assert steps == [[2, 2, 2, 90], [1, 1, 1, 30], [1, 1, 1, 1], [1, 1, 1, 1], [1]]
    assert all(sum(s) <= 96 for s in steps)
    alone = [tiny_engine.generate(p, params)["token_ids"] for p in prompts]
    assert [done[i]["token_ids"] for i in range(4)] == alone


# ---------------------------------------------------------------------------------------------
# the scheduler's results


def test_greedy_logprobs_equal_log_softmax_of_recomputed_logits(tiny_engine):
    ids = prompt(6, seed=7)
    out = tiny_engine.generate(ids, SamplingParams("greedy", max_tokens=8))
    gen = out["token_ids"]
    assert out["tokens_generated"] == len(gen) == 8
    lp = log_softmax(tiny_engine.logits(ids + gen))                     # (T, V)
    for i, token in enumerate(gen):
        row = lp[len(ids) - 1 + i]                                      # predicts generated token i
        assert token == int(np.argmax(row))
        assert out["logprobs"][i] == pytest.approx(float(row[token]), abs=1e-5)


def test_echo_scores_every_prompt_token_across_prefill_chunks(tiny_engine):
    ids = prompt(kernels.kernels.prefill_rows + 10, seed=8)              # two prefill chunks, even alone
    out = tiny_engine.generate(ids, SamplingParams("greedy", max_tokens=2), echo=True, top_logprobs=4)
    lp = log_softmax(tiny_engine.logits(ids))
    want = [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    np.testing.assert_allclose(out["prompt_logprobs"], want, atol=1e-5)
    assert out["token_ids"][0] == int(np.argmax(lp[-1]))
    top = out["top_logprobs"]
    assert len(top) == 2 and all(len(pos) == 4 for pos in top)
    assert [pos[0]["id"] for pos in top] == out["token_ids"]
    assert all(pos[i]["logprob"] >= pos[i + 1]["logprob"] for pos in top for i in range(3))


def test_on_token_sees_every_token_in_order(tiny_engine):
    seen = []
    out = tiny_engine.generate(prompt(3), SamplingParams("top_k", max_tokens=5, seed=1), on_token=seen.append)
    assert seen == out["token_ids"] and len(seen) == 5


def test_end_of_text_stops_generation(tiny_weights):
    """Make <|endoftext|> the certain argmax: ln_f outputs all ones, and only EOT's column sums them."""
    st = load_stage(tiny_weights)
    st.ln_f = {"g": np.zeros_like(st.ln_f["g"]), "b": np.ones_like(st.ln_f["b"])}
    st.lm_head = np.zeros_like(st.lm_head)
    st.lm_head[EOT, :] = 1.0                # (V, C): row EOT
    out = Engine(st).generate([1, 2, 3], SamplingParams("greedy", max_tokens=10))
    assert out["token_ids"] == [EOT] and out["finish_reason"] == "stop"


@pytest.mark.parametrize("prompt_ids, params, match", [
    ([], SamplingParams("greedy"), "prompt is empty"),
    ([1, 2], SamplingParams("greedy", max_tokens=127), r"max_tokens.*n_ctx=128"),
    ([1, 50257], SamplingParams("greedy"), r"token ids must be in 0\.\.50256"),
    ([1, 2], SamplingParams("nope"), "strategy: must be one of"),
])
def test_scheduler_validation(tiny_engine, prompt_ids, params, match):
    with pytest.raises(DecodingError, match=match):
        tiny_engine.generate(prompt_ids, params)
    assert not tiny_engine.scheduler.busy, "a refused request must not be queued"


def test_prompt_plus_max_tokens_may_fill_the_context_exactly(tiny_engine):
    out = tiny_engine.generate(prompt(120), SamplingParams("greedy", max_tokens=8))
    assert out["tokens_generated"] == 8


def test_engine_refuses_a_slice_and_scheduler_needs_the_head(tiny_weights):
    with pytest.raises(ValueError, match="whole model"):
        Engine(load_stage(tiny_weights, 0, 2))
    with pytest.raises(ValueError, match="rank 0"):
        Scheduler(load_stage(tiny_weights, 1, 4, rank0=False))


def test_result_has_timings(tiny_engine):
    out = tiny_engine.generate(prompt(4), SamplingParams("greedy", max_tokens=4))
    assert out["prefill_ms"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["finish_reason"] == "length" and out["decoding_strategy"] == "greedy"


# ---------------------------------------------------------------------------------------------
# the per-token logprob helpers the scheduler uses instead of a full log_softmax


def test_logsumexp_gives_log_softmax():
    from nanopipe.decoding import logsumexp
    assert logsumexp(np.array([2.0, 1.0, 0.0], np.float32)) == pytest.approx(2.40760596, abs=1e-6)
    logits = np.random.default_rng(9).standard_normal(50257).astype(np.float32) * 5
    np.testing.assert_allclose(logits - logsumexp(logits), log_softmax(logits), atol=1e-6)


def test_most_likely_equals_a_stable_sort_even_with_ties():
    from nanopipe.decoding import most_likely
    assert most_likely(np.array([0.1, 3.0, 2.0, 3.0]), 3).tolist() == [1, 3, 2]
    assert most_likely(np.array([0.1, 3.0, 2.0, 3.0]), 1).tolist() == [1]
    rng = np.random.default_rng(10)
    logits = rng.integers(0, 20, 500).astype(np.float32)           # many ties
    for k in (1, 5, 37, 500, 600):
        assert most_likely(logits, k).tolist() == np.argsort(-logits, kind="stable")[:k].tolist()


def test_params_are_validated_copies_before_they_run(tiny_engine):
    # a dict logit_bias (as JSON gives it) and a str stop are normalized by validate(); the engine
    # runs the validated copy, so callers may pass SamplingParams as they built them
    params = SamplingParams("greedy", max_tokens=3, logit_bias={"13": -100}, stop=None)
    ids = tiny_engine.generate([15496, 995], params)["token_ids"]
    assert 13 not in ids and len(ids) == 3


def test_run_forever_steps_only_while_ready_and_hands_errors_to_the_hook(tiny_engine):
    """The leader runs Scheduler.run_forever itself: `ready` gates the steps (its ring is up), and an
    exception in a step goes to `on_error` while the loop carries on."""
    import threading

    sch = Scheduler(tiny_engine.stage)
    ready, errors, steps = threading.Event(), [], []
    real_step = sch.step

    def step():
        steps.append(ready.is_set())
        if len(steps) == 1:
            raise RuntimeError("a bug in a step")
        return real_step()

    sch.step = step
    loop = threading.Thread(target=sch.run_forever, kwargs={"ready": ready, "on_error": errors.append}, daemon=True)
    loop.start()
    done = threading.Event()
    sch.submit(Request(prompt(3), SamplingParams(strategy="greedy", max_tokens=2),
                       emit=lambda kind, data: kind in ("done", "error") and done.set()))
    assert not done.wait(0.3) and steps == [], "no step may run before `ready` is set"
    ready.set()
    assert done.wait(30), "the loop did not finish the request after the failed step"
    sch.stop()
    loop.join(5)
    assert not loop.is_alive(), "stop() ends run_forever"
    assert [str(e) for e in errors] == ["a bug in a step"] and all(steps)
