"""The official `openai` Python package against `nanopipe web` in front of a live local cluster.

What evaluation harnesses and OpenAI clients send first: a batch of token-id prompts scored with
echo + logprobs (max_tokens 0, and 1), n choices with a seed, a streamed batch, an unknown model.
Answers are checked against the single process (nanopipe.engine.Engine on the same weights): the
cluster runs the same functions, but batches other rows into each matmul, so logprobs compare with
a tolerance (printed) and tokens exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the `openai` package is in the test extra: pip install -e '.[test]'")

from helpers import status  # noqa: E402

from nanopipe.decoding import SamplingParams  # noqa: E402
from nanopipe.engine import EOT  # noqa: E402
from nanopipe.tokenizer import get_tokenizer  # noqa: E402
from nanopipe.web.app import create_app, settings_from_configs  # noqa: E402
from nanopipe.web.server import WebServer  # noqa: E402

PROMPTS = [[15496, 995, 11, 616], [464, 3290, 318], [40, 588, 257, 1310, 286]]
LP_TOL = 1e-5       # cluster vs one process: same functions, different batch rows per matmul


@pytest.fixture(scope="module")
def api(cluster):
    """An OpenAI client talking HTTP to the web app, which talks to the cluster's leader."""
    app = create_app(settings_from_configs(cluster.config_dir, leader=cluster.leader_addr))
    server = WebServer(app, "127.0.0.1", 0).start()        # what `nanopipe web` serves with
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                            timeout=60)
    finally:
        server.stop()


def max_live(cluster) -> int:
    return status(cluster)["max_live_sessions"]


def test_models_lists_the_config_name_then_the_hub_name(api):
    assert [m.id for m in api.models.list().data] == ["local", "synthetic"]


def test_an_unknown_model_raises_not_found(api):
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="no-such-model", prompt="Hello", max_tokens=1)
    assert e.value.code == "model_not_found" and "no-such-model" in e.value.message


def test_score_a_batch_of_token_id_prompts_with_max_tokens_0(api, tiny_engine):
    r = api.completions.create(model="local", prompt=PROMPTS, echo=True, logprobs=2, max_tokens=0, temperature=0)
    assert r.model == "local" and [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(map(len, PROMPTS)) and r.usage.completion_tokens == 0
    tok = get_tokenizer()
    worst = 0.0
    for ids, choice in zip(PROMPTS, r.choices):
        want = tiny_engine.generate(ids, SamplingParams("greedy", max_tokens=1), echo=True, top_logprobs=2,
                                    score_only=True)
        lp = choice.logprobs
        assert choice.text == tok.decode(ids) and lp.tokens == tok.pieces(ids), "the prompt, and nothing more"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None      # nothing came before token 0
        worst = max(worst, float(np.max(np.abs(np.subtract(lp.token_logprobs[1:], want["prompt_logprobs"])))))
        for top, want_top in zip(lp.top_logprobs[1:], want["prompt_top_logprobs"]):
            assert list(top) == tok.pieces([t["id"] for t in want_top]), "top-2 alternatives, most likely first"
    print(f"largest logprob difference, cluster vs one process: {worst:.2e}")
    assert worst <= LP_TOL


def test_score_with_max_tokens_1_adds_the_greedy_token(api, tiny_engine):
    r = api.completions.create(model="synthetic", prompt=PROMPTS, echo=True, logprobs=1, max_tokens=1,
                               temperature=0)
    assert r.model == "local" and r.usage.completion_tokens == len(PROMPTS)
    tok = get_tokenizer()
    for ids, choice in zip(PROMPTS, r.choices):
        want = tiny_engine.generate(ids, SamplingParams("greedy", max_tokens=1), echo=True, top_logprobs=1)
        lp = choice.logprobs
        assert lp.tokens == tok.pieces(ids + want["token_ids"]) and len(lp.top_logprobs) == len(ids) + 1
        assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:]), \
            "every prompt position after the first carries its top alternative"
        assert abs(lp.token_logprobs[-1] - want["logprobs"][0]) <= LP_TOL
        assert list(lp.top_logprobs[-1]) == tok.pieces(want["token_ids"])      # greedy: the top-1 is the token


def test_a_batch_runs_as_concurrent_sessions_of_one_scheduler(api, cluster):
    """12 prompts in one request: the leader admits them all in the same scheduler step, so 12
    sessions are live at once (one after another, never more than one would be)."""
    prompts = [[15496 + i, 995, 11] for i in range(12)]
    before = max_live(cluster)
    assert before < 12, f"precondition: an earlier test already had {before} sessions live at once"
    r = api.completions.create(model="local", prompt=prompts, echo=True, logprobs=1, max_tokens=0)
    assert len(r.choices) == 12
    assert max_live(cluster) >= 12


def test_n_3_with_a_seed_is_reproducible_and_each_choice_uses_seed_plus_its_index(api, tiny_engine):
    ask = dict(model="local", prompt="Hello, I'm a language model,", n=3, seed=7, temperature=0.9, max_tokens=8)
    first, again = api.completions.create(**ask), api.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1, f"three samples of a 50257-token distribution came out identical: {texts}"
    tok = get_tokenizer()
    ids = tok.encode(ask["prompt"])
    sampled = 0
    for j, text in enumerate(texts):
        out = tiny_engine.generate(ids, SamplingParams("sampling", temperature=0.9, max_tokens=8, seed=7 + j))
        assert text == tok.decode([t for t in out["token_ids"] if t != EOT]), f"choice {j} vs seed {7 + j}"
        sampled += len(out["token_ids"])
    assert first.usage.prompt_tokens == len(ids) and first.usage.completion_tokens == sampled


