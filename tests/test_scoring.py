"""Scoring-only requests (echo + max_tokens 0) as evaluation harnesses use them, against transformers.

A harness scores a multiple-choice answer or a perplexity window by sending context + continuation
as one prompt with echo, max_tokens 0 and logprobs 1, then

    score     = sum of token_logprobs over the continuation's positions
    is_greedy = at every continuation position the top-1 alternative is the token itself

Here the engine answers such requests (batched together, as the leader batches them) on the golden
model of tests/golden, and both numbers are checked against what transformers computed
(tiny_golden.npz holds its logits at every prompt position): sums within 1e-4, flags identical.
tests/parity/test_parity_live.py repeats this live against transformers itself.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import GOLDEN_CASES as CASES
from helpers import HF_DIR

from nanopipe.decoding import DecodingError, SamplingParams, log_softmax
from nanopipe.engine import Engine, Request

ATOL = 1e-4
# (golden case, context length): the rest of that golden prompt is the continuation
PAIRS = [(1, 3), (2, 12), (2, 19), (3, 1), (3, 70)]
SCORE = SamplingParams("greedy", max_tokens=1)      # max_tokens is not used: score_only generates nothing


@pytest.fixture(scope="module")
def engine():
    return Engine.load(str(HF_DIR / "model.safetensors"))


def score_batch(engine: Engine, prompts: list, top: int = 1) -> list:
    """Submit every prompt as one batch of scoring-only requests; their results, in order."""
    box: dict = {}
    reqs = []
    for i, ids in enumerate(prompts):
        def emit(kind, data, i=i):
            box.setdefault(i, []).append((kind, data))
        reqs.append(Request(list(ids), SCORE, emit, echo=True, top_logprobs=top, score_only=True))
    sch = engine.scheduler
    sch.submit_many(reqs)
    sch.step()
    live_after_first_step = len(sch.sessions) + sum(1 for i in box if box[i][-1][0] == "done")
    sch.run_until_idle()
    assert live_after_first_step == len(prompts), "the batch was not admitted in one step"
    out = []
    for i in range(len(prompts)):
        kinds = [k for k, _ in box[i]]
        assert kinds == ["done"], f"prompt {i}: a scoring-only request emitted {kinds} (no token may be sampled)"
        out.append(box[i][0][1])
    return out


def harness_numbers(result: dict, n_context: int) -> tuple:
    """(summed continuation logprob, is_greedy) from a scoring result, as a harness computes them.
    prompt_logprobs[j] is the logprob of prompt token j + 1 (token 0 has none)."""
    ids = result["prompt_ids"]
    positions = range(n_context - 1, len(ids) - 1)
    score = sum(result["prompt_logprobs"][j] for j in positions)
    greedy = all(result["prompt_top_logprobs"][j][0]["id"] == ids[j + 1] for j in positions)
    return score, greedy


def reference_numbers(logits: np.ndarray, ids: list, n_context: int) -> tuple:
    """The same two numbers from transformers' logits (T, V) at every position of `ids`."""
    lp = log_softmax(logits)                                                    # (T, V) float64
    positions = range(n_context - 1, len(ids) - 1)
    return (float(sum(lp[j, ids[j + 1]] for j in positions)),
            all(int(np.argmax(logits[j])) == ids[j + 1] for j in positions))


def test_scoring_matches_transformers_sums_and_greedy_flags(engine):
    results = score_batch(engine, [CASES[c][0] for c, _ in PAIRS])
    worst = 0.0
    for (case, n_ctx), result in zip(PAIRS, results):
        ids, logits, _ = CASES[case]
        assert result["token_ids"] == [] and result["prompt_ids"] == ids
        got, got_greedy = harness_numbers(result, n_ctx)
        want, want_greedy = reference_numbers(logits, ids, n_ctx)
        diff = abs(got - want)
        worst = max(worst, diff)
        print(f"case {case} context {n_ctx}/{len(ids)}: sum {got:.6f} vs transformers {want:.6f} (diff {diff:.2e}); "
              f"greedy {got_greedy} vs {want_greedy}")
        assert diff <= ATOL, f"case {case}: continuation logprob {got} vs transformers {want}, diff {diff:.2e}"
        assert got_greedy == want_greedy, f"case {case}: greedy flag {got_greedy} vs transformers {want_greedy}"
    print(f"largest difference of a summed continuation logprob: {worst:.2e}")


def test_transformers_greedy_continuation_scores_as_greedy(engine):
    """transformers' own greedy continuation (the golden `generate` output) must come out is_greedy;
    the same continuation with one token changed must not."""
    prompts, contexts = [], []
    for ids, _, greedy in CASES[1:3]:
        prompts.append(ids + greedy[:6])
        changed = list(greedy[:6])
        changed[3] = (changed[3] + 1) % 1000
        prompts.append(ids + changed)
        contexts += [len(ids), len(ids)]
    flags = [harness_numbers(r, c)[1] for r, c in zip(score_batch(engine, prompts), contexts)]
    assert flags == [True, False, True, False]


def test_every_scored_position_carries_its_top_k(engine):
    ids, logits, _ = CASES[2]
    result = score_batch(engine, [ids], top=3)[0]
    assert len(result["prompt_logprobs"]) == len(result["prompt_top_logprobs"]) == len(ids) - 1
    lp = log_softmax(logits)
    worst = 0.0
    for j, top in enumerate(result["prompt_top_logprobs"]):
        want = np.argsort(-logits[j], kind="stable")[:3]
        assert [t["id"] for t in top] == want.tolist(), f"position {j}: top-3 ids differ from transformers'"
        worst = max(worst, max(abs(t["logprob"] - lp[j, t["id"]]) for t in top))
    print(f"largest top-3 logprob difference: {worst:.2e}")
    assert worst <= ATOL


def test_a_one_token_prompt_scores_to_nothing_and_generates_nothing(engine):
    result = score_batch(engine, [[7]])[0]
    assert result["token_ids"] == [] and result["prompt_logprobs"] == [] and result["finish_reason"] == "length"


def test_batched_scoring_equals_scoring_one_at_a_time(engine):
    """Batching changes which rows share a matmul, not the answer (up to float rounding)."""
    prompts = [CASES[c][0] for c, _ in PAIRS]
    together = score_batch(engine, prompts)
    worst = 0.0
    for ids, r in zip(prompts, together):
        alone = engine.generate(ids, SCORE, echo=True, top_logprobs=1, score_only=True)
        worst = max(worst, float(np.max(np.abs(np.subtract(alone["prompt_logprobs"], r["prompt_logprobs"])))))
    print(f"largest difference batched vs alone: {worst:.2e}")
    assert worst <= 1e-5


def test_scoring_may_fill_the_whole_context_but_not_more(engine):
    """Nothing is generated, so a window of exactly n_ctx tokens can be scored (harnesses send
    max_length windows); one token more is refused before anything runs."""
    n_ctx = engine.config.n_ctx
    ids = (CASES[3][0] * 2)[:n_ctx]
    result = score_batch(engine, [ids])[0]
    assert len(result["prompt_logprobs"]) == n_ctx - 1
    with pytest.raises(DecodingError, match=f"do not fit the context of n_ctx={n_ctx}"):
        engine.scheduler.submit_many([Request(ids, SCORE, echo=True, score_only=True),
                                      Request(ids + [1], SCORE, echo=True, score_only=True)])
    assert engine.scheduler.waiting.empty(), "a batch with one bad request must queue none of them"
