"""Decoding: choosing the next token from the model's logits.

The model gives one score (logit) per vocabulary entry; a decoding strategy turns those V scores
into one token id. With logits [2.0, 1.0, 0.0] for a 3-token vocabulary:

    greedy     always the argmax                                  -> 0
    sampling   draw from softmax(logits / temperature)            -> 0 (67%), 1 (24%), 2 (9%)
    top_k      keep the k highest, renormalize, draw; k=2         -> 0 (73%), 1 (27%)
    top_p      keep the fewest highest-probability tokens whose   -> p=0.9: 0 (73%), 1 (27%)
               probabilities add up to at least p, renormalize, draw

Temperature divides the logits first: below 1 it sharpens the distribution towards greedy, above
1 it flattens it towards uniform.

Strategies live in a registry, so adding one is a function plus a decorator:

    @register("min_p", uses=("temperature", "top_p"))
    def min_p(logits, rng, params):
        probs = softmax(logits, params.temperature)
        ids = np.flatnonzero(probs >= params.top_p * probs.max())
        return draw(ids, probs[ids], rng)

after which SamplingParams(strategy="min_p") validates, `sample` dispatches to it, and model_config.yaml
may name it under decoding_strategies (with the keys for the knobs it uses: temperature, p or top_p).
Everything random goes through one np.random.Generator, so a seed reproduces a generation exactly.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

# What a request may ask for (fields, ranges, defaults, strategy names) is sampling_params.py's, which
# holds no numpy; SamplingParams and its helpers are re-exported so that code that samples imports one module.
from .sampling_params import (  # noqa: F401
    BUILT_IN,
    STRATEGY_USES,
    TUNABLE,
    DecodingError,
    SamplingParams,
    check_stop,
    infer_strategy,
    is_int,
    is_number,
    make_params,
    request_params,
    unknown_strategy,
)

EOT = 50256     # GPT-2's <|endoftext|>: the one special token, and the end of a reply


# ---------------------------------------------------------------------------------------------
# The registry

Strategy = Callable[[np.ndarray, np.random.Generator, SamplingParams], int]
STRATEGIES: dict[str, Strategy] = {}             # name -> the function; its knobs: STRATEGY_USES[name]


def register(name: str, *, uses: tuple[str, ...] = ("temperature",), replace: bool = False):
    """Decorator: make `fn(logits, rng, params) -> token id` available as strategy `name`.

    `uses` lists the fields of SamplingParams the strategy reads, so that validation demands
    temperature > 0 only where temperature matters. The name goes into sampling_params.STRATEGY_USES,
    so requests, the CLI and model_config.yaml's decoding_strategies can name it from then on.
    """
    unknown = set(uses) - set(TUNABLE)
    if unknown:
        raise ValueError(f"register({name!r}): unknown fields in uses: {sorted(unknown)}; "
                         f"choose from {TUNABLE}")
    if name in STRATEGIES and not replace:
        raise ValueError(f"decoding strategy {name!r} is already registered; pass replace=True")

    def decorator(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        STRATEGY_USES[name] = tuple(uses)
        return fn

    return decorator


def unregister(name: str) -> None:
    STRATEGIES.pop(name, None)
    STRATEGY_USES.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Probabilities


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) over the last axis, in float64, without overflow.

    [2.0, 1.0, 0.0] -> [-0.408, -1.408, -2.408]  (exp of these: 0.665, 0.245, 0.090)
    Reported as the logprob of each generated token, before temperature or truncation.
    """
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)          # largest is 0: exp cannot overflow
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) for one position's logits (V,): logprob of token t = logits[t] - logsumexp.

    [2.0, 1.0, 0.0] -> 2.408, so the logprob of token 0 is 2.0 - 2.408 = -0.408, as log_softmax says.
    One pass over V per generated token, instead of a whole float64 log_softmax: exp runs in the
    logits' own float32 (vectorized, several times faster than float64), the sum in float64.
    """
    x = np.asarray(logits)
    top = x.max()
    return float(top) + math.log(float(np.sum(np.exp(x - top), dtype=np.float64)))


def most_likely(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, most likely first, ties broken by the lower id.

    [0.1, 3.0, 2.0, 3.0], k=3 -> [1, 3, 2]. The same as a stable argsort of -logits cut to k, but
    without sorting all 50257 entries: only those at or above the k-th largest value are sorted.
    """
    x = np.asarray(logits)
    k = min(k, x.shape[-1])
    kth = np.partition(x, x.shape[-1] - k)[x.shape[-1] - k]   # the k-th largest value
    ids = np.flatnonzero(x >= kth)                             # (>= k,) in increasing id order
    return ids[np.argsort(-x[ids], kind="stable")][:k]