def test_a_streamed_batch_carries_each_choice_index_and_the_usage(api):
    prompts = ["Hello", "The three small computers"]
    whole = api.completions.create(model="local", prompt=prompts, max_tokens=5, temperature=0)
    want = [c.text for c in whole.choices]
    chunks = list(api.completions.create(model="local", prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    got = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            got[c.index] += c.text
    assert [got[0], got[1]] == want
    # the same counts; the streamed request came second, so it may reuse the first one's prompt caches
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens_details.cached_tokens
    finals = [(c.index, c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert [i for i, _ in finals] == [0, 1]


# Stop strings and penalties in batches: every choice applies them itself, as one request would.

# top_k (an extension: extra_body) 3: the tiny model repeats itself, so a penalty shows
STOP_ASK = dict(temperature=0.9, max_tokens=12, seed=11, extra_body={"top_k": 3})


def one_process(tiny_engine, ids: list, seed: int, **fields) -> dict:
    """The single process's run of one choice: same params, the choice's derived seed."""
    params = SamplingParams("top_k", temperature=0.9, top_k=3, max_tokens=12, seed=seed, **fields)
    return tiny_engine.generate(ids, params)


def pick_stop(tiny_engine, ids: list, seed: int) -> str:
    """A stop string the choice (ids, seed) really meets: the middle of a token past the first two
    (so the text before it streams, and the stop begins inside a token's text)."""
    tok = get_tokenizer()
    out = one_process(tiny_engine, ids, seed, frequency_penalty=1.5)["token_ids"]
    for t in out[2:]:
        piece = tok.decode([t])
        if len(piece.strip()) >= 3:
            return piece[1:3]
    pytest.fail(f"precondition: no token of 3+ characters to stop in among {tok.pieces(out)}")


def test_a_batch_with_n_2_applies_stop_and_frequency_penalty_to_each_choice(api, tiny_engine):
    """2 prompts x n=2 with a stop string and frequency_penalty: each choice is exactly the one-process
    run with the same params and seed + j; the stop string is never in a reply; usage counts every
    token sampled (the stop string's too)."""
    tok = get_tokenizer()
    prompts = ["Hello, I'm a language model,", "The three small computers"]
    ids = [tok.encode(p) for p in prompts]
    stop = pick_stop(tiny_engine, ids[0], STOP_ASK["seed"])
    r = api.completions.create(model="local", prompt=prompts, n=2, stop=[stop], frequency_penalty=1.5, **STOP_ASK)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    sampled, unpenalized = 0, []
    for c in r.choices:
        i, j = divmod(c.index, 2)
        want = one_process(tiny_engine, ids[i], STOP_ASK["seed"] + j, stop=(stop,), frequency_penalty=1.5)
        assert (c.text, c.finish_reason) == (want["text"], want["finish_reason"]), \
            f"choice {c.index} (prompt {i}, seed {STOP_ASK['seed'] + j}) vs one process; exact: the same calls"
        assert stop not in c.text
        sampled += len(want["token_ids"])
        plain = one_process(tiny_engine, ids[i], STOP_ASK["seed"] + j, stop=(stop,))
        unpenalized.append(plain["token_ids"] != want["token_ids"])
    assert r.choices[0].finish_reason == "stop", f"choice 0 was to meet {stop!r}: {r.choices[0].text!r}"
    assert any(unpenalized), "precondition: frequency_penalty=1.5 changed no choice, so it proves nothing"
    assert r.usage.completion_tokens == sampled and r.usage.prompt_tokens == sum(map(len, ids))


def test_a_streamed_batch_with_a_stop_never_sends_the_stop_string(api, tiny_engine):
    """Streamed, a batch's choices end at the stop string with finish_reason "stop": the text
    streamed for each choice is the reply without the stop string (nothing of it is sent and then
    taken back), and the usage equals the unstreamed answer's."""
    tok = get_tokenizer()
    prompts = ["Hello, I'm a language model,", "The three small computers"]
    stop = pick_stop(tiny_engine, tok.encode(prompts[0]), STOP_ASK["seed"])
    ask = dict(model="local", prompt=prompts, n=2, stop=stop, frequency_penalty=1.5, **STOP_ASK)
    whole = api.completions.create(**ask)
    chunks = list(api.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    got, finals = {i: "" for i in range(4)}, {}
    for chunk in chunks:
        for c in chunk.choices:
            got[c.index] += c.text
            assert stop not in got[c.index], f"choice {c.index} streamed the stop string {stop!r}: {got[c.index]!r}"
            if c.finish_reason:
                finals[c.index] = c.finish_reason
    assert [got[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [finals[i] for i in range(4)] == [c.finish_reason for c in whole.choices] and finals[0] == "stop"
    # the same counts; the streamed request came second, so it may reuse the first one's prompt caches
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens_details.cached_tokens
