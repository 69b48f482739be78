"""Decoding strategies on small logits vectors whose answers can be checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nanopipe.decoding import (
    STRATEGIES,
    DecodingError,
    SamplingParams,
    draw,
    infer_strategy,
    log_softmax,
    make_params,
    make_rng,
    penalize,
    register,
    request_params,
    sample,
    softmax,
    top_k_ids,
    top_p_ids,
    unregister,
)

CONFIG = {
    "active_decoding_strategy": "top_p",
    "max_new_tokens": 50,
    "decoding_strategies": {
        "greedy": {},
        "sampling": {"temperature": 0.8},
        "top_p": {"temperature": 0.8, "p": 0.9},
        "top_k": {"temperature": 0.8, "k": 50},
    },
}

# probabilities 0.5, 0.3, 0.15, 0.05 exactly, as logits
NUCLEUS_LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)


def drawn_ids(logits, params, n, seed=0):
    rng = make_rng(seed)
    return [sample(logits, params, rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Probabilities


def test_softmax_worked_example():
    np.testing.assert_allclose(softmax(np.array([2.0, 1.0, 0.0])), [0.665241, 0.244728, 0.090031],
                               atol=1e-6)
    # temperature 0.5 is softmax of the doubled logits
    np.testing.assert_allclose(softmax(np.array([2.0, 1.0, 0.0]), 0.5),
                               softmax(np.array([4.0, 2.0, 0.0])), rtol=1e-12)


def test_log_softmax_is_stable_and_normalized():
    big = log_softmax(np.array([1000.0, 0.0], dtype=np.float32))
    np.testing.assert_allclose(big, [0.0, -1000.0])
    x = np.array([[2.0, 1.0, 0.0], [0.5, -3.0, 7.0]])            # (2, 3): rows independent
    out = log_softmax(x)
    assert out.dtype == np.float64 and out.shape == (2, 3)
    np.testing.assert_allclose(np.exp(out).sum(axis=-1), [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(out[0], np.log(np.array([math.e**2, math.e, 1.0]) / (math.e**2 + math.e + 1)),
                               rtol=1e-12)


def test_draw_never_picks_zero_probability():
    ids = np.array([10, 11, 12, 13])
    probs = np.array([0.0, 0.5, 0.0, 0.5])
    rng = make_rng(3)
    assert {draw(ids, probs, rng) for _ in range(500)} == {11, 13}


# ---------------------------------------------------------------------------------------------
# Strategies


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -2.0, 2.9], dtype=np.float32)
    params = SamplingParams(strategy="greedy", temperature=0.0).validate()  # temperature ignored
    assert drawn_ids(logits, params, 20) == [1] * 20


def test_top_k_ids_worked_example():
    assert top_k_ids(np.array([0.1, 3.0, 2.0, -1.0]), 2).tolist() == [1, 2]
    assert top_k_ids(np.array([0.1, 3.0]), 5).tolist() == [0, 1]         # k larger than V


def test_top_k_never_leaves_the_top_k():
    logits = make_rng(123).normal(size=200).astype(np.float32)   # (V,)
    k = 5
    allowed = set(np.argsort(logits)[-k:].tolist())
    params = SamplingParams(strategy="top_k", top_k=k, temperature=3.0).validate()
    seen = set(drawn_ids(logits, params, 2000))
    assert seen == allowed       # never outside, and at this temperature every one of them shows up


@pytest.mark.parametrize("p, kept", [(0.01, [0]), (0.5, [0]), (0.75, [0, 1]), (0.8, [0, 1]),
                                     (0.81, [0, 1, 2]), (0.95, [0, 1, 2]), (0.96, [0, 1, 2, 3]),
                                     (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    assert top_p_ids(np.array([0.5, 0.3, 0.15, 0.05]), p).tolist() == kept
    # the same set through the model's path: logits -> softmax -> nucleus -> draws
    params = SamplingParams(strategy="top_p", top_p=p).validate()
    assert set(drawn_ids(NUCLEUS_LOGITS, params, 3000)) == set(kept)


def test_top_p_boundary_survives_rounding():
    # 0.7 + 0.1 + 0.1 is 0.8999999999999999 in floating point; the third token still reaches 0.9
    assert top_p_ids(np.array([0.7, 0.1, 0.1, 0.1]), 0.9).tolist() == [0, 1, 2]


def test_top_p_orders_by_probability_not_id():
    assert top_p_ids(np.array([0.05, 0.15, 0.3, 0.5]), 0.75).tolist() == [3, 2]


def test_very_low_temperature_sampling_is_argmax():
    logits = np.array([1.0, 1.1, 0.9, -5.0], dtype=np.float32)
    params = SamplingParams(strategy="sampling", temperature=1e-3).validate()
    assert set(drawn_ids(logits, params, 1000)) == {1}


def test_sampling_frequencies_match_softmax():
    logits = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    n = 20000
    counts = np.bincount(drawn_ids(logits, SamplingParams(strategy="sampling"), n), minlength=3)
    expected = n * softmax(logits)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 13.82, f"chi-square {chi2:.2f} (2 dof, p=0.001 bound 13.82): {counts} vs {expected}"


def test_masked_tokens_are_never_sampled():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf], dtype=np.float32)
    for strategy in ("sampling", "top_k", "top_p"):
        params = SamplingParams(strategy=strategy, top_k=3).validate()
        assert set(drawn_ids(logits, params, 300)) == {0, 2}, strategy


@pytest.mark.parametrize("strategy", ["sampling", "top_k", "top_p"])
def test_seed_reproduces_the_sequence(strategy):
    steps = make_rng(7).normal(scale=2.0, size=(40, 500)).astype(np.float32)  # (T, V) logits

    def generate(seed):
        params = SamplingParams(strategy=strategy, top_k=40, top_p=0.9, seed=seed).validate()
        rng = make_rng(params.seed)
        return [sample(row, params, rng) for row in steps]

    first = generate(1234)
    assert generate(1234) == first
    assert generate(1235) != first


def test_full_vocabulary_size():
    logits = make_rng(0).normal(size=50257).astype(np.float32)     # (V,) as GPT-2 gives them
    for strategy in STRATEGIES:
        token = sample(logits, SamplingParams(strategy=strategy, top_p=0.9).validate(), make_rng(0))
        assert 0 <= token < 50257
    assert sample(logits, SamplingParams(), make_rng(0)) == int(np.argmax(logits))


@pytest.mark.parametrize("logits, match", [
    (np.zeros((2, 3), dtype=np.float32), r"shape \(V,\)"),
    (np.zeros(0, dtype=np.float32), r"shape \(V,\)"),
    (np.array([0.0, np.nan], dtype=np.float32), "finite"),
    (np.array([0.0, np.inf], dtype=np.float32), "finite"),
    (np.array([-np.inf, -np.inf], dtype=np.float32), "finite"),
])
def test_bad_logits(logits, match):
    with pytest.raises(DecodingError, match=match):
        sample(logits, SamplingParams(strategy="sampling"), make_rng(0))


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("fields, field", [
    ({"strategy": "nope"}, "strategy"),
    ({"strategy": "sampling", "temperature": 0}, "temperature"),
    ({"strategy": "top_k", "temperature": -1.0}, "temperature"),
    ({"strategy": "top_p", "temperature": float("nan")}, "temperature"),
    ({"strategy": "sampling", "temperature": float("inf")}, "temperature"),
    ({"strategy": "sampling", "temperature": "hot"}, "temperature"),
    ({"strategy": "sampling", "temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"max_tokens": False}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
])
def test_invalid_value_names_the_field(fields, field):
    with pytest.raises(DecodingError, match=rf"^{field}: must") as e:
        SamplingParams(**fields).validate()
    assert e.value.field == field, "the field is carried on the error, not parsed out of its text"


def test_temperature_message():
    with pytest.raises(DecodingError) as e:
        SamplingParams(strategy="top_k", temperature=0).validate()
    assert str(e.value).startswith("temperature: must be > 0 for strategy 'top_k' (got 0)")


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(DecodingError, match=r"greedy, sampling, top_k, top_p \(got \"beam\"\)"):
        SamplingParams(strategy="beam").validate()


def test_context_size():
    params = SamplingParams(max_tokens=50)
    assert params.validate(n_ctx=1024, prompt_len=974).max_tokens == 50      # exactly fits
    with pytest.raises(DecodingError) as e:
        params.validate(n_ctx=1024, prompt_len=1000)
    msg = str(e.value)
    assert msg.startswith("max_tokens")
    assert "1000" in msg and "max_tokens 50" in msg and "n_ctx=1024" in msg and "<= 24" in msg


def test_validate_normalizes_numbers():
    params = SamplingParams(strategy="top_p", temperature=1, top_k=np.int64(5), top_p=1,
                            max_tokens=np.int32(3), seed=np.uint8(9)).validate()
    assert (type(params.temperature), type(params.top_p)) == (float, float)
    assert (type(params.top_k), type(params.max_tokens), type(params.seed)) == (int, int, int)
    assert params == SamplingParams("top_p", 1.0, 5, 1.0, 3, 9)


def test_greedy_ignores_temperature():
    assert SamplingParams(strategy="greedy", temperature=0).validate().temperature == 0.0


# ---------------------------------------------------------------------------------------------
# make_params


def test_make_params_uses_the_active_strategy_section():
    assert make_params(CONFIG) == SamplingParams(strategy="top_p", temperature=0.8, top_k=50,
                                                 top_p=0.9, max_tokens=50, seed=None)


def test_make_params_strategy_override_takes_that_section():
    params = make_params(CONFIG, strategy="top_k")
    assert (params.strategy, params.temperature, params.top_k) == ("top_k", 0.8, 50)
    assert params.top_p == 1.0           # the top_p section is not applied to another strategy
    assert make_params(CONFIG, strategy="greedy").temperature == 1.0


def test_make_params_overrides_win_and_none_means_default():
    params = make_params(CONFIG, temperature=1.2, top_p=None, max_tokens=7, seed=3)
    assert (params.strategy, params.temperature, params.top_p) == ("top_p", 1.2, 0.9)
    assert (params.max_tokens, params.seed) == (7, 3)


def test_make_params_without_config():
    assert make_params() == SamplingParams()
    assert make_params(None, strategy="sampling", temperature=0.5).temperature == 0.5


def test_make_params_validates():
    with pytest.raises(DecodingError, match="^temperature: must be > 0"):
        make_params(CONFIG, temperature=0)
    with pytest.raises(DecodingError, match="^top_p: must be a number in"):
        make_params({**CONFIG, "decoding_strategies": {"top_p": {"p": 2}}})


@pytest.mark.parametrize("config, overrides, match", [
    (CONFIG, {"temprature": 0.5}, r"unknown sampling parameter\(s\) \['temprature'\]"),
    ({"active_decoding_strategy": "top_p", "decoding_strategies": {"top_p": {"q": 1}}}, {},
     r"decoding_strategies\.top_p: unknown key 'q'"),
    ({"active_decoding_strategy": "top_p", "decoding_strategies": {"top_p": [0.9]}}, {},
     r"decoding_strategies\.top_p must be a mapping"),
])
def test_make_params_rejects_unknown_keys(config, overrides, match):
    with pytest.raises(DecodingError, match=match):
        make_params(config, **overrides)


# ---------------------------------------------------------------------------------------------
# The registry


@pytest.fixture
def min_p_strategy():
    # the example from the module docstring
    @register("min_p", uses=("temperature", "top_p"))
    def min_p(logits, rng, params):
        probs = softmax(logits, params.temperature)
        ids = np.flatnonzero(probs >= params.top_p * probs.max())
        return draw(ids, probs[ids], rng)

    yield min_p
    unregister("min_p")


def test_custom_strategy_is_usable_by_name(min_p_strategy):
    assert STRATEGIES["min_p"] is min_p_strategy
    params = make_params({"decoding_strategies": {"min_p": {"p": 0.5}}}, strategy="min_p")
    assert (params.strategy, params.top_p) == ("min_p", 0.5)
    # probs 0.5, 0.3, 0.15, 0.05: at least half the top probability keeps ids 0 and 1
    assert set(drawn_ids(NUCLEUS_LOGITS, params, 1000)) == {0, 1}
    with pytest.raises(DecodingError, match="^temperature: must be > 0 for strategy 'min_p'"):
        make_params(strategy="min_p", temperature=0)


def test_registry_errors(min_p_strategy):
    with pytest.raises(ValueError, match="already registered"):
        register("min_p")(min_p_strategy)
    with pytest.raises(ValueError, match="unknown fields in uses"):
        register("other", uses=("temp",))
    assert "other" not in STRATEGIES


def test_unregistered_strategy_is_unknown_again():
    assert "min_p" not in STRATEGIES
    with pytest.raises(DecodingError, match="^strategy: must be one of"):
        sample(NUCLEUS_LOGITS, SamplingParams(strategy="min_p"), make_rng(0))


# ---------------------------------------------------------------------------------------------
# Which strategy a request's fields mean, and conflicts named by field

GREEDY_CONFIG = {"active_decoding_strategy": "greedy", "max_new_tokens": 50,
                 "decoding_strategies": {"greedy": {}, "top_k": {"temperature": 1.0, "k": 50}}}


@pytest.mark.parametrize("sent, strategy", [
    ({}, None),                                              # nothing sent: the model's default
    ({"temperature": 0.8, "top_k": 40}, "top_k"),            # the guide's /chat request
    ({"temperature": 0}, "greedy"),
    ({"temperature": 0, "top_p": 0.5}, "greedy"),
    ({"temperature": 0.7}, "sampling"),
    ({"top_p": 0.3}, "top_p"),
    ({"temperature": 0.7, "top_p": 1}, "sampling"),          # top_p 1 keeps every token
    ({"top_k": 5, "top_p": 1}, "top_k"),
    ({"strategy": "top_k", "top_k": 5, "temperature": 0.5}, "top_k"),
    ({"strategy": "greedy", "temperature": 0}, "greedy"),
    ({"strategy": "greedy", "top_p": 1}, "greedy"),
])
def test_infer_strategy(sent, strategy):
    fields = {"strategy": None, **sent}
    assert infer_strategy(fields.pop("strategy"), **fields) == strategy


@pytest.mark.parametrize("sent, field", [
    ({"strategy": "greedy", "top_k": 40}, "top_k"),
    ({"strategy": "greedy", "temperature": 0.8}, "temperature"),
    ({"strategy": "greedy", "top_p": 0.9}, "top_p"),
    ({"strategy": "sampling", "top_k": 40}, "top_k"),
    ({"strategy": "top_k", "top_p": 0.9}, "top_p"),
    ({"strategy": "top_p", "top_k": 3}, "top_k"),
    ({"top_k": 40, "top_p": 0.9}, "top_p"),
])
def test_a_field_the_strategy_would_ignore_is_refused(sent, field):
    fields = {"strategy": None, **sent}
    with pytest.raises(DecodingError) as e:
        infer_strategy(fields.pop("strategy"), **fields)
    assert e.value.field == field and str(e.value).startswith(f"{field}:")


def test_guide_chat_request_on_a_greedy_cluster_runs_top_k():
    # the guide's request: it used to run greedily while claiming temperature 0.8 and top_k 40
    params = request_params(GREEDY_CONFIG, temperature=0.8, top_k=40, max_tokens=30)
    assert (params.strategy, params.temperature, params.top_k, params.max_tokens) == ("top_k", 0.8, 40, 30)
    assert request_params(GREEDY_CONFIG).strategy == "greedy"
    assert request_params(GREEDY_CONFIG, top_k=7).temperature == 1.0    # the rest from the top_k section


def test_sent_fields_round_trip_through_request_params():
    for params in [SamplingParams("top_k", 0.8, 40, 1.0, 30, 5), SamplingParams("greedy", max_tokens=3),
                   SamplingParams("top_p", 0.5, top_p=0.9, stop=("\n",), frequency_penalty=0.5,
                                  logit_bias=((7, -100.0),)).validate()]:
        assert request_params(GREEDY_CONFIG, **params.sent_fields()) == params.validate()


# ---------------------------------------------------------------------------------------------
# stop, penalties and bias: validation


@pytest.mark.parametrize("fields, field", [
    ({"stop": list("abcdefghi")}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"presence_penalty": True}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"logit_bias": {"12": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
])
def test_invalid_extra_names_the_field(fields, field):
    with pytest.raises(DecodingError, match=rf"^{field}: ") as e:
        SamplingParams(**fields).validate()
    assert e.value.field == field


def test_extras_normalized():
    p = SamplingParams(stop="\n", logit_bias={"50256": -100, 3: 2}, frequency_penalty=1).validate()
    assert p.stop == ("\n",) and p.logit_bias == ((3, 2.0), (50256, -100.0)) and p.frequency_penalty == 1.0
    assert SamplingParams(stop=None).validate().stop == ()
    with pytest.raises(DecodingError, match=r"logit_bias: 1000 is not a token id \(0..999\)"):
        SamplingParams(logit_bias={1000: 1}).validate(n_vocab=1000)


# ---------------------------------------------------------------------------------------------
# stop, penalties and bias: what they do to the logits


def test_penalize_worked_example():
    logits = np.array([2.0, 1.0, -1.0], np.float32)
    prompt, reply = [0], [2, 2]

    def pen(**kw):
        return penalize(logits, SamplingParams(**kw).validate(), prompt, reply).tolist()

    assert pen(repetition_penalty=2) == [1.0, 1.0, -2.0]
    assert pen(frequency_penalty=0.5) == [2.0, 1.0, -2.0]
    assert pen(presence_penalty=0.5) == [2.0, 1.0, -1.5]
    assert pen(logit_bias={1: 5}) == [2.0, 6.0, -1.0]
    assert penalize(logits, SamplingParams(), prompt, reply) is logits, "no penalty: no copy"
    assert logits.tolist() == [2.0, 1.0, -1.0], "the caller's logits are never changed"


def test_penalties_apply_to_every_strategy():
    # token 0 dominates; a bias of -100 bans it for every strategy
    logits = np.array([10.0, 0.0, 0.0, 0.0], np.float32)
    for strategy in STRATEGIES:
        params = SamplingParams(strategy=strategy, logit_bias={0: -100}).validate()
        picks = {sample(penalize(logits, params), params, make_rng(s)) for s in range(30)}
        assert 0 not in picks, strategy


def test_frequency_penalty_matches_openai_formula():
    rng = make_rng(3)
    logits = rng.normal(size=50).astype(np.float32)
    reply = [3, 3, 3, 7, 9, 9]
    params = SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4).validate()
    out = penalize(logits, params, [1, 2], reply)
    want = logits.astype(np.float64).copy()
    for t in set(reply):        # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
        want[t] -= reply.count(t) * 0.7 + 1 * -0.4
    diff = float(np.max(np.abs(out - want)))
    assert diff < 1e-5, f"largest difference {diff}"