def top_probs(logprobs: np.ndarray, k: int = 5) -> list:
    """The k likeliest ids as [[id, probability], ...], likeliest first.

    log_softmax([0.0, 2.0, 1.0]) = [-2.408, -0.408, -1.408] (probabilities 0.090, 0.665, 0.245), k=2
    -> [[1, 0.665241], [2, 0.244728]]     (6 significant digits: a random model's 2.7e-05 stays readable)
    """
    k = min(k, logprobs.shape[-1])
    ids = np.argpartition(-logprobs, k - 1)[:k]                             # (k,) in no particular order
    ids = ids[np.lexsort((ids, -logprobs[ids]))]                            # likeliest first, ties by id
    return [[int(i), round_sig(np.exp(logprobs[i]))] for i in ids]


def round_sig(p) -> float:
    """p rounded to 6 significant digits, as a float: 0.00002712345 -> 2.71235e-05."""
    return float(f"{float(p):.6g}")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) as float64: (V,) -> (V,) summing to 1.

    [2.0, 1.0, 0.0], temperature 1 -> [0.665, 0.245, 0.090];  temperature 0.5 -> [0.867, 0.117, 0.016]
    """
    x = np.asarray(logits, dtype=np.float64)                 # (V,)
    # shift before dividing: (x - max) / T is <= 0 and finite for every T > 0, where x / T alone
    # overflows to inf for a tiny T (1e-300), and inf - inf would make every probability NaN
    with np.errstate(over="ignore"):                        # a tiny T: far-off logits go to -inf, exp 0
        e = np.exp((x - np.max(x)) / temperature)
    return e / np.sum(e)


def draw(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """Pick one of `ids` with the given (not necessarily normalized) probabilities.

    One uniform number u in [0, total) is located in the running sum of the probabilities:
    probs [0.5, 0.3, 0.2] -> cumsum [0.5, 0.8, 1.0]; u=0.62 falls in the second slot -> ids[1].
    Exactly one rng.random() call per token keeps a seeded generation reproducible.
    """
    cum = np.cumsum(probs, dtype=np.float64)                 # (n,)
    u = rng.random() * cum[-1]
    # side="right" skips zero-probability entries: their slot in the running sum is empty.
    i = int(np.searchsorted(cum, u, side="right"))
    return int(ids[min(i, len(ids) - 1)])


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, in increasing id order: [0.1, 3.0, 2.0, -1.0], k=2 -> [1, 2]."""
    k = min(k, logits.shape[-1])
    ids = np.argpartition(logits, -k)[-k:]                   # (k,) in no particular order
    # argpartition's order is an implementation detail; sorting keeps seeded draws reproducible.
    return np.sort(ids)


# A running sum that "should" equal p can land an ulp below it (0.7 + 0.1 + 0.1 = 0.8999999999999999);
# without the tolerance, p=0.9 would then keep a fourth token it does not need.
_TOP_P_TOLERANCE = 1e-9


def top_p_ids(probs: np.ndarray, p: float) -> np.ndarray:
    """The nucleus: the fewest highest-probability ids whose probabilities add up to >= p.

    probs [0.5, 0.3, 0.15, 0.05]: p=0.75 -> [0, 1];  p=0.8 -> [0, 1];  p=0.81 -> [0, 1, 2]
    At least one id is always kept. Returned in decreasing probability (ties by lower id).
    """
    order = np.argsort(-probs, kind="stable")                # (V,) most likely first
    cum = np.cumsum(probs[order])                            # (V,)
    n_keep = int(np.searchsorted(cum, p - _TOP_P_TOLERANCE, side="left")) + 1
    return order[:min(n_keep, len(order))]


# ---------------------------------------------------------------------------------------------
# Built-in strategies


@register("greedy", uses=BUILT_IN["greedy"])
def greedy(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    return int(np.argmax(logits))


@register("sampling", uses=BUILT_IN["sampling"])
def sampling(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    probs = softmax(logits, params.temperature)              # (V,)
    return draw(np.arange(len(probs)), probs, rng)


@register("top_k", uses=BUILT_IN["top_k"])
def top_k(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    ids = top_k_ids(logits, params.top_k)                    # (k,)
    return draw(ids, softmax(logits[ids], params.temperature), rng)


@register("top_p", uses=BUILT_IN["top_p"])
def top_p(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    probs = softmax(logits, params.temperature)              # (V,)
    ids = top_p_ids(probs, params.top_p)                     # (n,) n >= 1
    return draw(ids, probs[ids], rng)


# ---------------------------------------------------------------------------------------------
# Penalties and bias: applied to the logits before any strategy picks a token


def penalized(params: SamplingParams) -> bool:
    """Does `params` set any logit_bias or penalty (so that penalize changes the logits)?"""
    p = params
    return bool(p.logit_bias or p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty)


def penalize(logits: np.ndarray, params: SamplingParams, prompt_ids=(), output_ids=()) -> np.ndarray:
    """The logits a strategy sees for one position (V,), after logit_bias and the penalties.

    In this order (vLLM's; transformers applies sequence_bias before repetition_penalty too):
      1. logit_bias:          logits[t] += bias[t]
      2. repetition_penalty:  for t in prompt or reply: logits[t] / p if logits[t] > 0 else logits[t] * p
      3. frequency/presence:  logits[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty,
                              count[t] = how often t was generated so far (the prompt does not count)

    logits [2.0, 1.0, -1.0], prompt [0], reply [2, 2]:
      repetition_penalty 2       -> [1.0, 1.0, -2.0]     (token 1 was never seen)
      frequency_penalty 0.5      -> [2.0, 1.0, -2.0]     (token 2: twice, -1.0)
      presence_penalty 0.5       -> [2.0, 1.0, -1.5]
      logit_bias ((1, 5),)       -> [2.0, 6.0, -1.0]
    Returns `logits` itself when nothing is set (no copy on the common path).
    """
    p = params
    if not penalized(p):
        return logits
    x = np.array(logits, dtype=np.float32)                                      # (V,) a copy
    for token, bias in p.logit_bias:
        x[token] += bias
    if p.repetition_penalty != 1:
        seen = np.unique(np.concatenate([np.asarray(prompt_ids, np.int64), np.asarray(output_ids, np.int64)]))
        s = x[seen]                                                             # (n,)
        x[seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and len(output_ids):
        ids, counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
        x[ids] -= (counts * p.frequency_penalty + p.presence_penalty).astype(np.float32)
    return x


# ---------------------------------------------------------------------------------------------
# Entry points


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id for one position's logits (V,), by the strategy `params` names.

    `params` should come from `make_params` or `SamplingParams.validate()`; that is checked once
    per request, not here once per token.
    """
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise DecodingError(f"logits must have shape (V,) with V >= 1 (got shape {logits.shape})")
    top = logits.max()      # NaN if any is NaN, +inf if any is +inf, -inf if all are -inf
    if not np.isfinite(top):
        raise DecodingError(f"logits must be finite numbers, -inf allowed for masked tokens "
                            f"(largest is {top})")
    try:
        strategy = STRATEGIES[params.strategy]
    except KeyError:
        raise unknown_strategy(params.strategy) from None
    return int(strategy(logits, rng, params))


def make_rng(seed: int | None) -> np.random.Generator:
    """The one source of randomness for a generation: same seed, same logits -> same tokens."""
    return np.random.default_rng(seed)
